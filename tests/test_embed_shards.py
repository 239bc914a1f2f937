"""Sharded embedding (Parquet parts per rank + merge) against a single-process run of the same archive.

Real NIfTI files, a real vit-micro, real Parquet parts and DuckDB files; the torchrun test launches two
gloo ranks of the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.embedding.run import embed_archive
from hctembed.embedding.shards import (
    ShardError,
    assigned,
    embed_shard,
    merge_shards,
    write_run_info,
)
from hctembed.index.store import Store, StoreError
from hctembed.io.archive import scan_archive
from hctembed.io.locator import locator_path
from hctembed.io.manifest import write_manifest
from hctembed.model.encoders import load_encoder

runner = CliRunner()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    result = runner.invoke(app, ["synth", str(root), "--n", "7", "--seed", "3", "--matrix", "48", "--quiet"])
    assert result.exit_code == 0, result.output
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    first = sorted(root.glob("synth-*.nii.gz"))[0]
    # the same scan id twice (x.nii.gz and x.nii): the later file must fail as a duplicate in both modes
    import nibabel as nib

    nib.save(nib.load(first), root / first.name.replace(".nii.gz", ".nii"))
    return root


def _contents(db: Path) -> dict:
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        ids, vectors, scan_ids = coll.vectors()
        status = {k: (v.scan_id, v.status, v.reason, v.attempts) for k, v in coll.status().items()}
        scans = store.db.rows("SELECT scan_id, patient_id, source, archive_root, format FROM scans")
    return {"ids": ids, "vectors": vectors, "scan_ids": scan_ids, "status": status, "scans": sorted(scans)}


@pytest.fixture(scope="module")
def single(archive, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("single") / "h.duckdb"
    found = scan_archive(archive)
    with Store(db) as store:
        report = embed_archive(
            refs=found.selected, encoder=load_encoder("vit-micro"), store=store, batch_size=2, num_workers=0
        )
    assert report.embedded == 7 and len(report.failed) == 2
    return db


def _shard_run(archive: Path, db: Path, *, world: int, ranks=None, **kw) -> Path:
    """Every rank of a sharded run, one after another in this process, then the merge."""
    folder = Path(str(db) + ".shards")
    found = scan_archive(archive)
    encoder = load_encoder("vit-micro")
    write_manifest(found, folder / "manifest.parquet")  # as rank 0 does: the paths go to its locator
    locator = locator_path(folder / "manifest.parquet")
    write_run_info(folder, encoder=encoder, world=world, refs=found.selected, skipped=found.skipped, locator=locator)
    for rank in ranks if ranks is not None else range(world):
        embed_shard(refs=found.selected, encoder=encoder, folder=folder, rank=rank, world=world, num_workers=0, **kw)
    return folder


def test_assignment_covers_every_ref_once():
    refs = list(range(11))
    got = sorted(p for rank in range(3) for p, _ in assigned(refs, rank=rank, world=3))
    assert got == refs
    with pytest.raises(ValueError):
        assigned(refs, rank=3, world=3)


@pytest.mark.parametrize("world", [1, 3])
def test_sharded_run_equals_single_process(archive, single, tmp_path, world):
    db = tmp_path / "sharded.duckdb"
    folder = _shard_run(archive, db, world=world)
    assert len(list((folder / "parts").glob("*.parquet"))) == world
    with Store(db) as store:
        report = merge_shards(folder=folder, store=store)
    assert (report.embedded, report.failed) == (7, 2)
    a, b = _contents(single), _contents(db)
    np.testing.assert_array_equal(a["ids"], b["ids"])
    assert a["scan_ids"] == b["scan_ids"]
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-6)
    assert a["status"] == b["status"] and a["scans"] == b["scans"]
    assert not list((folder / "parts").glob("*.parquet")), "merged parts are removed"
    index = faiss.read_index(str(store_collection(db).index_files()[0]))
    assert index.ntotal == 7


def store_collection(db: Path):
    with Store(db, read_only=True) as store:
        return store.resolve_collection()


def test_killed_rank_resumes_from_its_parts_and_merge_is_idempotent(archive, single, tmp_path):
    db = tmp_path / "resumed.duckdb"
    calls = []

    def die_after_two_batches(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the rank is killed after its second batch was written

    with pytest.raises(KeyboardInterrupt):
        _shard_run(archive, db, world=2, ranks=[0], batch_size=1, rows_per_part=1, progress=die_after_two_batches)
    folder = Path(str(db) + ".shards")
    written = sorted((folder / "parts").glob("rank0000-*.parquet"))
    assert len(written) >= 2
    # a re-run of both ranks: rank 0 skips what its parts hold
    found = scan_archive(archive)
    encoder = load_encoder("vit-micro")
    again = embed_shard(refs=found.selected, encoder=encoder, folder=folder, rank=0, world=2, num_workers=0)
    assert again.already_done >= 2 and again.embedded + again.failed + again.already_done == again.assigned
    embed_shard(refs=found.selected, encoder=encoder, folder=folder, rank=1, world=2, num_workers=0)
    with Store(db) as store:
        merge_shards(folder=folder, store=store, keep_parts=True)
    first = _contents(db)
    with Store(db) as store:  # the same parts merged again: nothing changes, not even attempt counts
        report = merge_shards(folder=folder, store=store)
    assert report.unchanged == 9 and report.embedded == 0 and report.failed == 0
    second = _contents(db)
    np.testing.assert_array_equal(first["ids"], second["ids"])
    np.testing.assert_array_equal(first["vectors"], second["vectors"])
    ref = _contents(single)
    np.testing.assert_array_equal(ref["ids"], first["ids"])
    assert {k: v[:3] for k, v in ref["status"].items()} == {k: v[:3] for k, v in second["status"].items()}
    assert first["status"] == second["status"]


def test_rerun_after_merge_embeds_nothing_new(archive, single, tmp_path):
    db = tmp_path / "h.duckdb"
    shutil.copy(single, db)
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        stored = coll.status()
    folder = tmp_path / "shards"
    found = scan_archive(archive)
    encoder = load_encoder("vit-micro")
    write_run_info(folder, encoder=encoder, world=2, refs=found.selected, skipped=[])
    reports = [
        embed_shard(refs=found.selected, encoder=encoder, folder=folder, rank=r, world=2, stored=stored, num_workers=0)
        for r in range(2)
    ]
    # the broken file failed unchanged before (not retried); only the duplicate is recorded again
    assert sum(r.embedded for r in reports) == 0
    assert sum(r.already_done for r in reports) == 8
    with Store(db) as store:
        merge_shards(folder=folder, store=store)
    np.testing.assert_array_equal(_contents(single)["ids"], _contents(db)["ids"])


def test_parts_hold_vectors_and_no_vector_for_failures(archive, tmp_path):
    folder = _shard_run(archive, tmp_path / "h.duckdb", world=1)
    table = pq.read_table(next((folder / "parts").glob("*.parquet")))
    rows = table.to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all(r["vector"] is None for r in failed)
    good = np.array([r["vector"] for r in rows if r["status"] == "embedded"], np.float32)
    np.testing.assert_allclose(np.linalg.norm(good, axis=1), 1.0, atol=1e-5)
    assert sorted(r["position"] for r in rows) == list(range(9))


def test_unmerged_parts_of_another_run_must_be_merged_first(archive, single, tmp_path):
    db = tmp_path / "h.duckdb"
    folder = _shard_run(archive, db, world=2, ranks=[0])  # killed before rank 1 and the merge
    found = scan_archive(archive)
    encoder = load_encoder("vit-micro")
    # another world size, another model, or another list of files: positions mean other scans
    runs = [
        dict(encoder=encoder, world=3, refs=found.selected),
        dict(encoder=encoder, world=2, refs=found.selected[1:]),
        dict(encoder=load_encoder("vit-micro", seed=1), world=2, refs=found.selected),
    ]
    for kw in runs:
        with pytest.raises(ShardError, match="unmerged parts of another run"):
            write_run_info(folder, skipped=[], **kw)
    with Store(db) as store:  # what the distributed command does: keep the earlier run's work
        merge_shards(folder=folder, store=store)
        stored = store.resolve_collection().status()
    _shard_run(archive, db, world=3, stored=stored)  # the new run, with the rest left to do
    with Store(db) as store:
        merge_shards(folder=folder, store=store)
    a, b = _contents(single), _contents(db)
    assert sorted(a["scan_ids"]) == sorted(b["scan_ids"])  # stored in two merges: other ids, same vectors
    by_scan = dict(zip(b["scan_ids"], b["vectors"], strict=True))
    np.testing.assert_allclose(a["vectors"], np.stack([by_scan[s] for s in a["scan_ids"]]), atol=1e-6)
    assert {k: v[:3] for k, v in a["status"].items()} == {k: v[:3] for k, v in b["status"].items()}


def test_a_stale_failure_in_parts_does_not_remove_a_stored_vector(archive, single, tmp_path):
    db = tmp_path / "h.duckdb"
    shutil.copy(single, db)
    folder = _shard_run(archive, tmp_path / "other.duckdb", world=1)
    parts = sorted((folder / "parts").glob("*.parquet"))
    table = pq.read_table(parts[0])
    rows = table.to_pylist()
    victim = next(r for r in rows if r["status"] == "embedded")
    victim.update(status="failed", reason="OSError: a transient read error", vector=None)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), parts[0])
    with Store(db) as store:
        report = merge_shards(folder=folder, store=store)
    assert report.embedded == 0 and report.failed == 0  # everything is already stored, the failure included
    assert _contents(db)["scan_ids"] == _contents(single)["scan_ids"]


def test_merging_parts_of_another_archive_with_the_same_names_is_refused(archive, single, tmp_path):
    other = tmp_path / "other_archive"
    shutil.copytree(archive, other)
    folder = _shard_run(other, tmp_path / "x.duckdb", world=1)
    db = tmp_path / "h.duckdb"
    shutil.copy(single, db)
    shutil.copy(str(single) + ".locator", str(db) + ".locator")  # where the stored scans came from
    with Store(db) as store, pytest.raises(StoreError, match="already stored from"):
        merge_shards(folder=folder, store=store)
    assert _contents(db)["scan_ids"] == _contents(single)["scan_ids"]


def test_merge_command_on_a_folder_that_is_not_a_shard_folder(tmp_path):
    result = runner.invoke(app, ["merge-shards", str(tmp_path), "--db", str(tmp_path / "h.duckdb")])
    assert result.exit_code == 2 and "not a shard folder" in " ".join(result.stderr.split())
    assert not (tmp_path / "h.duckdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_one_process(archive, single, tmp_path):
    db = tmp_path / "dist.duckdb"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "hctembed.cli",
        "embed",
        str(archive),
        "--db",
        str(db),
        "--model",
        "vit-micro",
        "--workers",
        "0",
        "--distributed",
        "--json",
        "--quiet",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["embedded"] == 7 and summary["failed"] == 2
    a, b = _contents(single), _contents(db)
    np.testing.assert_array_equal(a["ids"], b["ids"])
    assert a["scan_ids"] == b["scan_ids"]
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-6)
    assert {k: v[:2] for k, v in a["status"].items()} == {k: v[:2] for k, v in b["status"].items()}
    # the same command again: every scan is found embedded, nothing is re-encoded, the ids stay
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["embedded"] == 0 and summary["unchanged"] == 7 and summary["failed"] == 2
    np.testing.assert_array_equal(a["ids"], _contents(db)["ids"])


def test_asking_for_cuda_without_a_gpu_is_a_clear_error(archive, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(
        app, ["embed", str(archive), "--db", str(tmp_path / "h.duckdb"), "--model", "vit-micro", "--device", "cuda"]
    )
    assert result.exit_code == 2 and "no CUDA device" in " ".join(result.output.split())
    assert not (tmp_path / "h.duckdb").exists()
