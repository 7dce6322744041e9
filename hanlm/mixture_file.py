"""The mixture file (`hanlm mix`'s mixture.json): where it is, how it is checked on reading, and the digest
that ties it to the exact parts it was tuned with. Writing it is `hanlm.mix`; loading the model it
describes is `hanlm.loading`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import fsspec

from hanlm.errors import CheckpointError
from hanlm.manifest import MANIFEST

MIXTURE_FILE = "mixture.json"
MIXTURE_FORMAT = "hanlm-mixture/1"


def is_mixture(spec: str) -> bool:
    """Whether `spec` is a mixture: a directory holding mixture.json, or that file."""
    try:
        path = Path(spec)
        return path.name == MIXTURE_FILE and path.is_file() or (path / MIXTURE_FILE).is_file()
    except (OSError, ValueError):
        return False


def mixture_file(spec: str) -> Path:
    path = Path(spec)
    return path if path.name == MIXTURE_FILE else path / MIXTURE_FILE


def manifest_digest(path: str) -> str | None:
    """sha256 of a checkpoint's manifest.json (None for an older checkpoint without one)."""
    try:
        with fsspec.open(f"{path.rstrip('/')}/{MANIFEST}", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:  # missing (an older checkpoint) or unreadable: loading the part says which
        return None


def read_mixture(spec: str) -> dict[str, Any]:
    """The checked contents of a mixture.json: errors name the file and the key."""
    path = mixture_file(spec)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(record, dict) or record.get("format") != MIXTURE_FORMAT:
        raise CheckpointError(f"{path} is not a hanlm mixture (its format is not {MIXTURE_FORMAT!r})")
    for part in ("neural", "ngram"):
        entry = record.get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise CheckpointError(f"{path}: {part}.path must be the path of the {part} checkpoint")
    weights = record.get("weights")
    if (not isinstance(weights, list) or not weights
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0.0 <= w <= 1.0 for w in weights)):
        raise CheckpointError(f"{path}: weights must be a list of numbers between 0 and 1, got {weights!r:.80}")
    return record
