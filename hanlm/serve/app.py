"""The HTTP API: OpenAI-compatible routes over the engine, plus scoring, tokenizing, metrics and a playground.

    GET  /health                 503 until the model has loaded, then 200
    GET  /v1/models
    POST /v1/completions         prompt (string or list), n, echo, logprobs, stream, …
    POST /v1/chat/completions    messages through `protocol.chat_prompt`
    POST /v1/score               per-token log-probabilities, NLL, perplexity and BPC of a text (hanlm)
    POST /v1/classify            labels and label probabilities of texts (a `hanlm finetune` checkpoint)
    POST /v1/segment             words (and POS tags) of texts (a tagger from `hanlm finetune --task tag`)
    POST /v1/ner                 named entities of texts (an entity tagger from `hanlm finetune --task ner`)
    POST /tokenize, /detokenize
    GET  /metrics                Prometheus
    GET  /                       the playground page

A language model answers the generation and scoring routes and refuses /v1/classify and /v1/segment
with a 400; a classifier answers /v1/classify and a tagger /v1/segment, and each refuses the
others the same way. Every error has OpenAI's
shape; bad input is a 4xx, never a 500. With an API key, every route but
/health and the page needs `Authorization: Bearer KEY`; /metrics too unless `metrics_public`.

A language model computes on the engine's thread (and /v1/score under its lock); a classifier or
tagger on the task worker's one thread (hanlm.serve.worker), where at most `max_task_queue` requests
wait and the next gets a 429 at once; those waiting together run as one batch (`task_batch_texts`).
Each connection's request head must arrive within `header_timeout_s` (hanlm.serve.connections).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.params import Depends as Dependency
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from hanlm.checkpoint import ARPA_SUFFIXES
from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.eval import perplexity
from hanlm.loading import load_for_inference, resolve_served
from hanlm.mixture_file import is_mixture, read_mixture
from hanlm.models.base import LanguageModel
from hanlm.generate import compile_wanted
from hanlm.serve import generation
from hanlm.serve.body import Schema, parse_body
from hanlm.serve.connections import HEAD_TIMEOUT_S, uvicorn_settings
from hanlm.serve.engine import Engine
from hanlm.serve.generation import Loaded
from hanlm.serve.llamacpp import llama_cpp_model
from hanlm.serve.metrics import Metrics
from hanlm.serve.protocol import (
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    JSONAnswer,
    ScoreRequest,
    NerRequest,
    SegmentRequest,
    TextsRequest,
    TokenizeRequest,
)
from hanlm.serve.streaming import CLIENT_GONE, DISCONNECT_POLL_S, ClientGone
from hanlm.serve.texts import CLASSIFY, NER, SEGMENT, TextsTask
from hanlm.serve.worker import Job, TaskQueueFull, TaskWorker, TaskWorkerStopped
from hanlm.speculative import Speculation, speculation_from_config

# The rest of a body that was not read (too big, too slow) would be taken for the next request.
_CLOSING_STATUSES = (408, 413)


@dataclass
class _Service:
    """What the routes share: the model once it has loaded, the body limits, the metrics."""

    model_name: str
    metrics: Metrics
    max_body_bytes: int
    max_json_depth: int
    body_timeout_s: float
    loaded: Loaded | None = None
    worker: TaskWorker | None = None  # a classifier's or tagger's, once it has loaded
    error: str | None = None  # why the model failed to load
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self, task: str | None = "lm") -> Loaded:
        """The loaded model; 503 while it loads or when it failed to, 400 when it does another task
        than `task` (None: any)."""
        if self.loaded is None:
            message = f"the model failed to load: {self.error}" if self.error else "the model is still loading"
            raise APIError(503, message, type="server_error", code="model_not_ready")
        served = self.loaded.config.model.task
        if task is not None and served != task:
            answers = {"classify": "a text classifier: it answers POST /v1/classify only",
                       "tag": "a word segmenter: it answers POST /v1/segment only",
                       "ner": "an entity recognizer: it answers POST /v1/ner only",
                       "lm": "a language model: it answers the generation and scoring routes"}
            needs = {"classify": "/v1/classify needs a classifier written by hanlm finetune",
                     "tag": "/v1/segment needs a tagger written by hanlm finetune --task tag",
                     "ner": "/v1/ner needs an entity tagger written by hanlm finetune --task ner",
                     "lm": "this route needs a language model"}
            raise APIError(400, f"the model {self.model_name} is {answers[served]}; {needs[task]}",
                           code="wrong_task")
        if task == "lm" and self.loaded.engine is None:
            raise APIError(400, f"the model {self.model_name} is a bidirectional encoder (model.arch "
                           f"{self.loaded.config.model.arch}): it "
                           "reads both sides of each token, so it neither generates nor scores text; fine-tune it "
                           "with hanlm finetune and serve the classifier or tagger", code="wrong_task")
        return self.loaded

    async def body(self, request: Request, schema: type[Schema]) -> Schema:
        return await parse_body(request, schema, max_bytes=self.max_body_bytes, timeout_s=self.body_timeout_s,
                                max_depth=self.max_json_depth)

    async def texts_route(self, request: Request, task: str, schema: type[TextsRequest], endpoint: str,
                          work: TextsTask) -> JSONResponse:
        """A route over a batch of texts (/v1/classify, /v1/segment, /v1/ner): the model of `task` runs `work`
        over the body's texts on the task worker, joined with other waiting requests' texts; 429 when its queue
        is full."""
        loaded = self.ready(task)
        req = await self.body(request, schema)
        worker = self.worker
        assert worker is not None  # a classifier or tagger has one from the moment it is ready
        try:
            job = worker.submit(endpoint, req.input, lambda texts: work.label(loaded, texts),
                                lambda results: work.answer(loaded, req.input, results))
        except TaskQueueFull:
            raise APIError(429, f"the server is busy: {worker.max_waiting} classify, segment and ner requests can wait "
                                "(serve.max_task_queue) and that many already do; retry later",
                           type="rate_limit_error", code="queue_full") from None
        except TaskWorkerStopped:
            raise _shutting_down() from None
        body = await _outcome(request, job)
        return self.ok(endpoint, {**body, "model": self.model_name})

    def counter(self, endpoint: str) -> Callable[[str], None]:
        """Counts one request to `endpoint` under the status it is given."""
        return lambda status: self.metrics.requests.labels(endpoint, status).inc()

    def ok(self, endpoint: str, body: dict[str, Any]) -> JSONResponse:
        self.counter(endpoint)("200")
        return JSONAnswer(body)


def key_check(api_key: str | None) -> Dependency:
    """A dependency that refuses requests without `Authorization: Bearer API_KEY` (none when no key is set)."""
    expected = f"Bearer {api_key}".encode()

    def check(request: Request) -> None:
        # Header values arrive as latin-1 text; their bytes are what the client sent.
        given = request.headers.get("authorization", "").encode("latin-1")
        if api_key is not None and not hmac.compare_digest(given, expected):  # in time that tells nothing
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", code="invalid_api_key")

    return Depends(check)


def score_text(loaded: Loaded, text: str) -> dict[str, Any]:
    """/v1/score's answer: the log-probability of each token of `text` after <eos>, and their sums."""
    ids = loaded.tokenizer.encode(text)
    context = loaded.model.context_length
    if not ids:
        raise APIError(400, "the text has no tokens to score", param="text")
    if context is not None and len(ids) + 1 > context:
        raise APIError(400, f"the text is {len(ids)} tokens (plus the <eos> it is scored after); the model's "
                            f"context is {context} tokens", param="text", code="context_length_exceeded")
    x = torch.tensor([[loaded.tokenizer.eos_id, *ids[:-1]]], device=loaded.model.device)
    y = torch.tensor([ids], device=loaded.model.device)
    with loaded.engine.lock, torch.no_grad():
        logprobs = loaded.model.token_log_probs(x, y, loaded.model.initial_state(1))[0].tolist()
    nll = -math.fsum(logprobs)
    return {"object": "score", "tokens": [loaded.tokenizer.decode([t]) for t in ids], "token_ids": ids,
            "token_logprobs": logprobs, "nll": nll, "perplexity": perplexity(nll / len(ids)), "characters": len(text),
            "bpc": nll / math.log(2) / len(text), "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids)}}


async def _outcome(request: Request, job: Job) -> Any:
    """The job's result once the worker has run it. ClientGone when the client leaves first, checked
    every DISCONNECT_POLL_S (a waiting job is then skipped); the job is cancelled however this ends."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return job.future.result()
                except TaskWorkerStopped:
                    raise _shutting_down() from None
            if await request.is_disconnected():
                raise ClientGone
    finally:
        job.cancel()


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def task_threads_for(cfg: Config) -> int:
    """The task worker's intra-op threads when none are asked for: 1 for an hmm or crf tagger, whose
    work is a step per character too small to share between threads (more only add their waking up),
    torch's default (the machine's cores) for a network: a classifier, a neural tagger."""
    return 1 if _arch(cfg) in ("hmm", "crf") else torch.get_num_threads()


def _arch(cfg: Config) -> str:
    """What the model is: model.arch, or the traditional tagger (hmm, crf) that has no network."""
    counted = cfg.model.task in ("tag", "ner") and cfg.finetune.tagger != "neural"
    return cfg.finetune.tagger if counted else cfg.model.arch


def _error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        headers = {"Connection": "close"} if e.status in _CLOSING_STATUSES else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, _: ClientGone) -> Response:
        metrics.requests.labels(request.url.path, CLIENT_GONE).inc()
        return Response(status_code=int(CLIENT_GONE))  # nobody reads it

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(APIError.of(e).body(), status_code=500)


def _routes(app: FastAPI, s: _Service, keyed: Dependency, metrics_key: list[Dependency]) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if s.loaded is not None:
            return JSONResponse({"status": "ok", "model": s.model_name})
        return JSONResponse({"status": "failed" if s.error else "loading", "error": s.error}, status_code=503)

    @app.get("/v1/models", dependencies=[keyed])
    async def models() -> JSONResponse:
        loaded = s.ready(None)
        task = loaded.config.model.task
        extra = ({"labels": loaded.config.finetune.labels} if task == "classify" else
                 {"tagger": loaded.config.finetune.tagger, "tag_scheme": loaded.config.finetune.tag_scheme}
                 if task == "tag" else
                 {"tagger": loaded.config.finetune.tagger, "ner_scheme": loaded.config.finetune.ner_scheme,
                  "labels": loaded.config.finetune.labels} if task == "ner" else {})
        return s.ok("/v1/models", {"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": s.created, "owned_by": "hanlm",
            "max_model_len": loaded.model.context_length, "arch": _arch(loaded.config), "task": task, **extra}]})

    @app.post("/v1/classify", dependencies=[keyed])
    async def classify(request: Request) -> JSONResponse:
        return await s.texts_route(request, "classify", ClassifyRequest, "/v1/classify", CLASSIFY)

    @app.post("/v1/segment", dependencies=[keyed])
    async def segment(request: Request) -> JSONResponse:
        return await s.texts_route(request, "tag", SegmentRequest, "/v1/segment", SEGMENT)

    @app.post("/v1/ner", dependencies=[keyed])
    async def ner(request: Request) -> JSONResponse:
        return await s.texts_route(request, "ner", NerRequest, "/v1/ner", NER)

    @app.post("/v1/completions", dependencies=[keyed])
    async def completions(request: Request) -> Response:
        loaded = s.ready()
        req = await s.body(request, CompletionRequest)
        return await generation.complete(request, req, loaded, s.model_name, s.counter("/v1/completions"))

    @app.post("/v1/chat/completions", dependencies=[keyed])
    async def chat(request: Request) -> Response:
        loaded = s.ready()
        req = await s.body(request, ChatRequest)
        return await generation.chat(request, req, loaded, s.model_name, s.counter("/v1/chat/completions"))

    @app.post("/v1/score", dependencies=[keyed])
    async def score(request: Request) -> JSONResponse:
        loaded = s.ready()
        req = await s.body(request, ScoreRequest)
        scored = await run_in_threadpool(score_text, loaded, req.text)  # off the event loop: it runs the model
        return s.ok("/v1/score", {**scored, "model": s.model_name})

    @app.post("/tokenize", dependencies=[keyed])
    async def tokenize(request: Request) -> JSONResponse:
        loaded = s.ready()
        req = await s.body(request, TokenizeRequest)
        ids = loaded.tokenizer.encode(req.prompt)
        return s.ok("/tokenize", {"tokens": ids, "count": len(ids), "max_model_len": loaded.model.context_length})

    @app.post("/detokenize", dependencies=[keyed])
    async def detokenize(request: Request) -> JSONResponse:
        loaded = s.ready()
        req = await s.body(request, DetokenizeRequest)
        vocab = loaded.tokenizer.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens.{bad}: token id {req.tokens[bad]} is outside the vocabulary "
                                f"(0 … {vocab - 1})", param=f"tokens.{bad}")
        return s.ok("/detokenize", {"prompt": loaded.tokenizer.decode(req.tokens)})

    @app.get("/metrics", dependencies=metrics_key)
    async def prometheus() -> Response:
        return Response(s.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def playground() -> HTMLResponse:
        # Static: the page shows nothing of the server until its own requests pass the key.
        return HTMLResponse(resources.files("hanlm.serve").joinpath("static/playground.html").read_text("utf-8"))


def create_app(load: Callable[[], tuple[LanguageModel, Config, Tokenizer]], *, model_name: str,
               api_key: str | None = None, max_batch: int = 16, max_queue: int = 256, max_body_bytes: int = 1 << 20,
               max_json_depth: int = 32, body_timeout_s: float = 30.0, metrics_public: bool = False,
               speculation: Callable[[Tokenizer], Speculation | None] | None = None, max_task_queue: int = 8,
               task_threads: int | None = None, task_batch_texts: int = 256, compile: str = "auto",
               prefill_chunk: int = 256, prefix_cache_tokens: int = 4096) -> FastAPI:
    """The app; `load` runs in a background thread at startup (/health says 503 until it is done).
    `speculation` makes the engine's drafter for the loaded tokenizer (None: no speculative decoding);
    `compile` (generate.compile), `prefill_chunk` and `prefix_cache_tokens` (serve.*) configure the engine.
    A classifier or tagger runs on a worker thread with `task_threads` intra-op threads (None:
    `task_threads_for` its config), where at most `max_task_queue` requests wait and those waiting together
    run as one batch of up to `task_batch_texts` texts.

    `app.state.hanlm.loaded` is the model and engine once loaded (None before)."""
    if max_task_queue < 0 or (task_threads is not None and task_threads < 1) or task_batch_texts < 1:
        raise ValueError(f"max_task_queue must be ≥ 0, task_threads and task_batch_texts ≥ 1 (got {max_task_queue}, "
                         f"{task_threads}, {task_batch_texts})")
    s = _Service(model_name, Metrics(), max_body_bytes, max_json_depth, body_timeout_s)

    def load_model() -> None:
        try:
            model, cfg, tokenizer = load()
            engine = None
            if cfg.model.task == "lm" and model.generates:
                engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, metrics=s.metrics,
                                speculation=speculation(tokenizer) if speculation else None,
                                compile=compile_wanted(compile, model), prefill_chunk=prefill_chunk,
                                prefix_cache_tokens=prefix_cache_tokens)
                engine.start()
            elif cfg.model.task != "lm":
                s.worker = TaskWorker(max_waiting=max_task_queue, threads=task_threads or task_threads_for(cfg),
                                      batch_items=task_batch_texts, metrics=s.metrics)
                s.worker.start()
            s.loaded = Loaded(model, cfg, tokenizer, engine)
        except Exception as e:  # reported by /health and every API call
            s.error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_model, name="hanlm-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=60)
        if s.loaded is not None and s.loaded.engine is not None:
            s.loaded.engine.stop()
        if s.worker is not None:
            s.worker.stop()

    app = FastAPI(title="hanlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _error_handlers(app, s.metrics)
    keyed = key_check(api_key)
    _routes(app, s, keyed, [] if metrics_public else [keyed])
    app.state.hanlm = s
    return app


def serve(spec: str, *, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int,
          max_body_bytes: int, max_json_depth: int = 32, body_timeout_s: float = 30.0, metrics_public: bool = False,
          model_name: str | None = None, device: str = "cpu", draft: tuple | None = None, max_task_queue: int = 8,
          task_threads: int | None = None, task_batch_texts: int = 256,
          header_timeout_s: float = HEAD_TIMEOUT_S, compile: str = "auto", prefill_chunk: int = 256,
          prefix_cache_tokens: int = 4096, engine: str = "torch", gguf_dtype: str = "f32") -> None:
    """Run the server until interrupted; the model loads while it already answers /health. `draft`:
    speculation_from_config's arguments after the tokenizer (the generate config, mode, draft model, k).
    `header_timeout_s`: how long a client may take to send a request head (then the connection closes).
    `engine` llama.cpp: a gpt's GGUF (matrices in `gguf_dtype`) is written or reused and opened before the
    server starts, and llama.cpp computes its tokens (hanlm.serve.llamacpp); the rest as `create_app`."""
    import uvicorn

    if is_mixture(spec):
        read_mixture(spec)  # fail fast on a damaged mixture.json
        path = spec
    else:
        path = spec if spec.endswith(ARPA_SUFFIXES) else resolve_served(spec)  # fail fast on a wrong path
    parts = path.rstrip("/").split("/")
    # runs/NAME/checkpoints/step-… is served as NAME.
    default_name = parts[-3] if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]
    if engine == "llama.cpp":
        speculative = (draft[1] or draft[0].speculative) if draft else "none"
        loaded = llama_cpp_model(path, max_batch=max_batch, dtype=gguf_dtype, device=device, speculative=speculative)
        # No prefix cache: each kept prompt would hold one of llama.cpp's few sequence slots.
        load, draft, prefix_cache_tokens = (lambda: loaded), None, 0
    else:
        load = functools.partial(load_for_inference, path, device, tasks=("lm", "classify", "tag"))
    app = create_app(load, model_name=model_name or default_name, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, max_body_bytes=max_body_bytes, max_json_depth=max_json_depth,
                     body_timeout_s=body_timeout_s, metrics_public=metrics_public,
                     speculation=_drafts(*draft) if draft else None, max_task_queue=max_task_queue,
                     task_threads=task_threads, task_batch_texts=task_batch_texts, compile=compile,
                     prefill_chunk=prefill_chunk, prefix_cache_tokens=prefix_cache_tokens)
    # Ctrl-C: finish what can finish in a few seconds, then cancel the rest (whose generations stop).
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                **uvicorn_settings(header_timeout_s))


def _drafts(g, mode: str | None, draft_model: str | None, k: int | None) -> Callable[[Tokenizer], Speculation | None]:
    """The engine's speculation, made once the tokenizer is loaded; a wrong draft model fails here, first."""

    path = draft_model or g.draft_model
    if (mode or g.speculative) == "ngram" and path and not path.endswith(ARPA_SUFFIXES):
        resolve_served(path)  # a missing or empty path stops the command before the server starts
    return lambda tokenizer: speculation_from_config(g, tokenizer, mode, draft_model, k)
