"""Where an archive's scans come from, behind one interface: a folder (or one file), a manifest written by
``hctembed scan``, or a PACS over DICOMweb. The workflows ask a source for its candidates and its default labels
and never branch on what kind it is (:func:`open_source` picks it from the ARCHIVE argument)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hctembed.errors import InputError
from hctembed.io.admission import Limits
from hctembed.io.archive import ArchiveScan
from hctembed.io.dicomweb import DicomWebServer, is_dicomweb
from hctembed.io.pseudonym import Pseudonymizer
from hctembed.io.selection import SelectionConfig


@dataclass(frozen=True)
class FindOptions:
    """How candidates are found, whatever the source."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    secret: Path | None = None  # pseudonym secret file (default: $HCTEMBED_SECRET or the user's)
    pseudonymise_files: bool = False
    limits: Limits | None = None


class ArchiveSource(Protocol):
    """What every kind of archive offers the workflows."""

    kind: str  # "folder", "manifest" or "dicomweb"

    def describe(self) -> str:
        """How to name it in messages (a PACS by its URL, never with credentials)."""

    def find(self, options: FindOptions, *, progress: Callable[[int], None] | None = None) -> ArchiveScan:
        """Every candidate scan, selected or skipped with its reason (headers only, no pixel data)."""

    def default_labels(self) -> Path | None:
        """The labels CSV used when none is given (a folder's ``labels.csv``), or None."""


def _pseudonyms(options: FindOptions) -> Pseudonymizer | None:
    return Pseudonymizer.from_file(options.secret) if options.secret else None


@dataclass(frozen=True)
class FolderSource:
    """A folder searched recursively (NIfTI files, DICOM series, zips of DICOM), or one such file."""

    path: Path
    kind: str = "folder"

    def describe(self) -> str:
        return str(self.path)

    def find(self, options: FindOptions, *, progress: Callable[[int], None] | None = None) -> ArchiveScan:
        from hctembed.io.archive import scan_archive

        return scan_archive(self.path, selection=options.selection, limits=options.limits,
                            pseudonyms=_pseudonyms(options), pseudonymise_files=options.pseudonymise_files,
                            progress=progress)  # fmt: skip

    def default_labels(self) -> Path | None:
        labels = self.path / "labels.csv"
        return labels if self.path.is_dir() and labels.exists() else None


@dataclass(frozen=True)
class ManifestSource:
    """A ``manifest.parquet`` of ``hctembed scan``: its candidates as they were found (no header read again)."""

    path: Path
    auth_file: Path | None = None  # credentials of the PACS a manifest of DICOMweb series was made from
    kind: str = "manifest"

    def describe(self) -> str:
        return str(self.path)

    def find(self, options: FindOptions, *, progress: Callable[[int], None] | None = None) -> ArchiveScan:
        from hctembed.io.manifest import read_manifest

        return read_manifest(self.path, auth_file=self.auth_file)

    def default_labels(self) -> Path | None:
        return None


@dataclass(frozen=True)
class DicomWebSource:
    """A PACS's DICOMweb root (:mod:`hctembed.io.dicomweb`), with the QIDO filters that choose its studies."""

    server: DicomWebServer
    filters: tuple[str, ...] = ()
    since: str | None = None
    kind: str = "dicomweb"

    def describe(self) -> str:
        return self.server.spec()

    def find(
        self, options: FindOptions, *, progress: Callable[[int], None] | None = None, cache: dict | None = None
    ) -> ArchiveScan:
        from hctembed.io.archive import scan_dicomweb

        return scan_dicomweb(self.server, selection=options.selection, pseudonyms=_pseudonyms(options),
                             filters=self.filters, since=self.since, progress=progress, limits=options.limits,
                             cache=cache)  # fmt: skip

    def default_labels(self) -> Path | None:
        return None


def open_source(
    archive: str | Path, *, auth_file: Path | None = None, filters: tuple[str, ...] = (), since: str | None = None
) -> ArchiveSource:
    """The source the ARCHIVE argument names: ``dicomweb+http(s)://…``, a manifest, or a folder / file (which
    must exist). ``auth_file``, ``filters`` and ``since`` belong to DICOMweb only."""
    from hctembed.io.dicomweb_series import split_filters
    from hctembed.io.manifest import is_manifest

    if is_dicomweb(archive):
        split_filters(filters, since=since)  # a malformed filter fails before anything is asked of the server
        return DicomWebSource(DicomWebServer.parse(str(archive), auth_file=auth_file), tuple(filters), since)
    if "://" in str(archive):
        raise InputError(f"ARCHIVE {archive}: a PACS is named dicomweb+http://HOST:PORT/PATH")
    path = Path(archive)
    if not path.exists():
        raise InputError(f"ARCHIVE {archive}: not found (no such file or folder)")
    manifest = is_manifest(path)
    options = (("--auth-file", auth_file and not manifest), ("--filter", filters), ("--since", since))
    given = [name for name, value in options if value]
    if given:
        raise InputError(f"{', '.join(given)} apply to a DICOMweb archive (dicomweb+http://…), not to {archive}")
    if auth_file is not None and not Path(auth_file).is_file():
        raise InputError(f"--auth-file {auth_file}: not found")
    return ManifestSource(path, auth_file=auth_file) if manifest else FolderSource(path)
