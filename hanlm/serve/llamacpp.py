"""`hanlm serve --engine llama.cpp`: a gpt checkpoint's GGUF run by llama.cpp behind the server's own engine.

`LlamaCppLM` is the language-model interface over a llama.cpp context, so `hanlm.serve.engine.Engine`
batches, samples and streams it as it does a torch model: continuous batching, hanlm's sampling (the
same seeds, temperatures, top-k and top-p as with torch), stop strings, logprobs, echo, /v1/score,
auth and metrics all stay hanlm's. llama.cpp computes the logits; everything else is unchanged.

Each sequence lives in llama.cpp's KV cache under a sequence id of its own (a slot, with its own
stream of `context_length` cells: `kv_unified` off). A state is a slot and how many positions of it
the state holds; a state extends its slot in place when it is at the slot's tip and no other row of
the step has claimed it, otherwise it is copied into a free slot first (a request's `n` choices
share their prompt's slot until their first step). A slot is free once no live state holds it (the
engine drops the states of finished sequences), so slots are never lost to a failed step.

The GGUF comes from `hanlm.export.gguf_cache`: written once per checkpoint content, reused on the
next start. llama-cpp-python is the optional extra `hanlm[llamacpp]`.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hanlm.checkpoint import ARPA_SUFFIXES
from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError, ConfigError
from hanlm.export.gguf_cache import cached_gguf
from hanlm.export.gguf_export import TOKENIZERS, beyond_llama
from hanlm.loading import open_checkpoint
from hanlm.mixture_file import is_mixture
from hanlm.models.base import LanguageModel
from hanlm.serve.protocol import MAX_CHOICES

MISSING = "--engine llama.cpp needs llama-cpp-python: pip install 'hanlm[llamacpp]'"
# llama.cpp's LLAMA_MAX_SEQ: the most sequence ids one context holds.
MAX_SEQUENCES = 256
_CPU = torch.device("cpu")
_GGML_LOG_ERROR = 4  # ggml_log_level: none, debug, info, warn, error, cont


def _errors_only(level: int, text: bytes, _: Any) -> None:
    """llama.cpp's log callback: its errors go to stderr, its notes on loading and sizes nowhere."""
    if level == _GGML_LOG_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


@functools.cache
def _binding() -> tuple[Any, Any]:
    """llama_cpp, and the log callback it was given (kept alive here: llama.cpp holds only its address)."""
    try:
        import llama_cpp as lib
    except ImportError:
        raise ConfigError(MISSING) from None
    if not hasattr(lib, "llama_memory_seq_cp") or "kv_unified" not in dict(lib.llama_context_params._fields_):
        raise ConfigError(f"llama-cpp-python {lib.__version__} predates the llama.cpp API that --engine llama.cpp "
                          "uses (llama_memory_*, kv_unified): pip install -U 'hanlm[llamacpp]'")
    callback = lib.llama_log_callback(_errors_only)
    lib.llama_log_set(callback, None)
    return lib, callback


def llama_cpp() -> Any:
    """The llama_cpp module; ConfigError naming the pip command when it is missing."""
    return _binding()[0]


def sequences_for(max_batch: int) -> int:
    """The slots a server of `max_batch` needs: its batch, or one request's `n` choices (admitted alone
    when they are more), and one for /v1/score. ConfigError beyond llama.cpp's limit."""
    sequences = max(max_batch, MAX_CHOICES) + 1
    if sequences > MAX_SEQUENCES:
        raise ConfigError(f"serve.max_batch {max_batch}: llama.cpp holds at most {MAX_SEQUENCES} sequences, one of "
                          f"them for /v1/score, so --engine llama.cpp decodes at most {MAX_SEQUENCES - 1} together")
    return sequences


class _Slot:
    """A llama.cpp sequence id, how many positions its cache holds, and the live states that read it."""

    def __init__(self, seq_id: int):
        self.seq_id, self.length = seq_id, 0
        self.holders: weakref.WeakSet[_State] = weakref.WeakSet()


class _State:
    """A sequence's state: the first `length` positions of `slot` (None: nothing yet)."""

    __slots__ = ("slot", "length", "__weakref__")

    def __init__(self, slot: _Slot | None, length: int):
        self.slot, self.length = slot, length
        if slot is not None:
            slot.holders.add(self)


class LlamaCppLM(LanguageModel):
    """The gpt in a GGUF file, computed by llama.cpp on `threads` threads, for up to `sequences` sequences
    of at most `context_length` tokens at once (their KV caches allocated up front)."""

    def __init__(self, gguf: Path, *, context_length: int, sequences: int, threads: int):
        super().__init__()
        lib = self._lib = llama_cpp()
        model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if not model:
            raise CheckpointError(f"{gguf}: llama.cpp cannot load it; delete it and start again to have it written "
                                  "anew")
        params = lib.llama_context_default_params()
        params.n_seq_max, params.kv_unified = sequences, False
        params.n_ctx = context_length * sequences  # each sequence's stream gets an equal share
        params.n_batch = max(context_length, sequences)  # a whole prompt, or one token of every sequence
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        params.n_threads = params.n_threads_batch = threads
        context = lib.llama_init_from_model(model, params)
        if not context:
            lib.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not make a context of {sequences} sequences × {context_length} "
                               f"tokens for {gguf}")
        batch = lib.llama_batch_init(params.n_batch, 0, 1)
        self._context, self._batch, self._memory = context, batch, lib.llama_get_memory(context)
        self._finalizer = weakref.finalize(self, _free, lib, model, context, batch)
        self.context_length = context_length
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self._slots = [_Slot(i) for i in range(sequences)]

    @property
    def device(self) -> torch.device:
        """The CPU, where llama.cpp's logits arrive (asked twice a step: a constant, not a search of the
        parameters, which this model has none of)."""
        return _CPU

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Normalised logits (log-probabilities, B, T, V) of `x`, row by row; llama.cpp does not train."""
        if y is not None:
            raise TypeError("a llama.cpp model computes no loss: it is not trained")
        return torch.cat([self.log_probs(row[None], self.initial_state())[0] for row in x])

    def initial_state(self, batch_size: int = 1) -> _State:
        if batch_size != 1:
            raise ValueError("a llama.cpp state holds one sequence; decode_step batches sequences")
        return _State(None, 0)

    def log_probs(self, tokens: Tensor, state: _State) -> tuple[Tensor, _State]:
        """One sequence continued by `tokens` (1, T): log-probabilities after every position (1, T, V)."""
        if tokens.size(0) != 1:
            raise ValueError(f"a llama.cpp state holds one sequence, not {tokens.size(0)}")
        ids = tokens[0].tolist()
        after = self._claim(state, len(ids), set())
        logp = self._decode([(t, state.length + i, after.slot.seq_id) for i, t in enumerate(ids)])
        return logp[None], after

    def decode_step(self, tokens: Tensor, states: list[_State]) -> tuple[Tensor, list[_State]]:
        """One token for each of B sequences (B,) in one llama_decode: log-probabilities (B, V)."""
        claimed: set[int] = set()
        after = [self._claim(state, 1, claimed) for state in states]
        entries = [(t, state.length, a.slot.seq_id) for t, state, a in zip(tokens.tolist(), states, after)]
        return self._decode(entries), after

    def _claim(self, state: _State, n: int, claimed: set[int]) -> _State:
        """The state `n` positions on from `state`, on a slot that holds `state`'s positions and nothing
        after them: its own when `state` is at its tip and no row of this step (`claimed`) took it, else a
        free slot that gets a copy. The caller writes the `n` positions."""
        if state.length + n > self.context_length:
            raise ValueError(f"{state.length + n} tokens are beyond the model's context of {self.context_length}")
        slot = state.slot
        if slot is None or slot.length != state.length or slot.seq_id in claimed:
            free = next((s for s in self._slots if not s.holders), None)
            if free is None:
                raise RuntimeError(f"all {len(self._slots)} llama.cpp sequences are in use")
            self._lib.llama_memory_seq_rm(self._memory, free.seq_id, -1, -1)
            if slot is not None and state.length:
                # Across streams llama.cpp copies a whole one; the positions past the state go again.
                self._lib.llama_memory_seq_cp(self._memory, slot.seq_id, free.seq_id, -1, -1)
                self._lib.llama_memory_seq_rm(self._memory, free.seq_id, state.length, -1)
            slot = free
        claimed.add(slot.seq_id)
        slot.length = state.length + n
        return _State(slot, slot.length)

    def _decode(self, entries: list[tuple[int, int, int]]) -> Tensor:
        """Run (token, position, sequence id) entries in one llama_decode; each one's next-token
        log-probabilities (len(entries), V)."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, position, seq_id) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, True
            batch.seq_id[i][0] = seq_id
        status = self._lib.llama_decode(self._context, batch)
        if status != 0:
            raise RuntimeError(f"llama.cpp's llama_decode returned {status}")
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self._context), shape=(len(entries), self.vocab_size))
        return torch.from_numpy(logits).log_softmax(-1)  # a copy: the next decode overwrites llama.cpp's buffer


def _free(lib: Any, model: Any, context: Any, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(context)
    lib.llama_model_free(model)


def llama_cpp_model(path: str, *, max_batch: int, dtype: str = "f32", device: str = "cpu",
                    speculative: str = "none", threads: int | None = None,
                    note: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                    ) -> tuple[LlamaCppLM, Config, Tokenizer]:
    """The gpt checkpoint at `path` (resolved) run by llama.cpp for a server of `max_batch`, with its config
    and tokenizer: what llama.cpp cannot serve is refused (ConfigError, CheckpointError), the cached GGUF is
    written or reused (`note` says which) and opened on `threads` threads (torch's count when None)."""
    llama_cpp()  # missing: refused before anything is read
    if device != "cpu":
        raise ConfigError(f"--device {device}: --engine llama.cpp runs on the CPU here; drop --device or use "
                          "--engine torch")
    if speculative != "none":
        raise ConfigError(f"--engine llama.cpp does not speculate (generate.speculative is {speculative}): drop "
                          "--speculative, or serve with --engine torch")
    sequences = sequences_for(max_batch)
    if is_mixture(path) or path.endswith(ARPA_SUFFIXES):
        raise CheckpointError(f"{path} is {'a mixture' if is_mixture(path) else 'an ARPA n-gram model'}: --engine "
                              "llama.cpp serves gpt language models only; serve it with --engine torch")
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    m = cfg.model
    if m.task != "lm" or m.arch != "gpt":
        what = {"lm": f"a language model of model.arch {m.arch}", "classify": "a text classifier",
                "tag": "a word segmenter", "ner": "an entity recognizer"}.get(m.task, "not a language model")
        raise CheckpointError(f"{path} is {what} (model.task {m.task}): --engine llama.cpp serves gpt language "
                              "models only (classifiers and taggers run on torch); serve it with --engine torch")
    beyond = beyond_llama(m)
    if beyond:
        raise CheckpointError(f"{path}: model.{beyond[0]} is beyond the llama architecture hanlm writes as GGUF; "
                              "serve it with --engine torch")
    if ckpt.tokenizer.kind not in TOKENIZERS:
        raise CheckpointError(f"{path}: its {ckpt.tokenizer.kind} tokenizer is not one hanlm writes into a GGUF "
                              f"({', '.join(TOKENIZERS)}); serve it with --engine torch")
    gguf, written = cached_gguf(ckpt, dtype)
    note(f"llama.cpp: {'wrote' if written else 'reusing'} {gguf} ({dtype}) for {path}")
    model = LlamaCppLM(gguf, context_length=m.context_length, sequences=sequences,
                       threads=threads or torch.get_num_threads())
    return model, cfg, ckpt.tokenizer
