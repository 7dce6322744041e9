"""A checkpoint's GGUF for llama.cpp, written once per content under `$HANLM_HOME/gguf`
(`hanlm serve --engine llama.cpp`).

A file is named by a sha256 over everything it is written from: the checkpoint's weights as stored,
its model.* settings, its tokenizer's fingerprint, the dtype and the writer's `LAYOUT`; a file found
under that name is reused without building the model. The same checkpoint,
wherever it lies and whatever it is called, finds its file again; a checkpoint that changed in any
of these gets a new one. A file appears under its name only once complete (hanlm.atomic), so a
server killed mid-export leaves nothing that a later start would take for finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from hanlm.checkpoint import Checkpoint
from hanlm.data.corpora import hanlm_home
from hanlm.export.gguf_export import LAYOUT, gguf_weights, write_gguf


def gguf_cache_dir() -> Path:
    """Where the cached GGUF files live: `$HANLM_HOME/gguf`."""
    return hanlm_home() / "gguf"


def content_key(ckpt: Checkpoint, dtype: str) -> str:
    """sha256 hex over what a GGUF of `ckpt` is written from: its weights (name, dtype, shape and bytes of
    each), its model.* settings, its tokenizer's fingerprint, `dtype` and the writer's LAYOUT."""
    h = hashlib.sha256()
    settings = {"layout": LAYOUT, "dtype": dtype, "tokenizer": ckpt.tokenizer.fingerprint(),
                "model": dataclasses.asdict(ckpt.config.model)}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(ckpt.weights):
        tensor = ckpt.weights[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cached_gguf(ckpt: Checkpoint, dtype: str = "f32", directory: Path | None = None) -> tuple[Path, bool]:
    """The GGUF of the gpt language model in `ckpt` (one `export_gguf` accepts) with matrices in `dtype`,
    under `directory` (default `gguf_cache_dir()`), and whether it was written now (False: reused)."""
    path = (directory or gguf_cache_dir()) / f"{content_key(ckpt, dtype)[:32]}.{dtype}.gguf"
    if path.is_file():
        return path, False
    # One name for every copy of the checkpoint: the file's bytes depend only on what its name hashes.
    write_gguf(path, gguf_weights(ckpt), ckpt.config.model, ckpt.tokenizer, dtype, name="hanlm", source=ckpt.path)
    return path, True
