"""Load on ``hctembed serve``: concurrent clients against one server on loopback, beside the CLI's per-call time
measured in the same run.

Builds a synthetic archive (``--scans`` scans, 48x48 matrix), embeds it with vit-micro, starts ``hctembed serve``
in its own process and drives it with ``--clients`` threads (each a keep-alive HTTP client) for ``--seconds``
per mode:

* ``id``   ``GET /api/search?id=...&k=10`` (a random stored scan each time);
* ``file`` ``POST /api/search?k=10`` with one of the archive's ``.nii.gz`` files.

* ``hostile`` (with ``--hostile N``): the ``id`` mode again while ``N`` more threads send issue 27's hostile
  uploads (``hostile_payloads.py``: zip and gzip bombs, absurd headers, 8,000-member zips) and hold 50 idle
  half-sent connections each; the honest clients' p50 / p99 beside their ``id`` run alone, the hostile
  requests' answers by status, and the server's peak memory (VmHWM) above its idle memory.

Prints p50 / p99 latency and throughput per mode, the CLI's ``search --id`` and ``search FILE`` wall time
(median of ``--cli-runs`` fresh processes), and the ratio CLI p50 / server p50; errors are counted, never
retried. Writes ``benchmarks/results/serve_load.json``. Loopback only; bounded in clients and time.

With ``--vectors N`` it measures the server at scale instead: N synthetic 768-d unit vectors near a 32-d subspace
(``search_speed.py``'s ``lowrank``) imported with ``import-vectors``, then for each ``--kinds`` index kind
(``hctembed index build --kind``; its build time and build-time recall from the manifest): the server's start-up
time from a saved index (process start to the first /health answer), its steady and peak resident memory
(VmRSS after the load, VmHWM) against the index file's size, p50 / p99 of ``/api/search?id=`` at ``--clients``
clients, and recall@10 of its answers against exact search of the same vectors (numpy, 200 stored scans as
queries, each leaving itself out). Writes ``benchmarks/results/serve_load_vectors_N.json``.

    python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--scans 40] [--hostile 4]
    python benchmarks/serve_load.py --vectors 100000 --kinds exact hnsw
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))  # hostile_payloads, beside this script

MAX_CLIENTS, MAX_SECONDS = 64, 120


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hctembed.cli", *map(str, args)], capture_output=True, text=True)


def timed_cli(args, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = cli(*args)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(result.stderr)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, *, clients: int, seconds: float, request) -> dict:
    """``clients`` threads calling ``request(client)`` for ``seconds``; latency percentiles and throughput."""
    latencies, errors, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    ok = request(client, rng).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - start
                with lock:
                    (latencies.append(took) if ok else errors.__setitem__(0, errors[0] + 1))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    latencies.sort()
    pick = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: None)
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "p50_s": pick(0.50),
        "p99_s": pick(0.99),
        "per_second": len(latencies) / wall,
    }


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def each_hostile_upload(url: str, pid: int, *, idle_mb: float) -> list[dict]:
    """Each hostile upload sent alone: its answer, wall time, the server's peak memory above idle so far, and
    how long ``/health`` took right after it."""
    import hostile_payloads

    rows = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for what, (name, data, _) in hostile_payloads.payloads().items():
            start = time.perf_counter()
            status = client.post("/api/search", files={"file": (name, data)}).status_code
            took = time.perf_counter() - start
            start = time.perf_counter()
            client.get("/health")
            health = time.perf_counter() - start
            rows.append({"what": what, "bytes": len(data), "status": status, "seconds": took,
                         "peak_above_idle_mb": memory_mb(pid)[1] - idle_mb, "health_s": health})  # fmt: skip
    return rows


def hostile_mix(url: str, port: int, *, threads: int, seconds: float) -> dict:
    """``threads`` threads that, until their ``stop`` event (or twice ``seconds``), each hold 50 half-sent
    connections open and send the hostile uploads in turn; returns the threads, the event and a live count
    of the answers by status."""
    import hostile_payloads

    payloads = list(hostile_payloads.payloads().values())
    statuses: dict[str, int] = {}
    lock, stop = threading.Lock(), threading.Event()
    deadline = time.perf_counter() + 2 * seconds

    def worker(k: int) -> None:
        idle = []
        with httpx.Client(base_url=url, timeout=60) as client:
            i = k
            while not stop.is_set() and time.perf_counter() < deadline:
                while len(idle) < 50:
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=5)
                        s.sendall(b"GET /api/sea")  # never finished
                        idle.append(s)
                    except OSError:
                        break
                for s in [s for s in idle if not _still_open(s)]:  # closed by the server: let go of it
                    s.close()
                    idle.remove(s)
                name, data, _ = payloads[i % len(payloads)]
                i += 1
                try:
                    status = str(client.post("/api/search", files={"file": (name, data)}).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
        for s in idle:
            s.close()

    started = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in started:
        t.start()
    return {"threads": started, "stop": stop, "statuses": statuses}


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def start_server(db: Path, port: int, *extra) -> tuple[subprocess.Popen, float]:
    """A server process on ``db`` and the seconds until it first answered /health."""
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "hctembed.cli", "serve", "--db", str(db), "--port", str(port), "--quiet", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - start < 600:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return server, time.perf_counter() - start
        except httpx.HTTPError:
            time.sleep(0.1)
        if server.poll() is not None:
            raise SystemExit("the server exited while starting")
    raise SystemExit("the server did not start within 600 s")


def vectors_mode(args) -> None:
    """The server over ``args.vectors`` imported vectors, for each index kind (see the module docstring)."""
    import numpy as np
    from search_speed import lowrank_unit_vectors

    clients, seconds = min(args.clients, MAX_CLIENTS), min(args.seconds, MAX_SECONDS)
    rng = np.random.default_rng(0)
    x = lowrank_unit_vectors(rng, args.vectors, 768)
    names = [f"v{i:07d}" for i in range(args.vectors)]
    queries = rng.choice(args.vectors, 200, replace=False)
    truth = {}
    for q in queries:  # exact top 10 of each query among the others (chunked: no N x N matrix)
        scores = x @ x[q]
        scores[q] = -np.inf
        truth[int(q)] = set(np.argpartition(-scores, 10)[:10].tolist())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "v.npy", x)
        (Path(tmp) / "v.scan_ids.txt").write_text("\n".join(names) + "\n")
        del x
        db = Path(tmp) / "h.duckdb"
        start = time.perf_counter()
        result = cli("import-vectors", Path(tmp) / "v.npy", "--db", db, "--name", "load", "--index", "exact", "-q")
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        import_s = time.perf_counter() - start
        for kind in args.kinds:
            start = time.perf_counter()
            built = cli("index", "build", "--db", db, "--kind", kind, "--json", "-q")
            if built.returncode != 0:
                raise SystemExit(built.stderr)
            manifest = json.loads(built.stdout)
            build_s = time.perf_counter() - start
            index_mb = sum(p.stat().st_size for p in (Path(str(db) + ".faiss")).glob("*.faiss")) / 2**20
            port = free_port()
            server, startup_s = start_server(db, port)
            url = f"http://127.0.0.1:{port}"
            try:
                answer = httpx.get(url + "/api/search", params={"id": names[0], "k": 10}, timeout=60).json()
                found = []
                for q in queries:
                    hits = httpx.get(url + "/api/search", params={"id": names[q], "k": 10}, timeout=60).json()["hits"]
                    found.append(len({int(h["scan_id"][1:]) for h in hits} & truth[int(q)]) / 10)

                def one_id(client, rng_):
                    return client.get("/api/search", params={"id": names[rng_.randrange(len(names))], "k": 10})

                load = drive(url, clients=clients, seconds=seconds, request=one_id)
                alone = drive(url, clients=1, seconds=seconds / 2, request=one_id)
                steady_mb, peak_mb = memory_mb(server.pid)
            finally:
                server.terminate()
                server.wait(timeout=60)
            row = {"kind": kind, "index": answer.get("index"), "exact": answer.get("exact"),
                   "factory": manifest.get("factory"), "search_params": manifest.get("search_params"),
                   "build_s": round(build_s, 1), "build_recall_at_10": manifest.get("recall_at_10"),
                   "index_mb": round(index_mb, 1), "startup_s": round(startup_s, 2), "steady_rss_mb": round(steady_mb),
                   "peak_rss_mb": round(peak_mb), "peak_over_index": round(peak_mb / index_mb, 2),
                   "recall_at_10": round(float(np.mean(found)), 4), **load,
                   "one_client_p50_s": alone["p50_s"], "one_client_p99_s": alone["p99_s"]}  # fmt: skip
            rows.append(row)
            print(f"{kind}: {row['index']} build {row['build_s']} s, start-up {row['startup_s']} s, index "
                  f"{row['index_mb']:.0f} MB, RSS steady {row['steady_rss_mb']} / peak {row['peak_rss_mb']} MB "
                  f"({row['peak_over_index']}x the index), p50 {load['p50_s'] * 1000:.1f} ms, p99 "
                  f"{load['p99_s'] * 1000:.1f} ms at {clients} clients ({alone['p50_s'] * 1000:.1f} / "
                  f"{alone['p99_s'] * 1000:.1f} ms at one), recall@10 {row['recall_at_10']}",
                  flush=True)  # fmt: skip
    out = Path(__file__).parent / "results" / f"serve_load_vectors_{args.vectors}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"vectors": args.vectors, "dim": 768, "clients": clients, "seconds": seconds, "import_s": round(import_s, 1),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg()[0]}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--scans", type=int, default=40)
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--hostile", type=int, default=4, help="hostile client threads beside the honest ones")
    parser.add_argument("--vectors", type=int, default=0, help="measure the server over N imported vectors")
    parser.add_argument("--kinds", nargs="+", default=["exact", "hnsw"], help="--vectors: index kinds to serve")
    args = parser.parse_args()
    if args.vectors:
        vectors_mode(args)
        return
    clients, seconds = min(args.clients, MAX_CLIENTS), min(args.seconds, MAX_SECONDS)
    with tempfile.TemporaryDirectory() as tmp:
        archive, db = Path(tmp) / "archive", Path(tmp) / "h.duckdb"
        for step in (
            ("synth", archive, "--n", args.scans, "--seed", 5, "--matrix", 48, "--quiet"),
            ("embed", archive, "--db", db, "--model", "vit-micro", "--workers", 0, "--quiet"),
        ):
            result = cli(*step)
            if result.returncode != 0:
                raise SystemExit(result.stderr)
        files = sorted(archive.glob("*.nii.gz"))
        scan_ids = [f.name.removesuffix(".nii.gz") for f in files]
        cli_id = timed_cli(("search", "--id", scan_ids[0], "--db", db, "-k", 10, "--json"), args.cli_runs)
        cli_file = timed_cli(("search", files[0], "--db", db, "-k", 10, "--json"), args.cli_runs)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "hctembed.cli", "serve", "--db", str(db), "--port", str(port), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.25)
            blobs = [f.read_bytes() for f in files[:8]]
            httpx.post(url + "/api/search", files={"file": ("q", blobs[0])}, timeout=120)  # loads the encoder once

            def one_id(client, rng):
                return client.get("/api/search", params={"id": rng.choice(scan_ids), "k": 10})

            def one_file(client, rng):
                return client.post("/api/search", params={"k": 10}, files={"file": ("q", rng.choice(blobs))})

            by_id = drive(url, clients=clients, seconds=seconds, request=one_id)
            by_file = drive(url, clients=clients, seconds=seconds, request=one_file)
            hostile = None
            if args.hostile:
                idle_mb = memory_mb(server.pid)[0]
                alone = each_hostile_upload(url, server.pid, idle_mb=idle_mb)
                for row in alone:
                    peak, health = row["peak_above_idle_mb"], row["health_s"] * 1000
                    print(f"  {row['what']:13} {row['status']}  {row['seconds']:.2f} s  peak {peak:.0f} MB above "
                          f"idle  /health {health:.0f} ms", flush=True)  # fmt: skip
                hostile = hostile_mix(url, port, threads=min(args.hostile, 16), seconds=seconds)
                mixed = drive(url, clients=clients, seconds=seconds, request=one_id)
                hostile["stop"].set()
                for t in hostile.pop("threads"):
                    t.join()
                hostile.pop("stop")
                hostile["peak_above_idle_mb"] = memory_mb(server.pid)[1] - idle_mb
                hostile["alone"] = alone
        finally:
            server.terminate()
            server.wait(timeout=20)
    rows = [
        {"mode": "search by id", **by_id, "cli_s": cli_id, "cli_over_p50": cli_id / by_id["p50_s"]},
        {"mode": "search by file", **by_file, "cli_s": cli_file, "cli_over_p50": cli_file / by_file["p50_s"]},
    ]
    if hostile is not None:
        print(
            f"hostile mix ({args.hostile} threads): honest p50 {mixed['p50_s'] * 1000:.1f} ms "
            f"({mixed['p50_s'] / by_id['p50_s']:.2f}x alone), p99 {mixed['p99_s'] * 1000:.1f} ms "
            f"({mixed['p99_s'] / by_id['p99_s']:.2f}x alone), honest errors {mixed['errors']}; hostile answers "
            f"{hostile['statuses']}; peak {hostile['peak_above_idle_mb']:.0f} MB above idle",
            flush=True,
        )
    for r in rows:
        print(
            f"{r['mode']:15} {clients} clients: p50 {r['p50_s'] * 1000:7.1f} ms  p99 {r['p99_s'] * 1000:7.1f} ms  "
            f"{r['per_second']:7.1f}/s  errors {r['errors']}  |  CLI {r['cli_s']:.2f} s per call  "
            f"-> {r['cli_over_p50']:.0f}x the server's p50",
            flush=True,
        )
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "clients": clients,
        "seconds": seconds,
        "scans": args.scans,
        "load_average_at_end": os.getloadavg()[0],
    }
    out = Path(__file__).parent / "results" / "serve_load.json"
    out.parent.mkdir(exist_ok=True)
    extra = {"hostile": {**hostile, "honest_under_hostile": mixed}} if hostile is not None else {}
    out.write_text(json.dumps({"facts": facts, "rows": rows, **extra}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
