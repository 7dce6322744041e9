"""A checkpoint's manifest: the size and sha256 of every file in it, written last, checked on load.

A flipped byte in the weights or the training state would otherwise load without a word and
show up only as a loss that explodes. `manifest.json` is written after every other file and
before the directory gets its final name, so a checkpoint with a manifest that matches is
exactly what was saved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hanlm.errors import CheckpointError

MANIFEST = "manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, **info: Any) -> None:
    """Hash every file under `directory` into its manifest.json; `info` (step, val_loss, …) goes with it."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(directory)}
    (directory / MANIFEST).write_text(json.dumps({"format": _FORMAT, **info, "files": files}, indent=1) + "\n",
                                      encoding="utf-8")


def listed(directory: Path, label: str) -> set[str]:
    """The files the manifest of `directory` lists (empty when it has none)."""
    manifest = read_manifest(directory, label)
    return set(manifest["files"]) if manifest else set()


def read_manifest(directory: Path, label: str) -> dict[str, Any] | None:
    """The manifest of the checkpoint in `directory` (None when it has none); CheckpointError when it
    is unreadable. `label` names the checkpoint in messages."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("not a hanlm manifest")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{label}/{MANIFEST} is damaged ({type(e).__name__}: {e})") from None
    return manifest


def verify(directory: Path, label: str, required: Sequence[str] = ()) -> bool:
    """Check every file the manifest lists against its size and sha256, and that it lists each file of
    `required` (what the loader will read: a file it omits would load unchecked). False when the
    checkpoint has no manifest (saved by an older hanlm); CheckpointError naming the first file that
    differs or is not covered."""
    manifest = read_manifest(directory, label)
    if manifest is None:
        return False
    for name in required:
        if name not in manifest["files"]:
            raise CheckpointError(f"{label}/{MANIFEST} does not list {name}, which the checkpoint holds and the "
                                  "loader reads: its contents cannot be checked, so it is refused (the manifest "
                                  "was edited or written by something else)")
    for name, entry in manifest["files"].items():
        path = directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"{label}/{MANIFEST} names a file outside the checkpoint: {name!r}")
        if not path.is_file():
            raise CheckpointError(f"{label}/{name} is missing (the manifest lists it)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{label}/{name} is damaged: {size:,} bytes where {entry['size']:,} were saved"
                                  + (" (truncated)" if size < entry["size"] else ""))
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{label}/{name} is damaged: its contents differ from what was saved (sha256 "
                                  "mismatch with the manifest)")
    return True
