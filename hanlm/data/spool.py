"""Documents spooled to disk in chunks while the tokenizer is not known yet: the units that `hanlm
prepare` (locally or in Spark tasks) encodes in parallel, with their characters counted on the way."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Documents are encoded in chunks of about this many characters: big enough to amortise
# inter-process transfer, small enough to keep every worker busy.
CHUNK_CHARS = 1 << 18


class DocumentSpool:
    """One split's documents on disk while the tokenizer is not known yet: their UTF-8 text back to back in
    `<split>.text`, their lengths in characters in `<split>.lengths` (int64), cut into chunks of about
    CHUNK_CHARS characters, the units of parallel encoding; characters are counted as chunks are written."""

    def __init__(self, directory: Path, split: str):
        self.text_path, self.lengths_path = directory / f"{split}.text", directory / f"{split}.lengths"
        self._text, self._lengths = open(self.text_path, "wb"), open(self.lengths_path, "wb")
        self.chunks: list[tuple[int, int, int, int]] = []  # (byte offset, bytes, first document, documents)
        self.counts = np.zeros(0x110000, dtype=np.int64)  # occurrences of each codepoint
        self.documents = self.characters = self.bytes = 0
        self._pending: list[str] = []
        self._pending_chars = 0

    def add(self, doc: str) -> None:
        self._pending.append(doc)
        self._pending_chars += len(doc)
        if self._pending_chars >= CHUNK_CHARS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        data = text.encode("utf-8", "surrogatepass")  # a JSON source can hold lone surrogates
        self._text.write(data)
        self._lengths.write(np.fromiter(map(len, self._pending), np.int64, len(self._pending)).tobytes())
        self.chunks.append((self.bytes, len(data), self.documents, len(self._pending)))
        counted = np.bincount(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4"))
        self.counts[:len(counted)] += counted
        self.documents += len(self._pending)
        self.characters += self._pending_chars
        self.bytes += len(data)
        self._pending, self._pending_chars = [], 0

    def close(self) -> None:
        self._flush()
        self._text.close()
        self._lengths.close()

    def extend(self, part: dict[str, Any]) -> None:
        """Append another spool's documents, as `summary` described them (a Spark task's spool): its
        files are copied onto these, its chunks shifted past these and its counts added."""
        self._flush()
        with open(part["text_path"], "rb") as f:
            shutil.copyfileobj(f, self._text, 1 << 24)
        with open(part["lengths_path"], "rb") as f:
            shutil.copyfileobj(f, self._lengths, 1 << 24)
        self.chunks += [(offset + self.bytes, size, first + self.documents, n) for offset, size, first, n
                        in part["chunks"]]
        codepoints, counts = part["counts"]
        self.counts[np.asarray(codepoints, dtype=np.int64)] += np.asarray(counts, dtype=np.int64)
        self.documents += part["documents"]
        self.characters += part["characters"]
        self.bytes += part["bytes"]

    def summary(self) -> dict[str, Any]:
        """What `extend` needs to append this (closed) spool to another, as plain picklable values."""
        present = np.flatnonzero(self.counts)
        return {"text_path": str(self.text_path), "lengths_path": str(self.lengths_path), "chunks": self.chunks,
                "counts": (present.tolist(), self.counts[present].tolist()), "documents": self.documents,
                "characters": self.characters, "bytes": self.bytes}

    def remove(self) -> None:
        self.text_path.unlink(missing_ok=True)
        self.lengths_path.unlink(missing_ok=True)

    def character_counts(self) -> dict[str, int]:
        """Occurrences of each character (surrogates left out: no tokenizer file can spell them)."""
        present = np.flatnonzero(self.counts)
        return {chr(c): int(self.counts[c]) for c in present if not 0xD800 <= c < 0xE000}

    def unigram_bpc(self) -> float:
        """Bits per character of a unigram model fitted to these very counts, each document's <eos>
        counted as the line break it replaces: the baseline a language model's BPC should beat by far."""
        counts = self.counts.copy()
        counts[ord("\n")] += self.documents
        return unigram_entropy(counts)

    def texts(self) -> Iterator[str]:
        """Every spooled document, in order, a chunk in memory at a time."""
        for chunk in self.chunks:
            yield from read_chunk(self.text_path, self.lengths_path, chunk)


def read_chunk(text_path: Path, lengths_path: Path, chunk: tuple[int, int, int, int]) -> list[str]:
    """The documents of one spool chunk."""
    offset, size, first, count = chunk
    with open(text_path, "rb") as f:
        f.seek(offset)
        text = f.read(size).decode("utf-8", "surrogatepass")
    lengths = np.fromfile(lengths_path, dtype=np.int64, count=count, offset=first * 8)
    ends = np.cumsum(lengths).tolist()
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def unigram_entropy(counts: np.ndarray) -> float:
    """Bits per character of a unigram model fitted to these very counts (one per character)."""
    n = counts[counts > 0].astype(np.float64)
    p = n / n.sum()
    return float(-(p * np.log2(p)).sum())
