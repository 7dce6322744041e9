"""Running a classifier: label probabilities for texts, batched by length; classifying files.

The one path every consumer takes (the fine-tuning evaluator, `hanlm classify`, `POST
/v1/classify`), so their predictions agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hanlm.config import Config
from hanlm.data.reader import DocumentReader
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError
from hanlm.tasks.classifier import SequenceClassifier
from hanlm.tasks.labelled import collate, encode_texts
from hanlm.tasks.metrics import ClassificationScores


@dataclass
class Classifier:
    """A loaded classifier with what it needs to read text."""

    model: SequenceClassifier
    config: Config
    tokenizer: Tokenizer

    @property
    def labels(self) -> list[str]:
        return self.config.finetune.labels

    def probabilities(self, texts: Sequence[str], batch_size: int = 64,
                      autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """P(label | text) for each text, (N, n_labels) float32 on the CPU."""
        return label_probabilities(self.model, self.tokenizer, texts, self.config.finetune.max_length,
                                   batch_size=batch_size, autocast_dtype=autocast_dtype)

    def classify(self, texts: Sequence[str], batch_size: int = 64) -> list[dict]:
        """For each text: {"label": the most probable, "probabilities": {label: p}}."""
        return self.records(self.probabilities(texts, batch_size))

    def records(self, probs: torch.Tensor) -> list[dict]:
        """`classify`'s records from the probabilities (N, n_labels)."""
        return [{"label": self.labels[int(row.argmax())],
                 "probabilities": {label: round(float(p), 6) for label, p in zip(self.labels, row)}}
                for row in probs]


def label_probabilities(model: SequenceClassifier, tokenizer: Tokenizer, texts: Sequence[str], max_length: int, *,
                        batch_size: int = 64, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax of the classifier's logits for each text, (N, n_labels) float32 on the CPU, in the
    texts' order."""
    return rows_probabilities(model, encode_texts(tokenizer, list(texts), max_length), batch_size=batch_size,
                              autocast_dtype=autocast_dtype)


@torch.no_grad()
def rows_probabilities(model: SequenceClassifier, rows: Sequence[list[int]], *, batch_size: int = 64,
                       autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`label_probabilities` of texts already encoded by `encode_texts`; rows of similar length are
    batched together so little is padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows), model.head.out_features)
    device = next(model.parameters()).device
    amp = torch.autocast(device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            x, lengths = collate([rows[i] for i in chunk])
            with amp:
                logits = model(x.to(device), lengths.to(device))
            out[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
    finally:
        model.train(was_training)
    return out


def classify_file(classifier: Classifier, sources: list[str], *, label_field: str | None = None,
                  batch_size: int = 64) -> tuple[list[dict], ClassificationScores | None]:
    """Classify every text of `sources` (read with the classifier's data.* settings and
    finetune.text_field): one record per text, in order. With `label_field`, each record's gold label
    is read too and the scores come back; a label the classifier does not know is an error that names
    the file and the field."""
    data_cfg = dataclasses.replace(classifier.config.data, text_field=classifier.config.finetune.text_field)
    reader = DocumentReader(sources, data_cfg, text_key="finetune.text_field")
    if label_field is None:
        texts, gold = list(reader), None
    else:
        texts, gold = [], []
        index = {label: i for i, label in enumerate(classifier.labels)}
        for text, label in reader.labelled(label_field):
            if label not in index:
                raise DataError(f"{reader.current}: label {label!r} in field {label_field!r} is not one the "
                                f"classifier knows ({', '.join(classifier.labels)})")
            texts.append(text)
            gold.append(index[label])
    probs = classifier.probabilities(texts, batch_size)
    records = [{"text": text, **r} for text, r in zip(texts, classifier.records(probs))]
    if gold is None:
        return records, None
    for record, g in zip(records, gold):
        record["gold"] = classifier.labels[g]
    return records, ClassificationScores.of(gold, probs.argmax(-1).tolist(), classifier.labels)
