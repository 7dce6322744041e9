"""`train.micro_batch: auto`: the search and the memory probe on a real (small) language model."""

import pytest
import torch
from torch import nn

from hanlm.config import load_config
from hanlm.errors import ConfigError
from hanlm.train.autobatch import MemoryProbe, largest_fitting, resolve_micro_batch

VOCAB, BLOCK = 4700, 64  # about the People's Daily character vocabulary


class TinyTransformerLM(nn.Module):
    """One causal transformer layer with the training interface forward(x, y) -> loss."""

    def __init__(self, d: int = 128):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True, dropout=0.0)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x, y):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.layer(self.emb(x), src_mask=mask, is_causal=True)  # (B, T, d)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("limit, upper", [(1, 512), (13, 512), (64, 512), (300, 256), (1000, 1000)])
def test_search_finds_the_largest_fitting_size_in_logarithmic_calls(limit, upper):
    calls = []

    def fits(b):
        calls.append(b)
        return b <= limit

    assert largest_fitting(fits, upper) == min(limit, upper)
    assert len(calls) <= 2 * upper.bit_length() + 1
    assert calls[:3] == [1, 2, 4][: len(calls[:3])]  # it doubles first


def test_search_reports_when_nothing_fits():
    with pytest.raises(ConfigError, match="even one sequence does not fit"):
        largest_fitting(lambda b: False, 64)


def test_probe_measures_memory_that_grows_with_the_batch():
    torch.manual_seed(0)
    probe = MemoryProbe(TinyTransformerLM(), BLOCK, VOCAB, fraction=0.8)
    for b in (1, 64):
        assert probe(b)
    # logits alone take 64 * 64 * 4700 * 4 bytes = 77 MB at b=64
    assert probe.peaks[64] - probe.peaks[1] > 50e6
    assert all(p.grad is None for p in probe.model.parameters()), "the probe leaves no gradients behind"


def test_auto_micro_batch_goes_into_the_resolved_config():
    torch.manual_seed(0)
    model = TinyTransformerLM()
    calibrate = MemoryProbe(model, BLOCK, VOCAB, fraction=0.8)
    calibrate(1)
    calibrate(32)
    per_sequence = (calibrate.peaks[32] - calibrate.peaks[1]) / 31
    budget = int(calibrate.peaks[1] + 20 * per_sequence)  # room for about 20 sequences

    cfg = load_config("tiny", ["train.micro_batch=auto", "train.grad_accum=2"], world_size=2)
    resolved = resolve_micro_batch(cfg, model, VOCAB, budget_bytes=budget)
    b = resolved.train.micro_batch
    assert 4 <= b <= 40
    assert resolved.derived.micro_batch == b and resolved.derived.global_batch == b * 2 * 2
    assert resolved.derived.tokens_per_step == b * 2 * 2 * BLOCK
    assert "micro_batch: " + str(b) in resolved.to_yaml()


def test_a_fixed_micro_batch_is_left_alone():
    cfg = load_config("tiny")
    assert resolve_micro_batch(cfg, TinyTransformerLM(), VOCAB) is cfg
