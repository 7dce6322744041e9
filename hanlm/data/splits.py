"""Which side of a deterministic split a text falls on: a stable hash of the text itself, so a repeated
document always lands on the same side, whatever the order or process that reads it."""

from __future__ import annotations

import hashlib


def text_bucket(doc: str, salt: bytes = b"") -> int:
    """A stable hash of a text, in 0 .. 999,999: what every deterministic split cuts on, so a repeated
    document always lands on the same side. A `salt` gives an independent hash for another cut."""
    digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "little") % 1_000_000


def split_names(tune_fraction: float) -> tuple[str, ...]:
    """The splits prepare writes: train, val, and tune unless data.tune_fraction is 0."""
    return ("train", "val", "tune") if tune_fraction else ("train", "val")


def split_of(doc: str, val_fraction: float, tune_fraction: float) -> str:
    """The split of a training source's document, by `text_bucket`: "val" for the first `val_fraction` of the
    hash range (0 when the val text comes from sources of its own), "tune" for the next `tune_fraction` (held
    out of training for what is fitted after it: mixture weights, the best checkpoint), else "train"."""
    bucket = text_bucket(doc)
    if bucket < val_fraction * 1_000_000:
        return "val"
    return "tune" if bucket < (val_fraction + tune_fraction) * 1_000_000 else "train"
