"""Optimizers and the schedule: Muon beside AdamW, exact resume, the minutes clock."""

import math
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from hanlm.checkpoint import load_checkpoint
from hanlm.config import load_config
from hanlm.errors import CheckpointError, ConfigError
from hanlm.log import read_metrics
from hanlm.models import build_model
from hanlm.train.loop import Trainer
from hanlm.train.optim import MuonAdamW, build_optimizer, lr_at


def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", *overrides])


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("muon") / "run"
    return Trainer(tiny(run_dir, "train.optimizer=muon"), echo=lambda _: None).run()


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = load_config("tiny", ["train.optimizer=muon", "model.tie_embeddings=false"])
    model = build_model(cfg.model, 300)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not muon & adamw and muon | adamw == set(names)
    assert {names[i] for i in muon} == {n for n, p in model.named_parameters()
                                        if p.ndim == 2 and n not in ("tok_emb.weight", "lm_head.weight")}
    assert id(model.tok_emb.weight) in adamw and id(model.lm_head.weight) in adamw
    # One schedule drives both, each at its own peak.
    from hanlm.train.optim import set_lr
    set_lr(opt, 1e-3)
    assert opt.adamw.param_groups[0]["lr"] == 1e-3
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(1e-3 * cfg.train.muon_lr / cfg.train.lr)


def test_muon_trains(muon_run):
    train = [r for r in read_metrics(muon_run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert muon_run.final_eval.loss < math.log(300) + 3


def test_muon_resumes_bit_for_bit(tmp_path, muon_run):
    first = Trainer(tiny(tmp_path, "train.optimizer=muon"), echo=lambda _: None).run(stop_after=20)
    assert first.step == 20
    resumed = Trainer(tiny(tmp_path, "train.optimizer=muon"), resume="auto", echo=lambda _: None).run()
    straight = load_file(os.path.join(muon_run.checkpoint, "model.safetensors"))
    again = load_file(os.path.join(resumed.checkpoint, "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert resumed.final_eval.loss == muon_run.final_eval.loss


def test_resuming_a_muon_run_with_adamw_is_a_clear_error(tmp_path):
    Trainer(tiny(tmp_path, "train.optimizer=muon"), echo=lambda _: None).run(stop_after=2)
    with pytest.raises(CheckpointError, match="does not fit this run"):
        Trainer(tiny(tmp_path), resume="auto", echo=lambda _: None)


def test_muon_with_fsdp_is_refused_by_name():
    with pytest.raises(ConfigError, match="train.optimizer muon .* dist.shard fsdp"):
        load_config("tiny", ["train.optimizer=muon", "dist.shard=fsdp"])


def test_the_minutes_clock_decays_by_time_as_well_as_by_steps():
    cfg = load_config("tiny", ["train.schedule_clock=minutes", "train.max_minutes=10", "train.max_steps=1000",
                               "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    peak = cfg.derived.lr
    assert lr_at(5, cfg, 0.0) == pytest.approx(peak * 6 / 10)  # warm-up counts steps
    assert lr_at(10, cfg, 0.0) == pytest.approx(peak)
    assert lr_at(10, cfg, 300.0) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # half the minutes: cosine midpoint
    assert lr_at(10, cfg, 600.0) == pytest.approx(peak * 0.1)
    assert lr_at(505, cfg, 1.0) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # steps still count when ahead
    wsd = load_config("tiny", ["train.schedule_clock=minutes", "train.max_minutes=10", "train.max_steps=1000",
                               "train.warmup_steps=10", "train.schedule=wsd", "train.decay_frac=0.2",
                               "train.min_lr_ratio=0"])
    assert lr_at(10, wsd, 470.0) == pytest.approx(wsd.derived.lr)
    assert lr_at(10, wsd, 540.0) == pytest.approx(wsd.derived.lr * 0.5)
    with pytest.raises(ConfigError, match="train.max_minutes"):
        load_config("tiny", ["train.schedule_clock=minutes"])


class SteppingClock:
    """time.monotonic that moves one second per call (and real perf_counter): runs that end by time
    end after a known amount of work however loaded the machine is."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now

    perf_counter = staticmethod(time.perf_counter)


def test_a_run_on_the_minutes_clock_records_its_time_and_ends_its_decay(tmp_path, monkeypatch):
    import hanlm.train.loop as loop

    monkeypatch.setattr(loop, "time", SteppingClock())
    run = Trainer(tiny(tmp_path, "train.schedule_clock=minutes", "train.max_minutes=1", "train.max_steps=100000",
                       "train.warmup_steps=2", "log.every_steps=1"), echo=lambda _: None).run()
    assert run.stopped_by == "max_minutes" and 5 < run.step < 60
    elapsed = load_checkpoint(run.checkpoint).train_state["elapsed_s"]
    assert 60.0 <= elapsed < 70.0
    records = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    cfg = load_config(run.run_dir / "config.yaml")
    lrs = [r["lr"] for r in records]
    assert lrs[-1] <= cfg.derived.lr * 0.2
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # after warm-up the lr only falls
