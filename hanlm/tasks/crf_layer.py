"""A linear-chain CRF output layer for neural taggers (Lample et al. 2016, "Neural Architectures for Named
Entity Recognition"; Huang et al. 2015 for BiLSTM-CRF): learned start, transition and end scores over the
tags, trained by the negative log-likelihood of the gold path (the forward algorithm's log-partition
minus the path's score), decoded by Viterbi. Transitions the tag grammar forbids (`allowed`, e.g. M after
S in BMES) stay at -inf: every decoded path is grammatical, and no probability goes to impossible ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hanlm.tasks.viterbi import mask_scores, viterbi


class CRFLayer(nn.Module):
    """Scores of tag sequences: start[s0] + Σ emissions[t, s_t] + Σ transitions[s_{t-1}, s_t] + end[s_last]."""

    def __init__(self, allowed: tuple[Tensor, Tensor, Tensor]):
        super().__init__()
        start, transitions, end = allowed
        self.start = nn.Parameter(torch.zeros(start.shape))
        self.transitions = nn.Parameter(torch.zeros(transitions.shape))
        self.end = nn.Parameter(torch.zeros(end.shape))
        for name, mask in (("start_mask", start), ("transitions_mask", transitions), ("end_mask", end)):
            self.register_buffer(name, mask_scores(mask), persistent=False)

    def scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """The learned start, transition and end scores with the grammar's -inf added."""
        return (self.start + self.start_mask, self.transitions + self.transitions_mask, self.end + self.end_mask)

    def log_partition(self, emissions: Tensor, lengths: Tensor) -> Tensor:
        """log Σ over every path of exp(score), for each row (B,), by the forward algorithm; emissions (B, N, S)
        right-padded past each row's length (at least 1)."""
        start, transitions, end = self.scores()
        emissions = emissions.float()
        alpha = start + emissions[:, 0]  # (B, S)
        for t in range(1, emissions.size(1)):
            step = torch.logsumexp(alpha.unsqueeze(2) + transitions, dim=1) + emissions[:, t]  # (B, S)
            alpha = torch.where((t < lengths.to(alpha.device)).unsqueeze(1), step, alpha)
        return torch.logsumexp(alpha + end, dim=1)

    def path_score(self, emissions: Tensor, tags: Tensor, lengths: Tensor) -> Tensor:
        """The score of each row's tag path (B,); tags (B, N), anything past a row's length ignored."""
        start, transitions, end = self.scores()
        emissions = emissions.float()
        n = emissions.size(1)
        live = torch.arange(n, device=emissions.device)[None, :] < lengths.to(emissions.device)[:, None]
        safe = tags.clamp(min=0)
        zero = emissions.new_zeros(())
        # where, not a product: a padded position's transition may be -inf, and -inf × 0 is nan
        emitted = torch.where(live, emissions.gather(2, safe.unsqueeze(2)).squeeze(2), zero).sum(1)
        moves = torch.where(live[:, 1:], transitions[safe[:, :-1], safe[:, 1:]], zero).sum(1)
        last = safe.gather(1, (lengths.to(emissions.device) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return start[safe[:, 0]] + emitted + moves + end[last]

    def loss(self, emissions: Tensor, tags: Tensor, lengths: Tensor) -> Tensor:
        """The negative log-likelihood of the gold paths per character (mean over the batch's characters)."""
        nll = self.log_partition(emissions, lengths) - self.path_score(emissions, tags, lengths)
        return nll.sum() / lengths.sum().clamp(min=1).to(nll.device)

    @torch.no_grad()
    def decode(self, emissions: Tensor, lengths: Tensor) -> list[list[int]]:
        """The best path of each row under the learned scores."""
        return viterbi(emissions, lengths, *self.scores())
