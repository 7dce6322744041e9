"""`hanlm bench`: the suites in one run, beside the machine's limit and the tools users would pick instead.

Every figure is a ratio measured side by side in the same run (these machines are noisy): the
dense matmul peak first (fp32 on CPU, bf16 on CUDA), then each suite. Results go to
`bench/results/<date>-<host>.json`, a Markdown report beside it, and PNG plots.

    train     hanlm's training step (tokens/s, MFU) against transformers Llama and GPT-2 of the same shape
    generate  greedy decode tokens/s at batch 1 and 8 against transformers' generate, and at batch 1
              against llama.cpp (f32, f16, q8_0 GGUF of the same weights; the `llamacpp` extra), and
              hanlm's serving engine on llama.cpp f32 against llama.cpp's own loop
    data      `prepare` MB/s per tokenizer
    dist      1 → 2 processes scaling efficiency; bytes sent per rank per sync strategy
    ngram     n-gram build time, peak RSS, val BPC; query speed against kenlm and NLTK
    serve     HTTP throughput, TTFT and inter-token latency at several concurrencies
    nlu       classifier and neural tagger texts/s and characters/s against the CRF, jieba and thulac; /v1/segment
              and /v1/classify with N concurrent clients against one (dynamic batching on and off)

Peers come from the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hanlm.bench import SUITES
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.log import measure_matmul_peak, read_metrics

PEERS = {"train": ("transformers",), "generate": ("transformers",), "ngram": ("kenlm", "nltk"), "serve": ("httpx",),
         "nlu": ("httpx",)}
GOALS = {"mfu": 0.75, "train_vs_hf": 1.2, "decode_vs_hf": 2.0, "engine_vs_llama_cpp": 0.9}


def data_suite(quick: bool) -> list[dict]:
    """End-to-end `prepare` speed: read, split, train the tokenizer, encode, write."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-") as tmp:
        for kind in ("char",) if quick else ("char", "bpe", "word"):
            cfg = load_config(overrides=[f"tokenizer.kind={kind}", "log.progress=false"])
            started = time.perf_counter()
            prepared = prepare(cfg, Path(tmp) / kind, force=True, progress=False)
            seconds = time.perf_counter() - started
            rows.append({"tokenizer": kind, "seconds": seconds, "mb": prepared.meta["text_bytes"] / 1e6,
                         "mb_per_s": prepared.meta["text_bytes"] / 1e6 / seconds})
    return rows


def dist_suite(quick: bool) -> dict[str, Any]:
    """Scaling from 1 to 2 worker processes (tokens/s of the whole job) and bytes per sync strategy."""
    from hanlm.bench.sync import BASE, DIST_SUITE_STRATEGIES, GLOBAL_BATCH, strategies
    from hanlm.bench.sync import run as run_strategy

    # Quick (the test suite's smoke run): startup dominates each launch, so fewer and shorter runs, and a
    # final evaluation of a few batches (after 12 steps its BPC measures nothing anyway).
    steps = 12 if quick else 200
    cap = ["eval.final_max_batches=4"] if quick else []
    # The same threads per worker in both runs (half the cores), so that 2 workers can reach 2×.
    threads = max(1, (os.cpu_count() or 2) // 2)
    scaling = {}
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-dist-") as tmp:
        for nproc in (1, 2):
            run_dir = Path(tmp) / f"nproc{nproc}"
            sets = [f"train.max_steps={steps}", f"train.run_dir={run_dir}", "log.every_steps=1",
                    f"train.threads={threads}", f"train.micro_batch={GLOBAL_BATCH // 2}", *cap]  # per worker, both
            done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--nproc", str(nproc), *BASE,
                                   *(a for kv in sets for a in ("--set", kv))], capture_output=True, text=True,
                                  check=False)
            if done.returncode:
                raise RuntimeError(f"the {nproc}-process run failed:\n{done.stderr[-2000:]}")
            train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][5:]
            scaling[nproc] = sum(r["tokens_per_s"] for r in train) / len(train)
        every = strategies(steps)
        names = ("full", "powersgd-r8") if quick else DIST_SUITE_STRATEGIES
        sync = [run_strategy(name, [*every[name], *cap], steps, Path(tmp) / "sync") for name in names]
    full = next(s for s in sync if s["strategy"] == "full")
    for s in sync:
        s["vs_full"] = full["bytes"] / s["bytes"] if s["bytes"] else float("inf")
    return {"steps": steps, "threads_per_worker": threads, "tokens_per_s": scaling,
            "efficiency": scaling[2] / (2 * scaling[1]), "sync": sync}


def ngram_suite(quick: bool) -> dict[str, Any]:
    """Build one order in a fresh process (time, peak RSS, BPC), then query speeds against peers."""
    from hanlm.bench import ngram

    order, nltk_docs = (3, 300) if quick else (5, 2000)
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-ngram-") as tmp:
        done = subprocess.run([sys.executable, "-m", "hanlm.bench.ngram", "--out", tmp, "--build-one", str(order)],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"building the {order}-gram failed:\n{done.stderr[-2000:]}")
        build = json.loads(done.stdout.strip().splitlines()[-1])
        query = ngram.compare_queries(Path(tmp), nltk_docs=nltk_docs, nltk_queries=50 if quick else 300)
    return {"build": build, **query}


def serve_suite(quick: bool) -> list[dict]:
    from hanlm.bench import serve

    model, cfg, tokenizer = serve.small_model()
    levels, requests, tokens = ([1, 8], 8, 32) if quick else ([1, 8, 32], 32, 64)
    return serve.server_load(model, cfg, tokenizer, levels, requests, tokens)


def generate_suite(device: torch.device, quick: bool) -> dict[str, Any]:
    """Decode speed on random weights (hanlm, transformers, llama.cpp), then speculative decoding of a
    trained model (which a draft needs: it is only as good as the model's agreement with it)."""
    from hanlm.bench import speculative, step

    rows = step.decode_suite(device, quick)
    return {"decode": rows, "speculative": speculative.speculative_suite(quick) if device.type == "cpu" else None}


def missing_peers(suites: list[str]) -> list[str]:
    """The peer packages `suites` need that are not installed."""
    import importlib.util

    needed = dict.fromkeys(p for name in suites for p in PEERS.get(name, ()))
    return [p for p in needed if importlib.util.find_spec(p) is None]


def run_suite(name: str, device: str, quick: bool, peak: float) -> Any:
    """One suite's results, in this process."""
    from hanlm.bench import nlu, step

    dev = torch.device(device)
    work: dict[str, Callable[[], Any]] = {
        "train": lambda: step.train_step_suite(dev, peak, quick),
        "generate": lambda: generate_suite(dev, quick),
        "data": lambda: data_suite(quick),
        "dist": lambda: dist_suite(quick),
        "ngram": lambda: ngram_suite(quick),
        "serve": lambda: serve_suite(quick),
        "nlu": lambda: nlu.nlu_suite(quick),
    }
    return work[name]()


def _isolated(name: str, device: str, quick: bool, peak: float) -> Any:
    """run_suite in a fresh process: a suite must not inherit the memory, allocator and thread state
    that the one before left (after the training suite, `prepare` ran 5× slower in the same process)."""
    done = subprocess.run([sys.executable, "-m", "hanlm.bench.harness", name, "--device", device, "--peak",
                           repr(peak), *(["--quick"] if quick else [])], stdout=subprocess.PIPE, text=True,
                          check=False)
    lines = done.stdout.strip().splitlines() or [""]
    print(*lines[:-1], sep="\n", end="\n" if len(lines) > 1 else "")
    if done.returncode:
        raise RuntimeError(f"the {name} suite failed (exit status {done.returncode}); its output is above")
    return json.loads(lines[-1])


def run(suites: list[str], device: str, quick: bool, out: Path, command: str,
        echo: Callable[[str], None] = print) -> Path:
    """Run `suites`, each in its own process, and write the results; returns the JSON file's path."""
    peak = measure_matmul_peak(device)
    dtype = "bf16" if device == "cuda" else "fp32"
    echo(f"machine limit: dense {dtype} matmul {peak / 1e9:,.0f} GFLOP/s on {device}")
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "device": device, "quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": {"matmul_flops": peak, "dtype": dtype}, "command": command, "suites": {}}
    for name in suites:
        started = time.perf_counter()
        echo(f"[{name}] running…")
        results["suites"][name] = _isolated(name, device, quick, peak)
        echo(f"[{name}] done in {time.perf_counter() - started:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.now().strftime('%Y-%m-%d')}-{platform.node() or 'host'}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    plots = _plots(results, stem)
    report = markdown(results, [p.name for p in plots])
    stem.with_suffix(".md").write_text(report)
    echo(report)
    return stem.with_suffix(".json")


def _verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "not met"


def _train_md(rows: list[dict]) -> list[str]:
    lines = ["## Training step", "", "| shape | model | parameters | batch | step | tokens/s | MFU | eager hanlm is |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['shape']} | {x['model']} | {x['params'] / 1e6:.1f} M | {x['batch']} | {x['step_s']:.3f} s | "
              f"{x['tokens_per_s']:,.0f} | {x['mfu']:.0%} | {x['hanlm_speedup']:.2f}× |" for x in rows]
    lines.append("")
    for x in (x for x in rows if x["model"].startswith("hanlm")):
        peers = {p["model"]: x["tokens_per_s"] / p["tokens_per_s"] for p in rows
                 if p["shape"] == x["shape"] and p["model"].startswith("transformers")}
        against = "; ".join(f"{ratio:.2f}× {name} (goal ≥ {GOALS['train_vs_hf']}×: "
                            f"{_verdict(ratio, GOALS['train_vs_hf'])})" for name, ratio in peers.items())
        lines.append(f"- {x['shape']}, {x['model']}: MFU {x['mfu']:.0%} (goal ≥ {GOALS['mfu']:.0%}: "
                     f"{_verdict(x['mfu'], GOALS['mfu'])}); {against}")
    return [*lines, ""]


def _generate_md(result: dict[str, Any]) -> list[str]:
    from hanlm.bench import speculative, step

    rows = result["decode"]
    lines = ["## Generation (greedy decode)", "",
             "| shape | batch | model | new tokens | tokens/s | hanlm is | same tokens as hanlm |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['shape']} | {x['batch']} | {x['model']} | {x['new_tokens']} | {x['tokens_per_s']:,.0f} | "
              f"{x['hanlm_speedup']:.2f}× | {x.get('same_tokens', '–')} |" for x in rows]
    one = next(x for x in rows if x["batch"] == 1 and x["model"].startswith("transformers"))
    goal = GOALS["decode_vs_hf"]
    lines += ["", (f"- batch 1: hanlm decodes {one['hanlm_speedup']:.2f}× as fast as transformers' generate "
                   f"(goal ≥ {goal}×: {_verdict(one['hanlm_speedup'], goal)})")]
    llama = [x for x in rows if x["model"].startswith("llama.cpp")]
    lines += [f"- batch 1: {x['model']} decodes {1 / x['hanlm_speedup']:.2f}× as fast as hanlm" for x in llama]
    served = next((x for x in rows if x["model"] == step.SERVE_ENGINE), None)
    if served:
        own = next(x for x in llama if x["model"] == "llama.cpp f32")
        kept, goal = served["tokens_per_s"] / own["tokens_per_s"], GOALS["engine_vs_llama_cpp"]
        lines.append(f"- batch 1: hanlm's serving engine on llama.cpp f32 keeps {kept:.0%} of llama.cpp's own "
                     f"tokens/s (goal ≥ {goal:.0%}: {_verdict(kept, goal)})")
    if not llama:
        lines.append("- llama.cpp: not measured (CPU only, and it needs the extra: pip install -e '.[llamacpp]')")
    lines.append("")
    if result.get("speculative"):
        lines += ["### Speculative decoding", "", *speculative.markdown(result["speculative"])]
    return lines


def _data_md(rows: list[dict]) -> list[str]:
    return ["## Data preparation", "", "| tokenizer | MB | seconds | MB/s |", "|---|---|---|---|",
            *(f"| {x['tokenizer']} | {x['mb']:.2f} | {x['seconds']:.2f} | {x['mb_per_s']:.2f} |" for x in rows), ""]


def _dist_md(d: dict[str, Any]) -> list[str]:
    tps = {int(k): v for k, v in d["tokens_per_s"].items()}
    return ["## Distributed", "",
            (f"{d['steps']} steps of the 2-layer d=128 model, {d['threads_per_worker']} thread(s) per worker: "
             f"1 process {tps[1]:,.0f} tokens/s, 2 processes {tps[2]:,.0f} tokens/s: scaling efficiency "
             f"**{d['efficiency']:.0%}**."), "",
            "| sync | bytes sent per rank | less than full | val BPC |", "|---|---|---|---|",
            *(f"| {x['strategy']} | {x['bytes'] / 1e6:,.1f} MB | {x['vs_full']:.1f}× | {x['bpc']:.3f} |"
              for x in d["sync"]), ""]


def _ngram_md(n: dict[str, Any]) -> list[str]:
    b, q = n["build"], n["query"]
    return ["## n-gram", "",
            (f"{b['order']}-gram on the train split: count + estimate {b['estimate_s']:.1f} s, ARPA "
             f"{b['write_s']:.1f} s, peak RSS {b['peak_rss'] / 2**30:.2f} GiB, val BPC {b['bpc']:.3f}."), "",
            "| n-grams scored per second | hanlm, whole stream | hanlm, per sentence | kenlm | NLTK |",
            "|---|---|---|---|---|",
            (f"| 5-gram of the first {n['nltk_docs']:,} documents | {q['hanlm_stream_per_s']:,.0f} | "
             f"{q['hanlm_sentence_per_s']:,.0f} | {q['kenlm_sentence_per_s']:,.0f} | {n['nltk']['nltk_per_s']:,.1f} |"),
            ""]


def _serve_md(rows: list[dict]) -> list[str]:
    from hanlm.bench import serve

    top = rows[-1]
    gain = top["tokens_per_s"] / rows[0]["tokens_per_s"]
    return ["## Serving", "", serve.table({"load": rows}),
            f"- {top['concurrency']} clients received {top['of_ceiling']:.0%} of the engine's batched decode "
            f"(goal ≥ 70%: {_verdict(top['of_ceiling'], 0.7)}) and {gain:.1f}× one client's tokens/s (goal ≥ 8×: "
            f"{_verdict(gain, 8.0)})", ""]


def _nlu_md(result: dict[str, Any]) -> list[str]:
    from hanlm.bench import nlu

    return nlu.markdown(result)


_SECTIONS: dict[str, Callable[[Any], list[str]]] = {
    "train": _train_md, "generate": _generate_md, "data": _data_md, "dist": _dist_md, "ngram": _ngram_md,
    "serve": _serve_md, "nlu": _nlu_md}


def markdown(r: dict[str, Any], plots: list[str] = ()) -> str:
    """The report: every suite's table with its ratios against the goals."""
    m = r["machine"]
    lines = [f"# hanlm bench — {r['host']}, {r['date']}", "",
             f"`{r['command']}` · device {r['device']} · torch {r['torch']} · {r['threads']} threads"
             + (" · quick" if r["quick"] else ""), "",
             f"Machine limit: dense {m['dtype']} matmul **{m['matmul_flops'] / 1e9:,.0f} GFLOP/s**.", ""]
    for name, section in _SECTIONS.items():
        if name in r["suites"]:
            lines += section(r["suites"][name])
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(r: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for suite, key, label, group in (("train", "tokens_per_s", "training tokens/s", "shape"),
                                     ("generate", "tokens_per_s", "decode tokens/s", "batch")):
        rows = r["suites"].get(suite)
        if isinstance(rows, dict):
            rows = rows["decode"]
        if not rows:
            continue
        groups = list(dict.fromkeys(str(x[group]) for x in rows))
        models = list(dict.fromkeys(x["model"] for x in rows))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            values = [next((x[key] for x in rows if x["model"] == model and str(x[group]) == g), 0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=model)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(groups))],
                      [f"{group} {g}" for g in groups])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.set_title(f"{label} — {r['device']}")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{suite}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    """`python -m hanlm.bench.harness SUITE`: one suite, its results as JSON on the last line of stdout."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hanlm.bench.harness", description=main.__doc__)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak", type=float, required=True, help="the matmul FLOP/s measured by the parent")
    args = parser.parse_args(argv)
    result = run_suite(args.suite, args.device, args.quick, args.peak)
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
