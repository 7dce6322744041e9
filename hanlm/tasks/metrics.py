"""Classification metrics: accuracy, per-label precision / recall / F1, macro-F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
