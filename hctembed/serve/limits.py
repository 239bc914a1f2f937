"""The limits of ``hctembed serve`` as plain settings (no server imports), with defaults that keep a 2-core,
24 GB server answering under hostile load; docs/serve.md says what each protects."""

from __future__ import annotations

from dataclasses import dataclass

from hctembed.io.admission import Limits

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # the Host names a server bound to loopback answers to


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on sockets and requests (:mod:`hctembed.serve.connections`, :mod:`hctembed.serve.guard`)."""

    header_timeout_s: float = 10.0  # a request head must arrive within this of connecting (or of the last answer)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # past this, the connections idle longest are closed
    body_timeout_s: float = 30.0  # each chunk of a request body must arrive within this
    max_requests: int = 64  # requests in flight at once; more get 503


@dataclass(frozen=True)
class QueryLimits:
    """The admission limits of uploaded queries (:mod:`hctembed.serve.admission`)."""

    max_query_voxels: int = 300_000_000  # declared by the headers, and of the 1 mm grid (512 x 512 x 1,000: 262 M)
    memory_mb: float = 4096.0  # what the queries being embedded at once may hold together
    wait_s: float = 20.0  # how long a query waits for room in the budget before 503
    max_zip_members: int = 4_000  # one series
    max_zip_mb: float = 2048.0  # what a zip's members inflate to, together

    def file_limits(self) -> Limits:
        return Limits(
            max_voxels=self.max_query_voxels,
            max_zip_members=self.max_zip_members,
            max_zip_bytes=int(self.max_zip_mb * 2**20),
        )
