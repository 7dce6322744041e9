"""The benchmark harness runs and writes its results; the numbers themselves are never asserted."""

import json
import subprocess
from pathlib import Path

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
    assert {r["batch"] for r in data["suites"]["generate"]} == {1, 8}
    report = results.with_suffix(".md").read_text()
    assert "Machine limit" in report and "goal ≥ 75%" in report and "goal ≥ 2.0×" in report
    assert sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.png")) == ["generate.png", "train.png"]


def test_bench_data_suite_and_a_missing_device(tmp_path, capsys):
    assert main(["bench", "data", "--quick", "--out", str(tmp_path)]) == 0
    (results,) = tmp_path.glob("*.json")
    (row,) = json.loads(results.read_text())["suites"]["data"]
    assert row["tokenizer"] == "char" and row["mb_per_s"] > 0
    capsys.readouterr()
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "train", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
