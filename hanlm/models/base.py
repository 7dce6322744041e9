"""The interface every neural language model offers to training, eval, generation and serving."""

from __future__ import annotations

from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from hanlm.models.vectors import VectorReport


class LanguageModel(nn.Module, metaclass=ABCMeta):
    """What training, eval, generation and serving see.

    Subclasses set `vocab_size`, `context_length`, `tok_emb` (the input embedding) and
    `lm_head` (the output projection; it *is* `tok_emb.weight` when embeddings are tied).
    """

    vocab_size: int
    context_length: int | None  # longest input the model accepts; None = unbounded
    tok_emb: nn.Embedding
    lm_head: nn.Linear
    vector_report: VectorReport | None = None  # set by build_model when pretrained vectors were loaded
    eval_block_size: int | None = None  # evaluation windows of this length instead of train.block_size
    generates: bool = True  # False for a bidirectional encoder: it reads both sides and predicts no next token

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x, y: (B, T) int64. With y: the mean cross-entropy over positions where y != -1
        (float32 scalar). Without y: logits (B, T, V)."""

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The hidden states (B, T, C) the output head reads, for x (B, T) int64, right-padded rows of
        `lengths` (B,) when given: what a task head (hanlm.tasks) builds on. Networks override it; other
        models have none."""
        raise TypeError(f"{type(self).__name__} has no hidden states for a task head; use a gpt or lstm model")

    @abstractmethod
    def initial_state(self, batch_size: int = 1) -> Any:
        """The state before any token (empty cache / zero hidden state), on the model's device."""

    @abstractmethod
    def log_probs(self, tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Continue the sequences in `state` with `tokens` (B, T) int64.

        Returns float32 log-probabilities of the next token after each position, (B, T, V), and
        the advanced state; the state passed in stays valid. Call under torch.no_grad().
        """

    def decode_step(self, tokens: Tensor, states: list[Any]) -> tuple[Tensor, list[Any]]:
        """One new token for each of B independent sequences, `tokens` (B,), each continuing its
        own state (states may be at different positions). Returns the next-token log-probabilities
        (B, V) and the advanced states; the states passed in stay valid. This default runs the
        sequences one by one; models that can batch them override it."""
        rows, advanced = [], []
        for token, state in zip(tokens, states):
            logp, state = self.log_probs(token.view(1, 1), state)
            rows.append(logp[0, -1])
            advanced.append(state)
        return torch.stack(rows), advanced

    def decode_steps(self, tokens: Tensor, states: list[Any]) -> tuple[Tensor, list[Any]]:
        """T new tokens (B, T) for each of B independent sequences: log-probabilities after each
        (B, T, V) and the states advanced by T. This default runs the sequences one by one."""
        rows, advanced = [], []
        for row, state in zip(tokens, states):
            logp, state = self.log_probs(row.view(1, -1), state)
            rows.append(logp[0])
            advanced.append(state)
        return torch.stack(rows), advanced

    def rewound(self, before: Any, after: Any, tokens: Tensor, keep: int) -> Any:
        """The state after only the first `keep` of `tokens` (B, T), given the state `before` them and
        `after` all of them: speculative decoding's rollback past a rejected draft. This default
        feeds the kept tokens again; models whose state can be cut (the GPT's cache) override it."""
        if keep == tokens.size(1):
            return after
        return before if keep == 0 else self.log_probs(tokens[:, :keep], before)[1]

    def decode_batch(self, capacity: int, *, compile: bool = False) -> DecodeBatch:
        """A batch of up to `capacity` sequences decoded together (generation, the server). This default keeps
        each sequence's own state and advances them with `decode_step(s)`; the GPT overrides it with one
        preallocated cache for the whole batch. `compile` asks for a compiled step; models without one ignore it."""
        return RowsBatch(self)

    def state_prefix(self, state: Any, length: int, keep: int) -> Any | None:
        """The state after only the first `keep` of the `length` tokens `state` holds, without recomputing
        them (a cached prompt's shared prefix), or None where the state cannot be cut (this default, unless
        keep == length)."""
        return state if keep == length else None

    def token_log_probs(self, x: Tensor, y: Tensor, state: Any) -> Tensor:
        """log p(y[b, t] | state, x[b, :t+1]) for every position, (B, T); 0 where y == -1.

        What evaluation needs; models that can score targets without the whole distribution
        (the n-gram) override it."""
        logp, _ = self.log_probs(x, state)
        picked = logp.float().gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return picked.masked_fill(y < 0, 0.0)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (CPU for a model without any, such as the n-gram)."""
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def tied(self) -> bool:
        """Whether the output projection shares its weight with the input embedding."""
        return self.lm_head.weight is self.tok_emb.weight

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; a tied weight counts once. embeddings=False leaves out the input
        embedding (and so, when tied, the head that shares it)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n if embeddings else n - self.tok_emb.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 per weight that multiplies an activation,
        i.e. 6 × (non-embedding parameters + the V×d head, counted whether tied or not). The embedding
        lookup is free. Subclasses add what is not a weight (attention scores)."""
        head = self.lm_head.weight.numel() if self.tied else 0  # untied: already in num_params
        return 6.0 * (self.num_params(embeddings=False) + head)



class DecodeBatch(ABC):
    """Sequences decoded together, one row each in the order they were admitted: what generation and the
    server's continuous batching advance one forward at a time."""

    compile_seconds: float = 0.0  # spent compiling steps (a compiled batch; see hanlm.models.slot_cache)

    @abstractmethod
    def __len__(self) -> int:
        """The rows now in the batch."""

    @abstractmethod
    def admit(self, state: Any, length: int) -> None:
        """Add a row that continues `state` (a `log_probs` state of batch size 1 holding `length` tokens)."""

    @abstractmethod
    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (increasing), which become rows 0 … len(rows) − 1; the others leave."""

    @abstractmethod
    def step(self, tokens: Tensor) -> Tensor:
        """Advance every row by its T tokens, `tokens` (B, T) with B = len(self): the log-probabilities after
        each (B, T, V), float32."""

    @abstractmethod
    def cut(self, row: int, keep: int) -> None:
        """After a `step`, `row` keeps only the first `keep` of that step's tokens (a rejected draft leaves)."""


class RowsBatch(DecodeBatch):
    """Each row's own state, advanced by the model's `decode_step` (T = 1) or `decode_steps`."""

    def __init__(self, model: LanguageModel):
        self.model = model
        self.states: list[Any] = []
        self._before: list[Any] = []  # the states before the last step, and its tokens: what `cut` rewinds
        self._tokens: Tensor | None = None

    def __len__(self) -> int:
        return len(self.states)

    def admit(self, state: Any, length: int) -> None:
        self.states.append(state)

    def keep(self, rows: Sequence[int]) -> None:
        self.states = [self.states[i] for i in rows]
        self._before, self._tokens = [], None

    def step(self, tokens: Tensor) -> Tensor:
        self._before, self._tokens = self.states, tokens
        if tokens.size(1) == 1:
            logp, self.states = self.model.decode_step(tokens.view(-1), self.states)
            return logp[:, None]
        logp, self.states = self.model.decode_steps(tokens, self.states)
        return logp

    def cut(self, row: int, keep: int) -> None:
        if self._tokens is None:
            raise RuntimeError("cut follows a step")
        self.states[row] = self.model.rewound(self._before[row], self.states[row], self._tokens[row:row + 1], keep)
