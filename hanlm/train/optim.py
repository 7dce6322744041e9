"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from hanlm.config import Config

# Modules whose weights are scales or lookups, not projections: decaying them towards zero only hurts.
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on projection matrices only (not on norms, biases or embeddings).

    Uses the fused kernel on CUDA and the multi-tensor (foreach) one elsewhere.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NO_DECAY_MODULES) or name == "bias" or p.ndim < 2:
                no_decay.add(id(p))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]
    cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.derived.lr,
                             betas=(cfg.train.beta1, cfg.train.beta2),
                             **({"fused": True} if cuda else {"foreach": True}))


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine decay or
    warmup-stable-decay down to min_lr_ratio × the peak."""
    d, t = cfg.derived, cfg.train
    peak, floor = d.lr, d.lr * t.min_lr_ratio
    if step < d.warmup_steps:
        return peak * (step + 1) / d.warmup_steps
    if t.schedule == "cosine":
        progress = (step - d.warmup_steps) / max(1, d.max_steps - d.warmup_steps)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = d.max_steps - max(1, round(t.decay_frac * d.max_steps))
    if step < decay_start:
        return peak
    return peak - (peak - floor) * min(1.0, (step - decay_start + 1) / (d.max_steps - decay_start))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
