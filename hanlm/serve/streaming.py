"""From engine events to HTTP answers: one streaming path and one collecting path for every endpoint
that generates (completions and chat differ only in their `ChoiceFormat`).

A stream that fails after its 200 has gone out cannot change its status any more: it ends with an
error event, `data: {"error": {…}}`, and then `data: [DONE]` like every stream, so a client always
sees an end and a reason, never a cut connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request

from hanlm.serve.engine import ErrorEvent, FinishEvent, TokenEvent
from hanlm.serve.engine import Request as Job
from hanlm.serve.protocol import APIError, json_text

DISCONNECT_POLL_S = 0.5  # how often a running request checks that its client is still there
CLIENT_GONE = "499"  # the status under which requests whose client left are counted (nginx's)

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json_text(data)}\n\n"


async def engine_events(request: Request, jobs: list[Job], events: asyncio.Queue,
                        choices: int) -> AsyncIterator[TokenEvent | FinishEvent]:
    """The jobs' events until every choice has finished; the jobs are cancelled when this ends early.

    ClientGone when the client leaves, checked every DISCONNECT_POLL_S whether tokens flow or not:
    a non-streaming request has no other way to notice that nobody waits for its answer any more.
    A failed generation raises a 500 APIError."""
    finished, checked = 0, time.monotonic()
    try:
        while finished < choices:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    raise ClientGone
                checked = time.monotonic()
            if event is None:
                continue
            if isinstance(event, ErrorEvent):
                raise APIError(500, event.message, type="server_error", code="generation_failed")
            if isinstance(event, FinishEvent):
                finished += 1
            yield event
    finally:
        for job in jobs:
            job.cancel()


@dataclass
class Collected:
    """Every choice of a finished generation, for a non-streamed answer."""

    choices: int
    texts: dict[int, str] = field(init=False)
    tokens: dict[int, list[TokenEvent]] = field(init=False)
    reasons: dict[int, str] = field(init=False)
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        self.texts = {i: "" for i in range(self.choices)}
        self.tokens = {i: [] for i in range(self.choices)}
        self.reasons = {}

    def reason(self, index: int) -> str:
        return self.reasons.get(index, "cancelled")


class ChoiceFormat(Protocol):
    """How one endpoint shows its choices: streamed chunk by chunk, or whole."""

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """A streamed chunk holding `choices` (and e.g. `usage`)."""

    def opening(self) -> list[dict[str, Any]]:
        """Choices to stream before any token (chat's role deltas)."""

    def token(self, event: TokenEvent) -> dict[str, Any] | None:
        """The streamed choice for a token; None when there is nothing to send yet."""

    def finish(self, event: FinishEvent) -> dict[str, Any]:
        """The streamed choice that ends `event.index`."""

    def whole(self, collected: Collected, usage: dict[str, int]) -> dict[str, Any]:
        """The non-streamed answer."""


async def collect(events: AsyncIterator[TokenEvent | FinishEvent], choices: int) -> Collected:
    """Every event of a generation, gathered by choice."""
    out = Collected(choices)
    async for e in events:
        out.texts[e.index] += e.text
        if isinstance(e, TokenEvent):
            out.tokens[e.index].append(e)
        else:
            out.reasons[e.index] = e.reason
            out.completion_tokens += e.completion_tokens
    return out


async def sse_stream(events: AsyncIterator[TokenEvent | FinishEvent], fmt: ChoiceFormat, *, prompt_tokens: int,
                     include_usage: bool, count: Callable[[str], None]) -> AsyncIterator[str]:
    """The generation as server-sent events, always ending with `data: [DONE]` (after an error event
    when it failed) unless the client has left; `count` gets the outcome's status once."""
    status = "200"
    try:
        try:
            for choice in fmt.opening():
                yield sse(fmt.chunk([choice]))
            completion_tokens = 0
            async for e in events:
                if isinstance(e, TokenEvent):
                    choice = fmt.token(e)
                else:
                    choice = fmt.finish(e)
                    completion_tokens += e.completion_tokens
                if choice is not None:
                    yield sse(fmt.chunk([choice]))
            if include_usage:
                yield sse(fmt.chunk([], usage=usage(prompt_tokens, completion_tokens)))
        except ClientGone:
            status = CLIENT_GONE
            return
        except Exception as e:  # the 200 is sent: the error can only be told in the stream
            log.exception("a stream failed after its 200")
            error = APIError.of(e)
            status = str(error.status)
            yield sse(error.body())
        yield sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):  # the server noticed the client leave first
        status = CLIENT_GONE
        raise
    finally:
        count(status)
