"""The linear-chain CRF tagger, on python-crfsuite (CRFsuite's L-BFGS trainer and Viterbi tagger).

Features of character i: the characters at offsets −2 … +2, the bigrams (−2,−1), (−1,0), (0,+1),
(+1,+2) and (−1,+1), and the kinds (Han, digit, Latin letter, punctuation, other) of i−1, i, i+1:
the classic feature set of CRF segmenters (Tseng et al. 2005, Zhao et al. 2006), with sentence
boundaries as their own symbols. Training minimises the negative log-likelihood with L1 and L2
penalties (finetune.crf_c1, crf_c2; OWL-QN, at most finetune.crf_iterations iterations): the L1
term zeroes most of the millions of candidate feature weights.

CRFsuite's model file is its own binary format, not a pickle; a checkpoint carries it byte for
byte as the uint8 tensor `crfsuite.model` of its safetensors weights, under the checkpoint's
integrity manifest, and it is opened from memory.
"""

from __future__ import annotations

import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hanlm.data.tagged import TaggedSentence
from hanlm.errors import CheckpointError, HanlmError
from hanlm.tasks.bmes import char_tags
from hanlm.tasks.tagging import Tagger

WEIGHT = "crfsuite.model"
_BOS, _EOS = "\x02", "\x03"


def _kind(ch: str) -> str:
    if ch in (_BOS, _EOS):
        return "edge"
    if "0" <= ch <= "9" or "０" <= ch <= "９" or ch in "零一二三四五六七八九十百千万亿":
        return "digit"
    if ch.isascii() and ch.isalpha() or "Ａ" <= ch <= "ｚ":
        return "latin"
    category = unicodedata.category(ch)
    if category.startswith("P") or category.startswith("S"):
        return "punct"
    return "han" if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" else "other"


def features(text: str) -> list[list[str]]:
    """The feature strings of each character of `text`."""
    padded = _BOS * 2 + text + _EOS * 2
    kinds = [_kind(c) for c in padded]
    out = []
    for i in range(2, len(text) + 2):
        a, b, c, d, e = padded[i - 2:i + 3]
        out.append([f"a{a}", f"b{b}", f"c{c}", f"d{d}", f"e{e}", f"ab{a}{b}", f"bc{b}{c}", f"cd{c}{d}",
                    f"de{d}{e}", f"bd{b}{d}", f"k{kinds[i - 1]}{kinds[i]}{kinds[i + 1]}"])
    return out


class CRFTagger(Tagger):
    """A trained CRFsuite model, opened from its bytes."""

    def __init__(self, tags: Sequence[str], model_bytes: bytes, source: str = "the CRF model"):
        import pycrfsuite

        self.tags, self.model_bytes = list(tags), model_bytes
        self._tagger = pycrfsuite.Tagger()
        try:
            self._tagger.open_inmemory(model_bytes)
        except (ValueError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{source} is not a CRFsuite model ({e})") from None
        unknown = sorted(set(self._tagger.labels()) - set(self.tags))
        if unknown:
            raise CheckpointError(f"{source} has tags {unknown} that finetune.labels does not list")

    @classmethod
    def fit(cls, sentences: Sequence[TaggedSentence], tags: Sequence[str], *, c1: float, c2: float, iterations: int,
            progress: Callable[[int, float], None] | None = None) -> CRFTagger:
        """Train on `sentences` (BMES tags); `progress(iteration, loss)` after each L-BFGS iteration."""
        return cls.fit_sequences([(s.text, char_tags(s, "bmes")) for s in sentences], tags, c1=c1, c2=c2,
                                 iterations=iterations, progress=progress)

    @classmethod
    def fit_sequences(cls, pairs: Sequence[tuple[str, list[str]]], tags: Sequence[str], *, c1: float, c2: float,
                      iterations: int, progress: Callable[[int, float], None] | None = None) -> CRFTagger:
        """Train on (text, one tag per character) pairs: word tags for segmentation, entity tags for NER."""
        import pycrfsuite

        class Trainer(pycrfsuite.Trainer):
            """Its events, which it only raises when verbose, go to `progress` instead of stdout."""

            def on_iteration(self, log: str, info: dict) -> None:
                if progress is not None:
                    progress(int(info.get("num", 0)), float(info.get("loss", float("nan"))))

            def on_start(self, log: str) -> None: ...
            def on_featgen_progress(self, log: str, percent: float) -> None: ...
            def on_featgen_end(self, log: str) -> None: ...
            def on_prepared(self, log: str) -> None: ...
            def on_optimization_end(self, log: str) -> None: ...
            def on_end(self, log: str) -> None: ...

        trainer = Trainer(verbose=True)
        for text, labels in pairs:
            trainer.append(features(text), labels)
        trainer.set_params({"c1": c1, "c2": c2, "max_iterations": iterations,
                            "feature.possible_transitions": True})
        with tempfile.TemporaryDirectory(prefix="hanlm-crf-") as tmp:
            path = Path(tmp) / "model.crfsuite"
            try:
                trainer.train(str(path))
            except (RuntimeError, ValueError) as e:
                raise HanlmError(f"CRFsuite training failed: {e}") from None
            return cls(tags, path.read_bytes())

    def tag(self, texts: Sequence[str]) -> list[list[str]]:
        return [self._tagger.tag(features(t)) if t else [] for t in texts]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint saves: the model file's bytes."""
        return {WEIGHT: torch.frombuffer(bytearray(self.model_bytes), dtype=torch.uint8)}

    @classmethod
    def from_weights(cls, tags: Sequence[str], weights: dict[str, torch.Tensor], source: str) -> CRFTagger:
        if WEIGHT not in weights or weights[WEIGHT].dtype != torch.uint8 or weights[WEIGHT].dim() != 1:
            raise CheckpointError(f"{source} holds no CRF model (a 1-D uint8 tensor {WEIGHT!r})")
        return cls(tags, weights[WEIGHT].numpy().tobytes(), source)
