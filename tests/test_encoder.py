"""Bidirectional encoders pretrained with masked objectives (issue 30): the masks, the losses, whole-word
masking, ELECTRA, exact resume, DDP, fine-tuning on an encoder, and refusals that name the key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.segmenters import segment_words
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import ConfigError
from hanlm.models import Encoder, build_for_training
from hanlm.models.encoder import MASK_ID
from hanlm.models.masking import FIRST_ORDINARY, Masker
from hanlm.train.loop import Trainer

quiet = lambda _: None  # noqa: E731


def tiny(run_dir, objective="mlm", *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "model.arch=encoder", f"train.objective={objective}",
                                "train.max_steps=8", "checkpoint.every_steps=4", "eval.every_steps=4",
                                "log.peak_tflops=0.1", *overrides])


@pytest.fixture(scope="module")
def tokenizer(people_daily):
    return train_tokenizer("char", people_daily[:2000])


@pytest.fixture(scope="module")
def batch(people_daily, tokenizer):
    """32 rows of 64 People's Daily tokens, each row opening with the <eos> that separates documents."""
    rows = [[3, *tokenizer.encode(doc)][:64] for doc in people_daily[:200] if len(doc) > 70][:32]
    return torch.tensor(rows)


def test_mlm_masks_only_allowed_positions_at_the_rate_and_80_10_10(batch, tokenizer):
    masker = Masker(0.15, tokenizer.vocab_size)
    inputs, targets = masker(batch.repeat(20, 1), torch.Generator().manual_seed(0))
    original = batch.repeat(20, 1)
    chosen = targets.ne(-1)
    assert not chosen[original < FIRST_ORDINARY].any() and chosen[:, 0].sum() == 0  # <eos> is never masked
    assert torch.equal(targets[chosen], original[chosen])
    assert abs(chosen.float().mean().item() - 0.15 * (original >= FIRST_ORDINARY).float().mean().item()) < 0.01
    masked, kept = inputs[chosen].eq(MASK_ID).float().mean(), inputs[chosen].eq(original[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.03 and 0.09 < kept < 0.13  # 10% stay, plus random draws of the same token
    assert torch.equal(inputs[~chosen], original[~chosen])


def test_mlm_loss_equals_a_hand_computation(batch, tokenizer):
    torch.manual_seed(0)
    model = build_for_training(tiny("unused"), tokenizer.vocab_size)
    assert isinstance(model, Encoder) and not model.generates
    inputs, targets = Masker(0.15, tokenizer.vocab_size)(batch, torch.Generator().manual_seed(1))
    logits = model(inputs)  # (B, T, V)
    by_hand = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
    assert torch.allclose(model(inputs, targets), by_hand, atol=1e-5)


def test_the_encoder_reads_both_sides_and_ignores_padding(tokenizer, batch):
    torch.manual_seed(0)
    model = build_for_training(tiny("unused"), tokenizer.vocab_size).eval()
    x = batch[:2, :20].clone()
    before = model.hidden(x)
    x2 = x.clone()
    x2[:, -1] = 5  # a change at the end reaches the first position: no causal mask
    assert not torch.allclose(before[:, 0], model.hidden(x2)[:, 0])
    padded = torch.cat([x, torch.zeros(2, 7, dtype=torch.long)], 1)
    h = model.hidden(padded, torch.tensor([20, 20]))
    assert torch.allclose(h[:, :20], before, atol=1e-5)


def test_whole_word_masking_masks_whole_segmenter_words(batch, tokenizer):
    masker = Masker(0.3, tokenizer.vocab_size, tokenizer, "jieba")
    inputs, targets = masker(batch, torch.Generator().manual_seed(2))
    chosen = targets.ne(-1)
    words_seen = multi = 0
    for row, picked in zip(batch.tolist(), chosen.tolist()):
        text = tokenizer.decode(row[1:])
        at = 1
        for word in segment_words([text])[0]:
            span = picked[at:at + len(word)]
            assert all(span) or not any(span), f"{word!r} is partly masked"
            words_seen += any(span)
            multi += any(span) and len(word) > 1
            at += len(word)
    assert words_seen > 50 and multi > 20  # whole multi-character words were masked together


def test_masking_refuses_rates_and_tokenizers_it_cannot_use(people_daily):
    for rate in (0.0, 1.0):
        with pytest.raises(ConfigError, match="train.mask_rate"):
            Masker(rate, 100)
    bpe = train_tokenizer("bpe", people_daily[:200], vocab_size=400)
    with pytest.raises(ConfigError, match="train.mask_whole_words .* needs tokenizer.kind char, not bpe"):
        Masker(0.15, bpe.vocab_size, bpe, "jieba")


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=encoder", "train.objective=mlm", "train.mask_rate=0"], "train.mask_rate must be > 0.0"),
    (["model.arch=encoder", "train.objective=mlm", "train.mask_rate=1"], "train.mask_rate must be <= 0.9"),
    (["model.arch=encoder", "train.objective=electra", "train.electra_generator=1.5"],
     "train.electra_generator must be <= 1.0"),
    (["model.arch=ngram", "train.objective=mlm"], "train.objective mlm pretrains an encoder"),
    (["model.arch=gpt", "train.objective=electra"], "train.objective electra pretrains an encoder"),
    (["model.arch=encoder"], "set train.objective=mlm or train.objective=electra"),
    (["train.mask_whole_words=jieba"], "train.mask_whole_words applies to train.objective mlm or electra"),
])
def test_hostile_encoder_configs_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


@pytest.fixture(scope="module")
def electra_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("electra") / "run"
    return Trainer(tiny(run_dir, "electra"), echo=quiet).run()


def test_electra_trains_its_generator_and_discriminator(electra_run):
    weights = load_file(f"{electra_run.checkpoint}/model.safetensors")
    assert any(k.startswith("generator.") for k in weights) and "rtd_head.weight" in weights
    final = electra_run.final_eval
    assert final.rtd_accuracy is not None and final.rtd_accuracy > 0.5 and final.tokens > 1000
    assert electra_run.samples == []  # an encoder writes no sample continuations


def test_electra_resumes_bit_for_bit(electra_run, tmp_path):
    first = Trainer(tiny(tmp_path, "electra"), echo=quiet).run(stop_after=4)
    assert first.step == 4
    resumed = Trainer(tiny(tmp_path, "electra"), resume="auto", echo=quiet).run()
    straight = load_file(f"{electra_run.checkpoint}/model.safetensors")
    again = load_file(f"{resumed.checkpoint}/model.safetensors")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name


def test_an_encoder_is_evaluated_on_its_objective_and_refused_by_generation(electra_run, capsys):
    assert main(["eval", str(electra_run.run_dir), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"loss", "masked_accuracy", "tokens", "rtd_accuracy"}
    assert main(["generate", str(electra_run.run_dir), "--prompt", "中国"]) == 2
    captured = capsys.readouterr()
    assert "model.arch encoder or bert) reads both sides" in captured.err and "中国" not in captured.out


def test_two_processes_of_ddp_pretrain_an_encoder_as_one_does(tmp_path):
    def run(directory, *args):
        done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "tiny", "--set",
                               f"train.run_dir={directory}", "--set", "model.arch=encoder", "--set",
                               "train.objective=mlm", "--set", "train.max_steps=6", "--set", "log.peak_tflops=0.1",
                               "--set", "log.progress=false", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return load_file(str(directory / "checkpoints" / "step-00000006" / "model.safetensors"))

    two = run(tmp_path / "two", "--nproc", "2", "--set", "train.micro_batch=4")
    one = run(tmp_path / "one", "--set", "train.micro_batch=8")
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


def test_a_classifier_fine_tunes_on_an_encoder_and_classifies(electra_run, tmp_path, capsys):
    from hanlm.finetune.run import Finetuner
    from hanlm.loading import load_classifier

    cfg = load_config("tiny", [f"finetune.init_from={electra_run.run_dir}", f"finetune.run_dir={tmp_path}",
                               "finetune.max_length=48", "finetune.epochs=0.02", "finetune.pooling=first",
                               "finetune.eval_every_steps=1000", "finetune.micro_batch=16"])
    result = Finetuner(cfg, echo=quiet).run()
    classifier = load_classifier(str(result.run_dir))
    assert classifier.model.backbone.__class__.__name__ == "Encoder"
    (record,) = classifier.classify(["这本书很好看，推荐"])
    assert record["label"] in ("pos", "neg") and abs(sum(record["probabilities"].values()) - 1) < 1e-5


def test_an_entity_tagger_fine_tunes_on_an_encoder_with_the_crf_layer_and_bigrams(electra_run, tmp_path):
    from hanlm.data.corpora import corpus_file
    from hanlm.finetune.run import Finetuner
    from hanlm.loading import load_entity_tagger

    with open(corpus_file("people-daily-1998-ner"), encoding="utf-8") as f:
        (tmp_path / "ner.jsonl").write_text("".join(next(f) for _ in range(300)), encoding="utf-8")
    cfg = load_config("tiny", ["finetune.task=ner", f"finetune.init_from={electra_run.run_dir}",
                               f"finetune.data=[{tmp_path / 'ner.jsonl'}]", f"finetune.run_dir={tmp_path / 'run'}",
                               "finetune.max_length=48", "finetune.epochs=0.2", "finetune.micro_batch=16",
                               "finetune.eval_every_steps=1000", "finetune.tag_crf=true", "finetune.tag_bigrams=true"])
    result = Finetuner(cfg, echo=quiet).run()
    tagger, ner_cfg, _ = load_entity_tagger(str(result.run_dir))
    assert ner_cfg.model.arch == "encoder" and tagger.tagger.model.backbone.__class__.__name__ == "Encoder"
    text = "江泽民主席在北京会见客人"
    (found,) = tagger.entities([text])
    assert all(0 <= e.start < e.end <= len(text) and e.type in ("PER", "LOC", "ORG") for e in found)
