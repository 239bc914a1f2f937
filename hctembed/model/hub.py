"""Download Merlin's and CT-FM's released weights from the Hugging Face Hub, explicitly and verified.

:func:`pull_weights` is the only place hctembed downloads anything. It uses ``huggingface_hub`` (its
standard cache, ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_ENDPOINT`` / ``HF_TOKEN`` / ``HF_HUB_OFFLINE`` as
huggingface_hub reads them at import), so afterwards ``--model NAME`` finds the file through
:func:`hctembed.model.foreign.find_weights`. A transfer cut off mid-way is resumed with an HTTP ``Range``
request by huggingface_hub's own retries, within one run (huggingface_hub 2.4 keeps no partial file
between runs). The finished file is checked against the Hub's checksum (the ETag: sha256 for LFS files,
git blob sha1 otherwise) and deleted when it does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

from hctembed.errors import HctembedError, UnknownNameError, first_line
from hctembed.model.catalogue import CATALOGUE, PULLABLE, HubFile, cached_weights

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


class PullError(HctembedError):
    """Weights could not be pulled or did not verify; the message is one line."""


def pull_weights(name: str, *, revision: str | None = None, progress: bool = True) -> Path:
    """Download ``name``'s released weights into the Hugging Face cache (or find them there); their path.

    With ``HF_HUB_OFFLINE`` set only the cache is consulted. ``progress`` shows huggingface_hub's
    download bar on stderr (when stderr is a terminal).
    """
    info = CATALOGUE.get(name)
    if info is None or info.hub is None:
        raise UnknownNameError(f"no released weights to pull for {name!r}; pullable: {', '.join(PULLABLE)}")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return _from_cache_offline(name, info.hub, revision=revision)
    return _download(name, info.hub, revision=revision, progress=progress)


def _download(name: str, hub: HubFile, *, revision: str | None, progress: bool) -> Path:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    endpoint = constants.ENDPOINT
    where = f"cannot pull {name} ({hub.repo}) from {endpoint}"
    log.info("pulling %s: %s from %s", name, hub, endpoint)
    try:
        expected = get_hf_file_metadata(hf_hub_url(hub.repo, hub.filename, revision=revision)).etag
        path = Path(
            hf_hub_download(hub.repo, hub.filename, revision=revision, tqdm_class=None if progress else _silent_bar())
        )
    except Exception as exc:
        reason = _network_reason(exc, hub=hub, revision=revision)
        if reason is None:
            raise
        raise PullError(f"{where}: {reason}") from None
    _verify(path, expected=expected, name=name, hub=hub, offline=False)
    _check_found(name, hub, path)
    return path


def _from_cache_offline(name: str, hub: HubFile, *, revision: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(hf_hub_download(hub.repo, hub.filename, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise PullError(
            f"{name} ({hub.repo}) is not in the Hugging Face cache {constants.HF_HUB_CACHE}, and pulling needs "
            "the network but HF_HUB_OFFLINE is set; unset it to download"
        ) from None
    log.info("HF_HUB_OFFLINE is set; %s is already in the cache", name)
    # the cache names a blob by its ETag: a sha256 for LFS files, checkable without the network
    _verify(path, expected=Path(os.path.realpath(path)).name, name=name, hub=hub, offline=True)
    _check_found(name, hub, path)
    return path


def _verify(path: Path, *, expected: str | None, name: str, hub: HubFile, offline: bool) -> None:
    """Compare the file with the Hub's checksum; on a mismatch delete it (link and blob) and raise."""
    if expected and _SHA256.fullmatch(expected):
        kind, actual = "sha256", _sha256(path)
    elif expected and _SHA1.fullmatch(expected):
        kind, actual = "git sha1", _git_blob_sha1(path)
    elif offline:  # a cache without symlinks keeps no ETag to check against; it was checked when pulled
        log.info("%s: no checksum in the cache to compare with; using %s as is", name, path)
        return
    else:
        _discard(path)
        raise PullError(
            f"cannot verify {name} ({hub.repo}): the Hub sent no checksum (ETag {expected!r}); deleted {path}"
        )
    if actual != expected:
        _discard(path)
        again = "pull again without HF_HUB_OFFLINE" if offline else "pull again"
        raise PullError(
            f"checksum mismatch for {name} ({hub.repo}): {kind} {actual} but the Hub says {expected}; "
            f"deleted the file, {again}"
        )
    log.info("verified %s %s", kind, actual)


def _check_found(name: str, hub: HubFile, path: Path) -> None:
    """Warn when ``--model NAME`` would not pick this file (a cache folder it does not search, or a newer one)."""
    found = cached_weights(hub)
    if found is None or found.resolve() != path.resolve():
        log.warning(
            "%s is at %s, but --model %s finds %s (set HF_HOME or HF_HUB_CACHE, or pass --weights %s)",
            name,
            path,
            name,
            found or "nothing",
            path,
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _discard(path: Path) -> None:
    """Remove a snapshot file, the blob it links to, and its snapshot folder if now empty."""
    blob = Path(os.path.realpath(path))
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another file of the snapshot
        path.parent.rmdir()


def _network_reason(exc: Exception, *, hub: HubFile, revision: str | None) -> str | None:
    """A one-line reason for a failure to reach or read from the Hub; None for anything else (a bug)."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return "the repository is gated: accept its terms on the Hub and log in (`hf auth login`)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"repository {hub.repo} not found (if it is private, log in with `hf auth login`)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in {hub.repo}"
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return f"{hub.filename} not found in {hub.repo}"
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}".strip()
    if isinstance(exc, httpx2.TimeoutException):
        return f"timed out ({first_line(exc)})"
    if isinstance(exc, httpx2.HTTPError | OSError):
        return first_line(exc)
    return None


def _silent_bar():
    """huggingface_hub's progress bar class, always disabled."""
    from huggingface_hub.utils import tqdm

    class SilentBar(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentBar
