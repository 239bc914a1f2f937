"""Embed an archive into a database, from a typed request: find the scans (or read a manifest), import labels,
load the encoder, embed, record every outcome, build the index. ``hctembed embed`` is this plus printing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hctembed.errors import InputError, NothingToDoError
from hctembed.index.live_feed import LiveFeed
from hctembed.io.admission import Limits
from hctembed.io.archive import ArchiveScan, Skipped
from hctembed.io.labels import LabelTable
from hctembed.io.locator import Location
from hctembed.io.selection import SelectionConfig
from hctembed.io.sources import ArchiveSource, FindOptions, open_source
from hctembed.volume import MAX_VOXELS
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedRequest:
    """What ``hctembed embed`` is asked to do; every field has the CLI option's meaning and default."""

    archive: str | Path  # folder, one file, a manifest.parquet, or dicomweb+http(s)://HOST:PORT/PATH
    db: Path
    model: str = "vit-base"
    weights: Path | None = None
    seed: int = 0
    random_init: bool = False
    labels: Path | None = None  # default: ARCHIVE/labels.csv when present
    batch_size: int = 2
    retry_failed: bool = False
    workers: int = 1
    secret: Path | None = None
    pseudonymise_files: bool = False  # NIfTI scan ids as keyed pseudonyms of their paths
    allow_non_head: bool = False  # embed series whose header or image says another body region
    index: str | None = None
    device: str = "auto"
    preprocess_device: str = "auto"  # auto: the encoder's GPU when it runs on one, else the CPU workers
    checkpoint_seconds: float = 30.0
    max_voxels: int = MAX_VOXELS  # a scan whose headers claim more fails with that reason, unread
    max_zip_members: int = Limits.max_zip_members  # a zip holding more is skipped whole (zip_limit)
    max_zip_gb: float = Limits.max_zip_bytes / 2**30  # members inflating to more, together: skipped whole
    max_inflate_ratio: float = Limits.max_inflate_ratio  # a member inflating more-fold: skipped (zip_bomb)
    auth_file: Path | None = None  # DICOMweb credentials (JSON), else the environment
    filters: tuple[str, ...] = ()  # DICOMweb QIDO filters KEY=VALUE
    since: str | None = None  # DICOMweb: studies from this date on

    def source(self) -> ArchiveSource:
        """Where the scans come from (:func:`hctembed.io.sources.open_source`); InputError when it does not exist."""
        return open_source(self.archive, auth_file=self.auth_file, filters=self.filters, since=self.since)

    def find_options(self) -> FindOptions:
        return FindOptions(selection=SelectionConfig(allow_non_head=self.allow_non_head), secret=self.secret,
                           pseudonymise_files=self.pseudonymise_files, limits=self.zip_limits)  # fmt: skip

    @property
    def zip_limits(self) -> Limits:
        """The admission limits of the zips this run reads (:mod:`hctembed.io.admission`)."""
        return Limits.of_options(
            max_voxels=self.max_voxels,
            max_zip_members=self.max_zip_members,
            max_zip_gb=self.max_zip_gb,
            max_inflate_ratio=self.max_inflate_ratio,
        )

    def __post_init__(self) -> None:
        from hctembed.index.choice import KINDS

        if self.index is not None and self.index not in KINDS:
            raise InputError(f"--index must be one of {', '.join(KINDS)}, not {self.index!r}")
        if self.preprocess_device not in ("auto", "cpu") and not self.preprocess_device.startswith("cuda"):
            raise InputError(f"--preprocess-device must be auto, cpu, cuda or cuda:N, not {self.preprocess_device!r}")


@dataclass(frozen=True)
class EmbedSummary:
    """What a run did: counts, the model it stored, and every failure and skip with its reason."""

    db: Path
    model_id: str
    fingerprint: str
    scans: int
    embedded: int
    unchanged: int
    failed: list[tuple[str, str]]  # (source, reason)
    skipped: list[Skipped]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # ranks, rank_seconds, merge_seconds, parts

    written: dict[str, int] = field(default_factory=dict)  # file or folder name beside the db -> bytes on disk

    @property
    def nothing_embedded(self) -> str | None:
        """Why the database holds no vector of this archive after the run (every candidate skipped or failed),
        or None. An up-to-date re-run (scans unchanged) is not this."""
        if self.embedded or self.unchanged:
            return None
        return "nothing embedded: every candidate was skipped or failed (reasons in the summary)"

    def counts(self) -> dict[str, Any]:
        """The one-row summary (what ``embed`` prints as its table)."""
        head = {"db": str(self.db), "model_id": self.model_id, "fingerprint": self.fingerprint}
        tail = {
            "scans": self.scans,
            "embedded": self.embedded,
            "unchanged": self.unchanged,
            "failed": len(self.failed),
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 1),
        }
        return head | tail | self.extra | ({"written": self.written} if self.written else {})

    def to_dict(self) -> dict[str, Any]:
        return (
            self.counts()
            | {"nothing_embedded": self.nothing_embedded}
            | {
                "failures": [{"source": s, "reason": r} for s, r in self.failed],
                "skips": [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in self.skipped],
            }
        )


def find_scans(source: ArchiveSource, options: FindOptions, *, progress: Progress = NO_PROGRESS) -> ArchiveScan:
    """The source's candidates (a folder's or a PACS's found by reading headers; a manifest's as written)."""
    with progress.task("reading headers", total=None) as advance:
        seen = [0]

        def report(k: int) -> None:
            advance(k - seen[0])
            seen[0] = k

        return source.find(options, progress=report)


def labels_of(
    source: ArchiveSource, labels: Path | None, *, locations: Sequence[Location] = ()
) -> tuple[LabelTable | None, str | None]:
    """The label table to import (``labels``, else the source's default, a folder's ``labels.csv``) and its file
    name. Rows keyed by a scan's file name, stem or path (rather than its id) are re-keyed through ``locations``."""
    from hctembed.io.labels import read_labels
    from hctembed.io.locator import label_aliases

    labels = labels if labels is not None else source.default_labels()
    if labels is None:
        return None, None
    return read_labels(labels).rekeyed(label_aliases(locations)), labels.name


def import_labels(store, table: LabelTable | None, origin: str | None) -> None:
    """Every known (scan, label, value) of ``table`` into the store's labels."""
    if table is None:
        return
    store.labels.set(
        (
            (s, name, v)
            for s, row in zip(table.scan_ids, table.values, strict=True)
            for name, v in zip(table.names, row, strict=True)
            if v == v
        ),
        origin=str(origin),
    )


def load_request_encoder(request: EmbedRequest, *, device: str | None = None):
    """The request's encoder on its device (``auto``: CUDA when torch sees one)."""
    import torch

    from hctembed.model.encoders import load_encoder

    encoder = load_encoder(
        request.model, weights=request.weights, seed=request.seed, random_init=request.random_init or None
    )
    if encoder.weights_path is None and not request.random_init:
        log.warning(
            "%s is random-initialised (no --weights): its neighbours follow image statistics, not learned findings; "
            "train one with `hctembed pretrain`, import one with `hctembed import-fmhct`, or use --model merlin / "
            "ct-fm after `hctembed models pull`",
            request.model,
        )
    device = device or request.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA device")
    return encoder.to(device)


def run_embed(request: EmbedRequest, *, progress: Progress = NO_PROGRESS) -> EmbedSummary:
    """Embed ``request.archive`` into ``request.db`` in this process; re-runs skip unchanged scans.

    Raises NothingToDoError (and creates no database) when the archive holds no candidate scan at all."""
    source = check_request_inputs(request)
    found = find_scans(source, request.find_options(), progress=progress)
    return embed_found(request, source, found, progress=progress)


def embed_found(
    request: EmbedRequest, source: ArchiveSource, found: ArchiveScan, *, progress: Progress = NO_PROGRESS,
    encoder=None,
) -> EmbedSummary:  # fmt: skip
    """Embed the candidates ``found`` in ``source`` (what :func:`run_embed` does once the scans are found; each
    pass of ``--follow`` calls it with what the PACS holds now, and its ``encoder`` loaded once)."""
    from hctembed.embedding.run import embed_archive
    from hctembed.index.store import Store

    refs = found.selected
    if not refs and not found.skipped:  # nothing to put in a database: none is created
        raise NothingToDoError(f"nothing to embed: no NIfTI file, DICOM series or zip of DICOM in {source.describe()}")
    warn_header_skips_kept(request, source, found)
    located = found.locations()
    table, origin = labels_of(source, request.labels, locations=located)
    encoder = encoder or load_request_encoder(request)
    log.info(
        "%d scans selected and %d skipped by their headers in %s (images are checked as they load); model %s, "
        "preprocessing %s",
        len(refs), len(found.skipped), source.describe(), encoder.model_id, encoder.fingerprint,
    )  # fmt: skip
    with Store(request.db) as store:
        import_labels(store, table, origin)
        feed = LiveFeed(store.paths.live, like=store.path)
        with progress.task("embedding", total=len(refs)) as advance:
            report = embed_archive(
                refs=refs,
                encoder=encoder,
                store=store,
                batch_size=request.batch_size,
                num_workers=request.workers,
                patients=table.patients() if table else None,
                skipped=found.skipped,
                retry_failed=request.retry_failed,
                progress=advance,
                index_kind=request.index,
                checkpoint_seconds=request.checkpoint_seconds,
                max_voxels=request.max_voxels,
                zip_limits=request.zip_limits,
                locations=located[len(refs) :],  # the skipped candidates' (the scans' own come with them)
                allow_non_head=request.allow_non_head,
                preprocess_device=preprocess_device_for(request, encoder),
                feed=feed,
            )
        if table is not None:
            store.scans.set_patients(table.patients())
        hand_over_to_server(store, feed)
    return EmbedSummary(
        db=request.db,
        model_id=report.collection.model_id,
        fingerprint=report.collection.fingerprint,
        scans=report.total,
        embedded=report.embedded,
        unchanged=report.unchanged,
        failed=list(report.failed),
        skipped=list(found.skipped) + skipped_on_loading(refs, report.skipped),
        seconds=report.seconds,
        written=disk_use(request.db),
    )


def check_request_inputs(request: EmbedRequest) -> ArchiveSource:
    """The options a user can get wrong, checked before the archive is walked: the model name, the archive (a
    folder, file or manifest that exists, or a well-formed DICOMweb address and filters), and the files named
    (weights, labels) exist. Returns the archive's source."""
    from hctembed.model.encoders import check_model_name

    check_model_name(request.model)
    source = request.source()
    for option, path in (("--weights", request.weights), ("--labels", request.labels)):
        if path is not None and not Path(path).exists():
            raise InputError(f"{option} {path}: not found (no such file or folder)")
    return source


def disk_use(db: Path) -> dict[str, int]:
    """Bytes on disk of the database and each file or folder beside it (index, locator, live feed, weights
    of older versions), by name."""
    from hctembed.index.store import SidecarPaths

    paths = SidecarPaths(db)
    found = {}
    for path in (db, Path(str(db) + ".wal"), paths.faiss, paths.locator, paths.live, paths.models):
        if path.is_file():
            found[path.name] = path.stat().st_size
        elif path.is_dir():
            found[path.name + "/"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return found


def preprocess_device_for(request: EmbedRequest, encoder) -> str | None:
    """Where scans are preprocessed: None for the CPU DataLoader workers, else a CUDA device (``auto``: the
    encoder's, when it runs on one)."""
    import torch

    wanted = request.preprocess_device
    if wanted == "auto":
        device = str(encoder.device)
        return device if device.startswith("cuda") else None
    if wanted == "cpu":
        return None
    if not torch.cuda.is_available():
        raise InputError(f"--preprocess-device {wanted}: torch sees no CUDA device")
    return wanted


def warn_header_skips_kept(request: EmbedRequest, source: ArchiveSource, found: ArchiveScan) -> None:
    """``--allow-non-head`` on a manifest cannot bring back series its header check skipped when it was made."""
    kept = [s for s in found.skipped if s.reason_code == "not_head"]
    if request.allow_non_head and source.kind == "manifest" and kept:
        log.warning(
            "%d series of the manifest were skipped by their headers as not_head when it was made; "
            "run `hctembed scan --allow-non-head` to write a manifest that keeps them",
            len(kept),
        )


def hand_over_to_server(store, feed) -> None:
    """While a server reads this database: publish a snapshot of it (which drops the live feed files it now
    holds), so the server has everything in one file again."""
    from hctembed.index.store.snapshot import publish_snapshot

    if feed.attached:
        path = publish_snapshot(store)
        log.info("published %s for the server reading this database", path.name)


def skipped_on_loading(refs, skipped: Sequence[tuple[str, str]]) -> list[Skipped]:
    """Scans skipped once loaded (``(source, "code: reason")``, e.g. not a head) as Skipped rows."""
    by_source = {r.source: r for r in refs}
    rows = []
    for source, reason in skipped:
        code, _, why = reason.partition(": ")
        ref = by_source.get(source)
        kind = "series" if ref is not None and ref.format == "dicom" else "file"
        rows.append(Skipped(source, ref.scan_id if ref else None, ref.patient_id if ref else None, kind, code, why))
    return rows
