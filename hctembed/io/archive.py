"""Walk an archive and list its candidate scans: NIfTI files, DICOM series in folders, DICOM inside zips.

Every candidate gets a decision. DICOM series are grouped, split into stacks and checked against the
head-CT selection rules (:mod:`hctembed.io.selection`); files that are not DICOM are listed with a reason.
Ids are PHI-free: DICOM series are named by keyed pseudonyms, NIfTI scans by their path (or, with
``pseudonymise_files``, by a keyed pseudonym of it). Folder and file names of exports carry names and record
numbers, so a skipped file or folder is named by a keyed pseudonym of its path too (``fi-…``, ``fo-…``); the
paths themselves stay in memory (``location``, ``files``) and go only to the locator
(:mod:`hctembed.io.locator`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hctembed.io.admission import Limits, ZipFiles, ZipRefused
from hctembed.io.dicom_headers import ZIP_SEP, HeaderError, read_header
from hctembed.io.dicom_series import SeriesCandidate, group_series
from hctembed.io.dicomweb import DicomWebServer
from hctembed.io.locator import Location
from hctembed.io.nifti import is_nifti, load_nifti, nifti_stem
from hctembed.io.pseudonym import Pseudonymizer
from hctembed.io.selection import SelectionConfig
from hctembed.volume import MAX_VOXELS, Volume, VolumeError

log = logging.getLogger(__name__)

# never DICOM: not even read (labels, notes, reports, our own outputs)
NON_IMAGE_SUFFIXES = {
    ".csv",
    ".json",
    ".txt",
    ".md",
    ".xml",
    ".html",
    ".png",
    ".jpg",
    ".pdf",
    ".parquet",
    ".duckdb",
    ".wal",
    ".faiss",
    ".log",
    ".py",
    ".sh",
    ".yaml",
    ".yml",
    ".tsv",
}


@dataclass(frozen=True)
class SeriesRef:
    """One candidate scan in an archive.

    ``source`` identifies it in the status table: the scan id (the series pseudonym for DICOM; for NIfTI the
    path relative to ``root`` without its suffix, or its pseudonym). ``location`` (its file or folder) and
    ``files`` (DICOM) are relative to ``root``; zip members are ``archive.zip!member``. These paths are never
    stored with the scan, only in the locator (:meth:`located`). ``size`` and ``mtime_ns`` tell a re-run
    whether the files changed.
    """

    source: str
    path: Path
    root: Path
    scan_id: str
    format: str
    size: int
    mtime_ns: int
    files: tuple[str, ...] = ()
    patient_id: str | None = None
    location: str = ""  # where to find it again, relative to root (file or folder)
    facts: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    remote: DicomWebServer | None = None  # format "dicomweb": the PACS it is fetched from (location STUDY/SERIES)

    def located(self) -> Location:
        """The locator entry that finds this scan again (for a PACS series: the server's URL as the root)."""
        root = self.remote.url if self.remote is not None else str(self.root)
        return Location(self.scan_id, root, self.location, self.files)

    def redact(self, text: str) -> str:
        """``text`` (an error message from a reader) without this scan's paths (or UIDs) or any of their parts."""
        parts = {str(self.root), str(self.path), self.location, *self.files}
        if self.remote is not None:
            parts.add(self.remote.url)
        parts |= {p for f in (self.location, *self.files) for p in Path(f.replace(ZIP_SEP, "/")).parts}
        for part in sorted((p for p in parts if len(p) > 2), key=len, reverse=True):
            text = re.sub(rf"(?<!\w){re.escape(part)}(?!\w)", "…", text)
        return text


@dataclass(frozen=True)
class Skipped:
    """A candidate (series, file or folder) that will not be embedded, and why. ``source`` is PHI-free (a
    pseudonym); ``location``, its path relative to the archive, stays in memory and goes to the locator only."""

    source: str
    scan_id: str | None
    patient_id: str | None
    kind: str  # "series", "file" or "folder"
    reason_code: str
    reason: str
    facts: dict[str, Any] = field(default_factory=dict)
    location: str = field(default="", compare=False, repr=False)

    def public(self) -> dict[str, Any]:
        """Every field but the location (what run files and JSON may hold)."""
        names = ("source", "scan_id", "patient_id", "kind", "reason_code", "reason", "facts")
        return {k: getattr(self, k) for k in names}


@dataclass(frozen=True)
class ArchiveScan:
    selected: list[SeriesRef]
    skipped: list[Skipped]
    root: Path | str | None = None  # the archive folder (or PACS URL) the locations are relative to

    def locations(self) -> list[Location]:
        """Locator entries of every selected scan and every skipped candidate with a location."""
        entries = [ref.located() for ref in self.selected]
        if self.root is not None:
            entries += [Location(s.source, str(self.root), s.location) for s in self.skipped if s.location]
        return entries


def discover(archive: str | Path) -> list[SeriesRef]:
    """The selected scans under ``archive`` (see :func:`scan_archive` for the skipped ones too)."""
    return scan_archive(archive).selected


def scan_archive(
    archive: str | Path,
    *,
    selection: SelectionConfig | None = None,
    pseudonyms: Pseudonymizer | None = None,
    pseudonymise_files: bool = False,
    progress: Callable[[int], None] | None = None,
    limits: Limits | None = None,
) -> ArchiveScan:
    """Walk ``archive`` (a folder searched recursively, a NIfTI file, a DICOM file or a zip) once.

    ``pseudonymise_files``: NIfTI scan ids are keyed pseudonyms of their paths (``fi-…``) instead of the paths.
    Each zip is opened once and checked against ``limits`` (:mod:`hctembed.io.admission`): one over them is
    skipped whole with its reason; a member's header is read from its first bytes.
    """
    archive = Path(archive)
    if not archive.exists():
        raise FileNotFoundError(f"archive not found: {archive}")
    selection = selection or SelectionConfig()
    skipped: list[Skipped] = []
    walk_root, files = (archive.parent, [archive]) if archive.is_file() else (archive, _files_under(archive, skipped))
    root = walk_root.resolve()
    selected: list[SeriesRef] = []
    dicom_refs: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    if pseudonymise_files or skipped or any(not is_nifti(p) for p in files):
        pseudonyms = pseudonyms or Pseudonymizer.from_file()
    with ZipFiles(limits=limits) as zips:
        for path in files:
            rel = path.relative_to(walk_root).as_posix()
            stat = path.stat()
            if is_nifti(path):
                scan_id = (Path(rel).parent / nifti_stem(Path(rel))).as_posix()
                if pseudonymise_files:
                    scan_id = pseudonyms.path("fi", scan_id)
                source = scan_id if pseudonymise_files else rel
                selected.append(
                    SeriesRef(source, path, root, scan_id, "nifti", stat.st_size, stat.st_mtime_ns, location=rel)
                )
            elif path.suffix.lower() == ".zip":
                members = _zip_members(path, rel, skipped, zips=zips)
                dicom_refs.extend(members)
                sizes.update({m: (stat.st_size // max(len(members), 1), stat.st_mtime_ns) for m in members})
            elif path.suffix.lower() not in NON_IMAGE_SUFFIXES:
                dicom_refs.append(rel)
                sizes[rel] = (stat.st_size, stat.st_mtime_ns)
        headers = []
        for i, ref in enumerate(dicom_refs):
            try:
                headers.append(read_header(root, ref, zips=zips))
            except HeaderError as exc:
                code = "empty_file" if sizes.get(ref, (1, 0))[0] == 0 and ZIP_SEP not in ref else "not_dicom"
                skipped.append(Skipped(ref, None, None, "file", code, str(exc)))
            except VolumeError as exc:  # a member named by a zip that is gone
                skipped.append(Skipped(ref, None, None, "file", "not_dicom", str(exc)))
            if progress:
                progress(i + 1)
    if headers:
        for cand in group_series(headers, pseudonyms=pseudonyms, config=selection):
            if cand.selected:
                selected.append(_ref_of(cand, root=root, sizes=sizes))
            else:
                skipped.append(_skipped_series(cand))
    ignored = sum(1 for p in files if p.suffix.lower() in NON_IMAGE_SUFFIXES)
    if ignored:
        log.info("ignored %d non-image files (csv, txt, json, ...) under %s", ignored, archive)
    skipped = [_named_by_pseudonym(s, pseudonyms) for s in skipped]
    return ArchiveScan(selected=selected, skipped=skipped, root=root)


def scan_dicomweb(
    server: DicomWebServer,
    *,
    selection: SelectionConfig | None = None,
    pseudonyms: Pseudonymizer | None = None,
    filters: tuple[str, ...] = (),
    since: str | None = None,
    progress: Callable[[int], None] | None = None,
    limits: Limits | None = None,
    cache: dict | None = None,
) -> ArchiveScan:
    """The candidates on a DICOMweb server (:mod:`hctembed.io.dicomweb`): QIDO-RS and instance metadata only, the
    same grouping and selection rules as files. ``cache``: metadata kept between passes of ``--follow``."""
    from hctembed.io.dicomweb import DicomWebClient
    from hctembed.io.dicomweb_series import instance_digest, list_series

    selection = selection or SelectionConfig()
    pseudonyms = pseudonyms or Pseudonymizer.from_file()
    with DicomWebClient(server, max_series_bytes=(limits or Limits()).max_zip_bytes) as client:
        listing = list_series(client, filters=filters, since=since, progress=progress, cache=cache)
    selected: list[SeriesRef] = []
    skipped = [
        Skipped(pseudonyms.series(key.split("/")[1]), None, None, "series", "unreadable_metadata", reason,
                location=key)
        for key, reason in listing.unreadable
    ]  # fmt: skip
    for cand in group_series(listing.headers, pseudonyms=pseudonyms, config=selection) if listing.headers else []:
        if not cand.selected:
            skipped.append(_skipped_series(cand))
            continue
        selected.append(
            SeriesRef(
                source=cand.scan_id, path=Path(cand.folder), root=Path("."), scan_id=cand.scan_id,
                format="dicomweb", size=len(cand.files), mtime_ns=instance_digest(cand.files), files=cand.files,
                patient_id=cand.patient_id, location=cand.folder, facts={**cand.facts, "study_id": cand.study_id},
                flags=cand.flags, remote=server,
            )
        )  # fmt: skip
    return ArchiveScan(selected=selected, skipped=skipped, root=server.url)


def _skipped_series(cand: SeriesCandidate) -> Skipped:
    """The skip row of a series its headers ruled out (its folder, or STUDY/SERIES on a PACS, as the location)."""
    return Skipped(cand.scan_id, cand.scan_id, cand.patient_id, "series", cand.reason_code or "skipped",
                   cand.reason or "", {**cand.facts, "flags": list(cand.flags)}, location=cand.folder)  # fmt: skip


def _named_by_pseudonym(skip: Skipped, pseudonyms: Pseudonymizer | None) -> Skipped:
    """A skipped file or folder named by its path is renamed by the path's keyed pseudonym (the path moves to
    ``location``); series are named by their pseudonyms already."""
    if skip.location or skip.scan_id is not None or pseudonyms is None:
        return skip
    key = pseudonyms.path("fo" if skip.kind == "folder" else "fi", skip.source)
    return replace(skip, source=key, location=skip.source)


def _files_under(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """Every regular file under ``folder`` (hidden ones left out), sorted. What cannot be walked gets a skip
    row instead of vanishing: an unreadable folder, a symlinked folder (not followed: a link to an ancestor
    would never end), a folder named like a NIfTI file, a dangling link, and anything that is not a regular
    file (a FIFO would block the reader)."""
    files: list[Path] = []

    def skip(path: Path, code: str, reason: str, kind: str = "file") -> None:
        skipped.append(Skipped(path.relative_to(folder).as_posix(), None, None, kind, code, reason))

    def unreadable(error: OSError) -> None:
        skip(Path(error.filename), "unreadable_folder", f"cannot list it ({error.strerror})", "folder")

    for top, dirs, names in os.walk(folder, onerror=unreadable, followlinks=False):
        here = Path(top)
        for d in [d for d in dirs if (here / d).is_symlink()]:
            skip(here / d, "linked_folder", "a symbolic link to a folder is not followed (it could loop)", "folder")
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for d in dirs:
            if is_nifti(Path(d)):
                skip(here / d, "not_a_file", "a folder named like a NIfTI file; its contents are searched", "folder")
        for name in sorted(n for n in names if not n.startswith(".")):
            path = here / name
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                skip(path, "broken_link", "a symbolic link to nothing")
            else:
                skip(path, "not_a_file", "not a regular file (a pipe, socket or device)")
    return sorted(files)


def _zip_members(path: Path, rel: str, skipped: list[Skipped], *, zips: ZipFiles) -> list[str]:
    try:
        names = [n for n in zips.names(path) if not Path(n).name.startswith(".")]
    except ZipRefused as exc:
        skipped.append(Skipped(rel, None, None, "file", exc.code, str(exc)))
        return []
    return [f"{rel}{ZIP_SEP}{n}" for n in sorted(names) if Path(n).suffix.lower() not in NON_IMAGE_SUFFIXES]


def _ref_of(cand: SeriesCandidate, *, root: Path, sizes: dict[str, tuple[int, int]]) -> SeriesRef:
    size = sum(sizes.get(f, (0, 0))[0] for f in cand.files)
    mtime = max(sizes.get(f, (0, 0))[1] for f in cand.files)
    first = cand.files[0]
    location = first.split(ZIP_SEP)[0] if ZIP_SEP in first else cand.folder
    return SeriesRef(
        source=cand.scan_id,
        path=root / location,
        root=root,
        scan_id=cand.scan_id,
        format="dicom",
        size=size,
        mtime_ns=mtime,
        files=cand.files,
        patient_id=cand.patient_id,
        location=location,
        facts={**cand.facts, "study_id": cand.study_id},
        flags=cand.flags,
    )


def load_series(
    ref: SeriesRef,
    *,
    selection: SelectionConfig | None = None,
    max_voxels: int = MAX_VOXELS,
    limits: Limits | None = None,
) -> Volume:
    """Load one candidate as a Volume (NIfTI file or DICOM series); VolumeError over ``max_voxels`` or the zip
    ``limits``."""
    if ref.format == "nifti":
        return load_nifti(ref.path, max_voxels=max_voxels)
    if ref.format in ("dicom", "dicomweb"):
        from hctembed.io.dicom import load_dicom_series

        blobs = None
        if ref.format == "dicomweb":  # the files fetched into memory, held to an upload's bounds
            from hctembed.io.dicomweb import DicomWebClient
            from hctembed.io.dicomweb_series import fetch_series_files

            with DicomWebClient(ref.remote, max_series_bytes=(limits or Limits()).max_zip_bytes) as client:
                blobs = fetch_series_files(client, ref.files)
        volume = load_dicom_series(ref.root, ref.files, config=selection, max_voxels=max_voxels, limits=limits,
                                   blobs=blobs)  # fmt: skip
        volume.meta["flags"] = sorted(set(volume.meta.get("flags", [])) | set(ref.flags))
        return volume
    raise VolumeError(f"unsupported format {ref.format}")


def load_volume(
    path: str | Path,
    *,
    pseudonyms: Pseudonymizer | None = None,
    max_voxels: int = MAX_VOXELS,
    limits: Limits | None = None,
) -> Volume:
    """Load a NIfTI file, or the one selected DICOM series in a file, folder or zip (zips checked against
    ``limits``, headers against ``max_voxels``)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    if is_nifti(path):
        return load_nifti(path, max_voxels=max_voxels)
    if path.is_file() and path.suffix.lower() in NON_IMAGE_SUFFIXES:
        raise VolumeError(f"unsupported file type: {path.name} (expected NIfTI, DICOM or a zip of DICOM)")
    # a query is never stored: a throwaway secret keeps the real one out of it
    found = scan_archive(path, pseudonyms=pseudonyms or Pseudonymizer(secrets.token_bytes(32)), limits=limits)
    if len(found.selected) != 1:
        reasons = "; ".join(sorted({s.reason for s in found.skipped}))[:300]
        raise VolumeError(
            f"{path.name}: {len(found.selected)} usable scans (expected exactly one)"
            + (f"; {reasons}" if reasons else "")
        )
    return load_series(found.selected[0], max_voxels=max_voxels, limits=limits)
