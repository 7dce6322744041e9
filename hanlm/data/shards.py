"""Packed token shards: the token ids of each split in one or more flat files, with `meta.json` beside them.

A prepared directory holds `train.bin` and `val.bin` (raw little-endian uint16 when the vocabulary
is under 65,536, else uint32; documents separated by `<eos>`; `tune.bin` too, and with BPE-dropout
`train-dropout-1.bin` …, other encodings of the train documents), `tokenizer.json` and `meta.json`,
which records the dtype, vocabulary size, token/character/document counts, source fingerprints
and the tokenizer hash. A split of more than `data.shard_tokens` tokens is written as
`train-00000.bin`, `train-00001.bin`, …; meta.json lists the files and their token counts in
order (the index), and `open_split` memory-maps them all as one array. `meta.json` is written
last, so a directory without it is never taken for a finished one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hanlm.errors import DataError

FORMAT_VERSION = 3
SPLITS = ("train", "val", "tune")


def dropout_split(copy: int) -> str:
    """The name of the train split's BPE-dropout encoding number `copy` (1, 2, …), which prepare writes
    when tokenizer.bpe_dropout > 0."""
    return f"train-dropout-{copy}"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays to one split's files, starting a new file every `max_tokens` tokens, and
    counts what went in. A split that fits one file is named `<split>.bin`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_tokens: int = 1 << 62):
        self.directory, self.split, self.dtype, self.max_tokens = Path(directory), split, dtype, max_tokens
        self.tokens = self.characters = self.documents = 0
        self.files: list[dict[str, Any]] = []  # {"file", "tokens"} of each file, in order
        self._file = None

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append({"file": name, "tokens": 0})
        self._file = open(self.directory / name, "wb")

    def write(self, ids: np.ndarray, characters: int, documents: int) -> None:
        """Append `ids` (which encode `documents` documents of `characters` characters)."""
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        while len(data):
            if self._file is None or self.files[-1]["tokens"] == self.max_tokens:
                self._open_next()
            room = self.max_tokens - self.files[-1]["tokens"]
            self._file.write(data[:room].tobytes())
            self.files[-1]["tokens"] += min(room, len(data))
            data = data[room:]
        self.tokens += len(ids)
        self.characters += characters
        self.documents += documents

    def close(self) -> dict[str, Any]:
        """Flush and close; returns this split's entry for meta.json."""
        if self._file is None:
            self._open_next()  # an empty split still has its (empty) file
        self._file.close()
        if len(self.files) == 1:
            single = f"{self.split}.bin"
            os.replace(self.directory / self.files[0]["file"], self.directory / single)
            self.files[0]["file"] = single
        return {"files": self.files, "tokens": self.tokens, "characters": self.characters,
                "documents": self.documents}


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for the fields hanlm relies on."""
    path = Path(directory) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: {directory} is not a prepared data directory; run `hanlm prepare`") \
            from None
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {directory} and run `hanlm prepare` again") from None
    missing = [k for k in ("format", "dtype", "vocab_size", "splits") if k not in meta] if isinstance(meta, dict) \
        else ["everything"]
    if missing or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{path}: not a format-{FORMAT_VERSION} meta.json (missing {missing or 'nothing'}, format "
                        f"{found}); run `hanlm prepare` again")
    return meta


class TokenShards:
    """Several shard files read as one flat, read-only token array: `len`, slices and integer-array
    indexing of any shape, as the loader and the evaluator use a memmap; `np.asarray` copies it all."""

    ndim = 1

    def __init__(self, parts: list[np.memmap]):
        self.parts = parts
        self.dtype = parts[0].dtype
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # (n_parts + 1,) token offset of each file
        self.shape = (int(self.starts[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return np.asarray(self)[index]
            return self._gather(np.arange(start, stop, dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token index {index} out of range for {len(self)} tokens")
            return self._gather(np.array([i]))[0]
        return self._gather(np.asarray(index, dtype=np.int64))

    def _gather(self, flat_or_shaped: np.ndarray) -> np.ndarray:
        idx = flat_or_shaped.reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token indices outside 0..{len(self) - 1}")
        part = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty(len(idx), dtype=self.dtype)
        for p in np.unique(part):
            where = part == p
            out[where] = self.parts[p][idx[where] - self.starts[p]]
        return out.reshape(flat_or_shaped.shape)


def open_train_copies(directory: str | Path) -> list[np.ndarray | TokenShards]:
    """What training reads, one array per epoch of a cycle: the train split's BPE-dropout encodings
    (`train-dropout-1` … `train-dropout-K`; epoch e reads copy e mod K) where prepare wrote them, else
    the train split alone."""
    splits = read_meta(directory)["splits"]
    copies = [dropout_split(k) for k in range(1, len(splits) + 1) if dropout_split(k) in splits]
    return [open_split(directory, split) for split in copies or ["train"]]


def open_split(directory: str | Path, split: str) -> np.ndarray | TokenShards:
    """The token ids of `split`, memory-mapped read-only (one memmap, or a `TokenShards` over several
    files), after checking every file's size against meta.json."""
    meta = read_meta(directory)
    if split not in meta["splits"]:
        raise DataError(f"{directory}: no split {split!r} (has {', '.join(meta['splits'])})")
    dtype = np.dtype(meta["dtype"])
    entry = meta["splits"][split]
    files = entry.get("files")
    if not isinstance(files, list) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("file"), str) and isinstance(f.get("tokens"), int)
            and "/" not in f["file"] and f["tokens"] >= 0 for f in files):
        raise DataError(f"{Path(directory) / 'meta.json'}: split {split!r} has no valid file index; "
                        "run `hanlm prepare --force`")
    listed = sum(f["tokens"] for f in files)
    if listed != entry.get("tokens"):
        raise DataError(f"{Path(directory) / 'meta.json'}: the files of split {split!r} add up to {listed} tokens, "
                        f"not {entry.get('tokens')}; run `hanlm prepare --force`")
    parts = []
    for f in files:
        path = Path(directory) / f["file"]
        expected = f["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            raise DataError(f"{path}: {size if size is not None else 'missing'} bytes, meta.json promises {expected}; "
                            "the shard is damaged: run `hanlm prepare --force`")
        if f["tokens"]:
            parts.append(np.memmap(path, dtype=dtype, mode="r"))
    if not parts:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return parts[0] if len(parts) == 1 else TokenShards(parts)
