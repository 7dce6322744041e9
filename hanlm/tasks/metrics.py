"""Task metrics. Classification: accuracy, per-label F1, macro-F1, confusion matrix. Segmentation
(SIGHAN scoring): word precision / recall / F1 with words as character spans, recall of words
unseen in training (OOV), and joint word + POS F1.

Both kinds have `primary` (what checkpoint selection maximises) and `headline` (the figures a
report's table shows)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass
class ClassificationScores:
    labels: list[str]
    confusion: list[list[int]]  # confusion[gold][predicted]

    @classmethod
    def of(cls, gold: Sequence[int], predicted: Sequence[int], labels: list[str]) -> ClassificationScores:
        if len(gold) != len(predicted):
            raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
        n = len(labels)
        confusion = [[0] * n for _ in range(n)]
        for g, p in zip(gold, predicted):
            confusion[g][p] += 1
        return cls(labels, confusion)

    @property
    def total(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.labels))) / max(self.total, 1)

    def f1(self, i: int) -> float:
        """F1 of label i (0 when it is neither predicted nor present)."""
        tp = self.confusion[i][i]
        predicted = sum(row[i] for row in self.confusion)
        actual = sum(self.confusion[i])
        return 2 * tp / (predicted + actual) if predicted + actual else 0.0

    @property
    def macro_f1(self) -> float:
        """The unweighted mean of the labels' F1: a majority-class guess scores low on it."""
        return sum(self.f1(i) for i in range(len(self.labels))) / len(self.labels)

    @property
    def primary(self) -> float:
        return self.accuracy

    @property
    def headline(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}

    def as_dict(self) -> dict:
        return {"examples": self.total, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "f1": {label: self.f1(i) for i, label in enumerate(self.labels)},
                "labels": self.labels, "confusion": self.confusion}

    def summary(self) -> str:
        return f"accuracy {self.accuracy:.4f}, macro-F1 {self.macro_f1:.4f} on {self.total:,} texts"

    def confusion_table(self) -> str:
        """The confusion matrix as Markdown: rows are the gold labels, columns the predictions."""
        head = "| gold \\ predicted | " + " | ".join(self.labels) + " |"
        rule = "|---" * (len(self.labels) + 1) + "|"
        rows = [f"| {label} | " + " | ".join(f"{n:,}" for n in self.confusion[i]) + " |"
                for i, label in enumerate(self.labels)]
        return "\n".join([head, rule, *rows])


def word_spans(words: Sequence[str]) -> list[tuple[int, int]]:
    """Each word as its (start, end) character offsets in the joined text."""
    spans, at = [], 0
    for w in words:
        spans.append((at, at + len(w)))
        at += len(w)
    return spans


@dataclass
class SegmentationScores:
    """Counts over a test set, from which SIGHAN's figures follow."""

    gold_words: int = 0
    predicted_words: int = 0
    correct: int = 0  # predicted words whose span is a gold word's
    oov_words: int = 0  # gold words not in the training vocabulary
    oov_correct: int = 0
    tagged_correct: int = 0  # correct spans whose POS tag is right too
    has_pos: bool = False
    characters: int = 0

    def add(self, gold: Sequence[str], predicted: Sequence[str], vocabulary: set[str] | frozenset[str] = frozenset(),
            gold_tags: Sequence[str] | None = None, predicted_tags: Sequence[str] | None = None) -> None:
        """Count one sentence: gold and predicted words of the same text (and their tags, when scored)."""
        if "".join(gold) != "".join(predicted):
            raise ValueError(f"gold and predicted words spell different texts: {''.join(gold)[:40]!r} vs "
                             f"{''.join(predicted)[:40]!r}")
        gold_spans = word_spans(gold)
        predicted_at = {span: k for k, span in enumerate(word_spans(predicted))}
        self.gold_words += len(gold)
        self.predicted_words += len(predicted)
        self.characters += sum(map(len, gold))
        scored_pos = gold_tags is not None and predicted_tags is not None
        self.has_pos = self.has_pos or scored_pos
        for k, (span, word) in enumerate(zip(gold_spans, gold)):
            hit = span in predicted_at
            self.correct += hit
            if vocabulary and word not in vocabulary:
                self.oov_words += 1
                self.oov_correct += hit
            if hit and scored_pos:
                self.tagged_correct += gold_tags[k] == predicted_tags[predicted_at[span]]

    @property
    def precision(self) -> float:
        return self.correct / self.predicted_words if self.predicted_words else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold_words if self.gold_words else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def oov_recall(self) -> float | None:
        return self.oov_correct / self.oov_words if self.oov_words else None

    @property
    def pos_f1(self) -> float | None:
        """F1 of (span, tag) pairs: a word counts when its boundaries and its tag are both right."""
        if not self.has_pos:
            return None
        total = self.gold_words + self.predicted_words
        return 2 * self.tagged_correct / total if total else 0.0

    @property
    def primary(self) -> float:
        return self.f1

    @property
    def headline(self) -> dict[str, float]:
        out = {"precision": self.precision, "recall": self.recall, "f1": self.f1}
        if self.oov_recall is not None:
            out["oov_recall"] = self.oov_recall
        if self.pos_f1 is not None:
            out["pos_f1"] = self.pos_f1
        return out

    def as_dict(self) -> dict:
        return {**self.headline, "gold_words": self.gold_words, "predicted_words": self.predicted_words,
                "correct": self.correct, "oov_words": self.oov_words, "characters": self.characters}

    def summary(self) -> str:
        parts = [f"P {self.precision:.4f}", f"R {self.recall:.4f}", f"F1 {self.f1:.4f}"]
        if self.oov_recall is not None:
            parts.append(f"OOV recall {self.oov_recall:.4f} ({self.oov_words:,} OOV words)")
        if self.pos_f1 is not None:
            parts.append(f"POS F1 {self.pos_f1:.4f}")
        return ", ".join(parts) + f" on {self.gold_words:,} words"


@dataclass
class EntityScores:
    """Entity-level counts as conlleval and seqeval count them: an entity is right when its span and its type
    both are; precision, recall and F1 per type and over all (micro)."""

    counts: dict[str, list[int]] = field(default_factory=dict)  # type -> [correct, predicted, gold]

    def add(self, gold: Iterable, predicted: Iterable) -> None:
        """Count one text: its gold and predicted entities (anything with start, end and type)."""
        gold_set = {(e.start, e.end, e.type) for e in gold}
        predicted_set = {(e.start, e.end, e.type) for e in predicted}
        for spans, column in ((gold_set & predicted_set, 0), (predicted_set, 1), (gold_set, 2)):
            for *_, kind in spans:
                self.counts.setdefault(kind, [0, 0, 0])[column] += 1

    def of(self, kind: str | None = None) -> tuple[float, float, float]:
        """(precision, recall, F1) of one type, or of all (None)."""
        rows = [self.counts.get(kind, [0, 0, 0])] if kind is not None else list(self.counts.values())
        correct, predicted, gold = (sum(r[i] for r in rows) for i in range(3))
        p = correct / predicted if predicted else 0.0
        r = correct / gold if gold else 0.0
        return p, r, 2 * p * r / (p + r) if p + r else 0.0

    @property
    def f1(self) -> float:
        return self.of()[2]

    @property
    def primary(self) -> float:
        return self.f1

    @property
    def headline(self) -> dict[str, float]:
        p, r, f = self.of()
        return {"precision": p, "recall": r, "f1": f}

    def as_dict(self) -> dict:
        return {**self.headline, "types": {k: dict(zip(("precision", "recall", "f1"), self.of(k)))
                                           | {"gold": c[2], "predicted": c[1]} for k, c in sorted(self.counts.items())}}

    def summary(self) -> str:
        p, r, f = self.of()
        types = "; ".join(f"{k} P {self.of(k)[0]:.4f} R {self.of(k)[1]:.4f} F1 {self.of(k)[2]:.4f} "
                          f"({c[2]:,} gold)" for k, c in sorted(self.counts.items()))
        return f"entities: P {p:.4f}, R {r:.4f}, F1 {f:.4f}" + (f" ({types})" if types else "")


def timed_predictions(predict: Callable[[list[str]], list], texts: Sequence[str],
                      batch: int = 256) -> tuple[list, float]:
    """`predict` over `texts` in batches of `batch`: every prediction, in order, and the seconds spent predicting
    alone (what a tagger's characters per second are measured on)."""
    predicted, seconds = [], 0.0
    for i in range(0, len(texts), batch):
        started = time.perf_counter()
        predicted += predict(list(texts[i:i + batch]))
        seconds += time.perf_counter() - started
    return predicted, seconds

