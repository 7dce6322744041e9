"""The backbone study's pure parts (hanlm.bench.encoders): McNemar's exact test, the vote, the table, the CLI's
--help and run selection. No training here."""

from __future__ import annotations

import pytest

from hanlm.bench import encoders


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_binomial_p():
    truth = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    a = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]  # wrong on the last two
    b = [1, 0, 1, 0, 1, 0, 0, 1, 0, 0]  # wrong on the first six and the last; right where a is wrong on item 9
    result = encoders.mcnemar(truth, a, b)
    # a right, b wrong: items 1–6 → 6; a wrong, b right: item 9 → 1; n = 7: p = 2 × (C(7,0)+C(7,1)) / 2^7
    assert (result["a_only"], result["b_only"]) == (6, 1)
    assert result["p"] == pytest.approx(2 * 8 / 128)
    assert encoders.mcnemar(truth, b, a)["p"] == result["p"]  # symmetric
    assert encoders.mcnemar(truth, a, a) == {"a_only": 0, "b_only": 0, "p": 1.0}
    assert encoders.binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert encoders.binomial_two_sided(5, 10) == 1.0  # an even split: capped at 1
    with pytest.raises(ValueError):
        encoders.mcnemar([0, 1], [0], [0, 1])


def test_majority_vote_and_mean_sd():
    assert encoders.majority_vote([[0, 1, 1], [0, 0, 1], [1, 0, 1]]) == [0, 0, 1]
    mean, sd = encoders.mean_sd([0.8, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and sd == pytest.approx(0.02)
    assert encoders.mean_sd([0.5]) == (0.5, None)


def fake_results() -> dict:
    pre = {"objective": "mlm", "steps": 300, "train_minutes": 4.0, "wall_minutes": 5.5,
           "val": {"loss": 4.2, "masked_accuracy": 0.25}}
    return {"backbones": {
        "gpt": {"pretrain": {"objective": "lm", "steps": 300, "train_minutes": 3.0, "wall_minutes": 4.0,
                             "val": {"loss": 5.1}},
                "classify": {"accuracies": [0.80, 0.82, 0.84], "mcnemar": [{"p": 0.01}, {"p": 0.2}, {"p": 0.5}],
                             "vote": {"p": 0.03, "accuracy": 0.83}},
                "segment": {"f1": 0.9012}},
        "mlm": {"pretrain": pre, "classify": {"accuracies": [0.8], "mcnemar": [{"p": 1.0}]}},
        "electra": {"pretrain": None}},
        "reference": {"tfidf_accuracy": 0.8495, "tfidf_setting": "C=8", "crf_f1": 0.9657}}


def test_table_formats_finished_partial_and_missing_runs():
    lines = encoders.table(fake_results()).splitlines()
    assert lines[0].startswith("| backbone |") and len(lines) == 2 + 3 + 2
    gpt, mlm, electra, tfidf, crf = lines[2:]
    assert "| 300 | 3.0 (4.0) | next-token loss 5.100 nats | 82.00 ± 2.00 (3) | 0.01, 0.2, 0.5; vote 0.03 (83.00%) " \
           "| 90.12 |" in gpt
    assert "masked loss 4.200, masked acc 25.0%" in mlm and "80.00 ± – (1)" in mlm and mlm.endswith("| – |")
    assert electra == "| encoder, ELECTRA (RTD) | – | – | – | – | – | – |"
    assert "84.95" in tfidf and "C=8" in tfidf and "96.57" in crf


def test_help_and_run_selection(capsys):
    with pytest.raises(SystemExit) as exit_:
        encoders.main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--steps" in help_text and "--only" in help_text and "bench/results/encoders" in help_text
    names = encoders.run_names(2)
    assert names[:3] == ["pretrain-gpt", "pretrain-mlm", "pretrain-electra"] and "cls-electra-s2" in names
    assert "cls-gpt-s3" not in names
    assert encoders.selected(names, "pretrain-*,seg-mlm") == ["pretrain-gpt", "pretrain-mlm", "pretrain-electra",
                                                             "seg-mlm"]
    assert encoders.selected(names, "") == names


def test_the_curve_fine_tunes_from_every_kept_checkpoint_and_refuses_a_step_that_does_not_divide(capsys, tmp_path):
    assert encoders.curve_steps(2000, 500) == [500, 1000, 1500, 2000] and encoders.curve_steps(2000, 0) == []
    names = encoders.run_names(1, [500, 1000])
    assert names[-6:] == ["curve-gpt-k500", "curve-mlm-k500", "curve-electra-k500", "curve-gpt-k1000",
                          "curve-mlm-k1000", "curve-electra-k1000"]
    overrides = encoders.pretrain_overrides(2000, tmp_path, 500)
    assert "checkpoint.every_steps=500" in overrides and "checkpoint.keep_last=5" in overrides
    with pytest.raises(SystemExit) as exit_:
        encoders.main(["--steps", "2000", "--curve-every", "300", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--curve-every must divide --steps (2000)" in capsys.readouterr().err
