"""A decoder-only transformer: pre-norm RMSNorm, rotary positions, SwiGLU MLP, KV cache.

The state for incremental decoding is a `KVCache`: every layer's keys and values so far.
`log_probs` returns a new cache (the new keys are concatenated, not written in place), so a
cache can be reused, e.g. a shared prompt prefilled once and continued several ways; the
cost is copying the cache each call, small next to the matmuls at these context lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel, lm_loss

ROPE_THETA = 10000.0


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens seen so far, one (B, n_head, pos, head_dim) tensor per layer."""

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]

    @property
    def pos(self) -> int:
        """Tokens cached so far: the position of the next token."""
        return self.k[0].size(2)


def rotary_tables(head_dim: int, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles position × theta^(-2i/head_dim), each (length, head_dim / 2)."""
    inv_freq = ROPE_THETA ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) of x (B, H, T, head_dim) by the unit complex rot (T, head_dim/2).

    One complex multiply: on CPU about 3x faster, forward and backward, than the same rotation as
    real multiplies and a concatenation.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, head_dim / 2) complex
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, rot: Tensor, past: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, C) at the positions `rot` was sliced for, after the `past` keys and values;
        returns the output and the keys and values including the new ones. `mask` (boolean,
        broadcast to (B, H, T, P + T)) replaces the causal mask: rows padded to a common length."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        P = 0 if past is None else past[0].size(2)
        if P:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # (B, H, P + T, hd)
        causal = mask is None and P == 0 and T > 1
        if mask is None and P and T > 1:
            # is_causal aligns the mask top-left, right only without a past; a single new token sees everything.
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        hidden = 64 * math.ceil(8 * n_embd / 3 / 64)  # same parameters as a 4d GELU MLP, rounded for matmuls
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=1e-5)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=1e-5)
        self.mlp = SwiGLU(cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rot: Tensor, past: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.attn_norm(x), rot, past, mask)
        x = x + self.dropout(a)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, kv


class GPT(LanguageModel):
    """Decoder-only transformer language model; see the module docstring for the cache."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, cfg.context_length
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.context_length)
        # Real, not complex, so that casting the model to another dtype keeps them intact; not persistent:
        # they follow from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpointing = False
        self._init_weights(cfg.n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        # Each block adds two branches to the residual stream; shrink them so its variance stays put.
        for b in self.blocks:
            for w in (b.attn.proj.weight, b.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * n_layer))

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        self.checkpointing = enabled

    def _check_length(self, n: int, what: str) -> None:
        if n > self.context_length:
            raise ValueError(f"{what} is {n} tokens, longer than the model's context_length "
                             f"{self.context_length}; shorten it or use a model with a longer context")

    def _rotations(self, start: int, T: int) -> Tensor:
        """Unit complex numbers (T, head_dim / 2) that rotate positions start .. start + T - 1."""
        return torch.complex(self.rope_cos[start:start + T].float(), self.rope_sin[start:start + T].float())

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        T = x.size(1)
        self._check_length(T, "the input")
        rot = self._rotations(0, T)
        h = self.tok_emb(x)  # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h, _ = checkpoint(block, h, rot, use_reentrant=False)
            else:
                h, _ = block(h, rot)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        return logits if y is None else lm_loss(logits, y)

    def initial_state(self, batch_size: int = 1) -> KVCache:
        """An empty cache: (batch_size, n_head, 0, head_dim) keys and values per layer."""
        w = self.tok_emb.weight
        empty = w.new_empty(batch_size, self.n_head, 0, self.n_embd // self.n_head)
        return KVCache(k=(empty,) * self.n_layer, v=(empty,) * self.n_layer)

    def log_probs(self, tokens: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """Next-token log-probabilities (B, T, V) after each of `tokens` (B, T), which follow the
        state.pos cached ones (same position for every row), and a new cache that includes them."""
        B, T = tokens.shape
        P = state.pos
        if B != state.k[0].size(0):
            raise ValueError(f"tokens have batch size {B} but the cache was made for {state.k[0].size(0)}")
        self._check_length(P + T, f"the cached {P} plus {T} new tokens")
        rot = self._rotations(P, T)
        h = self.tok_emb(tokens)  # (B, T, C)
        ks, vs = [], []
        for block, k, v in zip(self.blocks, state.k, state.v):
            h, (k, v) = block(h, rot, (k, v))
            ks.append(k)
            vs.append(v)
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        return F.log_softmax(logits.float(), dim=-1), KVCache(k=tuple(ks), v=tuple(vs))

    def decode_step(self, tokens: Tensor, states: list[KVCache]) -> tuple[Tensor, list[KVCache]]:
        """One token for each of B sequences with caches of different lengths, in one forward.

        The caches are padded to the longest (L), the new token's key and value go at position L
        of every row, and a mask hides each row's padding; rotary positions are per row. Each
        sequence keeps its own cache: the new key and value are appended to it alone."""
        B = len(states)
        lengths = torch.tensor([s.pos for s in states], device=tokens.device)
        L = int(lengths.max())
        self._check_length(L + 1, f"the cached {L} plus 1 new token")
        rot = torch.complex(self.rope_cos[lengths], self.rope_sin[lengths]).view(B, 1, 1, -1)
        slots = torch.arange(L + 1, device=tokens.device)
        mask = ((slots < lengths[:, None]) | (slots == L)).view(B, 1, 1, L + 1)
        h = self.tok_emb(tokens.view(B, 1))
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            past_k = torch.cat([F.pad(s.k[i], (0, 0, 0, L - s.pos)) for s in states])  # (B, H, L, hd)
            past_v = torch.cat([F.pad(s.v[i], (0, 0, 0, L - s.pos)) for s in states])
            h, (k, v) = block(h, rot, (past_k, past_v), mask)
            new_k.append(k[:, :, L:])
            new_v.append(v[:, :, L:])
        logp = F.log_softmax(self.lm_head(self.norm(h))[:, -1].float(), dim=-1)  # (B, V)
        advanced = [KVCache(k=tuple(torch.cat((s.k[i], new_k[i][b:b + 1]), dim=2) for i in range(self.n_layer)),
                            v=tuple(torch.cat((s.v[i], new_v[i][b:b + 1]), dim=2) for i in range(self.n_layer)))
                    for b, s in enumerate(states)]
        return logp, advanced

    def flops_per_token(self, seq_len: int) -> float:
        """6 × (non-embedding parameters + head) + 12 · n_layer · n_embd · seq_len.

        The second term is attention's QKᵀ and AV (2 · 2 · d · T forward, ×3 with backward, per
        layer), counted over the full T×T square as in PaLM (Chowdhery et al. 2022, appendix B),
        although causal attention needs only half of it.
        """
        return super().flops_per_token(seq_len) + 12.0 * self.n_layer * self.n_embd * seq_len
