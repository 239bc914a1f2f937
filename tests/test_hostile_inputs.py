"""Hostile inputs cost only their own scan: headers that claim huge images fail before anything that size is
allocated, a gzip stream longer than its header says is never held, and a loader process that dies (killed
for memory, a crash in a decoder) fails the scan that killed it while the run goes on."""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import signal
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import head_phantom_xyz, write_nifti
from dicom_factory import SeriesSpec, write_series

import hctembed.embedding.loading as loading_module
import hctembed.embedding.run as embed_module
from hctembed.index.store import Store
from hctembed.io.archive import load_volume, scan_archive
from hctembed.io.dicom import load_dicom_series
from hctembed.io.nifti import _inflate_at_most, load_nifti
from hctembed.io.nifti_stream import open_stream
from hctembed.model.encoders import load_encoder
from hctembed.volume import VolumeError


def nifti_header(shape_xyz: tuple[int, int, int], *, datatype: int = 4, bitpix: int = 16) -> bytes:
    """A 348-byte NIfTI-1 header (+4 bytes extension flag) claiming ``shape_xyz`` int16 voxels at 1 mm."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, 3, *shape_xyz, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", h, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<hh", h, 252, 0, 1)  # qform_code 0, sform_code 1
    for row, values in enumerate(((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))):
        struct.pack_into("<4f", h, 280 + 16 * row, *values)
    h[344:348] = b"n+1\0"
    return bytes(h)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_header_claiming_a_huge_image_fails_before_allocating_it(tmp_path):
    bomb = tmp_path / "huge.nii.gz"
    bomb.write_bytes(gzip.compress(nifti_header((32767, 32767, 32767))))  # 64 TiB of int16 claimed
    assert bomb.stat().st_size < 200
    before = peak_rss_mb()
    with pytest.raises(VolumeError, match=r"claims 35,181,150,961,663 voxels .* over the limit"):
        load_nifti(bomb)
    plain = tmp_path / "huge.nii"
    plain.write_bytes(nifti_header((4000, 4000, 4000)))
    with pytest.raises(VolumeError, match="over the limit"):
        load_volume(plain)
    within = tmp_path / "truncated.nii"  # legal size, but the file holds none of its voxels
    within.write_bytes(nifti_header((64, 64, 64)))
    with pytest.raises(VolumeError, match="truncated"):
        load_nifti(within)
    assert peak_rss_mb() - before < 200


def test_a_gzip_stream_longer_than_its_header_is_never_held(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    reference = load_nifti(good).array.copy()
    # the same file with 256 MB of zeros after the voxels: a few hundred kB on disk
    raw = gzip.decompress(good.read_bytes())
    padded = tmp_path / "padded.nii.gz"
    with gzip.open(padded, "wb", compresslevel=9) as f:
        f.write(raw)
        zeros = bytes(1 << 24)
        for _ in range(16):
            f.write(zeros)
    assert padded.stat().st_size < 2_000_000
    before = peak_rss_mb()
    with pytest.raises(VolumeError, match="gzip bomb"):  # refused a MiB past the image, not inflated to its end
        _inflate_at_most(padded, len(raw))
    with pytest.raises(VolumeError, match="gzip bomb"):
        load_nifti(padded)
    assert peak_rss_mb() - before < 100  # not the 256 MB the stream holds
    # the streaming reader (embed's path for .nii.gz) refuses it too, holding no more than the image
    stream = open_stream(padded)
    with pytest.raises(VolumeError, match="gzip bomb"):
        list(stream.slabs())
    assert peak_rss_mb() - before < 100
    # a little padding past the image (under 1 MiB) is still read, and the image is the same
    slightly = tmp_path / "slightly.nii.gz"
    with gzip.open(slightly, "wb") as f:
        f.write(raw + bytes(4096))
    np.testing.assert_array_equal(load_nifti(slightly).array, reference)
    with pytest.raises(VolumeError, match="over the limit of 1,000"):
        load_nifti(good, max_voxels=1000)


def test_dicom_headers_claiming_huge_images_fail_before_decoding(tmp_path):
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    found = scan_archive(tmp_path / "s")
    ref = found.selected[0]
    assert load_dicom_series(ref.root, ref.files).array.shape[0] == spec.n
    with pytest.raises(VolumeError, match="in all"):  # the slices of 48 x 48 are over a limit of 10,000
        load_dicom_series(ref.root, ref.files, max_voxels=10_000)
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 5000
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match="a slice header claims"):
        load_dicom_series(ref.root, ref.files)


def _archive(tmp_path: Path, n: int = 4) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(n):
        hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0), seed=i)
        write_nifti(root / f"scan{i}.nii.gz", hu, affine)
    return root


def _embed(root: Path, db: Path, *, workers: int):
    refs = scan_archive(root).selected
    encoder = load_encoder("vit-micro", seed=0)
    with Store(db) as store:
        return embed_module.embed_archive(refs=refs, encoder=encoder, store=store, batch_size=2, num_workers=workers)


def test_a_huge_header_in_an_archive_fails_only_its_scan_and_a_rerun_goes_on(tmp_path):
    root = _archive(tmp_path, n=3)
    (root / "huge.nii.gz").write_bytes(gzip.compress(nifti_header((32767, 32767, 32767))))
    db = tmp_path / "h.duckdb"
    report = _embed(root, db, workers=1)
    assert report.embedded == 3 and [src for src, _ in report.failed] == ["huge.nii.gz"]
    assert "over the limit" in report.failed[0][1]
    again = _embed(root, db, workers=0)
    assert again.embedded == 0 and again.unchanged == 3 and "unchanged since it failed" in again.failed[0][1]


def test_a_loader_process_that_dies_costs_only_the_scan_that_killed_it(tmp_path, monkeypatch):
    root = _archive(tmp_path, n=5)
    real_prepare = loading_module.prepare

    def prepare_or_die(ref, **kwargs):  # a decoder crash / an OOM kill, in the worker process only
        if ref.scan_id == "scan2" and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        if ref.scan_id == "scan4":
            raise MemoryError  # a scan too large for this machine: its failure, not the run's
        return real_prepare(ref, **kwargs)

    parent = os.getpid()
    monkeypatch.setattr(loading_module, "prepare", prepare_or_die)  # workers are forked: they see it too
    db = tmp_path / "h.duckdb"
    report = _embed(root, db, workers=1)
    failed = dict(report.failed)
    assert report.embedded == 3 and set(failed) == {"scan2.nii.gz", "scan4.nii.gz"}
    assert "loader process died" in failed["scan2.nii.gz"] and "MemoryError" in failed["scan4.nii.gz"]
    with Store(db, read_only=True) as store:
        collection = store.resolve_collection()
        assert sorted(collection.vectors()[2]) == ["scan0", "scan1", "scan3"]
        assert collection.status()["scan2.nii.gz"].status == "failed"
    again = _embed(root, db, workers=1)  # the killer is not tried again: the re-run does not die on it
    assert again.embedded == 0 and again.unchanged == 3


# -- weights, vectors and databases that are not what they claim: one line, exit status 2, nothing lost ------
def _cli(*args, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "hctembed.cli", *map(str, args)], capture_output=True, text=True, **kw)


def _one_line_error(run) -> str:
    """Exit status 2 and one ``error:`` line (earlier progress lines may precede it), no traceback."""
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.stderr and run.stderr.rstrip().endswith(errors[0]), run.stderr
    return errors[0]


def test_a_malicious_pickle_as_weights_is_refused_and_never_run(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "x.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    (tmp_path / "x.json").write_text('{"config": {"name": "vit-micro"}}')
    root = _archive(tmp_path, n=1)
    line = _one_line_error(_cli("embed", root, "--db", tmp_path / "h.duckdb", "--model", "vit-micro", "--weights", bad))
    assert "loads tensors only" in line and "could run code" in line and not marker.exists()
    assert "weights_only" not in line and "False" not in line  # never torch's advice to load it unsafely
    line = _one_line_error(_cli("import-fmhct", bad, "--out", tmp_path / "o.safetensors"))
    assert "loads tensors only" in line and not marker.exists()


def test_nan_weights_and_absurd_metadata_are_refused_before_use(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from hctembed.model.checkpoint import save_encoder

    model = load_encoder("vit-micro", seed=0).model
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    save_encoder(model, tmp_path / "nan.safetensors")
    root = _archive(tmp_path, n=1)
    db = tmp_path / "h.duckdb"
    line = _one_line_error(
        _cli("embed", root, "--db", db, "--model", "vit-micro", "--weights", tmp_path / "nan.safetensors")
    )
    assert "non-finite values" in line
    # a few hundred bytes whose metadata asks for a 96,000-wide, 1,000-layer encoder: refused without building it
    config = json.loads(json.dumps(model.config.to_dict()))
    config.update(dim=96_000, depth=1000, heads=1000, mlp_dim=384_000)
    huge = tmp_path / "huge.safetensors"
    save_file(
        {"w": torch.zeros(4)}, str(huge), metadata={"format": "hctembed-encoder-v1", "config": json.dumps(config)}
    )
    before = peak_rss_mb()
    line = _one_line_error(_cli("embed", root, "--db", db, "--model", "vit-micro", "--weights", huge))
    assert "dim must be a whole number from 6 to 8192, not 96000" in line and peak_rss_mb() - before < 500
    # within every range, and still far more than the file holds: refused by its size, buffers included
    config.update(dim=6144, depth=100, heads=64, mlp_dim=24576)
    save_file({"w": torch.zeros(4)}, str(huge), metadata={"config": json.dumps(config)})
    line = _one_line_error(_cli("embed", root, "--db", db, "--model", "vit-micro", "--weights", huge))
    assert "the file holds 4" in line


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ("{not json", "is not valid JSON"),
        ('{"patch_size": 0}', "patch_size must be a whole number from 1"),
        ('{"dim": "96"}', "dim must be a whole number from 6 to 8192, not '96'"),
        ('{"qkv_bias": "yes"}', "qkv_bias must be true or false"),
        ("[1, 2]", "not a JSON object"),
        ('{"image_size": 960, "patch_size": 8}', "image_size must be a whole number from 8 to 512, not 960"),
    ],
)
def test_malformed_configs_are_one_line_before_any_model_is_built(tmp_path, metadata, words):
    import torch
    from safetensors.torch import save_file

    from hctembed.model.checkpoint import CheckpointError, load_encoder_weights

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(4)}, str(path), metadata={"config": metadata})
    with pytest.raises(CheckpointError, match=re.escape(words)):
        load_encoder_weights(path)


def test_a_big_input_is_counted_with_its_position_embedding(tmp_path):
    import json

    from safetensors.torch import save_file

    from hctembed.model.checkpoint import CheckpointError, load_encoder_weights

    model = load_encoder("vit-micro", seed=0).model
    config = dict(model.config.to_dict(), image_size=512, patch_size=8)  # 262,144 patches x 96 for 2.4 MB
    path = tmp_path / "w.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"config": json.dumps(config)}
    )
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match="262,144 patches"):
        load_encoder_weights(path)
    assert peak_rss_mb() - before < 100


@pytest.mark.parametrize("dtype", ["int8", "bool"])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, dtype):
    import torch

    from hctembed.model.checkpoint import CheckpointError, load_encoder_weights, save_encoder

    model = load_encoder("vit-micro", seed=0).model
    path = tmp_path / "w.safetensors"
    save_encoder(model, path)
    from safetensors.torch import load_file, save_file

    state = {k: v.to(getattr(torch, dtype)) for k, v in load_file(str(path)).items()}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="not floating point"):
        load_encoder_weights(path)


def test_a_zero_embedding_is_never_stored(tmp_path, monkeypatch):
    """Zero vectors (weights cast to zero, say) are a recorded failure, never a stored row."""
    from hctembed.model.encoders import Encoder

    root = _archive(tmp_path, n=2)
    monkeypatch.setattr(Encoder, "encode_with_planes", lambda self, batch: (np.zeros((len(batch), self.dim)), None))
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    from typer.testing import CliRunner

    from hctembed.cli.app import app

    result = CliRunner().invoke(app, ["embed", str(root), "--db", str(tmp_path / "h.duckdb"), "--model", "vit-micro",
                                      "--workers", "0", "--json"])  # fmt: skip
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["embedded"] == 0 and summary["failed"] == 2 and result.exit_code == 3
    assert all("norm 0, not 1" in f["reason"] for f in summary["failures"])


def test_a_non_finite_embedding_is_never_stored(tmp_path, monkeypatch):
    from hctembed.model.encoders import Encoder

    root = _archive(tmp_path, n=4)
    real = Encoder.encode_with_planes

    def some_nan(self, batch):
        vectors, planes = real(self, batch)
        vectors[0] = np.nan
        return vectors, planes

    monkeypatch.setattr(Encoder, "encode_with_planes", some_nan)
    report = _embed(root, tmp_path / "h.duckdb", workers=0)  # batches of 2: the first scan of each fails
    assert report.embedded == 2 and all("non-finite embedding" in reason for _, reason in report.failed)
    with Store(tmp_path / "h.duckdb", read_only=True) as store:
        _, x, ids = store.resolve_collection().vectors()
    assert len(ids) == 2 and np.isfinite(x).all()


def test_a_damaged_database_and_a_locked_one_are_one_clear_line(tmp_path):
    import subprocess
    import sys

    root = _archive(tmp_path, n=2)
    db = tmp_path / "h.duckdb"
    _embed(root, db, workers=0)
    garbage = tmp_path / "garbage.duckdb"
    garbage.write_bytes(os.urandom(100_000))
    line = _one_line_error(_cli("search", "--id", "scan0", "--db", garbage))
    assert "cannot open" in line and "DuckDB database" in line
    truncated = tmp_path / "truncated.duckdb"
    truncated.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    assert "truncated or damaged" in _one_line_error(_cli("search", "--id", "scan0", "--db", truncated))
    # a reader holds the file: a writer is told that a reader has it
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}, read_only=True); "
         "print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        line = _one_line_error(_cli("embed", root, "--db", db, "--model", "vit-micro"))
        assert "open for reading" in line
    finally:
        holder.kill()
        holder.wait()
    assert _cli("search", "--id", "scan0", "--db", db, "-k", "1").returncode == 0  # nothing was lost


def test_a_disk_that_fills_up_during_embed_loses_nothing_and_a_rerun_finishes(tmp_path):
    """The file-size limit stands in for a full disk: DuckDB's writes fail as they would (EFBIG like ENOSPC)."""
    import resource
    import subprocess
    import sys

    from hctembed.model.checkpoint import save_encoder

    root = _archive(tmp_path, n=8)
    weights = tmp_path / "w.safetensors"
    save_encoder(load_encoder("vit-micro", seed=0).model, weights)
    db = tmp_path / "h.duckdb"
    args = ["embed", root, "--db", db, "--model", "vit-micro", "--weights", weights, "--workers", "0"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))

    full = subprocess.run(
        [sys.executable, "-m", "hctembed.cli", *map(str, [*args, "--checkpoint-seconds", "0"])],
        capture_output=True, text=True, preexec_fn=small_disk,
    )  # fmt: skip
    assert "run again" in _one_line_error(full)
    again = _cli(*args, "--json")
    assert again.returncode == 0, again.stderr
    with Store(db, read_only=True) as store:
        assert sorted(store.resolve_collection().vectors()[2]) == [f"scan{i}" for i in range(8)]


def test_what_cannot_be_walked_gets_a_skip_row_and_odd_names_stay_on_their_row(tmp_path):
    root = _archive(tmp_path, n=2)
    (root / "fake.nii.gz").mkdir()  # a folder named like a NIfTI file
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link to an ancestor
    (root / "dangling.nii.gz").symlink_to(tmp_path / "nowhere")
    os.mkfifo(root / "pipe.dcm")
    locked = root / "locked"
    locked.mkdir()
    (locked / "x.dcm").write_bytes(b"x")
    locked.chmod(0)
    odd = root / "odd\nname.nii.gz"
    hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0), seed=9)
    write_nifti(odd, hu, affine)
    try:
        found = scan_archive(root)
        if os.geteuid() == 0:  # root reads any folder: the unreadable case cannot be made here
            expected = {"fake.nii.gz", "loop", "dangling.nii.gz", "pipe.dcm"}
        else:
            expected = {"fake.nii.gz", "loop", "dangling.nii.gz", "pipe.dcm", "locked"}
        # rows are named by keyed pseudonyms of their paths; the paths themselves go to the locator only
        codes = {s.location: s.reason_code for s in found.skipped if s.location in expected | {"locked"}}
        assert expected <= set(codes), codes
        assert all(s.source.startswith(("fi-", "fo-")) for s in found.skipped if s.location in expected)
        assert codes["loop"] == "linked_folder" and codes["dangling.nii.gz"] == "broken_link"
        assert codes["pipe.dcm"] == "not_a_file" and codes["fake.nii.gz"] == "not_a_file"
        assert {r.scan_id for r in found.selected} >= {"scan0", "scan1", "odd\nname"}
        db = tmp_path / "h.duckdb"
        run = _cli("embed", root, "--db", db, "--model", "vit-micro", "--workers", "0", "--random-init")
        assert run.returncode == 0, run.stderr
        with Store(db, read_only=True) as store:
            status = store.resolve_collection().status()
        keys = {s.location: s.source for s in found.skipped}
        recorded = {keys[p] for p in ("fake.nii.gz", "loop", "dangling.nii.gz", "pipe.dcm")}
        assert recorded <= set(status)  # recorded, with reasons
        located = _cli("locate", *sorted(recorded), "--db", db, "--json")
        assert located.returncode == 0, located.stderr
        paths = {json.loads(line)["location"] for line in located.stdout.splitlines()}
        assert paths == {"fake.nii.gz", "loop", "dangling.nii.gz", "pipe.dcm"}
        table = _cli("search", "--id", "scan0", "--db", db, "-k", "3")
        assert table.returncode == 0 and "odd\\nname" in table.stdout  # the name stays on its row
    finally:
        locked.chmod(0o755)


def test_the_checksum_of_the_member_holding_the_voxels_is_still_checked(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    damaged = bytearray(good.read_bytes())
    damaged[-8] ^= 0xFF  # the gzip trailer's CRC-32
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(VolumeError, match="unreadable NIfTI voxel data"):
        load_nifti(bad)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:-6])  # every voxel there, the trailer not
    with pytest.raises(VolumeError, match="checksum"):
        load_nifti(cut)


def test_a_scan_without_its_rescale_is_skipped_as_not_hu_and_the_counts_agree(tmp_path, monkeypatch):
    """Stored values that were never rescaled (air near +24, tissue near +1060) are not HU: the scan is skipped
    with its own reason (not "not a head"), before the head test, and the summary's counts add up."""
    from typer.testing import CliRunner

    from hctembed.cli.app import app

    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    root = tmp_path / "archive"
    root.mkdir()
    hu, affine = head_phantom_xyz(shape_xyz=(48, 56, 20), spacing=(4.0, 4.0, 8.0))
    write_nifti(root / "good.nii.gz", hu, affine)
    write_nifti(root / "raw.nii.gz", (hu.astype(np.int32) + 1024).astype(np.int16), affine)  # scl_inter 0
    result = CliRunner().invoke(app, ["embed", str(root), "--db", str(tmp_path / "h.duckdb"), "--model",
                                      "vit-micro", "--workers", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["scans"], summary["embedded"], summary["skipped"], summary["failed"]) == (2, 1, 1, 0)
    (skip,) = summary["skips"]
    assert skip["source"] == "raw.nii.gz" and skip["code"] == "not_hu"
    assert "soft tissue at +10" in skip["reason"] and "scl_inter" in skip["reason"] and "head" not in skip["reason"]
