"""The classic recurrent language model: embedding → LSTM → linear head.

Its state is the LSTM's (h, c), each (n_layer, B, n_embd). `log_probs` returns new tensors
(nn.LSTM never writes into the state it is given), so a state can be continued several ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanlm.config import ModelConfig
from hanlm.models.base import LanguageModel
from hanlm.models.loss import SoftTargets, linear_cross_entropy


class LSTMLM(LanguageModel):
    """Multi-layer LSTM language model with dropout on its input and output (Zaremba et al. 2014)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, None
        self.n_layer, self.n_embd = cfg.n_layer, cfg.n_embd
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.n_embd, cfg.n_embd, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        # Small embedding and head (the LSTM keeps PyTorch's uniform init) start the model near uniform.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _features(self, x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The head's input (B, T, C) and the new state."""
        h, state = self.lstm(self.dropout(self.tok_emb(x)), state)
        return self.dropout(h), state

    def forward(self, x: Tensor, y: Tensor | None = None, soft: SoftTargets | None = None) -> Tensor:
        h = self.hidden(x)
        return self.lm_head(h) if y is None else linear_cross_entropy(h, self.lm_head.weight, y, soft=soft)

    def hidden(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The top layer's outputs (B, T, C) from the zero state: what the head reads (a left-to-right
        model: the padding after a row's `lengths` changes nothing before it)."""
        return self._features(x, None)[0]

    def initial_state(self, batch_size: int = 1) -> tuple[Tensor, Tensor]:
        """Zero (h, c), each (n_layer, batch_size, n_embd)."""
        h = self.tok_emb.weight.new_zeros(self.n_layer, batch_size, self.n_embd)
        return h, h.clone()

    def log_probs(self, tokens: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Next-token log-probabilities (B, T, V) after each of `tokens` (B, T), and the new (h, c)."""
        h, state = self._features(tokens, state)
        return F.log_softmax(self.lm_head(h).float(), dim=-1), state

    def decode_step(self, tokens: Tensor, states: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list]:
        """One token for each of B sequences in one LSTM call: `decode_steps` with T = 1."""
        logp, advanced = self.decode_steps(tokens.view(-1, 1), states)
        return logp[:, -1], advanced

    def decode_steps(self, tokens: Tensor, states: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list]:
        """T tokens (B, T) for each of B sequences in one LSTM call: their (h, c) stacked on the batch axis."""
        h = torch.cat([s[0] for s in states], dim=1)
        c = torch.cat([s[1] for s in states], dim=1)
        out, (h, c) = self._features(tokens, (h, c))
        return (F.log_softmax(self.lm_head(out).float(), dim=-1),
                [(h[:, b:b + 1], c[:, b:b + 1]) for b in range(len(states))])

    def flops_per_token(self, seq_len: int) -> float:
        """About 6 × (LSTM weights + V×d head): every weight is used once per token forward (2 FLOPs)
        and twice backward; biases and the gate nonlinearities are counted loosely or not at all.
        seq_len does not matter: the recurrence costs the same at every position."""
        return super().flops_per_token(seq_len)
