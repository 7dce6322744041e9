"""Speculative decoding: a cheap draft proposes k tokens, the model checks them all in one forward.

At batch 1 on a CPU each forward streams every weight once, so scoring the pending token and k
drafted ones costs little more than scoring one. The model's distributions after each of them
decide how many drafts to keep (Leviathan et al. 2023, "Fast inference from transformers via
speculative decoding"), and its state is rewound past the first rejected one.

The drafts here are deterministic — the n-gram model's greedy continuation, or the tokens that
followed the latest earlier occurrence of the context's last few tokens (prompt lookup, vLLM's
"ngram" mode) — so the proposal distribution q is a point mass on the drafted token x. The
rejection rule then reads: keep x with probability p(x); on rejection, sample from p with x
removed (max(p − q, 0), renormalised); after k kept drafts, sample one more token from the last
distribution. The emitted tokens are distributed exactly as the model's own samples. Greedy
decoding keeps a draft when it is the argmax, so its output is the model's greedy output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from hanlm.errors import ConfigError
from hanlm.loading import load_for_inference
from hanlm.models.base import DecodeBatch
from hanlm.models.ngram import NGramLM
from hanlm.sampling import GREEDY_BELOW, filter_logits, sample

MODES = ("none", "ngram", "prompt")
MAX_DRAFT = 64


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that may follow `context` (fewer, or none, when it has no guess)."""


class PromptLookup:
    """Drafts the tokens that followed an earlier occurrence of the context's last n tokens, trying
    n = max_ngram down to min_ngram: free, and good wherever text repeats itself."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = np.asarray(context, dtype=np.int64)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(ctx) <= n:
                continue
            # Windows that start before the tail itself and are followed by at least one token.
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)
            starts = np.flatnonzero((windows == ctx[-n:]).all(axis=1)) + n
            if len(starts):
                # The latest occurrence with k tokens after it, else the earliest (the most after it): in a
                # loop, the latest one ends where the tail begins and offers only a token or two.
                full = starts[starts + k <= len(ctx)]
                start = int(full[-1] if len(full) else starts[0])
                return ctx[start:start + k].tolist()
        return []


class NGramDraft:
    """Drafts the n-gram model's greedy continuation; it must share the model's vocabulary. Its answers
    are remembered per context (greedy text revisits contexts often), up to `memory` of them."""

    def __init__(self, ngram: NGramLM, memory: int = 1 << 16):
        self.ngram, self.memory = ngram, memory
        self.history = max(ngram.order - 1, 0)
        self._best: dict[tuple[int, ...], int] = {}

    def next_token(self, context: Sequence[int]) -> int:
        key = tuple(context[len(context) - self.history:]) if self.history else ()
        best = self._best.get(key)
        if best is None:
            if len(self._best) >= self.memory:
                self._best.clear()
            best = self._best[key] = int(self.ngram.next_log10(key).argmax())
        return best

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ctx = list(context[len(context) - self.history:])
        out = []
        for _ in range(k):
            out.append(self.next_token(ctx))
            ctx = ctx[1:] + out[-1:] if len(ctx) >= self.history else ctx + out[-1:]
        return out


@dataclass
class DraftStats:
    """What speculation did: forwards of the model, drafted and kept tokens, seconds in the draft."""

    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    draft_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "draft_s": self.draft_s}


@dataclass
class Speculation:
    """How `generate` speculates: the drafter, at most `k` drafts per forward (`adaptive`: see
    DraftLength), and the counts it keeps."""

    drafter: Drafter
    k: int = 4
    adaptive: bool = True
    stats: DraftStats = field(default_factory=DraftStats)


def accept(logp: torch.Tensor, draft: Sequence[int], params, generator: torch.Generator | None) -> list[int]:
    """The tokens to emit after one verifying forward: the kept prefix of `draft`, then one token of
    the model's (a correction, or after every draft a bonus). `logp` (len(draft) + 1, V) holds the
    model's next-token log-probabilities after the pending token and after each draft."""
    if min(params.temperature, params.top_p) < GREEDY_BELOW:
        best = logp.argmax(-1).tolist()
        kept = next((i for i, (b, d) in enumerate(zip(best, draft)) if b != d), len(draft))
        return [*draft[:kept], best[kept]]
    probs = filter_logits(logp.float() / params.temperature, params.top_k, params.top_p).softmax(-1)
    uniforms = torch.rand(len(draft), generator=generator, device=logp.device).tolist()
    for i, (d, u) in enumerate(zip(draft, uniforms)):
        if u < float(probs[i, d]):
            continue
        residual = probs[i].clone()
        residual[d] = 0.0  # p(d) < 1 here, so something is left
        return [*draft[:i], int(torch.multinomial(residual, 1, generator=generator))]
    return [*draft, int(torch.multinomial(probs[-1], 1, generator=generator))]


class DraftLength:
    """k for the next step: fixed, or (adaptive) grown by one after every draft was kept and halved
    after the first was rejected, within 1 … k_max."""

    def __init__(self, k_max: int, adaptive: bool):
        self.k_max, self.adaptive, self.k = k_max, adaptive, k_max

    def update(self, proposed: int, kept: int) -> None:
        if self.adaptive and proposed:
            self.k = min(self.k_max, self.k + 1) if kept == proposed else max(1, self.k // 2) if kept == 0 else self.k


def speculative_tokens(batch: DecodeBatch, ids: list[int], logp: torch.Tensor, drafter: Drafter,
                       length: DraftLength, params, generator: torch.Generator | None, limit: int,
                       stats: DraftStats, context_length: int | None) -> Iterator[int]:
    """The continuation of `ids`, whose state is the one row of `batch`, one token at a time, checked
    `length.k` drafted tokens per forward. `logp` (1, V) is the model's after `ids`; at most `limit` tokens
    come out. The caller may stop early (an `<eos>`, a stop string)."""
    context = list(ids)
    pending = [int(sample(logp.float(), params, generator))]
    while True:
        yield from pending
        context += pending
        room = limit - (len(context) - len(ids)) - 1  # emitted tokens never pass the limit
        if context_length is not None:  # the state holds all of context but its last token
            room = min(room, context_length - len(context))
        if room < 0:
            return
        started = time.perf_counter()
        draft = drafter.propose(context, min(length.k, room))
        stats.draft_s += time.perf_counter() - started
        all_logp = batch.step(torch.tensor([[context[-1], *draft]], device=logp.device))
        pending = accept(all_logp[0], draft, params, generator)
        kept = len(pending) - 1
        batch.cut(0, kept + 1)
        stats.steps += 1
        stats.proposed += len(draft)
        stats.accepted += kept
        length.update(len(draft), kept)


def load_drafter(mode: str, draft_model: str | None, tokenizer) -> Drafter | None:
    """The drafter `generate.speculative` names (None for `none`); an `ngram` draft is loaded from
    `draft_model` and must have `tokenizer`'s vocabulary."""
    if mode == "none":
        return None
    if mode == "prompt":
        return PromptLookup()
    if mode != "ngram":
        raise ConfigError(f"generate.speculative {mode!r}: choose one of {', '.join(MODES)}")
    if not draft_model:
        raise ConfigError("generate.speculative ngram needs generate.draft_model: an n-gram checkpoint or ARPA "
                          "file over the model's tokenizer (hanlm train with model.arch=ngram writes one)")
    ngram, _, draft_tokenizer = load_for_inference(draft_model)
    if not isinstance(ngram, NGramLM):
        raise ConfigError(f"generate.draft_model {draft_model}: an ngram draft is an n-gram model, not "
                          f"{type(ngram).__name__}")
    if draft_tokenizer.token_strings() != tokenizer.token_strings():
        raise ConfigError(f"generate.draft_model {draft_model}: its tokenizer ({draft_tokenizer.vocab_size} "
                          f"tokens) is not the model's ({tokenizer.vocab_size}); count the n-gram over the same "
                          "prepared data")
    return NGramDraft(ngram)


def speculation_from_config(g, tokenizer, mode: str | None = None, draft_model: str | None = None,
                            k: int | None = None) -> Speculation | None:
    """The `generate.speculative` / `draft_*` settings (a GenerateConfig `g`), each argument that is not
    None taking its key's place; None when speculation is off."""
    k = g.draft_tokens if k is None else k
    if not 1 <= k <= MAX_DRAFT:  # the key's own bounds, for --draft-tokens too
        raise ConfigError(f"generate.draft_tokens {k}: draft between 1 and {MAX_DRAFT} tokens per forward")
    drafter = load_drafter(mode or g.speculative, draft_model or g.draft_model, tokenizer)
    return None if drafter is None else Speculation(drafter, k=k, adaptive=g.draft_adaptive)
