"""The process's peak resident memory (what `micro_batch: auto` and the n-gram build report).

Linux's VmHWM is the peak of this process's own address space: it starts afresh at exec and can be
reset. `getrusage`'s ru_maxrss is not fit for the job there: a child exec'd from a large process
(a benchmark harness after its training suite) inherits the parent's peak at fork time.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def can_reset_peak_rss() -> bool:
    """Whether `reset_peak_rss` works here (Linux /proc)."""
    return _STATUS.exists() and _CLEAR_REFS.exists()


def reset_peak_rss() -> None:
    """Lower the recorded peak to the current RSS (Linux only: see `can_reset_peak_rss`)."""
    _CLEAR_REFS.write_text("5")


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM where /proc has it, else ru_maxrss."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere
