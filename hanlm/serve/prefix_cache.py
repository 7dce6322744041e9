"""Prefix caching: the states of recently prefilled prompts, kept for the next prompts that start the same way.

Chat clients send the same system prompt before every conversation, and a conversation resends all of
itself each turn. A new prompt that shares a cached prompt's first tokens starts from that prompt's state
cut to the shared part (`LanguageModel.state_prefix`: for the GPT a view of the same cache, no copy) and
prefills only the rest; an exact repeat needs no forward at all. A model whose state cannot be cut (the
LSTM's) still reuses a cached prompt that is a whole prefix of the new one.

Entries are evicted least recently used first once they hold more than `max_tokens` tokens in all.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hanlm.models.base import LanguageModel


@dataclass
class Prefix:
    """What a lookup found: the state after the prompt's first `length` tokens (None, 0 when nothing is cached),
    and, for an exact repeat, the log-probabilities (V,) after the whole prompt."""

    state: Any = None
    length: int = 0
    logp: torch.Tensor | None = None


@dataclass
class _Entry:
    ids: np.ndarray
    state: Any
    logp: torch.Tensor


class PrefixCache:
    """Prefilled prompts of `model`, at most `max_tokens` tokens in all; `hits` and `reused` count lookups that
    found something and the prompt tokens they spared."""

    def __init__(self, model: LanguageModel, max_tokens: int):
        self.model, self.max_tokens = model, max_tokens
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._held = 0
        self.hits = self.reused = 0

    def lookup(self, ids: list[int]) -> Prefix:
        """The longest cached start of `ids`."""
        exact = self._entries.get(tuple(ids))
        if exact is not None:
            self._entries.move_to_end(tuple(ids))
            self.hits += 1
            self.reused += len(ids)
            return Prefix(exact.state, len(ids), exact.logp)
        new = np.asarray(ids, dtype=np.int64)
        best, best_key, best_state = 0, None, None
        for key, entry in self._entries.items():
            shared = _shared_length(entry.ids, new)
            shared = min(shared, len(new) - 1)  # at least one token is prefilled: its forward gives the logp
            if shared > best:
                state = self.model.state_prefix(entry.state, len(entry.ids), shared)
                if state is not None:
                    best, best_key, best_state = shared, key, state
        if best_key is None:
            return Prefix()
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused += best
        return Prefix(best_state, best)

    def add(self, ids: list[int], state: Any, logp: torch.Tensor) -> None:
        """Keep the state after `ids` and the log-probabilities after them; evict the least recently used
        entries past the budget (a prompt longer than the whole budget is not kept)."""
        key = tuple(ids)
        if len(ids) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = _Entry(np.asarray(ids, dtype=np.int64), state, logp)
        self._held += len(ids)
        while self._held > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self._held -= len(old.ids)

    def __len__(self) -> int:
        return len(self._entries)


def _shared_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
