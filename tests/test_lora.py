"""LoRA fine-tuning (issue 32): the module's arithmetic, merging, and a classifier fine-tuned on the tiny GPT with
only its low-rank updates and head training; the pretrained weights stay exactly as they were."""

import json
import random

import pytest
import torch
from serve_helpers import checkpoints  # noqa: F401

from hanlm.checkpoint import load_checkpoint
from hanlm.config import load_config
from hanlm.errors import ConfigError
from hanlm.finetune.run import Finetuner
from hanlm.loading import load_classifier, resolve_checkpoint
from hanlm.models import build_model
from hanlm.models.lora import LoRALinear, add_lora, merged_state_dict, trainable_share
from hanlm.tasks.classifier import build_classifier

QUIET = ["log.progress=false", "log.tensorboard=false"]


def test_a_lora_projection_starts_as_its_base_and_merges_to_what_it_computes():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 8, bias=True)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 12)
    assert torch.equal(lora(x), base(x))  # B = 0: the pretrained function
    with torch.no_grad():
        lora.lora_b.normal_()
    merged = merged_state_dict({f"p.{k}": v for k, v in lora.state_dict().items()})
    assert set(merged) == {"p.weight", "p.bias"}
    plain = torch.nn.Linear(12, 8)
    plain.load_state_dict({"weight": merged["p.weight"], "bias": merged["p.bias"]})
    torch.testing.assert_close(plain(x), lora(x), atol=1e-5, rtol=0)
    assert not lora.weight.requires_grad and lora.lora_a.requires_grad and float(lora.lora_scale) == 2.0


def test_add_lora_wraps_the_named_projections_and_freezes_the_rest(people_daily):
    model = build_model(load_config("tiny", ["model.n_kv_head=1"]).model, 300)
    assert add_lora(model, 4, 8.0, ["qkv", "down"]) == 2 * model.n_layer
    trainable, total = trainable_share(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"blocks.{i}.{m}.lora_{ab}" for i in range(2) for m in ("attn.qkv", "mlp.down") for ab in "ab"}
    assert trainable < total / 20


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lora_rank=4", "finetune.lora_targets=[qkv,wq]"], "finetune.lora_targets"),
    (["finetune.lora_rank=4", "finetune.from_scratch=true"], "from_scratch has none to adapt"),
    (["finetune.lora_rank=-1"], "finetune.lora_rank"),
])
def test_impossible_lora_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_an_lstm_has_nothing_to_adapt():
    cfg = load_config("tiny", ["model.arch=lstm", "model.task=classify", "finetune.labels=[a,b]",
                               "finetune.lora_rank=4"])
    with pytest.raises(ConfigError, match="model.arch lstm has none"):
        build_classifier(cfg, 300)


@pytest.fixture(scope="module")
def reviews_file(tmp_path_factory):
    from hanlm.data.corpora import corpus_file

    with open(corpus_file("chn-reviews"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path_factory.mktemp("reviews") / "sample.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in random.Random(0).sample(rows, 2400)),
                    encoding="utf-8")
    return path


def test_a_lora_classifier_learns_with_the_pretrained_weights_untouched(checkpoints, reviews_file, tmp_path, capsys):
    cfg = load_config("tiny", [f"finetune.init_from={checkpoints['gpt']}", f"finetune.run_dir={tmp_path / 'run'}",
                               f"finetune.data=[{reviews_file}]", "finetune.max_length=64", "finetune.micro_batch=32",
                               "finetune.eval_every_steps=1000", "finetune.lr=3e-3", "finetune.epochs=3",
                               "finetune.lora_rank=8", *QUIET])
    result = Finetuner(cfg).run()
    assert "LoRA rank 8 on qkv, proj, gate, up, down" in capsys.readouterr().out
    counts = [sum(row) for row in result.test.confusion]  # a 30-step backbone: above the majority label, clearly
    assert result.test.accuracy > max(counts) / sum(counts) + 0.05, result.test.summary()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["trainable_parameters"] < results["parameters"] / 4 and results["peak_rss_gb"] > 0
    pretrained = load_checkpoint(resolve_checkpoint(checkpoints["gpt"])).weights
    tuned = load_checkpoint(result.checkpoint).weights
    assert torch.equal(tuned["backbone.blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert torch.equal(tuned["backbone.lm_head.weight"], pretrained["lm_head.weight"])  # the tied embedding
    assert tuned["backbone.blocks.1.mlp.down.lora_b"].abs().sum() > 0  # the update learnt something
    classifier = load_classifier(result.checkpoint)  # the checkpoint rebuilds its LoRA shape
    texts = ["这本书很好看，推荐", "质量太差了，不会再买"]
    plain_cfg = load_config("tiny", ["model.task=classify", "finetune.labels=[neg,pos]"])
    plain = build_classifier(plain_cfg, classifier.tokenizer.vocab_size)
    plain.load_state_dict(merged_state_dict(classifier.model.state_dict()))
    from hanlm.tasks.predict import rows_probabilities
    from hanlm.tasks.labelled import encode_texts

    rows = encode_texts(classifier.tokenizer, texts, 64)
    torch.testing.assert_close(rows_probabilities(plain.eval(), rows), classifier.probabilities(texts), atol=1e-5,
                               rtol=0)


def continued(tmp_path, source: str, *overrides):
    return load_config("tiny", [f"train.run_dir={tmp_path}", f"train.init_from={source}", "train.lora_rank=4",
                                "train.max_steps=4", "train.warmup_steps=1", "checkpoint.every_steps=2",
                                "eval.every_steps=4", "log.peak_tflops=0.1", *QUIET, *overrides])


def test_continued_pretraining_with_lora_trains_the_updates_resumes_exactly_and_loads_folded(checkpoints, tmp_path,
                                                                                             capsys):
    from hanlm.export.hf import export_hf
    from hanlm.loading import load_for_inference, open_checkpoint
    from hanlm.train.loop import Trainer

    source = load_checkpoint(resolve_checkpoint(checkpoints["gpt"])).weights
    whole = Trainer(continued(tmp_path / "whole", checkpoints["gpt"])).run()
    assert "LoRA rank 4 on qkv, proj, gate, up, down" in capsys.readouterr().out
    raw = load_checkpoint(whole.checkpoint).weights  # as stored: the frozen weights beside the updates
    assert torch.equal(raw["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    assert raw["blocks.1.attn.qkv.lora_b"].abs().sum() > 0
    folded = open_checkpoint(whole.checkpoint).weights  # as every reader sees it
    assert not any("lora" in k for k in folded)
    assert all(torch.equal(folded[k], v) for k, v in merged_state_dict(raw).items())
    assert not torch.equal(folded["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    Trainer(continued(tmp_path / "halves", checkpoints["gpt"])).run(stop_after=2)
    resumed = Trainer(continued(tmp_path / "halves", checkpoints["gpt"]), resume="auto").run()
    again = load_checkpoint(resumed.checkpoint).weights
    assert resumed.step == 4 and all(torch.equal(again[k], raw[k]) for k in raw)
    model, _, _ = load_for_inference(whole.checkpoint)
    exported = export_hf(whole.checkpoint, tmp_path / "hf")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(exported / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"],
                       folded["blocks.1.mlp.down.weight"])
    assert model.blocks[0].attn.qkv.weight.shape == folded["blocks.0.attn.qkv.weight"].shape


@pytest.mark.parametrize("overrides, message", [
    (["train.lora_rank=4"], "set train.init_from"),
    (["train.lora_rank=4", "train.init_from=runs/x", "model.arch=encoder", "train.objective=electra"],
     "would adapt a fresh generator"),
    (["train.lora_rank=4", "train.init_from=runs/x", "dist.sync=diloco"], "dist.sync diloco is for training every"),
])
def test_impossible_continued_lora_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
