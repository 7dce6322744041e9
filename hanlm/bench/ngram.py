"""The n-gram baseline measured: build time and memory, val BPC by order, query speed against peers.

    python -m hanlm.bench.ngram [--out bench/results/ngram] [--orders 2,3,4,5] [--nltk-docs 2000]

On `people-daily-1998` (char tokens, the prepared train/val split):
- each order is built in a fresh process: counting + estimation time, ARPA writing time, peak RSS;
- val BPC of each order on the whole val split (the figure the neural models report);
- the 5-gram's n-gram counts on the whole corpus, to set beside KenLM lmplz's;
- query speed (n-grams scored per second), side by side in one process: hanlm (whole-stream and
  per-sentence), the `kenlm` module on the same ARPA file, and NLTK's KneserNeyInterpolated,
  which is so slow that all three are also compared on a model of the first `--nltk-docs` documents.
Writes results.json and table.md into --out. Needs `pip install hanlm[bench]` (kenlm, nltk).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hanlm.bench import suite_parser
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.reader import DocumentReader
from hanlm.data.shards import open_split
from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.eval import evaluate, split_characters
from hanlm.memory import peak_rss
from hanlm.models.arpa import arpa_words, read_arpa, write_arpa
from hanlm.models.ngram import EOS, NGramLM, estimate

# KenLM lmplz on this machine, whole corpus, 5-gram chars (issue 5): not rerun here, there is no lmplz binary.
LMPLZ = {"seconds": 4.5, "peak_rss_gib": 0.8, "counts": [4690, 281235, 883225, 1327040, 1536210]}


def _data():
    cfg = load_config(overrides=["model.arch=ngram", "tokenizer.kind=char"])  # the table is on char tokens
    prepared = prepare(cfg, progress=False)
    return cfg, prepared, Tokenizer.load(prepared.directory / "tokenizer.json")


def build_one(order: int, arpa: Path) -> dict:
    """Build one order in this (fresh) process and evaluate it; what `--build-one` prints."""
    cfg, prepared, tok = _data()
    train = np.asarray(open_split(prepared.directory, "train"))
    before = peak_rss()
    model, report = estimate(train, tok.vocab_size, order)
    t0 = time.perf_counter()
    write_arpa(model, arpa_words(tok.token_strings()), arpa)
    written = time.perf_counter() - t0
    result = evaluate(model, open_split(prepared.directory, "val"), block_size=cfg.train.block_size,
                      batch_size=cfg.eval.batch_size, characters=split_characters(prepared.meta, "val"))
    return {"order": order, "estimate_s": report.seconds, "write_s": written, "peak_rss": peak_rss(),
            "peak_rss_estimate": report.peak_rss, "rss_before": before, "counts": report.counts, "bpc": result.bpc,
            "ppl_char": result.ppl_char, "arpa_bytes": arpa.stat().st_size}


def _sentences(stream: np.ndarray) -> list[np.ndarray]:
    ends = np.flatnonzero(stream == EOS)
    return [stream[s:e] for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf


def query_speeds(model: NGramLM, arpa: Path, words: list[str], sents: list[np.ndarray], repeat: int = 3) -> dict:
    """n-grams scored per second by hanlm (whole stream, per sentence) and kenlm (per sentence)."""
    import kenlm

    ken = kenlm.Model(str(arpa))
    texts = [" ".join(words[i] for i in s) for s in sents]
    n = sum(len(s) + 1 for s in sents)  # each word and the </s>
    stream = np.concatenate([np.concatenate([[EOS], s]) for s in sents] + [[EOS]])
    best = {"hanlm_stream": math.inf, "hanlm_sentence": math.inf, "kenlm_sentence": math.inf}
    for _ in range(repeat):
        t0 = time.perf_counter()
        model._score(np.zeros(0, dtype=np.int64), stream[:-1], stream[1:])
        t1 = time.perf_counter()
        ours = [model.sentence_log10(s) for s in sents]
        t2 = time.perf_counter()
        theirs = [ken.score(t, bos=True, eos=True) for t in texts]
        t3 = time.perf_counter()
        best = {k: min(best[k], v) for k, v in
                zip(best, (t1 - t0, t2 - t1, t3 - t2))}
    agree = max(abs(a - math.fsum(p for p, _, _ in ken.full_scores(t))) for a, t in zip(ours, texts))
    assert abs(sum(ours) - sum(theirs)) < 1e-3 * max(1.0, abs(sum(ours))), "kenlm and hanlm disagree"
    return {"ngrams": n, **{f"{k}_per_s": _rate(n, v) for k, v in best.items()}, "max_abs_diff_log10": agree}


def nltk_speed(docs_tok: list[np.ndarray], sents: list[np.ndarray], order: int, words: list[str],
               limit: int = 300) -> dict:
    """Fit NLTK's KneserNeyInterpolated on the same documents and time `limit` queries."""
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import padded_everygram_pipeline

    t0 = time.perf_counter()
    grams, vocab = padded_everygram_pipeline(order, [[words[i] for i in d] for d in docs_tok])
    lm = KneserNeyInterpolated(order)
    lm.fit(grams, vocab)
    fitted = time.perf_counter() - t0
    queries = []
    for s in sents:
        seq = ["<s>"] * (order - 1) + [words[i] for i in s] + ["</s>"]
        queries += [(seq[i], seq[i - order + 1:i]) for i in range(order - 1, len(seq))]
    queries = queries[:limit]
    t1 = time.perf_counter()
    for w, ctx in queries:
        lm.logscore(w, ctx)
    return {"fit_s": fitted, "queries": len(queries), "nltk_per_s": _rate(len(queries), time.perf_counter() - t1)}


def compare_queries(out: Path, *, nltk_docs: int = 2000, nltk_queries: int = 300) -> dict:
    """hanlm, kenlm and NLTK scoring the val split with a 5-gram of the first `nltk_docs` training
    documents (NLTK is too slow for more)."""
    _, prepared, tok = _data()
    words = arpa_words(tok.token_strings())
    docs = _sentences(np.asarray(open_split(prepared.directory, "train")))[:nltk_docs]
    val_sents = _sentences(np.asarray(open_split(prepared.directory, "val")))
    small, _ = estimate(np.concatenate([np.concatenate([d, [EOS]]) for d in docs]), tok.vocab_size, 5)
    arpa = out / f"first-{nltk_docs}-docs-5gram.arpa"
    write_arpa(small, words, arpa)
    return {"nltk_docs": nltk_docs, "query": query_speeds(small, arpa, words, val_sents[:200]),
            "nltk": nltk_speed(docs, val_sents[:20], 5, words, limit=nltk_queries)}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("ngram", __doc__)
    parser.add_argument("--orders", default="2,3,4,5", help="orders to build (default 2,3,4,5)")
    parser.add_argument("--nltk-docs", type=int, default=2000, help="documents for the NLTK comparison model")
    parser.add_argument("--build-one", type=int, metavar="ORDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.build_one:
        print(json.dumps(build_one(args.build_one, args.out / f"people-daily-{args.build_one}gram.arpa")))
        return 0

    cfg, prepared, tok = _data()
    builds = []
    for order in map(int, args.orders.split(",")):
        done = subprocess.run([sys.executable, "-m", "hanlm.bench.ngram", "--out", str(args.out),
                               "--build-one", str(order)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"building the {order}-gram failed:\n{done.stderr[-3000:]}")
        builds.append(json.loads(done.stdout.strip().splitlines()[-1]))
        b = builds[-1]
        print(f"{order}-gram: estimate {b['estimate_s']:.2f} s + ARPA {b['write_s']:.2f} s, peak RSS "
              f"{b['peak_rss'] / 2**30:.2f} GiB, val BPC {b['bpc']:.4f}", flush=True)

    # The whole corpus with a vocabulary of all its characters, as lmplz saw it.
    docs_all = list(DocumentReader(cfg.data.source, cfg.data))
    tok_all = train_tokenizer("char", docs_all)
    whole, _ = estimate(tok_all.encode_documents(docs_all), tok_all.vocab_size, 5)
    val = np.asarray(open_split(prepared.directory, "val"))
    words = arpa_words(tok.token_strings())
    val_sents = _sentences(val)

    top = max(b["order"] for b in builds)
    arpa = args.out / f"people-daily-{top}gram.arpa"
    full_model, _ = read_arpa(arpa, words)
    full_query = query_speeds(full_model, arpa, words, val_sents)
    print(f"query, full {top}-gram: {json.dumps(full_query)}", flush=True)

    small = compare_queries(args.out, nltk_docs=args.nltk_docs)
    small_query, nltk = small["query"], small["nltk"]
    print(f"query, {args.nltk_docs}-document 5-gram: {json.dumps(small_query)}; nltk {json.dumps(nltk)}", flush=True)

    results = {"command": "python -m hanlm.bench.ngram " + " ".join(argv or sys.argv[1:]), "builds": builds,
               "whole_corpus_counts": whole.counts(), "lmplz_reported": LMPLZ, "query_full": full_query,
               "query_small": small_query, "nltk": nltk, "nltk_docs": args.nltk_docs,
               "unigram_bpc": prepared.meta["splits"]["val"]["unigram_bpc"]}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


def table(r: dict) -> str:
    """The Markdown tables docs/BENCHMARKS.md shows."""
    lines = ["| order | n-grams (orders 1…n) | estimate | + write ARPA | peak RSS (process) | val BPC | val ppl/char |",
             "|---|---|---|---|---|---|---|"]
    for b in r["builds"]:
        lines.append(f"| {b['order']} | {' / '.join(f'{c:,}' for c in b['counts'])} | {b['estimate_s']:.1f} s | "
                     f"{b['write_s']:.1f} s | {b['peak_rss'] / 2**30:.2f} GiB | {b['bpc']:.3f} | "
                     f"{b['ppl_char']:.1f} |")
    ours, lmplz = r["whole_corpus_counts"], r["lmplz_reported"]["counts"]
    same = "identical." if ours == lmplz else "different."
    lines += ["", (f"Whole corpus, 5-gram: hanlm counts {' / '.join(f'{c:,}' for c in ours)}; lmplz (issue 5) "
                   f"{' / '.join(f'{c:,}' for c in lmplz)} — {same}")]
    q, s, n = r["query_full"], r["query_small"], r["nltk"]
    lines += ["", ("| n-grams scored per second | hanlm, whole stream | hanlm, per sentence | kenlm, per sentence | "
                   "NLTK KneserNeyInterpolated |"), "|---|---|---|---|---|",
              (f"| full 5-gram ({q['ngrams']:,} val n-grams) | {q['hanlm_stream_per_s']:,.0f} | "
               f"{q['hanlm_sentence_per_s']:,.0f} | {q['kenlm_sentence_per_s']:,.0f} | — |"),
              (f"| 5-gram of the first {r['nltk_docs']:,} documents | {s['hanlm_stream_per_s']:,.0f} | "
               f"{s['hanlm_sentence_per_s']:,.0f} | {s['kenlm_sentence_per_s']:,.0f} | {n['nltk_per_s']:,.1f} |")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
