"""Segmentation and tagging: the gold data and its split, the one tagger interface, and scoring.

The data is finetune.data read as tagged text (`hanlm.data.tagged`; default the built-in
`people-daily-1998-tagged`). Each distinct paragraph appears once, on one side of the split, cut
on the same stable hash of its text (`split_of`) as classification and `hanlm prepare`: with
finetune.test_fraction ≤ data.val_fraction of a pretraining run on `people-daily-1998`, every
test paragraph is in that run's val split, so a pretrained tagger never read its test text.

Every tagger labels characters (`hanlm.tasks.bmes`) through `Tagger.tag`; `segment` turns text
into words around it: whitespace always separates words and is not part of any, and each
whitespace-free run is tagged as one sequence.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from hanlm.config import Config
from hanlm.data.tagged import TaggedSentence, read_tagged
from hanlm.errors import DataError
from hanlm.tasks.bmes import char_tags, tag_inventory, words_of
from hanlm.tasks.labelled import SPLITS, split_of
from hanlm.tasks.metrics import SegmentationScores, timed_predictions

TAGGED_CORPUS = "people-daily-1998-tagged"
_RUNS = re.compile(r"\S+")


@dataclass
class TaggedData:
    tags: list[str]  # the character tags, in the order of a tagger's outputs
    splits: dict[str, list[TaggedSentence]]
    vocabulary: frozenset[str]  # the train split's words: what OOV is measured against
    pos_tags: list[str]
    sentences: int  # read, duplicates included
    duplicates: int
    scheme: str = "bmes"
    sizes: dict[str, int] = field(default_factory=dict)  # characters per split

    def split_sizes(self) -> dict[str, int]:
        """Sentences per split."""
        return {name: len(split) for name, split in self.splits.items()}

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(self.splits[name]):,} ({self.sizes[name]:,} chars)" for name in SPLITS)
        pos = f"{len(self.pos_tags)} POS tags" if self.pos_tags else "no POS tags"
        return (f"{self.sentences:,} sentences, {self.duplicates:,} duplicates dropped; {sizes}; "
                f"{len(self.vocabulary):,} train words; {pos}; scheme {self.scheme} ({len(self.tags)} tags)")


def data_sources(cfg: Config) -> list[str]:
    """finetune.data, or the task's built-in corpus when it is empty."""
    return list(cfg.finetune.data) or [TAGGED_CORPUS]


def read_tagged_data(cfg: Config, sources: list[str] | None = None) -> TaggedData:
    """Read and split the tagged data of `cfg` (finetune.data, finetune.tag_format, data.* normalisation)."""
    ft = cfg.finetune
    sources = sources if sources is not None else data_sources(cfg)
    first: dict[str, TaggedSentence] = {}
    read = 0
    for sentence in read_tagged(sources, cfg.data, ft.tag_format):
        read += 1
        first.setdefault(sentence.text, sentence)
    splits: dict[str, list[TaggedSentence]] = {name: [] for name in SPLITS}
    for text, sentence in first.items():
        splits[split_of(text, ft.dev_fraction, ft.test_fraction)].append(sentence)
    where = ", ".join(sources)
    for name in ("train", "dev"):
        if not splits[name]:
            raise DataError(f"{where}: the {name} split is empty ({len(first):,} distinct sentences); add data or "
                            "raise finetune.dev_fraction")
    train = splits["train"]
    tagged = [s for s in train if s.tags is not None]
    pos_tags = sorted({t for s in tagged for t in s.tags}) if len(tagged) == len(train) else []
    tags = list(ft.labels) if ft.labels else tag_inventory(ft.tag_scheme, pos_tags)
    if ft.tag_scheme == "bmes-pos":
        known = set(tags)
        for name, sentences in splits.items():
            for s in sentences:
                for t in char_tags(s, "bmes-pos"):
                    if t not in known:
                        raise DataError(f"{s.where}: tag {t.partition('-')[2]!r} is not in the tag set "
                                        f"{'of the train split' if not ft.labels else 'finetune.labels'}")
    vocabulary = frozenset(w for s in train for w in s.words)
    sizes = {name: sum(len(s.text) for s in split) for name, split in splits.items()}
    return TaggedData(tags, splits, vocabulary, pos_tags, read, read - len(first), ft.tag_scheme, sizes)


class Tagger(ABC):
    """Labels each character of whitespace-free texts with one of `tags`."""

    tags: list[str]

    @abstractmethod
    def tag(self, texts: Sequence[str]) -> list[list[str]]:
        """One tag per character of each text (no text holds whitespace)."""

    context_length: int | None = None  # taggers cut long texts themselves: any length is served

    @property
    def with_pos(self) -> bool:
        return "-" in self.tags[0]

    def segment(self, texts: Sequence[str]) -> list[TaggedSentence]:
        """The words (and, with POS tags, their tags) of each text."""
        runs = [_RUNS.findall(t) for t in texts]
        flat = [r for rs in runs for r in rs]
        tagged = iter(self.tag(flat))
        out = []
        for rs in runs:
            words: list[str] = []
            tags: list[str] | None = [] if self.with_pos else None
            for run in rs:
                piece = words_of(run, next(tagged))
                words += piece.words
                if tags is not None:
                    tags += piece.tags or ["x"] * len(piece.words)
            out.append(TaggedSentence(words, tags))
        return out


@dataclass
class TaggerEvaluation:
    scores: SegmentationScores
    seconds: float

    @property
    def chars_per_s(self) -> float:
        return self.scores.characters / self.seconds if self.seconds > 0 else float("inf")


def evaluate_segmenter(segment, sentences: Sequence[TaggedSentence], vocabulary: frozenset[str] = frozenset(),
                       batch: int = 256) -> TaggerEvaluation:
    """Score `segment` (texts → TaggedSentences, e.g. `Tagger.segment` or a peer's wrapper) on gold
    sentences, timing only the segmenting."""
    predicted, seconds = timed_predictions(segment, [s.text for s in sentences], batch)
    scores = SegmentationScores()
    for gold, pred in zip(sentences, predicted):
        scores.add(gold.words, pred.words, vocabulary, gold.tags, pred.tags)
    return TaggerEvaluation(scores, seconds)



def pos_accuracy_on_gold_words(tag_words, sentences: Sequence[TaggedSentence], batch: int = 256) -> float:
    """The share of gold words whose POS tag `tag_words` (word lists → a tag per word, e.g.
    `NeuralTagger.tag_words`) gets right when given the gold segmentation: POS tagging alone, as the
    classic POS figures (accuracy on given words) measure it."""
    right = total = 0
    for start in range(0, len(sentences), batch):
        chunk = sentences[start:start + batch]
        for gold, predicted in zip(chunk, tag_words([s.words for s in chunk])):
            right += sum(g == p for g, p in zip(gold.tags, predicted))
            total += len(gold.words)
    return right / total if total else 0.0
