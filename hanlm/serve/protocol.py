"""The OpenAI request bodies hanlm accepts, their limits, and the OpenAI error shape.

Unknown fields are accepted and ignored, as vLLM does: real clients send many (`frequency_penalty`,
`logit_bias`, …). Every integer field has a range, and every value a type: validation failures
become 400 errors that name the field (`messages.0.content.1.text`), never a 500 further in.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from hanlm.limits import MAX_TOKENS_LIMIT, SEED_LIMIT, TEMPERATURE_MAX, TOP_K_LIMIT

# More ids than any context holds; bounds the work (and the vocabulary dump) of one /detokenize.
DETOKENIZE_LIMIT = 1 << 16
MAX_CHOICES = 16  # n
MAX_LOGPROBS = 5  # logprobs, top_logprobs
MAX_STOPS = 4


class APIError(Exception):
    """An error the client caused (or a full queue), sent as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, e: Exception) -> APIError:
        """`e` as a client is shown it: an APIError as it is, anything else as a 500."""
        if isinstance(e, APIError):
            return e
        return cls(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=TOP_K_LIMIT)  # 0 or -1: off (vLLM uses -1)
    stop: list[str] = Field([], max_length=MAX_STOPS)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    # Unions are normalised to one type before validation: an error inside a union would be
    # reported under the union member's name (`stop.list[str].0`), which names no field.
    @field_validator("stop", mode="before", json_schema_input_type=str | list[str] | None)
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return [] if v is None else [v] if isinstance(v, str) else v


class CompletionRequest(SamplingFields):
    prompt: list[str]  # a string arrives as a list of one
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before", json_schema_input_type=str | list[str])
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of strings")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: list[str]) -> list[str]:
        if not v or any(not p for p in v):
            raise ValueError("the prompt is empty")
        return v


class TextPart(BaseModel):
    """The one content part a text model reads. Other types (image_url, input_audio, file, refusal, …)
    are refused rather than dropped: a reply must not pretend to have seen what it was not shown."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v != "text":
            raise ValueError(f"the part type is {v!r}; this model reads only 'text' parts (no images, audio or files)")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: list[TextPart] | None = None  # a string arrives as one text part

    @field_validator("content", mode="before", json_schema_input_type=str | list[TextPart] | None)
    @classmethod
    def _one_part(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [{"type": "text", "text": v}]
        if v is not None and not isinstance(v, list):
            raise ValueError("must be a string, a list of content parts or null")
        return v

    def text(self) -> str:
        return "".join(p.text for p in self.content or [])


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v or not any(m.text() for m in v):
            raise ValueError("the messages are empty")
        return v


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    text: str = Field(min_length=1)


MAX_TEXTS = 256  # texts in one /v1/classify or /v1/segment request
MAX_TEXT_CHARS = 100_000  # characters in one of them
MAX_TEXTS_CHARS = 300_000  # characters in all of them together


def _text_length(text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the text has {len(text):,} characters; at most {MAX_TEXT_CHARS:,} per text")
    return text


class TextsRequest(BaseModel):
    """One text or a list of them, run as one batch. Each limit is named in its 400, with the number
    the request has: `input: 257 texts; at most 256 per request`, `input.3: the text has 120,000
    characters; at most 100,000 per text`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    # A string arrives as a list of one.
    input: list[Annotated[str, Field(min_length=1), AfterValidator(_text_length)]]

    # The count is checked before the texts are, and without pydantic's union and length messages,
    # which named neither the field nor the limit ("Input should be a valid string").
    @field_validator("input", mode="before", json_schema_input_type=str | list[str])
    @classmethod
    def _texts(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of strings")
        if not v:
            raise ValueError(f"no texts: send a string or a list of 1 to {MAX_TEXTS} strings")
        if len(v) > MAX_TEXTS:
            raise ValueError(f"{len(v):,} texts; at most {MAX_TEXTS} per request")
        return v

    @field_validator("input")
    @classmethod
    def _total(cls, v: list[str]) -> list[str]:
        total = sum(map(len, v))
        if total > MAX_TEXTS_CHARS:
            raise ValueError(f"the texts have {total:,} characters in all; at most {MAX_TEXTS_CHARS:,} per request")
        return v


class ClassifyRequest(TextsRequest):
    """/v1/classify: one text or a list of them, labelled in one batch (hanlm's own endpoint)."""


class SegmentRequest(TextsRequest):
    """/v1/segment: one text or a list of them, segmented (and POS-tagged, by a bmes-pos tagger) in one batch."""


class NerRequest(TextsRequest):
    """/v1/ner: one text or a list of them, their named entities found in one batch."""


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    # Ids beyond the vocabulary are refused by the endpoint, which knows its size.
    tokens: list[Annotated[int, Field(ge=0, lt=1 << 31)]] = Field(max_length=DETOKENIZE_LIMIT)


ROLE_NAMES = {"system": "系统", "developer": "系统", "user": "用户", "assistant": "助手", "tool": "工具"}


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The chat template over a base model: each turn `角色：内容`, one after another, then `助手：`
    for the reply. No separator between turns: the role labels mark them, and the base models'
    text has no line breaks to learn one from. E.g.

        系统：你是人民日报的编辑。用户：写一句新年贺词。助手：
    """
    return "".join(f"{ROLE_NAMES[m.role]}：{m.text()}" for m in messages) + f"{ROLE_NAMES['assistant']}："


# A reply ends where the model starts writing the next turn.
CHAT_STOPS = [f"{ROLE_NAMES[r]}：" for r in ("user", "system")]


def json_text(data: Any) -> str:
    """JSON every client can parse: a float that is not finite (a diverged model's infinite perplexity
    or -inf log-probability) becomes null, where json.dumps would write the invalid `Infinity`."""
    try:
        return json.dumps(data, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


class JSONAnswer(JSONResponse):
    """A JSON response encoded with `json_text` (Starlette's own refuses non-finite floats with a 500)."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")
