"""Prepare at scale: time and peak memory of `hanlm prepare` on corpora of 0.1 to 2 GB.

    python -m hanlm.bench.scale --sizes 0.1,0.5,1,2 --out bench/results/scale

The corpora are made from People's Daily: each document is 2 to 12 of its sentences drawn at
random (seeded), so the text is real Chinese, every document is distinct and the character
distribution is the corpus's own. Each size is prepared in a fresh process whose peak RSS
(with its children's) is sampled every 50 ms; the table and a plot of seconds and peak RSS
against corpus size go to --out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hanlm.bench import suite_parser
from hanlm.data.corpora import corpus_file

_SENTENCE_END = re.compile(r"(?<=[。！？])")


def _sentences() -> list[str]:
    out = []
    with open(corpus_file("people-daily-1998"), encoding="utf-8") as f:
        for line in f:
            out.extend(s.strip() for s in _SENTENCE_END.split(json.loads(line)["text"]) if len(s.strip()) > 4)
    return out


def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """Write a .txt corpus of about `size_bytes` of UTF-8, one document per line (see module doc)."""
    sentences = _sentences()
    encoded = [s.encode("utf-8") for s in sentences]
    rng = np.random.default_rng(seed)
    written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        while written < size_bytes:
            counts = rng.integers(2, 13, size=4096)
            picks = rng.integers(0, len(encoded), size=int(counts.sum()))
            lines, at = [], 0
            for n in counts:
                lines.append(b"".join(encoded[i] for i in picks[at:at + n]))
                at += n
            block = b"\n".join(lines) + b"\n"
            f.write(block)
            written += len(block)
    return path


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes of the process and all its children together) of a command,
    sampled every 50 ms; a failing command raises with its stderr."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode(errors='replace')}")
    return seconds, peak


def run_size(gigabytes: float, work: Path, kind: str) -> dict:
    """Make (or reuse) the corpus of this size and prepare it from scratch with `kind` tokens."""
    corpus = work / f"corpus-{gigabytes:g}GB.txt"
    if not corpus.exists() or corpus.stat().st_size < gigabytes * 1e9:
        make_corpus(corpus, int(gigabytes * 1e9))
    out = work / f"prepared-{gigabytes:g}GB-{kind}"
    cmd = [sys.executable, "-m", "hanlm.cli", "prepare", "--force", "--no-progress", "--out", str(out),
           "--set", f"data.source=[{corpus}]", "--set", f"tokenizer.kind={kind}"]
    seconds, peak = measure(cmd, {**os.environ, "HANLM_HOME": str(work / "home")})
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    shutil.rmtree(out)
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"gigabytes": gigabytes, "bytes": meta["text_bytes"], "tokens": tokens, "seconds": seconds,
            "mb_per_s": meta["text_bytes"] / 1e6 / seconds, "peak_rss_mb": peak / 1e6,
            "files": sum(len(s["files"]) for s in meta["splits"].values())}


def table(rows: list[dict], kind: str) -> str:
    lines = [f"| corpus | tokens ({kind}) | shard files | seconds | MB/s | peak RSS (MB, all processes) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bytes'] / 1e9:.2f} GB | {r['tokens']:,} | {r['files']} | {r['seconds']:.1f} | "
                     f"{r['mb_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), layout="tight")
    gb = [r["bytes"] / 1e9 for r in rows]
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot(gb, [r["seconds"] for r in rows], "o-", color="tab:blue")
    left.plot([0, gb[-1]], [0, gb[-1] * 1000 / 20], ":", color="gray", label="20 MB/s")
    left.set_xlabel("corpus (GB of UTF-8)")
    left.set_ylabel("seconds, end to end")
    left.legend()
    right.plot(gb, [r["peak_rss_mb"] for r in rows], "o-", color="tab:red")
    right.axhline(1000, ls=":", color="gray", label="1 GB goal")
    right.set_ylim(0, max(1100, max(r["peak_rss_mb"] for r in rows) * 1.1))
    right.set_xlabel("corpus (GB of UTF-8)")
    right.set_ylabel("peak RSS, all processes (MB)")
    right.legend()
    fig.suptitle(f"hanlm prepare, {kind} tokenizer, 2 CPU cores")
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("scale", __doc__)
    parser.add_argument("--sizes", default="0.1,0.5,1,2", help="corpus sizes in GB (default 0.1,0.5,1,2)")
    parser.add_argument("--kind", default="char", choices=("char", "bpe", "word"), help="tokenizer (default char)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hanlm-scale"),
                        help="where the corpora and shards go (needs about 3x the largest size free)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for gb in sizes:
        rows.append(run_size(gb, args.work, args.kind))
        r = rows[-1]
        print(f"{gb:g} GB: {r['seconds']:.1f} s, {r['mb_per_s']:.1f} MB/s, peak RSS {r['peak_rss_mb']:.0f} MB",
              flush=True)
    (args.out / f"results-{args.kind}.json").write_text(json.dumps(rows, indent=1))
    text = table(rows, args.kind)
    (args.out / f"table-{args.kind}.md").write_text(text + "\n")
    plot(rows, args.out / f"scale-{args.kind}.png", args.kind)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
