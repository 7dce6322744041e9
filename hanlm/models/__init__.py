"""Model registry: `build_model(cfg.model, vocab_size)` turns an arch name into a LanguageModel."""

from __future__ import annotations

import psutil
import torch

from hanlm.config import Config, ModelConfig
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError
from hanlm.models.base import LanguageModel
from hanlm.models.bert import Bert
from hanlm.models.electra import ElectraPretraining
from hanlm.models.encoder import Encoder
from hanlm.models.gpt import GPT, KVCache
from hanlm.models.lstm import LSTMLM
from hanlm.models.ngram import NGramLM
from hanlm.models.vectors import VectorReport, load_vectors

ARCHS: dict[str, type[LanguageModel]] = {"gpt": GPT, "lstm": LSTMLM, "encoder": Encoder, "bert": Bert}

__all__ = [
    "ARCHS",
    "Bert",
    "Encoder",
    "GPT",
    "LSTMLM",
    "KVCache",
    "LanguageModel",
    "NGramLM",
    "VectorReport",
    "build_model",
    "build_for_training",
    "load_vectors",
    "preflight",
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
    preflight(cfg, vocab_size)
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


def preflight(cfg: ModelConfig, vocab_size: int, available: int | None = None) -> int:
    """The bytes of `cfg`'s weights and buffers, counted on PyTorch's meta device (nothing is allocated);
    ConfigError naming the shape keys when they exceed the memory available (`available`, default: what
    the OS reports free), before anything is allocated. A model that cannot hold its weights cannot train."""
    with torch.device("meta"):
        shape = ARCHS[cfg.arch](cfg, vocab_size)
    need = sum(t.numel() * t.element_size() for t in (*shape.parameters(), *shape.buffers()))
    available = psutil.virtual_memory().available if available is None else available
    if need > available:
        keys = ", ".join(f"model.{k} {getattr(cfg, k):,}" for k in ("n_layer", "n_head", "n_embd", "context_length")
                         if getattr(cfg, k, None) is not None)
        raise ConfigError(f"a {cfg.arch} of {keys} over {vocab_size:,} tokens needs {need / 2**30:,.1f} GiB for its "
                          f"weights alone, and {available / 2**30:,.1f} GiB of memory is available: make it smaller")
    return need


def build_for_training(cfg: Config, vocab_size: int, tokenizer: Tokenizer | None = None) -> LanguageModel:
    """What `train.objective` trains: the model of model.arch (lm, mlm), or for electra the encoder as the
    discriminator of an `ElectraPretraining` with its generator."""
    model = build_model(cfg.model, vocab_size, tokenizer)
    if cfg.train.objective != "electra":
        return model
    electra = ElectraPretraining(cfg.model, vocab_size, cfg.train.electra_generator, cfg.train.rtd_weight)
    electra.discriminator.load_state_dict(model.state_dict())  # the vectors, when model.vectors gave some
    return electra
