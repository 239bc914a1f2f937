"""A real PACS for tests: Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``), started on a
free loopback port with a temporary storage folder and stopped after; and a fault-injecting HTTP proxy in front of
it (5xx answers, dropped connections, deleted series, a server that goes away)."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ORTHANC = shutil.which("Orthanc")
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
USER, PASSWORD = "radiology", "not-a-real-Secret-9f3e"


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for name in ("libOrthancDicomWeb.so",):
            if (folder / name).exists():
                return folder / name
    return None


def missing_reason() -> str | None:
    """Why a real Orthanc cannot run here (the tests skip with it), or None."""
    if ORTHANC is None:
        return "Orthanc is not installed (Debian package orthanc; .ci/run installs it)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """One Orthanc process on loopback; ``stop()`` and ``start()`` keep its storage (a restart)."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.rest, auth=(USER, PASSWORD), timeout=30)

    def start(self) -> Orthanc:
        config = {
            "Name": "hctembed-test", "HttpPort": self.port, "DicomServerEnabled": False,
            "StorageDirectory": str(self.folder / "db"), "IndexDirectory": str(self.folder / "db"),
            "Plugins": [str(dicomweb_plugin())], "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "HttpThreadsCount": 8,
        }  # fmt: skip
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        conf = self.folder / "orthanc.json"
        conf.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(conf)], stdout=log, stderr=log, cwd=self.folder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.get("/system").status_code == 200:
                        return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, paths) -> None:
        with self.client() as c:
            for path in paths:
                response = c.post("/instances", content=Path(path).read_bytes())
                assert response.status_code == 200, response.text

    def clear(self) -> None:
        with self.client() as c:
            for study in c.get("/studies").json():
                c.delete(f"/studies/{study}")

    def delete_series(self, series_uid: str) -> None:
        with self.client() as c:
            found = c.post("/tools/find", json={"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}}).json()
            for orthanc_id in found:
                assert c.delete(f"/series/{orthanc_id}").status_code == 200


class FaultProxy:
    """A threaded HTTP proxy to ``target`` whose ``fault(request_path, n)`` hook may answer instead: return an
    HTTP status to send, ``"drop"`` to close the connection unanswered, or None to forward (``n``: how many
    requests came before this one)."""

    def __init__(self, target: str, fault: Callable[[str, int], int | str | None] = lambda path, n: None) -> None:
        self.target = target
        self.fault = fault
        self.count = 0
        self.paths: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with threading.Lock():
                    n = proxy.count
                    proxy.count += 1
                    proxy.paths.append(self.path)
                action = proxy.fault(self.path, n)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(action, int):
                    self.send_response(action)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                try:
                    upstream = httpx.get(proxy.target + self.path, headers=headers, timeout=60)
                except httpx.TransportError:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(upstream.status_code)
                self.send_header("Content-Type", upstream.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
