"""The HTTP API: OpenAI-compatible routes over the engine, plus scoring, tokenizing, metrics and a playground.

    GET  /health                 503 until the model has loaded, then 200
    GET  /v1/models
    POST /v1/completions         prompt (string or list), n, echo, logprobs, stream, …
    POST /v1/chat/completions    messages through `protocol.chat_prompt`
    POST /v1/score               per-token log-probabilities, NLL, perplexity and BPC of a text (hanlm)
    POST /tokenize, /detokenize
    GET  /metrics                Prometheus
    GET  /                       the playground page

Every error has OpenAI's shape; bad input is a 4xx, never a 500. With an API key, /v1/* need
`Authorization: Bearer KEY` (tokenizing, health, metrics and the page do not).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.generate import SamplingParams, prompt_ids
from hanlm.models.base import LanguageModel
from hanlm.serve.engine import Engine, ErrorEvent, FinishEvent, QueueFull, TokenEvent
from hanlm.serve.engine import Request as EngineRequest
from hanlm.serve.metrics import Metrics
from hanlm.serve.protocol import (
    CHAT_STOPS,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    ScoreRequest,
    TokenizeRequest,
    chat_prompt,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a running request checks that its client is still there


@dataclass
class _Loaded:
    model: LanguageModel
    config: Config
    tokenizer: Tokenizer
    engine: Engine


@dataclass
class _State:
    loaded: _Loaded | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(load: Callable[[], tuple[LanguageModel, Config, Tokenizer]], *, model_name: str,
               api_key: str | None = None, max_batch: int = 16, max_queue: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app; `load` runs in a background thread at startup (/health says 503 until it is done)."""
    state = _State()
    metrics = Metrics()

    def load_model() -> None:
        try:
            model, cfg, tokenizer = load()
            engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, metrics=metrics)
            engine.start()
            state.loaded = _Loaded(model, cfg, tokenizer, engine)
        except Exception as e:  # reported by /health and every API call
            state.error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_model, name="hanlm-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=60)
        if state.loaded is not None:
            state.loaded.engine.stop()

    app = FastAPI(title="hanlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors ------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        metrics.requests.labels(request.url.path, "500").inc()
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    # -- helpers -----------------------------------------------------------------------------

    def ready(request: Request) -> _Loaded:
        """The loaded model, after checking the API key on /v1/*; 503 while loading, 401 on a bad key."""
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                               code="invalid_api_key")
        if state.loaded is None:
            message = f"the model failed to load: {state.error}" if state.error else "the model is still loading"
            raise APIError(503, message, type="server_error", code="model_not_ready")
        return state.loaded

    async def parse(request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the body is {int(declared):,} bytes; the limit is {max_body_bytes:,}",
                           code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the body is over the {max_body_bytes:,}-byte limit", code="body_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")
            raise APIError(400, f"{param}: {message}" if param else message, param=param) from None

    def sampling(req: SamplingFields, ids: list[int], loaded: _Loaded, default_max: int,
                 extra_stops: list[str] = ()) -> SamplingParams:
        """The request's sampling settings; 400 when prompt + max_tokens exceed the context."""
        context = loaded.model.context_length
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
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

    def submit(loaded: _Loaded, jobs: list[EngineRequest]) -> None:
        try:
            for job in jobs:
                loaded.engine.submit(job)
        except QueueFull:
            for job in jobs:
                job.cancel()
            raise APIError(429, f"the server is busy: {max_queue} requests are already waiting; retry later",
                           type="rate_limit_error", code="queue_full") from None

    def job(ids: list[int], params: SamplingParams, n: int, events: asyncio.Queue, first: int,
            top_logprobs: int = 0, prompt_logprobs: bool = False) -> EngineRequest:
        return EngineRequest(prompt_ids=ids, params=params, n=n, first_index=first, events=events,
                             top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs)

    async def events_of(request: Request, jobs: list[EngineRequest], events: asyncio.Queue,
                        choices: int) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The jobs' events until every choice has finished; cancels them if the client leaves.

        The client is checked every DISCONNECT_POLL_S whether tokens flow or not: a non-streaming
        request has no other way to notice that nobody waits for its answer any more."""
        finished, checked = 0, time.monotonic()
        try:
            while finished < choices:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    if await request.is_disconnected():
                        return
                    checked = time.monotonic()
                if event is None:
                    continue
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(event.message)
                if isinstance(event, FinishEvent):
                    finished += 1
                yield event
        finally:
            for j in jobs:
                j.cancel()

    def token_text(loaded: _Loaded, token: int) -> str:
        return loaded.tokenizer.decode([token])

    def completion_logprobs(loaded: _Loaded, events: list[TokenEvent], offset: int) -> dict[str, Any]:
        tokens = [token_text(loaded, e.token) for e in events]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{token_text(loaded, t): v for t, v in (e.top or {}).items()} for e in events],
                "text_offset": offsets}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(data: dict[str, Any] | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

    # -- routes ------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.loaded is not None:
            return JSONResponse({"status": "ok", "model": model_name})
        status = "failed" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        loaded = ready(request)
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created, "owned_by": "hanlm",
            "max_model_len": loaded.model.context_length, "arch": loaded.config.model.arch}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        loaded = ready(request)
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        events: asyncio.Queue = asyncio.Queue()
        want_logprobs = req.logprobs is not None
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = prompt_ids(loaded.tokenizer, prompt)
            params = sampling(req, ids, loaded, COMPLETIONS_DEFAULT_MAX_TOKENS)
            jobs.append(job(ids, params, req.n, events, i * req.n, req.logprobs or 0, req.echo and want_logprobs))
        submit(loaded, jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(j.prompt_ids) - 1 for j in jobs)
        choices = len(prompts) * req.n
        prefix = {i * req.n + k: (p if req.echo else "") for i, p in enumerate(prompts) for k in range(req.n)}

        def chunk(choice: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choice, **extra}

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                completion_tokens = 0
                started: set[int] = set()
                async for e in events_of(request, jobs, events, choices):
                    text = e.text
                    if e.index not in started:
                        started.add(e.index)
                        text = prefix[e.index] + text
                    if isinstance(e, TokenEvent):
                        if text or want_logprobs:
                            lp = completion_logprobs(loaded, [e], 0) if want_logprobs else None
                            yield sse(chunk([{"index": e.index, "text": text, "logprobs": lp, "finish_reason": None}]))
                    else:
                        completion_tokens += e.completion_tokens
                        yield sse(chunk([{"index": e.index, "text": text, "logprobs": None,
                                          "finish_reason": e.reason}]))
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(chunk([], usage=usage(prompt_tokens, completion_tokens)))
                yield sse("[DONE]")
                metrics.requests.labels("/v1/completions", "200").inc()

            return StreamingResponse(stream(), media_type="text/event-stream")

        texts = dict(prefix)
        tokens: dict[int, list[TokenEvent]] = {i: [] for i in range(choices)}
        reasons: dict[int, str] = {}
        completion_tokens = 0
        async for e in events_of(request, jobs, events, choices):
            texts[e.index] += e.text
            if isinstance(e, TokenEvent):
                tokens[e.index].append(e)
            else:
                reasons[e.index] = e.reason
                completion_tokens += e.completion_tokens
        out = []
        for i in range(choices):
            lp = None
            if want_logprobs:
                lp = completion_logprobs(loaded, tokens[i], len(prefix[i]))
                if req.echo:
                    scores = jobs[i // req.n].prompt_scores or []
                    ids = jobs[i // req.n].prompt_ids[1:]
                    lp = {"tokens": [token_text(loaded, t) for t in ids] + lp["tokens"],
                          "token_logprobs": scores + lp["token_logprobs"],
                          "top_logprobs": [None] * len(ids) + lp["top_logprobs"],
                          "text_offset": list(range(len(ids))) + lp["text_offset"]}
            out.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": reasons.get(i, "cancelled")})
        metrics.requests.labels("/v1/completions", "200").inc()
        return JSONResponse(chunk(out, usage=usage(prompt_tokens, completion_tokens)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        loaded = ready(request)
        req: ChatRequest = await parse(request, ChatRequest)
        ids = prompt_ids(loaded.tokenizer, chat_prompt(req.messages))
        params = sampling(req, ids, loaded, loaded.config.generate.max_tokens, CHAT_STOPS)
        events: asyncio.Queue = asyncio.Queue()
        top = (req.top_logprobs or 0) if req.logprobs else 0
        jobs = [job(ids, params, req.n, events, 0, top)]
        submit(loaded, jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprob_entry(e: TokenEvent) -> dict[str, Any]:
            text = token_text(loaded, e.token)
            return {"token": text, "logprob": e.logprob, "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [{"token": token_text(loaded, t), "logprob": v,
                                      "bytes": list(token_text(loaded, t).encode("utf-8"))}
                                     for t, v in (e.top or {}).items()]}

        def chunk(choice: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choice, **extra}

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                for i in range(req.n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))
                completion_tokens = 0
                async for e in events_of(request, jobs, events, req.n):
                    if isinstance(e, TokenEvent):
                        if e.text or req.logprobs:
                            lp = {"content": [logprob_entry(e)]} if req.logprobs else None
                            yield sse(chunk([{"index": e.index, "delta": {"content": e.text}, "logprobs": lp,
                                              "finish_reason": None}]))
                    else:
                        completion_tokens += e.completion_tokens
                        delta = {"content": e.text} if e.text else {}
                        yield sse(chunk([{"index": e.index, "delta": delta, "logprobs": None,
                                          "finish_reason": e.reason}]))
                if req.stream_options and req.stream_options.include_usage:
                    yield sse(chunk([], usage=usage(len(ids) - 1, completion_tokens)))
                yield sse("[DONE]")
                metrics.requests.labels("/v1/chat/completions", "200").inc()

            return StreamingResponse(stream(), media_type="text/event-stream")

        texts = {i: "" for i in range(req.n)}
        entries: dict[int, list[dict[str, Any]]] = {i: [] for i in range(req.n)}
        reasons: dict[int, str] = {}
        completion_tokens = 0
        async for e in events_of(request, jobs, events, req.n):
            texts[e.index] += e.text
            if isinstance(e, TokenEvent):
                if req.logprobs:
                    entries[e.index].append(logprob_entry(e))
            else:
                reasons[e.index] = e.reason
                completion_tokens += e.completion_tokens
        metrics.requests.labels("/v1/chat/completions", "200").inc()
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                         "logprobs": {"content": entries[i]} if req.logprobs else None,
                         "finish_reason": reasons.get(i, "cancelled")} for i in range(req.n)],
            "usage": usage(len(ids) - 1, completion_tokens)})

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        loaded = ready(request)
        req: ScoreRequest = await parse(request, ScoreRequest)
        ids = loaded.tokenizer.encode(req.text)
        context = loaded.model.context_length
        if context is not None and len(ids) + 1 > context:
            raise APIError(400, f"the text is {len(ids)} tokens (plus the <eos> it is scored after); the model's "
                                f"context is {context} tokens", param="text", code="context_length_exceeded")

        def run() -> list[float]:
            x = torch.tensor([[loaded.tokenizer.eos_id, *ids[:-1]]], device=loaded.model.device)
            y = torch.tensor([ids], device=loaded.model.device)
            with loaded.engine.lock, torch.no_grad():
                return loaded.model.token_log_probs(x, y, loaded.model.initial_state(1))[0].tolist()

        logprobs = await run_in_threadpool(run)
        nll = -math.fsum(logprobs)
        metrics.requests.labels("/v1/score", "200").inc()
        return JSONResponse({
            "object": "score", "model": model_name, "tokens": [token_text(loaded, t) for t in ids],
            "token_ids": ids, "token_logprobs": logprobs, "nll": nll, "perplexity": math.exp(nll / len(ids)),
            "characters": len(req.text), "bpc": nll / math.log(2) / len(req.text),
            "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        loaded = ready(request)
        req: TokenizeRequest = await parse(request, TokenizeRequest)
        ids = loaded.tokenizer.encode(req.prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": loaded.model.context_length})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        loaded = ready(request)
        req: DetokenizeRequest = await parse(request, DetokenizeRequest)
        bad = [t for t in req.tokens if not 0 <= t < loaded.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0 … "
                                f"{loaded.tokenizer.vocab_size - 1})", param="tokens")
        return JSONResponse({"prompt": loaded.tokenizer.decode(req.tokens)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def playground() -> HTMLResponse:
        page = resources.files("hanlm.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", model_name))

    app.state.hanlm = state
    app.state.metrics = metrics
    return app


def serve(spec: str, *, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int,
          max_body_bytes: int, model_name: str | None = None, device: str = "cpu") -> None:
    """Run the server until interrupted; the model loads while it already answers /health."""
    import uvicorn

    from hanlm.checkpoint import ARPA_SUFFIXES, load_for_inference, resolve_checkpoint

    path = spec if spec.endswith(ARPA_SUFFIXES) else resolve_checkpoint(spec)  # fail fast on a wrong path
    parts = path.rstrip("/").split("/")
    # runs/NAME/checkpoints/step-… is served as NAME.
    default_name = parts[-3] if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]
    app = create_app(lambda: load_for_inference(path, device), model_name=model_name or default_name,
                     api_key=api_key, max_batch=max_batch, max_queue=max_queue, max_body_bytes=max_body_bytes)
    # Ctrl-C: finish what can finish in a few seconds, then cancel the rest (whose generations stop).
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
