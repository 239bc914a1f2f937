"""``hctembed serve``: the API answers as the CLI does, every error is JSON with its status, the token and the
upload limit hold, a server keeps answering while an ``embed`` writes the same database and picks up its scans,
and the page shows hits in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from hctembed.serve.app import ServeConfig, create_app


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hctembed.cli", *map(str, args)], capture_output=True, text=True, **kw)


def _synth(folder: Path, *, n: int, seed: int) -> Path:
    run = _cli("synth", folder, "--n", n, "--seed", seed, "--matrix", "48", "--quiet")
    assert run.returncode == 0, run.stderr
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A database of 6 synthetic scans and an in-process app over it."""
    root = tmp_path_factory.mktemp("serve")
    archive = _synth(root / "archive", n=6, seed=11)
    db = root / "h.duckdb"
    run = _cli("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0", "--quiet")
    assert run.returncode == 0, run.stderr
    app = create_app(ServeConfig(db=db, poll_s=0.3))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, db, archive
    app.state.hctembed.stop()


def _stored_ids(db: Path) -> list[str]:
    from hctembed.index.store import Store

    with Store(db, read_only=True) as store:
        return sorted(store.resolve_collection().vectors()[2])


def _same_hits(api: list[dict], cli: list[dict]) -> None:
    assert [h["scan_id"] for h in api] == [h["scan_id"] for h in cli]
    assert [h["id"] for h in api] == [h["id"] for h in cli]
    assert np.allclose([h["score"] for h in api], [h["score"] for h in cli], atol=1e-5)
    assert [h["labels"] for h in api] == [h["labels"] for h in cli]


def test_api_answers_equal_the_cli(served):
    client, db, archive = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["scans"] == 6 and len(health["models"]) == 1
    for scan_id in _stored_ids(db)[:2]:
        api = client.get("/api/search", params={"id": scan_id, "k": 4})
        assert api.status_code == 200, api.text
        assert (api.json()["index"], api.json()["exact"]) == ("flat", True)  # which index answered
        cli = _cli("search", "--id", scan_id, "--db", db, "-k", 4, "--json")
        assert cli.returncode == 0, cli.stderr
        _same_hits(api.json()["hits"], [json.loads(line) for line in cli.stdout.splitlines()])
    query = sorted(archive.glob("*.nii.gz"))[2]
    before = set(Path(tempfile.gettempdir()).glob("hctembed-query-*"))
    api = client.post("/api/search", params={"k": 3}, files={"file": ("anything", query.read_bytes())})
    assert api.status_code == 200, api.text
    assert set(Path(tempfile.gettempdir()).glob("hctembed-query-*")) == before  # the upload is gone
    cli = _cli("search", query, "--db", db, "-k", 3, "--json")
    _same_hits(api.json()["hits"], [json.loads(line) for line in cli.stdout.splitlines()])
    scan_id = _stored_ids(db)[0]
    scan = client.get(f"/api/scans/{scan_id}").json()
    assert scan["scan_id"] == scan_id and scan["format"] == "nifti" and all(scan["embedded"].values())
    png = client.get(f"/api/scans/{scan_id}/thumbnail.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/health", "/api/scans/{scan_id}"}


def test_errors_are_json_with_their_status(served, tmp_path):
    client, db, _ = served

    def error(response, status):
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"} and response.json()["error"]
        return response.json()["error"]

    assert "no such scan" in error(client.get("/api/search", params={"id": "nope"}), 404)
    assert "no such scan" in error(client.get("/api/scans/nope"), 404)
    assert "no such scan" in error(client.get("/api/scans/nope/thumbnail.png"), 404)
    assert "id" in error(client.get("/api/search"), 400)
    assert "k" in error(client.get("/api/search", params={"id": _stored_ids(db)[0], "k": 0}), 400)
    assert "no embeddings for model" in error(client.get("/api/search", params={"id": "x", "model": "merlin"}), 400)
    files = {"file": ("x.nii.gz", b"this is not a scan at all")}
    assert "not a scan" in error(client.post("/api/search", files=files), 400)
    nan = np.full((20, 20, 12), np.nan, np.float32)
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.eye(4)), path)
    assert "non-finite" in error(client.post("/api/search", files={"file": ("q", path.read_bytes())}), 400)
    small = create_app(ServeConfig(db=db, max_upload_mb=0.01, token="s3cret"), state=client.app.state.hctembed)
    with TestClient(small, base_url="http://127.0.0.1") as guarded:
        assert "bearer token" in error(guarded.get("/api/search", params={"id": "x"}), 401)
        bad = {"Authorization": "Bearer wrong"}
        assert "bearer token" in error(guarded.get("/api/search", params={"id": "x"}, headers=bad), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert guarded.get("/api/search", params={"id": _stored_ids(db)[0]}, headers=good).status_code == 200
        big = {"file": ("q.nii.gz", os.urandom(50_000))}
        assert "over the limit" in error(guarded.post("/api/search", files=big, headers=good), 413)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(db: Path, *extra) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hctembed.cli", "serve", "--db", str(db), "--port", str(port), *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(120):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.25)
    server.kill()
    raise AssertionError(f"the server did not start: {server.stdout.read()}")


def _raw_post(url: str, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request's head and ``chunks`` of its body, never the rest, and read what the server says (a server
    that waited for the whole body would say nothing: the read times out)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head)
        for chunk in chunks:
            s.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            answer += data
    return answer


def test_an_upload_over_the_limit_is_refused_before_it_is_read_whole(served):
    _, db, _ = served
    server, url = _start_server(db, "--max-upload-mb", "0.5")
    boundary = b"--b\r\nContent-Disposition: form-data; name=file; filename=q\r\n\r\n"
    try:
        # a 10 GB Content-Length, and not one byte of it sent: refused from the header
        head = b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        answer = _raw_post(url, head + b"Content-Length: 10737418240\r\n\r\n", [])
        assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer
        # chunked (no length): 0.6 MB of a body that never ends, refused as it passes the limit
        chunk = b"0" * 65536
        body = [b"%x\r\n%s\r\n" % (len(boundary), boundary)] + [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 10
        answer = _raw_post(url, head + b"Transfer-Encoding: chunked\r\n\r\n", body)
        assert answer.startswith(b"HTTP/1.1 413") and b"over the limit" in answer
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_server_keeps_answering_while_embed_writes_and_picks_up_its_scans(tmp_path):
    first = _synth(tmp_path / "a", n=3, seed=21)
    db = tmp_path / "h.duckdb"
    assert _cli("embed", first, "--db", db, "--model", "vit-micro", "--workers", "0", "-q").returncode == 0
    app = create_app(ServeConfig(db=db, poll_s=0.2))
    second = _synth(tmp_path / "b", n=6, seed=22)
    for f in second.glob("*.nii.gz"):  # another archive's names must not clash with the first one's
        f.rename(f.with_name("b-" + f.name))
    (second / "labels.csv").unlink()
    statuses, seen_live = [], 0
    with TestClient(app, base_url="http://127.0.0.1") as client:
        known = _stored_ids(db)
        embed = subprocess.Popen(
            [sys.executable, "-m", "hctembed.cli", "embed", str(second), "--db", str(db), "--model", "vit-micro",
             "--workers", "0", "--batch-size", "1", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while embed.poll() is None:
            for response in (client.get("/health"), client.get("/api/search", params={"id": known[0], "k": 20})):
                statuses.append(response.status_code)
            seen_live = max(seen_live, client.get("/health").json()["scans"])
            time.sleep(0.05)
        assert embed.returncode == 0, embed.stderr
        deadline = time.time() + 30  # documented bound: --poll-seconds after the batch commits
        while time.time() < deadline and client.get("/health").json()["scans"] < 9:
            time.sleep(0.2)
        assert client.get("/health").json()["scans"] == 9
        hits = client.get("/api/search", params={"id": known[0], "k": 20}).json()["hits"]
        assert len(hits) == 8 and sum(h["scan_id"].startswith("b-") for h in hits) == 6
        cli = _cli("search", "--id", known[0], "--db", db, "-k", 20, "--json")
        _same_hits(hits, [json.loads(line) for line in cli.stdout.splitlines()])
    app.state.hctembed.stop()
    assert statuses and set(statuses) == {200}  # no 5xx, no lock error, during the whole embed
    assert seen_live > 3  # scans of the running embed were searchable before it ended (the live feed)
    assert not list((tmp_path / "h.duckdb.live").glob("*.parquet"))  # the run cleared what its snapshot holds


def test_binding_beyond_loopback_needs_a_token(served, tmp_path):
    _, db, _ = served
    run = _cli("serve", "--db", db, "--host", "0.0.0.0")
    assert run.returncode == 2 and "--token-file" in run.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_shows_hits_in_headless_chromium(served, tmp_path):
    _, db, _ = served
    server, url = _start_server(db)
    scan_id = _stored_ids(db)[0]
    try:
        common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p'}",
                  "--virtual-time-budget=15000"]  # fmt: skip
        dom = subprocess.run(
            [*common, "--dump-dom", f"{url}/?id={scan_id}"], capture_output=True, text=True, timeout=120
        )
        shot = tmp_path / "page.png"
        subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,900", f"{url}/?id={scan_id}"],
                       capture_output=True, timeout=120)  # fmt: skip
        import httpx

        hits = httpx.get(f"{url}/api/search", params={"id": scan_id, "k": 5}, timeout=30).json()["hits"]
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert dom.stdout.count('class="hit"') == 5 and 'class="query"' in dom.stdout, dom.stdout[-2000:]
    assert "cosine" in dom.stdout and "5 hits" in dom.stdout
    assert dom.stdout.count("blob:") >= 6  # the thumbnails arrived (query and hits)
    assert dom.stdout.count('data-loaded="1"') == 6 and 'data-loaded="0"' not in dom.stdout  # and were drawn
    for hit in hits:  # each card says its scan's labels
        positive = ", ".join(sorted(k for k, v in hit["labels"].items() if v == 1)) or "none positive"
        assert f"{hit['scan_id']}</div>" in dom.stdout and f"labels: {positive}" in dom.stdout
    assert shot.exists() and shot.stat().st_size > 10_000


def test_feed_files_older_than_the_snapshot_are_ignored_and_a_stopped_server_is_not_fed(served, tmp_path):
    """A killed run leaves its feed files behind: a newer snapshot holds them, so they must not be applied on
    top of it (here: an old delete of a scan that is stored). A newer file is applied. Once the server stops,
    nobody is attached and a writer neither feeds nor snapshots."""
    from hctembed.index.live_feed import LiveFeed
    from hctembed.serve.state import ServerState

    _, source, _ = served
    db = tmp_path / "h.duckdb"
    shutil.copy(source, db)
    state = ServerState(db, poll_s=60)
    state.start()
    try:
        view = state.view(None)
        victim, other = _stored_ids(db)[:2]
        feed = LiveFeed(state.paths.live)
        assert feed.attached
        args = {"collection_id": view.collection_id, "model_id": view.model_id, "fingerprint": view.fingerprint}
        empty = {
            "ids": [],
            "scan_ids": [],
            "vectors": np.zeros((0, view.dim)),
            "patients": [],
            "labels": [],
            "planes": [],
        }
        stale = feed.publish(**args, **empty, deleted=[victim])
        stale.rename(stale.with_name(f"{state.catalogue.since - 10**9:020d}-1.parquet"))  # before the snapshot
        state.refresh()
        assert state.search_id(victim, k=2)[1]  # still there: the stale delete was ignored
        feed.publish(**args, **empty, deleted=[other])  # after it: applied
        state.refresh()
        with pytest.raises(Exception, match="has no vector"):
            state.search_id(other, k=2)
    finally:
        state.stop()
    assert not LiveFeed(state.paths.live).attached
