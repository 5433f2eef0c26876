"""uvicorn's h11 protocol with a header timeout: a connection that has not sent a whole request head within
FGS_HTTP_HEADER_TIMEOUT_S is closed (slowloris). uvicorn itself times out only idle keep-alive connections.

`fgs api` (what `fgs up`, the API image and the k8s Deployment run) passes it to uvicorn as its `http` class.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fgs_common.settings import get_settings


class HeaderTimeoutH11Protocol(H11Protocol):
    """Close a connection whose request head is still incomplete after the header timeout."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer(get_settings().http_header_timeout_s)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the head has arrived (their side is in the body or done)
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's head: the keep-alive wait, then the header timeout once its first byte came
        self._arm_header_timer(self.timeout_keep_alive + get_settings().http_header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self, seconds: float) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(seconds, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
