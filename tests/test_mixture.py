"""Neural + n-gram mixtures: a proper distribution, eval by hand, `hanlm mix` and its refusals."""

import json
import math

import numpy as np
import pytest
import torch

from hanlm.loading import load_for_inference
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import CheckpointError, ConfigError
from hanlm.eval import evaluate
from hanlm.models import build_model
from hanlm.models.mixture import MixtureLM, fit_weights
from hanlm.models.ngram import estimate
from hanlm.train.loop import Trainer
from hanlm.train.ngram import train_ngram


@pytest.fixture(scope="module")
def parts(people_daily):
    """A randomly initialised tiny GPT and a 3-gram counted from 2,000 real documents, one vocabulary."""
    tokenizer = train_tokenizer("char", people_daily[:2000])
    tokens = tokenizer.encode_documents(people_daily[:2000])
    ngram, _ = estimate(np.asarray(tokens, dtype=np.int64), tokenizer.vocab_size, 3)
    torch.manual_seed(0)
    neural = build_model(load_config("tiny").model, tokenizer.vocab_size).eval()
    held = np.asarray(tokenizer.encode_documents(people_daily[2000:2040]), dtype=np.int64)
    return neural, ngram.eval(), tokenizer, held


def test_the_mixture_is_a_distribution_in_random_contexts(parts):
    neural, ngram, tokenizer, held = parts
    mixture = MixtureLM(neural, ngram, [0.2, 0.5, 0.9])
    rng = np.random.default_rng(1)
    contexts = torch.from_numpy(rng.integers(4, tokenizer.vocab_size, size=(4, 12)))
    with torch.no_grad():
        logp, _ = mixture.log_probs(contexts, mixture.initial_state(4))
    assert logp.shape == (4, 12, tokenizer.vocab_size)
    assert torch.allclose(logp.double().exp().sum(-1), torch.ones(4, 12, dtype=torch.float64), atol=1e-5)


def test_the_mixtures_eval_equals_a_hand_computation(parts):
    neural, ngram, _, held = parts
    weights = [0.3, 0.6, 0.8]
    mixture = MixtureLM(neural, ngram, weights)
    text = held[:41]
    # By hand: each part's probability of the next token given everything before it, mixed by the
    # weight of the n-gram's longest known context there.
    x, y = torch.from_numpy(text[:-1])[None], text[1:]
    with torch.no_grad():
        pn = neural.log_probs(x, neural.initial_state(1))[0][0].double().exp()
    pg = ngram.log_probs(x, ngram.initial_state(1))[0][0].double().exp()
    known = ngram.known_context(np.zeros(0, dtype=np.int64), text[:-1])
    nll = -sum(math.log(weights[k] * pn[t, w] + (1 - weights[k]) * pg[t, w])
               for t, (w, k) in enumerate(zip(y, known)))
    result = evaluate(mixture, text, block_size=64, batch_size=2, characters=40)
    assert result.tokens == 40
    assert result.loss == pytest.approx(nll / 40, rel=1e-6)
    assert result.bpc == pytest.approx(nll / 40 / math.log(2), rel=1e-6)


def test_decoding_step_by_step_matches_the_whole_sequence(parts):
    neural, ngram, _, held = parts
    mixture = MixtureLM(neural, ngram, [0.5])
    ids = torch.from_numpy(held[:10])
    with torch.no_grad():
        whole, _ = mixture.log_probs(ids[None], mixture.initial_state(1))
        _, state = mixture.log_probs(ids[None, :6], mixture.initial_state(1))
        rows, states = mixture.decode_step(ids[6:7], [state])
    assert torch.allclose(rows[0], whole[0, 6], atol=1e-5)


def test_em_gives_the_better_part_the_weight():
    rng = np.random.default_rng(0)
    good = np.log(rng.uniform(0.3, 0.9, 5000))
    bad = np.log(rng.uniform(0.001, 0.01, 5000))
    buckets = np.repeat([0, 1], 2500)
    # Bucket 0: the neural part is the good one; bucket 1: the n-gram.
    neural = np.where(buckets == 0, good, bad)
    ngram = np.where(buckets == 0, bad, good)
    weights, counts = fit_weights(neural, ngram, buckets, 3)
    assert counts == [2500, 2500, 0]
    assert weights[0] > 0.95 and weights[1] < 0.05
    assert weights[2] == pytest.approx(fit_weights(neural, ngram, np.zeros(5000, np.int64), 1)[0][0])


def test_weights_outside_0_1_are_refused(parts):
    neural, ngram, _, _ = parts
    for bad in ([1.5], [0.5, 0.5], [-0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match="mixture weights"):
            MixtureLM(neural, ngram, bad)


# -- hanlm mix on real checkpoints -----------------------------------------------------------------

def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", *overrides])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    neural = Trainer(tiny(root / "gpt"), echo=lambda _: None).run()
    ngram, _ = train_ngram(tiny(root / "ngram", "model.arch=ngram", "model.order=3"), echo=lambda _: None)
    return root, neural.run_dir, ngram.run_dir


def test_hanlm_mix_tunes_writes_and_the_mixture_evaluates_like_a_checkpoint(checkpoints, capsys):
    root, neural, ngram = checkpoints
    out = root / "mixture"
    assert main(["mix", str(neural), str(ngram), "--out", str(out), "--tune-tokens", "20000",
                 "--off-domain-texts", "200"]) == 0
    printed = capsys.readouterr().out
    assert "| mixture |" in printed and "below the better part" in printed
    assert "| off-domain BPC |" in printed and "Off-domain text: chn-reviews: 200 of its 17,408" in printed
    assert "tokens of the tune split (data.tune_fraction" in printed  # fitted on text neither part trained on
    record = json.loads((out / "mixture.json").read_text())
    assert len(record["weights"]) == 3 and all(0 <= w <= 1 for w in record["weights"])
    model, cfg, _ = load_for_inference(str(out))
    assert isinstance(model, MixtureLM) and cfg.model.arch == "mix"
    assert main(["eval", str(out), "--json"]) == 0
    mixed = json.loads(capsys.readouterr().out)["bpc"]
    assert main(["eval", str(neural), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["bpc"]
    assert mixed < alone  # a 40-step GPT gains from any 3-gram
    assert main(["generate", str(out), "--prompt", "今天", "--max-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("今天")


def test_a_mixture_cannot_be_trained_from_or_resumed(checkpoints, tmp_path):
    root, neural, ngram = checkpoints
    out = root / "mixture-init"
    assert main(["mix", str(neural), str(ngram), "--out", str(out), "--tune-tokens", "20000", "--no-eval"]) == 0
    with pytest.raises(CheckpointError, match="is a mixture"):
        Trainer(tiny(tmp_path / "run", f"train.init_from={out}"), echo=lambda _: None)
    with pytest.raises(ConfigError, match="model.arch mix is not trained"):
        load_config("tiny", ["model.arch=mix"])


def test_parts_in_the_wrong_order_or_with_other_tokenizers_are_named(checkpoints, tmp_path, capsys):
    root, neural, ngram = checkpoints
    assert main(["mix", str(ngram), str(neural), "--out", str(tmp_path / "m")]) == 2
    assert "is an n-gram checkpoint; the first part must be a neural one" in capsys.readouterr().err
    assert main(["mix", str(neural), str(ngram), "--out", str(neural)]) == 2
    assert "holds checkpoints; give the mixture a directory of its own" in capsys.readouterr().err
    other, _ = train_ngram(tiny(tmp_path / "other", "model.arch=ngram", "model.order=2", "tokenizer.min_freq=3"),
                           echo=lambda _: None)
    assert main(["mix", str(neural), str(other.run_dir), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and err.count("tokenizer.json") == 2
    assert str(neural) in err and str(other.run_dir) in err


@pytest.mark.parametrize("damage, message", [
    ("{not json", "is damaged"),
    ('{"format": "something else"}', "is not a hanlm mixture"),
    ('{"format": "hanlm-mixture/1", "neural": {"path": 3}, "ngram": {"path": "x"}, "weights": [0.5]}',
     "neural.path must be"),
    ('{"format": "hanlm-mixture/1", "neural": {"path": "a"}, "ngram": {"path": "b"}, "weights": [2]}',
     "weights must be a list of numbers between 0 and 1"),
    ("[" * 100_000 + "]" * 100_000, "is damaged (RecursionError"),  # nested 100,000 deep
])
def test_a_damaged_mixture_file_is_named(tmp_path, damage, message, capsys):
    (tmp_path / "mixture.json").write_text(damage)
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "mixture.json" in err and "Traceback" not in err


def test_a_part_that_changed_since_tuning_is_refused(checkpoints, tmp_path, capsys):
    root, neural, ngram = checkpoints
    out = tmp_path / "mixture"
    assert main(["mix", str(neural), str(ngram), "--out", str(out), "--tune-tokens", "20000", "--no-eval"]) == 0
    record = json.loads((out / "mixture.json").read_text())
    record["ngram"]["manifest_sha256"] = "0" * 64
    (out / "mixture.json").write_text(json.dumps(record))
    assert main(["eval", str(out)]) == 2
    assert "has changed (or is gone) since the mixture was tuned" in capsys.readouterr().err


def test_a_mixture_serves_completions_and_scores(checkpoints):
    import httpx
    from serve_helpers import AUTH, KEY, serve

    root, neural, ngram = checkpoints
    out = root / "mixture-serve"
    assert main(["mix", str(neural), str(ngram), "--out", str(out), "--tune-tokens", "20000", "--no-eval"]) == 0
    with serve(str(out), api_key=KEY) as server:
        server.wait_ready()
        done = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"model": "tiny", "prompt": "今天", "max_tokens": 4, "temperature": 0}).json()
        assert done["choices"][0]["finish_reason"] in ("length", "stop")
        scored = httpx.post(server.url + "/v1/score", headers=AUTH, timeout=60, json={"text": "中国经济"}).json()
        assert len(scored["token_logprobs"]) == 4 and all(lp < 0 for lp in scored["token_logprobs"])


# -- off-domain text: the distinct chn-reviews, scored beside val ----------------------------------

def test_the_off_domain_text_is_distinct_in_first_seen_order_and_its_sample_deterministic():
    from hanlm.config import DataConfig
    from hanlm.data.offdomain import read_text_set
    from hanlm.data.reader import DocumentReader

    every = list(DocumentReader(["chn-reviews"], DataConfig()))
    text = read_text_set("chn-reviews", DataConfig())
    assert len(every) == 35_123 and len(text.texts) == text.available == 17_408
    assert len(set(text.texts)) == len(text.texts)
    first_seen = {t: every.index(t) for t in text.texts[:300]}
    assert list(first_seen.values()) == sorted(first_seen.values())  # the order each text first appears in
    assert text.characters == sum(map(len, text.texts)) + len(text.texts) and 1_200_000 < text.characters < 1_400_000
    sample = read_text_set("chn-reviews", DataConfig(), 100)
    assert len(sample.texts) == 100 and sample.available == 17_408
    assert sample == read_text_set("chn-reviews", DataConfig(), 100)  # always the same texts
    where = [text.texts.index(t) for t in sample.texts]
    assert where == sorted(where) and where[0] == 0 and where[-1] > 17_000  # spread over the whole set
    assert "100 of its 17,408 distinct texts" in sample.describe()


def test_the_mix_report_carries_off_domain_bpc_equal_to_evaluate(checkpoints):
    from hanlm.config import DataConfig
    from hanlm.data.offdomain import read_text_set
    from hanlm.mix import build_mixture, summary

    root, neural, ngram = checkpoints
    out = root / "mixture-off"
    report = build_mixture(str(neural), str(ngram), out, tune_tokens=20000, off_domain_texts=60,
                           echo=lambda _: None)
    assert set(report.off_domain) == {"neural", "ngram", "mixture"}
    text = read_text_set("chn-reviews", DataConfig(), 60)
    assert report.off_domain_text == text.describe()
    for name, spec in (("neural", neural), ("ngram", ngram), ("mixture", out)):
        model, cfg, tokenizer = load_for_inference(str(spec))
        expected = evaluate(model, text.encode(tokenizer), block_size=cfg.train.block_size,
                            batch_size=cfg.eval.batch_size, characters=text.characters, stride=cfg.eval.stride)
        assert report.off_domain[name].bpc == pytest.approx(expected.bpc, rel=1e-6)
        assert report.off_domain[name].characters == pytest.approx(text.characters)
        assert report.off_domain[name].bpc > report.val[name].bpc  # reviews are not news
    table = summary(report)
    assert table.count(" | — |") == 1  # the unigram row only
    assert "the mixture's off-domain BPC is" in table


def test_off_domain_none_skips_it_and_no_eval_scores_nothing(checkpoints, capsys):
    root, neural, ngram = checkpoints
    assert main(["mix", str(neural), str(ngram), "--out", str(root / "mixture-none"), "--tune-tokens", "20000",
                 "--off-domain", "none"]) == 0
    printed = capsys.readouterr().out
    assert "Off-domain text" not in printed and "off-domain BPC is" not in printed
    assert all(row.endswith("| — |") for row in printed.splitlines() if row.startswith("| ") and "BPC |" not in row)
    assert main(["mix", str(neural), str(ngram), "--out", str(root / "mixture-none"), "--tune-tokens", "20000",
                 "--no-eval"]) == 0
    printed = capsys.readouterr().out
    assert "off-domain text" not in printed and "Off-domain text" not in printed


@pytest.mark.parametrize("flags, message", [
    (["--off-domain", "no-such-corpus"], "--off-domain no-such-corpus: data source 'no-such-corpus' not found"),
    (["--off-domain", ""], "--off-domain: give a source"),
    (["--off-domain-texts", "-3"], "--off-domain-texts must be 0 (every distinct text) or a positive number"),
    (["--off-domain", "EMPTY"], "no documents left"),
])
def test_hostile_off_domain_options_are_refused_by_name(checkpoints, tmp_path, capsys, flags, message):
    root, neural, ngram = checkpoints
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    assert main(["mix", str(neural), str(ngram), "--out", str(tmp_path / "m"), "--tune-tokens", "20000",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and flags[0] in err and "Traceback" not in err
    assert not (tmp_path / "m" / "mixture.json").exists()  # refused before any work


def test_hanlm_eval_distinct_scores_each_review_once(checkpoints, capsys):
    root, neural, ngram = checkpoints
    assert main(["eval", str(ngram), "--data", "chn-reviews", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert main(["eval", str(ngram), "--data", "chn-reviews", "--distinct", "--json"]) == 0
    distinct = json.loads(capsys.readouterr().out)
    assert 1_200_000 < distinct["characters"] < 0.6 * every["characters"]
    assert main(["eval", str(ngram), "--distinct"]) == 2
    assert "--distinct scores the distinct texts of --data sources" in capsys.readouterr().err
