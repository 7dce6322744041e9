"""Benchmark suites: each measures hanlm beside its peers in the same run."""

import argparse
from pathlib import Path

SUITES = ("train", "generate", "data", "dist", "ngram", "serve", "nlu")  # `hanlm bench` runs them in this order


def suite_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser every `python -m hanlm.bench.MODULE` script starts from: its usage line
    and description from the module's docstring, and `--out` (default bench/results/MODULE)."""
    parser = argparse.ArgumentParser(prog=f"python -m hanlm.bench.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results") / module,
                        help=f"output directory (default bench/results/{module})")
    return parser
