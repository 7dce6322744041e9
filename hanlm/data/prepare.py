"""Data preparation: documents -> tokenizer -> packed token shards (`hanlm prepare`).

Idempotent: the output directory's meta.json carries a key hashed from the source
fingerprints and the data and tokenizer settings; the same key reuses the shards, any change
rebuilds them. Atomic: everything is written into a temporary directory that replaces the
output directory only when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hanlm import __version__
from hanlm.atomic import atomic_dir, atomic_write_text
from hanlm.config import Config
from hanlm.data.corpora import hanlm_home
from hanlm.data.reader import DocumentReader
from hanlm.data.shards import FORMAT_VERSION, ShardWriter, open_split, read_meta, token_dtype
from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.errors import DataError

# Documents are encoded in chunks of about this many characters: big enough to amortise
# inter-process transfer, small enough to keep every worker busy.
CHUNK_CHARS = 1 << 18
# Starting worker processes costs about a second; below this much serial work it does not pay.
POOL_WORTH_SECONDS = 2.0


@dataclass
class Prepared:
    """A prepared data directory and its meta.json."""

    directory: Path
    meta: dict[str, Any]
    reused: bool  # True when existing shards matched and nothing was rebuilt
    seconds: float = 0.0

    def summary(self) -> str:
        m = self.meta
        lines = [f"prepared data: {self.directory}" + (" (up to date, reused)" if self.reused else ""),
                 f"tokenizer: {m['tokenizer_kind']}, vocabulary {m['vocab_size']:,}, shards {m['dtype']}"]
        for split, s in m["splits"].items():
            per = s["characters"] / s["tokens"] if s["tokens"] else 0.0
            lines.append(f"{split:>5}: {s['documents']:>9,} documents {s['characters']:>12,} characters "
                         f"{s['tokens']:>12,} tokens ({per:.2f} characters/token, unigram entropy "
                         f"{s['unigram_bpc']:.3f} bits/character)")
        lines.append(f"distinct characters (train): {m['distinct_characters']:,}")
        if m.get("read_report"):
            lines.append(f"reader: {m['read_report']}")
        if not self.reused and self.seconds:
            mb = m["text_bytes"] / 1e6
            lines.append(f"took {self.seconds:.1f} s ({mb / self.seconds:.1f} MB/s of UTF-8 text)")
        return "\n".join(lines)


def text_bucket(doc: str) -> int:
    """A stable hash of a text, in 0 .. 999,999: what every deterministic split cuts on, so a repeated
    document always lands on the same side."""
    return int.from_bytes(hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest(), "little") % 1_000_000


def is_val(doc: str, val_fraction: float) -> bool:
    """Whether a document belongs to the val split (by `text_bucket`)."""
    return text_bucket(doc) < val_fraction * 1_000_000


def default_dir(cfg: Config) -> Path:
    """`$HANLM_HOME/prepared/<sources>-<tokenizer kind>`."""
    names = [re.sub(r"[^\w.-]+", "_", Path(s.rstrip("/")).name or s).strip("_") for s in cfg.data.source]
    slug = "+".join(names)[:80] or "data"
    return hanlm_home() / "prepared" / f"{slug}-{cfg.tokenizer.kind}"


def _key(cfg: Config, train_fp: list[str], val_fp: list[str], tokenizer_fp: str | None) -> str:
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("prepared_dir", "num_workers")}
    tok = dataclasses.asdict(cfg.tokenizer) | {"path": tokenizer_fp}
    blob = json.dumps({"format": FORMAT_VERSION, "train": train_fp, "val": val_fp, "data": data,
                       "tokenizer": tok}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reusable(directory: Path, key: str) -> dict[str, Any] | None:
    """meta.json of complete shards built from the same inputs, else None (anything else is rebuilt)."""
    try:
        meta = read_meta(directory)
        if meta.get("key") != key:
            return None
        for split in meta["splits"]:
            open_split(directory, split)
    except DataError:
        return None
    return meta if (directory / "tokenizer.json").exists() else None


def prepare(cfg: Config, out_dir: str | Path | None = None, *, force: bool = False,
            progress: bool = True) -> Prepared:
    """Prepare shards for `cfg`, or reuse them when sources and settings are unchanged."""
    start = time.perf_counter()
    directory = Path(out_dir or cfg.data.prepared_dir or default_dir(cfg))
    train_reader = DocumentReader(cfg.data.source, cfg.data)
    val_reader = DocumentReader(cfg.data.val_source, cfg.data) if cfg.data.val_source else None
    tok_path = cfg.tokenizer.path
    key = _key(cfg, train_reader.fingerprints(), val_reader.fingerprints() if val_reader else [],
               _file_sha256(tok_path) if tok_path and os.path.exists(tok_path) else tok_path)

    meta = None if force else _reusable(directory, key)
    if meta is not None:
        return Prepared(directory, meta, reused=True)

    with atomic_dir(directory) as tmp:
        counts, distinct = _split_documents(train_reader, val_reader, cfg.data.val_fraction, tmp, progress)
        for split, c in counts.items():
            if c["documents"] == 0:
                raise _empty_split_error(split, cfg)
        if tok_path:
            tokenizer = Tokenizer.load(tok_path)
        else:
            tokenizer = train_tokenizer(cfg.tokenizer.kind, _read_docs(tmp / "train.docs"),
                                        vocab_size=cfg.tokenizer.vocab_size, min_freq=cfg.tokenizer.min_freq,
                                        split_digits=cfg.tokenizer.split_digits,
                                        segmenter=cfg.tokenizer.segmenter)
        tokenizer.save(tmp / "tokenizer.json")
        dtype = token_dtype(tokenizer.vocab_size)
        workers = cfg.data.num_workers or os.cpu_count() or 1
        splits = {}
        for split, c in counts.items():
            docs_file = tmp / f"{split}.docs"
            writer = ShardWriter(tmp / f"{split}.bin", dtype)
            try:
                with tqdm(total=c["characters"], desc=f"encode {split}", unit=" chars", unit_scale=True,
                          disable=not progress, leave=False) as bar:
                    for ids, chars, docs in _encode(docs_file, c["chunks"], tmp / "tokenizer.json", workers):
                        writer.write(ids, chars, docs)
                        bar.update(chars)
            finally:
                splits[split] = writer.close() | {"unigram_bpc": c["unigram_bpc"]}
            docs_file.unlink()
        meta = {
            "format": FORMAT_VERSION, "key": key, "hanlm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_kind": tokenizer.kind, "tokenizer_hash": tokenizer.fingerprint(),
            "distinct_characters": len(distinct),
            "text_bytes": sum(c["bytes"] for c in counts.values()),
            "sources": {"train": train_reader.fingerprints(),
                        "val": val_reader.fingerprints() if val_reader else "held out from train"},
            "val_fraction": None if val_reader else cfg.data.val_fraction,
            "read_report": train_reader.stats.summary(),
            "splits": splits,
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Prepared(directory, meta, reused=False, seconds=time.perf_counter() - start)


def _split_documents(train: DocumentReader, val: DocumentReader | None, val_fraction: float, tmp: Path,
                     progress: bool) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Read every source once, writing each split's documents to `<split>.docs` (JSON lines).

    Returns per-split counts, with `chunks`: (offset, length) byte ranges of whole lines of
    about CHUNK_CHARS characters, the units of parallel encoding; and the distinct
    characters of the train split.
    """
    counts = {s: {"documents": 0, "characters": 0, "bytes": 0, "chunks": []} for s in ("train", "val")}
    files = {s: open(tmp / f"{s}.docs", "wb") for s in counts}
    pending = {s: [0, 0, 0] for s in counts}  # chunk start offset, its bytes, its characters
    frequencies = {s: Counter() for s in counts}

    def add(split: str, doc: str) -> None:
        c, p = counts[split], pending[split]
        line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        files[split].write(line)
        c["documents"] += 1
        c["characters"] += len(doc)
        c["bytes"] += len(doc.encode("utf-8"))
        p[1] += len(line)
        p[2] += len(doc)
        if p[2] >= CHUNK_CHARS:
            c["chunks"].append((p[0], p[1]))
            pending[split] = [p[0] + p[1], 0, 0]
        frequencies[split].update(doc)

    try:
        with tqdm(desc="read", unit=" docs", disable=not progress, leave=False) as bar:
            for doc in train:
                add("val" if val is None and is_val(doc, val_fraction) else "train", doc)
                bar.update()
            for doc in val or ():
                add("val", doc)
                bar.update()
    finally:
        for f in files.values():
            f.close()
    distinct = set(frequencies["train"])
    for split, p in pending.items():
        if p[1]:
            counts[split]["chunks"].append((p[0], p[1]))
        freq = frequencies[split]
        freq["\n"] += counts[split]["documents"]  # each document's <eos>, counted as the line break it replaces
        counts[split]["unigram_bpc"] = unigram_entropy(freq)
    return counts, distinct


def unigram_entropy(freq: Counter) -> float:
    """Bits per character of a unigram model fitted to these very counts: the baseline a language
    model's BPC on the same text should beat by far."""
    n = np.array(list(freq.values()), dtype=np.float64)
    p = n[n > 0] / n.sum()
    return float(-(p * np.log2(p)).sum()) if len(p) else 0.0


def _read_docs(path: Path, offset: int = 0, length: int | None = None) -> Iterator[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if length is None else f.read(length)
    for line in data.splitlines():
        yield json.loads(line)


def _empty_split_error(split: str, cfg: Config) -> DataError:
    how = ("data.val_source gave no documents" if cfg.data.val_source
           else f"data.val_fraction={cfg.data.val_fraction} held out no document")
    return DataError(f"the {split} split is empty: {how if split == 'val' else 'every document went to val'}; "
                     "add data or change data.val_fraction")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(path)


def _encode_chunk(docs_file: Path, chunk: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """(token ids, characters, documents) of one chunk, each document followed by <eos>."""
    docs = list(_read_docs(docs_file, *chunk))
    return _worker_tokenizer.encode_documents(docs), sum(map(len, docs)), len(docs)


def _encode(docs_file: Path, chunks: list[tuple[int, int]], tokenizer_path: Path,
            workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """Encode the chunks in order. The first runs here and is timed: when the rest would take
    long enough to repay starting processes, they go to a pool of `workers`."""
    _init_worker(str(tokenizer_path))
    if not chunks:
        return
    t0 = time.perf_counter()
    yield _encode_chunk(docs_file, chunks[0])
    rest = chunks[1:]
    if workers > 1 and (time.perf_counter() - t0) * len(rest) > POOL_WORTH_SECONDS:
        # spawn, not fork: the parent may hold torch or tokenizers thread pools that fork breaks.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            yield from pool.imap(functools.partial(_encode_chunk, docs_file), rest)
    else:
        for chunk in rest:
            yield _encode_chunk(docs_file, chunk)
