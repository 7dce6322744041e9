"""Named-entity recognition: the data and its hash split, entity taggers over characters with BIO or BIOES
tags, and entity-level scoring (exact span and type, as conlleval and seqeval count).

The data is `finetune.data` (default the built-in `people-daily-1998-ner`) in `finetune.ner_format`; each
distinct text is kept once and split train / dev / test by the same hash of its text as segmentation,
so the People's Daily test paragraphs are the same for both tasks. An `EntityTagger` reads entities off
any character tagger's tags: the CRF of segmentation (`hanlm.tasks.crf`: character n-gram features,
CRFsuite) trained on entity tags, or a neural tagger (`hanlm.tasks.neural_tagger`, through `hanlm finetune`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hanlm.config import Config
from hanlm.data.entities import OUTSIDE, Entity, NerSentence, spans_to_tags, tags_to_spans
from hanlm.data.ner import read_ner
from hanlm.data.tagged import TaggedSentence
from hanlm.errors import CheckpointError
from hanlm.tasks.bmes import cut_sentence
from hanlm.tasks.crf import CRFTagger
from hanlm.tasks.labelled import SPLITS, split_of
from hanlm.tasks.metrics import EntityScores, timed_predictions

NER_CORPUS = "people-daily-1998-ner"


@dataclass
class NerData:
    tags: list[str]  # the character tags, O first
    types: list[str]  # the entity types
    splits: dict[str, list[NerSentence]]
    sentences: int
    duplicates: int
    scheme: str
    sizes: dict[str, int] = field(default_factory=dict)  # characters per split

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(self.splits[name]):,} ({self.sizes[name]:,} chars)" for name in SPLITS)
        entities = sum(len(s.entities) for s in self.splits["train"])
        return (f"{self.sentences:,} texts, {self.duplicates:,} duplicates dropped; {sizes}; {entities:,} train "
                f"entities of types {', '.join(self.types)}; scheme {self.scheme} ({len(self.tags)} tags)")


def read_ner_data(cfg: Config, sources: list[str] | None = None) -> NerData:
    """Read and split the entity data of `cfg` (finetune.data, finetune.ner_format, finetune.ner_scheme)."""
    ft = cfg.finetune
    sources = sources if sources is not None else (list(ft.data) or [NER_CORPUS])
    first: dict[str, NerSentence] = {}
    read = 0
    for sentence in read_ner(sources, cfg.data, ft.ner_format):
        read += 1
        first.setdefault(sentence.text, sentence)
    splits = {name: [] for name in SPLITS}
    for text, sentence in first.items():
        splits[split_of(text, ft.dev_fraction, ft.test_fraction)].append(sentence)
    types = sorted({e.type for s in splits["train"] for e in s.entities})
    prefixes = ("B", "I") if ft.ner_scheme == "bio" else ("B", "I", "E", "S")
    tags = [OUTSIDE, *(f"{p}-{t}" for t in types for p in prefixes)]
    sizes = {name: sum(len(s.text) for s in split) for name, split in splits.items()}
    return NerData(tags, types, splits, read, read - len(first), ft.ner_scheme, sizes)


def entity_pieces(sentence: NerSentence, max_chars: int) -> list[NerSentence]:
    """A long text as pieces of at most `max_chars` characters, cut after sentence-final punctuation where
    possible, never inside an entity (one longer than `max_chars` is a piece of its own): training rows for a
    tagger with a bounded input, whose tags stay grammatical."""
    text, words, kinds, at = sentence.text, [], [], 0
    for e in [*sentence.entities, None]:
        stop = len(text) if e is None else e.start
        words += list(text[at:stop])
        kinds += [None] * (stop - at)
        if e is not None:
            words.append(text[e.start:e.end])
            kinds.append(e.type)
            at = e.end
    pieces, offset = [], 0
    for piece in cut_sentence(TaggedSentence(words, kinds, sentence.where), max_chars):
        entities, at = [], offset
        for word, kind in zip(piece.words, piece.tags):
            if kind is not None:
                entities.append(Entity(at - offset, at - offset + len(word), kind))
            at += len(word)
        pieces.append(NerSentence(text[offset:at], entities, sentence.where))
        offset = at
    return pieces


class CharacterTagger(Protocol):
    def tag(self, texts: Sequence[str]) -> list[list[str]]: ...


class EntityTagger:
    """A character tagger (the CRF, or a neural tagger) whose tags spell entities."""

    context_length: int | None = None  # its tagger cuts long texts itself: any length is served

    def __init__(self, tagger: CharacterTagger, scheme: str, kind: str = "crf"):
        self.tagger, self.scheme, self.kind = tagger, scheme, kind

    @classmethod
    def fit(cls, sentences: Sequence[NerSentence], tags: Sequence[str], scheme: str, *, c1: float, c2: float,
            iterations: int, progress: Callable[[int, float], None] | None = None) -> EntityTagger:
        """A CRF trained on the sentences' entity tags."""
        pairs = [(s.text, spans_to_tags(len(s.text), s.entities, scheme)) for s in sentences]
        return cls(CRFTagger.fit_sequences(pairs, tags, c1=c1, c2=c2, iterations=iterations, progress=progress),
                   scheme)

    def entities(self, texts: Sequence[str]) -> list[list[Entity]]:
        """The entities of each text, as character spans."""
        return [tags_to_spans(tags) for tags in self.tagger.tag(texts)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tagger.state_dict()

    @classmethod
    def from_checkpoint(cls, labels: Sequence[str], scheme: str, weights: dict[str, torch.Tensor],
                        source: str) -> EntityTagger:
        """The CRF entity tagger of a checkpoint's weights."""
        if not labels:
            raise CheckpointError(f"{source}/config.yaml lists no tags (finetune.labels)")
        return cls(CRFTagger.from_weights(labels, weights, f"{source}/model.safetensors"), scheme)


@dataclass
class EntityEvaluation:
    scores: EntityScores
    seconds: float
    characters: int

    @property
    def chars_per_s(self) -> float:
        return self.characters / self.seconds if self.seconds > 0 else float("inf")


def evaluate_entities(find: Callable[[list[str]], list[list[Entity]]], sentences: Sequence[NerSentence],
                      batch: int = 256) -> EntityEvaluation:
    """Entity-level scores of `find` (texts → their entities, e.g. `EntityTagger.entities` or a peer's wrapper) on
    gold sentences, timing only the finding."""
    predicted, seconds = timed_predictions(find, [s.text for s in sentences], batch)
    scores = EntityScores()
    for gold, found in zip(sentences, predicted):
        scores.add(gold.entities, found)
    return EntityEvaluation(scores, seconds, sum(len(s.text) for s in sentences))
