"""A neural model and an n-gram model mixed: p(w | h) = λ(h) p_neural(w | h) + (1 − λ(h)) p_ngram(w | h).

λ depends on how much context the n-gram knows: bucket b is the length (0 … order − 1 tokens)
of the longest context the n-gram has seen as an n-gram before the next token. A backoff model
stores no counts, so that length stands in for the context count: where the n-gram has seen the
whole context its estimate is sharp and it earns more weight; where it backs off to short
contexts the neural model should dominate. One bucket (`buckets == 1`) is plain linear
interpolation. The weights are fitted by EM on text neither part is evaluated on (`fit_weights`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hanlm.models.base import LanguageModel
from hanlm.models.ngram import NGramLM


class MixtureLM(LanguageModel):
    """Linear interpolation of a neural LanguageModel and an NGramLM over the same vocabulary.

    `weights[b]` is the neural part's weight in context bucket b (see the module docstring); with
    one weight every context shares it. The state is (neural state, n-gram state).
    """

    def __init__(self, neural: LanguageModel, ngram: NGramLM, weights: list[float]):
        super().__init__()
        if neural.vocab_size != ngram.vocab_size:
            raise ValueError(f"the neural model has {neural.vocab_size} tokens and the n-gram {ngram.vocab_size}")
        if len(weights) not in (1, ngram.order) or not all(0.0 <= w <= 1.0 for w in weights):
            raise ValueError(f"mixture weights must be 1 or {ngram.order} numbers in [0, 1], got {weights}")
        self.neural, self.ngram = neural, ngram
        self.vocab_size, self.context_length = neural.vocab_size, neural.context_length
        self.weights = list(weights)
        w = torch.tensor([self.weights[0]] * ngram.order if len(weights) == 1 else self.weights, dtype=torch.float64)
        # log λ and log(1 − λ) per bucket; log(0) = −inf drops a part where its weight is 0.
        self.register_buffer("_log_w", torch.stack([w.log(), torch.log1p(-w)]), persistent=False)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            return self.log_probs(x, self.initial_state(x.shape[0]))[0]
        picked = self.token_log_probs(x, y, self.initial_state(x.shape[0]))
        return -(picked.sum() / (y >= 0).sum()).float()

    def initial_state(self, batch_size: int = 1) -> tuple[Any, np.ndarray]:
        return self.neural.initial_state(batch_size), self.ngram.initial_state(batch_size)

    def _mix(self, neural: Tensor, ngram: Tensor, buckets: Tensor) -> Tensor:
        """log(λ_b e^neural + (1 − λ_b) e^ngram), the log weights broadcast over any trailing axis."""
        lw = self._log_w[:, buckets.to(self._log_w.device)]
        while lw.dim() < neural.dim() + 1:
            lw = lw.unsqueeze(-1)
        return torch.logaddexp(lw[0] + neural.double(), lw[1] + ngram.to(neural.device).double())

    def log_probs(self, tokens: Tensor, state: tuple[Any, np.ndarray]) -> tuple[Tensor, tuple[Any, np.ndarray]]:
        neural_state, ngram_state = state
        buckets = self._buckets(ngram_state, tokens)
        neural, neural_state = self.neural.log_probs(tokens, neural_state)
        ngram, ngram_state = self.ngram.log_probs(tokens, ngram_state)
        return self._mix(neural, ngram, buckets).float(), (neural_state, ngram_state)

    def token_log_probs(self, x: Tensor, y: Tensor, state: tuple[Any, np.ndarray]) -> Tensor:
        neural_state, ngram_state = state
        neural = self.neural.token_log_probs(x, y, neural_state)
        ngram = self.ngram.token_log_probs(x, y, ngram_state)
        return self._mix(neural, ngram, self._buckets(ngram_state, x)).masked_fill(y.to(neural.device) < 0, 0.0)

    def decode_step(self, tokens: Tensor, states: list[tuple[Any, np.ndarray]]) -> tuple[Tensor, list]:
        neural, neural_states = self.neural.decode_step(tokens, [s[0] for s in states])
        ngram, ngram_states = self.ngram.decode_step(tokens, [s[1] for s in states])
        buckets = torch.cat([self._buckets(s[1], tokens[i].view(1, 1))[0] for i, s in enumerate(states)])
        return self._mix(neural, ngram, buckets).float(), list(zip(neural_states, ngram_states))

    def _buckets(self, ngram_state: np.ndarray, tokens: Tensor) -> Tensor:
        """(B, T) bucket of each position: the n-gram's longest known context after that token."""
        t = tokens.cpu().numpy()
        rows = [self.ngram.known_context(ngram_state[b], t[b]) for b in range(t.shape[0])]
        return torch.from_numpy(np.stack(rows))

    @property
    def device(self) -> torch.device:
        return self.neural.device

    @property
    def tied(self) -> bool:
        return self.neural.tied

    def num_params(self, embeddings: bool = True) -> int:
        return self.neural.num_params(embeddings) + self.ngram.num_params()

    def flops_per_token(self, seq_len: int) -> float:
        return self.neural.flops_per_token(seq_len)


def fit_weights(neural: np.ndarray, ngram: np.ndarray, buckets: np.ndarray, n_buckets: int, *,
                iterations: int = 200, min_count: int = 100) -> tuple[list[float], list[int]]:
    """EM estimates of the neural weight λ per bucket from per-token log-probabilities (natural log)
    of held-out text. Returns the weights and the tokens each bucket had; a bucket with fewer than
    `min_count` tokens takes the weight fitted on all tokens."""
    neural, ngram = np.asarray(neural, np.float64), np.asarray(ngram, np.float64)
    shift = np.maximum(neural, ngram)  # probabilities relative to the larger: no underflow
    pn, pg = np.exp(neural - shift), np.exp(ngram - shift)
    counts = np.bincount(buckets, minlength=n_buckets).tolist()

    def em(mask: np.ndarray) -> float:
        lam = 0.5
        a, b = pn[mask], pg[mask]
        for _ in range(iterations):
            previous = lam
            lam = float(np.mean(lam * a / (lam * a + (1 - lam) * b)))
            if abs(lam - previous) < 1e-7:
                break
        return lam

    overall = em(np.ones(len(pn), dtype=bool))
    if n_buckets == 1:
        return [overall], [len(pn)]
    weights = [em(buckets == k) if counts[k] >= min_count else overall for k in range(n_buckets)]
    return weights, counts


def mixed_nats(neural: np.ndarray, ngram: np.ndarray, buckets: np.ndarray, weights: list[float]) -> float:
    """Mean negative log-likelihood (nats) of the mixture with `weights` on held-out tokens."""
    w = np.asarray(weights if len(weights) > 1 else weights * (int(buckets.max()) + 1), np.float64)[buckets]
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log(w) + neural, np.log1p(-w) + ngram)
    return float(-mixed.mean()) if len(mixed) else math.nan
