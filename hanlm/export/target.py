"""Where `hanlm export` may write, decided before anything is written, and writing there without losing what was.

An export never writes over its own input: an output that is, lies inside or contains the checkpoint it reads
(compared as resolved real paths and as files, so symlinks and bind mounts do not hide it) is refused. The
output must be the kind of thing the format writes: a regular file (or a new path) for gguf, a directory (or
a new path) for hf; a device node, FIFO, socket or a symlink to one is never replaced by a file. An hf output
directory that already holds something is replaced only with `--force`. A path under a regular file, an empty
path and an unwritable parent are refused naming the path. Every refusal is a `ConfigError` (printed by the
CLI without a traceback) that says why and what to give instead.

Writing: a gguf file goes through `hanlm.atomic.atomic_path` (renamed into place when complete); an hf
directory is assembled in a temporary beside it and renamed into place, the old one (with `--force`) set
aside first and deleted only afterwards. An existing empty directory is kept (it may be a mount point, or
the current directory) and the finished files are moved into it from a temporary inside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hanlm.atomic import owner_tag, remove_stale_temporaries
from hanlm.errors import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)

WHAT = {"hf": "a directory (config.json, model.safetensors, tokenizer.json ...)", "gguf": "one .gguf file"}


@dataclass(frozen=True)
class Target:
    """A checked output: `path` is where the files go (symlinks resolved), `shown` the OUT argument as given."""

    path: Path
    shown: str
    exists: bool  # an existing directory (hf) or regular file (gguf)
    empty: bool = True  # hf: the existing directory holds nothing

    def failed(self, e: OSError) -> ConfigError:
        """The error for a write that failed half-way (nothing that existed was replaced)."""
        why = e.strerror or str(e)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return ConfigError(f"export OUT {self.shown}: cannot write there: {why}{where}; nothing that was there "
                           "before has been replaced: free space, fix the permissions or choose another OUT")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _local_input(checkpoint: str) -> Path | None:
    """The real path of the checkpoint directory being read, None when it is remote (s3://, sftp://...)."""
    checkpoint = checkpoint.removeprefix("file://")
    if "://" in checkpoint:
        return None
    return Path(os.path.realpath(checkpoint))


def _refuse_overlap(out: Path, shown: str, checkpoint: str) -> None:
    """ConfigError when `out` (a real path) is, lies inside or contains the checkpoint `checkpoint`."""
    source = _local_input(checkpoint)
    if source is None:
        return
    fix = f"give an OUT outside {checkpoint}, e.g. beside it"
    if out == source or _same(out, source):
        raise ConfigError(f"export OUT {shown} is the checkpoint being exported ({checkpoint}): writing the export "
                          f"there would overwrite the checkpoint it reads: {fix}")
    if source in out.parents or any(_same(p, source) for p in out.parents if p.exists()):
        raise ConfigError(f"export OUT {shown} lies inside the checkpoint being exported ({checkpoint}): writing "
                          f"there would damage the checkpoint it reads: {fix}")
    if out in source.parents or (out.exists() and any(_same(out, p) for p in source.parents)):
        raise ConfigError(f"export OUT {shown} contains the checkpoint being exported ({checkpoint}): replacing it "
                          f"would delete the checkpoint it reads: {fix}")


def _refuse_bad_parent(out: Path, shown: str) -> None:
    """ConfigError unless the nearest existing directory above `out` is a directory this process may write."""
    for ancestor in out.parents:
        try:
            mode = ancestor.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # created on writing (or a file further up, reported there)
        except OSError as e:
            raise ConfigError(f"export OUT {shown}: cannot look at {ancestor} ({e.strerror}): choose another "
                              "OUT") from None
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"export OUT {shown}: {ancestor} is {_kind(mode)}, not a directory, so nothing can be "
                              "created under it: choose an OUT in a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"export OUT {shown}: {ancestor} is not writable (permission denied or a read-only "
                              "file system), so the export cannot be created there: choose another OUT")
        return


def check_output(out: str | os.PathLike, fmt: str, checkpoint: str, force: bool = False) -> Target:
    """Where the export of the checkpoint `checkpoint` (its resolved path) in format `fmt` may go for the OUT
    argument `out`, or ConfigError saying why not and what to give instead. Writes nothing, except removing
    temporaries that a killed export into the same empty directory left there."""
    shown = os.fspath(out)
    if not shown:
        raise ConfigError(f"export OUT is empty (''): name where to write {WHAT[fmt]}, e.g. "
                          + ("model.gguf" if fmt == "gguf" else "runs/default-hf"))
    if "://" in shown:
        raise ConfigError(f"export OUT {shown}: export writes local files only; write it to a local path and copy "
                          "it from there")
    path = Path(os.path.realpath(shown))
    _refuse_overlap(path, shown, checkpoint)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as e:
        raise ConfigError(f"export OUT {shown}: cannot look at it ({e.strerror}): choose another OUT") from None
    link = f" (a symlink to {path})" if Path(shown).is_symlink() else ""
    if mode is None:
        _refuse_bad_parent(path, shown)
        return Target(path, shown, exists=False)
    if fmt == "gguf":
        if stat.S_ISDIR(mode):
            raise ConfigError(f"export OUT {shown}{link} is a directory, but --format gguf writes one file: give a "
                              f"file path, e.g. {os.path.join(shown, 'model.gguf')}")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"export OUT {shown}{link} is {_kind(mode)}, not a regular file: the export would "
                              "replace it with a file; give the path of a new or regular .gguf file")
        _refuse_bad_parent(path, shown)
        return Target(path, shown, exists=True)
    if not stat.S_ISDIR(mode):
        also = "; for one file use --format gguf" if stat.S_ISREG(mode) else ""
        raise ConfigError(f"export OUT {shown}{link} is {_kind(mode)}, not a directory: --format hf writes "
                          f"{WHAT['hf']}: give the path of a new or empty directory{also}")
    _refuse_bad_parent(path / "x", shown)  # the directory itself is written into
    remove_stale_temporaries(path, path.name)  # what a killed export into this directory left
    try:
        entries = sorted(e.name for e in path.iterdir())
    except OSError as e:
        raise ConfigError(f"export OUT {shown}: cannot list the directory ({e.strerror}): choose another "
                          "OUT") from None
    if entries and not force:
        listed = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ConfigError(f"export OUT {shown}{link} is a directory that is not empty ({listed}): --format hf "
                          "replaces the whole directory, which would delete what is there: give a new or empty "
                          "directory, or add --force to replace it")
    if entries:
        _refuse_bad_parent(path, shown)  # --force renames the directory itself
    return Target(path, shown, exists=True, empty=not entries)


def _fresh_dir(parent: Path, name: str, suffix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{owner_tag()}.", suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


@contextlib.contextmanager
def output_dir(target: Target) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block succeeds its files become `target`'s directory.

    A new target: the temporary (beside it) is renamed onto it. An existing empty one: the files are moved
    into it from a temporary inside it. An existing non-empty one (checked: `--force`): it is renamed aside,
    the temporary renamed onto it, and only then the old one deleted. On failure the temporary goes and the
    target is as it was; an OSError becomes a ConfigError naming the target."""
    final = target.path
    in_place = target.exists and target.empty
    try:
        if in_place:
            tmp = _fresh_dir(final, final.name, ".tmp")
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(final.parent, final.name)
            tmp = _fresh_dir(final.parent, final.name, ".tmp")
    except OSError as e:
        raise target.failed(e) from None
    try:
        yield tmp
        if in_place:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, final / entry.name)
            tmp.rmdir()
        else:
            _swap(tmp, final, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise target.failed(e) from None
        raise


def _swap(tmp: Path, final: Path, target: Target) -> None:
    """Rename `tmp` onto `final`, setting an existing `final` aside first and deleting it afterwards."""
    old = None
    if target.exists:
        old = final.with_name(f".{final.name}.{owner_tag()}.old")
        try:
            os.replace(final, old)
        except OSError as e:
            raise ConfigError(f"export OUT {target.shown}: cannot move the existing directory aside to replace it "
                              f"({e.strerror}; a mount point cannot be): empty it yourself or choose another "
                              "OUT") from None
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
