"""Sampling the next token from next-token log-probabilities: temperature, top-k, top-p, greedy, one row
or a batch of rows each with its own settings. Shared by `generate`, speculative verification and the
server's engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hanlm.config import GenerateConfig


@dataclass
class SamplingParams:
    max_tokens: int = 60
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    @classmethod
    def from_config(cls, g: GenerateConfig, **overrides: Any) -> SamplingParams:
        """The `generate.*` settings, with each override that is not None taking a key's place."""
        values = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
                  "seed": g.seed}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# A temperature or top_p below this samples greedily, as temperature 0 does (vLLM's rule for the
# temperature): that is what sampling tends to as either falls, and tiny ones break in float32
# (log-probabilities over the temperature overflow, a top_p flushed to 0 drops every token).
GREEDY_BELOW = 1e-5


def sample(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from next-token log-probabilities (B, V)."""
    if min(params.temperature, params.top_p) < GREEDY_BELOW:
        return logprobs.argmax(-1)
    logits = filter_logits(logprobs / params.temperature, params.top_k, params.top_p)
    uniforms = torch.rand(logprobs.size(0), generator=generator, device=logprobs.device)
    return _inverse_cdf(logits.softmax(-1), uniforms)


def sample_rows(logprobs: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next tokens for B rows (B, V) that each have their own settings and generator, in a few batched
    ops (the server samples all its sequences at once): rows with the same settings are filtered
    together, and each draws its one uniform from its own generator, as `sample` draws it."""
    out = [0] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        # index_select, not logprobs[ids]: advanced indexing runs in a parallel region, whose threads can wait
        # a whole scheduler slice on shared cores (8 ms measured on 2 busy cores, against 3 µs)
        picked = logprobs.index_select(0, torch.tensor(rows, device=logprobs.device))
        if min(temperature, top_p) < GREEDY_BELOW:
            tokens = picked.argmax(-1)
        else:
            uniforms = torch.cat([torch.rand(1, generator=generators[i], device=logprobs.device) for i in rows])
            tokens = _inverse_cdf(filter_logits(picked / temperature, top_k, top_p).softmax(-1), uniforms)
        for i, token in zip(rows, tokens.tolist()):
            out[i] = token
    return out


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row (B, V) whose cumulative probability first passes its uniform (B,) in [0, 1):
    exact sampling, one random number per token, never a token of probability 0."""
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return at.clamp(max=probs.size(-1) - 1)
