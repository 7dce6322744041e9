"""Low-rank adaptation (LoRA; Hu et al. 2021): fine-tune a large network by training, beside each chosen frozen
projection W, a product B·A of rank r (A: r × in, B: out × r, B starting at zero, so training starts from the
pretrained function), scaled by alpha / r. Only A and B (and the task head) learn: the optimizer's state is for
them alone, which is what makes a network that does not fit full fine-tuning fit.

A hand-written module rather than the `peft` library: hanlm's projections are plain `nn.Linear` layers with
hanlm's own names (the fused `qkv`, `proj`, `gate`, `up`, `down`), its checkpoints are state dicts under
those names, and its trainers wrap models in DDP themselves. A `LoRALinear` keeps the frozen weight under the
name it had (`…qkv.weight`), so pretrained weights load into it unchanged, and adds `lora_a`, `lora_b` and
its `lora_scale`; `merged_state_dict` folds B·A into W, giving the plain network's state dict (export, and
any loader that knows nothing of LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanlm.config import Config
from hanlm.errors import ConfigError

TARGETS = ("qkv", "proj", "gate", "up", "down")  # the transformer block's projections, by their module names
SUFFIXES = (".lora_a", ".lora_b", ".lora_scale")


class LoRALinear(nn.Module):
    """y = x Wᵀ (+ b) + scale · x Aᵀ Bᵀ, with W (and b) frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.register_buffer("lora_scale", torch.tensor(alpha / rank))

    @property
    def in_features(self) -> int:
        return self.weight.size(1)

    @property
    def out_features(self) -> int:
        return self.weight.size(0)

    def forward(self, x: Tensor) -> Tensor:
        low = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.lora_scale.to(low.dtype) * low


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = TARGETS) -> int:
    """Replace every `nn.Linear` of `model` whose own name is in `targets` by a `LoRALinear`, and freeze every
    other parameter of `model`; returns how many were replaced."""
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                replaced += 1
    return replaced


def adapted(backbone: nn.Module, cfg: Config, rank: int | None = None) -> nn.Module:
    """`backbone` with LoRA of `rank` (default finetune.lora_rank; hanlm train passes train.lora_rank) on
    finetune.lora_targets when it is above 0 (its other weights frozen), else as it is: the one place networks
    get it, so a checkpoint rebuilds the shape it was trained in."""
    ft = cfg.finetune
    rank = ft.lora_rank if rank is None else rank
    if not rank:
        return backbone
    if cfg.model.arch not in ("gpt", "encoder", "bert"):
        raise ConfigError(f"LoRA (finetune.lora_rank, train.lora_rank) adapts a transformer's projections; "
                          f"model.arch {cfg.model.arch} has none: set the rank to 0")
    add_lora(backbone, rank, ft.lora_alpha, ft.lora_targets)
    return backbone


def has_lora(weights: dict[str, Tensor]) -> bool:
    """Whether a state dict holds LoRA updates (a network trained with them, before `merged_state_dict`)."""
    return any(k.endswith(".lora_a") for k in weights)


def merged_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with each LoRA projection's W + scale · B·A in place of W and its LoRA tensors gone."""
    out = {k: v for k, v in state.items() if not k.endswith(SUFFIXES)}
    for key in state:
        if key.endswith(".lora_a"):
            stem = key[: -len(".lora_a")]
            a, b, scale = state[key], state[stem + ".lora_b"], state[stem + ".lora_scale"]
            w = out[stem + ".weight"]
            out[stem + ".weight"] = (w.float() + scale.float() * (b.float() @ a.float())).to(w.dtype)
    return out


def with_own_lora(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pretrained `weights` plus `model`'s own (fresh) LoRA tensors: what loads a plain network's weights into its
    adapted form, the update starting at zero."""
    own = {k: v for k, v in model.state_dict().items() if k.endswith(SUFFIXES)}
    return {**weights, **own}


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
