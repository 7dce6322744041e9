"""Viterbi decoding of a linear chain, batched: the one decoder under the HMM and the neural tagger."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def mask_scores(allowed: Tensor) -> Tensor:
    """A boolean grammar mask as additive log scores: 0 where allowed, -inf where not."""
    return torch.where(allowed, 0.0, float("-inf"))


@torch.no_grad()
def viterbi(emissions: Tensor, lengths: Sequence[int] | Tensor, start: Tensor, transitions: Tensor,
            end: Tensor) -> list[list[int]]:
    """The best state sequence of each row: argmax over paths of
    start[s0] + Σ emissions[t, s_t] + Σ transitions[s_{t-1}, s_t] + end[s_last].

    emissions (B, T, S) log scores, right-padded past each row's length; start, end (S,) and
    transitions (S, S) [previous, next]. Rows are decoded together, one step per position."""
    emissions = emissions.float()
    batch, steps, states = emissions.shape
    lengths = torch.as_tensor(lengths, device=emissions.device)
    transitions, start, end = transitions.float(), start.float(), end.float()
    incoming = transitions.t().contiguous()  # [next, previous]: the max runs over the contiguous axis
    score = start + emissions[:, 0]
    identity = torch.arange(states, device=emissions.device).expand(batch, states)
    pointers = []
    for t in range(1, steps):
        best, arg = (score.unsqueeze(1) + incoming).max(dim=2)
        active = (t < lengths).unsqueeze(1)
        score = torch.where(active, best + emissions[:, t], score)
        pointers.append(torch.where(active, arg, identity))
    state = (score + end).argmax(dim=-1)
    path = torch.empty(batch, steps, dtype=torch.long, device=emissions.device)
    path[:, steps - 1] = state
    for t in range(steps - 1, 0, -1):
        state = pointers[t - 1].gather(1, state.unsqueeze(1)).squeeze(1)
        path[:, t - 1] = state
    return [row[:n].tolist() for row, n in zip(path.cpu(), lengths.tolist())]


def decode_rows(emissions: Sequence[Tensor], start: Tensor, transitions: Tensor, end: Tensor,
                batch: int = 256) -> list[list[int]]:
    """`viterbi` of each row's emissions (N_i, S), rows of similar length padded and decoded together;
    an empty row gives an empty path."""
    paths: list[list[int]] = [[] for _ in emissions]
    for chunk in batched_by_length(len(emissions), [len(e) for e in emissions], batch):
        live = [i for i in chunk if len(emissions[i])]
        if live:
            padded = nn.utils.rnn.pad_sequence([emissions[i] for i in live], batch_first=True)
            for i, path in zip(live, viterbi(padded, [len(emissions[i]) for i in live], start, transitions, end)):
                paths[i] = path
    return paths


def batched_by_length(n: int, lengths: Sequence[int], batch: int) -> list[list[int]]:
    """Indices 0..n-1 grouped into batches of similar length, so little of a padded batch is padding."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[i:i + batch] for i in range(0, n, batch)]
