"""Model formats of other ecosystems: Hugging Face (`hf`)."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("hf",)


def export(spec: str, fmt: str, out: str | Path) -> Path:
    """Write the checkpoint `spec` in format `fmt` to `out`; returns what was written."""
    from hanlm.export.hf import export_hf

    return {"hf": export_hf}[fmt](spec, out)
