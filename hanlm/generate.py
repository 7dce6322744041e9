"""Generation: incremental decoding over the language-model interface, with sampling controls.

The prompt is encoded after an `<eos>`, the separator training saw before every document, so a
continuation starts the way documents start. Decoding stops at `<eos>`, a stop string, the
token budget or the model's context.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hanlm.config import GenerateConfig
from hanlm.data.tokenizer import UNK_CHAR, Tokenizer
from hanlm.models import LanguageModel
from hanlm.speculative import DraftLength, Speculation, speculative_tokens


@dataclass
class SamplingParams:
    max_tokens: int = 60
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    @classmethod
    def from_config(cls, g: GenerateConfig, **overrides: Any) -> SamplingParams:
        """The `generate.*` settings, with each override that is not None taking a key's place."""
        values = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
                  "seed": g.seed}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# A temperature or top_p below this samples greedily, as temperature 0 does (vLLM's rule for the
# temperature): that is what sampling tends to as either falls, and tiny ones break in float32
# (log-probabilities over the temperature overflow, a top_p flushed to 0 drops every token).
GREEDY_BELOW = 1e-5


def sample(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from next-token log-probabilities (B, V)."""
    if min(params.temperature, params.top_p) < GREEDY_BELOW:
        return logprobs.argmax(-1)
    logits = filter_logits(logprobs / params.temperature, params.top_k, params.top_p)
    uniforms = torch.rand(logprobs.size(0), generator=generator, device=logprobs.device)
    return _inverse_cdf(logits.softmax(-1), uniforms)


def sample_rows(logprobs: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """Next tokens for B rows (B, V) that each have their own settings and generator, in a few batched
    ops (the server samples all its sequences at once): rows with the same settings are filtered
    together, and each draws its one uniform from its own generator, as `sample` draws it."""
    out = [0] * len(params)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        picked = logprobs[torch.tensor(rows, device=logprobs.device)]
        if min(temperature, top_p) < GREEDY_BELOW:
            tokens = picked.argmax(-1)
        else:
            uniforms = torch.cat([torch.rand(1, generator=generators[i], device=logprobs.device) for i in rows])
            tokens = _inverse_cdf(filter_logits(picked / temperature, top_k, top_p).softmax(-1), uniforms)
        for i, token in zip(rows, tokens.tolist()):
            out[i] = token
    return out


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token of each row (B, V) whose cumulative probability first passes its uniform (B,) in [0, 1):
    exact sampling, one random number per token, never a token of probability 0."""
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return at.clamp(max=probs.size(-1) - 1)


@dataclass
class Generation:
    """Output of `generate`: filled in as it streams."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (eos or a stop string) or "length"


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


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams, *,
             use_cache: bool = True, result: Generation | None = None,
             speculation: Speculation | None = None) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces; `result` collects ids and the finish reason.

    With use_cache=False every step re-reads the whole sequence from an empty state: slower,
    and the reference that the cached path must match. With a `speculation`, its drafter proposes
    tokens that the model checks several per forward (hanlm.speculative): the same greedy output,
    the same distribution when sampling; its `stats` count what was kept.
    """
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
            logp, state = model.log_probs(torch.tensor([ids], device=device), model.initial_state(1))
            if speculation is not None and use_cache:
                tokens = speculative_tokens(model, ids, logp[:, -1], state, speculation.drafter,
                                            DraftLength(speculation.k, speculation.adaptive), params, generator,
                                            limit, speculation.stats)
            else:
                tokens = plain_tokens(model, ids, logp[:, -1], state, params, generator, use_cache)
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
        result.text = stream.text
        piece = stream.finish()
        if piece:
            yield piece
    finally:
        model.train(was_training)


def plain_tokens(model: LanguageModel, ids: list[int], logp: torch.Tensor, state: Any, params: SamplingParams,
                  generator: torch.Generator | None, use_cache: bool) -> Iterator[int]:
    """The continuation of `ids` one forward per token, from the model's `logp` (1, V) and `state` after them."""
    out: list[int] = []
    while True:
        token = int(sample(logp.float(), params, generator))
        yield token
        out.append(token)
        if use_cache:
            logp, state = model.log_probs(torch.tensor([[token]], device=model.device), state)
        else:
            logp, _ = model.log_probs(torch.tensor([ids + out], device=model.device), model.initial_state(1))
        logp = logp[:, -1]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def config_samples(model: LanguageModel, tokenizer: Tokenizer, g: GenerateConfig) -> list[tuple[str, str]]:
    """(prompt, continuation) for each of `generate.prompts`, sampled with the `generate.*` settings:
    the samples that end a training run."""
    params = SamplingParams.from_config(g)
    return [(p, "".join(generate(model, tokenizer, p, params))) for p in g.prompts]
