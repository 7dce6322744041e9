"""Weight averaging: an exponential moving average of the trained weights (Polyak & Juditsky 1992).

The average of the last few thousand steps' weights generalises better than the weights of the last
step, which carry the noise of the last batches (the `ema` lever of the recipe study measures it).
`train.ema_decay` d keeps, after step t,

    ema_t = β_t · ema_{t−1} + (1 − β_t) · w_t,   β_t = min(d, (1 + t) / (10 + t))

so that the first steps' random weights are forgotten quickly (the warm-up TensorFlow's
ExponentialMovingAverage uses with `num_updates`). Evaluation, checkpoints' model weights, samples and
everything loaded from them use the average; the live weights go into the training state, so that a
resume continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hanlm.errors import CheckpointError


def ema_beta(decay: float, step: int) -> float:
    """The share of the old average kept at optimizer step `step` (1-based)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class WeightAverage:
    """The moving average of `model`'s floating-point parameters (buffers are not averaged: they are not
    trained)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = model, decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after optimizer step `step` into the average."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - ema_beta(self.decay, step))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters for the duration (evaluate, save, sample), the live weights
        back afterwards, bit for bit."""
        live = self._swap(self.average)
        try:
            yield
        finally:
            self._swap(live)

    @torch.no_grad()
    def _swap(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy `values` into the parameters; return what they held."""
        held = [p.detach().clone() for p in self.params]
        for p, v in zip(self.params, values, strict=True):
            p.copy_(v)
        return held

    def live_state(self) -> dict[str, torch.Tensor]:
        """The live weights by name (the checkpoint's model file holds the average)."""
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    @torch.no_grad()
    def resume(self, live: dict[str, torch.Tensor], source: str) -> None:
        """After a checkpoint's weights (the average) were loaded into the model: take them as the average
        and put the live weights saved in the training state back into the model."""
        if sorted(live) != sorted(self.names):
            raise CheckpointError(f"{source}: the saved live weights do not match this model's parameters; resume "
                                  "with the config the run started with")
        for name, p in zip(self.names, self.params, strict=True):  # all checked before any is copied
            if live[name].shape != p.shape:
                raise CheckpointError(f"{source}: the saved live weight {name} has shape {tuple(live[name].shape)}, "
                                      f"this model {tuple(p.shape)}")
        for name, p, avg in zip(self.names, self.params, self.average, strict=True):
            avg.copy_(p)
            p.copy_(live[name])
