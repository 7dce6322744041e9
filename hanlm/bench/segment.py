"""The segmentation study: hanlm's HMM, CRF and neural taggers against jieba, thulac and pkuseg, on one split.

    python -m hanlm.bench.segment --pretrained runs/pd-best [--out bench/results/segment] [--only hmm,crf]

Every tagger is trained by `hanlm finetune --config segment` (People's Daily 1998 with its gold
words; the test split is the 2% of paragraphs that pretraining held out as val) into
--out/runs/NAME; a run whose results.json is there already is not trained again (delete its
directory to rerun it). Then, in this one process, every tagger and every peer installed here
segments the same test paragraphs, scored the SIGHAN way (word spans; OOV against the train
split's words) and timed (characters per second of segmenting alone, batches of 256 paragraphs).

Writes results.json, table.md and f1_speed.png (test F1 against characters per second) into --out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hanlm.bench import suite_parser
from hanlm.config import load_config
from hanlm.data.tagged import TaggedSentence
from hanlm.finetune.run import RESULTS_FILE
from hanlm.tasks.tagging import TaggedData, TaggerEvaluation, evaluate_segmenter, read_tagged_data

CONFIG = "segment"
# name: (needs the pretrained checkpoint, extra --set overrides)
RUNS: dict[str, tuple[bool, list[str]]] = {
    "hmm": (False, ["finetune.tagger=hmm"]),
    "hmm-pos": (False, ["finetune.tagger=hmm", "finetune.tag_scheme=bmes-pos"]),
    "crf": (False, ["finetune.tagger=crf"]),
    "neural": (True, []),
    "neural-lookahead": (True, ["finetune.tag_head=lookahead"]),
    "neural-causal": (True, ["finetune.tag_head=causal"]),
    "neural-scratch": (True, ["finetune.from_scratch=true"]),
}
PEER_NOTES = {
    "jieba": "dictionary + HMM for unknown words; its HMM was trained on People's Daily 1998 among other corpora "
             "(jieba's README), so the test text may overlap its training data",
    "thulac": "THULAC's bundled model, trained on its own large corpus (its README does not say which)",
    "pkuseg": "spacy-pkuseg's default model",
}


def train_run(name: str, pretrained: str, out: Path) -> Path:
    """Train tagger `name` with `hanlm finetune` unless its results are there; its run directory."""
    run_dir = out / "runs" / name
    if (run_dir / RESULTS_FILE).exists():
        return run_dir
    needs_checkpoint, overrides = RUNS[name]
    command = [sys.executable, "-m", "hanlm.cli", "finetune", *([pretrained] if needs_checkpoint else []),
               "--config", CONFIG, "--task", "tag", "--set", f"finetune.run_dir={run_dir}", "--set",
               "log.progress=false"]
    for o in overrides:
        command += ["--set", o]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


def _jieba() -> Callable[[list[str]], list[TaggedSentence]]:
    import jieba

    jieba.initialize()  # load its dictionary now, not inside the timed segmenting
    return lambda texts: [TaggedSentence(jieba.lcut(t), None) for t in texts]


def _thulac() -> Callable[[list[str]], list[TaggedSentence]]:
    import thulac

    model = thulac.thulac(seg_only=True)
    return lambda texts: [TaggedSentence([w for w, _ in model.cut(t)], None) for t in texts]


def _pkuseg() -> Callable[[list[str]], list[TaggedSentence]]:
    import urllib.error

    import spacy_pkuseg

    try:
        model = spacy_pkuseg.pkuseg()
    except urllib.error.URLError as e:
        raise RuntimeError(f"spacy-pkuseg downloads its default model from GitHub on first use, and this machine "
                           f"cannot reach it ({e.reason})") from None
    return lambda texts: [TaggedSentence(model.cut(t), None) for t in texts]


PEERS: dict[str, Callable[[], Callable[[list[str]], list[TaggedSentence]]]] = {
    "jieba": _jieba, "thulac": _thulac, "pkuseg": _pkuseg}


def evaluate_peers(data: TaggedData) -> tuple[dict[str, TaggerEvaluation], dict[str, str]]:
    """Each installed peer's test scores, and why each other one was skipped."""
    done, skipped = {}, {}
    for name, make in PEERS.items():
        try:
            segment = make()
        except Exception as e:  # a peer that is missing or cannot load its model is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        done[name] = evaluate_segmenter(segment, data.splits["test"], data.vocabulary)
    return done, skipped


def row(name: str, ev: TaggerEvaluation, train_s: float | None, note: str = "") -> dict:
    s = ev.scores
    return {"name": name, "precision": s.precision, "recall": s.recall, "f1": s.f1, "oov_recall": s.oov_recall,
            "pos_f1": s.pos_f1, "chars_per_s": ev.chars_per_s, "train_s": train_s, "note": note}


def table(rows: list[dict]) -> str:
    def cell(v: float | None, spec: str) -> str:
        return "–" if v is None else f"{v:{spec}}"

    lines = ["| model | P | R | F1 | OOV recall | POS F1 (joint) | chars/s | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train = "–" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        lines.append(f"| {r['name']} | {cell(r['precision'], '.4f')} | {cell(r['recall'], '.4f')} | "
                     f"**{r['f1']:.4f}** | {cell(r['oov_recall'], '.4f')} | {cell(r['pos_f1'], '.4f')} | "
                     f"{r['chars_per_s']:,.0f} | {train} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r["chars_per_s"], r["f1"], color="tab:red" if r["train_s"] is not None else "tab:gray")
        ax.annotate(r["name"], (r["chars_per_s"], r["f1"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("characters per second (log; 2 CPU cores)")
    ax.set_ylabel("test word F1")
    ax.set_title("People's Daily 1998 test split: hanlm (red) and peers (grey)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("segment", __doc__)
    parser.add_argument("--pretrained", default="runs/default", help="the pretrained checkpoint or run directory "
                        "of the neural taggers (default runs/default, the demo's)")
    parser.add_argument("--only", default="", help=f"comma-separated taggers (default all: {', '.join(RUNS)}; "
                        "none: peers only)")
    args = parser.parse_args(argv)
    names = [] if args.only == "none" else [n for n in args.only.split(",") if n] or list(RUNS)
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown tagger(s) {', '.join(unknown)}; taggers: {', '.join(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    data = read_tagged_data(load_config(CONFIG))
    print(f"data: {data.summary()}", flush=True)
    from hanlm.loading import load_tagger

    rows = []
    for name in names:
        run_dir = train_run(name, args.pretrained, args.out)
        results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        loaded = load_tagger(str(run_dir))
        ev = evaluate_segmenter(loaded.tagger.segment, data.splits["test"], data.vocabulary)
        rows.append(row(f"hanlm {name}", ev, results["seconds"], loaded.description))
        print(f"{name}: {ev.scores.summary()}; {ev.chars_per_s:,.0f} chars/s", flush=True)
    peers, skipped = evaluate_peers(data)
    for name, ev in peers.items():
        rows.append(row(name, ev, None, PEER_NOTES[name]))
        print(f"{name}: {ev.scores.summary()}; {ev.chars_per_s:,.0f} chars/s", flush=True)
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})", flush=True)
    (args.out / "results.json").write_text(json.dumps({"pretrained": args.pretrained, "data": data.summary(),
                                                      "rows": rows, "skipped": skipped}, indent=1))
    text = table(rows)
    if skipped:
        text += "\n\nNot run: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())
    (args.out / "table.md").write_text(text + "\n")
    plot(rows, args.out / "f1_speed.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
