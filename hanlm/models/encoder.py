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
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel
from hanlm.models.gpt import RMS_EPS, Block, init_weights, register_rotary
from hanlm.models.loss import linear_cross_entropy

# No hanlm tokenizer puts <bos> (id 2) into data (documents are separated by <eos>), so it serves as the
# [MASK] token of masked-language-model pretraining.
MASK_ID = 2


class Encoder(LanguageModel):
    """Bidirectional transformer over token ids; see the module docstring."""

    generates = False

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, cfg.context_length
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=RMS_EPS)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        register_rotary(self, cfg.n_embd // cfg.n_head, cfg.context_length)
        self.checkpointing = False
        init_weights(self, self.blocks)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.checkpointing = enabled

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, C) of x (B, T); with `lengths` (B,), positions at or
        after a row's length are padding that no position attends to."""
        B, T = x.shape
        if T > self.context_length:
            raise ValueError(f"the input is {T} tokens, longer than the encoder's context_length "
                             f"{self.context_length}")
        rot = torch.complex(self.rope_cos[:T].float(), self.rope_sin[:T].float())[..., None, None, :]
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

    def initial_state(self, batch_size: int = 1):
        raise TypeError(self._no_generation())

    def log_probs(self, tokens: Tensor, state):
        raise TypeError(self._no_generation())

    @staticmethod
    def _no_generation() -> str:
        return ("model.arch encoder reads both sides of every position and predicts no next token: it does not "
                "generate or score text left to right; fine-tune it (hanlm finetune) for classification or tagging")

    def flops_per_token(self, seq_len: int) -> float:
        """As the GPT's: 6 × (non-embedding parameters + head) + 12 · n_layer · n_embd · seq_len (the full
        attention square, which an encoder does compute)."""
        return super().flops_per_token(seq_len) + 12.0 * self.n_layer * self.n_embd * seq_len
