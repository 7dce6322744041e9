"""Sync strategies side by side: bytes communicated against final val BPC at a fixed token budget.

    python -m hanlm.bench.sync [--steps 1200] [--out bench/results/sync] [--only full,diloco-h32]

Every strategy trains the same model on `people-daily-1998` with 2 workers (torchrun, gloo),
the same seed, batch and number of steps, then evaluates the whole val split. Writes
results.json, table.md and comm_vs_bpc.png into --out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from hanlm.bench import suite_parser
from hanlm.checkpoint import load_latest
from hanlm.log import read_metrics

# 2 layers, 128 wide, 16 × 64 tokens per worker per step: the setup the strategies were calibrated on.
BASE = ["--config", "tiny", "--set", "model.n_embd=128", "--set", "model.n_head=4", "--set", "train.micro_batch=16",
        "--set", "train.block_size=64", "--set", "eval.every_steps=1000000", "--set", "checkpoint.every_steps=1000000",
        "--set", "log.every_steps=100", "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "generate.max_tokens=1", "--set", "log.peak_tflops=0.1"]


# The strategies `hanlm bench dist` compares (a short run of each); this script runs them all.
DIST_SUITE_STRATEGIES = ("full", "fp16", "powersgd-r8", "diloco-h32")


def strategies(steps: int) -> dict[str, list[str]]:
    """Name -> `--set` overrides. DiLoCo warm-up runs synchronise every step for the first 10%;
    PowerSGD's warm-up runs plain all-reduce for the first 5%."""
    warm = str(steps // 10)
    out: dict[str, list[str]] = {"full": ["dist.sync=full"], "fp16": ["dist.sync=fp16"]}
    for rank in (1, 4, 8):
        out[f"powersgd-r{rank}"] = ["dist.sync=powersgd", f"dist.powersgd_rank={rank}", "dist.powersgd_start_step=10"]
    out["powersgd-r4-warmup"] = [*out["powersgd-r4"][:2], f"dist.powersgd_start_step={steps // 20}"]
    for h in (8, 32, 128):
        out[f"diloco-h{h}"] = ["dist.sync=diloco", f"dist.sync_every={h}"]
        out[f"diloco-h{h}-warmup"] = [*out[f"diloco-h{h}"], f"dist.sync_warmup_steps={warm}"]
        out[f"localsgd-h{h}-warmup"] = [*out[f"diloco-h{h}-warmup"], "dist.outer_lr=1", "dist.outer_momentum=0"]
    return out


def run(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    run_dir = out / "runs" / name
    sets = [a for kv in [*overrides, f"train.max_steps={steps}", f"train.run_dir={run_dir}"] for a in ("--set", kv)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--nproc", "2", *BASE, *sets],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]
    state = load_latest(str(run_dir / "checkpoints")).train_state
    return {"strategy": name, "bpc": final["bpc"], "bytes": state["ranks"][0]["sync"]["bytes_total"],
            "seconds": time.perf_counter() - started}


def write(results: list[dict], out: Path, command: str) -> None:
    full = next((r for r in results if r["strategy"] == "full"), None)
    rows = ["| strategy | bytes all-reduced per rank | vs full | val BPC | vs full | wall time |",
            "|---|---|---|---|---|---|"]
    for r in results:
        less = f"{full['bytes'] / r['bytes']:.1f}× less" if full and r["bytes"] else "—"
        worse = f"{(r['bpc'] / full['bpc'] - 1) * 100:+.1f}%" if full else "—"
        rows.append(f"| {r['strategy']} | {r['bytes'] / 1e6:,.1f} MB | {less} | {r['bpc']:.3f} | {worse} | "
                    f"{r['seconds']:.0f} s |")
    (out / "table.md").write_text(f"Command: `{command}`\n\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in results:
        ax.scatter(r["bytes"] / 1e6, r["bpc"])
        ax.annotate(r["strategy"], (r["bytes"] / 1e6, r["bpc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("MB all-reduced per rank (log)")
    ax.set_ylabel("final val BPC")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "comm_vs_bpc.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("sync", __doc__)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run (default 1200)")
    parser.add_argument("--only", help="comma-separated strategy names (default: all)")
    args = parser.parse_args(argv)
    chosen = strategies(args.steps)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    # Results already in --out stay (a rerun of a strategy replaces its row), so suites can be added to.
    saved = args.out / "results.json"
    results = [r for r in (json.loads(saved.read_text()) if saved.exists() else []) if r["strategy"] not in chosen]
    for name, overrides in chosen.items():
        results.append(run(name, overrides, args.steps, args.out))
        print(f"{name:>22}: {results[-1]['bytes'] / 1e6:10,.1f} MB  BPC {results[-1]['bpc']:.3f}  "
              f"({results[-1]['seconds']:.0f} s)", flush=True)
        write(results, args.out, "python -m hanlm.bench.sync " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
