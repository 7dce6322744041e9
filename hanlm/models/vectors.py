"""Pretrained word or character vectors (word2vec / fastText / Tencent AI Lab) → embedding rows.

Formats, optionally gzip-compressed (recognised by its magic bytes, whatever the name):
- text: a header line "count dim", then "token v1 ... vdim" per line;
- binary (word2vec): the header line, then per entry the token's UTF-8 bytes, a space,
  dim little-endian float32 and an optional "\\n".
The format is sniffed, not taken from the extension: a file is text when the bytes after its
header are UTF-8 without control characters; raw float32 bytes practically never are.

The file is streamed (Tencent's is 6 GB) and only the vocabulary's vectors are kept. Reading
stops once every token has been found. Lines of tokens outside the vocabulary are skipped
without parsing their numbers, so a damaged line there goes unnoticed; it would not be used.
"""

from __future__ import annotations

import codecs
import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from hanlm.data.tokenizer import BYTE_TOKENS, SPECIAL_TOKENS, BpeTokenizer, Tokenizer
from hanlm.errors import ConfigError, DataError

_SNIFF_BYTES = 4096


@dataclass
class VectorReport:
    """What `load_vectors` found: how much of the vocabulary got a pretrained vector."""

    path: str
    dim: int
    vectors_in_file: int  # as the header says
    tokens_covered: int  # embedding rows filled from the file
    vocab_size: int  # the tokenizer's, specials included

    @property
    def coverage(self) -> float:
        """Share of the non-special tokens that got a vector."""
        return self.tokens_covered / max(1, self.vocab_size - len(SPECIAL_TOKENS))

    def summary(self) -> str:
        """One line for the training log."""
        return (f"loaded {self.tokens_covered:,} of {self.vocab_size - len(SPECIAL_TOKENS):,} tokens "
                f"({self.coverage:.1%}) from {Path(self.path).name} ({self.dim}-d, "
                f"{self.vectors_in_file:,} vectors)")


def load_vectors(path: str | Path, tokenizer: Tokenizer, embedding: nn.Embedding) -> VectorReport:
    """Copy the vector of every vocabulary token found in `path` into its row of `embedding`.

    Rows without a vector keep their values. ConfigError if the file's dimension is not the
    embedding's; DataError (naming the file and the line or entry) if it is missing or malformed.
    """
    path = Path(path)
    n_embd = embedding.embedding_dim
    assert embedding.num_embeddings >= tokenizer.vocab_size, "the embedding is smaller than the vocabulary"
    with _open(path) as f:
        count, dim = _read_header(f, path)
        binary = not _looks_like_text(f.read(_SNIFF_BYTES))
    if dim != n_embd:
        raise ConfigError(f"{path}: the vectors are {dim}-d but model.n_embd is {n_embd}; set "
                          f"model.n_embd={dim} (with a model.n_head that divides it) or use {n_embd}-d vectors")
    wanted = _token_ids(tokenizer)
    found: dict[int, np.ndarray] = {}
    with _open(path) as f:
        f.readline()  # the header, read above
        for token, parse in (_binary_entries if binary else _text_entries)(f, path, count, dim):
            ids = wanted.pop(token, None)  # pop: a repeated token keeps its first vector
            if ids is not None:
                vec = parse()
                found.update((i, vec) for i in ids)
                if not wanted:
                    break
    if found:
        vectors = torch.from_numpy(np.stack(list(found.values())).astype(np.float32))  # (n, dim), native order
        with torch.no_grad():
            embedding.weight[torch.tensor(list(found))] = vectors.to(embedding.weight)
    return VectorReport(path=str(path), dim=dim, vectors_in_file=count, tokens_covered=len(found),
                        vocab_size=tokenizer.vocab_size)


def _token_ids(tokenizer: Tokenizer) -> dict[bytes, list[int]]:
    """UTF-8 text of each non-special token → its ids (bpe: " 中国" and "中国" share a vector)."""
    wanted: dict[bytes, list[int]] = {}
    first = len(SPECIAL_TOKENS) + (len(BYTE_TOKENS) if getattr(tokenizer, "byte_fallback", False) else 0)
    for i in range(first, tokenizer.vocab_size):  # byte-fallback ids spell no word: they get no vector
        if isinstance(tokenizer, BpeTokenizer):
            # A byte-level token can be part of a character; that decodes to U+FFFD and has no vector.
            text = tokenizer.decode([i]).strip()
            if not text or "\ufffd" in text:
                continue
        else:
            text = tokenizer.vocab[i]
        wanted.setdefault(text.encode("utf-8"), []).append(i)
    return wanted


def _open(path: Path) -> BinaryIO:
    if Path(path).exists() and not Path(path).is_file():  # /dev/zero, a FIFO or a directory would never end
        raise DataError(f"{path}: model.vectors must be a regular file (word2vec text or binary)")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the vectors file ({e.strerror or e}); check model.vectors") from None
    if f.peek(2)[:2] == b"\x1f\x8b":  # gzip's magic number
        f.close()
        return gzip.open(path, "rb")
    return f


def _read_header(f: BinaryIO, path: Path) -> tuple[int, int]:
    line = f.readline()
    try:
        count, dim = (int(v) for v in line.split())
    except ValueError:
        raise DataError(f"{path}, line 1: expected the header 'count dim', got {line[:80]!r}; a file "
                        "without one (GloVe) needs it added") from None
    return count, dim


def _looks_like_text(head: bytes) -> bool:
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last char is fine
    except UnicodeDecodeError:
        return False
    return not any(c < " " and c not in "\t\r\n" for c in text)


# (token, parse): parse() returns the vector, so lines of tokens nobody wants are never parsed.
Entries = Iterator[tuple[bytes, Callable[[], np.ndarray]]]


def _text_entries(f: BinaryIO, path: Path, count: int, dim: int) -> Entries:
    n = 0
    for lineno, line in enumerate(f, start=2):
        token, _, rest = line.partition(b" ")
        if not token.strip():
            continue  # a blank line
        n += 1
        yield token, partial(_parse_line, line, rest, dim, f"{path}, line {lineno}")
    if n != count:
        raise DataError(f"{path}: the header announces {count:,} vectors but the file holds {n:,}; "
                        "it may be truncated (download it again) or its header is wrong")


def _parse_line(line: bytes, rest: bytes, dim: int, where: str) -> np.ndarray:
    try:
        vec = np.array(rest.split(), dtype=np.float32)
    except ValueError:
        vec = None
    if vec is None or vec.shape != (dim,):
        raise DataError(f"{where}: expected a token and {dim} numbers, got "
                        f"{line[:80].decode('utf-8', 'replace')!r}")
    return vec


def _binary_entries(f: BinaryIO, path: Path, count: int, dim: int) -> Entries:
    size = 4 * dim
    buf, pos = b"", 0
    for index in range(count):
        while (end := buf.find(b" ", pos)) < 0 or len(buf) - end - 1 < size:
            more = f.read(1 << 20)
            if not more:
                raise DataError(f"{path}: the file ends inside entry {index} of {count:,} (binary word2vec "
                                "format); it may be truncated, download it again (a text file must be UTF-8)")
            buf, pos = buf[pos:] + more, 0
        token, data = buf[pos:end].lstrip(b"\n"), buf[end + 1:end + 1 + size]  # "\n" ends the previous entry
        pos = end + 1 + size
        yield token, partial(np.frombuffer, data, dtype="<f4")
