"""What an attacker leaves in a checkpoint: a pickle that runs a command when unpickled, and a
manifest rewritten to match the planted files (so that the loaders themselves must be safe)."""

import json
import os
import pickle
from pathlib import Path

from hanlm.manifest import MANIFEST, sha256_file


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker)))


def rewrite_manifest(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"] = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest))
