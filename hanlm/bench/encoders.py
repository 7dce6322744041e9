"""The backbone study (issue 30): the GPT, an MLM encoder and an ELECTRA encoder at equal pretraining steps.

    python -m hanlm.bench.encoders [--steps 300] [--seeds 3] [--out bench/results/encoders] [--only PATTERNS]

Three backbones of the `small` preset are pretrained on People's Daily 1998 with the char tokenizer, the same
windows, batch, learning rate, cosine schedule, dropout and seed, for --steps optimizer steps each (equal steps
are equal tokens, and within a few per cent equal compute per token: the ELECTRA generator adds a quarter-width
network; each run's wall minutes are recorded): `gpt` (next-token LM), `mlm` (an encoder, whole-word masking
with jieba) and `electra` (an encoder, replaced-token detection). On each backbone, `hanlm finetune`:

- a classifier on `chn-reviews` (pooling `last` for the GPT, `first` for the encoders), one run per seed
  (train.seed: head initialisation and batch order), test accuracy mean ± sd over the seeds, and McNemar's exact
  test of each run's test predictions against TF-IDF + logistic regression (`hanlm.tasks.baselines`, refitted
  here to keep its predictions; C on dev) on the same test texts; also of the seeds' majority vote;
- a neural word segmenter (`--config segment`, BiLSTM head), one seed, its test F1.

With --curve-every N, pretraining keeps a checkpoint every N steps and `curve-B-kK` fine-tunes a classifier
(seed 1) from step K of each backbone (K = N, 2N, …, --steps): the curve of dev accuracy against pretraining
minutes, drawn as a fourth panel.

Every run lives in --out/runs/NAME (pretrain-B, cls-B-sS, seg-B, curve-B-kK) and is not redone once its
results.json is there (delete the directory to rerun it). --only picks runs by glob patterns over those names (a run's
pretraining is run when it is missing). Writes results.json, table.md and curves.png into --out.
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hanlm.bench import suite_parser

RESULTS = "results.json"
PREDICTIONS = "test_predictions.json"
# backbone: (train overrides, fine-tuning pooling)
BACKBONES: dict[str, tuple[list[str], str]] = {
    "gpt": (["model.arch=gpt", "train.objective=lm"], "last"),
    "mlm": (["model.arch=encoder", "train.objective=mlm", "train.mask_whole_words=jieba"], "first"),
    "electra": (["model.arch=encoder", "train.objective=electra"], "first"),
}
DESCRIPTION = {"gpt": "GPT, next-token LM", "mlm": "encoder, MLM (jieba whole words)",
               "electra": "encoder, ELECTRA (RTD)"}
CRF_F1 = 0.9657  # hanlm's CRF on the same segmentation split (docs/BENCHMARKS.md, issue 14)
GOAL_SEGMENT_F1, GOAL_ACCURACY = 0.970, 0.880
CLS_EVAL, SEG_EVAL = 25, 20  # dev evaluations every this many fine-tuning steps


def pretrain_overrides(steps: int, run_dir: Path, every: int = 0) -> list[str]:
    """The settings every backbone shares (the demo's: small preset, 16 × 128 tokens, lr 3e-3, cosine to 0.1 ×);
    with `every`, a checkpoint every that many steps, all kept (what the curve fine-tunes from)."""
    saves = [f"checkpoint.every_steps={every}", f"checkpoint.keep_last={steps // every + 1}"] if every else \
        [f"checkpoint.every_steps={steps}"]
    return ["tokenizer.kind=char", "model.preset=small", "model.dropout=0.0", "train.block_size=128",
            "train.micro_batch=16", "train.grad_accum=1", "train.lr=3e-3", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.max_steps={steps}", "train.max_minutes=null", "train.schedule=cosine",
            "train.schedule_clock=steps", "train.seed=1337", f"train.run_dir={run_dir}",
            f"eval.every_steps={max(1, steps // 6)}", "eval.max_batches=20", *saves,
            "log.progress=false", "log.every_steps=10", "generate.max_tokens=20"]


# -- statistics -----------------------------------------------------------------------------------------------------

def mcnemar(truth: Sequence[int], a: Sequence[int], b: Sequence[int]) -> dict:
    """McNemar's exact test of predictions `a` against `b` on the same items: the discordant pairs (a right and b
    wrong: `a_only`; the reverse: `b_only`) and the two-sided binomial p of so uneven a split under p = ½."""
    if not len(truth) == len(a) == len(b):
        raise ValueError(f"lengths differ: {len(truth)} labels, {len(a)} and {len(b)} predictions")
    a_only = sum(1 for t, x, y in zip(truth, a, b) if x == t and y != t)
    b_only = sum(1 for t, x, y in zip(truth, a, b) if x != t and y == t)
    return {"a_only": a_only, "b_only": b_only, "p": binomial_two_sided(min(a_only, b_only), a_only + b_only)}


def binomial_two_sided(k: int, n: int) -> float:
    """P(X ≤ k or X ≥ n − k) for X ~ Binomial(n, ½), k ≤ n/2: the exact two-sided p (1 when n = 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def majority_vote(predictions: Sequence[Sequence[int]]) -> list[int]:
    """Per item, the label most runs predicted (ties: the smallest label)."""
    return [max(sorted(set(col)), key=col.count) for col in zip(*predictions)]


# -- the table --------------------------------------------------------------------------------------------------------

def pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def pretrain_figure(p: dict) -> str:
    """The backbone's own objective on the val split: not comparable across objectives."""
    if not p:
        return "–"
    v = p["val"]
    if p["objective"] == "lm":
        return f"next-token loss {v['loss']:.3f} nats"
    text = f"masked loss {v['loss']:.3f}, masked acc {pct(v.get('masked_accuracy'), 1)}%"
    if v.get("rtd_accuracy") is not None:
        text += f", RTD acc {pct(v['rtd_accuracy'], 1)}%"
    return text


def table(results: dict) -> str:
    """The Markdown table of a results dict (as written to results.json)."""
    rows = [("| backbone | pretraining steps | pretraining minutes | val (own objective) | classification test "
             "accuracy % (mean ± sd, seeds) | McNemar p vs TF-IDF+LR (per seed; vote) | segmentation test F1 % |"),
            "|---|---|---|---|---|---|---|"]
    for name in results["backbones"]:
        b = results["backbones"][name]
        p, cls, seg = b.get("pretrain") or {}, b.get("classify") or {}, b.get("segment") or {}
        steps = str(p["steps"]) if p else "–"
        wall = "–" if not p or p.get("wall_minutes") is None else f"{p['wall_minutes']:.1f}"
        minutes = f"{p['train_minutes']:.1f} ({wall})" if p else "–"
        if cls.get("accuracies"):
            m, sd = mean_sd(cls["accuracies"])
            acc = f"{100 * m:.2f} ± {'–' if sd is None else f'{100 * sd:.2f}'} ({len(cls['accuracies'])})"
            ps = ", ".join(f"{r['p']:.2g}" for r in cls["mcnemar"])
            if cls.get("vote"):
                ps += f"; vote {cls['vote']['p']:.2g} ({pct(cls['vote']['accuracy'])}%)"
        else:
            acc, ps = "–", "–"
        rows.append(f"| {DESCRIPTION.get(name, name)} | {steps} | {minutes} | {pretrain_figure(p)} | {acc} | {ps} | "
                    f"{pct(seg.get('f1'))} |")
    ref = results.get("reference", {})
    if ref.get("tfidf_accuracy") is not None:
        rows.append(f"| TF-IDF char 1–2-grams + LR ({ref.get('tfidf_setting', '')}, same test texts) | – | – | – | "
                    f"{pct(ref['tfidf_accuracy'])} | – | – |")
    rows.append(f"| hanlm CRF (issue 14, same segmentation split) | – | – | – | – | – | {pct(ref.get('crf_f1', CRF_F1))} |")
    return "\n".join(rows)


# -- the runs ---------------------------------------------------------------------------------------------------------

def curve_steps(steps: int, every: int) -> list[int]:
    """The pretraining steps the curve fine-tunes from: every `every` steps up to `steps` (none when 0)."""
    return list(range(every, steps + 1, every)) if every else []


def run_names(seeds: int, curve: Sequence[int] = ()) -> list[str]:
    """Every run, in the order it is run: pretraining, the first seed's classifiers, segmenters, other seeds, the
    curve's classifiers."""
    names = [f"pretrain-{b}" for b in BACKBONES] + [f"cls-{b}-s1" for b in BACKBONES] + [f"seg-{b}" for b in BACKBONES]
    names += [f"cls-{b}-s{s}" for s in range(2, seeds + 1) for b in BACKBONES]
    return names + [f"curve-{b}-k{k}" for k in curve for b in BACKBONES]


def selected(names: list[str], only: str) -> list[str]:
    patterns = [p for p in only.split(",") if p]
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _done(run_dir: Path) -> dict | None:
    path = run_dir / RESULTS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _checkpoint(run_dir: Path) -> str:
    return str(run_dir / "checkpoints")


def pretrain(backbone: str, steps: int, out: Path, every: int = 0) -> dict:
    run_dir = out / "runs" / f"pretrain-{backbone}"
    done = _done(run_dir)
    if done is not None:
        if done["steps"] != steps:
            raise SystemExit(f"{run_dir} was pretrained for {done['steps']} steps, not --steps {steps}: use another "
                             "--out or delete it")
        return done
    from hanlm.log import METRICS_FILE, read_metrics

    overrides = BACKBONES[backbone][0] + pretrain_overrides(steps, run_dir, every)
    cmd = [sys.executable, "-m", "hanlm.cli", "train", "--resume", "auto", *(a for o in overrides for a in ("--set", o))]
    wall = None
    if not (run_dir / "report.md").exists():  # a run that finished before its results.json was written is not redone
        print("$", " ".join(cmd), flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = (time.perf_counter() - started) / 60
    records = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    # the loop's own time: between the first and last logged steps, scaled to all steps
    loop = (train[-1]["time"] - train[0]["time"]) * steps / max(1, train[-1]["step"] - train[0]["step"])
    result = {"backbone": backbone, "objective": overrides[1].split("=")[1], "steps": steps,
              "tokens": train[-1]["tokens"], "train_minutes": loop / 60, "wall_minutes": wall,
              "val": {k: v for k, v in evals[-1].items() if k not in ("kind", "time")},
              "val_curve": [{"step": r["step"], "loss": r["loss"], "minutes": (r["time"] - train[0]["time"]) / 60}
                            for r in evals],
              # the loop's minutes at each logged step: where the curve's checkpoints sit in time
              "minutes_at": {r["step"]: (r["time"] - train[0]["time"]) / 60 for r in train},
              "overrides": overrides}
    (run_dir / RESULTS).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def finetune(name: str, config: str | None, overrides: list[str], out: Path) -> dict:
    from hanlm.config import load_config
    from hanlm.finetune.run import RESULTS_FILE, Finetuner

    run_dir = out / "runs" / name
    if not (run_dir / RESULTS_FILE).exists():
        print(f"== {name}: hanlm finetune {' '.join(overrides)}", flush=True)
        Finetuner(load_config(config, [f"finetune.run_dir={run_dir}", "log.progress=false", *overrides])).run()
    return json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))


def test_predictions(run_dir: Path, texts: list[str], labels: list[str]) -> list[int]:
    """The fine-tuned classifier's label (an index into `labels`) for each test text, cached in the run."""
    path = run_dir / PREDICTIONS
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    from hanlm.loading import load_classifier

    classifier = load_classifier(str(run_dir))
    predicted = [labels.index(classifier.labels[i]) for i in classifier.probabilities(texts).argmax(-1).tolist()]
    path.write_text(json.dumps(predicted), encoding="utf-8")
    return predicted


def tfidf_predictions(data) -> tuple[list[int], str, float]:
    """TF-IDF char 1–2-grams + logistic regression exactly as hanlm.tasks.baselines.tfidf_logistic fits it (C on
    dev), with its test predictions: (predictions, setting, test accuracy)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, dev, test = (data.splits[s] for s in ("train", "dev", "test"))
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    features = vectorizer.fit_transform(train.texts)
    best = None
    for c in [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]:
        model = LogisticRegression(C=c, max_iter=2000).fit(features, train.labels)
        dev_acc = float((model.predict(vectorizer.transform(dev.texts)) == dev.labels).mean())
        if best is None or dev_acc > best[1]:
            best = (c, dev_acc, model)
    predicted = [int(p) for p in best[2].predict(vectorizer.transform(test.texts))]
    accuracy = sum(p == t for p, t in zip(predicted, test.labels)) / len(predicted)
    return predicted, f"C={best[0]:g}", accuracy


def labelled_data(checkpoint: str):
    from hanlm.config import load_config
    from hanlm.finetune.run import finetune_config
    from hanlm.loading import open_checkpoint, resolve_checkpoint
    from hanlm.tasks.labelled import read_labelled

    source = open_checkpoint(resolve_checkpoint(checkpoint))
    return read_labelled(finetune_config(load_config(None, [f"finetune.init_from={checkpoint}"]), source))


def collect(out: Path, seeds: int, cls_settings: dict, seg_settings: dict) -> dict:
    """Every finished run under --out/runs gathered into one results dict, with McNemar's tests."""
    runs = out / "runs"
    results: dict = {"backbones": {}, "reference": {"crf_f1": CRF_F1}, "classify_settings": cls_settings,
                     "segment_settings": seg_settings}
    data = tfidf = None
    for b in BACKBONES:
        entry: dict = {"pretrain": _done(runs / f"pretrain-{b}")}
        cls_runs = [(s, json.loads((runs / f"cls-{b}-s{s}" / "results.json").read_text(encoding="utf-8")))
                    for s in range(1, seeds + 1) if (runs / f"cls-{b}-s{s}" / "results.json").exists()]
        if data is None and (cls_runs or any(runs.glob(f"curve-{b}-k*/{RESULTS}"))):
            data = labelled_data(_checkpoint(runs / f"pretrain-{b}"))
            tfidf = tfidf_predictions(data)
            results["reference"].update({"tfidf_accuracy": tfidf[2], "tfidf_setting": tfidf[1],
                                         "test_texts": len(data.splits["test"])})
        if cls_runs:
            test = data.splits["test"]
            preds = [test_predictions(runs / f"cls-{b}-s{s}", test.texts, data.labels) for s, _ in cls_runs]
            tests = []
            for (s, r), p in zip(cls_runs, preds):
                tests.append({"seed": s, **mcnemar(test.labels, p, tfidf[0])})
                mine = sum(x == t for x, t in zip(p, test.labels)) / len(p)
                # the served classifier runs in fp32, fine-tuning's test pass under bf16 autocast: a near-tie
                # may flip, a different split would move far more
                if len(p) != r["test"]["examples"] or abs(mine - r["test"]["accuracy"]) > 0.005:
                    raise SystemExit(f"cls-{b}-s{s}: predictions give accuracy {mine}, results.json "
                                     f"{r['test']['accuracy']}: not the same test split")
                tests[-1]["accuracy"] = mine
            entry["classify"] = {"seeds": [s for s, _ in cls_runs], "accuracies": [r["test"]["accuracy"] for _, r in
                                                                                   cls_runs],
                                 "dev_accuracies": [r["dev"]["accuracy"] for _, r in cls_runs],
                                 "macro_f1": [r["test"]["macro_f1"] for _, r in cls_runs],
                                 "minutes": [r["seconds"] / 60 for _, r in cls_runs],
                                 "steps": [r["steps"] for _, r in cls_runs], "mcnemar": tests}
            if len(preds) >= 3:
                vote = majority_vote(preds)
                entry["classify"]["vote"] = {**mcnemar(test.labels, vote, tfidf[0]),
                                             "accuracy": sum(x == t for x, t in zip(vote, test.labels)) / len(vote)}
        curve = []
        for run in runs.glob(f"curve-{b}-k*"):
            if (run / RESULTS).exists():
                r = json.loads((run / RESULTS).read_text(encoding="utf-8"))
                k = int(run.name.rsplit("-k", 1)[1])
                at = (entry["pretrain"] or {}).get("minutes_at", {})
                curve.append({"step": k, "minutes": at.get(str(k), at.get(k)), "dev_accuracy": r["dev"]["accuracy"],
                              "test_accuracy": r["test"]["accuracy"]})
        if curve:
            entry["curve"] = sorted(curve, key=lambda c: c["step"])
        seg = _done(runs / f"seg-{b}")
        if seg is not None:
            entry["segment"] = {**seg["test"], "dev_f1": seg["dev"]["f1"], "minutes": seg["seconds"] / 60,
                                "steps": seg["steps"]}
        results["backbones"][b] = entry
    return results


def plot(out: Path, results: dict, path: Path) -> None:
    """Each backbone's pretraining val loss (its own objective) against pretraining minutes; dev accuracy of
    classification and dev F1 of segmentation against fine-tuning steps; the curve's dev accuracy against the
    pretraining minutes of its checkpoint. A panel whose runs are not in --out is left out."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from hanlm.log import METRICS_FILE, read_metrics

    colours = {"gpt": "tab:blue", "mlm": "tab:orange", "electra": "tab:green"}
    runs = out / "runs"
    shown = ["pretrain", *(["classify"] if any(runs.glob("cls-*")) else []),
             *(["segment"] if any(runs.glob("seg-*")) else []),
             *(["curve"] if any(entry.get("curve") for entry in results["backbones"].values()) else [])]
    fig = Figure(figsize=(5 * len(shown), 4.2), layout="tight")
    spare = Figure()  # what a panel without data draws on: never saved
    axes = dict(zip(shown, fig.subplots(1, len(shown), squeeze=False)[0]))
    ax_pre = axes["pretrain"]
    ax_cls, ax_seg = axes.get("classify", spare.gca()), axes.get("segment", spare.gca())
    more = [axes["curve"]] if "curve" in axes else []
    for b, entry in results["backbones"].items():
        p = entry.get("pretrain")
        if p:
            ax_pre.plot([r["minutes"] for r in p["val_curve"]], [r["loss"] for r in p["val_curve"]], "o-",
                        color=colours[b], label=f"{b} ({p['objective']})")
        for run in sorted((out / "runs").glob(f"cls-{b}-s*")):
            ev = [r for r in read_metrics(run / METRICS_FILE) if r.get("kind") == "eval" and "accuracy" in r] \
                if (run / METRICS_FILE).exists() else []
            if ev:
                ax_cls.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "o-", color=colours[b], alpha=0.7,
                            label=f"{b} {run.name.rsplit('-', 1)[1]}")
        run = out / "runs" / f"seg-{b}"
        ev = [r for r in read_metrics(run / METRICS_FILE) if r.get("kind") == "eval" and "f1" in r] \
            if (run / METRICS_FILE).exists() else []
        if ev:
            ax_seg.plot([r["step"] for r in ev], [r["f1"] for r in ev], "o-", color=colours[b], label=b)
        if more and entry.get("curve"):
            points = [c for c in entry["curve"] if c["minutes"] is not None]
            more[0].plot([c["minutes"] for c in points], [c["dev_accuracy"] for c in points], "o-", color=colours[b],
                         label=b)
    ref = results["reference"]
    if ref.get("tfidf_accuracy") is not None:
        for ax in (ax_cls, *more):
            ax.axhline(ref["tfidf_accuracy"], color="gray", ls="--", label="TF-IDF+LR (test)")
    ax_seg.axhline(ref.get("crf_f1", CRF_F1), color="gray", ls="--", label="CRF (test, issue 14)")
    labels = {"pretrain": ("pretraining minutes (2 CPU cores)", "val loss, own objective (nats)",
                           "pretraining: each objective's own loss (not comparable across)"),
              "classify": ("fine-tuning step (32 reviews each)", "dev accuracy", "chn-reviews classification"),
              "segment": ("fine-tuning step (32 pieces each)", "dev word F1", "People's Daily segmentation"),
              "curve": ("pretraining minutes at the checkpoint (2 CPU cores)", "dev accuracy",
                        "classification (seed 1) from checkpoints along pretraining")}
    for name, ax in axes.items():
        x, y, title = labels[name]
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("encoders", __doc__)
    parser.add_argument("--steps", type=int, default=300, help="pretraining optimizer steps per backbone, 16 × 128 "
                        "tokens each (default 300)")
    parser.add_argument("--seeds", type=int, default=3, help="classification fine-tuning seeds per backbone "
                        "(default 3)")
    parser.add_argument("--cls-epochs", type=float, default=0.25, help="classification fine-tuning epochs "
                        "(default 0.25: 108 steps)")
    parser.add_argument("--seg-epochs", type=float, default=0.1, help="segmentation fine-tuning epochs "
                        "(default 0.1: 82 steps)")
    parser.add_argument("--only", default="", help="comma-separated glob patterns over the run names (default all: "
                        "pretrain-B, cls-B-sS, seg-B for B in gpt, mlm, electra); e.g. 'pretrain-*,cls-*-s1'")
    parser.add_argument("--curve-every", type=int, default=0, help="keep a pretraining checkpoint every N steps and "
                        "fine-tune a classifier (seed 1) from each: dev accuracy against pretraining minutes "
                        "(default 0: off)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: gather the finished runs")
    args = parser.parse_args(argv)
    if args.steps < 10 or args.seeds < 1:
        parser.error("--steps must be at least 10 and --seeds at least 1")
    if args.curve_every < 0 or (args.curve_every and args.steps % args.curve_every):
        parser.error(f"--curve-every must divide --steps ({args.steps}), or be 0")
    args.out.mkdir(parents=True, exist_ok=True)
    cls_settings = {"epochs": args.cls_epochs, "eval_every_steps": CLS_EVAL, "lr": "default 3e-4", "micro_batch": 32,
                    "max_length": 128, "dropout": 0.1}
    seg_settings = {"epochs": args.seg_epochs, "eval_every_steps": SEG_EVAL, "config": "segment (lr 1e-3, micro_batch 32, "
                    "max_length 128)", "tag_head": "bilstm"}
    curve = curve_steps(args.steps, args.curve_every)
    for name in ([] if args.report_only else selected(run_names(args.seeds, curve), args.only)):
        kind, backbone = name.split("-")[:2]
        checkpoint = _checkpoint(args.out / "runs" / f"pretrain-{backbone}")
        pretrain(backbone, args.steps, args.out, args.curve_every)
        if kind == "curve":
            step = int(name.rsplit("-k", 1)[1])
            finetune(name, None, [f"finetune.init_from={checkpoint}/step-{step:08d}",
                                  f"finetune.pooling={BACKBONES[backbone][1]}", f"finetune.epochs={args.cls_epochs}",
                                  f"finetune.eval_every_steps={CLS_EVAL}", "train.seed=1"], args.out)
        elif kind == "cls":
            seed = int(name.rsplit("-s", 1)[1])
            finetune(name, None, [f"finetune.init_from={checkpoint}", f"finetune.pooling={BACKBONES[backbone][1]}",
                                  f"finetune.epochs={args.cls_epochs}", f"finetune.eval_every_steps={CLS_EVAL}",
                                  f"train.seed={seed}"], args.out)
        elif kind == "seg":
            finetune(name, "segment", [f"finetune.init_from={checkpoint}", "finetune.task=tag",
                                       "finetune.tagger=neural", f"finetune.epochs={args.seg_epochs}",
                                       f"finetune.eval_every_steps={SEG_EVAL}", "train.seed=1"], args.out)
    results = collect(args.out, args.seeds, cls_settings, seg_settings)
    results["steps"] = args.steps
    (args.out / RESULTS).write_text(json.dumps(results, indent=1), encoding="utf-8")
    text = table(results)
    (args.out / "table.md").write_text(text + "\n", encoding="utf-8")
    plot(args.out, results, args.out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
