"""The n-gram baseline: modified Kneser-Ney estimation, ARPA in and out, kenlm agreement, CLI."""

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from hanlm.loading import load_for_inference
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import ConfigError, DataError
from hanlm.models.arpa import arpa_text, arpa_words, parse_arpa, read_arpa, write_arpa
from hanlm.models.ngram import BOS, EOS, UNK, estimate, kn_discounts

LOG10 = math.log(10)


@pytest.fixture(scope="module")
def corpus(people_daily):
    """A char model's ingredients: 1,500 training documents, 200 held-out ones."""
    train_docs, val_docs = people_daily[:1500], people_daily[-200:]
    tok = train_tokenizer("char", train_docs)
    return tok, tok.encode_documents(train_docs), val_docs


@pytest.fixture(scope="module")
def model5(corpus):
    tok, train, _ = corpus
    model, report = estimate(train, tok.vocab_size, 5)
    return model, report


def sentences(tok, docs):
    return [tok.encode(d) for d in docs]


# -- estimation ------------------------------------------------------------------------------

def test_discounts_follow_chen_and_goodman():
    n1, n2, n3, n4 = 100, 40, 20, 10
    y = n1 / (n1 + 2 * n2)
    assert kn_discounts((n1, n2, n3, n4)) == pytest.approx(
        (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3))
    assert kn_discounts((5, 0, 1, 1)) is None  # no 2s: D2 undefined
    assert kn_discounts((10, 1, 10, 1)) is None  # D2 = 2 - 3·(10/12)·10 < 0


def test_a_toy_corpus_matches_hand_derived_probabilities_and_backoffs():
    # Ids: 4 = a, 5 = b, 6 = c. Sentences "a b", "a c", "b a b"; bigram model, fallback D = 0.5, 1, 1.5.
    a, b, c = 4, 5, 6
    tokens = np.array([a, b, EOS, a, c, EOS, b, a, b, EOS])
    with pytest.raises(DataError, match="discount_fallback"):
        estimate(tokens, 7, 2)
    model, report = estimate(tokens, 7, 2, discount_fallback=(0.5, 1.0, 1.5))
    assert report.fallback_orders == [1, 2]
    # Unigrams use continuation counts: a follows <s> and b (2), b follows a and <s> (2), c follows a (1),
    # </s> follows b and c (2). Total 7; discounted mass 1 + 1 + 0.5 + 1 = 3.5, spread over the 5
    # predictable ids (<unk>, </s>, a, b, c).
    uniform = (3.5 / 7) / 5
    p1 = {a: 1 / 7 + uniform, b: 1 / 7 + uniform, c: 0.5 / 7 + uniform, EOS: 1 / 7 + uniform, UNK: uniform}
    for w, p in p1.items():
        assert model.uni_logp[w] == pytest.approx(math.log10(p), abs=1e-12)
    # Bigrams use raw counts: after a: b ×2, c ×1 (S = 3, backoff (1 + 0.5) / 3 = 0.5); likewise after <s>
    # (a ×2, b ×1) and after b (</s> ×2, a ×1); after c: </s> ×1 (backoff 0.5 / 1).
    expected = {(a, b): 1 / 3 + 0.5 * p1[b], (a, c): 0.5 / 3 + 0.5 * p1[c], (BOS, a): 1 / 3 + 0.5 * p1[a],
                (BOS, b): 0.5 / 3 + 0.5 * p1[b], (b, EOS): 1 / 3 + 0.5 * p1[EOS], (b, a): 0.5 / 3 + 0.5 * p1[a],
                (c, EOS): 0.5 + 0.5 * p1[EOS]}
    assert len(model.keys[2]) == len(expected)
    for (h, w), p in expected.items():
        i = int(np.searchsorted(model.keys[2], h * 7 + w))
        assert model.keys[2][i] == h * 7 + w
        assert model.logp[2][i] == pytest.approx(math.log10(p), abs=1e-12)
    for h in (a, b, c, BOS):
        assert model.uni_bow[h] == pytest.approx(math.log10(0.5), abs=1e-12)
    assert model.uni_bow[EOS] == 0.0
    # An unseen bigram backs off: p(a | c) = backoff(c) · p(a).
    score = model.token_log_probs(torch.tensor([[c]]), torch.tensor([[a]]), model.initial_state(1))
    assert score.item() == pytest.approx(math.log(0.5 * p1[a]), abs=1e-12)


def reference_kn(sents: list[list[int]], order: int, vocab_size: int):
    """Interpolated modified Kneser-Ney written the slow, obvious way (dicts, recursion)."""
    raw = [Counter() for _ in range(order + 1)]
    for s in sents:
        seq = [BOS, *s, EOS]
        for k in range(1, order + 1):
            for i in range(len(seq) - k + 1):
                raw[k][tuple(seq[i:i + k])] += 1
    adj = [None] + [Counter() for _ in range(order)]
    adj[order] = raw[order]
    for k in range(1, order):
        for g in raw[k + 1]:
            adj[k][g[1:]] += 1
        for g in raw[k]:
            if g[0] == BOS:
                adj[k][g] = raw[k][g]
    del adj[1][(BOS,)]
    discounts = []
    for k in range(1, order + 1):
        coc = Counter(v for v in adj[k].values())
        n1, n2, n3, n4 = (coc[i] for i in range(1, 5))
        y = n1 / (n1 + 2 * n2)
        discounts.append((0.0, 1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3))
    children = defaultdict(dict)
    for k in range(2, order + 1):
        for g, a in adj[k].items():
            children[g[:-1]][g[-1]] = a
    total1 = sum(adj[1].values())
    gamma1 = sum(discounts[0][min(a, 3)] for a in adj[1].values()) / total1

    def prob(w: int, h: tuple) -> float:
        if not h:
            a = adj[1].get((w,), 0)
            return (a - discounts[0][min(a, 3)]) / total1 + gamma1 / (vocab_size - 2)
        kids = children.get(h)
        if not kids:
            return prob(w, h[1:])
        D = discounts[len(h)]
        total = sum(kids.values())
        gamma = sum(D[min(a, 3)] for a in kids.values()) / total
        a = kids.get(w, 0)
        return (a - D[min(a, 3)]) / total + gamma * prob(w, h[1:])

    return prob


def test_probabilities_equal_a_plain_reference_implementation(corpus):
    tok, _, docs = corpus
    sents = sentences(tok, docs[:150])
    order = 4
    model, _ = estimate(np.concatenate([np.array([*s, EOS]) for s in sents]), tok.vocab_size, order)
    prob = reference_kn(sents, order, tok.vocab_size)
    checked = 0
    for s in sentences(tok, docs[150:170]) + sents[:5]:
        x = np.array([EOS, *s])
        y = np.array([*s, EOS])
        ours = model.token_log_probs(torch.tensor(x[None]), torch.tensor(y[None]), model.initial_state(1))[0] / LOG10
        ctx = [BOS, *s]
        for t in range(len(y)):
            h = tuple(ctx[max(0, t + 1 - (order - 1)):t + 1])
            assert ours[t].item() == pytest.approx(math.log10(prob(int(y[t]), h)), abs=1e-9)
            checked += 1
    assert checked > 1000


def test_distributions_sum_to_one_for_random_contexts_of_every_order(model5, corpus):
    model, _ = model5
    tok, train, _ = corpus
    rng = np.random.default_rng(0)
    for k in range(1, model.order):
        # Contexts the model has seen (k tokens of the training text, <eos> standing for <s>) and random ones.
        seen = [train[i - k + 1:i + 1] for i in rng.integers(k, len(train), 15)]
        for ctx in seen + [rng.integers(4, tok.vocab_size, k) for _ in range(5)]:
            logp, _ = model.log_probs(torch.tensor(np.asarray(ctx)[None], dtype=torch.long), model.initial_state(1))
            total = logp[0, -1].double().exp().sum().item()
            assert total == pytest.approx(1.0, abs=1e-6), (k, ctx)


def test_scoring_targets_equals_picking_from_the_full_distribution(model5, corpus):
    model, _ = model5
    tok, _, val_docs = corpus
    ids = tok.encode_documents(val_docs[:5])
    x, y = torch.tensor(ids[None, :-1]), torch.tensor(ids[None, 1:])
    full, state = model.log_probs(x, model.initial_state(1))
    picked = full.double().gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(model.token_log_probs(x, y, model.initial_state(1)), picked, atol=1e-5)
    assert state.shape == (1, model.order - 1)


def test_targets_that_are_not_the_next_input_are_scored_from_the_distribution_too(model5, corpus):
    model, _ = model5
    tok, _, val_docs = corpus
    ids = tok.encode_documents(val_docs[5:8])
    x = torch.tensor(ids[None, :-1])
    y = torch.from_numpy(np.random.default_rng(0).integers(0, tok.vocab_size, x.shape))  # not x shifted
    y[0, ::7] = -1
    full, _ = model.log_probs(x, model.initial_state(1))
    picked = full.double().gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(y < 0, 0.0)
    assert torch.allclose(model.token_log_probs(x, y, model.initial_state(1)), picked, atol=1e-5)


def test_a_batch_decodes_in_one_step_as_each_row_alone(model5, corpus):
    model, _ = model5
    tok, _, val_docs = corpus
    prefixes = [[], tok.encode(val_docs[0])[:1], tok.encode(val_docs[1])[:9], [3], tok.encode(val_docs[2])[:3]]
    states = [model.log_probs(torch.tensor([p]), model.initial_state(1))[1] if p else model.initial_state(1)
              for p in prefixes]
    tokens = torch.tensor([3, 17, 25, 40, 9])
    logp, advanced = model.decode_step(tokens, states)
    for b, state in enumerate(states):
        alone, after = model.log_probs(tokens[b].view(1, 1), state)
        assert torch.allclose(logp[b], alone[0, -1], atol=1e-6)
        assert np.array_equal(advanced[b], after)


def test_pruning_drops_rare_ngrams_and_keeps_a_normalised_model(corpus):
    tok, train, _ = corpus
    full, _ = estimate(train, tok.vocab_size, 4)
    pruned, report = estimate(train, tok.vocab_size, 4, prune=(0, 0, 1))
    assert report.counts[:2] == full.counts()[:2]
    assert report.counts[2] < full.counts()[2] and report.counts[3] < full.counts()[3]
    for ctx in ([EOS], tok.encode("中国人"), tok.encode("经济发展")):
        logp, _ = pruned.log_probs(torch.tensor([ctx]), pruned.initial_state(1))
        assert logp[0, -1].double().exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# -- ARPA ------------------------------------------------------------------------------------

def test_arpa_write_read_write_is_identical(model5, corpus, tmp_path):
    model, _ = model5
    words = arpa_words(corpus[0].token_strings())
    path = tmp_path / "m.arpa"
    write_arpa(model, words, path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("\\data\\\nngram 1=") and text.endswith("\\end\\\n")
    again, _ = read_arpa(path, words)
    assert arpa_text(again, words) == text
    # Read without a vocabulary (as for another tool's file): same model, ids renumbered.
    alone, own_words = read_arpa(path)
    assert arpa_text(alone, own_words) == text


def test_kenlm_gives_our_sentence_scores(model5, corpus, tmp_path):
    import kenlm
    model, _ = model5
    tok, _, val_docs = corpus
    words = arpa_words(tok.token_strings())
    write_arpa(model, words, tmp_path / "m.arpa")
    ours_from_file, _ = read_arpa(tmp_path / "m.arpa", words)
    ken = kenlm.Model(str(tmp_path / "m.arpa"))
    assert ken.order == 5
    for doc in val_docs[:150]:
        ids = tok.encode(doc)
        sentence = " ".join(words[i] for i in ids)
        # kenlm's score() sums in float32; its per-word scores summed in float64 are the exact figure.
        theirs = math.fsum(p for p, _, _ in ken.full_scores(sentence, bos=True, eos=True))
        assert ours_from_file.sentence_log10(ids) == pytest.approx(theirs, abs=1e-4)
        assert model.sentence_log10(ids) == pytest.approx(theirs, abs=1e-4)


def test_tokens_with_spaces_survive_arpa_and_kenlm(tmp_path):
    import kenlm
    docs = ["今天 天气 很好", "明天 天气 不好", "今天 很好"] * 5
    tok = train_tokenizer("char", docs)
    model, _ = estimate(tok.encode_documents(docs), tok.vocab_size, 3, discount_fallback=(0.5, 1, 1.5))
    words = arpa_words(tok.token_strings())
    assert "<U+0020>" in words
    write_arpa(model, words, tmp_path / "s.arpa")
    ken = kenlm.Model(str(tmp_path / "s.arpa"))
    ids = tok.encode("今天 天气")
    theirs = math.fsum(p for p, _, _ in ken.full_scores(" ".join(words[i] for i in ids)))
    assert model.sentence_log10(ids) == pytest.approx(theirs, abs=1e-5)
    loaded, tokenizer, = load_for_inference(str(tmp_path / "s.arpa"))[::2]
    assert tokenizer.encode("今天 天气") and loaded.sentence_log10(tokenizer.encode("今天 天气")) == pytest.approx(
        theirs, abs=1e-5)


TOY_ARPA = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.3
-0.5\t</s>
-0.4\t中\t-0.2

\\2-grams:
-0.2\t<s> 中
-0.3\t中 </s>

\\end\\
"""


def test_another_tools_arpa_file_is_read_and_scored():
    model, words = parse_arpa(TOY_ARPA, "toy.arpa")
    assert words[:5] == ["<pad>", "<unk>", "<s>", "</s>", "中"]
    # <s> 中 </s>: p(中 | <s>) explicit, p(</s> | 中) explicit.
    assert model.sentence_log10([4]) == pytest.approx(-0.2 - 0.3)
    # <s> 中 中 </s>: p(中 | 中) backs off: backoff(中) + p(中).
    assert model.sentence_log10([4, 4]) == pytest.approx(-0.2 + (-0.2 - 0.4) - 0.3)


@pytest.mark.parametrize("text, line, message", [
    (TOY_ARPA.replace("ngram 2=2", "ngram 2=3"), 14, "declares ngram 2=3 .line 3."),
    (TOY_ARPA[:TOY_ARPA.index("-0.3\t中 </s>")], 13, "truncated"),
    (TOY_ARPA.replace("\\end\\\n", ""), 14, "without \\\\end\\\\"),
    (TOY_ARPA.replace("-0.4\t中", "x\t中"), 9, "not a number"),
    (TOY_ARPA.replace("ngram 2=2", "ngram 3=2"), 3, "ngram 2=COUNT"),
    (TOY_ARPA.replace("-0.2\t<s> 中", "-0.2\t<s> 国"), 12, "word '国'"),
    ("hello\n", 2, "no \\\\data\\\\ header"),
])
def test_bad_arpa_files_name_the_line(text, line, message):
    with pytest.raises(DataError, match=rf"bad\.arpa:{line}: .*{message}"):
        parse_arpa(text, "bad.arpa", ["<pad>", "<unk>", "<s>", "</s>", "中"])


def test_a_missing_arpa_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.arpa: no such ARPA file"):
        read_arpa(tmp_path / "nope.arpa")


# -- config and CLI --------------------------------------------------------------------------

def test_ngram_keys_are_checked():
    cfg = load_config("tiny", ["model.arch=ngram", "model.prune=0,0,1", "model.discount_fallback=[0.5, 1, 1.5]"])
    assert cfg.model.prune == [0, 0, 1] and cfg.model.discount_fallback == [0.5, 1.0, 1.5]
    with pytest.raises(ConfigError, match="unigram threshold, which must be 0"):
        load_config("tiny", ["model.arch=ngram", "model.prune=1,1"])
    with pytest.raises(ConfigError, match="must not decrease"):
        load_config("tiny", ["model.arch=ngram", "model.prune=0,2,1"])
    with pytest.raises(ConfigError, match="D2 must be between 0 and 2"):
        load_config("tiny", ["model.arch=ngram", "model.discount_fallback=0.5,2.5,1.5"])
    with pytest.raises(ConfigError, match="model.prune"):
        load_config("tiny", ["model.arch=ngram", "model.prune=0,x"])
    with pytest.raises(ConfigError, match="one process"):
        load_config("tiny", ["model.arch=ngram"], world_size=2)


@pytest.fixture(scope="module")
def ngram_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ngram-run")
    code = main(["train", "--config", "tiny", "--set", "model.arch=ngram", "--set", "model.order=3",
                 "--set", f"train.run_dir={run_dir}", "--set", "generate.max_tokens=12"])
    assert code == 0
    return run_dir


def test_hanlm_train_builds_an_ngram_checkpoint_that_eval_and_generate_use(ngram_run, capsys, tmp_path):
    ckpt = ngram_run / "checkpoints" / "step-00000001"
    assert (ckpt / "model.arpa").exists() and not (ckpt / "model.safetensors").exists()
    report = (ngram_run / "report.md").read_text(encoding="utf-8")
    assert "N-grams and discounts" in report and "| 3 |" in report
    records = [json.loads(line) for line in (ngram_run / "metrics.jsonl").read_text().splitlines()]
    trained_bpc = [r for r in records if r["kind"] == "eval"][-1]["bpc"]
    capsys.readouterr()
    assert main(["eval", str(ngram_run / "checkpoints"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpc"] == pytest.approx(trained_bpc, rel=1e-6)
    assert 4.0 < result["bpc"] < 9.0  # far below the ~9.3-bit unigram entropy, as a 3-gram should be
    # The same ARPA file on its own (as if another tool wrote it) scores the same text the same way.
    assert main(["eval", str(ckpt / "model.arpa"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bpc"] == pytest.approx(result["bpc"], rel=1e-6)
    assert main(["generate", str(ngram_run / "checkpoints"), "--prompt", "人民", "--max-tokens", "8",
                 "--seed", "3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("人民") and len(out) > 2
    assert main(["train", "--config", "tiny", "--set", "model.arch=ngram", "--resume", "auto",
                 "--set", f"train.run_dir={tmp_path}"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_an_ngram_run_refuses_a_run_directory_of_a_neural_model(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000040").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000040" / "model.safetensors").write_bytes(b"")
    assert main(["train", "--config", "tiny", "--set", "model.arch=ngram", "--set", f"train.run_dir={tmp_path}"]) == 2
    assert "step-00000040" in capsys.readouterr().err
