"""Model saver: atomic checkpoints, retention, and resume with fallback past damaged ones.

A checkpoint is a directory `step-00000040/` under the checkpoint root (a local path or an
fsspec URL) holding:

    model.safetensors   the weights (tied tensors stored once), or
    model.arpa          the n-gram model, as a standard ARPA file
    config.yaml         the resolved config of the run
    tokenizer.json      the tokenizer
    train_state.pt      optimizer state, step, tokens seen, RNG states, data-loader state

It is assembled in a temporary directory and renamed (uploaded, for remote roots) before the
`latest` pointer moves to it, so a crash mid-save never leaves a checkpoint that `latest` names.
Loading never unpickles code: safetensors for weights, `torch.load(weights_only=True)` for the rest.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from hanlm.atomic import atomic_dir
from hanlm.config import Config, ModelConfig, load_config
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError, HanlmError
from hanlm.models.arpa import arpa_words, read_arpa, tokenizer_for, write_arpa
from hanlm.models.ngram import NGramLM

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILES = ("model.safetensors", "model.arpa")
FILES = ("config.yaml", "tokenizer.json", "train_state.pt")
ARPA_SUFFIXES = (".arpa", ".arpa.gz", ".arpa.bz2", ".arpa.xz", ".arpa.zst")


@dataclass
class Checkpoint:
    """A loaded checkpoint: everything but the model object, which the caller builds."""

    path: str
    config: Config
    tokenizer: Tokenizer
    weights: dict[str, torch.Tensor]  # empty for an n-gram checkpoint
    train_state: dict[str, Any]
    ngram: NGramLM | None = None  # the model itself, for an n-gram checkpoint

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", 0))


def _fs(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(root)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_dir(root: str, step: int) -> Path:
    """Where the checkpoint of `step` is assembled before its rename: a fixed name, so that every
    worker of a sharded run can write its part there. Local roots only."""
    return Path(_fs(root)[1]) / f".{step_name(step)}.tmp"


def save_checkpoint(root: str, model: torch.nn.Module | dict[str, torch.Tensor], cfg: Config, tokenizer: Tokenizer,
                    train_state: dict[str, Any], *, val_loss: float | None = None, staged: bool = False) -> str:
    """Write a checkpoint for `train_state["step"]`, move `latest` to it, update `best`, prune.

    `model` is the module, or its full state dict when it is sharded. `staged`: other workers
    have already written their parts into `staging_dir(root, step)`, which becomes the
    checkpoint. Returns the checkpoint's path. Retention: the newest `checkpoint.keep_last`,
    plus the one with the lowest val loss when `checkpoint.keep_best`.
    """
    fs, base = _fs(root)
    step = int(train_state["step"])
    name = step_name(step)
    local = not _is_remote(root)
    # Remote roots get the checkpoint assembled locally first, then uploaded whole.
    staging_parent = Path(base) if local else Path(tempfile.mkdtemp(prefix="hanlm-ckpt-"))
    final = staging_parent / name
    try:
        with atomic_dir(final, staging_dir(root, step) if staged else None) as tmp:
            if isinstance(model, NGramLM):
                write_arpa(model, arpa_words(tokenizer.token_strings()), tmp / "model.arpa")
            elif isinstance(model, dict):
                save_file(_dedupe(model), str(tmp / "model.safetensors"))
            else:
                save_model(_unwrap(model), str(tmp / "model.safetensors"))
            cfg.save(tmp / "config.yaml")
            tokenizer.save(tmp / "tokenizer.json")
            torch.save(train_state, tmp / "train_state.pt")
        if not local:
            fs.put(str(final), _join(base, name), recursive=True)
    finally:
        if not local:
            shutil.rmtree(staging_parent, ignore_errors=True)
    _write_pointer(fs, base, "latest", name)
    best = read_best(root)
    if val_loss is not None and (best is None or val_loss < best[1]):
        _write_pointer(fs, base, "best", f"{name} {val_loss!r}")
    _prune(fs, base, cfg.checkpoint.keep_last, keep_best=cfg.checkpoint.keep_best)
    return _join(root, name)


def _dedupe(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per storage: safetensors refuses tensors that share memory (tied weights)."""
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.contiguous()
    return out


def _is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers, so saved names never carry prefixes."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _write_pointer(fs: fsspec.AbstractFileSystem, base: str, pointer: str, text: str) -> None:
    tmp = _join(base, f".{pointer}.tmp")
    with fs.open(tmp, "w") as f:
        f.write(text + "\n")
    fs.mv(tmp, _join(base, pointer))


def _read_pointer(fs: fsspec.AbstractFileSystem, base: str, pointer: str) -> str | None:
    try:
        with fs.open(_join(base, pointer), "r") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def read_best(root: str) -> tuple[str, float] | None:
    """(checkpoint name, val loss) of the best checkpoint so far, if any."""
    fs, base = _fs(root)
    text = _read_pointer(fs, base, "best")
    if not text:
        return None
    name, _, loss = text.partition(" ")
    return name, float(loss)


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint names under `root`, oldest first."""
    return _list(*_fs(root))


def _list(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    try:
        entries = fs.ls(base, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if _STEP_DIR.match(n))


def _prune(fs: fsspec.AbstractFileSystem, base: str, keep_last: int, keep_best: bool) -> None:
    names = _list(fs, base)
    keep = set(names[-keep_last:])
    best = _read_pointer(fs, base, "best") if keep_best else None
    if best:
        keep.add(best.partition(" ")[0])
    for n in names:
        if n not in keep:
            fs.rm(_join(base, n), recursive=True)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read one checkpoint directory; CheckpointError naming the damaged file if anything is off."""
    fs, base = _fs(path)
    model_file = stored_model_file(path)
    for f in (model_file or MODEL_FILES[0], *FILES):
        if not fs.exists(_join(base, f)):
            raise CheckpointError(f"{_join(path, f)} is missing: {path} is not a complete checkpoint")
    weights: dict[str, torch.Tensor] = {}
    ngram = None
    with tempfile.TemporaryDirectory(prefix="hanlm-load-") as tmp:
        local = base if not _is_remote(path) else _download(fs, base, tmp)
        current = ""
        try:
            current = "config.yaml"
            config = load_config(os.path.join(local, current))
            current = "tokenizer.json"
            tokenizer = Tokenizer.load(os.path.join(local, current))
            current = model_file
            if model_file == "model.arpa":
                ngram, _ = read_arpa(os.path.join(local, current), arpa_words(tokenizer.token_strings()))
            else:
                weights = load_file(os.path.join(local, current), device=str(map_location))
            current = "train_state.pt"
            train_state = torch.load(os.path.join(local, current), map_location=map_location, weights_only=True)
        except (HanlmError, SafetensorError, OSError, RuntimeError, EOFError, ValueError, KeyError,
                pickle.UnpicklingError) as e:
            raise CheckpointError(f"{_join(path, current)} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(train_state, dict) or "step" not in train_state:
        raise CheckpointError(f"{_join(path, 'train_state.pt')} holds no training state")
    return Checkpoint(path, config, tokenizer, weights, train_state, ngram)


def stored_model_file(path: str) -> str | None:
    """Which of MODEL_FILES the checkpoint at `path` holds (None: neither)."""
    fs, base = _fs(path)
    return next((f for f in MODEL_FILES if fs.exists(_join(base, f))), None)


def _download(fs: fsspec.AbstractFileSystem, base: str, tmp: str) -> str:
    fs.get(base.rstrip("/") + "/", tmp, recursive=True)
    return tmp


def resolve_checkpoint(spec: str) -> str:
    """A checkpoint directory from a path that is either a checkpoint or a checkpoint root
    (then its `latest`)."""
    fs, base = _fs(spec)
    if stored_model_file(spec):
        return spec
    name = _read_pointer(fs, base, "latest")
    if name is None:
        raise CheckpointError(f"{spec} is neither a checkpoint (no model.safetensors or model.arpa) nor a "
                              "checkpoint directory with a `latest` pointer")
    return _join(spec, name)


def load_latest(root: str, map_location: str | torch.device = "cpu",
                warn: Any = print) -> Checkpoint | None:
    """The newest loadable checkpoint under `root`, or None when there is none.

    Starts at `latest` and walks back through older ones when a checkpoint is damaged,
    reporting each one it skips through `warn`.
    """
    fs, base = _fs(root)
    names = _list(fs, base)
    latest = _read_pointer(fs, base, "latest")
    if latest in names:
        names = names[: names.index(latest) + 1]
    for name in reversed(names):
        try:
            return load_checkpoint(_join(root, name), map_location)
        except CheckpointError as e:
            warn(f"skipping damaged checkpoint: {e}")
    return None


def load_for_inference(spec: str, device: str | torch.device = "cpu"):
    """(model in eval mode, config, tokenizer) from a checkpoint, a checkpoint root, or an ARPA
    file written by any tool (its words become the vocabulary; see `tokenizer_for`)."""
    from hanlm.models import build_model

    if spec.endswith(ARPA_SUFFIXES):
        model, words = read_arpa(spec)
        cfg = load_config(overrides=["model.arch=ngram", f"model.order={model.order}"])
        return model.eval(), cfg, tokenizer_for(words)
    ckpt = load_checkpoint(resolve_checkpoint(spec), device)
    if ckpt.ngram is not None:
        return ckpt.ngram.eval(), ckpt.config, ckpt.tokenizer
    model = build_model(_without_vectors(ckpt.config), ckpt.tokenizer.vocab_size)
    load_weights(model, ckpt.weights, ckpt.path)
    return model.to(device).eval(), ckpt.config, ckpt.tokenizer


def _without_vectors(cfg: Config) -> ModelConfig:
    """The model config minus pretrained vectors: a checkpoint's weights already hold them."""
    return dataclasses.replace(cfg.model, vectors=None)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpoint weights into `model`; tied tensors saved once fill both names."""
    model = _unwrap(model)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit this model ({e})") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    # safetensors stores a tied tensor under one name; loading it fills the other names too.
    stored = {id(params[k]) for k in weights if k in params}
    missing = [k for k in missing if k not in params or id(params[k]) not in stored]
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); was it saved from another model.arch or shape?")
