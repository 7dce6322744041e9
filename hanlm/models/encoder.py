"""A bidirectional transformer encoder: the GPT's blocks (pre-norm RMSNorm, rotary positions, SwiGLU)
without the causal mask, so each position reads both sides — BERT's shape, Llama's parts.

Pretrained with a masked objective (`train.objective: mlm`, or the discriminator of `electra`,
`hanlm.models.electra`): `forward(x, y)` is the cross-entropy of the tied output head at the positions
where `y` holds the original token (`-1` elsewhere); `hanlm.train.masking` makes (x, y) from a batch.
`hidden(x, lengths)` is what task heads read; right-padded rows get a key mask so that no position
attends to padding. An encoder predicts no next token: generation refuses it by name.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hanlm.models.gpt import Transformer
from hanlm.models.loss import linear_cross_entropy

# No hanlm tokenizer puts <bos> (id 2) into data (documents are separated by <eos>), so it serves as the
# [MASK] token of masked-language-model pretraining.
MASK_ID = 2


class ReadsBothSides:
    """What every bidirectional model (the encoder, BERT) says to generation: it predicts no next token."""

    generates = False

    def initial_state(self, batch_size: int = 1):
        raise TypeError(self._no_generation())

    def log_probs(self, tokens: Tensor, state):
        raise TypeError(self._no_generation())

    @staticmethod
    def _no_generation() -> str:
        return ("a bidirectional model (model.arch encoder or bert) reads both sides of every position and predicts "
                "no next token: it does not generate or score text left to right; fine-tune it (hanlm finetune) for "
                "classification or tagging")


class Encoder(ReadsBothSides, Transformer):
    """Bidirectional transformer over token ids; see the module docstring."""

    causal = False

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, C) of x (B, T); with `lengths` (B,), positions at or
        after a row's length are padding that no position attends to."""
        B, T = x.shape
        self.check_length(T, "the input")
        rot = self._rotations(slice(0, T))
        mask = None
        if lengths is not None:
            mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).view(B, 1, 1, T)
        h = self.tok_emb(x)  # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, rot, None, mask, use_reentrant=False)
            else:
                h = block(h, rot, None, mask)
        return self.norm(h)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Without y: logits (B, T, V) of every position. With y: the mean cross-entropy over the positions
        where y != -1 (the masked ones), the head never holding all the logits."""
        h = self.hidden(x)
        return self.lm_head(h) if y is None else linear_cross_entropy(h, self.lm_head.weight, y)
