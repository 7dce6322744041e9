"""Labelled text for classification: read, deduplicate, split deterministically, encode.

Every distinct text appears once, on one side of the split: chn-reviews holds 35,123 reviews but
only ~17,400 distinct texts, and a split that ignored the duplicates would test on training
reviews. A text seen with two different labels is dropped (and counted). The split is cut on the
same stable hash of the text that `hanlm prepare` uses for its val split (`text_bucket`): the
lowest `test_fraction` of the hash range is test, the next `dev_fraction` dev, the rest train.
So a labelled corpus drawn from pretraining text has its test split inside the pretraining val
split whenever test_fraction ≤ data.val_fraction.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch

from hanlm.config import Config
from hanlm.data.corpora import CORPORA
from hanlm.data.splits import text_bucket
from hanlm.data.reader import DocumentReader
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")
REVIEWS_CORPUS = "chn-reviews"  # the default labelled data


@dataclass
class LabelledSplit:
    """Texts and their label indices (into `LabelledData.labels`)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def counts(self, n_labels: int) -> list[int]:
        """How many texts carry each label."""
        c = Counter(self.labels)
        return [c[i] for i in range(n_labels)]


@dataclass
class LabelledData:
    labels: list[str]
    splits: dict[str, LabelledSplit]
    records: int  # records read
    duplicates: int  # records whose text was already seen (with the same label)
    conflicting: int  # distinct texts dropped for carrying two or more labels

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {len(self.splits[name]):,}" for name in SPLITS)
        return (f"{self.records:,} records, {self.duplicates:,} duplicates and {self.conflicting:,} texts with "
                f"conflicting labels dropped; {sizes}; labels: {', '.join(self.labels)}")


def split_of(text: str, dev_fraction: float, test_fraction: float) -> str:
    """train, dev or test for one text, by its hash alone."""
    bucket = text_bucket(text)
    if bucket < test_fraction * 1_000_000:
        return "test"
    return "dev" if bucket < (test_fraction + dev_fraction) * 1_000_000 else "train"


def _check_fields_apply(cfg: Config, sources: list[str]) -> None:
    """finetune.text_field / label_field name fields of the user's files: on built-in corpora alone, whose
    fields are fixed, a changed one would be silently ignored, so it is an error instead."""
    if not all(source in CORPORA for source in sources):
        return
    for key in ("text_field", "label_field"):
        value = getattr(cfg.finetune, key)
        default = next(f.default for f in dataclasses.fields(cfg.finetune) if f.name == key)
        if value != default:
            raise ConfigError(f"finetune.{key} {value!r} does not apply to the built-in corpus "
                              f"{', '.join(sources)}, whose fields are fixed; drop it, or name your own files in "
                              "finetune.data")


def read_labelled(cfg: Config, sources: list[str] | None = None) -> LabelledData:
    """Read `sources` (default finetune.data, or chn-reviews when it is empty) with the data.* normalisation
    of `cfg`, keep each distinct
    text once, and split it. The labels are finetune.labels when set (a record with another label is an
    error naming its file), else every label of the train split, sorted."""
    ft = cfg.finetune
    sources = sources if sources is not None else (list(ft.data) or [REVIEWS_CORPUS])
    _check_fields_apply(cfg, sources)
    reader = DocumentReader(sources, dataclasses.replace(cfg.data, text_field=ft.text_field),
                            text_key="finetune.text_field")
    first: dict[str, str] = {}  # text -> the label it was first read with
    conflicting: set[str] = set()
    records = duplicates = 0
    for text, label in reader.labelled(ft.label_field):
        records += 1
        if ft.labels and label not in ft.labels:
            raise DataError(f"{reader.current}: label {label!r} (field {ft.label_field!r}) is not one of "
                            f"finetune.labels ({', '.join(ft.labels)})")
        if text not in first:
            first[text] = label
        elif first[text] == label:
            duplicates += 1
        else:
            conflicting.add(text)
    by_split = {name: [] for name in SPLITS}
    for text, label in first.items():
        if text not in conflicting:
            by_split[split_of(text, ft.dev_fraction, ft.test_fraction)].append((text, label))
    labels = list(ft.labels) or sorted({label for _, label in by_split["train"]})
    where = f"{', '.join(sources)} (field {ft.label_field!r})"
    if len(labels) < 2:
        raise DataError(f"{where}: the train split has {len(labels)} label{'s' if len(labels) != 1 else ''} "
                        f"({', '.join(labels) or 'none'}); a classifier needs at least two")
    index = {label: i for i, label in enumerate(labels)}
    splits = {}
    for name, pairs in by_split.items():
        unknown = sorted({label for _, label in pairs if label not in index})
        if unknown:
            raise DataError(f"{where}: the {name} split has label(s) {', '.join(unknown)} that the train split "
                            f"lacks; add training examples or list the labels in finetune.labels")
        splits[name] = LabelledSplit([t for t, _ in pairs], [index[label] for _, label in pairs])
    for name in ("train", "dev"):
        if not splits[name]:
            raise DataError(f"{where}: the {name} split is empty ({len(first):,} distinct texts); add data or "
                            "raise finetune.dev_fraction")
    return LabelledData(labels, splits, records, duplicates, len(conflicting))


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Each text as the start token + its first max_length − 2 tokens + <eos>: pretraining put <eos> between
    documents, so it marks a document's start (`Tokenizer.start_id`: a model's own start token instead where it
    has one, BERT's [CLS] that `first` pooling reads), and the last <eos> is where the whole text has been read
    (the position `last` pooling reads)."""
    start, eos = tokenizer.start_id, tokenizer.eos_id
    return [[start, *ids[:max_length - 2], eos] for ids in tokenizer.encode_batch(texts)]


def collate(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and each row's length (B,): causal models never look right, so the
    padding changes nothing they compute for the real tokens."""
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return x, torch.tensor([len(r) for r in rows], dtype=torch.long)
