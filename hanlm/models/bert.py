"""BERT (Devlin et al. 2019) as the published Chinese encoders have it — bert-base-chinese, RoBERTa-wwm-ext,
MacBERT: learned absolute positions and token types, post-norm LayerNorm blocks, GELU MLP, biases everywhere,
and the masked-LM head (dense → GELU → LayerNorm → the tied embedding plus a bias).

hanlm's own encoder (`hanlm.models.encoder`) is Llama's parts without the causal mask; this is the other shape,
kept apart so that an imported checkpoint computes exactly what transformers computes. Every input is one
text, so every token has type 0; the other type rows are kept only to be exported again. `hidden(x, lengths)`
is the last layer's output (what `BertModel` calls `last_hidden_state`), which task heads read; the pooler of
`BertModel` is not kept, since hanlm's heads pool for themselves (finetune.pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel
from hanlm.models.encoder import ReadsBothSides


def bert_mlp_width(cfg: ModelConfig) -> int:
    """The GELU MLP's hidden width: model.intermediate_size, or 4 · n_embd as in BERT."""
    return cfg.intermediate_size or 4 * cfg.n_embd


class BertAttention(nn.Module):
    """Bidirectional multi-head attention; one fused projection makes the queries, keys and values (rows in that
    order, with biases), `proj` the output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class BertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, bert_mlp_width(cfg))
        self.down = nn.Linear(bert_mlp_width(cfg), cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class BertBlock(nn.Module):
    """Post-norm: x ← LN(x + attention(x)); x ← LN(x + MLP(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = BertAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = BertMLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Bert(ReadsBothSides, LanguageModel):
    """BERT with its masked-LM head; see the module docstring."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, cfg.context_length
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.emb_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.n_layer))
        self.head_dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.head_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.checkpointing = False
        for m in self.modules():  # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        self.checkpointing = enabled

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The last layer's hidden states (B, T, C) of x (B, T); with `lengths` (B,), positions at or after a
        row's length are padding that no position attends to."""
        B, T = x.shape
        if T > self.context_length:
            raise ValueError(f"the input is {T} tokens, longer than the model's context_length {self.context_length} "
                             "(BERT's learned positions end there); shorten it")
        mask = None
        if lengths is not None:
            mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).view(B, 1, 1, T)
        h = self.tok_emb(x) + self.pos_emb.weight[:T] + self.type_emb.weight[0]
        h = self.emb_dropout(self.emb_norm(h))
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, mask, use_reentrant=False)
            else:
                h = block(h, mask)
        return h

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Without y: the masked-LM logits (B, T, V) of every position. With y: their mean cross-entropy over the
        positions where y != -1 (the masked ones)."""
        h = self.head_norm(F.gelu(self.head_dense(self.hidden(x))))
        logits = self.lm_head(h)
        if y is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)

    def flops_per_token(self, seq_len: int) -> float:
        """6 × (non-embedding parameters + head) + attention's 12 · n_layer · n_embd · seq_len (see the GPT's)."""
        positions = self.pos_emb.weight.numel() + self.type_emb.weight.numel()  # lookups, as the token embedding
        return super().flops_per_token(seq_len) - 6.0 * positions + 12.0 * self.n_layer * self.n_embd * seq_len
