"""What a user waits for: wall time of whole `hctembed` commands, each a fresh process as a user runs it,
against a bare `python -c "import duckdb, faiss"` measured in the same run.

    python benchmarks/command_latency.py [--n 12] [--matrix 128] [--model vit-micro] [--repeats 3]

Writes a synthetic archive and embeds it (not timed), then times, median of ``--repeats`` runs each:
``--help``, ``models``, ``search --id``, ``search --id --montage`` (the pictures of the query and its k = 5
hits), ``search FILE`` and ``bench retrieval``. Prints seconds and the ratio to the bare import and to a plain
``search --id``; writes JSON to benchmarks/results/command_latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HCTEMBED = [sys.executable, "-m", "hctembed.cli"]


def wall(argv: list[str], *, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, db = Path(tmp) / "archive", Path(tmp) / "h.duckdb"
        subprocess.run(
            [*HCTEMBED, "synth", str(root), "--n", str(args.n), "--matrix", str(args.matrix), "-q"], check=True
        )
        embed = [*HCTEMBED, "embed", str(root), "--db", str(db), "--model", args.model, "-q"]
        subprocess.run(embed, check=True, stdout=subprocess.DEVNULL)
        query = sorted(root.glob("*.nii.gz"))[0]
        scan_id = query.name.removesuffix(".nii.gz")
        commands = {
            "python -c 'import duckdb, faiss'": [sys.executable, "-c", "import duckdb, faiss"],
            "hctembed --help": [*HCTEMBED, "--help"],
            "hctembed models": [*HCTEMBED, "models"],
            "search --id": [*HCTEMBED, "search", "--id", scan_id, "--db", str(db), "-k", "5"],
            "search --id --montage": [
                *HCTEMBED,
                "search",
                "--id",
                scan_id,
                "--db",
                str(db),
                "-k",
                "5",
                "--montage",
                f"{tmp}/m.png",
            ],
            "search FILE": [*HCTEMBED, "search", str(query), "--db", str(db), "-k", "5"],
            "bench retrieval": [*HCTEMBED, "bench", "retrieval", "--db", str(db)],
        }
        seconds = {name: wall(argv, repeats=args.repeats) for name, argv in commands.items()}
    bare, plain = seconds["python -c 'import duckdb, faiss'"], seconds["search --id"]
    print(f"{'command':32} {'seconds':>8} {'vs import':>10} {'vs search --id':>15}")
    for name, s in seconds.items():
        print(f"{name:32} {s:8.2f} {s / bare:9.1f}x {s / plain:14.2f}x")
    out = Path(__file__).parent / "results" / "command_latency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
