"""A fuzzer over the request schemas: bodies drawn from the JSON schema of each pydantic request model
(hanlm/serve/protocol.py), with out-of-range integers on every integer field and, at any node of any
body, now and then an arbitrary JSON value instead. Against a live server: never a 5xx, an error
always in OpenAI's shape, a stream always ending with [DONE] and without an error event.

Bounded and reproducible: a fixed number of examples per endpoint, derandomized (the same bodies
on every run), no example database."""

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import AUTH, KEY, checkpoints, error_of, serve  # noqa: F401

from hanlm.serve.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, ScoreRequest, TokenizeRequest

EXAMPLES = 100  # per endpoint
# Integers at and around every limit the server has (and far beyond any).
EDGE_INTS = [-1, 0, 1, 2, 16, 17, 127, 128, (1 << 16) + 1, (1 << 20) + 1, (1 << 31) - 1, 1 << 31, (1 << 63) - 1,
             1 << 63, 1 << 64, -(1 << 63) - 1, 10 ** 30]
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(EDGE_INTS) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10)
ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest, "/v1/score": ScoreRequest,
             "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}


def sometimes(usual: st.SearchStrategy, odd: st.SearchStrategy, one_in: int) -> st.SearchStrategy:
    return st.integers(0, one_in - 1).flatmap(lambda i: odd if i == 0 else usual)


def values(schema: dict, defs: dict, wild: bool) -> st.SearchStrategy:
    """What `schema` describes; when `wild`, one time in twenty any JSON value instead, and integers
    and numbers at the edges."""
    tame = described(schema, defs, wild)
    return sometimes(tame, ANY_JSON, 20) if wild else tame


def described(schema: dict, defs: dict, wild: bool) -> st.SearchStrategy:
    """The values of `schema`, for the part of JSON Schema that pydantic writes."""
    if "$ref" in schema:
        return described(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, wild)
    if "anyOf" in schema:
        return st.one_of([described(s, defs, wild) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -math.inf) + 1)
        high = schema.get("maximum", schema.get("exclusiveMaximum", math.inf) - 1)
        ints = st.integers(None if low == -math.inf else low, None if high == math.inf else high)
        return sometimes(ints, st.sampled_from(EDGE_INTS), 4) if wild else ints
    if kind == "number":
        floats = st.floats(schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum"),
                           exclude_min="exclusiveMinimum" in schema)
        return sometimes(floats, st.sampled_from([math.inf, math.nan, -0.0]), 4) if wild else floats
    if kind == "string":  # tame strings and lists are not empty: most prompts and messages are not
        return st.text(min_size=schema.get("minLength", 0 if wild else 1), max_size=12)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(values(schema.get("items", {}), defs, wild), min_size=schema.get("minItems", 0 if wild else 1),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        fields = {k: values(v, defs, wild) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries({k: s for k, s in fields.items() if k in required},
                                     optional={**{k: s for k, s in fields.items() if k not in required},
                                               "an_unknown_field": ANY_JSON})
    return ANY_JSON  # a schema with no type takes anything


def bodies(model) -> st.SearchStrategy:
    """Half of them as the schema says (most pass validation), half of them wild."""
    schema = model.model_json_schema()
    return st.booleans().flatmap(lambda wild: values(schema, schema.get("$defs", {}), wild))


@pytest.fixture(scope="module")
def fuzzed(checkpoints):
    # The GPT's 128-token context bounds every generation a valid body can ask for.
    with serve(checkpoints["gpt"], api_key=KEY, max_queue=3, max_batch=16) as server:
        yield server.wait_ready()


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        error_of(response, response.status_code)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
        assert events[-1] == "[DONE]", events
        assert all("error" not in json.loads(e) for e in events[:-1]), events
    else:
        assert isinstance(response.json(), dict)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzzed_bodies_never_get_a_5xx_and_errors_keep_the_openai_shape(fuzzed, path):
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(body=bodies(ENDPOINTS[path]))
    def one(body):
        check(httpx.post(fuzzed.url + path, content=json.dumps(body), timeout=60,
                         headers={**AUTH, "Content-Type": "application/json"}))

    one()
