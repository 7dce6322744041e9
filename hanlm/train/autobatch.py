"""`train.micro_batch: auto`: the largest micro-batch whose training step fits in memory.

The search runs real forward + backward passes of the model on (b, block_size) batches:
doubling b from 1 until a step no longer fits, then a binary search between the last size
that fitted and the first that did not. "Fits" means the step's peak memory, plus AdamW's two
moment buffers, stays within `train.memory_fraction` of what is free: device memory on CUDA,
RAM on CPU (measured as the process's peak resident set, which Linux lets us reset).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import psutil
import torch

from hanlm.config import Config, with_micro_batch
from hanlm.errors import ConfigError
from hanlm.memory import can_reset_peak_rss, peak_rss, reset_peak_rss


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest b in [1, upper] with fits(b), for a `fits` that is true up to some size.

    Doubles from 1, then bisects: O(log upper) calls.
    """
    if not fits(1):
        raise ConfigError("train.micro_batch is auto but even one sequence does not fit in memory; lower "
                          "train.block_size or the model size, or raise train.memory_fraction")
    lo, hi = 1, None
    while hi is None:
        b = min(lo * 2, upper)
        if b == lo:
            return lo
        if fits(b):
            lo = b
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class MemoryProbe:
    """`probe(b)` runs one forward + backward of `model` on a (b, block_size) batch and says
    whether its peak memory stays within budget. `peaks` records each measurement in bytes."""

    def __init__(self, model: torch.nn.Module, block_size: int, vocab_size: int, fraction: float,
                 budget_bytes: int | None = None,
                 make_batch: Callable[[int], tuple[torch.Tensor, ...]] | None = None):
        """`make_batch(b)`: the arguments of one forward of b sequences whose result is the loss (default:
        random token ids x and targets y, each (b, block_size), for a language model)."""
        self.model, self.block_size, self.vocab_size = model, block_size, vocab_size
        self.make_batch = make_batch or self._lm_batch
        self.device = next(model.parameters()).device
        # AdamW keeps two fp32 moments per parameter; the step must leave room for them.
        self.optimizer_bytes = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        self.peaks: dict[int, int] = {}
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            base = torch.cuda.memory_allocated(self.device)
        else:
            _require_peak_rss()
            free, base = psutil.virtual_memory().available, psutil.Process().memory_info().rss
        self.budget = budget_bytes if budget_bytes is not None else base + int(fraction * free)

    def _lm_batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, self.vocab_size, (b, self.block_size), device=self.device)
        return x, torch.randint(0, self.vocab_size, (b, self.block_size), device=self.device)

    def __call__(self, b: int) -> bool:
        batch = self.make_batch(b)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        try:
            self.model(*batch).backward()
        except torch.OutOfMemoryError:
            self.peaks[b] = -1
            return False
        finally:
            self.model.zero_grad(set_to_none=True)
            del batch
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else peak_rss()
        self.peaks[b] = peak + self.optimizer_bytes
        return self.peaks[b] <= self.budget


def resolve_micro_batch(cfg: Config, model: torch.nn.Module, vocab_size: int,
                        budget_bytes: int | None = None) -> Config:
    """`cfg` with `train.micro_batch: auto` replaced by the measured size (unchanged otherwise)."""
    if cfg.train.micro_batch != "auto":
        return cfg
    probe = MemoryProbe(model, cfg.train.block_size, vocab_size, cfg.train.memory_fraction, budget_bytes)
    return with_micro_batch(cfg, largest_fitting(probe, cfg.train.micro_batch_max))


def _require_peak_rss() -> None:
    if not can_reset_peak_rss():
        raise ConfigError("train.micro_batch: auto on CPU measures peak memory through Linux /proc, which this "
                          "system lacks; set train.micro_batch to a number")
