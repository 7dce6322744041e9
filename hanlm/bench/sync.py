"""Low-communication training against full sync: bytes on the wire, val BPC, and wall time on a slow link.

    python -m hanlm.bench.sync [--workers 2,4] [--steps 4000] [--warm 400] [--worker-batch N] [--only NAMES]
                               [--wall-steps 128] [--link-mbps 50] [--link-latency-ms 50] [--out bench/results/sync]

For each number of workers (torchrun, gloo, one thread each; the same 32 sequences per step in all)
one warm-start run synchronises
fully for --warm steps of a --steps schedule and saves a checkpoint, as the papers start DiLoCo
from a pretrained model. Every strategy resumes from that checkpoint and trains to --steps on the
same tokens, then evaluates the whole val split; its bytes are what each rank sent after the warm
start. Then (2 workers) each strategy trains --wall-steps from the warm start twice, on a simulated
link (`dist.link_mbps`, `dist.link_latency_ms`) and without it. The link's busy time is what
communication would cost if nothing hid it; what the training loop waited for is exposed (DiLoCo
times its waits itself; for DDP it is the difference of the two runs' times).
Writes results.json, table.md and sync_frontier.png into --out; rerunning keeps finished rows.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hanlm.bench import suite_parser
from hanlm.checkpoint import load_checkpoint, load_latest
from hanlm.argtypes import positive_int
from hanlm.log import read_metrics

# 2 layers, 128 wide, 32 × 64 tokens per step (16 per worker with 2 workers, 8 with 4): the shape the
# strategies were calibrated on (issue 4), small enough for thousands of steps per strategy on 2 cores.
GLOBAL_BATCH = 32
BASE = ["--config", "tiny", "--set", "model.n_embd=128", "--set", "model.n_head=4", "--set", "train.block_size=64",
        "--set", "eval.every_steps=1000000", "--set", "checkpoint.every_steps=1000000", "--set", "log.every_steps=100",
        "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "generate.max_tokens=1", "--set", "log.peak_tflops=0.1", "--set", "train.threads=1",
        "--set", "eval.final_max_batches=null"]  # the tiny config's cap is for tests: a measurement reads all of val

# The strategies `hanlm bench dist` compares (a short run of each, from scratch).
DIST_SUITE_STRATEGIES = ("full", "fp16", "powersgd-r8", "diloco-h32")

DILOCO = ["dist.sync=diloco"]


# The outer optimizer this benchmark found best after a warm start (outer lr 0.8, Nesterov 0.7); the
# paper's 0.7 / 0.9 overshoots at H = 32 here (the `-paper` row).
OUTER = ["dist.outer_lr=0.8", "dist.outer_momentum=0.7"]


def strategies(steps: int) -> dict[str, list[str]]:
    """Name -> `--set` overrides. (`steps` sizes the from-scratch warm-up of `diloco-h32-warmup`.)"""
    out: dict[str, list[str]] = {"full": ["dist.sync=full"], "fp16": ["dist.sync=fp16"]}
    for rank in (1, 4, 8):
        out[f"powersgd-r{rank}"] = ["dist.sync=powersgd", f"dist.powersgd_rank={rank}", "dist.powersgd_start_step=10"]
    out["diloco-h32-paper"] = [*DILOCO, "dist.sync_every=32"]
    out["diloco-h32-warmup"] = [*out["diloco-h32-paper"], f"dist.sync_warmup_steps={steps // 10}"]
    out["localsgd-h32"] = [*out["diloco-h32-paper"], "dist.outer_lr=1", "dist.outer_momentum=0"]
    for h in (16, 32, 64, 128):
        out[f"diloco-h{h}"] = [*DILOCO, f"dist.sync_every={h}", *OUTER]
        for bits in (8, 4):
            out[f"diloco-h{h}-{bits}bit"] = [*out[f"diloco-h{h}"], f"dist.pseudo_grad_bits={bits}"]
        # Streaming DiLoCo: 4 fragments on a staggered schedule, each overlapped with 4 inner steps.
        for bits in (32, 4) if h >= 32 else ():  # (τ = 4 needs H / 4 > 4)
            name = f"streaming-h{h}" + (f"-{bits}bit" if bits < 32 else "")
            out[name] = [*out[f"diloco-h{h}"], f"dist.pseudo_grad_bits={bits}", "dist.stream_fragments=4",
                         "dist.stream_delay=4"]
    # Outer optimizers around OUTER for 4 workers, where H = 16 at 4 bits lands just outside 2% of full.
    for lr, momentum in ((1.0, 0.8), (0.6, 0.7)):
        out[f"diloco-h16-4bit-outer{lr}-{momentum}"] = [*DILOCO, "dist.sync_every=16", "dist.pseudo_grad_bits=4",
                                                        f"dist.outer_lr={lr}", f"dist.outer_momentum={momentum}"]
    # Other inner learning rates for 4 workers, whose 8 sequences per step make each worker's H steps
    # noisier; full sync at the higher one too, as the fair peer of a retuned lr.
    for lr in ("5e-4", "7e-4", "1.5e-3"):
        out[f"diloco-h16-4bit-lr{lr}"] = [*out["diloco-h16-4bit"], f"train.lr={lr}"]
    out["full-lr1.5e-3"] = ["dist.sync=full", "train.lr=1.5e-3"]
    return out


# Run by default and plotted: with 2 workers every strategy below, with 4 the ones that say most. (The
# 4-worker sweep of outer and inner learning rates is run with --only and shown in the table alone.)
DEFAULT = {2: ("full", "powersgd-r8", "diloco-h32-paper", "diloco-h32", "diloco-h32-8bit", "diloco-h16-4bit",
               "diloco-h32-4bit", "diloco-h64-4bit", "diloco-h128-4bit", "streaming-h32", "streaming-h32-4bit"),
           4: ("full", "diloco-h16-4bit", "diloco-h32-4bit", "streaming-h32-4bit")}


def run(name: str, overrides: list[str], steps: int, out: Path, *, nproc: int = 2, resume: str | None = None,
        stop_after: int | None = None, micro_batch: int | None = None) -> dict:
    """Train one strategy (from scratch, or from `resume`) to `steps` with `micro_batch` sequences per
    worker (default: GLOBAL_BATCH shared by the workers); its final val BPC, the bytes rank 0 sent in all
    (including what the resumed checkpoint had counted) and the wall time."""
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts afresh, not from its own last checkpoint
    sets = [a for kv in [f"train.micro_batch={micro_batch or GLOBAL_BATCH // nproc}", *overrides,
                         f"train.max_steps={steps}", f"train.run_dir={run_dir}"] for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "hanlm.cli", "train", "--nproc", str(nproc), *BASE, *sets,
           *(["--resume", resume] if resume else []), *(["--stop-after", str(stop_after)] if stop_after else [])]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    state = load_latest(str(run_dir / "checkpoints")).train_state
    sync = state["ranks"][0]["sync"]
    return {"strategy": name, "bpc": evals[-1]["bpc"] if evals and not stop_after else None,
            "bytes": sync["bytes_total"], "link_s": sync.get("link_s", 0.0), "wait_s": sync.get("wait_s"),
            "train_s": state["elapsed_s"],
            "seconds": time.perf_counter() - started}


def warm_start(out: Path, nproc: int, steps: int, warm: int, micro_batch: int | None) -> tuple[str, dict]:
    """The shared full-sync checkpoint after `warm` steps of a `steps` schedule (reused when present)."""
    path = out / f"w{nproc}" / "runs" / "warm" / "checkpoints" / f"step-{warm:08d}"
    if not (path / "manifest.json").exists():
        run("warm", ["dist.sync=full"], steps, out / f"w{nproc}", nproc=nproc, stop_after=warm,
            micro_batch=micro_batch)
    state = load_checkpoint(str(path)).train_state
    return str(path), {"bytes": state["ranks"][0]["sync"]["bytes_total"], "elapsed_s": state["elapsed_s"],
                       "link_s": state["ranks"][0]["sync"].get("link_s", 0.0)}


def quality(name: str, overrides: list[str], out: Path, nproc: int, steps: int, warm: tuple[str, dict],
            micro_batch: int | None) -> dict:
    """A strategy from the warm start to the end of the schedule: val BPC and bytes after the warm start."""
    path, base = warm
    r = run(name, overrides, steps, out / f"w{nproc}", nproc=nproc, resume=path, micro_batch=micro_batch)
    return {**r, "workers": nproc, "bytes": r["bytes"] - base["bytes"], "train_s": r["train_s"] - base["elapsed_s"]}


def wall(name: str, overrides: list[str], out: Path, steps: int, wall_steps: int, warm: tuple[str, dict],
         link: list[str], micro_batch: int | None) -> dict:
    """Seconds per step over `wall_steps` from the warm start, on the simulated link and without it; the
    communication per step the link carried, and how much of it the training loop waited for (exposed)."""
    path, base = warm
    timings = {}
    for label, extra in (("plain", []), ("link", link)):
        r = run(f"{name}-{label}", [*overrides, *extra], steps, out / "w2" / "wall", resume=path,
                stop_after=wall_steps, micro_batch=micro_batch)
        timings[label] = r
    if timings["link"]["wait_s"] is not None:
        # DiLoCo times its own waits for communication: exact, where a difference of two wall times is noisy.
        exposed = timings["link"]["wait_s"] / wall_steps
    else:
        exposed = (timings["link"]["train_s"] - timings["plain"]["train_s"]) / wall_steps
    link_s = (timings["link"]["link_s"] - base["link_s"]) / wall_steps
    return {"plain_s_per_step": (timings["plain"]["train_s"] - base["elapsed_s"]) / wall_steps,
            "link_s_per_step": (timings["link"]["train_s"] - base["elapsed_s"]) / wall_steps,
            "comm_s_per_step": link_s, "exposed_s_per_step": exposed,
            "hidden": max(0.0, 1 - exposed / link_s) if link_s > 0 else None}


def against_full(row: dict, full: dict) -> tuple[float | None, float]:
    """How many times fewer bytes `row` sent than `full` (None if it sent none), and its val BPC above
    full's, in percent."""
    return full["bytes"] / row["bytes"] if row["bytes"] else None, 100 * (row["bpc"] / full["bpc"] - 1)


def describe(overrides: list[str]) -> str:
    """The settings of a strategy, as the table shows them."""
    return ", ".join(kv.removeprefix("dist.") for kv in overrides if not kv.startswith("dist.sync="))


def write(results: dict, out: Path, command: str) -> None:
    """table.md, results.json and sync_frontier.png from every row measured so far."""
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    lines = [f"Command: `{command}`", ""]
    order = list(strategies(results["steps"]))
    for workers in sorted({r["workers"] for r in results["quality"].values()}):
        rows = sorted((r for r in results["quality"].values() if r["workers"] == workers),
                      key=lambda r: order.index(r["strategy"]))
        full = next((r for r in rows if r["strategy"] == "full"), None)
        batch = f"{results['worker_batch']} sequences each" if results.get("worker_batch") else \
            f"{GLOBAL_BATCH // workers} sequences each, {GLOBAL_BATCH} in all"
        lines += [f"### {workers} workers ({batch}), steps {results['warm']}–{results['steps']} after a full-sync "
                  "warm start", "",
                  "| strategy | settings | MB sent per rank | less than full | val BPC | vs full | s / 100 steps, "
                  "link | comm hidden |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            less, worse = against_full(r, full) if full else (None, None)
            less = f"{less:,.0f}×" if less is not None else "—"
            worse = f"{worse:+.2f}%" if worse is not None else "—"
            w = results["wall"].get(r["strategy"]) if workers == 2 else None
            timing = (f"{100 * w['link_s_per_step']:.1f} (plain {100 * w['plain_s_per_step']:.1f}) | "
                      f"{w['hidden']:.0%}" if w and w["hidden"] is not None else "— | —")
            lines.append(f"| {r['strategy']} | {describe(r['overrides'])} | {r['bytes'] / 1e6:,.1f} | {less} | "
                         f"{r['bpc']:.4f} | {worse} | {timing} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    plot(results, out / "sync_frontier.png")


def plot(results: dict, path: Path) -> None:
    """BPC against bytes, both relative to full sync of the same workers (left; the default strategies),
    and time per 100 steps on the simulated link (right)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    lowest = 0.0
    for workers, marker, color in ((2, "o", "C0"), (4, "s", "C1")):
        rows = [r for r in results["quality"].values()
                if r["workers"] == workers and r["strategy"] in DEFAULT[workers]]
        full = next((r for r in rows if r["strategy"] == "full"), None)
        if full is None:
            continue
        points = sorted(((*against_full(r, full), r["strategy"]) for r in rows if r is not full and r["bytes"]),
                        key=lambda p: (round(math.log10(p[0]), 1), -p[1]))
        for i, (less, worse, name) in enumerate(points):
            lowest = min(lowest, worse)
            left.scatter(less, worse, marker=marker, color=color, label=f"{workers} workers" if i == 0 else None)
            # Points at about the same bytes get their labels stacked from the top down, one line apart.
            stacked = sum(1 for other in points[:i] if abs(math.log10(other[0] / less)) < 0.05)
            left.annotate(name, (less, worse), fontsize=6, xytext=(4, 2 - 7 * stacked), textcoords="offset points")
    left.axvline(100, color="grey", ls="--", lw=1)
    left.axhline(2, color="grey", ls=":", lw=1)
    left.fill_between([100, 2000], lowest - 1, 2, color="C2", alpha=0.08, label="goal: ≥ 100× fewer bytes, within 2%")
    left.set_xscale("log")
    left.set_xlim(5, 2000)
    left.set_ylim(bottom=lowest - 0.3)
    left.set_xlabel("times fewer bytes sent per rank than full sync (log)")
    left.set_ylabel("final val BPC against full sync, % (whole split)")
    left.legend(fontsize=7, loc="upper left")
    left.grid(alpha=0.3)
    walls = results["wall"]
    names = [n for n in walls if walls[n]["hidden"] is not None]
    plain = [100 * walls[n]["plain_s_per_step"] for n in names]
    exposed = [100 * max(0.0, walls[n]["exposed_s_per_step"]) for n in names]
    right.barh(names, plain, color="C2", label="training (no link)")
    right.barh(names, exposed, left=plain, color="C3", label="communication left exposed")
    right.set_xlabel(f"seconds per 100 steps, 2 workers, {results['link']}")
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("sync", __doc__)
    parser.add_argument("--workers", default="2,4", help="worker counts, comma-separated (default 2,4)")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps of the schedule (default 4000)")
    parser.add_argument("--warm", type=int, default=400, help="full-sync warm-start steps (default 400)")
    parser.add_argument("--worker-batch", type=positive_int, default=None,
                        help=f"sequences per worker and step (default: {GLOBAL_BATCH} shared by the workers, so every "
                        "worker count trains on the same tokens; set it to keep each worker's batch as workers are "
                        "added, as DiLoCo's papers do)")
    parser.add_argument("--only", help="comma-separated strategy names (default: the set for each worker count)")
    parser.add_argument("--wall-steps", type=int, default=128,
                        help="steps per timing run on the simulated link, 2 workers (default 128)")
    parser.add_argument("--part", choices=("quality", "wall", "both"), default="both",
                        help="the long runs to the end of the schedule, the timing runs on the link, or both "
                        "(default both; timings are best taken on an otherwise idle machine)")
    parser.add_argument("--link-mbps", type=float, default=50.0, help="simulated link bandwidth (default 50 Mbit/s)")
    parser.add_argument("--link-latency-ms", type=float, default=50.0, help="simulated link latency (default 50 ms)")
    args = parser.parse_args(argv)
    every = strategies(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    settings = {"steps": args.steps, "warm": args.warm, "worker_batch": args.worker_batch,
                "link": f"{args.link_mbps:g} Mbit/s + {args.link_latency_ms:g} ms"}
    if any(results.get(k) != v for k, v in settings.items()):
        results = {}  # rows measured under other settings don't belong in this table
    results = {"quality": {}, "wall": {}, **results, **settings}
    command = "python -m hanlm.bench.sync " + " ".join(argv if argv is not None else sys.argv[1:])
    link = [f"dist.link_mbps={args.link_mbps}", f"dist.link_latency_ms={args.link_latency_ms}"]
    for workers in (int(w) for w in args.workers.split(",")):
        if not args.only and workers not in DEFAULT:
            parser.error(f"no default strategies for {workers} workers (there are for 2 and 4): name them with --only")
        names = args.only.split(",") if args.only else DEFAULT[workers]
        unknown = [n for n in names if n not in every]
        if unknown:
            parser.error(f"unknown strategy {unknown[0]!r}; known: {', '.join(every)}")
        warm = warm_start(args.out, workers, args.steps, args.warm, args.worker_batch)
        for name in names:
            if args.part != "wall":
                row = quality(name, every[name], args.out, workers, args.steps, warm, args.worker_batch)
                results["quality"][f"{workers}:{name}"] = {**row, "overrides": every[name]}
                print(f"{workers} workers {name:>20}: {row['bytes'] / 1e6:10,.1f} MB  BPC {row['bpc']:.4f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
            if workers == 2 and args.part != "quality":
                results["wall"][name] = wall(name, every[name], args.out, args.steps, args.wall_steps, warm, link,
                                             args.worker_batch)
                w = results["wall"][name]
                print(f"{'':>31} link: {100 * w['link_s_per_step']:.1f} s / 100 steps (plain "
                      f"{100 * w['plain_s_per_step']:.1f}), communication hidden: "
                      f"{w['hidden']:.0%}" if w["hidden"] is not None else "", flush=True)
            write(results, args.out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
