"""Model formats of other ecosystems: Hugging Face (`hf`) and llama.cpp's GGUF (`gguf`)."""

from __future__ import annotations

from pathlib import Path

from hanlm.export.gguf_export import export_gguf
from hanlm.export.hf import export_hf

FORMATS = ("hf", "gguf")


def export(spec: str, fmt: str, out: str | Path, dtype: str = "f32", force: bool = False) -> Path:
    """Write the checkpoint `spec` in format `fmt` to `out` (gguf: matrices in `dtype`); returns what was
    written. Nothing is written over the checkpoint itself, over what is not a regular file (gguf) or a
    directory (hf), or (hf, unless `force`) over a directory that holds anything (`hanlm.export.target`)."""
    if fmt == "gguf":
        return export_gguf(spec, out, dtype)
    return export_hf(spec, out, force)
