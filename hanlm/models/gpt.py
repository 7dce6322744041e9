"""A decoder-only transformer: pre-norm RMSNorm, rotary positions, SwiGLU MLP, KV cache.

The state for incremental decoding is a `KVCache`: the first `pos` positions of a `KVStore`,
every layer's key and value buffers. Extending a cache writes the new keys into the store's
free room in place — no copy per token, which at batch 1 cost more than the attention — and
returns a longer cache on the same store. The shorter cache stays valid and reusable (a shared
prompt prefilled once and continued several ways): only the store's tip is extended in place;
extending any other cache first copies its prefix to a new store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel
from hanlm.models.loss import SoftTargets, linear_cross_entropy
from hanlm.models.slot_cache import SlotBatch

ROPE_THETA = 10000.0
RMS_EPS = 1e-5  # the RMSNorms' default epsilon (Llama's; model.norm_eps)


class KVStore:
    """Key and value buffers (B, key/value heads, capacity, head_dim), one pair per layer, written up to `filled`."""

    def __init__(self, k: tuple[Tensor, ...], v: tuple[Tensor, ...], filled: int):
        self.k, self.v, self.filled = k, v, filled

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)


@dataclass(frozen=True)
class KVCache:
    """The keys and values of the first `pos` tokens of `store`."""

    store: KVStore
    pos: int

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's keys and values (B, key/value heads, pos, head_dim): views of the store."""
        return self.store.k[i][:, :, :self.pos], self.store.v[i][:, :, :self.pos]

    @property
    def batch_size(self) -> int:
        return self.store.k[0].size(0)

    def room(self, n: int, limit: int) -> KVStore:
        """A store holding this cache's keys and values whose positions pos .. pos + n - 1 are free
        to write: this one when this cache is its tip and it has the room, else a new one with the
        prefix copied and the capacity doubled (at most `limit`). Marks those positions filled."""
        store, end = self.store, self.pos + n
        if store.filled != self.pos or end > store.capacity:
            capacity = max(end, min(limit, max(64, 2 * store.capacity)))
            k = tuple(_grown(b, self.pos, capacity) for b in store.k)
            v = tuple(_grown(b, self.pos, capacity) for b in store.v)
            store = KVStore(k, v, self.pos)
        store.filled = end
        return store

    def truncated(self, pos: int) -> KVCache:
        """This cache cut to its first `pos` tokens, and the store's positions after them cleared and free:
        a rejected draft leaves no stale keys. Caches on this store longer than `pos` are invalid after."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot cut a cache of {self.pos} tokens to {pos}")
        store = self.store
        if store.filled > pos:
            for buffer in (*store.k, *store.v):
                buffer[:, :, pos:store.filled] = 0
            store.filled = pos
        return KVCache(store, pos)


def _grown(buffer: Tensor, keep: int, capacity: int) -> Tensor:
    """A (B, H, capacity, hd) buffer that starts with buffer's first `keep` positions."""
    B, H, _, hd = buffer.shape
    out = buffer.new_empty(B, H, capacity, hd)
    out[:, :, :keep] = buffer[:, :, :keep]
    return out


def rotary_frequencies(cfg: ModelConfig) -> Tensor:
    """The angle per position of each rotated pair i (float64, head_dim / 2): model.rope_theta^(-2i/head_dim),
    rescaled under model.rope_scaling — `linear` divides every frequency by model.rope_factor (positions
    interpolated); `llama3` (Llama 3.1) divides only the low frequencies, those whose wavelength exceeds
    rope_original_context / rope_low_freq_factor, keeps the high ones (wavelength below rope_original_context /
    rope_high_freq_factor) and blends the band between."""
    d = head_dim_of(cfg)
    inv = cfg.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float64) / d)
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        wavelength, old = 2 * math.pi / inv, cfg.rope_original_context
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = (old / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        return torch.where(wavelength > old / low, inv / cfg.rope_factor,
                           torch.where(wavelength < old / high, inv, blended))
    return inv


def rotary_tables(inv_freq: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles position × inv_freq, each (length, head_dim / 2)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq.double())
    return angles.cos().float(), angles.sin().float()


def register_rotary(module: nn.Module, cfg: ModelConfig) -> None:
    """Give `module` the rotary tables of model `cfg`'s context as buffers `rope_cos` / `rope_sin`: real, not
    complex, so that casting the model to another dtype keeps them intact; not persistent: they follow from
    the config, so checkpoints hold only learned weights."""
    cos, sin = rotary_tables(rotary_frequencies(cfg), cfg.context_length)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


def init_weights(model: nn.Module, blocks: nn.ModuleList) -> None:
    """GPT-2's initialisation: N(0, 0.02) for every linear and embedding weight, and each block's two branches
    into the residual stream shrunk by √(2 · layers) so that its variance stays put; qkv biases start at 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
    for b in blocks:
        for w in (b.attn.proj.weight, b.mlp.down.weight):
            nn.init.normal_(w, std=0.02 / math.sqrt(2 * len(blocks)))
        if b.attn.qkv.bias is not None:
            nn.init.zeros_(b.attn.qkv.bias)


def apply_rotary(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate each pair (x[..., 2i], x[..., 2i+1]) of x by the unit complex numbers rot, which
    broadcast against x's pairs (..., head_dim / 2).

    One complex multiply: on CPU about 3x faster, forward and backward, than the same rotation as
    real multiplies and a concatenation. Inductor generates no code for complex numbers, so under
    torch.compile `rot` holds (cos, sin) on a last axis of 2 (`Transformer._rotations`) and the rotation is
    done in real arithmetic.
    """
    if torch.compiler.is_compiling():
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rot.unbind(-1)
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def head_dim_of(cfg: ModelConfig) -> int:
    """Each attention head's width: model.head_dim, or n_embd / n_head."""
    return cfg.head_dim or cfg.n_embd // cfg.n_head


def mlp_width(cfg: ModelConfig) -> int:
    """The SwiGLU hidden width: model.intermediate_size, or 64·ceil(8·n_embd/3/64) (the weights of a 4·n_embd GELU
    MLP, rounded for matmuls)."""
    return cfg.intermediate_size or 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


def qkv_sizes(cfg: ModelConfig) -> list[int]:
    """The rows of the fused qkv projection that belong to the queries, the keys and the values."""
    head_dim, kv = head_dim_of(cfg), cfg.n_kv_head or cfg.n_head
    return [cfg.n_head * head_dim, kv * head_dim, kv * head_dim]


class Attention(nn.Module):
    """Multi-head attention with rotary positions; with model.n_kv_head < n_head, grouped-query attention (each
    key/value head serves n_head / n_kv_head query heads; Ainslie et al. 2023). One projection makes the queries,
    keys and values, its rows in that order (with biases under model.qkv_bias, Qwen2's); model.qk_norm normalises
    each head's queries and keys before the rotation (Qwen3's)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.n_head, self.causal = cfg.n_head, causal
        self.n_kv = cfg.n_kv_head or cfg.n_head
        self.head_dim = head_dim_of(cfg)
        self.qkv = nn.Linear(cfg.n_embd, sum(qkv_sizes(cfg)), bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.sizes = qkv_sizes(cfg)

    def forward(self, x: Tensor, rot: Tensor, cache: tuple[Tensor, Tensor, int | Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x (B, T, C) at the positions `rot` (broadcasting against (B, T, 2, H, head_dim / 2)) was
        made for. With a `cache` (key buffer, value buffer, P), the new keys and values are written
        at P .. P + T - 1 of the buffers (B, H, capacity, hd) and attention sees positions up to
        P + T - 1; where P is a tensor (B, T) of each row's own positions (a slot batch), they are
        written there and attention reads the buffers' first mask.size(-1) positions, which `mask` hides
        per row. `mask` (boolean, broadcast to (B, H, T, P + T)) replaces the causal mask: rows
        padded to a common length. A non-causal attention (the encoder's) sees every position but those
        `mask` hides."""
        B, T, C = x.shape
        if self.n_kv == self.n_head and self.q_norm is None:
            qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
            q, k = apply_rotary(qkv[:, :, :2], rot).transpose(1, 3).unbind(2)  # (B, H, T, hd) each
            v = qkv[:, :, 2].transpose(1, 2)
        else:
            q, k, v = self.qkv(x).split(self.sizes, -1)
            q, k = q.view(B, T, self.n_head, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            rot = rot.squeeze(-3)  # (..., T, 1, hd / 2): against (B, T, heads, hd / 2)
            q, k = apply_rotary(q, rot).transpose(1, 2), apply_rotary(k, rot).transpose(1, 2)  # (B, heads, T, hd)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        P = 0
        if cache is not None and isinstance(cache[2], Tensor):  # a slot batch: each row writes at its own positions
            k_buf, v_buf, positions = cache
            rows = torch.arange(B, device=x.device).view(B, 1)
            k_buf[rows, :, positions] = k.transpose(1, 2)  # (B, T, heads, hd) into (B, heads, capacity, hd)
            v_buf[rows, :, positions] = v.transpose(1, 2)
            k, v = k_buf[:, :, :mask.size(-1)], v_buf[:, :, :mask.size(-1)]
        elif cache is not None:
            k_buf, v_buf, P = cache
            k_buf[:, :, P:P + T] = k
            v_buf[:, :, P:P + T] = v
            k, v = k_buf[:, :, :P + T], v_buf[:, :, :P + T]
        causal = self.causal and mask is None and P == 0 and T > 1
        if mask is None and P and T > 1:
            # is_causal aligns the mask top-left, right only without a past; a single new token sees everything.
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=False)
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg, causal)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.n_embd, mlp_width(cfg))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rot: Tensor, cache: tuple[Tensor, Tensor, int | Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rot, cache, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(LanguageModel):
    """What the GPT and the encoder share: token embedding, a stack of blocks (causal or not, `causal`), the
    final norm, the output head (tied or not), rotary tables and GPT-2's initialisation."""

    causal = True

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, cfg.context_length
        self.n_layer, self.n_head, self.n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, self.causal) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        register_rotary(self, cfg)
        self.head_dim = head_dim_of(cfg)
        self.checkpointing = False
        init_weights(self, self.blocks)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        self.checkpointing = enabled

    def flops_per_token(self, seq_len: int) -> float:
        """6 × (non-embedding parameters + head) + 12 · n_layer · n_embd · seq_len.

        The second term is attention's QKᵀ and AV (2 · 2 · d · T forward, ×3 with backward, per
        layer), counted over the full T×T square as in PaLM (Chowdhery et al. 2022, appendix B),
        although causal attention needs only half of it.
        """
        return super().flops_per_token(seq_len) + 12.0 * self.n_layer * self.n_head * self.head_dim * seq_len

    def check_length(self, n: int, what: str) -> None:
        """ValueError when `what`, `n` tokens, is longer than the model's context."""
        if n > self.context_length:
            raise ValueError(f"{what} is {n} tokens, longer than the model's context_length "
                             f"{self.context_length}; shorten it or use a model with a longer context")

    def _rotations(self, positions: Tensor | slice) -> Tensor:
        """Unit complex numbers (*positions, 1, 1, head_dim / 2) that rotate those positions; they
        broadcast against the (B, T, 2, H, head_dim / 2) query and key pairs. Under torch.compile, their
        real and imaginary parts on a last axis instead (see `apply_rotary`)."""
        if torch.compiler.is_compiling():
            return torch.stack((self.rope_cos[positions], self.rope_sin[positions]), -1).float()[..., None, None, :, :]
        return torch.complex(self.rope_cos[positions].float(), self.rope_sin[positions].float())[..., None, None, :]


class GPT(Transformer):
    """Decoder-only transformer language model; see the module docstring for the cache."""

    def forward(self, x: Tensor, y: Tensor | None = None, soft: SoftTargets | None = None) -> Tensor:
        h = self.hidden(x)
        return self.lm_head(h) if y is None else linear_cross_entropy(h, self.lm_head.weight, y, soft=soft)

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, T, C) of x (B, T): what the head reads. (`lengths` of
        right-padded rows need no mask here: a causal position never sees the padding after it.)"""
        T = x.size(1)
        self.check_length(T, "the input")
        rot = self._rotations(slice(0, T))
        h = self.tok_emb(x)  # (B, T, C)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, rot, use_reentrant=False)
            else:
                h = block(h, rot)
        return self.norm(h)

    def initial_state(self, batch_size: int = 1) -> KVCache:
        """An empty cache for `batch_size` rows; the store grows on first use."""
        w = self.tok_emb.weight  # under FSDP a sharded DTensor: take only its dtype and device
        empty = torch.empty(batch_size, self.n_kv_head, 0, self.head_dim, dtype=w.dtype, device=w.device)
        return KVCache(KVStore((empty,) * self.n_layer, (empty,) * self.n_layer, 0), 0)

    def log_probs(self, tokens: Tensor, state: KVCache) -> tuple[Tensor, KVCache]:
        """Next-token log-probabilities (B, T, V) after each of `tokens` (B, T), which follow the
        state.pos cached ones (same position for every row), and a cache that includes them;
        `state` stays valid (see the module docstring)."""
        B, T = tokens.shape
        P = state.pos
        if B != state.batch_size:
            raise ValueError(f"tokens have batch size {B} but the cache was made for {state.batch_size}")
        self.check_length(P + T, f"the cached {P} plus {T} new tokens")
        store = state.room(T, self.context_length)
        rot = self._rotations(slice(P, P + T))
        h = self.tok_emb(tokens)  # (B, T, C)
        for block, k, v in zip(self.blocks, store.k, store.v):
            h = block(h, rot, (k, v, P))
        logits = self.lm_head(self.norm(h))  # (B, T, V)
        return F.log_softmax(logits.float(), dim=-1), KVCache(store, P + T)

    def rewound(self, before: KVCache, after: KVCache, tokens: Tensor, keep: int) -> KVCache:
        """`after` cut back to `before` plus `keep` tokens: no recomputation."""
        return after.truncated(before.pos + keep)

    def decode_batch(self, capacity: int, *, compile: bool = False) -> SlotBatch:
        """One preallocated cache for up to `capacity` sequences (hanlm.models.slot_cache), its step compiled
        with torch.compile when `compile`."""
        return SlotBatch(self, capacity, compile=compile)

    def state_prefix(self, state: KVCache, length: int, keep: int) -> KVCache:
        """The cache's first `keep` tokens: a view of the same store, which stays valid (module docstring)."""
        return KVCache(state.store, keep)

    def slot_forward(self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor],
                     span: int) -> Tensor:
        """Log-probabilities (B, T, V) after `tokens` (B, T) at `positions` (B, T), row b continuing its own
        keys and values in row b of `keys[i]` / `values[i]` (rows ≥ B, key/value heads, capacity, head_dim) for
        layer i, which get the new ones written at `positions`. Each query attends to its row's positions up to
        its own among the first `span`; what lies beyond a row's length is hidden, so stale keys there do no
        harm. The buffers come whole and are cut to B rows here, so that compiled they are the same tensors
        every step (static addresses for CUDA graphs)."""
        B, T = tokens.shape
        rot = self._rotations(positions)  # (B, T, 1, 1, head_dim / 2)
        slots = torch.arange(span, device=tokens.device)
        mask = (slots.view(1, 1, span) <= positions.view(B, T, 1)).view(B, 1, T, span)
        h = self.tok_emb(tokens)
        for block, k, v in zip(self.blocks, keys, values):
            h = block(h, rot, (k[:B], v[:B], positions), mask)
        return F.log_softmax(self.lm_head(self.norm(h)).float(), dim=-1)
