"""Model formats of other ecosystems: Hugging Face (`hf`) and llama.cpp's GGUF (`gguf`)."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("hf", "gguf")


def export(spec: str, fmt: str, out: str | Path, dtype: str = "f32") -> Path:
    """Write the checkpoint `spec` in format `fmt` to `out` (gguf: matrices in `dtype`); returns what was
    written."""
    if fmt == "gguf":
        from hanlm.export.gguf_export import export_gguf

        return export_gguf(spec, out, dtype)
    from hanlm.export.hf import export_hf

    return export_hf(spec, out)
