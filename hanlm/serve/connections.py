"""The server's connections: uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request head.

uvicorn bounds how big a request head may grow (h11_max_incomplete_event_size, 16 KiB) but not how
long it may take: a new connection has no timer at all, and the keep-alive timer armed after a
response is cancelled by the first byte that arrives. A client that sends half a request line (or
one byte a minute) held its connection, and a file descriptor, for ever.

Here every request head must be complete within `head_timeout_s` of the connection opening or of
the previous response ending. A connection that misses the deadline is closed: with a 408 when part
of a head had come (the client is waiting for an answer), silently when nothing had (an idle
keep-alive connection, which clients expect to be closed, as uvicorn's keep-alive timeout does).
The deadline is for the head only: bodies have `serve.body_timeout_s`, and a request being answered
has no deadline here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from hanlm.serve.protocol import APIError

HEAD_TIMEOUT_S = 10.0


class HeadTimeoutProtocol(H11Protocol):
    """H11Protocol whose request heads must arrive within `head_timeout_s` (a subclass sets it)."""

    head_timeout_s: float = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaited_after: object = None  # the request cycle a new head is awaited after

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head(after=None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._head_arrived_yet()

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # may start the next request at once (pipelined)
        if not self.transport.is_closing():
            self._await_head(after=answered)
            self._head_arrived_yet()

    def _await_head(self, *, after: object) -> None:
        self._cancel_head_timer()
        self._awaited_after = after
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_arrived_yet(self) -> None:
        # uvicorn starts a new cycle for each complete request head.
        if self._head_timer is not None and self.cycle is not self._awaited_after:
            self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or upgraded
            return
        started = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if started:  # written as it is: h11 sends no response to a request it has not read
            self.transport.write(_timeout_response(self.head_timeout_s))
        self.transport.close()


def _timeout_response(timeout_s: float) -> bytes:
    error = APIError(408, f"the request head (its request line and headers) did not arrive within "
                          f"{timeout_s:g} s (serve.header_timeout_s)", code="header_timeout")
    body = json.dumps(error.body()).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


def head_timeout_protocol(head_timeout_s: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for uvicorn's `http` setting, with this deadline for each request head."""
    if not head_timeout_s > 0:
        raise ValueError(f"the header timeout must be > 0 seconds (got {head_timeout_s})")
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": float(head_timeout_s)})


def uvicorn_settings(header_timeout_s: float = HEAD_TIMEOUT_S) -> dict[str, Any]:
    """What `uvicorn.run` (or `uvicorn.Config`) is given for this: the h11 protocol with the deadline."""
    return {"http": head_timeout_protocol(header_timeout_s)}
