"""The training-recipe study: candidates trained for the same wall minutes, val BPC against time.

    python -m hanlm.bench.recipe [--minutes 4] [--only base,muon] [--out bench/results/recipe]

Each candidate is the base recipe (the demo of issue 11: the `small` GPT, char tokens, 8 × 256
tokens per step, AdamW at 3e-3, fp32) with a few `--set` overrides, trained on
`people-daily-1998` for `--minutes` of wall time on this machine (all its cores), with the lr
schedule measured in minutes (train.schedule_clock minutes) so that every run ends its decay.
Evaluations read the whole val split; BPC is per character, so tokenizers compare. The n-gram
references (3- and 5-gram, modified Kneser-Ney) are built the same way. A candidate whose
result is already in --out is not run again (delete its directory to rerun it).

Writes results.json, table.md and curves.png (val BPC against minutes and against training
tokens, the 5-gram as a horizontal line) into --out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hanlm.bench import suite_parser
from hanlm.log import read_metrics

# The base recipe, on top of the `default` config: fixed here so that the study does not move with the demo.
BASE = ["model.preset=small", "tokenizer.kind=char", "train.block_size=256", "train.micro_batch=8", "train.lr=3e-3",
        "train.grad_accum=1", "model.dropout=0", "train.optimizer=adamw", "train.schedule=cosine"]

# Overrides of the base recipe (4 layers, 256 wide, 8 × 256 tokens per step, AdamW at 3e-3).
CANDIDATES: dict[str, list[str]] = {
    "base": [],
    "muon": ["train.optimizer=muon"],
    "ctx128": ["train.block_size=128", "train.micro_batch=16"],
    "ctx64": ["train.block_size=64", "train.micro_batch=32"],
    "batch32": ["train.micro_batch=32", "train.lr=5e-3"],
    "narrow-3x192": ["model.n_layer=3", "model.n_embd=192", "model.n_head=3"],
    "wide-4x384": ["model.n_embd=384", "model.n_head=6"],
    "deep-8x256": ["model.n_layer=8"],
    "dropout0.1": ["model.dropout=0.1"],
    "wsd": ["train.schedule=wsd", "train.min_lr_ratio=0.0"],
    "bpe": ["tokenizer.kind=bpe", "tokenizer.vocab_size=8000"],
    "word": ["tokenizer.kind=word", "tokenizer.vocab_size=16000"],
    "bf16": ["train.precision=bf16"],
    "compile": ["train.compile=true"],
    "bf16-ctx128": ["train.precision=bf16", "train.block_size=128", "train.micro_batch=16"],
    "bf16-ctx128-bpe": ["train.precision=bf16", "train.block_size=128", "train.micro_batch=16", "tokenizer.kind=bpe",
                        "tokenizer.vocab_size=8000"],
    "bf16-ctx128-word": ["train.precision=bf16", "train.block_size=128", "train.micro_batch=16", "tokenizer.kind=word",
                         "tokenizer.vocab_size=16000"],
    "lstm-2x512": ["model.arch=lstm", "model.n_layer=2", "model.n_embd=512", "train.block_size=128",
                   "train.micro_batch=16"],
}

# What every candidate shares: fp32 (the bf16 candidates ask for autocast), the clock, a warm-up of 100
# steps, the whole val split at every evaluation, quiet logs.
COMMON = ["train.precision=fp32", "train.schedule_clock=minutes", "train.max_steps=1000000", "train.warmup_steps=100",
          "eval.max_batches=null", "checkpoint.every_steps=1000000", "log.progress=false", "log.tensorboard=false",
          "generate.max_tokens=1"]

NGRAMS = {"3-gram": ["model.arch=ngram", "model.order=3"], "5-gram": ["model.arch=ngram", "model.order=5"]}


def run_candidate(name: str, overrides: list[str], minutes: float, out: Path, evals: int) -> dict[str, Any]:
    """Train one candidate (or reuse its result in `out`) and return its curve and final figures."""
    run_dir = out / "runs" / name
    result_file = run_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    neural = "model.arch=ngram" not in overrides
    sets = [*BASE, *COMMON, f"train.max_minutes={minutes}", *overrides] if neural else ["tokenizer.kind=char",
                                                                                       *overrides]
    every = _eval_every(overrides, minutes, evals) if neural else 1000000
    sets += [f"eval.every_steps={every}", f"train.run_dir={run_dir}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "default",
                           *(a for kv in sets for a in ("--set", kv))], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = result_of(run_dir, name, overrides) | {"minutes": (time.perf_counter() - started) / 60}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def result_of(run_dir: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    """A run's val curve (minutes from its first record, tokens, step, BPC) and final figures, from
    its metrics.jsonl."""
    records = read_metrics(run_dir / "metrics.jsonl")
    t0 = records[0]["time"]
    curve = [{"minutes": (r["time"] - t0) / 60, "tokens": r["tokens"], "step": r["step"], "bpc": r["bpc"]}
             for r in records if r["kind"] == "eval"]
    if not curve:
        raise SystemExit(f"{run_dir}/metrics.jsonl holds no evaluation")
    return {"name": name, "overrides": overrides, "bpc": curve[-1]["bpc"], "steps": curve[-1]["step"],
            "tokens": curve[-1]["tokens"], "minutes": curve[-1]["minutes"], "curve": curve}


def _eval_every(overrides: list[str], minutes: float, evals: int) -> int:
    """Steps between evaluations for about `evals` points per curve, from a rough speed guess (tokens
    per step against 4,000 tokens/s for the base shape, scaled by layers × width²)."""
    sets = dict(o.split("=", 1) for o in overrides)
    tokens_per_step = int(sets.get("train.micro_batch", 8)) * int(sets.get("train.block_size", 256))
    layers, width = int(sets.get("model.n_layer", 4)), int(sets.get("model.n_embd", 256))
    speed = 4000 * (4 * 256 * 256) / (layers * width * width)
    steps = minutes * 60 * speed / tokens_per_step
    return max(10, round(steps / evals))


def plot(results: list[dict[str, Any]], reference: dict[str, float], path: Path) -> None:
    """Val BPC against minutes and against training tokens, one line per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    styles = [(c, ls) for ls in ("-", "--", ":") for c in plt.get_cmap("tab10").colors]
    for ax, x, label in ((axes[0], "minutes", "wall minutes (2 CPU cores)"), (axes[1], "tokens", "training tokens")):
        for r, (color, style) in zip(results, styles):
            ax.plot([p[x] for p in r["curve"]], [p["bpc"] for p in r["curve"]], marker=".", label=r["name"],
                    color=color, linestyle=style)
        for name, bpc in reference.items():
            ax.axhline(bpc, linestyle="--", color="black" if name == "5-gram" else "grey", linewidth=1)
            ax.annotate(name, (ax.get_xlim()[0], bpc), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    low = min([r["bpc"] for r in results] + list(reference.values()))
    axes[0].set_ylim(low - 0.2, low + 3.0)
    axes[0].set_ylabel("val BPC (whole split)")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle("people-daily-1998: val BPC at equal wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]], reference: dict[str, float], at_tokens: int = 500_000) -> str:
    """The candidates as a Markdown table, best first, against the 5-gram; with the BPC each had
    reached at `at_tokens` training tokens, which separates sample efficiency from speed (the
    machine's speed varies by ~15% from run to run)."""
    five = reference.get("5-gram")
    rows = [f"| candidate | overrides | minutes | val BPC | vs 5-gram | steps | tokens | tokens/s "
            f"| val BPC at {at_tokens / 1e6:g} M tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["bpc"]):
        gap = f"{r['bpc'] - five:+.3f}" if five else ""
        at = bpc_at(r["curve"], at_tokens)
        trained = r["curve"][-1]["minutes"]
        rows.append(f"| {r['name']} | `{' '.join(r['overrides']) or '(the base recipe)'}` | {trained:.1f} | "
                    f"{r['bpc']:.3f} | {gap} | {r['steps']:,} | {r['tokens']:,} | "
                    f"{r['tokens'] / (60 * trained):,.0f} | "
                    f"{'—' if at is None else f'{at:.3f}'} |")
    for name, bpc in reference.items():
        rows.append(f"| {name} | modified Kneser-Ney, char tokens | | {bpc:.3f} | | | | | |")
    return "\n".join(rows)


def bpc_at(curve: list[dict[str, Any]], tokens: int) -> float | None:
    """The curve's val BPC at `tokens` training tokens, interpolated linearly; None beyond its end."""
    for a, b in zip(curve, curve[1:]):
        if a["tokens"] <= tokens <= b["tokens"]:
            return a["bpc"] + (b["bpc"] - a["bpc"]) * (tokens - a["tokens"]) / (b["tokens"] - a["tokens"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("recipe", __doc__)
    parser.add_argument("--minutes", type=float, default=4.0, help="wall minutes per candidate (default 4)")
    parser.add_argument("--only", default="", help="comma-separated candidates (default all; none: only --runs): "
                        + ", ".join(CANDIDATES))
    parser.add_argument("--evals", type=int, default=8, help="evaluations per curve, roughly (default 8)")
    parser.add_argument("--runs", default="", metavar="DIR,...",
                        help="also plot and tabulate these finished run directories (e.g. runs/pd-best), as they ran")
    args = parser.parse_args(argv)
    names = [] if args.only == "none" else [n for n in args.only.split(",") if n] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    reference = {n: run_candidate(n, o, 0, args.out, 1)["bpc"] for n, o in NGRAMS.items()}
    results = []
    for name in names:
        print(f"{name}: {args.minutes:g} minutes ...", flush=True)
        results.append(run_candidate(name, CANDIDATES[name], args.minutes, args.out, args.evals))
        print(f"  val BPC {results[-1]['bpc']:.3f} after {results[-1]['steps']:,} steps", flush=True)
    for run_dir in (Path(d) for d in args.runs.split(",") if d):
        results.append(result_of(run_dir, run_dir.name, [f"(its own config: {run_dir}/config.yaml)"]))
    (args.out / "results.json").write_text(json.dumps({"minutes": args.minutes, "reference": reference,
                                                      "results": results}, indent=1))
    (args.out / "table.md").write_text(table(results, reference) + "\n")
    plot(results, reference, args.out / "curves.png")
    print(table(results, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
