"""Nested training state (optimizer, loader, sync, RNG) in one safetensors file, without pickle.

`torch.save` pickles, and unpickling a crafted file can run code. Here the tensors go into a
safetensors file and everything else into a JSON skeleton stored in its header metadata:
dicts (with their key types), lists, tuples, strings, numbers (inf and nan too), booleans,
None. Loading parses JSON and raw tensor bytes; nothing in the file can name code to run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_TREE_KEY = "hanlm.state"  # the metadata entry that holds the skeleton
_FORMAT = 1


class StateFormatError(ValueError):
    """The file is not a state file this module wrote, or its skeleton is malformed."""


def save_state(state: Any, path: str | Path) -> None:
    """Write `state` (nested dicts / lists / tuples of tensors and plain values) to `path`."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            t = value.detach().contiguous()
            # safetensors refuses two names over one storage: copy a tensor whose memory is already stored.
            key = t.untyped_storage().data_ptr() if t.numel() else -len(tensors) - 1
            tensors[name] = t.clone() if key in seen else t
            seen.add(key)
            return {"tensor": name}
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, int):
            return {"int": str(value)}  # JSON readers differ on big integers; a string is exact
        if isinstance(value, float):
            return {"float": repr(value)} if not math.isfinite(value) else value
        if isinstance(value, tuple):
            return {"tuple": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
        raise TypeError(f"cannot store a {type(value).__name__} in a state file")

    skeleton = encode(state)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path),
              metadata={_TREE_KEY: json.dumps({"format": _FORMAT, "state": skeleton})})


def load_state(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a file `save_state` wrote; StateFormatError (or SafetensorError) when it is not one."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if _TREE_KEY not in meta:
        raise StateFormatError(f"no `{_TREE_KEY}` entry in its header")
    try:
        header = json.loads(meta[_TREE_KEY])
    except (ValueError, RecursionError) as e:
        raise StateFormatError(f"its skeleton is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise StateFormatError(f"unknown state format {header.get('format') if isinstance(header, dict) else header!r}")

    def decode(node: Any) -> Any:
        if node is None or isinstance(node, bool | str | int | float):
            return node
        if isinstance(node, list):
            return [decode(v) for v in node]
        if isinstance(node, dict) and len(node) == 1:
            (kind, value), = node.items()
            if kind == "tensor" and value in tensors:
                return tensors[value]
            if kind == "int" and isinstance(value, str):
                return int(value)
            if kind == "float" and value in ("inf", "-inf", "nan"):
                return float(value)
            if kind == "tuple" and isinstance(value, list):
                return tuple(decode(v) for v in value)
            if kind == "dict" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
                return {decode(k): decode(v) for k, v in value}
        raise StateFormatError(f"unexpected node {str(node)[:80]!r} in its skeleton")

    try:
        return decode(header.get("state"))
    except (TypeError, ValueError, RecursionError) as e:  # e.g. a list as a dict key, a 10,000-digit int
        raise StateFormatError(f"its skeleton is malformed ({type(e).__name__}: {e})") from None
