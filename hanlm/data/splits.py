"""Which side of a deterministic split a text falls on: a stable hash of the text itself, so a repeated
document always lands on the same side, whatever the order or process that reads it."""

from __future__ import annotations

import hashlib


def text_bucket(doc: str, salt: bytes = b"") -> int:
    """A stable hash of a text, in 0 .. 999,999: what every deterministic split cuts on, so a repeated
    document always lands on the same side. A `salt` gives an independent hash for another cut."""
    digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
    return int.from_bytes(digest, "little") % 1_000_000


def is_val(doc: str, val_fraction: float) -> bool:
    """Whether a document belongs to the val split (by `text_bucket`)."""
    return text_bucket(doc) < val_fraction * 1_000_000
