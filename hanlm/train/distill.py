"""Distillation from an n-gram: the Kneser-Ney model's next-token distribution as a soft target beside the
data (Hinton et al. 2015, "Distilling the knowledge in a neural network").

The counted model knows, from the first step, how every context's continuations are spread over the
vocabulary; a network that has read its training text once or twice has not learnt that yet. Mixing the
n-gram's distribution into the target (`train.distill_weight`) hands it that knowledge, the way label
smoothing would with a uniform one (data noising as smoothing, Xie et al. 2017, draws on the same
Kneser-Ney statistics). The n-gram is counted on the train split when the run starts (seconds); each
batch's targets are its `train.distill_top_k` most likely tokens per position with their probabilities
(what it spreads beyond them stays with the data's token), so that the loss reads k more logits per
position and never a second (positions × vocabulary) array.
"""

from __future__ import annotations

import time

import numpy as np
from torch import Tensor

from hanlm.models.loss import SoftTargets
from hanlm.models.ngram import NGramLM, estimate


class NGramTeacher:
    """Soft targets from an n-gram counted on the training tokens."""

    def __init__(self, model: NGramLM, weight: float, top_k: int, seconds: float = 0.0):
        self.model, self.weight, self.top_k, self.seconds = model, weight, top_k, seconds

    @classmethod
    def count(cls, train: np.ndarray, vocab_size: int, order: int, weight: float, top_k: int) -> NGramTeacher:
        """Count and estimate the teacher on the train split's tokens."""
        started = time.perf_counter()
        model, _ = estimate(np.asarray(train), vocab_size, order)
        return cls(model, weight, min(top_k, vocab_size), time.perf_counter() - started)

    def targets(self, x: Tensor) -> SoftTargets:
        """The teacher's top-k next tokens and their probabilities after each position of x (B, T): each window
        is read from its own start, as the network reads it."""
        ids, top = self.model.top_next(x, self.top_k)
        return SoftTargets(ids, top.exp(), self.weight)

    def summary(self) -> str:
        counts = " / ".join(f"{c:,}" for c in self.model.counts())
        return (f"distillation: a {self.model.order}-gram teacher ({counts} n-grams, counted in {self.seconds:.1f} s), "
                f"its top {self.top_k} tokens per position at weight {self.weight}")
