"""The training-recipe study: candidates trained for the same wall minutes or the same steps, val BPC
against time and tokens, and off-domain BPC.

    python -m hanlm.bench.recipe [--minutes 4] [--only base,muon] [--out bench/results/recipe]
    python -m hanlm.bench.recipe --base demo --steps 1000 [--only demo,muon-0.05] [--out DIR]

Each candidate is a base recipe with a few `--set` overrides, trained on `people-daily-1998`. Two
bases: `issue11` (the default, so old commands reproduce: the demo of issue 11, the `small` GPT,
char tokens, 8 × 256 tokens per step, AdamW at 3e-3, fp32) and `demo` (the current demo recipe of
configs/default.yaml: BPE 8000, 16 × 128 tokens per step, AdamW at 3e-3, warm-up 100,
train.precision auto: bf16 where the CPU has it). Two budgets: `--minutes M` of wall time on this
machine (all its cores), with the lr schedule on the minutes clock (train.schedule_clock minutes)
so that every run ends its decay: the equal-time comparison; or `--steps N`, exactly N optimizer
steps with the schedule on steps and no time limit: the equal-token comparison. Evaluations read the
whole val split; BPC is per character, so tokenizers compare. Each candidate's final checkpoint is
also scored on the distinct texts of the built-in chn-reviews (product reviews, off-domain for news;
`--off-domain-texts N` of them evenly spaced, 0: all). The table gives minutes and tokens/s beside
both BPCs, so equal-token and equal-minute comparisons both read from it. The n-gram references
(3- and 5-gram, modified Kneser-Ney, char tokens) are built once per --out. A candidate whose
result is already in --out is not trained again (delete its directory to rerun it); one scored on
another number of off-domain texts is only rescored.

Writes results.json, table.md and curves.png (val BPC against minutes and against training
tokens, the 5-gram as a horizontal line) into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hanlm.bench import suite_parser
from hanlm.data.offdomain import OFF_DOMAIN
from hanlm.eval import evaluate_checkpoint
from hanlm.log import read_metrics

# The base recipe, on top of the `default` config: fixed here so that the study does not move with the demo.
BASE = ["model.preset=small", "tokenizer.kind=char", "train.block_size=256", "train.micro_batch=8", "train.lr=3e-3",
        "train.grad_accum=1", "model.dropout=0", "train.optimizer=adamw", "train.schedule=cosine",
        "train.precision=fp32"]

# The demo recipe of configs/default.yaml before issue 34 (December 2026), fixed here likewise: BPE 8000, 16 × 128
# tokens per step, AdamW at 3e-3, warm-up 100, bf16 autocast where the CPU has bf16 instructions (precision auto),
# no distillation.
DEMO_BASE = ["model.preset=small", "tokenizer.kind=bpe", "tokenizer.vocab_size=8000", "train.block_size=128",
             "train.micro_batch=16", "train.grad_accum=1", "train.lr=3e-3", "train.warmup_steps=100",
             "model.dropout=0", "train.optimizer=adamw", "train.schedule=cosine", "train.precision=auto",
             "train.distill_weight=0"]

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

# Overrides of the demo base: the levers of issue 34.
DEMO_CANDIDATES: dict[str, list[str]] = {
    "demo": [],
    "ema": ["train.ema_decay=0.995"],
    "distill": ["train.distill_weight=0.3"],
    "distill-0.5": ["train.distill_weight=0.5"],
    "distill-5gram": ["train.distill_weight=0.3", "train.distill_order=5"],
    "distill-ema": ["train.distill_weight=0.3", "train.ema_decay=0.995"],
    "demo-seed7": ["train.seed=7"],  # a second seed of the pair that decided distillation
    "distill-seed7": ["train.distill_weight=0.3", "train.seed=7"],
    "bpe-dropout": ["tokenizer.bpe_dropout=0.1"],
    "muon-0.05": ["train.optimizer=muon", "train.muon_lr=0.05"],
    "muon-0.1": ["train.optimizer=muon", "train.muon_lr=0.1"],
    "muon-distill": ["train.optimizer=muon", "train.muon_lr=0.05", "train.distill_weight=0.3"],
    # Around the demo's recipe (muon-distill): a larger Muon step, a heavier or a longer-context teacher.
    "muon-0.1-distill": ["train.optimizer=muon", "train.muon_lr=0.1", "train.distill_weight=0.3"],
    "muon-distill-0.5": ["train.optimizer=muon", "train.muon_lr=0.05", "train.distill_weight=0.5"],
    "muon-distill-5gram": ["train.optimizer=muon", "train.muon_lr=0.05", "train.distill_weight=0.3",
                           "train.distill_order=5"],
    # A second seed of the pair that decided the demo's distillation weight.
    "muon-distill-seed7": ["train.optimizer=muon", "train.muon_lr=0.05", "train.distill_weight=0.3", "train.seed=7"],
    "muon-distill-0.5-seed7": ["train.optimizer=muon", "train.muon_lr=0.05", "train.distill_weight=0.5",
                               "train.seed=7"],
    "deep-6": ["model.n_layer=6"],
}

BASES: dict[str, tuple[list[str], dict[str, list[str]]]] = {"issue11": (BASE, CANDIDATES),
                                                          "demo": (DEMO_BASE, DEMO_CANDIDATES)}

# What every candidate shares: a warm-up of 100 steps, the whole val split at every evaluation, quiet logs;
# the budget's keys follow (`budget_sets`). The bases set the precision (fp32; auto for demo).
COMMON = ["train.warmup_steps=100", "eval.max_batches=null", "checkpoint.every_steps=1000000", "log.progress=false",
          "log.tensorboard=false", "generate.max_tokens=1"]


def budget_sets(budget: dict[str, float]) -> list[str]:
    """The keys of a budget: {"minutes": M} (the schedule on the minutes clock, steps unbounded) or
    {"steps": N} (exactly N steps, the schedule on steps, no time limit)."""
    if "steps" in budget:
        return ["train.schedule_clock=steps", f"train.max_steps={int(budget['steps'])}", "train.max_minutes=null",
                "train.max_tokens=null"]
    return ["train.schedule_clock=minutes", "train.max_steps=1000000", f"train.max_minutes={budget['minutes']}"]


def candidate_sets(overrides: list[str], base: str, budget: dict[str, float]) -> list[str]:
    """Every `--set` a neural candidate trains with: its base, the shared keys, the budget, its overrides."""
    return [*BASES[base][0], *COMMON, *budget_sets(budget), *overrides]

NGRAMS = {"3-gram": ["model.arch=ngram", "model.order=3"], "5-gram": ["model.arch=ngram", "model.order=5"]}
# The n-gram references count the base's own tokens.
NGRAM_TOKENS = {"issue11": ["tokenizer.kind=char"], "demo": ["tokenizer.kind=bpe", "tokenizer.vocab_size=8000"]}


def run_candidate(name: str, overrides: list[str], budget: dict[str, float], out: Path, evals: int,
                  base: str = "issue11", off_domain_texts: int | None = None) -> dict[str, Any]:
    """Train one candidate (or reuse its result in `out`) and return its curve and final figures; with
    `off_domain_texts` (0: all) also its final checkpoint's BPC on the distinct chn-reviews texts."""
    run_dir = out / "runs" / name
    result_file = run_dir / "result.json"
    neural = "model.arch=ngram" not in overrides
    if result_file.exists():
        result = json.loads(result_file.read_text())
        if neural and result.get("budget", budget) != budget:
            raise SystemExit(f"{result_file} was trained with the budget {result['budget']}, not {budget}: use "
                             "another --out, or delete its directory to rerun it")
    else:
        sets = candidate_sets(overrides, base, budget) if neural else [*NGRAM_TOKENS[base], *overrides]
        every = _eval_every(overrides, budget, evals) if neural else 1000000
        sets += [f"eval.every_steps={every}", f"train.run_dir={run_dir}"]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "default",
                               *(a for kv in sets for a in ("--set", kv))], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = result_of(run_dir, name, overrides) | {"minutes": (time.perf_counter() - started) / 60}
        if neural:
            result |= {"base": base, "budget": budget}
    if off_domain_texts is not None and result.get("off_domain", {}).get("texts") != off_domain_texts:
        result["off_domain"] = off_domain(run_dir, off_domain_texts)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def off_domain(run_dir: Path, texts: int) -> dict[str, Any]:
    """A run's final checkpoint scored on the distinct chn-reviews texts (`texts` of them evenly spaced; 0: all),
    as `hanlm eval RUN --data chn-reviews --distinct` scores them."""
    scored = evaluate_checkpoint(str(run_dir), data=[OFF_DOMAIN], distinct=True, texts=texts)
    return {"spec": OFF_DOMAIN, "texts": texts, "bpc": scored.bpc, "characters": scored.characters}


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


def _eval_every(overrides: list[str], budget: dict[str, float], evals: int) -> int:
    """Steps between evaluations for about `evals` points per curve: with a step budget, its share; with
    minutes, from a rough speed guess (tokens per step against 4,000 tokens/s for the base shape, scaled by
    layers × width²)."""
    if "steps" in budget:
        return max(10, round(budget["steps"] / evals))
    minutes = budget["minutes"]
    sets = dict(o.split("=", 1) for o in overrides)
    tokens_per_step = int(sets.get("train.micro_batch", 8)) * int(sets.get("train.block_size", 256))
    layers, width = int(sets.get("model.n_layer", 4)), int(sets.get("model.n_embd", 256))
    speed = 4000 * (4 * 256 * 256) / (layers * width * width)
    steps = minutes * 60 * speed / tokens_per_step
    return max(10, round(steps / evals))


def plot(results: list[dict[str, Any]], reference: dict[str, float], path: Path,
         title: str = "people-daily-1998: val BPC at equal wall time") -> None:
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
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: list[dict[str, Any]], reference: dict[str, float], at_tokens: int = 500_000,
          reference_off: dict[str, float] | None = None, reference_tokens: str = "char") -> str:
    """The candidates as a Markdown table, best first, against the 5-gram: val BPC and off-domain BPC (the
    distinct chn-reviews texts; — where not scored) beside the minutes and tokens/s it took, and the BPC each
    had reached at `at_tokens` training tokens, which separates sample efficiency from speed (the machine's
    speed varies by ~15% from run to run)."""
    five = reference.get("5-gram")
    rows = [f"| candidate | overrides | val BPC | off-domain BPC | minutes | tokens/s | steps | tokens | vs 5-gram "
            f"| val BPC at {at_tokens / 1e6:g} M tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["bpc"]):
        gap = f"{r['bpc'] - five:+.3f}" if five else ""
        at = bpc_at(r["curve"], at_tokens)
        trained = r["curve"][-1]["minutes"]
        other = r.get("off_domain")
        rows.append(f"| {r['name']} | `{' '.join(r['overrides']) or '(the base recipe)'}` | {r['bpc']:.3f} | "
                    f"{'—' if other is None else format(other['bpc'], '.3f')} | {trained:.1f} | "
                    f"{r['tokens'] / (60 * trained) if trained else 0:,.0f} | {r['steps']:,} | {r['tokens']:,} | "
                    f"{gap} | {'—' if at is None else f'{at:.3f}'} |")
    for name, bpc in reference.items():
        off = (reference_off or {}).get(name)
        rows.append(f"| {name} | modified Kneser-Ney, {reference_tokens} tokens | {bpc:.3f} | "
                    f"{'' if off is None else format(off, '.3f')} | | | | | | |")
    texts = {r["off_domain"]["texts"] for r in results if r.get("off_domain")}
    if texts:
        rows.append("\nOff-domain BPC: the final checkpoint on " + " / ".join(
            "all the distinct chn-reviews texts" if n == 0 else f"{n:,} evenly spaced distinct chn-reviews texts"
            for n in sorted(texts)) + " (`hanlm eval RUN --data chn-reviews --distinct`).")
    return "\n".join(rows)


def bpc_at(curve: list[dict[str, Any]], tokens: int) -> float | None:
    """The curve's val BPC at `tokens` training tokens, interpolated linearly; None beyond its end."""
    for a, b in zip(curve, curve[1:]):
        if a["tokens"] <= tokens <= b["tokens"]:
            return a["bpc"] + (b["bpc"] - a["bpc"]) * (tokens - a["tokens"]) / (b["tokens"] - a["tokens"])
    return None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The study's arguments, checked: `names` (the candidates to run, of the chosen base) and `budget`
    ({"minutes": M} or {"steps": N}) resolved."""
    parser = suite_parser("recipe", __doc__)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall minutes per candidate, the schedule on the minutes "
                        "clock: equal time (default 4)")
    budget.add_argument("--steps", type=int, metavar="N", help="exactly N optimizer steps per candidate, the "
                        "schedule on steps, no time limit: equal tokens")
    parser.add_argument("--base", choices=list(BASES), default="issue11", help="the recipe the candidates "
                        "override: issue11 (char tokens, 8 × 256, fp32; the default) or demo (configs/default.yaml: "
                        "BPE 8000, 16 × 128, precision auto)")
    candidates = "; ".join(f"{b}: {', '.join(c)}" for b, (_, c) in BASES.items())
    parser.add_argument("--only", default="", help="comma-separated candidates of the base (default all; none: "
                        f"only --runs): {candidates}")
    parser.add_argument("--evals", type=int, default=8, help="evaluations per curve, roughly (default 8)")
    parser.add_argument("--off-domain-texts", type=int, default=0, metavar="N", help="score each final checkpoint "
                        "on N evenly spaced distinct chn-reviews texts (default 0: all 17,408)")
    parser.add_argument("--runs", default="", metavar="DIR,...",
                        help="also plot and tabulate these finished run directories (e.g. runs/pd-best), as they ran")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be above 0, got {args.minutes}")
    if args.off_domain_texts < 0:
        parser.error(f"--off-domain-texts must be 0 (all) or more, got {args.off_domain_texts}")
    if args.evals < 1:
        parser.error(f"--evals must be at least 1, got {args.evals}")
    args.budget = {"steps": args.steps} if args.steps is not None else {"minutes": args.minutes or 4.0}
    offered = BASES[args.base][1]
    args.names = [] if args.only == "none" else [n for n in args.only.split(",") if n] or list(offered)
    unknown = [n for n in args.names if n not in offered]
    if unknown:
        parser.error(f"unknown candidates {', '.join(unknown)} of --base {args.base}; choose from "
                     f"{', '.join(offered)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counted = {n: run_candidate(n, o, {"minutes": 0}, args.out, 1, args.base, args.off_domain_texts)
               for n, o in NGRAMS.items()}
    reference = {n: r["bpc"] for n, r in counted.items()}
    reference_off = {n: r["off_domain"]["bpc"] for n, r in counted.items()}
    what = f"{args.budget['steps']:,} steps" if "steps" in args.budget else f"{args.budget['minutes']:g} minutes"
    results = []
    for name in args.names:
        print(f"{name}: {what} ...", flush=True)
        results.append(run_candidate(name, BASES[args.base][1][name], args.budget, args.out, args.evals, args.base,
                                     args.off_domain_texts))
        print(f"  val BPC {results[-1]['bpc']:.3f}, off-domain {results[-1]['off_domain']['bpc']:.3f} after "
              f"{results[-1]['steps']:,} steps", flush=True)
    for run_dir in (Path(d) for d in args.runs.split(",") if d):
        results.append(result_of(run_dir, run_dir.name, [f"(its own config: {run_dir}/config.yaml)"])
                       | {"off_domain": off_domain(run_dir, args.off_domain_texts)})
    (args.out / "results.json").write_text(json.dumps({**args.budget, "base": args.base,
                                                      "off_domain_texts": args.off_domain_texts,
                                                      "reference": reference, "results": results}, indent=1))
    tokens = "BPE 8000" if args.base == "demo" else "char"
    text = table(results, reference, reference_off=reference_off, reference_tokens=tokens)
    (args.out / "table.md").write_text(text + "\n")
    plot(results, reference, args.out / "curves.png", f"people-daily-1998: val BPC at equal {what.split()[1]} "
         f"({what}, base {args.base})")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
