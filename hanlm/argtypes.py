"""argparse types shared by `hanlm`'s verbs and the benchmarks' own command lines: argparse reports a
value they refuse by its option, with exit status 2 and no traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bounded_int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `lo` to `hi` (inclusive; no upper bound when None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}, got {value:,}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its message when a value fails to parse
    return parse


positive_int = bounded_int(1)
