"""What `hanlm finetune` trains for: the data, head, batches and scores of each task, behind one interface.

The Finetuner (`hanlm.finetune.run`) owns everything the tasks share: the pretrained
backbone, the optimizer and schedule, distributed steps, checkpoints, resume, dev selection and
the report. A task supplies the rest: `classify` (a label per text: `hanlm.tasks.labelled`,
`hanlm.tasks.classifier`), `tag` (a tag per character: `hanlm.tasks.tagging`,
`hanlm.tasks.neural_tagger`) and `ner` (entity tags per character: `hanlm.tasks.ner`, the same network).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.tasks.bmes import char_tags, cut_sentence
from hanlm.tasks.labelled import collate, encode_texts, read_labelled
from hanlm.tasks.metrics import ClassificationScores


class FinetuneTask(ABC):
    """One task's data (read, split and encoded once) and how to train and score its head."""

    name: str
    labels: list[str]

    @abstractmethod
    def prepare(self, cfg: Config, tokenizer: Tokenizer) -> None:
        """Read and split the data of `cfg` and encode it; sets `labels` (cfg.finetune.labels when given)."""

    @abstractmethod
    def summary(self) -> str: ...

    @abstractmethod
    def split_sizes(self) -> dict[str, int]: ...

    @abstractmethod
    def train_lengths(self) -> list[int]:
        """The length of each training example, for batching similar lengths together."""

    @abstractmethod
    def build(self, cfg: Config, vocab_size: int) -> nn.Module:
        """The task's network (backbone + head) for a resolved config."""

    @abstractmethod
    def batch(self, indices: Sequence[int]) -> tuple[tuple[Tensor, ...], int]:
        """The model's inputs and targets for training examples `indices`, and the tokens they hold."""

    @abstractmethod
    def probe_batch(self, size: int, length: int, vocab_size: int, device: torch.device) -> tuple[Tensor, ...]:
        """A batch of `size` examples of `length` tokens, for measuring memory."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, batch_size: int, amp: torch.dtype | None):
        """(scores, mean loss or None) of the model on a split; scores have `primary` and `headline`."""

    def report_sections(self, test) -> dict[str, str]:
        """Task-specific sections of the run's report."""
        return {}


class ClassifyTask(FinetuneTask):
    name = "classify"

    def prepare(self, cfg: Config, tokenizer: Tokenizer) -> None:
        self.data = read_labelled(cfg)
        self.labels = self.data.labels
        self.rows = {name: encode_texts(tokenizer, split.texts, cfg.finetune.max_length)
                     for name, split in self.data.splits.items()}
        self.pad_id = tokenizer.pad_id

    def summary(self) -> str:
        return self.data.summary()

    def split_sizes(self) -> dict[str, int]:
        return {name: len(s) for name, s in self.data.splits.items()}

    def train_lengths(self) -> list[int]:
        return [len(r) for r in self.rows["train"]]

    def build(self, cfg: Config, vocab_size: int) -> nn.Module:
        from hanlm.tasks.classifier import build_classifier

        return build_classifier(cfg, vocab_size)

    def batch(self, indices: Sequence[int]) -> tuple[tuple[Tensor, ...], int]:
        x, lengths = collate([self.rows["train"][i] for i in indices], self.pad_id)
        y = torch.tensor([self.data.splits["train"].labels[i] for i in indices])
        return (x, lengths, y), int(lengths.sum())

    def probe_batch(self, size: int, length: int, vocab_size: int, device: torch.device) -> tuple[Tensor, ...]:
        x = torch.randint(0, vocab_size, (size, length), device=device)
        full = torch.full((size,), length, device=device)
        return x, full, torch.randint(0, len(self.labels), (size,), device=device)

    def evaluate(self, model: nn.Module, split: str, batch_size: int, amp: torch.dtype | None):
        from hanlm.tasks.predict import rows_probabilities

        data = self.data.splits[split]
        probs = rows_probabilities(model, self.rows[split], batch_size=batch_size, autocast_dtype=amp)
        gold = torch.tensor(data.labels)
        loss = float(-probs[torch.arange(len(gold)), gold].clamp(min=1e-12).log().mean())
        return ClassificationScores.of(data.labels, probs.argmax(-1).tolist(), self.labels), loss

    def report_sections(self, test: ClassificationScores) -> dict[str, str]:
        return {"Confusion matrix (test)": test.confusion_table()}


class TagTask(FinetuneTask):
    """Segmentation (and POS tagging) as a tag per character, trained on gold pieces of at most
    finetune.max_length − 2 characters (paragraphs cut after sentence ends, else between words)."""

    name = "tag"

    def prepare(self, cfg: Config, tokenizer: Tokenizer) -> None:
        from hanlm.tasks.neural_tagger import encode_row
        from hanlm.tasks.tagging import read_tagged_data

        self.data = read_tagged_data(cfg)
        self.labels = self.data.tags
        self.tokenizer, self.max_length, self.scheme = tokenizer, cfg.finetune.max_length, cfg.finetune.tag_scheme
        index = {t: i for i, t in enumerate(self.labels)}
        self.train_rows = []
        for sentence in self.data.splits["train"]:
            for piece in cut_sentence(sentence, self.max_length - 2):
                row = encode_row(tokenizer, piece.text, [index[t] for t in char_tags(piece, self.scheme)])
                if len(row.ids) <= self.max_length:  # a piece whose BPE splits too many characters is skipped
                    self.train_rows.append(row)

    def summary(self) -> str:
        return f"{self.data.summary()}; {len(self.train_rows):,} training pieces"

    def split_sizes(self) -> dict[str, int]:
        return self.data.split_sizes()

    def train_lengths(self) -> list[int]:
        return [len(r.ids) for r in self.train_rows]

    def build(self, cfg: Config, vocab_size: int) -> nn.Module:
        from hanlm.tasks.neural_tagger import build_tagger_network

        return build_tagger_network(cfg, vocab_size)

    def batch(self, indices: Sequence[int]) -> tuple[tuple[Tensor, ...], int]:
        from hanlm.tasks.neural_tagger import collate_rows

        inputs = collate_rows([self.train_rows[i] for i in indices], self.tokenizer.pad_id)
        return inputs, sum(len(self.train_rows[i].ids) for i in indices)

    def probe_batch(self, size: int, length: int, vocab_size: int, device: torch.device) -> tuple[Tensor, ...]:
        chars = length - 1
        ids = torch.randint(0, vocab_size, (size, length), device=device)
        positions = torch.arange(1, length, device=device).expand(size, chars).contiguous()
        pieces = torch.zeros(size, chars, dtype=torch.long, device=device)
        char_ids = torch.randint(0, 20_000, (size, chars), device=device)
        lengths = torch.full((size,), chars)
        targets = torch.zeros(size, chars, dtype=torch.long, device=device)  # tag 0 throughout: a valid path
        return ids, positions, pieces, char_ids, lengths, targets

    def evaluate(self, model: nn.Module, split: str, batch_size: int, amp: torch.dtype | None):
        """Scores of `Tagger.segment` on the split's whole sentences: the path `hanlm segment` takes."""
        from hanlm.tasks.tagging import evaluate_segmenter

        return evaluate_segmenter(self.tagger(model, batch_size, amp).segment, self.data.splits[split],
                                  self.data.vocabulary).scores, None

    def tagger(self, model: nn.Module, batch_size: int, amp: torch.dtype | None):
        from hanlm.tasks.neural_tagger import NeuralTagger

        return NeuralTagger(model, self.tokenizer, self.labels, self.max_length, batch_size=batch_size,
                            autocast_dtype=amp)


class NerTask(TagTask):
    """Named entities as BIO / BIOES tags per character, on the same network as segmentation: trained on pieces
    of at most finetune.max_length − 2 characters cut outside entities, scored by exact entity spans."""

    name = "ner"

    def prepare(self, cfg: Config, tokenizer: Tokenizer) -> None:
        from hanlm.data.entities import spans_to_tags
        from hanlm.tasks.ner import entity_pieces, read_ner_data
        from hanlm.tasks.neural_tagger import encode_row

        self.data = read_ner_data(cfg)
        self.labels = self.data.tags
        self.tokenizer, self.max_length = tokenizer, cfg.finetune.max_length
        index = {t: i for i, t in enumerate(self.labels)}
        self.train_rows = []
        for sentence in self.data.splits["train"]:
            for piece in entity_pieces(sentence, self.max_length - 2):
                tags = spans_to_tags(len(piece.text), piece.entities, self.data.scheme)
                row = encode_row(tokenizer, piece.text, [index[t] for t in tags])
                if len(row.ids) <= self.max_length:
                    self.train_rows.append(row)

    def evaluate(self, model: nn.Module, split: str, batch_size: int, amp: torch.dtype | None):
        from hanlm.tasks.ner import EntityTagger, evaluate_entities

        tagger = EntityTagger(self.tagger(model, batch_size, amp), self.data.scheme, "neural")
        return evaluate_entities(tagger.entities, self.data.splits[split]).scores, None


TASKS: dict[str, Callable[[], FinetuneTask]] = {"classify": ClassifyTask, "tag": TagTask, "ner": NerTask}


def headline_table(rows: dict[str, object], sizes: dict[str, int], unit: str) -> str:
    """A Markdown table of each split's headline scores."""
    first = next(iter(rows.values()))
    keys = list(first.headline)
    head = f"| split | {unit} | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    rule = "|---" * (len(keys) + 2) + "|"
    lines = [f"| {name} | {sizes.get(name, 0):,} | " + " | ".join(f"{s.headline.get(k, float('nan')):.4f}"
                                                                for k in keys) + " |"
             for name, s in rows.items()]
    return "\n".join([head, rule, *lines])

