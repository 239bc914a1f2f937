"""Connection hygiene for ``hctembed serve``: what uvicorn's HTTP/1.1 protocol lacks against clients that open
sockets and send nothing, or half a request line.

uvicorn times out a kept-alive connection between requests, but not one that never completes its request head:
300 such sockets stayed open for as long as their clients liked, and at the process's file limit ``/health``
stopped answering. :func:`guarded_protocol` returns uvicorn's h11 protocol with two bounds added:

* **a header timeout**: a connection must deliver a whole request head within ``header_timeout_s`` of
  connecting, or of its previous response; otherwise it is closed;
* **a connection cap**: past ``max_connections`` open sockets, the ones idle longest (no request in flight)
  are closed to make room, so a flood of idle sockets never starves a real request of a file descriptor.

Bodies are bounded by :class:`hctembed.serve.guard.Guard` (a timeout per chunk, a size limit).
"""

from __future__ import annotations

import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from hctembed.serve.limits import ConnectionLimits

log = logging.getLogger(__name__)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the header timeout and the connection cap of ``limits``."""

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = time.monotonic()
            self._header_timer = None
            self._arm_header_timer()
            self._make_room()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._arm_header_timer()
            super().data_received(data)
            if not self._between_requests():  # a request head arrived: the app's own timeouts take over
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = time.monotonic()

        # -- the bounds ----------------------------------------------------------------------------
        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timed_out)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            excess = len(self.connections) - limits.max_connections
            if excess <= 0:
                return
            idle = sorted(
                (c for c in self.connections if c is not self and getattr(c, "_between_requests", lambda: False)()),
                key=lambda c: getattr(c, "_idle_since", 0.0),
            )
            for connection in idle[:excess]:
                connection.transport.close()
            if len(idle) < excess:  # every other connection is busy: this one waits its turn elsewhere
                self.transport.close()
            log.debug("over %d connections: closed %d idle", limits.max_connections, min(len(idle), excess))

    return GuardedProtocol
