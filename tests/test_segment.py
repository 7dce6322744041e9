"""Word segmentation and POS tagging on real People's Daily text: the formats and their hostile inputs, the
split, SIGHAN scoring, Viterbi against brute force, the HMM, CRF and neural taggers trained, saved, loaded
and served, `hanlm segment`, and /v1/segment."""

import itertools
import json
import subprocess
import sys

import httpx
import pytest
import torch
from serve_helpers import (  # noqa: F401
    AUTH,
    KEY,
    Gate,
    LiveServer,
    ask_the_playground,
    browser,
    checkpoints,
    error_of,
    joined_batch,
    metric,
    queued_together,
    serve,
)

from hanlm.loading import load_for_inference
from hanlm.config import load_config
from hanlm.data.corpora import corpus_file
from hanlm.data.tagged import TaggedSentence, format_sentence, parse_slash, read_tagged
from hanlm.errors import CheckpointError, ConfigError, DataError
from hanlm.serve.app import create_app
from hanlm.tasks.bmes import allowed_transitions, char_tags, cut_sentence, tag_inventory, text_pieces, words_of
from hanlm.finetune.run import Finetuner
from hanlm.tasks.metrics import SegmentationScores
from hanlm.finetune.counted import fit_counted
from hanlm.loading import load_tagger
from hanlm.tasks.tagging import evaluate_segmenter, read_tagged_data
from hanlm.tasks.viterbi import viterbi

QUIET = ["log.progress=false", "log.tensorboard=false"]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def paragraphs():
    """The tagged paragraphs of the built-in corpus, as stored (word/TAG tokens)."""
    with open(corpus_file("people-daily-1998-tagged"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def sample(paragraphs, tmp_path_factory):
    """1,500 paragraphs (a fixed stride through the month) as a user's own word/TAG file."""
    path = tmp_path_factory.mktemp("tagged") / "pd-sample.txt"
    path.write_text("\n".join(paragraphs[::13][:1500]) + "\n", encoding="utf-8")
    return path


def tag_config(run_dir, *overrides):
    return load_config("tiny", ["finetune.task=tag", f"finetune.run_dir={run_dir}", "finetune.dev_fraction=0.1",
                                "finetune.test_fraction=0.1", *QUIET, *overrides])


# -- formats and hostile input -----------------------------------------------------------------

def test_the_pku_format_keeps_compound_parts_and_every_format_round_trips(paragraphs, tmp_path):
    s = parse_slash("[中央/n  人民/n  广播/vn  电台/n]nt  [/w  ]/w  １/m")
    assert s.words == ["中央", "人民", "广播", "电台", "[", "]", "１"]
    assert s.tags == ["n", "n", "vn", "n", "w", "w", "m"]
    sentences = [parse_slash(p) for p in paragraphs[:40]]
    for fmt, suffix in (("slash", ".txt"), ("conll", ".conll"), ("words", ".txt")):
        path = tmp_path / f"{fmt}{suffix}"
        path.write_text("\n".join(format_sentence(s, fmt) for s in sentences) + "\n", encoding="utf-8")
        back = list(read_tagged([str(path)], load_config().data))
        assert [b.words for b in back] == [s.words for s in sentences], fmt
        assert [b.tags for b in back] == ([s.tags for s in sentences] if fmt != "words" else [None] * 40), fmt
    chars = tmp_path / "bmes.tsv"  # a character per line with joint tags, as many taggers write
    chars.write_text("".join(f"{c}\t{t}\n" for c, t in zip(sentences[0].text, char_tags(sentences[0], "bmes-pos")))
                     + "\n", encoding="utf-8")
    (back,) = read_tagged([str(chars)], load_config().data)
    assert back.words == sentences[0].words and back.tags == sentences[0].tags


@pytest.mark.parametrize("text, fmt, message", [
    ("迈向/v  充满/v\n新/a  世纪\n", "slash", ":2: token '世纪' has no /TAG"),
    ("迈向/v  /n  充满/v\n", "slash", ":1: token '/n' has an empty word"),
    ("迈\tB\n向\tE\n\n充\tM\n满\tE\n", "conll", ":4: M continues a word that no B began"),
    ("迈\tB\n向\tB\n", "conll", ":2: B follows a word that was not closed"),
    ("迈\tB\n", "conll", ":1: the sentence ends inside a word"),
    ("迈向\tv\n充满\n", "conll", ":2: token '充满' has no tag column"),
])
def test_malformed_tagged_files_are_named_with_file_and_line(tmp_path, text, fmt, message):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_tagged([str(path)], load_config().data, fmt))
    assert str(path) in str(e.value) and message in str(e.value)


def test_auto_format_reads_words_and_slash_files_and_bmes_pos_needs_tags(paragraphs, tmp_path):
    words = tmp_path / "gold.txt"
    words.write_text("迈向  充满  希望\n\n新  世纪\n", encoding="utf-8")
    read = [s.words for s in read_tagged([str(words)], load_config().data)]
    assert read == [["迈向", "充满", "希望"], ["新", "世纪"]]
    words.write_text("\n".join(format_sentence(parse_slash(p), "words") for p in paragraphs[:100]), encoding="utf-8")
    cfg = load_config("tiny", ["finetune.task=tag", f"finetune.data=[{words}]", "finetune.tag_scheme=bmes-pos",
                               "finetune.dev_fraction=0.3", "finetune.test_fraction=0.3"])
    with pytest.raises(DataError, match="POS"):
        read_tagged_data(cfg)
    with pytest.raises(ConfigError, match="crf supports tag_scheme bmes only"):
        load_config("tiny", ["finetune.tagger=crf", "finetune.tag_scheme=bmes-pos"])


def test_the_split_is_deterministic_disjoint_and_the_test_split_is_pretrainings_val(sample):
    from hanlm.data.splits import split_of

    cfg = load_config("segment", [f"finetune.data=[{sample}]"])
    first, again = read_tagged_data(cfg), read_tagged_data(cfg)
    assert {n: [s.words for s in v] for n, v in first.splits.items()} == \
           {n: [s.words for s in v] for n, v in again.splits.items()}
    texts = {n: {s.text for s in v} for n, v in first.splits.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["dev"])
    assert all(split_of(t, 0.02, 0) == "val" for t in texts["test"]) and len(texts["test"]) > 10
    assert first.vocabulary == frozenset(w for s in first.splits["train"] for w in s.words)


# -- tags, pieces, scoring, decoding ------------------------------------------------------------

def test_bmes_tags_spell_the_words_back_and_the_grammar_allows_exactly_them(paragraphs):
    s = parse_slash(paragraphs[0])
    for scheme in ("bmes", "bmes-pos"):
        back = words_of(s.text, char_tags(s, scheme))
        assert back.words == s.words and back.tags == (s.tags if scheme == "bmes-pos" else None)
    tags = tag_inventory("bmes-pos", ["n", "v"])
    start, trans, end = allowed_transitions(tags)
    ok = {(a, b) for a, b in itertools.product(tags, tags) if trans[tags.index(a), tags.index(b)]}
    assert ("B-n", "E-n") in ok and ("B-n", "E-v") not in ok and ("E-n", "B-v") in ok and ("S-v", "M-v") not in ok
    assert [t for t in tags if start[tags.index(t)]] == ["S-n", "B-n", "S-v", "B-v"]
    # A sequence that breaks the grammar still spells the text: stray M / E begin words, an open one ends with it.
    assert words_of("abc", ["E", "M", "S"]).words == ["a", "b", "c"]
    assert words_of("abcd", ["B", "M", "M", "B"]).words == ["abc", "d"]


def test_long_paragraphs_are_cut_between_words_and_raw_text_covers_itself(paragraphs):
    long = max((parse_slash(p) for p in paragraphs[:300]), key=lambda s: len(s.text))
    pieces = cut_sentence(long, 60)
    assert sum((p.words for p in pieces), []) == long.words and all(len(p.text) <= 60 for p in pieces)
    assert any(p.words[-1] == "。" for p in pieces[:-1])
    spans = text_pieces(long.text, 60)
    assert "".join(long.text[a:b] for a, b in spans) == long.text and all(b - a <= 60 for a, b in spans)


def test_sighan_scores_match_hand_counts():
    scores = SegmentationScores()
    # gold 共同/创造/美好/的/新/世纪 ; predicted 共同/创造/美/好/的/新世纪: 3 of 6 predicted are gold spans
    scores.add(["共同", "创造", "美好", "的", "新", "世纪"], ["共同", "创造", "美", "好", "的", "新世纪"],
               vocabulary={"共同", "创造", "的", "新"})
    scores.add(["我", "爱", "北京"], ["我", "爱", "北京"], vocabulary={"我", "爱"}, gold_tags=["r", "v", "ns"],
               predicted_tags=["r", "v", "n"])
    assert (scores.correct, scores.gold_words, scores.predicted_words) == (6, 9, 9)
    assert scores.precision == pytest.approx(6 / 9) and scores.recall == pytest.approx(6 / 9)
    assert scores.f1 == pytest.approx(6 / 9)
    assert (scores.oov_words, scores.oov_correct) == (3, 1)  # 美好, 世纪 missed; 北京 found
    assert scores.pos_f1 == pytest.approx(2 * 2 / 18)
    with pytest.raises(ValueError, match="different texts"):
        scores.add(["我们"], ["我"])


def test_batched_viterbi_equals_brute_force_over_every_path():
    g = torch.Generator().manual_seed(0)
    states, steps = 3, 5
    for _ in range(10):
        emissions = torch.randn(3, steps, states, generator=g)
        start, trans, end = (torch.randn(states, generator=g), torch.randn(states, states, generator=g),
                             torch.randn(states, generator=g))
        trans[0, 1] = float("-inf")
        lengths = [5, 3, 1]
        paths = viterbi(emissions, lengths, start, trans, end)
        for b, n in enumerate(lengths):
            def score(p, b=b):
                return (start[p[0]] + sum(emissions[b, t, p[t]] for t in range(len(p)))
                        + sum(trans[p[t - 1], p[t]] for t in range(1, len(p))) + end[p[-1]])
            assert list(max(itertools.product(range(states), repeat=n), key=score)) == paths[b]


# -- the taggers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hmm(sample, tmp_path_factory):
    run = tmp_path_factory.mktemp("hmm") / "run"
    return fit_counted(tag_config(run, f"finetune.data=[{sample}]", "finetune.tagger=hmm",
                                  "finetune.tag_scheme=bmes-pos", "finetune.dev_fraction=0.05",
                                  "finetune.test_fraction=0.05"), echo=quiet)


def test_the_hmm_tags_and_segments_well_above_chance_and_reloads_identically(hmm, sample):
    assert hmm.test.f1 > 0.75 and hmm.test.pos_f1 > 0.6 and 0 < hmm.test.oov_recall < hmm.test.recall
    loaded = load_tagger(str(hmm.run_dir))
    assert loaded.tagger.with_pos and loaded.config.finetune.tagger == "hmm"
    data = read_tagged_data(loaded.config)
    again = evaluate_segmenter(loaded.tagger.segment, data.splits["test"], data.vocabulary).scores
    assert again.f1 == pytest.approx(hmm.test.f1) and again.pos_f1 == pytest.approx(hmm.test.pos_f1)
    (out,) = loaded.tagger.segment(["迈向充满希望的 新世纪"])
    assert "".join(out.words) == "迈向充满希望的新世纪" and len(out.tags) == len(out.words)
    assert loaded.tagger.segment(["", "   "]) == [TaggedSentence([], []), TaggedSentence([], [])]


def test_the_crf_trains_saves_loads_and_a_damaged_model_is_refused(sample, tmp_path):
    result = fit_counted(tag_config(tmp_path / "crf", f"finetune.data=[{sample}]", "finetune.tagger=crf",
                                    "finetune.crf_iterations=15"), echo=quiet)
    assert result.test.f1 > 0.75
    loaded = load_tagger(str(tmp_path / "crf"))
    (words,) = loaded.tagger.segment(["中共中央总书记、国家主席江泽民"])
    assert "".join(words.words) == "中共中央总书记、国家主席江泽民" and words.tags is None
    from hanlm.tasks.crf import WEIGHT, CRFTagger

    with pytest.raises(CheckpointError, match="not a CRFsuite model"):
        CRFTagger.from_weights(loaded.tagger.tags, {WEIGHT: torch.zeros(64, dtype=torch.uint8)}, "x")
    with pytest.raises(CheckpointError, match="holds no CRF model"):
        CRFTagger.from_weights(loaded.tagger.tags, {WEIGHT: torch.zeros(4)}, "x")
    with pytest.raises(ConfigError, match="drop the checkpoint"):
        fit_counted(tag_config(tmp_path / "x", "finetune.tagger=crf", "finetune.init_from=runs/x"), echo=quiet)


@pytest.fixture(scope="module")
def neural(checkpoints, sample, tmp_path_factory):
    """The tiny GPT pretrained on People's Daily with a BiLSTM tagging head, one epoch on the sample."""
    run = tmp_path_factory.mktemp("neural") / "run"
    cfg = tag_config(run, f"finetune.init_from={checkpoints['gpt']}", f"finetune.data=[{sample}]",
                     "finetune.max_length=64", "finetune.micro_batch=16", "finetune.lr=3e-3", "finetune.epochs=0.4",
                     "finetune.eval_every_steps=1000")
    return Finetuner(cfg, echo=quiet).run()


def test_the_neural_tagger_learns_to_segment_and_serves_through_the_same_loader(neural):
    assert neural.test.f1 > 0.6, neural.test.summary()
    loaded = load_tagger(str(neural.run_dir))
    assert loaded.config.model.task == "tag" and loaded.config.finetune.tag_head == "bilstm"
    long = "。".join(["中共中央总书记、国家主席江泽民发表新年讲话"] * 8)  # longer than max_length: cut and joined
    (out,) = loaded.tagger.segment([long])
    assert "".join(out.words) == long


def plain_emissions(model, row) -> torch.Tensor:
    """The network over one row alone, nothing padded, the BiLSTM run by its module as training once ran it:
    the plain reference that batched tagging is checked against. Log-probabilities (N, n_tags)."""
    h = model.backbone.hidden(torch.tensor([row.ids]))[0]  # (T, C)
    states = h[row.char_token] + model.piece_emb(torch.tensor(row.char_piece)) + model.char_emb(torch.tensor(row.char_ids))
    states = model.context(states[None])[0][0]  # (N, 2 · hidden)
    return model.out(states).log_softmax(-1)


def test_batched_tagging_gives_the_tags_of_a_plain_per_row_reference(neural, sample):
    from hanlm.tasks.neural_tagger import encode_row, fitted_pieces
    from hanlm.tasks.viterbi import mask_scores

    tagger = load_tagger(str(neural.run_dir)).tagger
    texts = [s.text for s in read_tagged([str(sample)], load_config("tiny").data, "auto")][:40]
    assert max(map(len, texts)) > tagger.max_length > min(map(len, texts))  # long texts are cut into pieces
    pieces = [t[a:b] for t in texts for a, b in fitted_pieces(tagger.tokenizer, t, tagger.max_length)]
    rows = [encode_row(tagger.tokenizer, p) for p in pieces]
    grammar = [mask_scores(m) for m in allowed_transitions(tagger.tags)]
    with torch.no_grad():
        plain = [plain_emissions(tagger.model.eval(), row) for row in rows]
    batched = tagger.emissions(rows)  # rows of similar length padded together, the BiLSTM unpacked
    for e, p in zip(batched, plain):
        assert torch.allclose(e, p, atol=1e-5)
    expected = [[tagger.tags[s] for s in viterbi(e[None], [len(e)], *grammar)[0]] for e in plain]
    got = tagger.tag(pieces)
    assert got == expected
    assert [len(t) for t in tagger.tag(texts)] == list(map(len, texts))


@pytest.mark.parametrize("head", ["lookahead", "causal"])
def test_every_head_gives_one_emission_per_character(checkpoints, head):
    from hanlm.checkpoint import load_checkpoint
    from hanlm.loading import resolve_checkpoint
    from hanlm.finetune.run import finetune_config
    from hanlm.tasks.neural_tagger import NeuralTagger, build_tagger_network

    source = load_checkpoint(resolve_checkpoint(checkpoints["gpt"]))
    cfg = finetune_config(load_config("tiny", ["finetune.task=tag", f"finetune.tag_head={head}",
                                               "finetune.labels=[S,B,M,E]", "finetune.max_length=32"]), source)
    tagger = NeuralTagger(build_tagger_network(cfg, source.tokenizer.vocab_size), source.tokenizer,
                          cfg.finetune.labels, 32)
    texts = ["迈向充满希望的新世纪", "一九九八年新年讲话" * 5]
    assert [len(t) for t in tagger.tag(texts)] == [len(t) for t in texts]


def test_pos_tags_of_given_words_are_the_best_path_that_spells_them(checkpoints):
    from hanlm.checkpoint import load_checkpoint
    from hanlm.finetune.run import finetune_config
    from hanlm.loading import resolve_checkpoint
    from hanlm.tasks.neural_tagger import NeuralTagger, build_tagger_network, encode_row
    from hanlm.tasks.tagging import pos_accuracy_on_gold_words

    source = load_checkpoint(resolve_checkpoint(checkpoints["gpt"]))
    tags = tag_inventory("bmes-pos", ["n", "v"])
    cfg = finetune_config(load_config("tiny", ["finetune.task=tag", "finetune.tag_scheme=bmes-pos",
                                               f"finetune.labels=[{','.join(tags)}]", "finetune.max_length=32",
                                               "finetune.tag_bigrams=true"]), source)
    torch.manual_seed(3)
    tagger = NeuralTagger(build_tagger_network(cfg, source.tokenizer.vocab_size), source.tokenizer, tags, 32)
    words = ["新年", "讲", "话语"]
    (found,) = tagger.tag_words([words])
    (e,) = tagger.emissions([encode_row(source.tokenizer, "".join(words))])
    start, trans, end = allowed_transitions(tags)
    positions = "".join(char_tags(TaggedSentence(words, None), "bmes"))
    best, best_tags = float("-inf"), None
    for path in itertools.product(range(len(tags)), repeat=len(positions)):
        if any(tags[s][0] != p for s, p in zip(path, positions)) or not (start[path[0]] and end[path[-1]]):
            continue
        if not all(trans[a, b] for a, b in zip(path, path[1:])):
            continue
        score = sum(float(e[t, s]) for t, s in enumerate(path))
        if score > best:
            best, best_tags = score, [tags[path[0]][2:], tags[path[2]][2:], tags[path[3]][2:]]
    assert found == best_tags
    long = ["中共中央", "总书记", "、", "国家", "主席", "江泽民"] * 6  # longer than max_length: cut between words
    (many,) = tagger.tag_words([long])
    assert len(many) == len(long) and set(many) <= {"n", "v"}
    gold = [TaggedSentence(words, best_tags), TaggedSentence(["新年"], ["v" if best_tags[0] == "n" else "n"])]
    assert pos_accuracy_on_gold_words(tagger.tag_words, gold) == pytest.approx(3 / 4)
    with pytest.raises(ConfigError, match="needs a bmes-pos tagger"):
        NeuralTagger(tagger.model, source.tokenizer, ["S", "B", "M", "E"], 32).tag_words([words])


# -- commands and the server ----------------------------------------------------------------------

def hanlm(*args):
    return subprocess.run([sys.executable, "-m", "hanlm.cli", *args], capture_output=True, text=True)


def test_hanlm_segment_prints_words_and_scores_gold_files(hmm, sample, tmp_path, checkpoints):
    gold = tmp_path / "gold.txt"
    lines = sample.read_text(encoding="utf-8").splitlines()[:30]
    gold.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scored = hanlm("segment", str(hmm.run_dir), "--data", str(gold), "--gold")  # a POS tagger writes word/TAG
    assert scored.returncode == 0 and "F1 0." in scored.stderr, scored.stderr
    out = scored.stdout.splitlines()
    assert len(out) == 30 and all("/" in token for token in out[0].split())
    assert ["".join(t.rsplit("/", 1)[0] for t in line.split()) for line in out] == \
           ["".join(parse_slash(line).words) for line in lines]
    done = hanlm("segment", str(hmm.run_dir), "--text", "迈向充满希望的新世纪", "--format", "words")
    assert done.returncode == 0 and "".join(done.stdout.split()) == "迈向充满希望的新世纪" and "  " in done.stdout
    wrong = hanlm("segment", checkpoints["gpt"], "--text", "你好")
    assert wrong.returncode != 0 and "not a tagger" in wrong.stderr and "Traceback" not in wrong.stderr
    with pytest.raises(CheckpointError, match="hmm tagger for word segmentation .*`hanlm segment`"):
        load_for_inference(str(hmm.run_dir))  # what hanlm eval, generate and serve (for an LM) load through


def test_v1_segment_batches_texts_checks_keys_and_refuses_other_tasks(hmm, checkpoints):
    loaded = load_tagger(str(hmm.run_dir))
    app = create_app(lambda: load_for_inference(str(hmm.run_dir), tasks=("lm", "classify", "tag")),
                     model_name="pd-hmm", api_key=KEY)
    with LiveServer(app) as server:
        server.wait_ready()
        url = server.url
        assert httpx.post(url + "/v1/segment", json={"input": "你好"}).status_code == 401
        texts = ["迈向充满希望的新世纪", "中共中央总书记、国家主席江泽民"]
        answer = httpx.post(url + "/v1/segment", json={"input": texts}, headers=AUTH).json()
        expected = loaded.tagger.segment(texts)
        assert [d["words"] for d in answer["data"]] == [s.words for s in expected]
        assert [d["tags"] for d in answer["data"]] == [s.tags for s in expected]
        assert answer["usage"]["characters"] == sum(map(len, texts)) and answer["model"] == "pd-hmm"
        models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]
        assert models["task"] == "tag" and models["arch"] == "hmm" and models["tag_scheme"] == "bmes-pos"
        for body in ({"input": []}, {"input": [""]}, {"input": 3}, {"input": ["好"] * 257}, {},
                     {"input": "字" * 100_001}):
            error_of(httpx.post(url + "/v1/segment", json=body, headers=AUTH), 400)
        error = error_of(httpx.post(url + "/v1/completions", json={"prompt": "今天"}, headers=AUTH), 400)
        assert "word segmenter" in error["message"] and error["code"] == "wrong_task"
    lm = create_app(lambda: load_for_inference(checkpoints["gpt"]), model_name="tiny")
    with LiveServer(lm) as server:
        server.wait_ready()
        error = error_of(httpx.post(server.url + "/v1/segment", json={"input": "好"}), 400)
        assert "language model" in error["message"] and "/v1/segment needs a tagger" in error["message"]


def test_concurrent_segment_requests_join_one_batch_and_get_what_each_gets_alone(neural, sample):
    tagger = load_tagger(str(neural.run_dir)).tagger
    texts = [s.text for s in read_tagged([str(sample)], load_config("tiny").data, "auto")][200:240]
    bodies = [{"input": texts[0]}, {"input": texts[1:9]}, {"input": texts[9]}, {"input": texts[10:40]}]
    together = joined_batch(str(neural.run_dir), "segment", "tag", "/v1/segment", bodies)
    for response, body in zip(together, bodies):
        alone = tagger.segment([body["input"]] if isinstance(body["input"], str) else body["input"])
        assert [d["words"] for d in response["data"]] == [s.words for s in alone]


def test_a_tagger_can_be_the_word_tokenizers_segmenter(hmm, paragraphs, tmp_path):
    from hanlm.data.segmenters import segment_words
    from hanlm.data.tokenizer import Tokenizer, train_tokenizer

    texts = [parse_slash(p).text for p in paragraphs[:60]]
    ours = train_tokenizer("word", texts, segmenter=str(hmm.run_dir))
    jieba_words = train_tokenizer("word", texts)
    assert ours.decode(ours.encode(texts[3])) == texts[3] and ours.fingerprint() != jieba_words.fingerprint()
    text = "迈向充满希望的新世纪 GPT模型  2024年"  # whitespace runs are words of their own: the text is spelt exactly
    (words,) = segment_words([text], str(hmm.run_dir))
    assert "".join(words) == text and "  " in words
    assert [w for w in words if w.strip()] == load_tagger(str(hmm.run_dir)).tagger.segment([text])[0].words
    again = Tokenizer.from_dict(ours.to_dict())
    assert again.encode_batch(texts[:20]) == [ours.encode(t) for t in texts[:20]]
    with pytest.raises(DataError, match="not a usable tagger"):
        train_tokenizer("word", texts, segmenter=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="applies to tokenizer.kind word"):
        train_tokenizer("char", texts, segmenter=str(hmm.run_dir))


def test_the_playground_segments_text_for_a_tagger(hmm, browser):
    app = create_app(lambda: load_for_inference(str(hmm.run_dir), tasks=("lm", "classify", "tag")), model_name="pd")
    with LiveServer(app) as server:
        server.wait_ready()
        output = ask_the_playground(browser, server.url, "pd", "segment", "迈向充满希望的新世纪", "words,")
        (expected,) = load_tagger(str(hmm.run_dir)).tagger.segment(["迈向充满希望的新世纪"])
        assert output.split() == [f"{w}/{t}" for w, t in zip(expected.words, expected.tags)]


def test_a_crf_output_layer_trains_on_whole_paths_and_decodes_under_its_learned_scores(checkpoints, sample,
                                                                                        tmp_path):
    cfg = tag_config(tmp_path / "run", f"finetune.init_from={checkpoints['gpt']}", f"finetune.data=[{sample}]",
                     "finetune.max_length=64", "finetune.micro_batch=16", "finetune.lr=3e-3", "finetune.epochs=0.4",
                     "finetune.eval_every_steps=1000", "finetune.tag_crf=true")
    result = Finetuner(cfg, echo=quiet).run()
    assert result.test.f1 > 0.6, result.test.summary()
    from hanlm.checkpoint import load_checkpoint

    weights = load_checkpoint(result.checkpoint).weights
    assert {"crf.start", "crf.transitions", "crf.end"} <= weights.keys()
    assert weights["crf.transitions"].abs().sum() > 0  # learned, not left at their zeros
    loaded = load_tagger(str(result.run_dir))
    (out,) = loaded.tagger.segment(["中共中央总书记、国家主席江泽民发表新年讲话"])
    assert "".join(out.words) == "中共中央总书记、国家主席江泽民发表新年讲话" and len(out.words) > 5
