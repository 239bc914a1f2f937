"""``hctembed serve``'s application: a JSON API (documented at ``/docs``, schema at ``/openapi.json``) and a web
page, over one :class:`~hctembed.serve.state.ServerState`.

* ``GET /health``; ``GET /api/search?id=SCAN&k=K[&model=ID]``; ``POST /api/search?k=K`` with a multipart field
  ``file`` (``.nii``/``.nii.gz``, or a ``.zip`` of one DICOM series); ``GET /api/scans/{id}`` and
  ``GET /api/scans/{id}/thumbnail.png``; ``GET /`` the page.
* Errors are JSON ``{"error": "..."}``: 400 bad input, 401 without the configured bearer token (checked before
  a body is read; the page and the API documentation need none), 404 an unknown scan or route, 413 an upload
  over the limit (refused from its Content-Length, or as soon as the body passes the limit: never read whole),
  500 a bug (logged with its traceback).
* Privacy: an upload is written to a private temporary folder, embedded and deleted; nothing about a query is
  logged but its route, status and time (the access log is off).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hctembed.errors import HctembedError, InputError
from hctembed.io.locator import Locator, locator_path
from hctembed.processes import process_alive
from hctembed.serve.admission import MemoryBudget, ServerBusy, estimated_bytes
from hctembed.serve.guard import Guard
from hctembed.serve.limits import LOOPBACK_NAMES, ConnectionLimits, QueryLimits
from hctembed.serve.page import PAGE
from hctembed.serve.state import NotFound, ServerState
from hctembed.viewer_links import ViewerLinks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What ``hctembed serve`` is asked to do."""

    db: Path
    token: str | None = None  # required as ``Authorization: Bearer <token>`` on /api/* when set
    max_upload_mb: float = 2048.0
    poll_s: float = 2.0
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host names the server answers to
    queries: QueryLimits = field(default_factory=QueryLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    viewer_url: str | None = None  # a PACS viewer link per hit from a PACS ({StudyInstanceUID}); see viewer_links
    exact: bool = False  # exact search whatever index kind the collections saved


def create_app(config: ServeConfig, *, state: ServerState | None = None) -> FastAPI:
    """The application over ``state`` (started here when not given, and then stopped with the application:
    its heartbeat goes when the server stops in order)."""
    sweep_upload_folders()
    owned = state is None
    if state is None:
        state = ServerState(config.db, poll_s=config.poll_s, exact=config.exact)
        state.start()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        try:
            yield
        finally:
            if owned:
                state.stop()

    app = FastAPI(
        title="hctembed", summary="Search a head-CT archive by example", version="1", redoc_url=None,
        lifespan=lifespan,
    )  # fmt: skip
    app.state.hctembed = state
    app.add_middleware(
        Guard, token=config.token, max_bytes=int(config.max_upload_mb * 2**20), allowed_hosts=config.allowed_hosts,
        body_timeout_s=config.connections.body_timeout_s, max_requests=config.connections.max_requests,
    )  # fmt: skip
    _errors(app)
    _routes(app, state=state, config=config)
    return app


UPLOAD_PREFIX = "hctembed-query-"
# which index produced an answer: the server searches every collection exactly (an in-memory flat index)


def sweep_upload_folders() -> list[Path]:
    """Remove the upload folders a killed server left in the temporary folder (named with the pid of the
    server that made them; one whose process is gone is left over). Returns what was removed."""
    import shutil

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*"):
        pid = folder.name[len(UPLOAD_PREFIX) :].split("-", 1)[0]
        try:
            mine = folder.is_dir() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if not mine or not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d upload folders a stopped server left behind", len(removed))
    return removed


def _errors(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (an unknown route: 404)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ServerBusy)
    async def busy(_: Request, exc: ServerBusy):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(HctembedError)
    async def bad_input(_: Request, exc: HctembedError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception):
        log.error("internal error", exc_info=exc)
        return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)

    @app.middleware("http")
    async def timing(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        log.info(
            "%s %s %d %.1f ms", request.method, getattr(route, "path", "?"), response.status_code,
            1000 * (time.perf_counter() - start),
        )  # fmt: skip
        return response


def _query_thread_start() -> None:
    from hctembed.preprocessing.threads import use_process_threads

    use_process_threads()


def _routes(app: FastAPI, *, state: ServerState, config: ServeConfig) -> None:
    limits = config.queries
    # uploads wait here, not in the pool that answers every other request; each thread starts with the process's
    # torch threads even if the other one is preprocessing (on one thread) at that moment
    embedding = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hctembed-query", initializer=_query_thread_start)
    viewer = ViewerLinks(config.viewer_url) if config.viewer_url else None

    def answer_hits(hits) -> list[dict]:
        """The hits as JSON; with ``--viewer-url``, each PACS hit's link (its UIDs read here, from the locator)."""
        if viewer is None:
            return [h.to_dict() for h in hits]
        with Locator(locator_path(config.db), read_only=True) as locator:
            links = viewer.links(locator.get([h.scan_id for h in hits]))
        return [h.to_dict() | {"viewer": links.get(h.scan_id)} for h in hits]

    budget = MemoryBudget(total_bytes=int(limits.memory_mb * 2**20))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/health", summary="Status, scan count and models")
    def health() -> dict:
        return state.health()

    @app.get("/api/search", summary="Nearest scans to a stored scan (itself left out)")
    def search_by_id(
        id: str = Query(..., description="A stored scan id."),  # the API's parameter name
        k: int = Query(10, ge=1, le=1000, description="How many hits."),
        model: str | None = Query(None, description="Model id (prefix); default the most recently embedded."),
    ) -> JSONResponse:
        view, hits = state.search_id(id, k=k, model=model)
        # a Response as it is: FastAPI's encoder would walk the plain dict again (about a millisecond a request)
        return JSONResponse({"query": {"scan_id": id, "model_id": view.model_id}, **view.answer(),
                             "hits": answer_hits(hits)})  # fmt: skip

    @app.post("/api/search", summary="Nearest scans to an uploaded scan (embedded with the stored model)")
    async def search_by_file(
        file: UploadFile = File(..., description=".nii / .nii.gz, or a .zip of one DICOM series"),
        k: int = Query(10, ge=1, le=1000),
        model: str | None = Query(None),
    ) -> dict:
        view = state.view(model)
        with tempfile.TemporaryDirectory(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-") as folder:
            path = await run_in_threadpool(_save_upload, file, Path(folder))
            loop = asyncio.get_running_loop()
            xq = await loop.run_in_executor(embedding, _embed_query, state, view, path, limits, budget)
        hits = state.search_vector(xq, view=view, k=k)
        query = {"file": "uploaded", "model_id": view.model_id}
        return {"query": query, **view.answer(), "hits": answer_hits(hits)}

    @app.get("/api/scans/{scan_id}", summary="A scan's facts, labels and which models embedded it")
    def scan(scan_id: str) -> dict:
        return state.scan(scan_id)

    @app.get("/api/scans/{scan_id}/thumbnail.png", summary="The scan's mid slices (the montage's column)")
    def thumbnail(scan_id: str, model: str | None = None) -> Response:
        planes, windows = state.planes(scan_id, model=model)
        if planes is None:
            raise NotFound(f"scan {scan_id} has no stored pictures (embedded before they were kept)")
        labels = state.scan(scan_id)["labels"]
        return Response(_thumbnail_png(scan_id, planes, windows, labels=labels), media_type="image/png")


# what reading an upload can raise besides hctembed's own errors: the file's content, not a bug of the server
UNREADABLE = (
    ValueError, TypeError, OSError, EOFError, KeyError, IndexError, AttributeError, NotImplementedError,
    RecursionError,  # sequences nested hundreds deep
)  # fmt: skip


def _embed_query(state: ServerState, view, path: Path, limits: QueryLimits, budget: MemoryBudget):
    """An upload's vector, admitted first: its headers decide what it may cost (over the limits: 400; no room in
    the memory budget now: 503). Error messages never name the server's temporary folder."""
    from hctembed.search import embed_file

    encoder = state.encoder(view)
    spacing = getattr(encoder.preprocess, "spacing_mm", None)
    try:
        need = estimated_bytes(path, limits=limits, spacing_mm=spacing)
        with budget.reserve(need, wait_s=limits.wait_s):
            return embed_file(encoder, path, max_voxels=limits.max_query_voxels, limits=limits.file_limits())
    except ServerBusy:
        raise
    except HctembedError as exc:
        raise InputError(_without_folder(str(exc), path)) from None
    except UNREADABLE as exc:
        log.debug("an upload could not be read", exc_info=exc)
        raise InputError(f"not a readable scan ({type(exc).__name__}: {_without_folder(str(exc), path)})") from None


def _without_folder(message: str, path: Path) -> str:
    """``message`` with the upload's temporary folder left out (its file name, chosen by the server, stays)."""
    message = message.replace("(--max-voxels)", "(--max-query-voxels)")  # the server's own option says it
    return message.replace(str(path.parent) + "/", "").replace(str(path.parent), "the upload")[:500]


def _save_upload(file: UploadFile, folder: Path) -> Path:
    """The upload as a file named by what its bytes are (never by the client's file name)."""
    head = file.file.read(352)
    file.file.seek(0)
    if head[:2] == b"\x1f\x8b":
        name = "query.nii.gz"
    elif head[:2] == b"PK":
        name = "query.zip"
    elif int.from_bytes(head[:4].ljust(4, b"\0"), "little") in (348, 540) or head[344:348] in (b"n+1\0", b"ni1\0"):
        name = "query.nii"
    else:
        raise HTTPException(400, "not a scan: expected a .nii / .nii.gz file or a .zip of one DICOM series")
    path = folder / name
    with open(path, "wb") as out:
        while chunk := file.file.read(1 << 20):
            out.write(chunk)
    return path


def _thumbnail_png(scan_id: str, planes: bytes, windows: list[dict], *, labels: dict[str, float]) -> bytes:
    """The scan's montage column, stamped with its positive labels."""
    from hctembed.config import Window
    from hctembed.pictures.montage import PanelPlanes, ScanPanel, positive_labels, render_montage

    panel = ScanPanel(
        title="", scan_id=scan_id, score=None, labels=positive_labels(labels), planes=PanelPlanes.from_bytes(planes)
    )
    buf = io.BytesIO()
    shown = tuple(Window(**w) for w in windows) or (Window(40.0, 80.0),)
    render_montage([panel], out=buf, windows=shown, panel_px=150, header=False)
    return buf.getvalue()
