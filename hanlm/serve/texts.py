"""What /v1/classify, /v1/segment and /v1/ner run on the task worker, in two parts: the model over texts, and
one request's answer from its texts' results. Split so, the worker can join the texts of several waiting
requests into one model batch (hanlm.serve.worker) and still answer each request as if it had run alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hanlm.data.entities import Entity
from hanlm.data.tagged import TaggedSentence
from hanlm.serve.generation import Loaded
from hanlm.tasks.labelled import encode_texts
from hanlm.tasks.predict import rows_probabilities


@dataclass(frozen=True)
class TextsTask:
    """A texts route's work in two parts, so that the task worker can run several requests' texts as one
    batch: `label` runs the model over texts (one result per text, in order), `answer` makes one request's
    body from its texts and their results."""

    label: Callable[[Loaded, list[str]], list]
    answer: Callable[[Loaded, list[str], list], dict[str, Any]]


def _label_probabilities(loaded: Loaded, texts: list[str]) -> list[tuple[torch.Tensor, int]]:
    """Each text's label probabilities and its token count (as the classifier reads it), the texts batched by
    length."""
    rows = encode_texts(loaded.tokenizer, texts, loaded.config.finetune.max_length)
    return list(zip(rows_probabilities(loaded.model, rows), map(len, rows)))


def _classify_answer(loaded: Loaded, texts: list[str], results: list[tuple[torch.Tensor, int]]) -> dict[str, Any]:
    """/v1/classify's answer: each text's label and label probabilities."""
    labels = loaded.config.finetune.labels
    data = [{"index": i, "label": labels[int(probs.argmax())],
             "probabilities": {label: float(p) for label, p in zip(labels, probs)}}
            for i, (probs, _) in enumerate(results)]
    tokens = sum(n for _, n in results)
    return {"object": "list", "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _segment_answer(loaded: Loaded, texts: list[str], sentences: list[TaggedSentence]) -> dict[str, Any]:
    """/v1/segment's answer: each text's words (and tags, from a POS tagger)."""
    data = [{"index": i, "words": s.words, **({"tags": s.tags} if s.tags is not None else {})}
            for i, s in enumerate(sentences)]
    characters = sum(map(len, texts))
    return {"object": "list", "data": data, "usage": {"characters": characters,
                                                      "words": sum(len(s.words) for s in sentences)}}


def _ner_answer(loaded: Loaded, texts: list[str], found: list[list[Entity]]) -> dict[str, Any]:
    """/v1/ner's answer: each text's entities (text, type, start, end: character offsets, end excluded)."""
    data = [{"index": i, "entities": [{"text": t[e.start:e.end], "type": e.type, "start": e.start, "end": e.end}
                                      for e in entities]} for i, (t, entities) in enumerate(zip(texts, found))]
    return {"object": "list", "data": data, "usage": {"characters": sum(map(len, texts)),
                                                      "entities": sum(map(len, found))}}


CLASSIFY = TextsTask(_label_probabilities, _classify_answer)
SEGMENT = TextsTask(lambda loaded, texts: loaded.model.segment(texts), _segment_answer)
NER = TextsTask(lambda loaded, texts: loaded.model.entities(texts), _ner_answer)
