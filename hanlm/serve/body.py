"""Request bodies: read within a size and a time limit, checked for nesting depth, parsed, validated.

Each limit answers before the work it guards: 413 before the bytes are kept, 408 before a client
that sends less than its Content-Length holds a connection for ever, and 400 for deep nesting
before `json.loads`, which recurses and overflows Python's stack at a few thousand levels.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from hanlm.serve.protocol import APIError

Schema = TypeVar("Schema", bound=BaseModel)

# A JSON string, escapes included (the unrolled form, which never backtracks).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Openers step one level in, closers one out: as signed bytes, +1 and −1.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (0 for a scalar), without recursing.

    Brackets inside strings do not count. On valid JSON this is the exact depth; on invalid JSON
    it is at least the depth `json.loads` reaches before it stops at the first error, so it is
    a safe check before parsing."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.translate(_STEPS), dtype=np.int8)
    return int(steps.cumsum(dtype=np.int64).max())


async def read_body(request: Request, *, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body; 413 past `max_bytes`, 408 when it has not all arrived within `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the body is {int(declared):,} bytes; the limit is {max_bytes:,} (serve.max_body_bytes)",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"the body is over the {max_bytes:,}-byte limit (serve.max_body_bytes)",
                                   code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the body did not arrive within {timeout_s:g} s (serve.body_timeout_s): {size:,} bytes "
                            f"came of the {declared or 'unknown number'} announced", code="body_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "the client left before sending its whole body", code="client_disconnected") from None
    return b"".join(chunks)


def parse_json(raw: bytes, *, max_depth: int) -> Any:
    """The JSON value in `raw`; 400 when it is not JSON, not text, or nests deeper than `max_depth`."""
    try:
        text = raw.decode(json.detect_encoding(raw))  # the encodings json.loads accepts
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise APIError(400, f"the body nests arrays and objects {depth:,} deep; the limit is {max_depth} "
                            "(serve.max_json_depth)", code="json_too_deep")
    try:
        data = json.loads(text)
        # A "\ud800" escape parses to a lone surrogate, which no tokenizer (nor UTF-8) can take.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except RecursionError:  # a serve.max_json_depth near the interpreter's recursion limit
        raise APIError(400, f"the body nests arrays and objects {depth:,} deep, deeper than this server can "
                            "parse; its serve.max_json_depth is set too high", code="json_too_deep") from None
    except UnicodeEncodeError:
        raise APIError(400, "the body has a \\uD800-\\uDFFF escape that is not half of a surrogate pair: "
                            "it is no character", code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    return data


def validate(data: Any, schema: type[Schema]) -> Schema:
    """`data` as `schema`; 400 naming the first invalid field by its path (`messages.0.content`)."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None


async def parse_body(request: Request, schema: type[Schema], *, max_bytes: int, timeout_s: float,
                     max_depth: int) -> Schema:
    """The request's body as `schema`, or the APIError (400, 408, 413) saying why not."""
    raw = await read_body(request, max_bytes=max_bytes, timeout_s=timeout_s)
    return validate(parse_json(raw, max_depth=max_depth), schema)
