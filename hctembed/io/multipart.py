"""The payloads of a ``multipart/related`` answer (RFC 2046), as WADO-RS sends a series' files."""

from __future__ import annotations

from hctembed.volume import VolumeError


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a ``multipart/*`` content type; VolumeError when there is none."""
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"')
    raise VolumeError(f"the PACS answered {content_type.split(';')[0] or 'no content type'}, not multipart/related")


def split_multipart(body: bytes | bytearray, *, boundary: str) -> list[bytes]:
    """The payloads of a ``multipart/related`` body (RFC 2046): between ``--boundary`` lines, after each part's
    header block; ``Content-Length`` is honoured when a part gives it. Each payload is copied out once (the body
    as received can be a bytearray of a whole series)."""
    view = memoryview(body)
    delimiter = b"--" + boundary.encode("ascii")
    parts = []
    start = body.find(delimiter)
    if start < 0:
        raise VolumeError("a multipart answer without its boundary")
    pos = start + len(delimiter)
    while True:
        if body[pos : pos + 2] == b"--":  # the closing delimiter
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise VolumeError("a truncated multipart answer (a part without its header end)")
        headers = body[pos:head_end].decode("latin-1").lower()
        data_start = head_end + 4
        length = None
        for line in headers.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip() == "content-length" and value.strip().isdigit():
                length = int(value.strip())
        if length is not None:
            data_end = data_start + length
            after = body.find(delimiter, data_end)
        else:
            after = body.find(b"\r\n" + delimiter, data_start)
            data_end = after
            after = after + 2 if after >= 0 else after
        if after < 0 or data_end > len(body):
            raise VolumeError("a truncated multipart answer (a part without its closing boundary)")
        parts.append(bytes(view[data_start:data_end]))
        pos = after + len(delimiter)
