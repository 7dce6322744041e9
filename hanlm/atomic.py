"""Atomic writes: output appears under its final name only once it is complete.

Everything hanlm writes (extracted corpora, shards, configs, checkpoints) goes through
these helpers, so an interrupted run never leaves a file that looks finished; and what a
killed writer left half-done is removed the next time the same output is written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates files readable by the owner only; finished output gets the usual mode.
_UMASK = os.umask(0)
os.umask(_UMASK)

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# Temporaries carry their writer's host and pid, so that a later start can tell a dead writer's
# leftovers from a live writer's work in progress: .NAME.hHOST-pPID.RANDOM.tmp and .NAME.hHOST-pPID.old
_OWNED = re.compile(r"^\..+\.h([A-Za-z0-9-]+)-p(\d+)\.(?:[^.]+\.tmp|old)$")


def owner_tag() -> str:
    """This process's tag in the names of its temporaries."""
    return f"h{HOST}-p{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (a pid we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporaries that writers on this machine left in `directory` when they died
    (killed mid-write), only those for `name` if given; those of live processes and of other
    machines stay. Returns what went."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _OWNED.match(entry.name)
        if name is not None and not entry.name.startswith(f".{name}."):
            continue
        if m and m.group(1) == HOST and not pid_alive(int(m.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` if the block succeeds.

    The temporary sits in the same directory so the rename is atomic on POSIX. On any
    exception it is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{owner_tag()}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `final` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final` as a whole.

    An existing `final` is moved aside first and deleted only after the new one is in
    place, so at every moment either the old or the new complete directory exists.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{owner_tag()}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{owner_tag()}.old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
