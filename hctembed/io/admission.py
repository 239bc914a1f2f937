"""What a file may cost before any of it is believed: the one admission path of ``scan``, ``embed``, ``search
FILE`` and ``serve``.

A hostile or broken file is cheapest to refuse before it costs memory or CPU. Every limit here is checked from
what a file declares (a zip's central directory, a NIfTI or DICOM header, the scan's geometry) before the bytes
it declares are inflated or the arrays it implies are allocated:

* a zip is opened once per walk or series (:class:`ZipFiles`), never once per member (8,000 one-byte members
  cost 619 s of CPU that way); its member count, the bytes its members inflate to together and each member's
  inflate ratio are capped (a 1 MB member that inflates to 3 GB is a zip bomb, refused unread);
* a DICOM member's header is parsed from the first bytes of the member, inflating only those
  (:meth:`ZipFiles.header_bytes`), never the whole member;
* the voxels a header declares and the voxels of the 1 mm grid its geometry implies are checked against
  ``max_voxels`` (:func:`check_grid`) before either is allocated.

Limits are options with defaults (``--max-voxels``; ``serve`` adds a tighter per-query budget and a memory budget
shared by concurrent uploads, see :mod:`hctembed.serve.admission`).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from hctembed.volume import MAX_VOXELS, VolumeError

ZIP_SEP = "!"  # a file inside a zip: "folder/archive.zip!member/path.dcm"
HEADER_STEPS = (1 << 16, 1 << 20, 1 << 24)  # prefix sizes tried for a DICOM header inside a zip member
MAX_ENTRY_BYTES = 46 + 466  # a central-directory entry (46 bytes) with a long path and extra fields


class ZipRefused(VolumeError):
    """A zip that is refused whole (too many members, too many inflated bytes, a zip bomb); ``code`` is the
    skip reason code and the message PHI-free."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """The admission limits of archive walks and loads (defaults keep a 2-core, 24 GB machine alive)."""

    max_voxels: int = MAX_VOXELS  # voxels a scan's headers declare, and of its 1 mm grid
    max_zip_members: int = 20_000  # a whole study of thin slices is a few thousand
    max_zip_bytes: int = 16 * 2**30  # bytes all members of one zip inflate to, together
    max_inflate_ratio: float = 200.0  # a member's inflated / compressed size (DICOM of CT: 1.5-10)

    @classmethod
    def of_options(
        cls, *, max_zip_members: int, max_zip_gb: float, max_inflate_ratio: float, max_voxels: int = MAX_VOXELS
    ) -> Limits:
        """The limits the command-line options give (``--max-zip-gb`` in GiB)."""
        return cls(
            max_voxels=max_voxels, max_zip_members=max_zip_members, max_zip_bytes=int(max_zip_gb * 2**30),
            max_inflate_ratio=max_inflate_ratio,
        )  # fmt: skip


def check_grid(shape_xyz, *, max_voxels: int, what: str = "resampled to 1 mm, the scan") -> None:
    """Refuse (VolumeError) a grid of more than ``max_voxels`` voxels before it is allocated."""
    n = 1
    for s in shape_xyz:
        n *= int(s)
    if n > max_voxels:
        dims = " x ".join(str(int(s)) for s in shape_xyz)
        raise VolumeError(f"{what} would be {dims} = {n:,} voxels, over the limit of {max_voxels:,} (--max-voxels)")


def split_ref(ref: str) -> tuple[str, str] | None:
    """``("folder/a.zip", "member/path.dcm")`` for a zip member's ref, None for a plain file."""
    if ZIP_SEP not in ref:
        return None
    zip_part, member = ref.split(ZIP_SEP, 1)
    return zip_part, member


class ZipFiles:
    """Zips opened once each for a run of reads (one archive walk, one series), checked against ``limits``
    when first opened, closed together at the end (a context manager)."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._open: dict[Path, zipfile.ZipFile] = {}

    def __enter__(self) -> ZipFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for zf in self._open.values():
            zf.close()
        self._open.clear()

    def zip(self, path: Path) -> zipfile.ZipFile:
        """The opened zip, checked: member count, total inflated bytes, each member's inflate ratio."""
        path = Path(path)
        if path not in self._open:
            declared, directory = _end_record(path)  # from the end record alone: no entry parsed yet
            if declared is not None and declared > self.limits.max_zip_members:
                raise ZipRefused(
                    "zip_limit", f"{declared:,} members, over the limit of {self.limits.max_zip_members:,}"
                )
            if directory is not None and directory > self.limits.max_zip_members * MAX_ENTRY_BYTES:
                raise ZipRefused(  # zipfile parses the directory by its size, whatever count the record claims
                    "zip_limit", f"a central directory of {directory:,} bytes, more than "
                    f"{self.limits.max_zip_members:,} members could fill"
                )  # fmt: skip
            try:
                zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, ValueError) as exc:
                raise ZipRefused("bad_zip", f"unreadable zip ({type(exc).__name__})") from None
            try:
                self._check(zf)
            except ZipRefused:
                zf.close()
                raise
            self._open[path] = zf
        return self._open[path]

    def _check(self, zf: zipfile.ZipFile) -> None:
        limits = self.limits
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > limits.max_zip_members:
            raise ZipRefused("zip_limit", f"{len(infos):,} members, over the limit of {limits.max_zip_members:,}")
        total = sum(i.file_size for i in infos)
        if total > limits.max_zip_bytes:
            raise ZipRefused(
                "zip_limit", f"members inflate to {total / 2**30:.1f} GiB, over the limit of "
                f"{limits.max_zip_bytes / 2**30:g} GiB"
            )  # fmt: skip
        for info in infos:
            if info.file_size > 1 << 20 and info.file_size > limits.max_inflate_ratio * max(info.compress_size, 1):
                raise ZipRefused(
                    "zip_bomb", f"a member inflates {info.file_size / max(info.compress_size, 1):,.0f}-fold "
                    f"({info.compress_size:,} to {info.file_size:,} bytes; the limit is "
                    f"{limits.max_inflate_ratio:g}-fold)"
                )  # fmt: skip

    def names(self, path: Path) -> list[str]:
        """Names of the files (not folders) in the zip at ``path``."""
        return [i.filename for i in self.zip(path).infolist() if not i.is_dir()]

    def read(self, root: Path, ref: str) -> bytes:
        """All bytes of a file or zip member named by ``ref`` relative to ``root`` (a member's size and ratio
        were checked when its zip was opened; reading stops at its declared size)."""
        parts = split_ref(ref)
        if parts is None:
            return (root / ref).read_bytes()
        zf = self.zip(root / parts[0])
        try:
            return zf.read(parts[1])
        except KeyError:
            raise VolumeError("a zip member named by the scan is gone") from None

    def header_bytes(self, root: Path, ref: str, *, at_least: int) -> tuple[bytes, bool]:
        """The first ``at_least`` bytes (or more, up to the next step) of a zip member, and whether they are the
        whole member: only that much is inflated."""
        parts = split_ref(ref)
        assert parts is not None
        zf = self.zip(root / parts[0])
        try:
            info = zf.getinfo(parts[1])
        except KeyError:
            raise VolumeError("a zip member named by the scan is gone") from None
        with zf.open(info) as member:
            data = member.read(at_least)
        return data, len(data) >= info.file_size


def _end_record(path: Path) -> tuple[int | None, int | None]:
    """(the member count, the central directory's byte size) a zip's end-of-central-directory record declares;
    None for what it does not say here (a ZIP64 file; zipfile's own parse then counts)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 65_557))  # the record (22 bytes) and a comment of at most 65,535
            tail = f.read()
    except OSError:
        return None, None
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        return None, None
    total = int.from_bytes(tail[at + 10 : at + 12], "little")
    directory = int.from_bytes(tail[at + 12 : at + 16], "little")
    return (None if total == 0xFFFF else total), (None if directory == 0xFFFFFFFF else directory)


def parse_header_prefix(read, *, parse) -> object:
    """Parse a DICOM header from growing prefixes of a member: ``read(n)`` gives ``(bytes, whole)``,
    ``parse(fileobj)`` a dataset read up to its pixel data. A prefix is enough once the parse stopped inside it
    (before the pixel data); otherwise the next, larger prefix is tried, and at last the whole member."""
    from pydicom.errors import InvalidDicomError

    for step in HEADER_STEPS:
        data, whole = read(step)
        stream = io.BytesIO(data)
        try:
            ds = parse(stream)
        except InvalidDicomError:
            raise  # no DICOM preamble: more bytes cannot change that
        except Exception:
            if whole:
                raise
            continue  # cut inside an element: a longer prefix
        if whole or stream.tell() < len(data):
            return ds
    data, _ = read(-1)
    return parse(io.BytesIO(data))
