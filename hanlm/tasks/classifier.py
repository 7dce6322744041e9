"""A text classifier: a language model's network (the backbone) with a linear head on a pooled state.

The backbone is the gpt or lstm model as pretraining built it, so its weights load by their
names under `backbone.`; the head is `head.weight` / `head.bias`. Pooling reads the hidden
states the LM head read: `last` takes the state at each text's final token (a causal model has
read the whole text there), `mean` averages the states over the text's tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanlm.config import Config
from hanlm.errors import ConfigError
from hanlm.models import build_model
from hanlm.models.base import LanguageModel
from hanlm.models.lora import adapted


class SequenceClassifier(nn.Module):
    """backbone → pooled (B, C) → dropout → linear → logits (B, n_labels)."""

    def __init__(self, backbone: LanguageModel, n_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        width = backbone.tok_emb.weight.size(1)
        self.head = nn.Linear(width, n_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if not backbone.tied:
            # An untied LM head takes no part in classification: freezing it keeps DDP from waiting
            # for its gradient and the optimizer from decaying it.
            backbone.lm_head.weight.requires_grad_(False)

    @property
    def context_length(self) -> int | None:
        return self.backbone.context_length

    def pooled(self, x: Tensor, lengths: Tensor) -> Tensor:
        """The text vectors (B, C) of right-padded ids x (B, T) with `lengths` (B,)."""
        h = self.backbone.hidden(x, lengths)  # (B, T, C)
        if self.pooling == "last":
            return h[torch.arange(x.size(0), device=x.device), lengths - 1]
        if self.pooling == "first":
            return h[:, 0]
        keep = (torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return (h * keep).sum(1) / lengths.clamp(min=1)[:, None].to(h.dtype)

    def forward(self, x: Tensor, lengths: Tensor, y: Tensor | None = None) -> Tensor:
        """Logits (B, n_labels) in float32; with labels y (B,), their mean cross-entropy instead."""
        logits = self.head(self.dropout(self.pooled(x, lengths))).float()
        return logits if y is None else F.cross_entropy(logits, y)


def build_classifier(cfg: Config, vocab_size: int) -> SequenceClassifier:
    """A classifier for a resolved config whose model.task is classify (labels in finetune.labels)."""
    if cfg.model.task != "classify":
        raise ConfigError(f"model.task is {cfg.model.task}, not classify")
    if len(cfg.finetune.labels) < 2:
        raise ConfigError(f"a classifier needs at least two finetune.labels, got {cfg.finetune.labels}")
    model_cfg = dataclasses.replace(cfg.model, vectors=None, dropout=cfg.finetune.dropout)
    backbone = adapted(build_model(model_cfg, vocab_size), cfg)
    return SequenceClassifier(backbone, len(cfg.finetune.labels), cfg.finetune.pooling, cfg.finetune.dropout)
