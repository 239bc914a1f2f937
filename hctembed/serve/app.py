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
import hmac
import io
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hctembed.errors import HctembedError
from hctembed.serve.page import PAGE
from hctembed.serve.state import NotFound, ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What ``hctembed serve`` is asked to do."""

    db: Path
    token: str | None = None  # required as ``Authorization: Bearer <token>`` on /api/* when set
    max_upload_mb: float = 2048.0
    poll_s: float = 2.0


class Guard:
    """ASGI middleware in front of everything else: with a token configured, every request but the page and the
    API's documentation needs ``Authorization: Bearer <token>`` (checked before any of its body is read); and a
    POST whose Content-Length is over ``max_bytes`` gets 413 unread, one without a length (chunked) is cut off
    with 413 as soon as what arrived passes the limit."""

    OPEN = ("/", "/docs", "/openapi.json", "/docs/oauth2-redirect")

    def __init__(self, app, *, token: str | None, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return await _send_json(send, 401, "a bearer token is required", auth=True)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = f"the upload is over the limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, limit)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, limit)  # FastAPI passes an HTTPException raised while parsing through
            return message

        await self.app(scope, counted, send)


async def _send_json(send, status: int, error: str, *, auth: bool = False) -> None:
    body = JSONResponse({"error": error}, status_code=status).body
    headers = [(b"content-type", b"application/json")] + ([(b"www-authenticate", b"Bearer")] if auth else [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(config: ServeConfig, *, state: ServerState | None = None) -> FastAPI:
    """The application over ``state`` (started here when not given)."""
    if state is None:
        state = ServerState(config.db, poll_s=config.poll_s)
        state.start()
    app = FastAPI(title="hctembed", summary="Search a head-CT archive by example", version="1", redoc_url=None)
    app.state.hctembed = state
    app.add_middleware(Guard, token=config.token, max_bytes=int(config.max_upload_mb * 2**20))
    _errors(app)
    _routes(app, state=state)
    return app


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


def _routes(app: FastAPI, *, state: ServerState) -> None:
    # uploads wait here, not in the pool that answers every other request; each thread starts with the process's
    # torch threads even if the other one is preprocessing (on one thread) at that moment
    embedding = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hctembed-query", initializer=_query_thread_start)

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
    ) -> dict:
        view, hits = state.search_id(id, k=k, model=model)
        return {"query": {"scan_id": id, "model_id": view.model_id}, "hits": [h.to_dict() for h in hits]}

    @app.post("/api/search", summary="Nearest scans to an uploaded scan (embedded with the stored model)")
    async def search_by_file(
        file: UploadFile = File(..., description=".nii / .nii.gz, or a .zip of one DICOM series"),
        k: int = Query(10, ge=1, le=1000),
        model: str | None = Query(None),
    ) -> dict:
        view = state.view(model)
        with tempfile.TemporaryDirectory(prefix="hctembed-query-") as folder:
            path = await run_in_threadpool(_save_upload, file, Path(folder))
            loop = asyncio.get_running_loop()
            xq = await loop.run_in_executor(embedding, _embed_query, state, view, path)
        hits = state.search_vector(xq, view=view, k=k)
        return {"query": {"file": "uploaded", "model_id": view.model_id}, "hits": [h.to_dict() for h in hits]}

    @app.get("/api/scans/{scan_id}", summary="A scan's facts, labels and which models embedded it")
    def scan(scan_id: str) -> dict:
        return state.scan(scan_id)

    @app.get("/api/scans/{scan_id}/thumbnail.png", summary="The scan's mid slices (the montage's column)")
    def thumbnail(scan_id: str, model: str | None = None) -> Response:
        planes, windows = state.planes(scan_id, model=model)
        if planes is None:
            raise NotFound(f"scan {scan_id} has no stored pictures (embedded before they were kept)")
        return Response(_thumbnail_png(scan_id, planes, windows), media_type="image/png")


def _embed_query(state: ServerState, view, path: Path):
    from hctembed.search import embed_file

    return embed_file(state.encoder(view), path)


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


def _thumbnail_png(scan_id: str, planes: bytes, windows: list[dict]) -> bytes:
    from hctembed.config import Window
    from hctembed.pictures.montage import PanelPlanes, ScanPanel, render_montage

    panel = ScanPanel(title="", scan_id=scan_id, score=None, labels=(), planes=PanelPlanes.from_bytes(planes))
    buf = io.BytesIO()
    shown = tuple(Window(**w) for w in windows) or (Window(40.0, 80.0),)
    render_montage([panel], out=buf, windows=shown, panel_px=150, header=False)
    return buf.getvalue()
