"""Generation: incremental decoding over the language-model interface, with sampling controls.

The prompt is encoded after an `<eos>`, the separator training saw before every document, so a
continuation starts the way documents start. Decoding stops at `<eos>`, a stop string, the
token budget or the model's context.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hanlm.config import GenerateConfig
from hanlm.data.tokenizer import UNK_CHAR, Tokenizer
from hanlm.models import LanguageModel
from hanlm.models.base import DecodeBatch
from hanlm.sampling import SamplingParams, sample
from hanlm.speculative import DraftLength, Speculation, speculative_tokens


@dataclass
class Generation:
    """Output of `generate`: filled in as it streams."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (eos or a stop string) or "length"
    compile_seconds: float = 0.0  # spent compiling the decoding step (generate.compile)


class TextStream:
    """Token ids in, text pieces out, for streaming: a byte-level token that ends inside a
    character is held back until the character completes, and the text ends before the
    first stop string (`stopped` turns true)."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; the text now ready to show (often empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        stop_at = _first_stop(text, self.stop)
        if stop_at is not None:
            self.stopped = True
            return self._emit(text[:stop_at])
        return self._emit(text.rstrip(UNK_CHAR))

    def finish(self) -> str:
        """The rest of the text once generation ends (what was held back)."""
        return self._emit(self.text)

    @property
    def text(self) -> str:
        """The whole generated text, cut at a stop string."""
        text = self.tokenizer.decode(self.ids)
        stop_at = _first_stop(text, self.stop)
        return text if stop_at is None else text[:stop_at]

    def _emit(self, ready: str) -> str:
        if len(ready) <= len(self.emitted):
            return ""
        piece, self.emitted = ready[len(self.emitted):], ready
        return piece


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids a continuation of `prompt` starts from: `<eos>`, the separator before every
    training document, then the prompt."""
    return [tokenizer.eos_id, *tokenizer.encode(prompt)]


def compile_wanted(setting: str, model: LanguageModel) -> bool:
    """Whether generate.compile `setting` (auto, on, off) compiles decoding for `model`: auto compiles on a GPU,
    where a compiled step replays as a CUDA graph; on a CPU it gains less than its compile time costs a short run."""
    return setting == "on" or (setting == "auto" and model.device.type == "cuda")


def require_generating(model: LanguageModel) -> None:
    """ValueError naming the arch when `model` predicts no next token (an encoder)."""
    if not model.generates:
        raise ValueError(f"a bidirectional encoder ({type(model).__name__}: model.arch encoder or bert) reads both "
                         "sides of each token and predicts no next token: it does not generate; fine-tune it (hanlm "
                         "finetune) for classification or tagging")


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams, *,
             use_cache: bool = True, result: Generation | None = None,
             speculation: Speculation | None = None, compile: bool = False) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces; `result` collects ids and the finish reason.

    With use_cache=False every step re-reads the whole sequence from an empty state: slower,
    and the reference that the cached path must match. With a `speculation`, its drafter proposes
    tokens that the model checks several per forward (hanlm.speculative): the same greedy output,
    the same distribution when sampling; its `stats` count what was kept. `compile` runs the decoding
    steps through torch.compile (hanlm.models.slot_cache): the same tokens, faster once compiled; the seconds
    spent compiling go to `result.compile_seconds`.
    """
    require_generating(model)
    result = result if result is not None else Generation()
    device = model.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = prompt_ids(tokenizer, prompt)
    limit = params.max_tokens
    if model.context_length is not None:
        limit = min(limit, model.context_length - len(ids))
        if limit <= 0:
            raise ValueError(f"the prompt is {len(ids) - 1} tokens but the model's context is "
                             f"{model.context_length}; shorten the prompt")
    was_training = model.training
    model.eval()
    stream = TextStream(tokenizer, params.stop)
    try:
        with torch.no_grad():
            if use_cache:
                logp, batch = prefilled(model, ids, compile=compile)
                if speculation is not None:
                    tokens = speculative_tokens(batch, ids, logp, speculation.drafter,
                                                DraftLength(speculation.k, speculation.adaptive), params, generator,
                                                limit, speculation.stats, model.context_length)
                else:
                    tokens = plain_tokens(batch, logp, params, generator)
            else:
                tokens = uncached_tokens(model, ids, params, generator)
            result.finish_reason = "length"
            for token in itertools.islice(tokens, limit):
                if token == tokenizer.eos_id:
                    result.finish_reason = "stop"
                    break
                result.token_ids.append(token)
                piece = stream.push(token)
                if piece:
                    yield piece
                if stream.stopped:
                    result.finish_reason = "stop"
                    break
            if use_cache:
                result.compile_seconds = batch.compile_seconds
        result.text = stream.text
        piece = stream.finish()
        if piece:
            yield piece
    finally:
        model.train(was_training)


def prefilled(model: LanguageModel, ids: list[int], *, compile: bool = False) -> tuple[torch.Tensor, DecodeBatch]:
    """The model's next-token log-probabilities (1, V) after `ids`, and a decoding batch of one row holding them
    (its step compiled when `compile`)."""
    logp, state = model.log_probs(torch.tensor([ids], device=model.device), model.initial_state(1))
    batch = model.decode_batch(1, compile=compile)
    batch.admit(state, len(ids))
    return logp[:, -1], batch


def plain_tokens(batch: DecodeBatch, logp: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> Iterator[int]:
    """The continuation of the one row of `batch`, one forward per token, from its log-probabilities `logp` (1, V)."""
    while True:
        token = int(sample(logp.float(), params, generator))
        yield token
        logp = batch.step(torch.tensor([[token]], device=logp.device))[:, -1]


def uncached_tokens(model: LanguageModel, ids: list[int], params: SamplingParams,
                    generator: torch.Generator | None) -> Iterator[int]:
    """The continuation of `ids`, every step re-reading the whole sequence from an empty state: the reference
    that the cached loops must match."""
    out: list[int] = []
    while True:
        logp, _ = model.log_probs(torch.tensor([ids + out], device=model.device), model.initial_state(1))
        token = int(sample(logp[:, -1].float(), params, generator))
        yield token
        out.append(token)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def config_samples(model: LanguageModel, tokenizer: Tokenizer, g: GenerateConfig) -> list[tuple[str, str]]:
    """(prompt, continuation) for each of `generate.prompts`, sampled with the `generate.*` settings:
    the samples that end a training run."""
    params = SamplingParams.from_config(g)
    return [(p, "".join(generate(model, tokenizer, p, params))) for p in g.prompts]
