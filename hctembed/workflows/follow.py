"""``hctembed embed dicomweb+… --follow``: keep a database current with a PACS as studies arrive.

Each poll lists the PACS's series (QIDO, with the metadata of series whose instance count changed); a series is
embedded once its instance set has not changed for ``stable_seconds`` (the modality has finished sending it),
through the same :func:`hctembed.workflows.embed.embed_found` as a one-off run: one commit per batch, the live
feed a running ``serve`` reads, a snapshot handed over at the end of each pass. ``stop`` (set by SIGINT / SIGTERM in
the CLI) ends the loop between passes, never inside a commit. A PACS that stops answering ends it with a one-line
error (:class:`hctembed.volume.SourceUnavailable`); everything embedded before is kept."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hctembed.errors import InputError
from hctembed.io.archive import ArchiveScan
from hctembed.workflows.embed import EmbedRequest, EmbedSummary, check_request_inputs, embed_found, load_request_encoder
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowSettings:
    poll_seconds: float = 30.0  # between listings of the PACS
    stable_seconds: float = 10.0  # a series whose instances have not changed this long is complete


def follow_embed(
    request: EmbedRequest,
    *,
    settings: FollowSettings = FollowSettings(),
    stop: threading.Event,
    progress: Progress = NO_PROGRESS,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[EmbedSummary]:
    """Poll the request's PACS until ``stop`` is set; yields the summary of every pass that embedded (or failed)
    a scan."""
    source = check_request_inputs(request)
    if source.kind != "dicomweb":
        raise InputError(f"--follow follows a PACS (dicomweb+http://HOST:PORT/PATH), not {source.describe()}")
    encoder = load_request_encoder(request)
    options = request.find_options()
    cache: dict = {}  # series metadata between polls, by STUDY/SERIES (re-read when its instance count changes)
    since: dict[str, tuple[int, float]] = {}  # scan id -> (instance digest, when it was first seen so)
    done: dict[str, int] = {}  # scan id -> the instance digest this process has embedded (or found stored)
    log.info("following %s every %.0f s", source.describe(), settings.poll_seconds)
    while not stop.is_set():
        found = source.find(options, cache=cache)
        now = clock()
        ready = []
        for ref in found.selected:
            if since.get(ref.scan_id, (None, 0.0))[0] != ref.mtime_ns:
                since[ref.scan_id] = (ref.mtime_ns, now)
            stable = now - since[ref.scan_id][1] >= settings.stable_seconds
            if stable and done.get(ref.scan_id) != ref.mtime_ns:
                ready.append(ref)
        if ready:
            summary = embed_found(request, source, ArchiveScan(ready, found.skipped, found.root), encoder=encoder,
                                  progress=progress)  # fmt: skip
            done.update({ref.scan_id: ref.mtime_ns for ref in ready})
            if summary.embedded or summary.failed:
                yield summary
        waiting = sum(1 for ref in found.selected if done.get(ref.scan_id) != ref.mtime_ns)
        if waiting:
            log.info("%d series still arriving (embedded once stable for %.0f s)", waiting, settings.stable_seconds)
        stop.wait(min(settings.poll_seconds, settings.stable_seconds) if waiting else settings.poll_seconds)
