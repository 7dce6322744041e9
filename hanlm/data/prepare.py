"""Data preparation: documents -> tokenizer -> packed token shards (`hanlm prepare`).

Idempotent: the output directory's meta.json carries a key hashed from the source
fingerprints and the data and tokenizer settings; the same key reuses the shards, any change
rebuilds them. The default directory is named by the sources, the tokenizer kind and a hash of
the settings, so different configs keep their shards side by side. Atomic: everything is written
into a temporary directory that replaces the output directory only when complete. Bounded
memory: see `prepare`.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from hanlm import __version__
from hanlm.atomic import atomic_dir, atomic_write_text
from hanlm.config import Config
from hanlm.data.corpora import hanlm_home
from hanlm.data import spark_prepare
from hanlm.data.reader import DocumentReader
from hanlm.data.splits import split_names, split_of, text_bucket
from hanlm.data.spool import DocumentSpool, read_chunk
from hanlm.data.segmenters import SegmenterLoader, plug_segmenter_loader, segmenter_loader
from hanlm.data.shards import FORMAT_VERSION, ShardWriter, dropout_split, open_split, read_meta, token_dtype
from hanlm.data.tokenizer import Tokenizer, char_tokenizer_from_counts, train_tokenizer
from hanlm.errors import DataError

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
        copies = [dropout_split(k) for k in range(1, m.get("bpe_dropout", {}).get("copies", 0) + 1)]
        for split, s in m["splits"].items():
            if split in copies:  # summed up in one line below
                continue
            per = s["characters"] / s["tokens"] if s["tokens"] else 0.0
            lines.append(f"{split:>5}: {s['documents']:>9,} documents {s['characters']:>12,} characters "
                         f"{s['tokens']:>12,} tokens ({per:.2f} characters/token, unigram entropy "
                         f"{s['unigram_bpc']:.3f} bits/character)")
        if copies:
            tokens = sum(m["splits"][c]["tokens"] for c in copies) / len(copies)
            per = m["splits"][copies[0]]["characters"] / tokens if tokens else 0.0
            lines.append(f"train, BPE-dropout {m['bpe_dropout']['p']}: {len(copies)} more encodings of "
                         f"{tokens:,.0f} tokens on average ({per:.2f} characters/token)")
        lines.append(f"distinct characters (train): {m['distinct_characters']:,}")
        if m.get("read_report"):
            lines.append(f"reader: {m['read_report']}")
        if not self.reused and self.seconds:
            mb = m["text_bytes"] / 1e6
            lines.append(f"took {self.seconds:.1f} s ({mb / self.seconds:.1f} MB/s of UTF-8 text)")
        return "\n".join(lines)


def _settings(cfg: Config) -> dict[str, Any]:
    """The data and tokenizer settings that change the shards (not where they go, nor how many
    processes write them), with the shard format."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("prepared_dir", "num_workers")}
    tokenizer = dataclasses.asdict(cfg.tokenizer)
    if not cfg.tokenizer.bpe_dropout:  # no copies: the directories prepared before these keys keep their hash
        del tokenizer["bpe_dropout"], tokenizer["dropout_copies"]
    return {"format": FORMAT_VERSION, "data": data, "tokenizer": tokenizer}


def settings_hash(cfg: Config) -> str:
    """12 hex digits of a hash of `_settings`: the sources as written and every key that changes the shards."""
    return hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def default_dir(cfg: Config) -> Path:
    """`$HANLM_HOME/prepared/<sources>-<tokenizer kind>-<settings_hash>`: a readable name, and a hash that
    keeps the shards of different settings apart, so switching configs never rebuilds the other's."""
    names = [re.sub(r"[^\w.-]+", "_", Path(s.rstrip("/")).name or s).strip("_") for s in cfg.data.source]
    slug = "+".join(names)[:80] or "data"
    return prepared_root() / f"{slug}-{cfg.tokenizer.kind}-{settings_hash(cfg)}"


def prepared_root() -> Path:
    """Where default prepared directories live: `$HANLM_HOME/prepared`."""
    return hanlm_home() / "prepared"


def _key(cfg: Config, train_fp: list[str], val_fp: list[str], tokenizer_fp: str | None) -> str:
    """What reused shards must match: the settings, the sources' content fingerprints, the tokenizer file's."""
    settings = _settings(cfg)
    settings["tokenizer"]["path"] = tokenizer_fp
    blob = json.dumps({**settings, "train": train_fp, "val": val_fp}, sort_keys=True, ensure_ascii=False)
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
            progress: bool = True, launcher: str = "local") -> Prepared:
    """Prepare shards for `cfg`, or reuse them when sources and settings are unchanged.

    Memory stays bounded whatever the corpus size: documents stream to disk in chunks while their
    characters are counted, the tokenizer trains on the counts (char) or on a sample of at most
    tokenizer.train_chars characters (bpe, word), and the chunks are encoded in worker processes.
    `launcher="spark"` reads the source files and encodes the chunks in Spark tasks instead
    (`hanlm.data.spark_prepare`); the shards are byte for byte the same.

    With tokenizer.bpe_dropout > 0 (bpe only), the train documents are encoded tokenizer.dropout_copies
    more times, skipping that share of BPE merges (`BpeTokenizer.with_dropout`), into the splits
    `train-dropout-1` … (always in local processes); training reads copy e mod K in epoch e, and the
    plain `train` split stays for everything else. Hugging Face draws the skipped merges from its own
    unseeded RNG, so these copies, unlike every other shard, differ between two prepares; they are
    stored, so a run (and its resume) reads the same ones.
    """
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
        if launcher == "spark":
            spools, stats = spark_prepare.spool(cfg, train_reader, val_reader, tmp)
        else:
            spools = _split_documents(train_reader, val_reader, cfg, tmp, progress)
            stats = train_reader.stats
        if "tune" in spools and spools["tune"].documents == 0:  # too little data for one: hanlm mix says so
            spools.pop("tune").remove()
        for split, spool in spools.items():
            if spool.documents == 0:
                raise _empty_split_error(split, cfg)
        tokenizer = _tokenizer(cfg, spools["train"])
        dropout, copies = cfg.tokenizer.bpe_dropout, cfg.tokenizer.dropout_copies
        if dropout:
            tokenizer.with_dropout(dropout)  # a tokenizer.path that is not bpe is refused before any encoding
        tokenizer.save(tmp / "tokenizer.json")
        dtype = token_dtype(tokenizer.vocab_size)
        workers = cfg.data.num_workers or os.cpu_count() or 1

        def write(split: str, spool: DocumentSpool, encoded: Iterable[tuple[np.ndarray, int, int]]) -> dict[str, Any]:
            writer = ShardWriter(tmp, split, dtype, cfg.data.shard_tokens)
            try:
                with tqdm(total=spool.characters, desc=f"encode {split}", unit=" chars", unit_scale=True,
                          disable=not progress, leave=False) as bar:
                    for ids, chars, docs in encoded:
                        writer.write(ids, chars, docs)
                        bar.update(chars)
            finally:
                entry = writer.close()
            return entry | {"unigram_bpc": spool.unigram_bpc()}

        splits = {}
        for split, spool in spools.items():
            splits[split] = write(split, spool, spark_prepare.encode(spool, tmp) if launcher == "spark" else
                                  _encode(spool, tmp / "tokenizer.json", workers))
            if not (dropout and split == "train"):  # the train spool stays for its dropout copies
                spool.remove()
        if dropout:
            for k in range(1, copies + 1):
                splits[dropout_split(k)] = write(dropout_split(k), spools["train"],
                                                 _encode(spools["train"], tmp / "tokenizer.json", workers, dropout))
            spools["train"].remove()
        meta = {
            "format": FORMAT_VERSION, "key": key, "hanlm_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_kind": tokenizer.kind, "tokenizer_hash": tokenizer.fingerprint(),
            "distinct_characters": int(np.count_nonzero(spools["train"].counts)),
            "text_bytes": sum(s.bytes for s in spools.values()),
            "sources": {"train": train_reader.fingerprints(),
                        "val": val_reader.fingerprints() if val_reader else "held out from train"},
            "val_fraction": None if val_reader else cfg.data.val_fraction,
            "tune_fraction": cfg.data.tune_fraction,
            "read_report": stats.summary(),
            "splits": splits,
        }
        if dropout:
            meta["bpe_dropout"] = {"p": dropout, "copies": copies}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return Prepared(directory, meta, reused=False, seconds=time.perf_counter() - start)


def _split_documents(train: DocumentReader, val: DocumentReader | None, cfg: Config, tmp: Path,
                     progress: bool) -> dict[str, DocumentSpool]:
    """Read every source once, spooling each split's documents to disk."""
    spools = {s: DocumentSpool(tmp, s) for s in split_names(cfg.data.tune_fraction)}
    val_fraction = 0.0 if val is not None else cfg.data.val_fraction
    try:
        with tqdm(desc="read", unit=" docs", disable=not progress, leave=False) as bar:
            for doc in train:
                spools[split_of(doc, val_fraction, cfg.data.tune_fraction)].add(doc)
                bar.update()
            for doc in val or ():
                spools["val"].add(doc)
                bar.update()
    finally:
        for spool in spools.values():
            spool.close()
    return spools


def _tokenizer(cfg: Config, train: DocumentSpool) -> Tokenizer:
    """The tokenizer the shards are encoded with: tokenizer.path, else one trained on the train split
    (char: from its character counts; bpe and word: see `training_sample`)."""
    t = cfg.tokenizer
    if t.path:
        return Tokenizer.load(t.path)
    if t.kind == "char":
        return char_tokenizer_from_counts(train.character_counts(), t.min_freq, t.byte_fallback)
    return train_tokenizer(t.kind, training_sample(train.texts(), train.characters, t.train_chars),
                           vocab_size=t.vocab_size, min_freq=t.min_freq, split_digits=t.split_digits,
                           segmenter=t.segmenter, byte_fallback=t.byte_fallback)


def training_sample(docs: Iterable[str], characters: int, cap: int) -> Iterator[str]:
    """The documents a bpe or word tokenizer trains on: all of them when they hold at most `cap`
    characters (or cap is 0), else those a salted hash picks at the rate that gives about `cap`,
    stopping at `cap`. The pick depends on each document alone, so it spreads over the whole split,
    and any order of reading (one process, Spark partitions) picks the same documents."""
    if not cap or characters <= cap:
        yield from docs
        return
    threshold, taken = cap / characters * 1_000_000, 0
    for doc in docs:
        if text_bucket(doc, b"tokenizer-sample") < threshold:
            if taken + len(doc) > cap:
                return
            taken += len(doc)
            yield doc


def _empty_split_error(split: str, cfg: Config) -> DataError:
    how = ("data.val_source gave no documents" if cfg.data.val_source
           else f"data.val_fraction={cfg.data.val_fraction} held out no document")
    return DataError(f"the {split} split is empty: {how if split == 'val' else 'every document went to val or tune'}; "
                     "add data or change data.val_fraction")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(path: str, segmenters: SegmenterLoader | None = None, dropout: float = 0.0) -> None:
    global _worker_tokenizer
    if segmenters is not None:  # a spawned worker has not imported the module that plugs it in
        plug_segmenter_loader(segmenters)
    _worker_tokenizer = Tokenizer.load(path)
    if dropout:
        _worker_tokenizer = _worker_tokenizer.with_dropout(dropout)


def _encode_chunk(paths: tuple[Path, Path], chunk: tuple[int, int, int, int]) -> tuple[np.ndarray, int, int]:
    """(token ids, characters, documents) of one spool chunk, each document followed by <eos>."""
    docs = read_chunk(*paths, chunk)
    return _worker_tokenizer.encode_documents(docs), sum(map(len, docs)), len(docs)


def _encode(spool: DocumentSpool, tokenizer_path: Path, workers: int,
            dropout: float = 0.0) -> Iterator[tuple[np.ndarray, int, int]]:
    """Encode the spool's chunks in order (with BPE-dropout `dropout`, when > 0). The first runs here and
    is timed: when the rest would take long enough to repay starting processes, they go to a pool of
    `workers`."""
    _init_worker(str(tokenizer_path), dropout=dropout)
    chunks, paths = spool.chunks, (spool.text_path, spool.lengths_path)
    if not chunks:
        return
    t0 = time.perf_counter()
    yield _encode_chunk(paths, chunks[0])
    rest = chunks[1:]
    if workers > 1 and (time.perf_counter() - t0) * len(rest) > POOL_WORTH_SECONDS:
        # spawn, not fork: the parent may hold torch or tokenizers thread pools that fork breaks.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker,
                      initargs=(str(tokenizer_path), segmenter_loader(), dropout)) as pool:
            yield from pool.imap(functools.partial(_encode_chunk, paths), rest)
    else:
        for chunk in rest:
            yield _encode_chunk(paths, chunk)
