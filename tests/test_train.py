"""Training, checkpoints, evaluation and generation on the tiny preset and the real corpus."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hanlm.checkpoint import list_checkpoints, load_checkpoint, load_latest, read_best
from hanlm.loading import load_for_inference
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.tokenizer import BYTE_BASE
from hanlm.errors import CheckpointError
from hanlm.eval import evaluate
from hanlm.generate import Generation, generate
from hanlm.sampling import SamplingParams
from hanlm.log import read_metrics
from hanlm.models import build_model
from hanlm.train.loop import Trainer


def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", *overrides])


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpt") / "run"
    # The whole val split at the end, as outside the tests: `hanlm eval` must give the run's own figure.
    return Trainer(tiny(run_dir, "eval.final_max_batches=null"), echo=lambda _: None).run()


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(run.checkpoint, "model.safetensors"))


def test_a_run_writes_config_metrics_report_and_checkpoints(gpt_run):
    run_dir = gpt_run.run_dir
    assert gpt_run.step == 40 and gpt_run.stopped_by == "max_steps"
    assert gpt_run.tokens == 40 * 8 * 64
    for name in ("config.yaml", "metrics.jsonl", "report.md", "loss.png"):
        assert (run_dir / name).exists(), name
    assert load_config(run_dir / "config.yaml").derived.tokens_per_step == 512
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert list_checkpoints(str(run_dir / "checkpoints")) == ["step-00000020", "step-00000040"]
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"{gpt_run.final_eval.bpc:.4f}" in report and "今天" in report


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_gpt_and_lstm_train_to_a_loss_below_their_start(tmp_path, arch, gpt_run):
    run = gpt_run if arch == "gpt" else Trainer(tiny(tmp_path, "model.arch=lstm"),
                                                echo=lambda _: None).run()
    train = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    vocab = load_checkpoint(run.checkpoint).tokenizer.vocab_size
    assert train[0]["step"] == 1 and abs(train[0]["loss"] - math.log(vocab)) < 0.5  # starts near uniform
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert run.final_eval.loss < math.log(vocab) - 1.0


def test_resume_gives_identical_weights(tmp_path, gpt_run):
    whole = "eval.final_max_batches=null"  # as gpt_run
    first = Trainer(tiny(tmp_path, whole), echo=lambda _: None).run(stop_after=20)
    assert first.stopped_by == "stop_after" and first.step == 20
    messages = []
    resumed = Trainer(tiny(tmp_path, whole), resume="auto", echo=messages.append).run()
    assert any("resumed from" in m and "step 20" in m for m in messages)
    assert resumed.step == 40
    straight, again = final_weights(gpt_run), final_weights(resumed)
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    assert resumed.final_eval.loss == gpt_run.final_eval.loss


def test_hanlm_train_stop_after_saves_midway_with_the_whole_runs_schedule(tmp_path, gpt_run, capsys):
    args = ["train", "--config", "tiny", "--set", f"train.run_dir={tmp_path}", "--set", "log.peak_tflops=0.1"]
    assert main([*args, "--stop-after", "7"]) == 0
    assert "stopped at step 7 (stop_after)" in capsys.readouterr().out
    assert load_latest(str(tmp_path / "checkpoints")).step == 7
    midway = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    straight = [r["lr"] for r in read_metrics(gpt_run.run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert midway == straight[:len(midway)], "the schedule is the 40-step run's, not a 7-step one's"
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as stopped:
            main([*args, "--stop-after", bad])
        assert stopped.value.code == 2
        assert "--stop-after" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path):
    Trainer(tiny(tmp_path, "checkpoint.every_steps=10", "train.max_steps=30"), echo=lambda _: None).run()
    root = str(tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step-00000030" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step-00000030/model\.safetensors is damaged"):
        load_checkpoint(str(newest.parent))
    warnings = []
    assert load_latest(root, warn=warnings.append).step == 20
    assert "skipping damaged checkpoint" in warnings[0] and "step-00000030" in warnings[0]
    (tmp_path / "checkpoints" / "step-00000020" / "train_state.safetensors").write_bytes(b"not a state file")
    assert load_latest(root, warn=warnings.append).step == 10
    messages = []
    trainer = Trainer(tiny(tmp_path, "checkpoint.every_steps=10", "train.max_steps=30"), resume="auto",
                      echo=messages.append)
    trainer.close()
    assert trainer.step == 10
    moved = next(m for m in messages if m.startswith("damaged checkpoints, moved to"))
    assert "step-00000030/model.safetensors is damaged" in moved and "step-00000020" in moved
    aside = list((tmp_path / "checkpoints").glob("damaged-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("step-*")) == ["step-00000020", "step-00000030"]


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    Trainer(tiny(tmp_path, "checkpoint.every_steps=5", "eval.every_steps=5", "checkpoint.keep_last=2",
                 "train.max_steps=30"), echo=lambda _: None).run()
    root = str(tmp_path / "checkpoints")
    best_name, best_loss = read_best(root)
    kept = list_checkpoints(root)
    assert kept[-2:] == ["step-00000025", "step-00000030"]
    assert set(kept) == {"step-00000025", "step-00000030", best_name}
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert best_loss == pytest.approx(min(r["tune_loss"] for r in evals))  # ranked by the held-out tune split


def test_checkpoints_go_to_fsspec_urls(tmp_path):
    url = "memory://hanlm-test/ckpts"
    run = Trainer(tiny(tmp_path, f"checkpoint.dir={url}", "train.max_steps=10", "checkpoint.every_steps=5"),
                  echo=lambda _: None).run()
    assert run.checkpoint == f"{url}/step-00000010"
    assert list_checkpoints(url) == ["step-00000005", "step-00000010"]
    model, cfg, tok = load_for_inference(url)
    local = build_model(cfg.model, tok.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in local.parameters())


def test_stop_conditions_max_tokens_and_max_minutes(tmp_path):
    by_tokens = Trainer(tiny(tmp_path / "a", "train.max_tokens=2560"), echo=lambda _: None).run()
    assert (by_tokens.step, by_tokens.stopped_by) == (5, "max_tokens")
    by_time = Trainer(tiny(tmp_path / "b", "train.max_minutes=0.0001", "train.max_steps=100000"),
                      echo=lambda _: None).run()
    assert by_time.stopped_by == "max_minutes" and by_time.step < 100


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "hanlm.cli", "train", "--config", "tiny", "--set", f"train.run_dir={run_dir}",
           "--set", "train.max_steps=1000000", "--set", "log.peak_tflops=0.1", "--set", "log.every_steps=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and sum(1 for r in read_metrics(metrics) if r["kind"] == "train") >= 5:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resume with: hanlm train --resume auto" in out
    saved = load_latest(str(run_dir / "checkpoints"))
    logged = max(r["step"] for r in read_metrics(metrics) if r["kind"] == "train")
    assert saved.step == logged >= 5


def test_eval_matches_a_hand_computation(gpt_run):
    model, cfg, tok = load_for_inference(gpt_run.checkpoint)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, tok.vocab_size, size=150).astype(np.uint16)
    characters = 180  # say the text behind these tokens had 180 characters
    got = evaluate(model, tokens, block_size=64, batch_size=2, characters=characters)

    nll = 0.0
    with torch.no_grad():
        for start in range(0, 149, 64):  # windows 0-64, 64-128, 128-149: every token after the first, once
            window = torch.tensor(tokens[start:start + 65].astype(np.int64))
            logp = torch.log_softmax(model(window[:-1][None])[0].double(), -1)  # (T, V)
            nll -= sum(logp[i, window[i + 1]].item() for i in range(len(window) - 1))
    assert got.tokens == 149
    assert got.loss == pytest.approx(nll / 149, rel=1e-5)
    assert got.ppl_token == pytest.approx(math.exp(nll / 149), rel=1e-4)
    assert got.bpc == pytest.approx(nll / characters / math.log(2), rel=1e-5)
    assert got.ppl_char == pytest.approx(math.exp(nll / characters), rel=1e-4)


def test_report_sets_the_bpc_beside_the_unigram_entropy(gpt_run):
    unigram = prepare(tiny(gpt_run.run_dir), progress=False).meta["splits"]["val"]["unigram_bpc"]
    report = (gpt_run.run_dir / "report.md").read_text(encoding="utf-8")
    assert f"| val unigram character entropy (bits) | {unigram:.4f} |" in report
    assert f"| val BPC | {gpt_run.final_eval.bpc:.4f} |" in report


def test_the_final_evaluation_reads_the_whole_split_unless_capped_and_says_which(gpt_run, tmp_path, capsys):
    whole = gpt_run.final_eval.tokens
    assert "Evaluation (whole val split)" in (gpt_run.run_dir / "report.md").read_text(encoding="utf-8")
    assert main(["train", "--config", "tiny", "--set", f"train.run_dir={tmp_path}", "--set", "train.max_steps=4",
                 "--set", "eval.final_max_batches=3", "--set", "log.peak_tflops=0.1"]) == 0
    assert "\nfinal (the val split's first 3 batches: eval.final_max_batches): val loss" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Evaluation (the val split's first 3 batches: eval.final_max_batches)" in report
    scored = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    capped = Trainer(tiny(tmp_path / "again", "train.max_steps=4", "eval.final_max_batches=3"), echo=lambda _: None).run()
    assert capped.final_eval.tokens == 3 * 16 * 64 < whole and scored[-1]["bpc"] == pytest.approx(capped.final_eval.bpc)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_greedy_generation_with_the_cache_equals_generation_without(tmp_path, arch, gpt_run):
    if arch == "gpt":
        model, _, tok = load_for_inference(gpt_run.checkpoint)
    else:
        tok = load_checkpoint(gpt_run.checkpoint).tokenizer
        model = build_model(load_config("tiny", ["model.arch=lstm"]).model, tok.vocab_size).eval()
    params = SamplingParams(max_tokens=40, temperature=0)
    cached, plain = Generation(), Generation()
    text = "".join(generate(model, tok, "人民日报", params, result=cached))
    assert "".join(generate(model, tok, "人民日报", params, use_cache=False, result=plain)) == text
    assert cached.token_ids == plain.token_ids and len(cached.token_ids) > 0


def test_sampling_is_reproducible_with_a_seed_and_honours_stop_strings(gpt_run):
    model, _, tok = load_for_inference(gpt_run.checkpoint)
    params = SamplingParams(max_tokens=50, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first = "".join(generate(model, tok, "今天", params))
    assert first == "".join(generate(model, tok, "今天", params))
    assert len(first) > 0
    stop = first[len(first) // 2]
    result = Generation()
    stopped = "".join(generate(model, tok, "今天", SamplingParams(**{**params.__dict__, "stop": [stop]}),
                               result=result))
    assert stop not in stopped and result.finish_reason == "stop"
    assert first.startswith(stopped)


def test_cli_eval_and_generate(gpt_run, capsys, tmp_path, people_daily):
    assert main(["eval", gpt_run.checkpoint, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["bpc"] == pytest.approx(gpt_run.final_eval.bpc)
    text = tmp_path / "sample.txt"
    text.write_text("\n".join(people_daily[:20]) + "\n", encoding="utf-8")
    assert main(["eval", str(gpt_run.run_dir / "checkpoints"), "--data", str(text), "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["characters"] == pytest.approx(sum(map(len, people_daily[:20])) + 20, rel=0.01)
    assert main(["generate", gpt_run.checkpoint, "--prompt", "今天", "--max-tokens", "10", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("今天") and len(out.strip()) > 2


@pytest.mark.parametrize("setting", [["--temperature", "1e-241"], ["--top-p", "1e-300"]])
def test_a_vanishing_temperature_or_top_p_generates_greedily(gpt_run, capsys, setting):
    """Tiny values overflow float32 (NaN probabilities); sampling tends to greedy as they fall."""
    args = ["generate", gpt_run.checkpoint, "--prompt", "今天", "--max-tokens", "8"]
    assert main([*args, *setting]) == 0
    tiny_out = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0
    assert tiny_out == capsys.readouterr().out


def test_cli_generate_rejects_a_prompt_longer_than_the_context(gpt_run, capsys):
    assert main(["generate", gpt_run.checkpoint, "--prompt", "中" * 300]) == 2
    assert "the prompt is 300 tokens but the model's context is 128" in capsys.readouterr().err


def test_init_from_a_checkpoint_continues_from_its_weights(tmp_path, gpt_run):
    messages = []
    run = Trainer(tiny(tmp_path, f"train.init_from={gpt_run.checkpoint}", "train.max_steps=5"),
                  echo=messages.append).run()
    assert any(f"initialised from {gpt_run.checkpoint}" in m for m in messages)
    first = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train")
    assert first["loss"] < math.log(load_checkpoint(gpt_run.checkpoint).tokenizer.vocab_size) - 1.0
    assert run.step == 5  # a fresh step count


def test_pretrained_vectors_fill_the_embedding_and_report_coverage(tmp_path, gpt_run):
    tok = load_checkpoint(gpt_run.checkpoint).tokenizer
    chars = tok.vocab[BYTE_BASE + 256:BYTE_BASE + 356]  # after the specials and the byte-fallback ids
    vec = tmp_path / "chars.vec"
    rows = [f"{c} " + " ".join(["0.5"] * 64) for c in chars] + ["不存在的词 " + " ".join(["0.1"] * 64)]
    vec.write_text(f"{len(rows)} 64\n" + "\n".join(rows) + "\n", encoding="utf-8")
    messages = []
    trainer = Trainer(tiny(tmp_path / "run", f"model.vectors={vec}"), echo=messages.append)
    assert any("100 of" in m and "chars.vec" in m for m in messages), messages
    emb = trainer.model.tok_emb.weight
    assert torch.all(emb[tok.stoi[chars[0]]] == 0.5) and not torch.all(emb[tok.stoi[tok.vocab[BYTE_BASE + 456]]] == 0.5)
