"""The ASGI middleware in front of every route of ``hctembed serve``, in the order a request meets its checks:

1. **Host allow-list**: the ``Host`` header must name the server as configured (the loopback names when it is
   bound to loopback; ``--allowed-host`` names otherwise). A page on another site that re-points its own DNS
   name at 127.0.0.1 (DNS rebinding) sends its own name, and gets 400.
2. **Origin check**: a state-changing request (``POST``) that a browser marks as coming from another site
   (``Origin`` not this server, or ``Sec-Fetch-Site: cross-site``) gets 403: a cross-site multipart POST needs
   no CORS preflight, so without this any page open on the machine could upload to the server.
3. **Token**: with ``--token-file``, every request but the page and the API documentation needs
   ``Authorization: Bearer <token>``, checked before any of its body is read (401).
4. **Requests in flight**: over ``max_requests`` at once, 503 with ``Retry-After``.
5. **Body**: a POST whose Content-Length is over the upload limit gets 413 unread; a chunked one is cut off with
   413 as soon as what arrived passes the limit; each chunk must arrive within ``body_timeout_s`` (408).
"""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from hctembed.serve.limits import LOOPBACK_NAMES

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header or an origin's netloc as (name, port): ``"[::1]:8000"`` -> ``("::1", 8000)``, the name in
    lower case, the port None when absent (or not a number)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1 :]) if end >= 0 else (value, "")
    elif value.count(":") == 1:
        name, rest = value.split(":")[0], ":" + value.split(":")[1]
    else:
        name, rest = value, ""
    port = rest[1:] if rest.startswith(":") else ""
    return name, int(port) if port.isdigit() else None


def host_name(value: str) -> str:
    """The name part of a Host header or an origin's netloc (see :func:`split_host`)."""
    return split_host(value)[0]


class Guard:
    """ASGI middleware: host allow-list, origin check, token, in-flight cap, upload size and body timeout."""

    OPEN = ("/", "/docs", "/openapi.json", "/docs/oauth2-redirect")

    def __init__(
        self,
        app,
        *,
        token: str | None,
        max_bytes: int,
        allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES,
        body_timeout_s: float = 30.0,
        max_requests: int = 64,
    ) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.body_timeout_s = body_timeout_s
        self.max_requests = max_requests
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.allowed and host not in self.allowed:
            return await send_json(send, 400, "this server does not answer to that Host name (--allowed-host)")
        if scope["method"] in STATE_CHANGING and self._cross_site(headers, host):
            return await send_json(send, 403, "a request from another site is refused (Origin)")
        if self.token is not None and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return await send_json(send, 401, "a bearer token is required", auth=True)
        if self.in_flight >= self.max_requests:
            return await send_json(send, 503, "too many requests at once; try again", retry_after=1)
        self.in_flight += 1
        try:
            if scope["method"] != "POST":
                return await self.app(scope, receive, send)
            return await self._post(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    def _cross_site(self, headers: dict, host: str) -> bool:
        """Whether a browser says the request comes from another origin: its ``Origin`` names another scheme's
        default port, host or port than the ``Host`` it was sent to (a page on localhost:3000 posting to
        localhost:8000 is another site), or ``Sec-Fetch-Site`` says cross-site."""
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            if text == "null":
                return True
            parts = urlsplit(text)
            default = 443 if parts.scheme == "https" else 80
            try:
                origin_port = parts.port or default
            except ValueError:
                return True
            _, host_port = split_host(headers.get(b"host", b"").decode("latin-1"))
            return (host_name(parts.netloc), origin_port) != (host, host_port or default)
        return headers.get(b"sec-fetch-site", b"") == b"cross-site"

    async def _post(self, scope, receive, send, headers: dict):
        limit = f"the upload is over the limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, limit)
        received = 0

        async def counted():
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise HTTPException(408, "the request body stopped arriving") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, limit)  # FastAPI passes an HTTPException raised while parsing through
            return message

        await self.app(scope, counted, send)


async def send_json(send, status: int, error: str, *, auth: bool = False, retry_after: int | None = None) -> None:
    body = JSONResponse({"error": error}, status_code=status).body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if auth:
        headers.append((b"www-authenticate", b"Bearer"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
