"""The model worker: one thread that decodes every active sequence together (continuous batching).

Requests wait in a bounded queue. Between decoding steps the worker admits waiting requests while
fewer than `max_batch` sequences run: it prefills their prompts — at most `prefill_chunk` prompt
tokens per step, so that a long prompt is prefilled a chunk at a time between the running sequences'
steps instead of stalling them — starting from the longest cached prefix of each (`PrefixCache`),
and a prompt's `n` choices share its state. Then it samples one token for every running sequence
and advances all that continue in one step of the model's decoding batch (`LanguageModel.decode_batch`:
for the GPT one preallocated cache the rows write in place; compiled under `compile`). Finished and
cancelled sequences leave at once.

Results go back to the asyncio side as events on each request's queue, put there thread-safely.
"""

from __future__ import annotations

import asyncio
import sys
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
from hanlm.serve.prefix_cache import PrefixCache
from hanlm.serve.protocol import MAX_CHOICES
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
class _Prefill:
    """A prompt being prefilled, `done` of its tokens so far (from a cached prefix, then chunk by chunk)."""

    request: Request
    state: Any
    done: int
    logp: torch.Tensor | None = None  # (V,) after the last prefilled token
    scores: list[float] = field(default_factory=list)  # prompt log-probabilities, when the request asks


@dataclass
class _Sequence:
    request: Request
    index: int
    logp: torch.Tensor  # (V,) next-token log-probabilities
    generator: torch.Generator | None
    stream: TextStream
    limit: int
    generated: int = 0
    last_emit: float = 0.0
    pending: int | None = None  # speculating: the last emitted token, which the state does not hold yet
    draft: DraftLength | None = None


class Engine:
    """Continuous batching over one model; `start()` launches the worker thread. `prefill_chunk` prompt tokens
    are prefilled per step at most (0: whole prompts), `prefix_cache_tokens` tokens of prefilled prompts are
    kept for reuse (0: none), and `compile` compiles the decoding step."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, *, max_batch: int = 16, max_queue: int = 256,
                 metrics: Metrics | None = None, speculation: Speculation | None = None, compile: bool = False,
                 prefill_chunk: int = 0, prefix_cache_tokens: int = 0):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.device  # once: the property walks the parameters, and every step needs it
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.speculation = speculation  # its drafter serves every sequence; each has its own draft length
        # Row i holds _running[i]. A request's n choices start together even beyond max_batch when nothing else runs.
        self.batch = model.decode_batch(max(max_batch, MAX_CHOICES), compile=compile)
        self.compiled = compile
        self.prefill_chunk = prefill_chunk
        self.prefixes = PrefixCache(model, prefix_cache_tokens) if prefix_cache_tokens else None
        self.lock = threading.Lock()  # held while the model computes: the worker's steps, /v1/score
        self._waiting: deque[Request] = deque()
        self._running: list[_Sequence] = []
        self._prefilling: _Prefill | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="hanlm-engine", daemon=True)

    # -- the asyncio side --------------------------------------------------------------------

    def start(self) -> None:
        """Compile the decoding step first when asked (the server reports ready after), then start the worker."""
        if self.compiled:
            self._warm_up()
        self._thread.start()

    def _warm_up(self) -> None:
        """Steps of one and of two rows (and of a few tokens per row, when speculating) on a throwaway prompt, so
        that the compiled step exists for any batch before the first request; the seconds go to stderr and to
        the metric hanlm_compile_seconds."""
        with self.lock, torch.no_grad():
            logp, state = self.model.log_probs(torch.tensor([[self.tokenizer.eos_id]], device=self.device),
                                               self.model.initial_state(1))
            widths = (1, 2, 3) if self.speculation is not None else (1,)
            for rows in (1, 2):
                while len(self.batch) < rows:
                    self.batch.admit(state, 1)
                for width in widths:
                    self.batch.step(torch.full((rows, width), self.tokenizer.eos_id, device=self.device))
                    for row in range(rows):
                        self.batch.cut(row, 0)
            self.batch.keep([])
        self.metrics.compile_seconds.set(self.batch.compile_seconds)
        print(f"hanlm: compiled the decoding step in {self.batch.compile_seconds:.1f} s", file=sys.stderr, flush=True)

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
                while not self._stop and not self._waiting and not self._running and self._prefilling is None:
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
                self.batch.keep([])
            self._flush()
            self.metrics.running.set(len(self._running))

    def _admit(self) -> None:
        """Prefill waiting prompts, at most `prefill_chunk` tokens of them this step, while the batch has room."""
        budget = self.prefill_chunk or 1 << 62
        while budget > 0:
            if self._prefilling is None:
                request = self._next_request()
                if request is None:
                    return
                self._prefilling = self._start_prefill(request)
            p = self._prefilling
            if p.request.cancelled.is_set():
                self.metrics.cancelled.inc()
                self._prefilling = None
                continue
            try:
                budget -= self._prefill_chunk(p, budget)
                if p.done == len(p.request.prompt_ids):
                    self._prefilling = None
                    self._start_sequences(p)
            except Exception as e:  # this request fails; the others go on
                self._prefilling = None
                self._send(p.request, ErrorEvent(f"prefill failed: {type(e).__name__}: {e}"))

    def _next_request(self) -> Request | None:
        """The first waiting request that is still wanted, if its choices fit beside the running sequences."""
        with self._wake:
            while self._waiting and self._waiting[0].cancelled.is_set():
                self._waiting.popleft()
                self.metrics.cancelled.inc()
            if not self._waiting or (self._running and len(self._running) + self._waiting[0].n > self.max_batch):
                self.metrics.waiting.set(len(self._waiting))
                return None
            request = self._waiting.popleft()
            self.metrics.waiting.set(len(self._waiting))
            return request

    def _start_prefill(self, request: Request) -> _Prefill:
        """The request's prefill, from its longest cached prefix (not when it asks for the prompt's own
        log-probabilities, which the cache does not keep)."""
        if self.prefixes is None or request.prompt_logprobs:
            return _Prefill(request, self.model.initial_state(1), 0)
        found = self.prefixes.lookup(request.prompt_ids)
        if found.state is None:
            return _Prefill(request, self.model.initial_state(1), 0)
        self.metrics.prefix_tokens.inc(found.length)
        return _Prefill(request, found.state, found.length, found.logp)

    def _prefill_chunk(self, p: _Prefill, budget: int) -> int:
        """Prefill up to `budget` more of the prompt's tokens; how many it did."""
        ids = p.request.prompt_ids
        take = min(budget, len(ids) - p.done)
        if take == 0:
            return 0
        chunk = torch.tensor([ids[p.done:p.done + take]], device=self.device)
        logp, p.state = self.model.log_probs(chunk, p.state)
        if p.request.prompt_logprobs:
            following = torch.tensor(ids[p.done + 1:p.done + take + 1], device=logp.device)
            p.scores += logp[0, :len(following)].gather(-1, following[:, None]).squeeze(-1).tolist()
        p.done += take
        p.logp = logp[0, -1]
        if p.done == len(ids) and self.prefixes is not None and not p.request.prompt_logprobs:
            self.prefixes.add(ids, p.state, p.logp)
        return take

    def _start_sequences(self, p: _Prefill) -> None:
        """The prefilled request's `n` choices join the batch."""
        request = p.request
        if request.prompt_logprobs:
            request.prompt_scores = p.scores
        limit = request.params.max_tokens
        if self.model.context_length is not None:
            limit = min(limit, self.model.context_length - len(request.prompt_ids))
        self.metrics.prompt_tokens.inc(len(request.prompt_ids) - 1)
        seed = request.params.seed
        for i in range(request.n):
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(seed + i)
            draft = None if self.speculation is None else DraftLength(self.speculation.k, self.speculation.adaptive)
            self.batch.admit(p.state, len(request.prompt_ids))
            self._running.append(_Sequence(request, request.first_index + i, p.logp, generator,
                                           TextStream(self.tokenizer, request.params.stop), limit, draft=draft))

    def _step(self) -> None:
        """Sample a token for every running sequence, then advance those that continue."""
        live = self._live()
        rows = [self._running[i] for i in live]
        kept = []
        if rows:
            logps = torch.stack([s.logp for s in rows]).float()
            tokens = sample_rows(logps, [s.request.params for s in rows], [s.generator for s in rows])
            kept = [i for i, token, logp in zip(live, tokens, logps) if self._emit(self._running[i], token, logp)]
        self._keep(kept)
        if self._running:
            tokens = torch.tensor([[s.stream.ids[-1]] for s in self._running], device=self.device)
            for seq, row in zip(self._running, self.batch.step(tokens)[:, -1]):
                seq.logp = row

    def _speculative_step(self) -> None:
        """Every running sequence's pending token and its drafts in one batch step; each row keeps the drafts
        the rule accepts (hanlm.speculative), emits them and one token of the model's, and is cut back to them."""
        kept = []
        for i in self._live():
            seq = self._running[i]
            if seq.pending is None:  # just prefilled: its first token comes from the prompt's distribution
                logp = seq.logp.float()
                token = int(sample(logp[None], seq.request.params, seq.generator)[0])
                if not self._emit(seq, token, logp):
                    continue
                seq.pending = token
            kept.append(i)
        self._keep(kept)
        rows = self._running
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
                              device=self.device)
        logp = self.batch.step(tokens)
        kept = []
        for b, (seq, draft) in enumerate(zip(rows, drafts)):
            out = accept(logp[b, :len(draft) + 1], draft, seq.request.params, seq.generator)
            self.batch.cut(b, len(out))
            seq.draft.update(len(draft), len(out) - 1)
            self.metrics.draft_tokens.inc(len(draft))
            self.metrics.draft_accepted.inc(len(out) - 1)
            if all(self._emit(seq, token, logp[b, i].float()) for i, token in enumerate(out)):
                seq.pending = out[-1]
                kept.append(b)
        self._keep(kept)

    def _keep(self, rows: list[int]) -> None:
        """Only these running sequences (increasing indices) go on, in the batch too."""
        self._running = [self._running[i] for i in rows]
        self.batch.keep(rows)

    def _live(self) -> list[int]:
        """The indices of the running sequences still wanted; those cancelled or out of tokens leave (finished)."""
        live = []
        for i, seq in enumerate(self._running):
            if seq.request.cancelled.is_set():
                self.metrics.cancelled.inc()
            elif seq.limit <= 0:
                self._finish(seq, "length")
            else:
                live.append(i)
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
