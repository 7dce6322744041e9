"""Named entities (issue 31): the People's Daily conversion, tags and spans, the entity grammar, the entity scorer
against seqeval, the readers' refusals, the CRF and neural entity taggers and `hanlm ner`."""

from __future__ import annotations

import json
import random

import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from hanlm.cli import main
from hanlm.config import DataConfig, load_config
from hanlm.data.entities import Entity, people_daily_entities, spans_to_tags, tags_to_spans
from hanlm.data.ner import read_ner
from hanlm.errors import ConfigError, DataError
from hanlm.tasks.metrics import EntityScores
from serve_helpers import browser, checkpoints  # noqa: F401

quiet = lambda _: None  # noqa: E731


def spans(line):
    s = people_daily_entities(line)
    return s.text, [(s.text[e.start:e.end], e.type) for e in s.entities]


def test_adjacent_person_words_are_one_person_and_locations_stay_apart():
    text, found = spans("江/nr  泽民/nr  在/p  北京/ns  上海/ns  会见/v  李/nr  鹏/nr")
    assert text == "江泽民在北京上海会见李鹏"
    assert found == [("江泽民", "PER"), ("北京", "LOC"), ("上海", "LOC"), ("李鹏", "PER")]  # the last at the end


def test_a_bracketed_name_is_one_entity_that_absorbs_the_names_inside():
    text, found = spans("[香港/ns  特别/a  行政区/n]ns  [中国/ns  共产党/n]nt  代表团/n")
    assert found == [("香港特别行政区", "LOC"), ("中国共产党", "ORG")]


def test_another_bracket_falls_back_to_its_words():
    _, found = spans("[中国/ns  青年/n  报/n]nz  记者/n  张/nr  三/nr")
    assert found == [("中国", "LOC"), ("张三", "PER")]


@pytest.mark.parametrize("line, message", [("[香港/ns  特别/a", "never closed"), ("香港/ns]ns", "never opened"),
                                           ("香港", "not a word/TAG token")])
def test_a_malformed_tagged_line_is_named(line, message):
    with pytest.raises(DataError, match=message):
        people_daily_entities(line, "pd.txt:7")


def test_the_built_in_corpus_holds_the_three_types():
    sentences = list(read_ner(["people-daily-1998-ner"], DataConfig()))
    assert len(sentences) == 19484
    counts = {t: sum(e.type == t for s in sentences for e in s.entities) for t in ("PER", "LOC", "ORG")}
    assert counts["LOC"] > 20000 and counts["PER"] > 15000 and counts["ORG"] > 3000


@pytest.mark.parametrize("scheme", ["bio", "bioes"])
def test_tags_and_spans_round_trip(scheme):
    rng = random.Random(0)
    for _ in range(500):
        n, at, entities = rng.randint(1, 30), 0, []
        while at < n:
            length = rng.randint(1, 4)
            if rng.random() < 0.4 and at + length <= n:
                entities.append(Entity(at, at + length, rng.choice(["PER", "LOC", "ORG"])))
            at += length + rng.randint(0, 2)
        assert tags_to_spans(spans_to_tags(n, entities, scheme)) == entities


def test_the_entity_scorer_counts_as_seqeval_does():
    rng = random.Random(1)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    gold_rows, predicted_rows = [], []
    scores = EntityScores()
    for _ in range(300):
        n = rng.randint(1, 25)
        gold = [rng.choice(tags) for _ in range(n)]
        predicted = [t if rng.random() < 0.7 else rng.choice(tags) for t in gold]
        gold_rows.append(gold)
        predicted_rows.append(predicted)
        scores.add(tags_to_spans(gold), tags_to_spans(predicted))
    p, r, f = scores.of()
    assert abs(p - precision_score(gold_rows, predicted_rows)) < 1e-12
    assert abs(r - recall_score(gold_rows, predicted_rows)) < 1e-12
    assert abs(f - f1_score(gold_rows, predicted_rows)) < 1e-12


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"text": "北京", "entities": [{"start": 0, "end": 5, "type": "LOC"}]}\n', "a.jsonl:1: entity LOC"),
    ("b.jsonl", '{"text": "北京大学", "entities": [{"start": 0, "end": 2, "type": "LOC"}, '
                '{"start": 1, "end": 4, "type": "ORG"}]}\n', "b.jsonl:1: entities LOC [0, 2) and ORG [1, 4) overlap"),
    ("c.jsonl", '\n{"text": ""}\n', 'c.jsonl:2: a record needs a non-empty string "text"'),
    ("d.jsonl", '{"text": "北京", "entities": [[0, 2, "LOC"]]}\n', "d.jsonl:1: entities[0] must be"),
    ("e.conll", "北\tB-LOC\n京\tX-LOC\n", "e.conll:2: tag 'X-LOC' is not O or B-/I-/E-/S-"),
    ("f.conll", "北京\tB-LOC\n", "f.conll:1: expected one character and its tag"),
    ("g.csv", "北京\n", "cannot tell its entity format"),
])
def test_a_bad_entity_file_is_named_by_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        list(read_ner([str(tmp_path / name)], DataConfig()))


def test_conll_and_jsonl_read_the_same_entities(tmp_path):
    (tmp_path / "s.conll").write_text("# a comment\n江\tB-PER\n泽\tI-PER\n民\tE-PER\n在\tO\n京\tS-LOC\n\n"
                                      "上\tB-LOC\n海\tI-LOC\n", encoding="utf-8")
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "江泽民在京", "entities": [
        {"start": 0, "end": 3, "type": "PER"}, {"start": 4, "end": 5, "type": "LOC"}]}, ensure_ascii=False) + "\n"
        + json.dumps({"text": "上海", "entities": [{"start": 0, "end": 2, "type": "LOC"}]}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    conll, jsonl = (list(read_ner([str(tmp_path / f"s.{k}")], DataConfig())) for k in ("conll", "jsonl"))
    assert [(s.text, s.entities) for s in conll] == [(s.text, s.entities) for s in jsonl]


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, people_daily):
    from hanlm.data.corpora import corpus_file
    from hanlm.finetune.counted import fit_counted

    root = tmp_path_factory.mktemp("ner")
    with open(corpus_file("people-daily-1998-ner"), encoding="utf-8") as f:
        (root / "sample.jsonl").write_text("".join(next(f) for _ in range(1200)), encoding="utf-8")
    cfg = load_config("tiny", ["finetune.task=ner", "finetune.tagger=crf", f"finetune.data=[{root / 'sample.jsonl'}]",
                               f"finetune.run_dir={root / 'run'}", "finetune.crf_iterations=25"])
    return fit_counted(cfg, echo=quiet), root


def test_the_crf_finds_entities_it_has_seen(ner_run):
    result, _ = ner_run
    assert result.test.f1 > 0.6 and result.dev.f1 > 0.6
    assert result.test.as_dict()["types"]["LOC"]["gold"] > 100


def test_hanlm_ner_prints_entities_and_its_gold_scores_are_the_scorers(ner_run, capsys):
    from hanlm.loading import load_entity_tagger
    from hanlm.tasks.ner import evaluate_entities

    result, root = ner_run
    assert main(["ner", str(result.run_dir), "--text", "江泽民主席在北京会见客人"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert {"text": "北京", "type": "LOC", "start": 6, "end": 8} in record["entities"]
    assert main(["ner", str(result.run_dir), "--data", str(root / "sample.jsonl"), "--gold"]) == 0
    captured = capsys.readouterr()
    tagger, cfg, _ = load_entity_tagger(str(result.run_dir))
    expected = evaluate_entities(tagger.entities, list(read_ner([str(root / "sample.jsonl")], cfg.data))).scores
    assert expected.summary() in captured.err and len(captured.out.splitlines()) == 1200


def test_ner_refuses_what_it_cannot_do(capsys):
    with pytest.raises(ConfigError, match="finetune.task ner trains finetune.tagger neural .* or crf, not hmm"):
        load_config("tiny", ["finetune.task=ner", "finetune.tagger=hmm"])
    assert main(["ner", "x", "--text", "a", "--gold"]) == 2
    assert "--gold scores --data files" in capsys.readouterr().err


def test_the_server_finds_entities_with_the_key_and_limits_of_every_route(ner_run):
    import httpx
    from serve_helpers import AUTH, KEY, LiveServer, error_of

    from hanlm.loading import load_for_inference
    from hanlm.serve.app import create_app

    result, _ = ner_run
    app = create_app(lambda: load_for_inference(str(result.run_dir), tasks=("ner",)), model_name="ner", api_key=KEY)
    with LiveServer(app) as server:
        server.wait_ready()
        answer = httpx.post(server.url + "/v1/ner", json={"input": ["江泽民主席在北京会见客人", "好"]}, headers=AUTH)
        assert answer.status_code == 200
        body = answer.json()
        assert {"text": "北京", "type": "LOC", "start": 6, "end": 8} in body["data"][0]["entities"]
        assert body["data"][1]["entities"] == [] and body["usage"]["characters"] == 13
        assert error_of(httpx.post(server.url + "/v1/ner", json={"input": "北京"}), 401)["code"] == "invalid_api_key"
        too_many = error_of(httpx.post(server.url + "/v1/ner", json={"input": ["北京"] * 257}, headers=AUTH), 400)
        assert "at most 256" in too_many["message"]
        wrong = error_of(httpx.post(server.url + "/v1/segment", json={"input": "北京"}, headers=AUTH), 400)
        assert wrong["code"] == "wrong_task" and "/v1/ner only" in wrong["message"]


def test_the_entity_grammar_allows_every_gold_sequence_and_nothing_broken():
    from hanlm.tasks.bmes import allowed_transitions

    rng = random.Random(7)
    for scheme in ("bio", "bioes"):
        tags = ["O", *(f"{p}-{t}" for t in ("LOC", "PER") for p in ("BI" if scheme == "bio" else "BIES"))]
        index = {t: i for i, t in enumerate(tags)}
        start, trans, end = allowed_transitions(tags)
        for _ in range(200):
            text_length, at, entities = rng.randint(1, 12), 0, []
            while at < text_length:
                length = rng.randint(1, 3)
                if rng.random() < 0.4 and at + length <= text_length:
                    entities.append(Entity(at, at + length, rng.choice(["LOC", "PER"])))
                at += length
            path = [index[t] for t in spans_to_tags(text_length, entities, scheme)]
            assert start[path[0]] and end[path[-1]] and all(trans[a, b] for a, b in zip(path, path[1:]))
        assert not trans[index["O"], index["I-LOC"]] and not trans[index["B-LOC"], index["I-PER"]]
        assert start[index["O"]] and not start[index["I-PER"]]
        assert end[index["I-PER"]] == (scheme == "bio")


def test_long_texts_are_cut_between_entities_never_inside_one():
    from hanlm.data.entities import NerSentence
    from hanlm.tasks.ner import entity_pieces

    sentence = people_daily_entities("江/nr 泽民/nr 在/p 北京/ns 会见/v 了/u 新华社/nt 记者/n 。/w "
                                     "[香港/ns 特别/a 行政区/n]ns 成立/v 。/w")
    pieces = entity_pieces(sentence, 8)
    assert "".join(p.text for p in pieces) == sentence.text and all(len(p.text) <= 8 for p in pieces)
    found = [(p.text[e.start:e.end], e.type) for p in pieces for e in p.entities]
    assert found == [(sentence.text[e.start:e.end], e.type) for e in sentence.entities]
    assert entity_pieces(sentence, 5)[-2].text == "香港特别行政区"  # longer than the limit: a piece of its own
    empty = entity_pieces(NerSentence("好", []), 8)
    assert [(p.text, p.entities) for p in empty] == [("好", [])]


def test_bigram_ids_pair_each_character_with_its_neighbours():
    import torch

    from hanlm.tasks.neural_tagger import EDGE, bigram_ids, pair_hash

    chars = torch.tensor([[5, 6, 7], [9, 8, 0]])
    ids = bigram_ids(chars, torch.tensor([3, 2]))
    assert torch.equal(ids[0, 1:, 0], ids[0, :-1, 1])  # a character's left bigram is its left neighbour's right
    assert ids[0, 0, 0] == pair_hash(torch.tensor(EDGE), torch.tensor(5))
    assert ids[0, 1, 0] == ids[0, 0, 1] == pair_hash(torch.tensor(5), torch.tensor(6))
    assert ids[0, 2, 1] == pair_hash(torch.tensor(7), torch.tensor(EDGE))
    assert ids[1, 1, 1] == pair_hash(torch.tensor(8), torch.tensor(EDGE))  # the row ends at 2: padding unseen
    assert pair_hash(torch.tensor(5), torch.tensor(6)) != pair_hash(torch.tensor(6), torch.tensor(5))


@pytest.fixture(scope="module")
def neural_ner(checkpoints, ner_run):
    """The tiny GPT pretrained on People's Daily with a BiLSTM-CRF entity head and bigram embeddings."""
    from hanlm.finetune.run import Finetuner

    _, root = ner_run
    cfg = load_config("tiny", ["finetune.task=ner", f"finetune.init_from={checkpoints['gpt']}",
                               f"finetune.data=[{root / 'sample.jsonl'}]", f"finetune.run_dir={root / 'neural'}",
                               "finetune.max_length=64", "finetune.micro_batch=16", "finetune.lr=3e-3",
                               "finetune.epochs=1", "finetune.eval_every_steps=1000", "finetune.tag_crf=true",
                               "finetune.tag_bigrams=true", "log.progress=false", "log.tensorboard=false"])
    return Finetuner(cfg, echo=quiet).run()


def test_the_neural_entity_tagger_learns_and_serves_through_hanlm_ner(neural_ner, ner_run, capsys):
    from hanlm.loading import load_entity_tagger
    from hanlm.tasks.ner import evaluate_entities

    _, root = ner_run
    assert neural_ner.test.f1 > 0.3, neural_ner.test.summary()
    tagger, cfg, path = load_entity_tagger(str(neural_ner.run_dir))
    assert tagger.kind == "neural" and cfg.finetune.tag_bigrams and path == neural_ner.checkpoint
    data = list(read_ner([str(root / "sample.jsonl")], cfg.data))[:300]
    (root / "head.jsonl").write_text("".join(json.dumps({"text": s.text, "entities": [
        {"start": e.start, "end": e.end, "type": e.type} for e in s.entities]}, ensure_ascii=False) + "\n"
        for s in data), encoding="utf-8")
    assert main(["ner", str(neural_ner.run_dir), "--data", str(root / "head.jsonl"), "--gold"]) == 0
    captured = capsys.readouterr()
    assert "neural entity tagger" in captured.err
    assert evaluate_entities(tagger.entities, data).scores.summary() in captured.err
    for line in captured.out.splitlines():  # every output is a valid span of its text
        record = json.loads(line)
        for e in record["entities"]:
            assert record["text"][e["start"]:e["end"]] == e["text"] and e["type"] in ("PER", "LOC", "ORG")


def test_concurrent_ner_requests_join_one_batch_and_get_what_each_gets_alone(neural_ner, ner_run):
    from serve_helpers import joined_batch

    from hanlm.loading import load_entity_tagger

    _, root = ner_run
    tagger, cfg, _ = load_entity_tagger(str(neural_ner.run_dir))
    texts = [s.text for s in read_ner([str(root / "sample.jsonl")], cfg.data)][1000:1030]
    bodies = [{"input": texts[0]}, {"input": texts[1:4]}, {"input": texts[4]}, {"input": texts[5:30]}]
    together = joined_batch(str(neural_ner.run_dir), "entities", "ner", "/v1/ner", bodies)
    for response, body in zip(together, bodies):
        inputs = [body["input"]] if isinstance(body["input"], str) else body["input"]
        alone = [[{"text": t[e.start:e.end], "type": e.type, "start": e.start, "end": e.end} for e in found]
                 for t, found in zip(inputs, tagger.entities(inputs))]
        assert [d["entities"] for d in response["data"]] == alone


def test_the_playground_marks_the_entities_of_a_neural_recognizer(neural_ner, browser):
    import httpx
    from selenium.webdriver.common.by import By
    from serve_helpers import LiveServer, ask_the_playground

    from hanlm.loading import load_entity_tagger, load_for_inference
    from hanlm.serve.app import create_app

    text = "江泽民主席在北京会见新华社记者"
    (found,) = load_entity_tagger(str(neural_ner.run_dir))[0].entities([text])
    app = create_app(lambda: load_for_inference(str(neural_ner.run_dir), tasks=("ner",)), model_name="pd-ner")
    with LiveServer(app) as server:
        server.wait_ready()
        (model,) = httpx.get(server.url + "/v1/models").json()["data"]
        assert model["task"] == "ner" and model["tagger"] == "neural" and "B-LOC" in model["labels"]
        output = ask_the_playground(browser, server.url, "pd-ner", "ner", text, "entities,")
        marks = browser.find_elements(By.CSS_SELECTOR, "#output mark.entity")
    assert found and [(m.get_attribute("title"), m.text) for m in marks] == [(e.type, text[e.start:e.end] + e.type)
                                                                             for e in found]
    assert output.startswith(text[:found[0].start])
