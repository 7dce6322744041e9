"""Named entities (issue 31, first part): the People's Daily conversion, tags and spans, the entity scorer
against seqeval, the readers' refusals, the CRF entity tagger and `hanlm ner`."""

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
    expected = evaluate_entities(tagger, list(read_ner([str(root / "sample.jsonl")], cfg.data))).scores
    assert expected.summary() in captured.err and len(captured.out.splitlines()) == 1200


def test_ner_refuses_what_it_cannot_do(capsys):
    with pytest.raises(ConfigError, match="finetune.task ner trains finetune.tagger crf"):
        load_config("tiny", ["finetune.task=ner", "finetune.tagger=neural"])
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
