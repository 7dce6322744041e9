"""`hanlm prepare --launcher spark`: the same shards, read and encoded by Spark tasks.

For corpora beyond one machine. Two Spark jobs do the heavy work, the driver the bookkeeping:

1. one task per source file reads, normalises and splits it into a spool of its own (the same
   `DocumentSpool` a local prepare writes) and counts its characters;
2. the driver appends the spools in source order, so the train and val documents stand in the
   very order a local prepare reads them, and trains the tokenizer exactly as a local prepare
   does (char: on the summed counts; bpe and word: on the hash-picked sample, which does not
   depend on how the reading was split);
3. tasks encode contiguous runs of chunks into files that the driver appends to the shards.

So the result is byte for byte the shards of `hanlm prepare` on the same input. The sources and
the output directory must be reachable under the same paths from every executor (a shared file
system, or URLs). `data.dedup` needs one pass over all documents in order and is refused here.
Under spark-submit the cluster's master is used; without one, Spark runs in local mode.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hanlm import errors
from hanlm.config import Config
from hanlm.data.splits import split_names, split_of
from hanlm.data.spool import DocumentSpool, read_chunk
from hanlm.data.reader import DocumentReader, ReadStats
from hanlm.data.sources import SourceFile
from hanlm.data.shards import token_dtype
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError, DataError, HanlmError

PARTS = "spark-parts"  # the tasks' spools and encoded runs, inside prepare's temporary directory
READ_TOKENS = 1 << 24  # the driver appends an encoded run to the shards this many tokens at a time


def _context():
    """The SparkContext of the session spark-submit set up, else a local one."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("--launcher spark needs pyspark: pip install 'hanlm[spark]' (Spark 4 wants Java 17)") \
            from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter, with hanlm in it
    session = SparkSession.builder.appName("hanlm prepare").getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session.sparkContext


def _guarded(task):
    """Run `task` in a Spark task, returning hanlm's own errors as values so that the driver re-raises
    them as they are (a Java stack trace around them would hide the message)."""
    def run(args):
        try:
            return {"ok": task(*args)}
        except HanlmError as e:
            return {"error": (type(e).__name__, str(e))}
    return run


def _results(rows: list[dict]) -> list[Any]:
    for row in rows:
        if "error" in row:
            name, message = row["error"]
            raise getattr(errors, name, DataError)(message)
    return [row["ok"] for row in rows]


def _spool_file(index: int, src: SourceFile, split: str | None, cfg: Config, root: str) -> dict[str, Any]:
    """Spool one source file: every document to `split`, or by the split hash (`split_of`) when split is None."""
    directory = Path(root) / f"part-{index:05d}"
    directory.mkdir(parents=True, exist_ok=True)
    reader = DocumentReader.of_files([src], cfg.data, allow_empty=True)
    spools = {s: DocumentSpool(directory, s) for s in split_names(cfg.data.tune_fraction)}
    val_fraction = 0.0 if cfg.data.val_source else cfg.data.val_fraction
    try:
        for doc in reader:
            spools[split or split_of(doc, val_fraction, cfg.data.tune_fraction)].add(doc)
    finally:
        for spool in spools.values():
            spool.close()
    return {"spools": {s: spool.summary() for s, spool in spools.items()}, "stats": dataclasses.asdict(reader.stats)}


def spool(cfg: Config, train: DocumentReader, val: DocumentReader | None,
          tmp: Path) -> tuple[dict[str, DocumentSpool], ReadStats]:
    """Job 1: read every source file in a task of its own; returns the merged spools and read statistics."""
    if cfg.data.dedup:
        raise ConfigError("data.dedup keeps the first of each repeated document, which needs one ordered pass over "
                          "every file: prepare without --launcher spark, or deduplicate the corpus beforehand")
    root = tmp / PARTS
    jobs = [(i, src, None) for i, src in enumerate(train.files)]
    jobs += [(len(jobs) + i, src, "val") for i, src in enumerate(val.files if val is not None else [])]
    task = _guarded(lambda i, src, split: _spool_file(i, src, split, cfg, str(root)))
    parts = _results(_context().parallelize(jobs, len(jobs)).map(task).collect())
    spools = {s: DocumentSpool(tmp, s) for s in split_names(cfg.data.tune_fraction)}
    stats = ReadStats(files=len(train.files))
    for (_, _, split), part in zip(jobs, parts):
        for s, spool_ in spools.items():
            spool_.extend(part["spools"][s])
        if split != "val":  # the read report is the train sources', as a local prepare's
            _add_stats(stats, part["stats"])
    for spool_ in spools.values():
        spool_.close()
    shutil.rmtree(root)  # the tasks' spools, now copied into the merged ones
    if stats.documents == 0:
        names = ", ".join(f.url for f in train.files)
        raise DataError(f"no documents left in {names} after filtering ({stats.summary()}); check data.min_chars "
                        f"(now {cfg.data.min_chars}) and the sources")
    return spools, stats


def _add_stats(total: ReadStats, part: dict[str, Any]) -> None:
    for name, value in part.items():
        if name == "damaged_files":
            for url, n in value.items():
                total.damaged_files[url] = total.damaged_files.get(url, 0) + n
        elif name != "files":
            setattr(total, name, getattr(total, name) + value)


def _encode_run(index: int, chunks: list[tuple[int, int, int, int]], paths: tuple[str, str], tokenizer_path: str,
                root: str) -> tuple[str, int, int, int]:
    """Encode a run of chunks into one file of token ids; (its path, tokens, characters, documents)."""
    tokenizer = Tokenizer.load(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    path = Path(root) / f"encoded-{index:05d}.bin"
    tokens = characters = documents = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            docs = read_chunk(Path(paths[0]), Path(paths[1]), chunk)
            ids = tokenizer.encode_documents(docs).astype(dtype)
            f.write(ids.tobytes())
            tokens, characters, documents = tokens + len(ids), characters + sum(map(len, docs)), documents + len(docs)
    return str(path), tokens, characters, documents


def encode(spool_: DocumentSpool, tmp: Path) -> Iterator[tuple[np.ndarray, int, int]]:
    """Job 3: encode the spool's chunks in Spark tasks, each a contiguous run; yields (ids, characters,
    documents) per run, in order, for the shard writer."""
    if not spool_.chunks:
        return
    sc = _context()
    runs = np.array_split(np.arange(len(spool_.chunks)), min(len(spool_.chunks), 4 * sc.defaultParallelism))
    jobs = [(i, [spool_.chunks[c] for c in run]) for i, run in enumerate(runs)]
    paths, root = (str(spool_.text_path), str(spool_.lengths_path)), tmp / PARTS
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = str(tmp / "tokenizer.json")
    dtype = token_dtype(Tokenizer.load(tokenizer_path).vocab_size)
    task = _guarded(lambda i, chunks: _encode_run(i, chunks, paths, tokenizer_path, str(root)))
    for path, tokens, characters, documents in _results(sc.parallelize(jobs, len(jobs)).map(task).collect()):
        if os.path.getsize(path) != tokens * dtype.itemsize:
            raise DataError(f"{path}: {os.path.getsize(path)} bytes, its Spark task wrote {tokens} tokens; the "
                            "output directory must be one file system shared by the driver and the executors")
        ids = np.memmap(path, dtype=dtype, mode="r") if tokens else np.zeros(0, dtype=dtype)
        for at in range(0, max(tokens, 1), READ_TOKENS):  # a bounded piece in memory at a time
            piece = ids[at:at + READ_TOKENS]
            last = at + READ_TOKENS >= tokens
            yield piece, characters if last else 0, documents if last else 0
        del ids
        os.unlink(path)
    shutil.rmtree(root)
