"""The lexical-analysis study's own parts (issue 31): the coarse POS mapping, peers' entities from tagged words,
the scoring of a word/tag analyser, the runs it trains and its tables. The study itself is a benchmark."""

import pytest

from hanlm.bench.lexical import coarse, main, runs_for, score_lexical, tables, word_entities
from hanlm.data.entities import Entity
from hanlm.data.tagged import TaggedSentence


def test_coarse_tags_compare_tag_sets_by_their_first_letter():
    assert [coarse(t) for t in ("nr", "Ng", "vn", "np", "ni", "x", "w", "PER", "TIME", "uj", "mq")] == \
           ["n", "n", "v", "n", "n", "w", "w", "n", "t", "u", "m"]


def test_peer_words_become_entities_with_adjacent_person_words_merged():
    words = [("江", "nr"), ("泽民", "nr"), ("在", "p"), ("北京", "ns"), ("上海", "ns"), ("新华社", "nt")]
    kinds = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
    assert word_entities(words, kinds) == [Entity(0, 3, "PER"), Entity(4, 6, "LOC"), Entity(6, 8, "LOC"),
                                           Entity(8, 11, "ORG")]


def test_an_analyser_is_scored_on_words_tags_and_coarse_tags():
    gold = [TaggedSentence(["江泽民", "在", "北京"], ["nr", "p", "ns"])]
    scores, coarse_f1, speed = score_lexical(lambda texts: [[("江泽民", "np"), ("在", "p"), ("北", "ns"),
                                                             ("京", "ns")] for _ in texts], gold, frozenset())
    assert scores.f1 == pytest.approx(2 * 2 / 7) and scores.pos_f1 == pytest.approx(2 * 1 / 7)
    assert coarse_f1 == pytest.approx(2 * 2 / 7) and speed > 0  # np and nr agree coarsely


def test_each_backbone_gets_the_ablation_pos_and_entity_runs_and_tables_render():
    runs = runs_for({"gpt": "runs/x"})
    assert sorted(runs) == ["ner-crf", "ner-gpt", "pos-gpt", "seg-crf", "seg-gpt", "seg-gpt-plain"]
    assert runs["ner-gpt"][:2] == ("ner", "runs/x") and "finetune.tag_scheme=bmes-pos" in runs["pos-gpt"][2]
    text = tables([{"name": "a", "task": "pos", "precision": 0.9, "recall": 0.8, "f1": 0.85, "pos_f1": 0.8,
                    "chars_per_s": 1000.0, "train_s": 60.0},
                   {"name": "b", "task": "ner", "precision": 0.9, "recall": 0.9, "f1": 0.9, "chars_per_s": 5.0,
                    "types": {"PER": {"f1": 0.5}}}])
    assert "| a | 0.9000 | 0.8000 | **0.8500** | – | 0.8000 | – | – | 1,000 | 1.0 min |" in text
    assert "| b | 0.9000 | 0.9000 | **0.9000** | 0.5000 | – | – | 5 | – |" in text


def test_a_backbone_without_a_path_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--backbone", "gpt", "--only", "none"])
    assert "give NAME=PATH" in capsys.readouterr().err
