"""The classification study: fine-tuned hanlm models against the classic baselines, on one split.

    python -m hanlm.bench.classify --pretrained runs/default [--epochs 2] [--out bench/results/classify]

On `chn-reviews` (finetune.data), split by `hanlm.tasks.labelled` (each distinct text once; dev
for every choice, test read once): the baselines of `hanlm.tasks.baselines`, then `hanlm
finetune` runs of the pretrained checkpoint (last-token and mean pooling), of the same shape from
scratch, and of the pretrained model after a few minutes of language modelling on the train
split's texts (`adapted`: ULMFiT's target-domain step, `hanlm train` with train.init_from; no dev
or test text is read), each with the same fine-tuning settings. A run whose results.json is already in --out/runs is
not run again (delete its directory to rerun it).

Writes results.json, table.md and dev_accuracy.png (dev accuracy against steps, one curve per
fine-tuning run) into --out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hanlm.bench import suite_parser
from hanlm.config import load_config
from hanlm.tasks.baselines import BASELINES
from hanlm.finetune.run import RESULTS_FILE, Finetuner, finetune_config, plot_dev_curves
from hanlm.loading import open_checkpoint, resolve_checkpoint
from hanlm.tasks.labelled import LabelledData, read_labelled

# name: extra --set overrides of each fine-tuning run
RUNS: dict[str, list[str]] = {
    "pretrained": ["finetune.pooling=last"],
    "pretrained-mean": ["finetune.pooling=mean"],
    "scratch": ["finetune.pooling=last", "finetune.from_scratch=true"],
    "adapted": [],  # from the pretrained model after --adapt-minutes of language modelling on the train texts
}
ADAPTED_LM = "adapt-lm"  # the run directory (under --out/runs) of that language-model step


def adapt_language_model(pretrained: str, data: LabelledData, minutes: float, out: Path) -> str:
    """Continue training the pretrained language model on the train split's texts alone (no labels, never a
    dev or test text) for `minutes`, with its tokenizer: ULMFiT's target-domain step. Its run directory."""
    run_dir = out / "runs" / ADAPTED_LM
    if (run_dir / "report.md").exists():
        return str(run_dir)
    source = resolve_checkpoint(pretrained)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # Every 50th train text is the language model's val split: prepare's own hash split would find none
    # there, as the hash that made the train split keeps them all above data.val_fraction.
    files = {}
    for part, keep in (("train", lambda i: i % 50 != 0), ("val", lambda i: i % 50 == 0)):
        files[part] = run_dir.parent / f"{ADAPTED_LM}-{part}.jsonl"
        files[part].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                       for i, t in enumerate(data.splits["train"].texts) if keep(i)), encoding="utf-8")
    overrides = [f"data.source=[{files['train']}]", f"data.val_source=[{files['val']}]",
                 f"data.prepared_dir={run_dir.parent / (ADAPTED_LM + '-prepared')}",
                 f"tokenizer.path={source}/tokenizer.json", f"train.init_from={source}", f"train.run_dir={run_dir}",
                 f"train.max_minutes={minutes}", "train.schedule_clock=minutes", "train.lr=1e-3",
                 "train.warmup_steps=50", "train.max_steps=1000000", "model.dropout=0.1", "eval.every_steps=200",
                 "eval.max_batches=20", "checkpoint.every_steps=200", "log.progress=false", "generate.max_tokens=30"]
    cmd = [sys.executable, "-m", "hanlm.cli", "train", "--config", f"{source}/config.yaml",
           *(a for o in overrides for a in ("--set", o))]
    subprocess.run(cmd, check=True)
    return str(run_dir)


def finetune_run(name: str, pretrained: str, overrides: list[str], out: Path) -> dict:
    run_dir = out / "runs" / name
    if (run_dir / RESULTS_FILE).exists():
        return json.loads((run_dir / RESULTS_FILE).read_text())
    cfg = load_config(None, [f"finetune.init_from={pretrained}", f"finetune.run_dir={run_dir}", "log.progress=false",
                             *overrides])
    Finetuner(cfg).run()
    return json.loads((run_dir / RESULTS_FILE).read_text())


def table(baselines: list, runs: dict[str, dict], epochs: float) -> str:
    rows = ["| method | chosen on dev | dev accuracy | test accuracy | test macro-F1 | minutes |",
            "|---|---|---|---|---|---|"]
    for b in baselines:
        note = " †" if b["note"] else ""
        rows.append(f"| {b['name']}{note} | {b['setting']} | {b['dev']['accuracy']:.4f} | {b['test']['accuracy']:.4f} "
                    f"| {b['test']['macro_f1']:.4f} | {b['seconds'] / 60:.1f} |")
    for name, r in runs.items():
        what = {"pretrained": "hanlm GPT fine-tuned from People's Daily (last token)",
                "pretrained-mean": "hanlm GPT fine-tuned from People's Daily (mean pooling)",
                "scratch": "hanlm GPT, same shape, from scratch",
                "adapted": "hanlm GPT fine-tuned after LM training on the train texts (last token)"}.get(name, name)
        best = r["best_checkpoint"].rstrip("/").rsplit("/", 1)[-1]
        rows.append(f"| {what} | {best} of {epochs:g} epochs | {r['dev']['accuracy']:.4f} | "
                    f"{r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} | {r['seconds'] / 60:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("classify", __doc__)
    parser.add_argument("--pretrained", default="runs/default", help="the pretrained checkpoint or run directory "
                        "(default runs/default, the demo's)")
    parser.add_argument("--epochs", type=float, default=2.0, help="fine-tuning epochs (default 2)")
    parser.add_argument("--adapt-minutes", type=float, default=5.0, help="the adapted run: minutes of language "
                        "modelling on the train split's texts before fine-tuning (default 5)")
    parser.add_argument("--only", default="", help=f"comma-separated fine-tuning runs (default all: {', '.join(RUNS)}; "
                        "none: baselines only)")
    args = parser.parse_args(argv)
    names = [] if args.only == "none" else [n for n in args.only.split(",") if n] or list(RUNS)
    args.out.mkdir(parents=True, exist_ok=True)
    source = open_checkpoint(resolve_checkpoint(args.pretrained))
    cfg = finetune_config(load_config(None, [f"finetune.init_from={args.pretrained}"]), source)
    data = read_labelled(cfg)
    print(f"data: {data.summary()}", flush=True)
    baselines = []
    for name, fn in BASELINES.items():
        result = fn(data)
        if result is not None:
            print(f"{result.name}: test accuracy {result.test.accuracy:.4f} ({result.setting})", flush=True)
            baselines.append({"name": result.name, "setting": result.setting, "dev": result.dev.as_dict(),
                              "test": result.test.as_dict(), "seconds": result.seconds, "note": result.note})
    runs = {}
    for name in names:
        start = adapt_language_model(args.pretrained, data, args.adapt_minutes, args.out) if name == "adapted" \
            else args.pretrained
        runs[name] = finetune_run(name, start, RUNS[name] + [f"finetune.epochs={args.epochs}"], args.out)
    (args.out / "results.json").write_text(json.dumps({"pretrained": args.pretrained, "data": data.summary(),
                                                      "baselines": baselines, "finetune": runs}, indent=1))
    text = table(baselines, runs, args.epochs)
    if any(b["note"] for b in baselines):
        text += "\n\n† " + next(b["note"] for b in baselines if b["note"])
    (args.out / "table.md").write_text(text + "\n")
    if runs:
        plot_dev_curves({name: args.out / "runs" / name for name in runs}, args.out / "dev_accuracy.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
