"""``hctembed serve``: the JSON API and web page over one database (uvicorn), see :mod:`hctembed.serve.app`."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict
from pathlib import Path

import typer

from hctembed.cli.common import setup_logging, stderr
from hctembed.serve.limits import LOOPBACK_NAMES, ConnectionLimits, QueryLimits

CONFIG_ENV = "HCTEMBED_SERVE_CONFIG"  # how worker processes (--workers > 1) receive the configuration


def serve(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed` (an embed may be running)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs a token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="A file holding the bearer token every /api request must send."
    ),
    max_upload_mb: float = typer.Option(2048.0, "--max-upload-mb", min=0.001, help="Largest query upload (MB)."),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="A Host name the server answers to (repeatable; '*' for any). Default: the loopback names on "
        "loopback (DNS rebinding is refused); any name otherwise (the token guards it).",
    ),
    max_query_voxels: int = typer.Option(
        QueryLimits().max_query_voxels,
        "--max-query-voxels",
        min=1,
        help="An upload whose headers, or whose 1 mm grid, hold more voxels gets 400 before it is read.",
    ),
    query_memory_mb: float = typer.Option(
        QueryLimits().memory_mb,
        "--query-memory-mb",
        min=64,
        help="Memory the uploads embedded at once may hold together (estimated from their headers); an upload "
        "waits for room, then gets 503.",
    ),
    header_timeout: float = typer.Option(
        ConnectionLimits().header_timeout_s,
        "--header-timeout",
        min=0.1,
        help="Seconds a connection may take to send a request head (idle sockets are closed after it).",
    ),
    body_timeout: float = typer.Option(
        ConnectionLimits().body_timeout_s, "--body-timeout", min=0.1, help="Seconds between two chunks of a body."
    ),
    max_connections: int = typer.Option(
        ConnectionLimits().max_connections,
        "--max-connections",
        min=2,
        help="Open sockets kept; past it the ones idle longest are closed.",
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads the index once)."),
    poll_seconds: float = typer.Option(
        2.0, "--poll-seconds", min=0.1, help="How often to look for scans an embed has committed since."
    ),
    exact: bool = typer.Option(
        False,
        "--exact",
        help="Exact search whatever index each collection saved (default: the saved index's kind; "
        "exact where none matches the database).",
    ),
    viewer_url: str | None = typer.Option(
        None,
        "--viewer-url",
        help="Link each hit from a PACS to its study in the viewer, e.g. "
        "http://pacs/viewer?study={StudyInstanceUID} (UIDs resolved on the server, from the locator).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Search as a service: /api/search by scan id or uploaded file, /api/scans/ID (and its thumbnail.png),
    /health, a web page at /, the API's documentation at /docs. Keeps answering while `embed` writes the database:
    committed batches become searchable within --poll-seconds."""
    import uvicorn

    from hctembed.errors import InputError
    from hctembed.viewer_links import ViewerLinks

    setup_logging(quiet=quiet)
    if viewer_url is not None:
        ViewerLinks(viewer_url)  # a malformed template fails here, not in every answer
    token = token_file.read_text().strip() if token_file else None
    if token_file is not None and not token:
        raise InputError(f"{token_file} is empty: it should hold the bearer token")
    if token is None and not _loopback(host):
        raise InputError(f"--host {host} is reachable from other machines: give --token-file, or serve on 127.0.0.1")
    # loopback: its names (and the address it is bound to, 127.0.0.2 say) and nothing else; another address
    # needs a token already, so any Host is answered unless --allowed-host narrows it
    hosts = tuple(allowed_host) or ((*LOOPBACK_NAMES, host) if _loopback(host) else ("*",))
    connections = ConnectionLimits(
        header_timeout_s=header_timeout, body_timeout_s=body_timeout, max_connections=max_connections
    )
    queries = QueryLimits(max_query_voxels=max_query_voxels, memory_mb=query_memory_mb)
    config = {
        "db": str(db), "token": token, "max_upload_mb": max_upload_mb, "poll_s": poll_seconds, "quiet": quiet,
        "allowed_hosts": list(hosts), "queries": asdict(queries), "connections": asdict(connections),
        "viewer_url": viewer_url, "exact": exact,
    }  # fmt: skip
    os.environ[CONFIG_ENV] = json.dumps(config)  # for the worker processes; the token never reaches argv
    stderr.print(f"serving {db} on http://{host}:{port}/ (API documentation at /docs)")
    uvicorn.run(
        "hctembed.cli.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
        access_log=False, log_level="warning" if quiet else "info",
        http="hctembed.cli.serve:ServeProtocol", timeout_keep_alive=int(max(1, connections.keep_alive_s)),
        timeout_graceful_shutdown=5,
    )  # fmt: skip


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_from_env():
    """The application of one server process, configured by ``serve`` through :data:`CONFIG_ENV`."""
    from hctembed.serve.app import ServeConfig, create_app

    raw = json.loads(os.environ[CONFIG_ENV])
    setup_logging(quiet=raw.pop("quiet", False))  # a worker process of its own (--workers > 1) logs as the parent
    queries, connections = QueryLimits(**raw.pop("queries")), ConnectionLimits(**raw.pop("connections"))
    raw.update(db=Path(raw["db"]), allowed_hosts=tuple(raw["allowed_hosts"]))
    return create_app(ServeConfig(**raw, queries=queries, connections=connections))


def __getattr__(name: str):
    """``ServeProtocol``: uvicorn's HTTP protocol with the connection limits :data:`CONFIG_ENV` carries, built
    when uvicorn asks for it (``http="hctembed.cli.serve:ServeProtocol"``, in each worker process)."""
    if name != "ServeProtocol":
        raise AttributeError(name)
    from hctembed.serve.connections import guarded_protocol

    limits = json.loads(os.environ.get(CONFIG_ENV, "{}")).get("connections", {})
    return guarded_protocol(ConnectionLimits(**limits))
