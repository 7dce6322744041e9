"""/v1/completions and /v1/chat/completions: from a validated request to engine jobs and back.

Both endpoints check the context and the queue before anything runs, then answer through the
one streaming path and the one collecting path of `hanlm.serve.streaming`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import Response, StreamingResponse
from starlette.requests import Request

from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.generate import prompt_ids
from hanlm.sampling import SamplingParams
from hanlm.models.base import LanguageModel
from hanlm.serve.engine import Engine, QueueFull
from hanlm.serve.engine import Request as Job
from hanlm.serve.formats import ChatFormat, CompletionFormat
from hanlm.serve.protocol import (
    CHAT_STOPS,
    APIError,
    ChatRequest,
    CompletionRequest,
    JSONAnswer,
    SamplingFields,
    chat_prompt,
)
from hanlm.serve.streaming import ChoiceFormat, collect, engine_events, sse_stream, usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Loaded:
    """A model ready to serve, and the engine that decodes with it (None for a classifier or a tagger,
    which only answer /v1/classify or /v1/segment; a tagger's `model` is its `Tagger`)."""

    model: LanguageModel
    config: Config
    tokenizer: Tokenizer
    engine: Engine | None


def sampling(req: SamplingFields, asked: int | None, ids: list[int], context: int | None, default_max: int,
             extra_stops: list[str] = ()) -> SamplingParams:
    """The request's sampling settings; 400 when prompt + max_tokens (`asked`) exceed the context."""
    room = None if context is None else context - len(ids)
    if room is not None and room <= 0:
        raise APIError(400, f"the prompt is {len(ids)} tokens (with the <eos> every prompt starts with) and the "
                            f"model's context is {context} tokens: nothing is left to generate", param="prompt",
                       code="context_length_exceeded")
    if asked is not None and room is not None and asked > room:
        raise APIError(400, f"the prompt is {len(ids)} tokens (with the <eos> every prompt starts with) and "
                            f"max_tokens is {asked}: {len(ids) + asked} in all, beyond the model's context of "
                            f"{context} tokens", param="max_tokens", code="context_length_exceeded")
    max_tokens = asked or (default_max if room is None else min(default_max, room))
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                          top_p=req.top_p, stop=[*req.stop, *extra_stops], seed=req.seed)


def submit(engine: Engine, jobs: list[Job]) -> None:
    """Queue the jobs, all or none: 400 when they could never fit the queue, 429 when it is full now."""
    if len(jobs) > engine.max_queue:
        raise APIError(400, f"prompt: {len(jobs)} prompts, but at most {engine.max_queue} requests can wait "
                            f"(serve.max_queue): send them in several requests", param="prompt",
                       code="too_many_prompts")
    try:
        engine.submit(jobs)
    except QueueFull:
        raise APIError(429, f"the server is busy: {engine.max_queue} requests can wait and too many already do; "
                            "retry later", type="rate_limit_error", code="queue_full") from None


async def answer(request: Request, engine: Engine, jobs: list[Job], events: asyncio.Queue, fmt: ChoiceFormat,
                 req: SamplingFields, choices: int, count: Callable[[str], None]) -> Response:
    """Submit the jobs and answer with their generations, streamed or whole; `count` gets the status."""
    submit(engine, jobs)
    generated = engine_events(request, jobs, events, choices)
    prompt_tokens = sum(len(j.prompt_ids) - 1 for j in jobs)  # the leading <eos> is not the client's
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(sse_stream(generated, fmt, prompt_tokens=prompt_tokens, include_usage=include_usage,
                                            count=count), media_type="text/event-stream")
    collected = await collect(generated, choices)
    count("200")
    return JSONAnswer(fmt.whole(collected, usage(prompt_tokens, collected.completion_tokens)))


async def complete(request: Request, req: CompletionRequest, loaded: Loaded, model_name: str,
                   count: Callable[[str], None]) -> Response:
    """/v1/completions: every prompt continued `n` times."""
    events: asyncio.Queue = asyncio.Queue()
    want_logprobs = req.logprobs is not None
    jobs = []
    for i, prompt in enumerate(req.prompt):
        ids = prompt_ids(loaded.tokenizer, prompt)
        params = sampling(req, req.max_tokens, ids, loaded.model.context_length, COMPLETIONS_DEFAULT_MAX_TOKENS)
        jobs.append(Job(prompt_ids=ids, params=params, n=req.n, first_index=i * req.n, events=events,
                        top_logprobs=req.logprobs or 0, prompt_logprobs=req.echo and want_logprobs))
    fmt = CompletionFormat(loaded.tokenizer, model_name, req.prompt, jobs, n=req.n, echo=req.echo,
                           logprobs=want_logprobs)
    return await answer(request, loaded.engine, jobs, events, fmt, req, len(req.prompt) * req.n, count)


async def chat(request: Request, req: ChatRequest, loaded: Loaded, model_name: str,
               count: Callable[[str], None]) -> Response:
    """/v1/chat/completions: `n` replies to the conversation, through `chat_prompt`."""
    events: asyncio.Queue = asyncio.Queue()
    ids = prompt_ids(loaded.tokenizer, chat_prompt(req.messages))
    params = sampling(req, req.max_completion_tokens or req.max_tokens, ids, loaded.model.context_length,
                      loaded.config.generate.max_tokens, CHAT_STOPS)
    top = (req.top_logprobs or 0) if req.logprobs else 0
    jobs = [Job(prompt_ids=ids, params=params, n=req.n, events=events, top_logprobs=top)]
    fmt = ChatFormat(loaded.tokenizer, model_name, n=req.n, logprobs=req.logprobs)
    return await answer(request, loaded.engine, jobs, events, fmt, req, req.n, count)
