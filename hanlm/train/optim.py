"""Optimizers (AdamW, or Muon for the hidden matrices beside AdamW) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hanlm.config import Config

# Modules whose weights are scales or lookups, not projections: decaying them towards zero only hurts.
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped, zeroed and checkpointed as one.

    `param_groups` lists both optimizers' groups; each carries `lr_ratio`, its peak lr over
    train.lr, which `set_lr` applies, so one schedule drives both.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore both; a state saved by plain AdamW (no `muon` part) is refused by name."""
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the saved optimizer state is not Muon + AdamW (it was saved with train.optimizer "
                             "adamw?); resume with the optimizer the run started with")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def _roles(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters as (hidden matrices, other decayed, not decayed).

    Hidden matrices are the 2-D weights that map activations to activations; the embedding and the
    output head (tied or not) are lookups into the vocabulary and stay with AdamW, as do norms and biases.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NO_DECAY_MODULES) or name == "bias" or p.ndim < 2:
                no_decay.add(id(p))
    vocab = {id(getattr(model, n).weight) for n in ("tok_emb", "lm_head") if hasattr(model, n)}
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = [p for p in params if id(p) not in no_decay and id(p) not in vocab and p.ndim == 2]
    taken = {id(p) for p in hidden}
    return (hidden, [p for p in params if id(p) not in no_decay and id(p) not in taken],
            [p for p in params if id(p) in no_decay])


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW | MuonAdamW:
    """`train.optimizer`: AdamW with weight decay on projection matrices only (not on norms, biases
    or embeddings), or Muon on the hidden matrices with AdamW on the rest.

    AdamW uses the fused kernel on CUDA and the multi-tensor (foreach) one elsewhere.
    """
    t = cfg.train
    hidden, decayed, plain = _roles(model)
    cuda = next(model.parameters()).device.type == "cuda"
    kernel = {"fused": True} if cuda else {"foreach": True}
    if t.optimizer == "adamw":
        decayed, hidden = hidden + decayed, []
    groups = [{"params": decayed, "weight_decay": t.weight_decay, "lr_ratio": 1.0},
              {"params": plain, "weight_decay": 0.0, "lr_ratio": 1.0}]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.derived.lr, betas=(t.beta1, t.beta2),
                              **kernel)
    if t.optimizer == "adamw":
        return adamw
    ratio = t.muon_lr / t.lr
    muon = torch.optim.Muon([{"params": hidden, "lr_ratio": ratio}], lr=cfg.derived.lr * ratio,
                            momentum=t.muon_momentum, weight_decay=t.weight_decay, nesterov=True)
    return MuonAdamW(muon, adamw)


def lr_at(step: int, cfg: Config, elapsed_s: float | None = None) -> float:
    """Peak-relative learning rate for optimizer step `step` (0-based): linear warm-up, then cosine
    decay or warmup-stable-decay down to min_lr_ratio × the peak.

    With train.schedule_clock minutes, the progress after warm-up is the larger of the share of
    steps done and the share of max_minutes elapsed (`elapsed_s`), so a run that time stops
    still decays to the floor.
    """
    d, t = cfg.derived, cfg.train
    clock = 0.0
    if t.schedule_clock == "minutes" and t.max_minutes and elapsed_s is not None:
        clock = elapsed_s / (60 * t.max_minutes)
    return scheduled_lr(step, peak=d.lr, warmup=d.warmup_steps, total=d.max_steps, floor=d.lr * t.min_lr_ratio,
                        schedule=t.schedule, decay_frac=t.decay_frac, progress_at_least=clock)


def scheduled_lr(step: int, *, peak: float, warmup: int, total: int, floor: float, schedule: str = "cosine",
                 decay_frac: float = 0.2, progress_at_least: float = 0.0) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup`
    steps to `peak`, then cosine decay (or warmup-stable-decay with its last `decay_frac` linear) to
    `floor`. The progress after warm-up is at least `progress_at_least` (a share of a time budget)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), progress_at_least))
    if schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if progress < 1 - decay_frac:
        return peak
    return peak - (peak - floor) * min(1.0, (progress - (1 - decay_frac)) / decay_frac)


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every group's lr to `lr` × the group's `lr_ratio` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
