"""The benchmark harness runs and writes its results; the numbers themselves are never asserted."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from hanlm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_script_runs_the_harness_on_cpu_quick(tmp_path):
    done = subprocess.run([str(ROOT / "scripts" / "gpu_bench.sh"), "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (results,) = tmp_path.glob("*.json")
    data = json.loads(results.read_text())
    assert data["device"] == "cpu" and data["quick"] and data["machine"]["matmul_flops"] > 0
    models = {r["model"] for r in data["suites"]["train"]}
    assert models == {"hanlm GPT", "transformers Llama", "transformers GPT-2"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in data["suites"]["train"])
    decode = data["suites"]["generate"]["decode"]
    assert {r["batch"] for r in decode} == {1, 8}
    # Every engine decodes the same weights, so greedy tokens agree (a late near-tie may flip one).
    assert all(r["same_tokens"] >= 10 for r in decode if not r["model"].startswith("llama.cpp q8"))
    llama = {r["model"] for r in decode if r["model"].startswith("llama.cpp")}
    with_llama = importlib.util.find_spec("llama_cpp") is not None
    assert llama == ({"llama.cpp f32", "llama.cpp f16", "llama.cpp q8_0"} if with_llama else set())
    assert any(r["model"] == "hanlm serve engine, llama.cpp f32" for r in decode) == with_llama
    report = results.with_suffix(".md").read_text()
    assert "Machine limit" in report and "goal ≥ 75%" in report and "goal ≥ 2.0×" in report
    assert ("llama.cpp f32 decodes" if with_llama else "llama.cpp: not measured") in report
    assert ("of llama.cpp's own tokens/s (goal ≥ 90%" in report) == with_llama
    speculated = {r["model"]: r for r in data["suites"]["generate"]["speculative"]["rows"]}
    assert all(r["same_output"] == "4/4" for name, r in speculated.items() if name.startswith("hanlm"))
    assert 0 <= speculated["hanlm GPT + prompt lookup draft, k = 4"]["acceptance_rate"] <= 1
    assert "### Speculative decoding" in report and "goal ≥ 2.5×" in report
    assert sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.png")) == ["generate.png", "train.png"]


def test_the_other_suites_run_quick_and_report_their_tables(tmp_path, capsys):
    assert main(["bench", "data", "dist", "ngram", "serve", "--quick", "--out", str(tmp_path)]) == 0
    (results,) = tmp_path.glob("*.json")
    suites = json.loads(results.read_text())["suites"]
    (row,) = suites["data"]
    assert row["tokenizer"] == "char" and row["mb_per_s"] > 0
    dist = suites["dist"]
    assert dist["tokens_per_s"]["1"] > 0 and dist["tokens_per_s"]["2"] > 0
    by_strategy = {s["strategy"]: s["bytes"] for s in dist["sync"]}
    assert 0 < by_strategy["powersgd-r8"] < by_strategy["full"]  # quick: two strategies (test_distributed has all)
    ngram = suites["ngram"]
    assert ngram["build"]["order"] == 3 and 4 < ngram["build"]["bpc"] < 8
    assert ngram["query"]["kenlm_sentence_per_s"] > 0 and ngram["nltk"]["nltk_per_s"] > 0
    assert [level["concurrency"] for level in suites["serve"]] == [1, 8]
    for level in suites["serve"]:  # the clients ran in their own process and every request finished
        assert level["failed"] == 0 and level["engine_ceiling_tokens_per_s"] > 0 and 0 < level["of_ceiling"]
        assert level["ttft_p50_ms"] <= level["ttft_p99_ms"] and level["tpot_mean_ms"] > 0
    report = results.with_suffix(".md").read_text()
    for heading in ("## Data preparation", "## Distributed", "## n-gram", "## Serving"):
        assert heading in report


def test_the_nlu_suite_runs_quick_and_reports_speeds_goals_and_the_served_join(tmp_path):
    assert main(["bench", "nlu", "--quick", "--out", str(tmp_path)]) == 0
    (results,) = tmp_path.glob("*.json")
    nlu = json.loads(results.read_text())["suites"]["nlu"]
    names = {(r["task"], r["name"], r["how"]) for r in nlu["rows"]}
    for task, name in (("classify", "hanlm classifier, tiny (2×64)"), ("segment", "hanlm neural tagger, tiny (2×64)")):
        assert {(task, name, "batched by length"), (task, name, "one text per call")} <= names
    assert {"hanlm CRF", "jieba"} <= {r["name"] for r in nlu["rows"]} and "thulac" in nlu["skipped"]
    assert all(r["texts_per_s"] > 0 and r["chars_per_s"] > 0 for r in nlu["rows"])
    assert all(0 < r["backbone_share"] <= 1 for r in nlu["rows"] if r["name"].startswith("hanlm ") and "CRF" not in
               r["name"])
    served = {(x["concurrency"], x["joining"]): x for x in nlu["served"]}
    assert set(served) == {(1, True), (8, True), (8, False)} and all(x["failed"] == 0 for x in served.values())
    assert served[(8, False)]["requests_per_batch"] == 1 and served[(8, True)]["requests_per_batch"] >= 1
    report = results.with_suffix(".md").read_text()
    for says in ("## NLU throughput", "### Classification", "### Segmentation", "### Served", "goal ≥ 100,000",
                 "goal ≥ 1,000", "thulac: not run"):
        assert says in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_a_missing_device_before_running_anything(tmp_path, capsys):
    assert main(["bench", "train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_recipe_study_tabulates_and_plots_finished_runs(tmp_path):
    from hanlm.bench import recipe
    from hanlm.config import load_config
    from hanlm.train.loop import Trainer

    run = Trainer(load_config("tiny", [f"train.run_dir={tmp_path / 'tiny'}", "log.peak_tflops=0.1"]),
                  echo=lambda _: None).run()
    result = recipe.result_of(run.run_dir, "tiny", ["model.preset=tiny"])
    assert [p["step"] for p in result["curve"]] == [20, 40] and result["bpc"] == run.final_eval.bpc
    a, b = result["curve"]
    middle = (a["tokens"] + b["tokens"]) // 2
    assert recipe.bpc_at(result["curve"], middle) == pytest.approx((a["bpc"] + b["bpc"]) / 2)
    assert recipe.bpc_at(result["curve"], b["tokens"] + 1) is None
    text = recipe.table([result], {"5-gram": 5.508})
    assert "| tiny | `model.preset=tiny` |" in text and "| 5-gram |" in text and f"{run.final_eval.bpc:.3f}" in text
    assert f"| {run.final_eval.bpc:.3f} | — |" in text  # not scored off-domain: a dash, not a failure
    result["off_domain"] = recipe.off_domain(run.run_dir, 30)  # what --runs adds to each run directory
    assert result["off_domain"]["texts"] == 30 and result["off_domain"]["bpc"] > run.final_eval.bpc
    text = recipe.table([result], {"5-gram": 5.508})
    assert "| off-domain BPC | minutes | tokens/s |" in text and f"{result['off_domain']['bpc']:.3f}" in text
    assert "30 evenly spaced distinct chn-reviews texts" in text
    recipe.plot([result], {"5-gram": 5.508}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        recipe.main(["--only", "no-such-candidate", "--out", str(tmp_path)])


def test_the_recipe_study_resolves_bases_budgets_and_candidates_without_training(tmp_path, capsys):
    from hanlm.bench import recipe
    from hanlm.config import load_config

    old = recipe.parse(["--only", "base,muon", "--out", str(tmp_path)])  # the old command, as it was
    assert old.base == "issue11" and old.budget == {"minutes": 4.0} and old.names == ["base", "muon"]
    sets = recipe.candidate_sets(recipe.CANDIDATES["muon"], old.base, old.budget)
    assert "train.precision=fp32" in sets and "train.schedule_clock=minutes" in sets and "train.max_minutes=4.0" in sets
    args = recipe.parse(["--base", "demo", "--steps", "300", "--off-domain-texts", "100", "--out", str(tmp_path)])
    assert args.budget == {"steps": 300} and args.off_domain_texts == 100
    assert args.names == ["demo", "ema", "distill", "distill-0.5", "distill-5gram", "distill-ema", "demo-seed7",
                          "distill-seed7", "bpe-dropout", "muon-0.05", "muon-0.1", "muon-distill", "muon-0.1-distill",
                          "muon-distill-0.5", "muon-distill-5gram", "muon-distill-seed7", "muon-distill-0.5-seed7",
                          "deep-6"]
    for name in ("demo", "muon-0.05", "deep-6", "distill-ema"):
        cfg = load_config("default", recipe.candidate_sets(recipe.DEMO_CANDIDATES[name], "demo", args.budget))
        t = cfg.train
        assert (t.max_steps, t.schedule_clock, t.max_minutes, t.precision) == (300, "steps", None, "auto")
        assert (cfg.tokenizer.kind, cfg.tokenizer.vocab_size, t.block_size, t.micro_batch, t.lr,
                t.warmup_steps) == ("bpe", 8000, 128, 16, 3e-3, 100)
    assert load_config("default", recipe.candidate_sets(recipe.DEMO_CANDIDATES["muon-0.1"], "demo",
                                                        args.budget)).train.muon_lr == 0.1
    assert recipe._eval_every([], {"steps": 300}, 8) == 38
    for argv, message in ((["--only", "ema"], "unknown candidates ema of --base issue11"),
                          (["--base", "demo", "--only", "base"], "unknown candidates base of --base demo"),
                          (["--steps", "10", "--minutes", "2"], "not allowed with argument"),
                          (["--steps", "0"], "--steps must be at least 1"),
                          (["--off-domain-texts", "-1"], "--off-domain-texts must be 0")):
        with pytest.raises(SystemExit):
            recipe.parse([*argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err
    run = tmp_path / "runs" / "demo"  # a result from another budget is not passed off as this one's
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"name": "demo", "bpc": 6.0, "budget": {"minutes": 4.0}}))
    with pytest.raises(SystemExit, match="was trained with the budget"):
        recipe.run_candidate("demo", [], {"steps": 300}, tmp_path, 8, "demo", 0)


def test_the_sync_benchmark_tabulates_against_full_and_plots(tmp_path, capsys):
    from hanlm.bench import sync

    every = sync.strategies(4000)
    row = {"full": (15_000e6, 6.0), "diloco-h32-4bit": (62.5e6, 6.06), "streaming-h32-4bit": (62.5e6, 6.03)}
    results = {"steps": 4000, "warm": 400, "worker_batch": None, "link": "50 Mbit/s + 50 ms",
               "quality": {f"2:{name}": {"strategy": name, "workers": 2, "bytes": b, "bpc": bpc,
                                         "overrides": every[name]} for name, (b, bpc) in row.items()},
               "wall": {"streaming-h32-4bit": {"plain_s_per_step": 0.088, "link_s_per_step": 0.09,
                                               "comm_s_per_step": 0.009, "exposed_s_per_step": 0.0, "hidden": 1.0}}}
    sync.write(results, tmp_path, "python -m hanlm.bench.sync")
    table = (tmp_path / "table.md").read_text()
    assert "### 2 workers (16 sequences each, 32 in all)" in table
    assert "| diloco-h32-4bit | sync_every=32, outer_lr=0.8, outer_momentum=0.7, pseudo_grad_bits=4 | 62.5 | 240× | " \
           "6.0600 | +1.00% | — | — |" in table
    assert "| 6.0300 | +0.50% | 9.0 (plain 8.8) | 100% |" in table
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "sync_frontier.png").stat().st_size > 10_000
    for argv, says in ((["--workers", "3"], "no default strategies for 3 workers"),
                       (["--only", "diloco-h7"], "unknown strategy 'diloco-h7'"),
                       (["--worker-batch", "0"], "must be at least 1")):
        with pytest.raises(SystemExit):
            sync.main([*argv, "--out", str(tmp_path / "refused")])
        assert says in capsys.readouterr().err
