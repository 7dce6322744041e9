"""The neural taggers' CRF output layer against brute force: its log-partition is the log-sum-exp over every
path, and its Viterbi path the best of them, on tiny inputs; forbidden transitions get no probability."""

from __future__ import annotations

import itertools

import torch

from hanlm.tasks.bmes import allowed_transitions
from hanlm.tasks.crf_layer import CRFLayer


def layer(tags=("B", "M", "E", "S"), seed=0) -> CRFLayer:
    torch.manual_seed(seed)
    crf = CRFLayer(allowed_transitions(list(tags)))
    for p in crf.parameters():
        p.data.normal_()
    return crf


def brute_force(crf: CRFLayer, emissions: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int]]:
    """(log Σ exp(score) over every path of length n, the best path) by enumerating them all."""
    states = emissions.size(-1)
    scores = {}
    for path in itertools.product(range(states), repeat=n):
        tags = torch.tensor([path + (0,) * (emissions.size(1) - n)])
        scores[path] = crf.path_score(emissions, tags, torch.tensor([n]))[0]
    stacked = torch.stack(list(scores.values()))
    return torch.logsumexp(stacked, 0), list(max(scores, key=lambda p: scores[p].item()))


def test_the_log_partition_and_viterbi_equal_brute_force_on_every_length():
    crf = layer()
    torch.manual_seed(1)
    emissions = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 3, 1])
    partition = crf.log_partition(emissions, lengths)
    paths = crf.decode(emissions, lengths)
    for row, n in enumerate(lengths.tolist()):
        expected, best = brute_force(crf, emissions[row:row + 1], n)
        assert torch.allclose(partition[row], expected, atol=1e-5), (row, partition[row], expected)
        assert paths[row] == best


def test_forbidden_paths_get_no_probability_and_the_gold_path_gains_it():
    crf = layer()
    emissions = torch.zeros(1, 2, 4)
    # S then M is outside the BMES grammar: its score is -inf, so it adds nothing to the partition
    impossible = crf.path_score(emissions, torch.tensor([[3, 1]]), torch.tensor([2]))
    assert impossible.item() == float("-inf")
    gold = torch.tensor([[0, 2, 3]])  # B E S
    crf = CRFLayer(allowed_transitions(["B", "M", "E", "S"]))  # all scores 0: every grammatical path alike
    x = torch.zeros(1, 3, 4, requires_grad=True)
    optimizer = torch.optim.SGD([x, *crf.parameters()], lr=0.5)
    before = crf.loss(x, gold, torch.tensor([3])).item()
    for _ in range(20):
        optimizer.zero_grad()
        crf.loss(x, gold, torch.tensor([3])).backward()
        optimizer.step()
    assert crf.loss(x, gold, torch.tensor([3])).item() < before / 4
    assert crf.decode(x, torch.tensor([3])) == [[0, 2, 3]]
