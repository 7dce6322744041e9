"""Model saver: atomic, verified checkpoints, safe retention, and resume past damaged ones.

A checkpoint is a directory `step-00000040/` under the checkpoint root (a local path or an
fsspec URL) holding:

    model.safetensors         the weights (tied tensors stored once), or
    model.arpa                the n-gram model, as a standard ARPA file
    config.yaml               the resolved config of the run
    tokenizer.json            the tokenizer
    train_state.safetensors   optimizer state (all of it, gathered, for FSDP runs too), step, tokens
                              seen, RNG states, data-loader and sync state
    manifest.json             size and sha256 of each file above, written last

It is assembled in a temporary directory and renamed (uploaded, manifest last, for remote roots)
before the `latest` pointer moves to it, so a crash mid-save never leaves a checkpoint that
loads. Every load checks the manifest first. Loading never unpickles: safetensors for tensors,
JSON and YAML for the rest (`torch.load(weights_only=True)` only for the train_state.pt of
checkpoints from before the manifest). `probe_writable` checks a root before a run spends time on
steps it could not save.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file, save_model

from hanlm.atomic import atomic_dir, owner_tag, remove_stale_temporaries
from hanlm.config import Config, load_config
from hanlm.data.sources import filesystem
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError, ConfigError
from hanlm.manifest import MANIFEST, verify, write_manifest
from hanlm.mixture_file import MIXTURE_FILE
from hanlm.models.arpa import arpa_words, read_arpa, write_arpa
from hanlm.models.ngram import NGramLM
from hanlm.state_file import load_state, save_state

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILES = ("model.safetensors", "model.arpa")
FILES = ("config.yaml", "tokenizer.json")
STATE_FILE = "train_state.safetensors"
LEGACY_STATE = "train_state.pt"  # checkpoints written before the manifest
ARPA_SUFFIXES = (".arpa", ".arpa.gz", ".arpa.bz2", ".arpa.xz", ".arpa.zst")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


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
    """The filesystem of a checkpoint root; CheckpointError saying what to install or fix when its
    driver is missing, cannot start (HDFS without a JVM) or cannot reach the server."""
    return filesystem(root, CheckpointError)


def probe_writable(root: str) -> None:
    """Make the checkpoint root and write, read back and remove a small file in it, so that a root
    that cannot be written (a path under a file, no permission, an unreachable host, a missing
    driver) stops a run before its first step rather than at its first save. The probe file is
    named like every temporary (writer's host and pid), so one left by a killed run is cleaned up."""
    fs, base = _fs(root)
    probe = _join(base, f".probe.{owner_tag()}.w.tmp")
    try:
        fs.makedirs(base, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"hanlm")
        with fs.open(probe, "rb") as f:
            if f.read() != b"hanlm":
                raise OSError("the probe file read back differs from what was written")
        fs.rm(probe)
    # Drivers raise their own types (PermissionError, NotADirectoryError, paramiko's SFTPError-as-IOError,
    # botocore's ClientError): whichever it is, the message names the root and the cause.
    except Exception as e:
        raise CheckpointError(f"checkpoint directory {root} cannot be written ({type(e).__name__}: "
                              f"{str(e).strip() or 'no message'}); set checkpoint.dir to a directory this run "
                              "may write") from None


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: str, model: torch.nn.Module | dict[str, torch.Tensor], cfg: Config, tokenizer: Tokenizer,
                    train_state: dict[str, Any], *, val_loss: float | None = None, selected_on: str = "val",
                    protect: Iterable[str] = (), note: Callable[[str], None] = _note) -> str:
    """Write a checkpoint for `train_state["step"]`, move `latest` to it, update `best`, prune.

    `val_loss` is the loss that ranks checkpoints (lower is better), measured on the split named by
    `selected_on` (the manifest records both): `tune`, held out from training and from val, for language
    models prepared with one; `val` otherwise; `dev` for fine-tuned tasks (1 − their dev score).

    `model` is the module, or its full state dict when it is sharded. The manifest is written
    last, before the rename (for remote roots: uploaded last). Retention: the newest
    `checkpoint.keep_last` up to this step, plus the one with the lowest val loss when
    `checkpoint.keep_best`; never one newer than this step, one with a lower recorded val loss,
    or one named in `protect` (the checkpoint the run resumed from). Returns the checkpoint's path.
    """
    fs, base = _fs(root)
    step = int(train_state["step"])
    name = step_name(step)
    local = not _is_remote(root)
    # Remote roots get the checkpoint assembled locally first, then uploaded file by file.
    staging_parent = Path(base) if local else Path(tempfile.mkdtemp(prefix="hanlm-ckpt-"))
    final = staging_parent / name
    try:
        with atomic_dir(final) as tmp:
            if isinstance(model, NGramLM):
                write_arpa(model, arpa_words(tokenizer.token_strings()), tmp / "model.arpa")
            elif isinstance(model, dict):
                save_file(_dedupe(model), str(tmp / "model.safetensors"))
            else:
                save_model(_unwrap(model), str(tmp / "model.safetensors"))
            cfg.save(tmp / "config.yaml")
            tokenizer.save(tmp / "tokenizer.json")
            save_state(train_state, tmp / STATE_FILE)
            write_manifest(tmp, step=step, val_loss=val_loss, selected_on=selected_on)
        if not local:
            _upload(fs, final, _join(base, name))
    finally:
        if not local:
            shutil.rmtree(staging_parent, ignore_errors=True)
    _write_pointer(fs, base, "latest", name)
    best = _best(fs, base, note)
    if val_loss is not None and math.isfinite(val_loss) and (best is None or val_loss < best[1]):
        _write_pointer(fs, base, "best", f"{name} {val_loss!r}")
        best = (name, val_loss)
    keep = {_basename(p) for p in protect} | ({best[0]} if best and cfg.checkpoint.keep_best else set())
    _prune(fs, base, cfg.checkpoint.keep_last, written=name, val_loss=val_loss, protect=keep)
    return _join(root, name)


def _upload(fs: fsspec.AbstractFileSystem, local: Path, remote: str) -> None:
    """Copy a finished checkpoint directory to a remote root, its manifest last: a checkpoint whose
    upload broke off lacks its manifest (or files), so it never passes as a verified one."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST)
    for path in files:
        target = _join(remote, path.relative_to(local).as_posix())
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), target)


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
    """Replace a pointer file atomically: written beside it, then renamed over it."""
    tmp = _join(base, f".{pointer}.{owner_tag()}.w.tmp")
    with fs.open(tmp, "w") as f:
        f.write(text + "\n")
    fs.mv(tmp, _join(base, pointer))


def _read_pointer(fs: fsspec.AbstractFileSystem, base: str, pointer: str,
                  note: Callable[[str], None] = _note) -> str | None:
    """A pointer's text; None when it is missing or unreadable (garbage is noted and ignored)."""
    try:
        with fs.open(_join(base, pointer), "r", encoding="utf-8") as f:
            text = f.read(4096).strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        note(f"note: {_join(base, pointer)} is unreadable ({type(e).__name__}); ignored")
        return None
    return text or None


def read_best(root: str, note: Callable[[str], None] = _note) -> tuple[str, float] | None:
    """(checkpoint name, val loss) of the best checkpoint so far, if any. A pointer that is not
    `step-NNNNNNNN LOSS` is noted and ignored, as is one whose checkpoint is gone."""
    return _best(*_fs(root), note)


def _best(fs: fsspec.AbstractFileSystem, base: str, note: Callable[[str], None]) -> tuple[str, float] | None:
    text = _read_pointer(fs, base, "best", note)
    if not text:
        return None
    name, _, loss = text.partition(" ")
    try:
        value = float(loss)
        if not _STEP_DIR.match(name) or not math.isfinite(value):
            raise ValueError
    except ValueError:
        note(f"note: {_join(base, 'best')} holds {text[:60]!r}, not `step-NNNNNNNN LOSS`; ignored")
        return None
    if name not in _list(fs, base):
        return None
    return name, value


def selected_on(path: str) -> str:
    """The split whose loss ranked the checkpoint at `path` (its manifest's `selected_on`; `val` for
    checkpoints written before it was recorded, or when the manifest is unreadable)."""
    fs, base = _fs(path)
    try:
        with fs.open(_join(base, MANIFEST), "r", encoding="utf-8") as f:
            split = json.load(f).get("selected_on", "val")
    except (OSError, ValueError, AttributeError, RecursionError):
        return "val"
    return split if isinstance(split, str) else "val"


def list_checkpoints(root: str) -> list[str]:
    """Checkpoint names under `root`, oldest first."""
    return _list(*_fs(root))


def _list(fs: fsspec.AbstractFileSystem, base: str) -> list[str]:
    fs.invalidate_cache(base)  # object stores cache listings; another writer may have saved or pruned since
    try:
        entries = fs.ls(base, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if _STEP_DIR.match(n))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _prune(fs: fsspec.AbstractFileSystem, base: str, keep_last: int, *, written: str, val_loss: float | None,
           protect: set[str]) -> None:
    """Delete the checkpoints up to `written` beyond the newest `keep_last`, except those in `protect`
    (the best, the one resumed from) and those with a lower recorded val loss than `val_loss`."""
    names = _list(fs, base)
    older = [n for n in names if n <= written]  # zero-padded step numbers sort as numbers
    keep = {n for n in names if n > written} | set(older[-keep_last:]) | protect
    for n in older:
        if n in keep:
            continue
        if val_loss is not None and _recorded_loss(fs, _join(base, n)) < val_loss:
            continue  # better than the checkpoint just written: never pruned for it
        fs.rm(_join(base, n), recursive=True)


def _recorded_loss(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """The val loss a checkpoint's manifest recorded (inf when none is known)."""
    try:
        with fs.open(_join(path, MANIFEST), "r", encoding="utf-8") as f:
            loss = json.load(f).get("val_loss")
        return float(loss) if isinstance(loss, int | float) else math.inf
    except (OSError, ValueError, AttributeError, RecursionError):
        return math.inf


def load_checkpoint(path: str, map_location: str | torch.device = "cpu",
                    note: Callable[[str], None] = _note) -> Checkpoint:
    """Read one checkpoint directory, after checking its files against its manifest;
    CheckpointError naming the damaged file if anything is off, CheckpointGone when the directory
    disappeared while it was being read (retention pruned it). Nothing read here can run code.
    (Directories of other ecosystems are read by `hanlm.loading.open_checkpoint`.)"""
    _require_device(map_location)
    fs, base = _fs(path)
    if not fs.isdir(base):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    try:
        with tempfile.TemporaryDirectory(prefix="hanlm-load-") as tmp:
            local = Path(base if not _is_remote(path) else _download(fs, base, tmp))
            return _read_parts(local, path, map_location, note)
    except (CheckpointError, OSError) as e:
        if not fs.exists(base):
            raise CheckpointGone(f"{path} was removed while it was being read: a running training's retention "
                                 "(checkpoint.keep_last) prunes older checkpoints; load the newest one") from None
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None


class CheckpointGone(CheckpointError):
    """The checkpoint was removed (by a training run's retention) while it was being read."""


def _require_device(map_location: str | torch.device) -> None:
    """A device that exists here: a checkpoint is never blamed for a missing GPU."""
    try:
        device = torch.device(map_location)
    except RuntimeError:
        raise ConfigError(f"device {map_location!r} is not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {map_location}: no CUDA device is available here; use --device cpu")


def _read_parts(local: Path, path: str, map_location: str | torch.device, note: Callable[[str], None]) -> Checkpoint:
    """The checkpoint in the local directory `local` (named `path` in messages), verified part by part."""
    weights: dict[str, torch.Tensor] = {}
    ngram = None
    model_file = next((f for f in MODEL_FILES if (local / f).is_file()), MODEL_FILES[0])
    state_file = STATE_FILE if (local / STATE_FILE).is_file() or not (local / LEGACY_STATE).is_file() \
        else LEGACY_STATE
    if not verify(local, path, required=(model_file, *FILES, state_file)):
        note(f"note: {path} has no {MANIFEST} (saved by an older hanlm): its files are loaded unverified")
    for f in (model_file, *FILES, state_file):
        if not (local / f).is_file():
            raise CheckpointError(f"{_join(path, f)} is missing: {path} is not a complete checkpoint")
    current = ""
    try:
        current = "config.yaml"
        config = load_config(str(local / current))
        current = "tokenizer.json"
        tokenizer = Tokenizer.load(local / current)
        current = model_file
        if model_file == "model.arpa":
            ngram, _ = read_arpa(str(local / current), arpa_words(tokenizer.token_strings()))
        else:
            weights = load_file(str(local / current), device=str(map_location))
        current = state_file
        if state_file == STATE_FILE:
            train_state = load_state(local / current, map_location)
        else:  # older checkpoints: torch's restricted unpickler, which refuses anything but tensors and data
            train_state = torch.load(local / current, map_location=map_location, weights_only=True)
    except Exception as e:  # whatever a damaged file makes its parser raise, named with the file
        raise CheckpointError(f"{_join(path, current)} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
        raise CheckpointError(f"{_join(path, state_file)} holds no training state")
    return Checkpoint(path, config, tokenizer, weights, train_state, ngram)


def stored_model_file(path: str) -> str | None:
    """Which of MODEL_FILES the checkpoint at `path` holds (None: neither)."""
    fs, base = _fs(path)
    return next((f for f in MODEL_FILES if fs.exists(_join(base, f))), None)


def _download(fs: fsspec.AbstractFileSystem, base: str, tmp: str) -> str:
    fs.get(base.rstrip("/") + "/", tmp, recursive=True)
    return tmp


def resolve_stored(spec: str, note: Callable[[str], None] = _note) -> str:
    """A hanlm checkpoint directory from a path that is a checkpoint, a checkpoint root (then its
    `latest`, or the newest checkpoint when `latest` is unusable) or a run directory (its checkpoints).
    `hanlm.loading.resolve_checkpoint` also knows the directories of other ecosystems."""
    fs, base = _fs(spec)
    if stored_model_file(spec):
        return spec
    if fs.isfile(_join(base, MIXTURE_FILE)) or base.endswith(MIXTURE_FILE):
        raise CheckpointError(f"{spec} is a mixture (hanlm mix): it has no weights of its own to train, resume or "
                              "mix from; use its neural part (named in its mixture.json) instead")
    names = _list(fs, base)
    if not names and fs.isdir(_join(base, "checkpoints")):  # a run directory: its checkpoints
        return resolve_stored(_join(spec, "checkpoints"), note)
    name = _read_pointer(fs, base, "latest", note)
    if name is not None and name not in names:
        note(f"note: {_join(spec, 'latest')} names {name[:60]!r}, which is not a checkpoint there; "
             + (f"using the newest, {names[-1]}" if names else "ignored"))
        name = None
    if name is None and names:
        name = names[-1]
    if name is None:
        raise CheckpointError(f"{spec} is neither a checkpoint (no model.safetensors or model.arpa) nor a "
                              "checkpoint directory holding step-NNNNNNNN checkpoints")
    return _join(spec, name)


def stored_task(path: str) -> str:
    """model.task in a checkpoint's config.yaml, read without building a config (lm when unreadable: the
    full load that follows reports the damage)."""
    fs, base = _fs(path)
    try:
        with fs.open(_join(base, "config.yaml"), "r", encoding="utf-8") as f:
            task = (yaml.safe_load(f.read(1 << 20)) or {}).get("model", {}).get("task", "lm")
    except (OSError, ValueError, AttributeError, yaml.YAMLError, RecursionError):
        return "lm"
    return task if isinstance(task, str) else "lm"



@dataclass
class Scan:
    """What `scan` found under a checkpoint root: the newest checkpoint that loads, and each newer
    one that did not, with why (newest first)."""

    checkpoint: Checkpoint | None
    damaged: list[tuple[str, str]]

    def listing(self) -> str:
        return "\n".join(f"  {name}: {why}" for name, why in self.damaged)


def scan(root: str, map_location: str | torch.device = "cpu", note: Callable[[str], None] = _note) -> Scan:
    """Load the newest checkpoint under `root` that is whole, walking back past damaged ones."""
    damaged = []
    for name in reversed(list_checkpoints(root)):
        try:
            return Scan(load_checkpoint(_join(root, name), map_location, note), damaged)
        except CheckpointError as e:
            damaged.append((name, str(e)))
    return Scan(None, damaged)


def load_latest(root: str, map_location: str | torch.device = "cpu",
                warn: Callable[[str], None] = _note) -> Checkpoint | None:
    """The newest loadable checkpoint under `root`, or None when there is none; each damaged one
    it skips is reported through `warn`."""
    found = scan(root, map_location, warn)
    for _, why in found.damaged:
        warn(f"skipping damaged checkpoint: {why}")
    return found.checkpoint


def set_aside(root: str, names: Sequence[str], label: str) -> str:
    """Move checkpoints out of the way (never delete them) into `root/<label>-<time>/`, and drop the
    pointers that named them. Returns the new directory."""
    fs, base = _fs(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, k = _join(base, f"{label}-{stamp}"), 1
    while fs.exists(dest):
        k += 1
        dest = _join(base, f"{label}-{stamp}-{k}")
    fs.makedirs(dest, exist_ok=True)
    for name in names:
        _move_tree(fs, _join(base, name), _join(dest, name))
    for pointer in ("latest", "best"):
        text = _read_pointer(fs, base, pointer, lambda _: None)
        if text is not None and text.partition(" ")[0] in names:
            fs.mv(_join(base, pointer), _join(dest, pointer))
    return _join(root, dest.rsplit("/", 1)[-1])


def _move_tree(fs: fsspec.AbstractFileSystem, source: str, dest: str) -> None:
    """Move a directory: a rename where the filesystem has one (local; sftp, whose `mv` is a rename that
    takes no `recursive` argument), else file by file: fsspec's generic recursive `mv` also copies the
    directory entry itself, which an object store (S3) has no object for, and fails on it."""
    if isinstance(fs, LocalFileSystem) or "recursive" not in inspect.signature(fs.mv).parameters:
        fs.mv(source, dest)
        return
    files = fs.find(source)
    if files:
        fs.mv(files, [dest + f[len(source):] for f in files])
    if fs.exists(source):  # a directory left empty (memory://, HDFS): object stores have none
        fs.rm(source, recursive=True)


def remove_stale(root: str) -> list[Path]:
    """Delete the temporaries of saves that died half-way (local roots; remote ones assemble in /tmp)."""
    return [] if _is_remote(root) else remove_stale_temporaries(_fs(root)[1])


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
