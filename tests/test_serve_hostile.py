"""Hostile requests against live servers on 127.0.0.1: each is refused with a 4xx that names the
field or the limit (never a 500, never a held or cut connection), and a generation that fails after
its 200 still ends its stream properly."""

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from serve_helpers import AUTH, KEY, FailAfter, checkpoints, error_of, metric, serve  # noqa: F401

from hanlm.serve.engine import FinishEvent, TokenEvent
from hanlm.limits import MAX_TOKENS_LIMIT, SEED_LIMIT
from hanlm.serve.protocol import DETOKENIZE_LIMIT
from hanlm.serve.streaming import sse_stream

MAX_QUEUE = 4
POSTS = ["/v1/completions", "/v1/chat/completions", "/v1/score", "/tokenize", "/detokenize"]
DEEP = "[" * 5000 + "]" * 5000


def nested(depth: int) -> str:
    """A completions body whose JSON nests exactly `depth` deep (the object is the first level)."""
    return '{"prompt": "今天", "max_tokens": 1, "ignored": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@dataclass
class Case:
    name: str
    path: str
    body: Any = None  # JSON, or str/bytes sent as they are
    status: int = 400
    param: str | None = None  # the error's param, when it names a field
    says: str = ""  # what the message must contain (the field or the limit)
    code: str | None = None
    method: str = "POST"
    headers: dict = field(default_factory=lambda: dict(AUTH))


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


def completion(**fields):
    return {"prompt": "今天", "max_tokens": 1, **fields}


CASES = [
    # Nesting: refused before json.loads (which recursed into a 500 at 5,000 levels), on every POST.
    *[Case(f"deep nesting on {p}", p, '{"prompt": ' + DEEP + "}", says="serve.max_json_depth",
           code="json_too_deep") for p in POSTS],
    Case("one level over the depth limit", "/v1/completions", nested(33), says="33 deep; the limit is 32"),
    Case("at the depth limit", "/v1/completions", nested(32), status=200),
    Case("brackets inside strings do not nest", "/v1/completions", completion(prompt="[" * 40 + "{" * 40),
         status=200),
    # Integers: every field has a range (seeds ≥ 2^64 overflowed torch into a 500, or a cut stream).
    *[Case(f"completions {f} = 2^64", "/v1/completions", completion(**{f: 2 ** 64}), param=f, says=f)
      for f in ("seed", "max_tokens", "n", "top_k", "logprobs")],
    *[Case(f"chat {f} = 2^64", "/v1/chat/completions", chat("你好", logprobs=True, **{f: 2 ** 64}), param=f, says=f)
      for f in ("seed", "max_tokens", "max_completion_tokens", "n", "top_k", "top_logprobs")],
    Case("a streamed seed of 2^64 is a 400, not a cut stream", "/v1/completions",
         completion(seed=2 ** 64, stream=True), param="seed"),
    Case("a streamed chat seed of 2^64", "/v1/chat/completions", chat("你好", seed=2 ** 64, stream=True),
         param="seed"),
    Case("seed 2^63", "/v1/completions", completion(seed=SEED_LIMIT), param="seed", says=str(SEED_LIMIT)),
    Case("seed 2^63 - 1", "/v1/completions", completion(seed=SEED_LIMIT - 1, stream=True), status=200),
    Case("seed -1", "/v1/completions", completion(seed=-1), param="seed"),
    Case("max_tokens over the cap", "/v1/completions", completion(max_tokens=MAX_TOKENS_LIMIT + 1),
         param="max_tokens", says=f"{MAX_TOKENS_LIMIT}"),
    Case("n = 0", "/v1/completions", completion(n=0), param="n"),
    Case("top_k = -2", "/v1/chat/completions", chat("你好", top_k=-2), param="top_k"),
    Case("an integer with 5,000 digits", "/v1/completions", '{"prompt": "x", "seed": ' + "9" * 5000 + "}",
         code="invalid_json"),
    Case("temperature 1e400 (infinity)", "/v1/completions", '{"prompt": "x", "temperature": 1e400}',
         param="temperature"),
    Case("temperature NaN", "/v1/completions", '{"prompt": "x", "temperature": NaN}', param="temperature"),
    # Found by the fuzzer: tiny ones broke sampling in float32 (NaN probabilities, a 500); now greedy.
    Case("temperature 1e-241", "/v1/completions", completion(temperature=1e-241, max_tokens=3), status=200),
    Case("top_p 1e-241", "/v1/chat/completions", chat("你好", top_p=1e-241), status=200),
    Case("a detokenize id of 2^64", "/detokenize", {"tokens": [1, 2 ** 64]}, param="tokens.1"),
    Case("a negative detokenize id", "/detokenize", {"tokens": [-1]}, param="tokens.0"),
    Case("a detokenize id beyond the vocabulary", "/detokenize", {"tokens": [0, 10 ** 9]}, param="tokens.1",
         says="outside the vocabulary"),
    Case("too many ids to detokenize", "/detokenize", {"tokens": [0] * (DETOKENIZE_LIMIT + 1)}, param="tokens",
         says=f"{DETOKENIZE_LIMIT}"),
    # Content parts: strict types (text parts' text was joined unchecked: a TypeError, a 500).
    *[Case(f"a text part whose text is {what}", "/v1/chat/completions", chat([{"type": "text", "text": text}]),
           param="messages.0.content.0.text") for what, text in (("an int", 5), ("a list", ["a"]), ("null", None))],
    Case("a text part without text", "/v1/chat/completions", chat([{"type": "text"}]),
         param="messages.0.content.0.text", says="required"),
    Case("a part whose type is an int", "/v1/chat/completions", chat([{"type": 3, "text": "你好"}]),
         param="messages.0.content.0.type"),
    Case("an image part", "/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": "x"}}]),
         param="messages.0.content.0.type", says="only 'text'"),
    Case("a part that is no object", "/v1/chat/completions", chat([5]), param="messages.0.content.0"),
    Case("content that is a number", "/v1/chat/completions", chat(5), param="messages.0.content"),
    Case("a bad part in a later message", "/v1/chat/completions",
         {"messages": [{"role": "system", "content": "你好"},
                       {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": {}}]}]},
         param="messages.1.content.1.text"),
    Case("text parts are read", "/v1/chat/completions", chat([{"type": "text", "text": "你好"}]), status=200),
    Case("an unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
         param="messages.0.role"),
    Case("messages that are no list", "/v1/chat/completions", {"messages": "你好"}, param="messages"),
    # Other types and shapes.
    Case("a prompt that is a number", "/v1/completions", {"prompt": 5}, param="prompt"),
    Case("a prompt list holding a number", "/v1/completions", {"prompt": ["今天", 5]}, param="prompt.1"),
    Case("a stop that is a number", "/v1/completions", completion(stop=[1]), param="stop.0"),
    Case("five stops", "/v1/completions", completion(stop=list("abcde")), param="stop", says="4"),
    Case("n as a word", "/v1/completions", completion(n="x"), param="n"),
    Case("a body that is a list", "/v1/completions", [1, 2]),
    Case("an empty body", "/v1/completions", b"", code="invalid_json"),
    Case("a lone surrogate", "/tokenize", '{"prompt": "\\ud800"}', code="invalid_json", says="surrogate"),
    Case("score text that is a number", "/v1/score", {"text": 5}, param="text"),
    Case("tokenize without a prompt", "/tokenize", {}, param="prompt"),
    # The queue: a request that can never fit is a 400, not a 429 on an idle server.
    Case("more prompts than the queue holds", "/v1/completions", completion(prompt=["今天"] * (MAX_QUEUE + 1)),
         param="prompt", says="serve.max_queue", code="too_many_prompts"),
    Case("as many prompts as the queue holds", "/v1/completions", completion(prompt=["今天"] * MAX_QUEUE),
         status=200),
    # The key: every endpoint but /health and the page.
    *[Case(f"{p} without the key", p, {}, status=401, code="invalid_api_key", headers={},
           method="GET" if p in ("/v1/models", "/metrics") else "POST")
      for p in ["/v1/models", *POSTS, "/metrics"]],
    *[Case(f"{p} with a wrong key", p, {"prompt": "x"}, status=401, code="invalid_api_key",
           headers={"Authorization": "Bearer wrong"}) for p in ("/tokenize", "/v1/score")],
    Case("a key of non-ASCII bytes", "/tokenize", {"prompt": "x"}, status=401,
         headers={"Authorization": "Bearer 密钥".encode()}),
    Case("/health without the key", "/health", method="GET", status=200, headers={}),
    Case("the page without the key", "/", method="GET", status=200, headers={}),
]


@pytest.fixture(scope="module")
def hostile(checkpoints):
    with serve(checkpoints["gpt"], api_key=KEY, max_queue=MAX_QUEUE, max_batch=4) as server:
        yield server.wait_ready()


def send(server, case: Case) -> httpx.Response:
    if case.method == "GET":
        return httpx.get(server.url + case.path, headers=case.headers, timeout=30)
    raw = case.body if isinstance(case.body, str | bytes) else json.dumps(case.body)
    return httpx.post(server.url + case.path, content=raw, timeout=30,
                      headers={**case.headers, "Content-Type": "application/json"})


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_request_is_refused_naming_the_field_or_limit(hostile, case):
    response = send(hostile, case)
    if case.status == 200:
        assert response.status_code == 200, response.text
        if "text/event-stream" in response.headers.get("content-type", ""):
            assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
        return
    error = error_of(response, case.status)
    if case.param is not None:
        assert error["param"] == case.param, error
        assert case.param in error["message"], error
    assert case.says in error["message"], error
    if case.code is not None:
        assert error["code"] == case.code, error


@pytest.fixture(scope="module")
def impatient(checkpoints):
    """A server that waits half a second for a body, and serves /metrics to anyone."""
    with serve(checkpoints["gpt"], api_key=KEY, body_timeout_s=0.5, metrics_public=True) as server:
        yield server.wait_ready()


def test_a_body_shorter_than_its_content_length_gets_408_and_a_closed_connection(impatient):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    reply = b""
    with socket.create_connection(("127.0.0.1", impatient.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"prompt":')  # 10 of the 100 bytes, and then nothing
        # Until the server closes the connection; every recv waits at most the socket's 10 s.
        while chunk := sock.recv(65536):
            reply += chunk
            assert len(reply) < 1 << 16
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", reply
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and "serve.body_timeout_s" in error["message"]
    assert "10 bytes came of the 100 announced" in error["message"]


def test_metrics_public_serves_metrics_without_the_key_and_nothing_else(impatient):
    assert httpx.get(impatient.url + "/metrics", timeout=10).status_code == 200
    error_of(httpx.post(impatient.url + "/tokenize", json={"prompt": "x"}, timeout=10), 401)
    error_of(httpx.get(impatient.url + "/v1/models", timeout=10), 401)


@pytest.fixture(scope="module")
def failing(checkpoints):
    """A server whose model breaks at its third decoding step, and at every one after."""
    with serve(checkpoints["gpt"], patches=[FailAfter("slot_forward", 2)]) as server:
        yield server.wait_ready()


def sse_events(response: httpx.Response) -> list[str]:
    return [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "今天", "max_tokens": 50, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 50}),
])
def test_a_stream_whose_model_fails_ends_with_an_error_event_and_done(failing, path, body):
    response = httpx.post(failing.url + path, json={**body, "stream": True}, timeout=30)
    assert response.status_code == 200
    *chunks, last_error, done = sse_events(response)
    assert done == "[DONE]"
    error = json.loads(last_error)["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed"
    assert "injected failure" in error["message"]
    assert all("choices" in json.loads(c) for c in chunks)
    assert metric(failing, "hanlm_requests_total", f'{{endpoint="{path}",status="500"}}') >= 1


def test_the_openai_client_sees_a_failed_stream_as_an_error(failing):
    client = openai.OpenAI(base_url=failing.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="injected failure"):
        list(client.completions.create(model="tiny", prompt="今天", max_tokens=50, stream=True))


def test_a_whole_answer_whose_model_fails_is_a_500_with_the_error_shape(failing):
    response = httpx.post(failing.url + "/v1/completions", json={"prompt": "今天", "max_tokens": 50}, timeout=30)
    assert error_of(response, 500)["code"] == "generation_failed"


def test_any_exception_in_a_stream_ends_it_with_an_error_event_and_done():
    """Not only the engine's errors: whatever raises while the chunks are made."""
    class Broken:
        def chunk(self, choices, **extra):
            return {"choices": choices, **extra}

        def opening(self):
            return []

        def token(self, e):
            raise KeyError("a bug in the format")

        def finish(self, e):
            return {}

    async def events():
        yield TokenEvent(0, "今", 1, -0.5, None)
        yield FinishEvent(0, "stop", 1, "")

    async def run():
        statuses = []
        out = [e async for e in sse_stream(events(), Broken(), prompt_tokens=1, include_usage=True,
                                           count=statuses.append)]
        return out, statuses

    out, statuses = asyncio.run(run())
    assert out[-1] == "data: [DONE]\n\n" and len(out) == 2
    error = json.loads(out[0].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert statuses == ["500"]


class Diverged:
    """Logits 100,000 times too large: what a model whose training diverged serves."""

    def install(self, model) -> None:
        import torch

        with torch.no_grad():
            model.norm.weight.mul_(1e5)

    def release(self) -> None:
        pass


def strict_json(text: str):
    """json.loads that refuses `Infinity` and `NaN`, as JavaScript's JSON.parse and most clients do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_models_infinite_figures_are_valid_json(checkpoints):
    with serve(checkpoints["gpt"], patches=[Diverged()]) as server:
        server.wait_ready()
        scored = httpx.post(server.url + "/v1/score", json={"text": "今天天气很好"}, timeout=30)
        assert scored.status_code == 200
        body = strict_json(scored.text)
        assert body["nll"] > 1e4 and body["perplexity"] is None  # exp(nll / tokens) is beyond a float
        streamed = httpx.post(server.url + "/v1/completions", json={"prompt": "今天", "max_tokens": 4, "logprobs": 5,
                                                                      "stream": True}, timeout=30)
        events = sse_events(streamed)
        assert events[-1] == "[DONE]" and all("choices" in strict_json(e) for e in events[:-1])
        whole = httpx.post(server.url + "/v1/completions", json={"prompt": "今天", "max_tokens": 4, "logprobs": 5},
                           timeout=30)
        assert whole.status_code == 200 and strict_json(whole.text)["choices"][0]["logprobs"]["top_logprobs"]
