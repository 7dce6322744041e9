"""Taggers as checkpoints: the tagger a checkpoint holds (any kind), and segmenting files with it.

A tagger checkpoint is a checkpoint like any other (config.yaml with model.task tag and
finetune.tagger, tokenizer.json, model.safetensors, the manifest), so `tagger_of` builds every kind
from one; `hanlm.loading.load_tagger` finds and reads the checkpoint. Training them is
`hanlm.finetune` (neural taggers through the Finetuner, hmm and crf by counting).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hanlm.checkpoint import Checkpoint, load_weights
from hanlm.config import Config
from hanlm.data.tagged import TaggedSentence, read_tagged, text_lines
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError
from hanlm.tasks.crf import CRFTagger
from hanlm.tasks.hmm import HMMTagger
from hanlm.tasks.metrics import SegmentationScores
from hanlm.tasks.neural_tagger import NeuralTagger, build_tagger_network
from hanlm.tasks.tagging import Tagger


@dataclass
class LoadedTagger:
    tagger: Tagger
    config: Config
    tokenizer: Tokenizer
    path: str

    @property
    def description(self) -> str:
        ft = self.config.finetune
        kind = f"neural ({self.config.model.arch}, {ft.tag_head} head)" if ft.tagger == "neural" else ft.tagger
        return f"{kind} tagger, scheme {ft.tag_scheme}, {len(ft.labels)} tags"


def tagger_of(ckpt: Checkpoint, device: str | torch.device = "cpu") -> Tagger:
    """The tagger a checkpoint of model.task tag holds."""
    ft = ckpt.config.finetune
    if ckpt.config.model.task != "tag":
        raise CheckpointError(f"{ckpt.path} is not a tagger (model.task {ckpt.config.model.task}): train one with "
                              "`hanlm finetune --task tag`")
    if not ft.labels:
        raise CheckpointError(f"{ckpt.path}/config.yaml lists no tags (finetune.labels)")
    if ft.tagger == "crf":
        return CRFTagger.from_weights(ft.labels, ckpt.weights, f"{ckpt.path}/model.safetensors")
    if ft.tagger == "hmm":
        model = HMMTagger(ft.labels, ckpt.tokenizer)
        load_weights(model, ckpt.weights, ckpt.path)
        return model
    return neural_tagger_of(ckpt, device)


def neural_tagger_of(ckpt: Checkpoint, device: str | torch.device = "cpu") -> NeuralTagger:
    """The neural tagger of a checkpoint of model.task tag or ner (finetune.tagger neural)."""
    network = build_tagger_network(ckpt.config, ckpt.tokenizer.vocab_size)
    load_weights(network, ckpt.weights, ckpt.path)
    return NeuralTagger(network.to(device).eval(), ckpt.tokenizer, ckpt.config.finetune.labels,
                        ckpt.config.finetune.max_length)


def segment_file(loaded: LoadedTagger, sources: list[str], fmt: str = "words", *, gold: bool = False,
                 batch: int = 256) -> tuple[Iterator[TaggedSentence], Callable[[], SegmentationScores | None]]:
    """Segment every line of `sources` (read with the tagger's data.* settings). With `gold`, the files
    are read as tagged text in format `fmt` and scored; else each line is raw text. Returns the
    predicted sentences (lazily, in order) and a function giving the scores once they are consumed."""
    scores = SegmentationScores() if gold else None

    def texts() -> Iterator[TaggedSentence]:
        if gold:
            yield from read_tagged(sources, loaded.config.data, fmt)
            return
        for src, number, line in text_lines(sources, loaded.config.data):
            if line.strip():
                yield TaggedSentence([line], None, f"{src.url}:{number}")

    def predicted() -> Iterator[TaggedSentence]:
        source = texts()
        while chunk := list(itertools.islice(source, batch)):
            for g, p in zip(chunk, loaded.tagger.segment([s.text if gold else s.words[0] for s in chunk])):
                if scores is not None:
                    scores.add(g.words, p.words, frozenset(), g.tags, p.tags)
                p.where = g.where
                yield p

    return predicted(), lambda: scores
