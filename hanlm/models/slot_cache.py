"""A GPT's decoding batch: one key and value buffer per layer for every sequence decoded together.

Row r of the batch is slot r of each buffer (slots, key/value heads, positions, head_dim). A step
writes each row's new keys at that row's own positions, in place, and attends over the first
positions of the rows now running with a mask built from their lengths: no per-step gather, pad
or concatenation of separate caches. Sequences that leave are compacted away (a copy of a
leaving row's successors, once per departure, not per step); new ones are copied in once from
their prefilled cache.

Eager, the buffers grow by doubling in both rows and positions as needed, and attention reads only
up to the longest row. Compiled (`torch.compile`), the buffers hold the model's whole context from
the start and attention always reads all of it, so that every step has the same shapes and the
compiled step is reused rather than rebuilt; the first step of each new shape (rows, tokens per
row) compiles, and `compile_seconds` counts those steps' time. Inductor keeps what it compiled in
its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so a later process compiles the same step faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch._inductor.config
from torch import Tensor, nn

from hanlm.models.base import DecodeBatch


class SlotModel(Protocol):
    """What a slot batch needs of its model (the GPT)."""

    n_layer: int
    n_kv_head: int
    head_dim: int
    context_length: int
    tok_emb: nn.Embedding

    def slot_forward(self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor],
                     span: int) -> Tensor: ...

    def check_length(self, n: int, what: str) -> None: ...


class SlotBatch(DecodeBatch):
    """Up to `capacity` sequences of `model` (a GPT) in one set of buffers; see the module docstring."""

    def __init__(self, model: SlotModel, capacity: int, *, compile: bool = False):
        if capacity < 1:
            raise ValueError(f"a decoding batch holds at least one sequence (got capacity {capacity})")
        self.model, self.capacity, self.compiled = model, capacity, compile
        self.lengths: list[int] = []
        self._last_t = 0  # tokens per row of the last step, which `cut` takes back
        w = model.tok_emb.weight
        self._empty = {"dtype": w.dtype, "device": w.device}
        rows, positions = (capacity, model.context_length) if compile else (1, 64)
        self.keys = [self._buffer(rows, positions) for _ in range(model.n_layer)]
        self.values = [self._buffer(rows, positions) for _ in range(model.n_layer)]
        self.compile_seconds = 0.0
        self._shapes: set[tuple[int, int]] = set()
        self._compiled: Callable[..., Tensor] | None = None
        # On a GPU the compiled step replays as a CUDA graph; on a CPU, Inductor's freezing folds the weights in as
        # constants and prepacks them for oneDNN, which at batch 1 measured 1.6× eager against 1.1-1.3× without.
        # It is set only around these calls: frozen weights would be wrong for anything that trains.
        self._freeze = w.device.type == "cpu"
        if compile:
            mode = "reduce-overhead" if w.device.type == "cuda" else None
            if mode:  # CUDA graphs replay fixed addresses; on a CPU, freezing would fold static buffers in as constants
                for buffer in (*self.keys, *self.values):
                    torch._dynamo.mark_static_address(buffer)
            self._compiled = torch.compile(model.slot_forward, mode=mode, fullgraph=True)

    def __len__(self) -> int:
        return len(self.lengths)

    def _buffer(self, rows: int, positions: int) -> Tensor:
        return torch.zeros(rows, self.model.n_kv_head, positions, self.model.head_dim, **self._empty)

    def _reserve(self, rows: int, positions: int) -> None:
        """Room for `rows` rows of `positions` positions: the buffers doubled (within the capacity and the
        context) and the rows' contents copied over when they are too small."""
        have_rows, have_positions = self.keys[0].size(0), self.keys[0].size(2)
        if rows <= have_rows and positions <= have_positions:
            return
        context = self.model.context_length
        new_rows = max(rows, min(self.capacity, 2 * have_rows)) if rows > have_rows else have_rows
        new_positions = (max(positions, min(context, 2 * have_positions)) if positions > have_positions
                         else have_positions)
        filled = max(self.lengths, default=0)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = self._buffer(new_rows, new_positions)
                grown[:len(self.lengths), :, :filled] = old[:len(self.lengths), :, :filled]
                buffers[i] = grown

    def admit(self, state: Any, length: int) -> None:
        """Copy a prefilled cache (the GPT's KVCache of batch size 1) into the next free row."""
        row = len(self.lengths)
        if row >= self.capacity:
            raise ValueError(f"the decoding batch is full ({self.capacity} sequences)")
        self._reserve(row + 1, length)
        for i in range(self.model.n_layer):
            k, v = state.layer(i)
            self.keys[i][row, :, :length] = k[0, :, :length]
            self.values[i][row, :, :length] = v[0, :, :length]
        self.lengths.append(length)

    def keep(self, rows: Sequence[int]) -> None:
        """Move the kept rows down over those that leave, in order (each row moves at most once)."""
        if any(b <= a for a, b in zip(rows, rows[1:])) or (rows and not 0 <= rows[0] <= rows[-1] < len(self)):
            raise ValueError(f"rows to keep must be increasing row numbers below {len(self)}, got {list(rows)}")
        for new, old in enumerate(rows):
            if new != old:
                n = self.lengths[old]
                for buffers in (self.keys, self.values):
                    for b in buffers:
                        b[new, :, :n] = b[old, :, :n]
        self.lengths = [self.lengths[i] for i in rows]
        self._last_t = 0

    def step(self, tokens: Tensor) -> Tensor:
        B, T = tokens.shape
        if B != len(self):
            raise ValueError(f"tokens have {B} rows but the batch holds {len(self)} sequences")
        longest = max(self.lengths) + T
        self.model.check_length(longest, f"the cached {longest - T} plus {T} new tokens")
        self._reserve(B, longest)
        lengths = torch.tensor(self.lengths, device=tokens.device)
        positions = lengths.view(B, 1) + torch.arange(T, device=tokens.device)
        span = self.keys[0].size(2) if self.compiled else longest
        first = self.compiled and (B, T) not in self._shapes
        started = time.perf_counter()
        if self._compiled is None:
            logp = self.model.slot_forward(tokens, positions, self.keys, self.values, span)
        else:
            with torch._inductor.config.patch(freezing=self._freeze):
                logp = self._compiled(tokens, positions, self.keys, self.values, span)
        if first:
            self._shapes.add((B, T))
            self.compile_seconds += time.perf_counter() - started
        self.lengths = [n + T for n in self.lengths]
        self._last_t = T
        return logp

    def cut(self, row: int, keep: int) -> None:
        """Shorten the row; the keys past its length stay in the buffer, hidden by the mask, until overwritten."""
        if not 0 <= keep <= self._last_t:
            raise ValueError(f"the last step added {self._last_t} tokens per row; cannot keep {keep}")
        self.lengths[row] -= self._last_t - keep
