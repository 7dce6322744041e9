"""What splits text into words for the word tokenizer: jieba, or a tagger checkpoint of `hanlm finetune
--task tag` (`tokenizer.segmenter: CKPT`).

Loading a tagger is the business of a layer far above data (`hanlm.loading`), so this module defines
the plug and that layer fills it: `plug_segmenter_loader(load)`, where `load(spec)` gives the
segmenter of the checkpoint `spec`. Whoever loads `hanlm.loading` (every hanlm command that reads or
prepares data does) has it plugged in; prepare's worker processes receive the same loader by name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import jieba

from hanlm.errors import DataError

jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading at INFO on first use

JIEBA = "jieba"  # the default word segmenter

Segment = Callable[[list[str]], list[list[str]]]  # texts without whitespace → the words of each
SegmenterLoader = Callable[[str], Segment]  # a tagger checkpoint → its segmenter

_loader: SegmenterLoader | None = None


def plug_segmenter_loader(load: SegmenterLoader) -> None:
    """Make `load` the way tagger checkpoints named by `tokenizer.segmenter` become segmenters."""
    global _loader
    _loader = load


def segmenter_loader() -> SegmenterLoader | None:
    """The loader plugged in, if any (handed to worker processes)."""
    return _loader


def _segmenter(spec: str) -> Segment:
    if _loader is None:
        raise DataError(f"tokenizer.segmenter {spec!r} is a tagger checkpoint, and no loader of tagger checkpoints "
                        "is plugged in: import hanlm.loading first (every hanlm command does)")
    return _loader(spec)


_SPACES = re.compile(r"(\s+)")


def segment_words(texts: list[str], segmenter: str = JIEBA) -> list[list[str]]:
    """The words of each text, which spell it exactly (whitespace runs are words of their own): jieba's,
    or those of the tagger checkpoint `segmenter`, all texts through it in one batch."""
    if segmenter == JIEBA:
        return [jieba.lcut(t, HMM=True) for t in texts]
    parts = [[p for p in _SPACES.split(t) if p] for t in texts]
    runs = [p for ps in parts for p in ps if not p.isspace()]
    segmented = iter(_segmenter(segmenter)(runs))
    return [[w for p in ps for w in ([p] if p.isspace() else next(segmented))] for ps in parts]
