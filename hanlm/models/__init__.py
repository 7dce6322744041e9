"""Model registry: `build_model(cfg.model, vocab_size)` turns an arch name into a LanguageModel."""

from __future__ import annotations

from hanlm.config import ModelConfig
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError
from hanlm.models.base import LanguageModel
from hanlm.models.gpt import GPT, KVCache
from hanlm.models.lstm import LSTMLM
from hanlm.models.ngram import NGramLM
from hanlm.models.vectors import VectorReport, load_vectors

ARCHS: dict[str, type[LanguageModel]] = {"gpt": GPT, "lstm": LSTMLM}

__all__ = [
    "ARCHS",
    "GPT",
    "LSTMLM",
    "KVCache",
    "LanguageModel",
    "NGramLM",
    "VectorReport",
    "build_model",
    "load_vectors",
]


def build_model(cfg: ModelConfig, vocab_size: int, tokenizer: Tokenizer | None = None) -> LanguageModel:
    """A freshly initialised model of `cfg.arch` (presets already applied by load_config).

    When `cfg.vectors` is set, its vectors fill the token embedding; that needs the tokenizer,
    and the result is on `model.vector_report` (None when no vectors were asked for).
    """
    if cfg.arch == "ngram":
        raise ConfigError("model.arch=ngram is estimated from counts, not initialised with weights: "
                          "`hanlm train --set model.arch=ngram` builds it (hanlm.train.ngram)")
    if cfg.arch not in ARCHS:
        raise ConfigError(f"model.arch={cfg.arch!r} is unknown; valid: {', '.join(ARCHS)}")
    model = ARCHS[cfg.arch](cfg, vocab_size)
    if cfg.vectors is not None:
        if tokenizer is None:
            raise ConfigError(f"model.vectors={cfg.vectors!r} needs the tokenizer to match tokens to vectors; "
                              "pass it to build_model")
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model is built for "
                              f"{vocab_size}; use the tokenizer the data was encoded with")
        model.vector_report = load_vectors(cfg.vectors, tokenizer, model.tok_emb)
    return model
