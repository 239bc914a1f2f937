"""A PACS as an archive: DICOMweb (QIDO-RS to find series, WADO-RS to fetch them), e.g. Orthanc's plugin.

``dicomweb+http(s)://HOST:PORT/PATH`` names the server's DICOMweb root. Series are found study by study with
QIDO-RS, their instances' metadata (JSON, no pixel data) is read into the same :class:`SliceHeader` as a file's
header, and the same grouping, selection rules and header head check decide (:func:`group_series`), before any
pixel data moves. A selected series is fetched whole with one WADO-RS request (``multipart/related`` of the
stored files, read into memory up to the upload limit) and assembled by the same code as folder DICOM, so its
vectors equal those of the same files on disk.

Identity and privacy: scan ids are the keyed pseudonyms of the Series Instance UIDs (as for folders); the server
URL and the UIDs go only to the locator (``root`` = the URL, ``location`` = ``STUDY/SERIES``). Credentials come
from ``--auth-file`` (JSON ``{"username": …, "password": …}`` or ``{"token": …}``) or the environment
(``HCTEMBED_DICOMWEB_USERNAME`` / ``HCTEMBED_DICOMWEB_PASSWORD``, or ``HCTEMBED_DICOMWEB_TOKEN``), never the URL or
the command line, and are never logged.

Change detection: a series' "size" is its instance count and its "mtime" a digest of its SOP Instance UIDs, so a
re-run fetches pixel data only for new or changed series. Timeouts, 5xx answers and dropped connections are
retried with exponential backoff; a series that vanished between listing and fetching is skipped
(``gone_from_pacs``); a server that stops answering stops the run (:class:`SourceUnavailable`), keeping what
is stored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hctembed.errors import InputError
from hctembed.io.multipart import boundary_of, split_multipart
from hctembed.volume import SkipError, SourceUnavailable, VolumeError

log = logging.getLogger(__name__)

SCHEME = "dicomweb+"
ENV_USER = "HCTEMBED_DICOMWEB_USERNAME"
ENV_PASSWORD = "HCTEMBED_DICOMWEB_PASSWORD"
ENV_TOKEN = "HCTEMBED_DICOMWEB_TOKEN"
DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
PAGE = 500  # QIDO results per request (limit / offset paging)
# QIDO filters on series attributes go to the series query; everything else to the study query
SERIES_KEYS = {"Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined", "SeriesInstanceUID"}


def is_dicomweb(archive: str | Path) -> bool:
    """Whether ``archive`` names a DICOMweb server (``dicomweb+http://`` or ``dicomweb+https://``)."""
    return str(archive).startswith((SCHEME + "http://", SCHEME + "https://"))


class SeriesGone(SkipError):
    """The series was listed by QIDO but is no longer on the server when its pixels are fetched."""

    code = "gone_from_pacs"


@dataclass(frozen=True)
class DicomWebServer:
    """Where a DICOMweb root is and where its credentials are kept (a file, or the environment): what refs and
    the locator carry, never the secret itself."""

    url: str  # http(s)://host:port/path, no trailing slash, no credentials
    auth_file: str | None = None

    @classmethod
    def parse(cls, spec: str, *, auth_file: str | Path | None = None) -> DicomWebServer:
        """``dicomweb+http(s)://HOST:PORT/PATH`` -> the server; credentials in the URL are refused (they would end
        up in shell histories and process lists)."""
        if not is_dicomweb(spec):
            raise InputError(f"{spec!r} is not a DICOMweb address (dicomweb+http://HOST:PORT/PATH)")
        url = str(spec)[len(SCHEME) :].rstrip("/")
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise InputError("put DICOMweb credentials in --auth-file or the environment, not in the address")
        if not parts.hostname:
            raise InputError(f"{spec!r} names no host")
        try:
            parts.port  # noqa: B018  (urlsplit checks the port only when it is read)
        except ValueError:
            raise InputError(f"{spec!r}: the port is not a number from 0 to 65535") from None
        if parts.query or parts.fragment:
            raise InputError(f"{spec!r}: filters go in --filter, not in the address")
        if auth_file is not None and not Path(auth_file).is_file():
            raise InputError(f"--auth-file {auth_file}: not found")
        return cls(url=url, auth_file=str(Path(auth_file).resolve()) if auth_file is not None else None)

    def spec(self) -> str:
        return SCHEME + self.url


@dataclass(frozen=True, repr=False)
class Credentials:
    """HTTP basic credentials or a bearer token (``repr`` never shows them)."""

    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(<hidden>)"

    @classmethod
    def of(cls, server: DicomWebServer) -> Credentials:
        """From the server's auth file, else the environment, else none."""
        if server.auth_file is not None:
            try:
                data = json.loads(Path(server.auth_file).read_text())
            except (OSError, ValueError):
                raise InputError(f"--auth-file {server.auth_file}: not readable JSON") from None
            if not isinstance(data, dict) or not (data.get("token") or data.get("username")):
                raise InputError(f'--auth-file {server.auth_file}: expected {{"username", "password"}} or {{"token"}}')
            return cls(username=data.get("username"), password=data.get("password"), token=data.get("token"))
        return cls(username=os.environ.get(ENV_USER), password=os.environ.get(ENV_PASSWORD),
                   token=os.environ.get(ENV_TOKEN))  # fmt: skip

    def apply(self, headers: dict[str, str]) -> Any:
        """The httpx ``auth`` for these credentials (a token goes into ``headers``)."""
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
            return None
        if self.username:
            return (self.username, self.password or "")
        return None


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a request is retried (timeouts, 5xx, dropped connections)."""

    attempts: int = 4
    backoff_seconds: float = 0.5  # doubled after each failed attempt
    timeout_seconds: float = 60.0


class DicomWebClient:
    """QIDO-RS and WADO-RS against one server, with retries; a context manager (closes its connections)."""

    def __init__(self, server: DicomWebServer, *, retry: Retry = Retry(), max_series_bytes: int = 16 * 2**30) -> None:
        import httpx

        self.server = server
        self.retry = retry
        self.max_series_bytes = max_series_bytes
        headers = {"User-Agent": "hctembed"}
        auth = Credentials.of(server).apply(headers)
        # certificates are checked for https; a plain-http server (loopback, a research PACS inside the hospital)
        # needs no TLS context, whose set-up costs ~30 ms a client (redirects are never followed)
        verify = server.url.startswith("https://")
        self._http = httpx.Client(base_url=server.url, auth=auth, headers=headers, verify=verify,
                                  timeout=httpx.Timeout(retry.timeout_seconds), follow_redirects=False)  # fmt: skip

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- requests with retries -------------------------------------------------------------------------------

    def _request(self, path: str, *, params=None, accept: str, consume: Callable[[Any], Any], what: str):
        """GET ``path`` and hand the streamed response to ``consume``; retried on timeouts, 5xx and dropped
        connections. 404 -> SeriesGone; 401/403 -> InputError; exhausted retries -> SourceUnavailable."""
        import httpx

        delay = self.retry.backoff_seconds
        for attempt in range(1, self.retry.attempts + 1):
            try:
                with self._http.stream("GET", path, params=params, headers={"Accept": accept}) as response:
                    if response.status_code == 404:
                        raise SeriesGone(f"{what}: not on the PACS any more (deleted after it was listed?)")
                    if response.status_code in (401, 403):
                        raise InputError(f"the PACS refused the credentials ({response.status_code}); check "
                                         f"--auth-file or {ENV_USER} / {ENV_TOKEN}")  # fmt: skip
                    if response.status_code >= 500 or response.status_code == 429:
                        raise _Transient(f"HTTP {response.status_code}")
                    if response.status_code != 200:
                        raise VolumeError(f"{what}: the PACS answered HTTP {response.status_code}")
                    return consume(response)
            except (_Transient, httpx.TransportError) as exc:
                reason = str(exc) if isinstance(exc, _Transient) else type(exc).__name__
                if attempt == self.retry.attempts:
                    raise SourceUnavailable(
                        f"the PACS at {self.server.url} did not answer {what} after {attempt} tries ({reason}); "
                        "what was stored is kept: run again to resume"
                    ) from None
                log.info("%s: %s; retrying in %.1f s (%d of %d)", what, reason, delay, attempt, self.retry.attempts)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _json(self, path: str, *, params=None, what: str) -> list[dict]:
        def consume(response):
            body = response.read()
            if not body.strip():
                return []  # some servers answer 204-like empty bodies for no match
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if not isinstance(data, list):
                raise VolumeError(f"{what}: the PACS answered something that is not a DICOM JSON list")
            return data

        return self._request(path, params=params, accept=DICOM_JSON, consume=consume, what=what)

    def _paged(self, path: str, *, params: dict[str, str], what: str) -> Iterator[dict]:
        offset = 0
        while True:
            page = self._json(path, params={**params, "limit": str(PAGE), "offset": str(offset)}, what=what)
            yield from page
            if len(page) < PAGE:
                return
            offset += len(page)

    # ---- QIDO-RS -------------------------------------------------------------------------------------------

    def studies(self, filters: dict[str, str]) -> Iterator[dict]:
        """The studies the filters select; an address with no DICOMweb root behind it (404 here) is the user's
        error, named as such."""
        try:
            yield from self._paged("/studies", params=filters, what="the study list")
        except SeriesGone:
            raise InputError(f"no DICOMweb service at {self.server.url} (its /studies answered 404); check the "
                             "address's path (Orthanc's is /dicom-web)") from None  # fmt: skip

    def series(self, study_uid: str, filters: dict[str, str]) -> Iterator[dict]:
        return self._paged(f"/studies/{study_uid}/series", params=filters, what="a study's series list")

    def metadata(self, study_uid: str, series_uid: str) -> list[dict]:
        """Every instance's metadata (DICOM JSON) of one series."""
        return self._json(f"/studies/{study_uid}/series/{series_uid}/metadata", what="a series' metadata")

    # ---- WADO-RS -------------------------------------------------------------------------------------------

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[bytes]:
        """The stored files of one series (``multipart/related``), read into memory up to ``max_series_bytes``."""
        limit = self.max_series_bytes

        def consume(response):
            boundary = boundary_of(response.headers.get("content-type", ""))
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise VolumeError(f"the series is over {limit / 2**30:g} GiB (--max-zip-gb): not fetched whole")
            return split_multipart(body, boundary=boundary)

        return self._request(f"/studies/{study_uid}/series/{series_uid}", accept=MULTIPART_DICOM, consume=consume,
                             what="a series' pixel data")  # fmt: skip


class _Transient(Exception):
    """A server answer worth retrying (5xx, 429)."""
