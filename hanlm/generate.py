"""Generation: incremental decoding over the language-model interface, with sampling controls.

The prompt is encoded after an `<eos>`, the separator training saw before every document, so a
continuation starts the way documents start. Decoding stops at `<eos>`, a stop string, the
token budget or the model's context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hanlm.data.tokenizer import UNK_CHAR, Tokenizer
from hanlm.models import LanguageModel


@dataclass
class SamplingParams:
    max_tokens: int = 60
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None


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


def sample(logprobs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from next-token log-probabilities (B, V)."""
    if params.temperature == 0:
        return logprobs.argmax(-1)
    logits = filter_logits(logprobs / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """Output of `generate`: filled in as it streams."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (eos or a stop string) or "length"


def generate(model: LanguageModel, tokenizer: Tokenizer, prompt: str, params: SamplingParams, *,
             use_cache: bool = True, result: Generation | None = None) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces; `result` collects ids and the finish reason.

    With use_cache=False every step re-reads the whole sequence from an empty state: slower,
    and the reference that the cached path must match.
    """
    result = result if result is not None else Generation()
    device = model.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    limit = params.max_tokens
    if model.context_length is not None:
        limit = min(limit, model.context_length - len(ids))
        if limit <= 0:
            raise ValueError(f"the prompt is {len(ids) - 1} tokens but the model's context is "
                             f"{model.context_length}; shorten the prompt")
    was_training = model.training
    model.eval()
    emitted = ""
    try:
        with torch.no_grad():
            state = model.initial_state(1)
            logp, state = model.log_probs(torch.tensor([ids], device=device), state)
            result.finish_reason = "length"
            for _ in range(limit):
                token = int(sample(logp[:, -1].float(), params, generator))
                if token == tokenizer.eos_id:
                    result.finish_reason = "stop"
                    break
                result.token_ids.append(token)
                text = tokenizer.decode(result.token_ids)
                stop_at = _first_stop(text, params.stop)
                if stop_at is not None:
                    text, result.finish_reason = text[:stop_at], "stop"
                # A byte-level token can end inside a character: hold back until it completes.
                ready = text if stop_at is not None else text.rstrip(UNK_CHAR)
                if len(ready) > len(emitted):
                    yield ready[len(emitted):]
                    emitted = ready
                if stop_at is not None:
                    break
                if use_cache:
                    logp, state = model.log_probs(torch.tensor([[token]], device=device), state)
                else:
                    full = torch.tensor([ids + result.token_ids], device=device)
                    logp, _ = model.log_probs(full, model.initial_state(1))
        final = tokenizer.decode(result.token_ids)
        stop_at = _first_stop(final, params.stop)
        result.text = final if stop_at is None else final[:stop_at]
        if len(result.text) > len(emitted):
            yield result.text[len(emitted):]
    finally:
        model.train(was_training)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
