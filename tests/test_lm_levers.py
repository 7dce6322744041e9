"""The language-model quality levers of issue 34: weight averaging, distillation from an n-gram, and the choice
of a run's checkpoint by the held-out tune split."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hanlm.checkpoint import load_checkpoint, load_weights, read_best
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.shards import open_split
from hanlm.errors import CheckpointError, ConfigError
from hanlm.eval import evaluate, split_characters
from hanlm.log import read_metrics
from hanlm.models import build_model
from hanlm.models.loss import SoftTargets, linear_cross_entropy
from hanlm.state_file import load_state
from hanlm.train.distill import NGramTeacher
from hanlm.train.ema import WeightAverage, ema_beta
from hanlm.train.loop import Trainer


def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", *overrides])


def quiet(_):
    return None


# -- weight averaging ---------------------------------------------------------------------------------


def test_the_average_is_the_hand_computed_one_and_swaps_back_bit_for_bit():
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = WeightAverage(model, decay=0.9)
    expected = dict(start)
    for step in (1, 2, 3, 50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        beta = min(0.9, (1 + step) / (10 + step))
        assert beta == ema_beta(0.9, step)
        expected = {n: beta * expected[n] + (1 - beta) * p.detach() for n, p in model.named_parameters()}
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.applied():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])


@pytest.mark.parametrize("damage, refusal", [
    (lambda live: live.pop("bias"), "live weights do not match this model's parameters"),
    (lambda live: live.update(extra=torch.zeros(1)), "live weights do not match this model's parameters"),
    (lambda live: live.update(bias=torch.zeros(3)), r"live weight bias has shape \(3,\), this model \(2,\)"),
])
def test_saved_live_weights_of_another_model_are_refused_by_name_and_leave_the_model_as_it_was(damage, refusal):
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    live = {n: v + 1 for n, v in average.live_state().items()}  # other values: a partial copy would show
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    damage(live)
    with pytest.raises(CheckpointError, match=f"^ckpt/step-9: the saved {refusal}"):
        average.resume(live, "ckpt/step-9")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    return Trainer(tiny(run_dir, "train.ema_decay=0.9"), echo=quiet).run()


def test_an_averaged_run_saves_the_average_and_keeps_the_live_weights_for_resume(ema_run):
    weights = load_file(os.path.join(ema_run.checkpoint, "model.safetensors"))
    live = load_state(os.path.join(ema_run.checkpoint, "train_state.safetensors"))["ema_live"]
    shared = set(live) & set(weights)  # (a tied embedding is stored once, under the head's name)
    assert len(shared) >= len(live) - 1
    assert any(not torch.equal(weights[n], live[n]) for n in shared)  # the file holds the average, not the live
    # The final evaluation scored what the checkpoint holds.
    ckpt = load_checkpoint(ema_run.checkpoint)
    model = build_model(ckpt.config.model, ckpt.tokenizer.vocab_size)
    load_weights(model, ckpt.weights, ckpt.path)
    prepared = prepare(ckpt.config)
    again = evaluate(model, open_split(prepared.directory, "val"), block_size=ckpt.config.train.block_size,
                     batch_size=ckpt.config.eval.batch_size, characters=split_characters(prepared.meta, "val"),
                     max_batches=ckpt.config.eval.final_max_batches)
    assert math.isclose(again.loss, ema_run.final_eval.loss, rel_tol=1e-6)


def test_an_averaged_run_resumes_exactly(tmp_path, ema_run):
    Trainer(tiny(tmp_path, "train.ema_decay=0.9"), echo=quiet).run(stop_after=20)
    resumed = Trainer(tiny(tmp_path, "train.ema_decay=0.9"), resume="auto", echo=quiet).run()
    straight = load_file(os.path.join(ema_run.checkpoint, "model.safetensors"))
    again = load_file(os.path.join(resumed.checkpoint, "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


def test_resuming_an_averaged_run_without_averaging_is_refused_by_name(tmp_path):
    Trainer(tiny(tmp_path, "train.ema_decay=0.9", "train.max_steps=4", "checkpoint.every_steps=2"),
            echo=quiet).run(stop_after=2)
    with pytest.raises(CheckpointError, match="train.ema_decay"):
        Trainer(tiny(tmp_path, "train.max_steps=4", "checkpoint.every_steps=2"), resume="auto", echo=quiet)


def test_averaging_with_sharded_weights_is_refused():
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config("tiny", ["train.ema_decay=0.99", "dist.shard=fsdp"])


# -- distillation -------------------------------------------------------------------------------------


def test_the_distillation_loss_and_its_gradients_equal_a_hand_computation():
    torch.manual_seed(0)
    N, d, V, k, a = 37, 8, 50, 5, 0.3
    h = torch.randn(N, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[3] = -1  # an ignored position
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(N)])
    probs = torch.softmax(torch.randn(N, k), -1) * torch.rand(N, 1)  # what the teacher keeps of its mass
    fused = linear_cross_entropy(h, w, y, chunk_rows=16, soft=SoftTargets(ids, probs, a))
    fused.backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None

    logp = F.log_softmax(h @ w.T, -1)
    keep = y.ne(-1)
    data = -logp[keep].gather(1, y[keep, None]).squeeze(1)
    teacher = -(logp[keep].gather(1, ids[keep]) * probs[keep]).sum(1)
    hand = ((1 - a * probs[keep].sum(1)) * data + a * teacher).mean()
    hand.backward()
    torch.testing.assert_close(fused, hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-6)
    # Weight 0 is the plain loss.
    plain = linear_cross_entropy(h.detach(), w.detach(), y, soft=SoftTargets(ids, probs, 0.0))
    torch.testing.assert_close(plain, linear_cross_entropy(h.detach(), w.detach(), y), rtol=1e-6, atol=1e-6)


def test_the_teacher_gives_the_ngrams_top_k(people_daily):
    from hanlm.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer("char", people_daily[:300])
    tokens = tokenizer.encode_documents(people_daily[:300])
    teacher = NGramTeacher.count(tokens, tokenizer.vocab_size, order=4, weight=0.25, top_k=8)
    x = torch.from_numpy(tokens[:64].astype(np.int64)).view(2, 32)
    soft = teacher.targets(x)
    assert soft.ids.shape == soft.probs.shape == (2, 32, 8) and soft.weight == 0.25
    full, _ = teacher.model.log_probs(x, teacher.model.initial_state(2))  # the model's whole distributions
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(2, 32))
    # The 8 most likely tokens with their own probabilities (float32 against float64: a near-tie may swap two).
    torch.testing.assert_close(soft.probs, full.topk(8, -1).values.exp(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(soft.probs, full.exp().gather(-1, soft.ids), rtol=1e-4, atol=1e-6)
    assert (soft.ids == full.topk(8, -1).indices).float().mean() > 0.98
    assert bool((soft.probs.sum(-1) <= 1 + 1e-6).all())


def test_a_distilled_run_trains_and_says_what_its_teacher_is(tmp_path):
    messages = []
    run = Trainer(tiny(tmp_path, "train.distill_weight=0.3", "train.distill_order=3", "train.max_steps=20"),
                  echo=messages.append).run()
    assert any("distillation: a 3-gram teacher" in m for m in messages)
    train = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    vocab = load_checkpoint(run.checkpoint).tokenizer.vocab_size
    assert run.final_eval.loss < math.log(vocab) - 1.0


def test_distillation_into_a_model_that_cannot_take_it_is_refused_and_what_inherits_it_is_not():
    with pytest.raises(ConfigError, match="train.distill_weight"):
        load_config("tiny", ["train.distill_weight=0.3", "model.arch=encoder", "train.objective=mlm"])
    # An n-gram counted from a distilled run's config (hanlm mix) and a classifier fine-tuned from its checkpoint
    # inherit the key without using it.
    load_config("tiny", ["train.distill_weight=0.3", "model.arch=ngram", "model.order=5"])
    load_config("tiny", ["train.distill_weight=0.3", "model.task=classify", "finetune.labels=[neg,pos]"])


# -- which checkpoint a run directory gives ------------------------------------------------------------


def test_checkpoints_are_ranked_by_the_tune_split(ema_run):
    evals = [r for r in read_metrics(ema_run.run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert all("tune_loss" in r for r in evals)
    root = str(ema_run.run_dir / "checkpoints")
    name, loss = read_best(root)
    assert loss == min(r["tune_loss"] for r in evals)
    manifest = json.loads((ema_run.run_dir / "checkpoints" / name / "manifest.json").read_text())
    assert manifest["selected_on"] == "tune" and manifest["val_loss"] == loss
