"""What every training run shares, a language model's (`hanlm.train.loop`) and a fine-tuning's
(`hanlm.finetune.run`): finding the checkpoint to resume from, moving an earlier run's checkpoints out of a
fresh run's way, and turning SIGINT / SIGTERM into a request to stop after the current step."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

import torch

from hanlm.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, resolve_stored, scan, set_aside
from hanlm.errors import CheckpointError
from hanlm.train.distributed import barrier


def find_resume(root: str, resume: str | None, device: torch.device, echo: Callable[[str], None], *,
                restart_if_damaged: bool, main: bool) -> Checkpoint | None:
    """The checkpoint a run continues from: none for `none`, the given path, or with `auto` the newest
    whole one under `root`; newer damaged ones are moved aside (kept, never deleted) by the main rank.
    When every one is damaged the run stops with the list, unless `restart_if_damaged` moves them all
    aside and starts over."""
    if resume in (None, "", "none"):
        return None
    if resume != "auto":
        return load_checkpoint(resolve_stored(resume), device)
    found = scan(root, device, echo)
    if found.checkpoint is None and found.damaged and not restart_if_damaged:
        raise CheckpointError(f"every checkpoint in {root} is damaged, so there is nothing to resume:\n"
                              f"{found.listing()}\nrepair or restore one, or rerun with --restart-if-damaged to "
                              "move them aside and start over")
    barrier()  # every rank has read them before rank 0 moves any
    if found.damaged and main:
        moved = set_aside(root, [name for name, _ in found.damaged], "damaged")
        echo(f"damaged checkpoints, moved to {moved}:\n{found.listing()}")
    if found.checkpoint is None and found.damaged:
        echo("starting over from step 0 (--restart-if-damaged)")
    return found.checkpoint


def set_earlier_aside(root: str, echo: Callable[[str], None]) -> None:
    """Move an earlier run's checkpoints out of a fresh run's way before its first save, so that its
    saves and pruning cannot replace or delete them (not before: `init_from` may read one)."""
    earlier = list_checkpoints(root)
    if earlier:
        moved = set_aside(root, earlier, "earlier")
        echo(f"note: {root} held checkpoints of an earlier run; this run started afresh (resume one with "
             f"--resume auto), so they were moved to {moved}")


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], None]):
    """Route SIGINT and SIGTERM to `request_stop` while training (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: request_stop())
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
