"""NLU throughput: texts/s and characters/s of the classifier and the neural tagger (batched by length, and
one text per call), beside the CRF, jieba and thulac on the same People's Daily paragraphs, and through the
server: N concurrent clients of one text each against one client, with dynamic batching on and off.

    python -m hanlm.bench.nlu [--out bench/results/nlu] [--quick]

The networks are freshly initialised (their speed does not depend on the weights) over the prepared People's
Daily char vocabulary, fp32 on the CPU, at the `tiny` shape (2 layers, 64 wide) and, without --quick, the
`small` one (4 layers, 256 wide: the segmentation study's pd-best shape): the classifier (last-token pooling,
texts cut at 128 tokens) reads the chn-reviews test split, the tagger (BiLSTM head, BMES tags, pieces of at
most 128 tokens, Viterbi under the tag grammar) the test paragraphs of `--config segment`. The CRF is trained
here on a slice of the train split (a character's features, not their weights, set its speed). Each figure
is the best of a few timed passes, as other work may share the cores; beside each network its backbone's
share of the time (the transformer's matmuls, which no change to the head or the decoder can remove).
Writes results.json and table.md into --out; `hanlm bench nlu` runs it beside the other suites.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from hanlm.bench import suite_parser
from hanlm.bench.serve import client_process, live_server
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.tagged import TaggedSentence
from hanlm.data.tokenizer import Tokenizer
from hanlm.serve.app import create_app
from hanlm.tasks.classifier import build_classifier
from hanlm.tasks.crf import CRFTagger
from hanlm.tasks.labelled import read_labelled
from hanlm.tasks.neural_tagger import NeuralTagger, build_tagger_network
from hanlm.tasks.predict import label_probabilities
from hanlm.tasks.tagging import read_tagged_data

GOALS = {"tagger_chars_per_s": 100_000, "classify_texts_per_s": 1_000}  # batched, the tiny shape, 2 cores
MAX_LENGTH = 128  # tokens of a classified text or a tagged piece (finetune.max_length)


def _networks(shape: str) -> tuple[torch.nn.Module, NeuralTagger, Tokenizer]:
    """A classifier network and a neural tagger of `shape`, freshly initialised, and their char tokenizer."""
    sets = [f"model.preset={shape}", "tokenizer.kind=char", f"finetune.max_length={MAX_LENGTH}"]
    tokenizer = Tokenizer.load(prepare(load_config(None, sets), progress=False).directory / "tokenizer.json")
    torch.manual_seed(0)
    classify = load_config(None, [*sets, "model.task=classify", "finetune.labels=[neg,pos]"])
    tag = load_config(None, [*sets, "model.task=tag", "finetune.task=tag", "finetune.labels=[S,B,M,E]"])
    network = build_tagger_network(tag, tokenizer.vocab_size).eval()
    return (build_classifier(classify, tokenizer.vocab_size).eval(),
            NeuralTagger(network, tokenizer, tag.finetune.labels, MAX_LENGTH), tokenizer)


@contextmanager
def _stopwatch(module: torch.nn.Module | None, method: str) -> Iterator[list[float]]:
    """Sums the seconds spent in `module.method` (none: no module) while the block runs, in the yielded list."""
    spent = [0.0]
    if module is None:
        yield spent
        return
    through = getattr(module, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return through(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    setattr(module, method, timed)
    try:
        yield spent
    finally:
        delattr(module, method)  # the class's method again


def _row(task: str, name: str, how: str, texts: list[str], run: Callable[[list[str]], Any], repeats: int,
         backbone: torch.nn.Module | None = None, note: str = "") -> dict[str, Any]:
    """The best of `repeats` timed passes of `run` over `texts` (after one untimed pass), and the share of that
    pass spent in the backbone's `hidden`."""
    run(texts[:8])
    best, share = float("inf"), None
    for _ in range(repeats):
        with _stopwatch(backbone, "hidden") as spent:
            started = time.perf_counter()
            run(texts)
            seconds = time.perf_counter() - started
        if seconds < best:
            best, share = seconds, (spent[0] / seconds if backbone is not None else None)
    chars = sum(map(len, texts))
    return {"task": task, "name": name, "how": how, "texts": len(texts), "chars": chars, "seconds": best,
            "texts_per_s": len(texts) / best, "chars_per_s": chars / best, "backbone_share": share, "note": note}


def one_by_one(run: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """`run` called on each text alone: what a server that never joins requests of one text does."""
    return lambda texts: [run([t]) for t in texts]


def model_rows(shapes: list[str], reviews: list[str], paragraphs: list[str], repeats: int, alone: int) -> list[dict]:
    """The classifier's and the tagger's rows of every shape: batched by length, then the first `alone` texts
    one per call."""
    rows = []
    for shape in shapes:
        classifier, tagger, tokenizer = _networks(shape)
        width = f"{shape} ({classifier.backbone.n_layer}×{classifier.backbone.n_embd})"
        classify = functools.partial(label_probabilities, classifier, tokenizer, max_length=MAX_LENGTH)
        for task, name, texts, run, backbone in (
                ("classify", "classifier", reviews, classify, classifier.backbone),
                ("segment", "neural tagger", paragraphs, tagger.segment, tagger.model.backbone)):
            rows.append(_row(task, f"hanlm {name}, {width}", "batched by length", texts, run, repeats, backbone))
            rows.append(_row(task, f"hanlm {name}, {width}", "one text per call", texts[:alone], one_by_one(run),
                             repeats, backbone))
        print(json.dumps(rows[-4:]), flush=True)
    return rows


def peer_rows(paragraphs: list[str], train: list[TaggedSentence], crf_sentences: int, crf_iterations: int, repeats: int,
              peers: tuple[str, ...]) -> tuple[list[dict], dict[str, str]]:
    """The CRF (trained here) and each peer segmenter installed; why each other peer was skipped."""
    from hanlm.bench.segment import PEER_NOTES, PEERS

    crf = CRFTagger.fit(train[:crf_sentences], ["S", "B", "M", "E"], c1=0.1, c2=0.01, iterations=crf_iterations)
    rows = [_row("segment", "hanlm CRF", "one text at a time (its own loop)", paragraphs, crf.segment, repeats,
                 note=f"trained here on {crf_sentences:,} paragraphs, {crf_iterations} iterations")]
    skipped = {}
    for name in peers:
        try:
            segment = PEERS[name]()
        except Exception as e:  # a peer that is missing or cannot load its model is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        rows.append(_row("segment", name, "one text at a time (its own loop)", paragraphs, segment, repeats,
                         note=PEER_NOTES[name]))
    return rows, skipped


def served_rows(shape: str, paragraphs: list[str], reviews: list[str], levels: list[int], requests: int,
                routes: tuple[str, ...]) -> list[dict]:
    """Client-side throughput of `routes` at each concurrency, one text per request: at the top level also
    with joining off (serve.task_batch_texts 1); and the requests the worker ran per model batch."""

    classifier, tagger, tokenizer = _networks(shape)
    models = {"/v1/segment": (tagger, "tag", paragraphs), "/v1/classify": (classifier, "classify", reviews)}
    out = []
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-nlu-") as tmp:
        for route in routes:
            model, task, texts = models[route]
            cfg = load_config(None, [f"model.preset={shape}", "tokenizer.kind=char", f"model.task={task}",
                                     "finetune.labels=[neg,pos]" if task == "classify" else "finetune.task=tag"])
            (Path(tmp) / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
            for join in (True, False):
                app = create_app(lambda m=model, c=cfg: (m, c, tokenizer), model_name=shape, max_task_queue=1024,
                                 task_batch_texts=256 if join else 1)
                with live_server(app) as url:
                    for clients in levels if join else levels[-1:]:
                        metrics = app.state.hanlm.metrics.registry
                        before = [metrics.get_sample_value(f"hanlm_task_{m}_total") or 0.0
                                  for m in ("batches", "batched_requests")]
                        level = client_process("hanlm.bench.nlu_client", url, "--route", route, "--texts",
                                               str(Path(tmp) / "texts.json"), "--concurrency", str(clients),
                                               "--requests", str(max(requests, clients)))
                        after = [metrics.get_sample_value(f"hanlm_task_{m}_total") for m in
                                 ("batches", "batched_requests")]
                        level |= {"route": route, "joining": join,
                                  "requests_per_batch": (after[1] - before[1]) / max(after[0] - before[0], 1)}
                        out.append(level)
                        print(json.dumps(level), flush=True)
    return out


def nlu_suite(quick: bool) -> dict[str, Any]:
    """Every row: the networks, the CRF and the peers on the same text, then the server."""
    data = read_tagged_data(load_config("segment"))
    paragraphs = [s.text for s in data.splits["test"]][:100 if quick else None]
    reviews = read_labelled(load_config(None, ["finetune.task=classify"])).splits["test"].texts[:300 if quick else None]
    repeats = 2 if quick else 5
    rows = model_rows(["tiny"] if quick else ["tiny", "small"], reviews, paragraphs, repeats, 40 if quick else 200)
    peers, skipped = peer_rows(paragraphs, data.splits["train"], 300 if quick else 3000, 5 if quick else 50, repeats,
                               ("jieba",) if quick else ("jieba", "thulac"))
    if quick:
        skipped["thulac"] = "--quick: loading its model alone takes seconds"
    served = served_rows("tiny", paragraphs, reviews, [1, 8] if quick else [1, 4, 16], 48 if quick else 400,
                         ("/v1/segment",) if quick else ("/v1/segment", "/v1/classify"))
    return {"quick": quick, "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows + peers,
            "skipped": skipped, "served": served}


def _speed_table(rows: list[dict]) -> list[str]:
    lines = ["| model | how | texts | texts/s | characters/s | backbone's share | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = "–" if r["backbone_share"] is None else f"{r['backbone_share']:.0%}"
        lines.append(f"| {r['name']} | {r['how']} | {r['texts']:,} | {r['texts_per_s']:,.0f} | {r['chars_per_s']:,.0f} "
                     f"| {share} | {r['note']} |")
    return lines


def _goal(rows: list[dict], task: str, key: str, goal: float, unit: str) -> str:
    best = next(r for r in rows if r["task"] == task and r["how"] == "batched by length" and "tiny" in r["name"])
    verdict = "met" if best[key] >= goal else f"not met: {best[key] / goal:.0%} of it"
    others = [r for r in rows if r["task"] == task and r["how"] == "batched by length" and "tiny" not in r["name"]]
    more = "".join(f"; {r['name']}: {r[key]:,.0f} ({r[key] / goal:.0%} of the goal, the backbone "
                   f"{r['backbone_share']:.0%} of its time)" for r in others)
    return f"- {best['name']}, batched: {best[key]:,.0f} {unit} (goal ≥ {goal:,.0f}: {verdict}){more}"


def markdown(result: dict[str, Any]) -> list[str]:
    """The suite's section of the report: one table per figure, the goals, the peers not run."""
    rows, served = result["rows"], result["served"]
    lines = ["## NLU throughput", "", f"Best of {result['repeats']} passes, {result['threads']} torch threads.", "",
             "### Classification (chn-reviews test split)", "", *_speed_table([r for r in rows if r["task"] == "classify"]),
             "", "### Segmentation (People's Daily test paragraphs)", "",
             *_speed_table([r for r in rows if r["task"] == "segment"]), "",
             _goal(rows, "segment", "chars_per_s", GOALS["tagger_chars_per_s"], "characters/s"),
             _goal(rows, "classify", "texts_per_s", GOALS["classify_texts_per_s"], "texts/s")]
    lines += [f"- {name}: not run ({why})" for name, why in result["skipped"].items()]
    lines += ["", "### Served (one text per request, the tiny shape)", "",
              ("| route | clients | joining | requests/s | characters/s | vs 1 client | requests per model batch | "
               "latency ms mean / p50 / p99 | failed |"), "|---|---|---|---|---|---|---|---|---|"]
    for x in served:
        one = next(y for y in served if y["route"] == x["route"] and y["concurrency"] == 1)
        lines.append(f"| {x['route']} | {x['concurrency']} | {'on' if x['joining'] else 'off'} | "
                     f"{x['requests_per_s']:,.0f} | {x['chars_per_s']:,.0f} | "
                     f"{x['requests_per_s'] / one['requests_per_s']:.1f}× | {x['requests_per_batch']:.1f} | "
                     f"{x['latency_mean_ms']:.1f} / {x['latency_p50_ms']:.1f} / {x['latency_p99_ms']:.1f} | "
                     f"{x['failed']} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("nlu", __doc__)
    parser.add_argument("--quick", action="store_true", help="the tiny shape only, fewer texts and passes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = nlu_suite(args.quick)
    result["command"] = "python -m hanlm.bench.nlu " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    text = "\n".join(markdown(result))
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
