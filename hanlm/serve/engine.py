"""The model worker: one thread that decodes every active sequence together (continuous batching).

Requests wait in a bounded queue. Between decoding steps the worker admits waiting requests
(prefilling each prompt once; its `n` choices share that state) while fewer than `max_batch`
sequences run, samples one token for every running sequence, and advances all that continue in
one `model.decode_step`. Finished and cancelled sequences leave at once. Each sequence keeps its
own state (the GPT's KV cache, the LSTM's hidden state, the n-gram's context).

Results go back to the asyncio side as events on each request's queue, put there thread-safely.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from hanlm.data.tokenizer import Tokenizer
from hanlm.generate import TextStream
from hanlm.sampling import SamplingParams, sample, sample_rows
from hanlm.models.base import LanguageModel
from hanlm.serve.metrics import Metrics
from hanlm.speculative import DraftLength, Speculation, accept


class QueueFull(Exception):
    """The queue has no room for the requests now."""


@dataclass
class TokenEvent:
    index: int  # the choice
    text: str  # text that became ready (may be empty: a character still incomplete)
    token: int
    logprob: float
    top: dict[int, float] | None  # the most likely tokens and their log-probabilities, when asked


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int
    text: str  # the rest of the text held back until now


@dataclass
class ErrorEvent:
    message: str


@dataclass
class Request:
    """A prompt to continue `n` times; events arrive on `events` in the submitting event loop."""

    prompt_ids: list[int]  # <eos> first, then the prompt
    params: SamplingParams
    n: int = 1
    first_index: int = 0  # choice numbers are first_index … first_index + n − 1
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    prompt_scores: list[float] | None = None  # log p of each prompt token after the first, when asked

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Sequence:
    request: Request
    index: int
    state: Any
    logp: torch.Tensor  # (V,) next-token log-probabilities
    generator: torch.Generator | None
    stream: TextStream
    limit: int
    generated: int = 0
    last_emit: float = 0.0
    pending: int | None = None  # speculating: the last emitted token, which the state does not hold yet
    draft: DraftLength | None = None


class Engine:
    """Continuous batching over one model; `start()` launches the worker thread."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 256,
                 metrics: Metrics | None = None, speculation: Speculation | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.speculation = speculation  # its drafter serves every sequence; each has its own draft length
        self.lock = threading.Lock()  # held while the model computes: the worker's steps, /v1/score
        self._waiting: deque[Request] = deque()
        self._running: list[_Sequence] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="hanlm-engine", daemon=True)

    # -- the asyncio side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, requests: list[Request]) -> None:
        """Queue the requests, all or none: QueueFull when fewer than len(requests) places are free."""
        loop = asyncio.get_running_loop()
        for request in requests:
            request.loop = loop
        with self._wake:
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull
            self._waiting.extend(requests)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    @property
    def running(self) -> int:
        return len(self._running)

    # -- the worker thread -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                with self.lock, torch.no_grad():
                    self._admit()
                    self._step() if self.speculation is None else self._speculative_step()
            except Exception as e:  # a model failure ends the affected requests, not the server
                for seq in self._running:
                    self._send(seq.request, ErrorEvent(f"generation failed: {type(e).__name__}: {e}"))
                self._running.clear()
            self._flush()
            self.metrics.running.set(len(self._running))

    def _admit(self) -> None:
        while True:
            with self._wake:
                while self._waiting and self._waiting[0].cancelled.is_set():
                    self._waiting.popleft()
                    self.metrics.cancelled.inc()
                if not self._waiting or (self._running and len(self._running) + self._waiting[0].n > self.max_batch):
                    self.metrics.waiting.set(len(self._waiting))
                    return
                request = self._waiting.popleft()
                self.metrics.waiting.set(len(self._waiting))
            try:
                self._prefill(request)
            except Exception as e:  # this request fails; the others go on
                self._send(request, ErrorEvent(f"prefill failed: {type(e).__name__}: {e}"))

    def _prefill(self, request: Request) -> None:
        ids = torch.tensor([request.prompt_ids], device=self.model.device)
        logp, state = self.model.log_probs(ids, self.model.initial_state(1))
        if request.prompt_logprobs:
            picked = logp[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
            request.prompt_scores = picked.tolist()
        limit = request.params.max_tokens
        if self.model.context_length is not None:
            limit = min(limit, self.model.context_length - len(request.prompt_ids))
        self.metrics.prompt_tokens.inc(len(request.prompt_ids) - 1)
        seed = request.params.seed
        for i in range(request.n):
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(seed + i)
            draft = None if self.speculation is None else DraftLength(self.speculation.k, self.speculation.adaptive)
            self._running.append(_Sequence(request, request.first_index + i, state, logp[0, -1], generator,
                                           TextStream(self.tokenizer, request.params.stop), limit, draft=draft))

    def _step(self) -> None:
        """Sample a token for every running sequence, then advance those that continue."""
        continuing: list[_Sequence] = []
        live = self._live()
        if live:
            rows = torch.stack([s.logp for s in live]).float()
            tokens = sample_rows(rows, [s.request.params for s in live], [s.generator for s in live])
            continuing = [seq for seq, token, logp in zip(live, tokens, rows) if self._emit(seq, token, logp)]
        self._running = continuing
        if continuing:
            tokens = torch.tensor([s.stream.ids[-1] for s in continuing], device=self.model.device)
            logp, states = self.model.decode_step(tokens, [s.state for s in continuing])
            for seq, row, state in zip(continuing, logp, states):
                seq.logp, seq.state = row, state

    def _speculative_step(self) -> None:
        """Every running sequence's pending token and its drafts in one `decode_steps`; each row keeps
        the drafts the rule accepts (hanlm.speculative), emits them and one token of the model's, and
        has its state cut back to them."""
        rows: list[_Sequence] = []
        for seq in self._live():
            if seq.pending is None:  # just prefilled: its first token comes from the prompt's distribution
                logp = seq.logp.float()
                token = int(sample(logp[None], seq.request.params, seq.generator)[0])
                if not self._emit(seq, token, logp):
                    continue
                seq.pending = token
            rows.append(seq)
        self._running = rows
        if not rows:
            return
        # The batch shares one width, so no row's padded tokens may pass its context; its own drafts stay
        # within its token budget.
        context = self.model.context_length
        shared = min(context - len(s.request.prompt_ids) - s.generated for s in rows) if context else 1 << 30
        started = time.perf_counter()
        drafts = []
        for s in rows:
            room = min(s.draft.k, shared, s.limit - s.generated - 1)
            drafts.append(self.speculation.drafter.propose(s.request.prompt_ids + s.stream.ids, room)
                          if room > 0 else [])
        self.metrics.draft_seconds.inc(time.perf_counter() - started)
        width = 1 + max(len(d) for d in drafts)
        tokens = torch.tensor([[s.pending, *d, *[s.pending] * (width - 1 - len(d))] for s, d in zip(rows, drafts)],
                              device=self.model.device)
        logp, after = self.model.decode_steps(tokens, [s.state for s in rows])
        continuing: list[_Sequence] = []
        for b, (seq, draft) in enumerate(zip(rows, drafts)):
            out = accept(logp[b, :len(draft) + 1], draft, seq.request.params, seq.generator)
            kept = len(out) - 1
            seq.state = self.model.rewound(seq.state, after[b], tokens[b:b + 1], kept + 1)
            seq.draft.update(len(draft), kept)
            self.metrics.draft_tokens.inc(len(draft))
            self.metrics.draft_accepted.inc(kept)
            if all(self._emit(seq, token, logp[b, i].float()) for i, token in enumerate(out)):
                seq.pending = out[-1]
                continuing.append(seq)
        self._running = continuing

    def _live(self) -> list[_Sequence]:
        """The running sequences still wanted; those cancelled or out of tokens leave (finished)."""
        live = []
        for seq in self._running:
            if seq.request.cancelled.is_set():
                self.metrics.cancelled.inc()
            elif seq.limit <= 0:
                self._finish(seq, "length")
            else:
                live.append(seq)
        return live

    def _emit(self, seq: _Sequence, token: int, logp: torch.Tensor) -> bool:
        """Send `token` (sampled from `logp`) to the client, or finish the sequence on it; whether it goes on."""
        if token == self.tokenizer.eos_id:
            self._finish(seq, "stop")
            return False
        seq.generated += 1
        top = None
        if seq.request.top_logprobs:
            values, ids = logp.topk(seq.request.top_logprobs)
            top = dict(zip(ids.tolist(), values.tolist()))
        self._send(seq.request, TokenEvent(seq.index, seq.stream.push(token), token, float(logp[token]), top))
        self._observe(seq)
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.limit:
            self._finish(seq, "length")
        else:
            return True
        return False

    def _observe(self, seq: _Sequence) -> None:
        now = time.monotonic()
        if seq.generated == 1:
            self.metrics.ttft.observe(now - seq.request.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_emit)
        seq.last_emit = now
        self.metrics.generation_tokens.inc()

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self._send(seq.request, FinishEvent(seq.index, reason, seq.generated, seq.stream.finish()))

    def _send(self, request: Request, event: object) -> None:
        """Hold `event` for `request` until the step ends (`_flush`)."""
        if request.loop is not None:
            self._outbox.setdefault(request.loop, []).append((request.events, event))

    def _flush(self) -> None:
        """Hand the step's events to each event loop in one call: one wake-up per loop and step, not per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, events in outbox.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)
