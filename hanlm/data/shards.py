"""Packed token shards: one flat array of token ids per split, plus `meta.json` beside them.

A prepared directory holds `train.bin`, `val.bin` (raw little-endian uint16 when the vocabulary
is under 65,536, else uint32; documents separated by `<eos>`), `tokenizer.json` and
`meta.json`, which records the dtype, vocabulary size, token/character/document counts,
source fingerprints and the tokenizer hash. `meta.json` is written last, so a directory
without it is never taken for a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hanlm.errors import DataError

FORMAT_VERSION = 2
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends token arrays to one split's file and counts what went in."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tokens = self.characters = self.documents = 0
        self._file = open(path, "wb")

    def write(self, ids: np.ndarray, characters: int, documents: int) -> None:
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.tokens += len(ids)
        self.characters += characters
        self.documents += documents

    def close(self) -> dict[str, Any]:
        """Flush and close; returns this split's entry for meta.json."""
        self._file.close()
        return {"file": self.path.name, "tokens": self.tokens, "characters": self.characters,
                "documents": self.documents}


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for the fields hanlm relies on."""
    path = Path(directory) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found: {directory} is not a prepared data directory; run `hanlm prepare`") \
            from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {directory} and run `hanlm prepare` again") from None
    missing = [k for k in ("format", "dtype", "vocab_size", "splits") if k not in meta]
    if missing or meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: not a format-{FORMAT_VERSION} meta.json (missing {missing or 'nothing'}, format "
                        f"{meta.get('format')}); run `hanlm prepare` again")
    return meta


def open_split(directory: str | Path, split: str) -> np.memmap:
    """The token ids of `split` as a read-only memmap, after checking its size against meta.json."""
    meta = read_meta(directory)
    if split not in meta["splits"]:
        raise DataError(f"{directory}: no split {split!r} (has {', '.join(meta['splits'])})")
    entry = meta["splits"][split]
    path = Path(directory) / entry["file"]
    dtype = np.dtype(meta["dtype"])
    expected = entry["tokens"] * dtype.itemsize
    size = path.stat().st_size if path.exists() else None
    if size != expected:
        raise DataError(f"{path}: {size if size is not None else 'missing'} bytes, meta.json promises {expected}; "
                        "the shard is damaged: run `hanlm prepare --force`")
    if entry["tokens"] == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r")
