"""The shapes of OpenAI's answers: `text_completion` and `chat.completion`, streamed and whole."""

from __future__ import annotations

import time
import uuid
from typing import Any

from hanlm.data.tokenizer import Tokenizer
from hanlm.serve.engine import FinishEvent, TokenEvent
from hanlm.serve.engine import Request as Job
from hanlm.serve.streaming import Collected


class CompletionFormat:
    """/v1/completions: choice i·n + k is prompt i's k-th continuation; `echo` puts the prompt first."""

    def __init__(self, tokenizer: Tokenizer, model_name: str, prompts: list[str], jobs: list[Job], *, n: int,
                 echo: bool, logprobs: bool):
        self.tokenizer, self.jobs, self.n, self.echo, self.logprobs = tokenizer, jobs, n, echo, logprobs
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                     "model": model_name}
        self.prefix = {i * n + k: (p if echo else "") for i, p in enumerate(prompts) for k in range(n)}
        self._started: set[int] = set()  # choices whose first chunk (which carries the echo) is out

    def _text(self, index: int, text: str) -> str:
        if index in self._started:
            return text
        self._started.add(index)
        return self.prefix[index] + text

    def _logprobs(self, events: list[TokenEvent], offset: int) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([e.token]) for e in events]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self.tokenizer.decode([t]): v for t, v in (e.top or {}).items()} for e in events],
                "text_offset": offsets}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head, "choices": choices, **extra}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def token(self, e: TokenEvent) -> dict[str, Any] | None:
        text = self._text(e.index, e.text)
        if not text and not self.logprobs:
            return None
        lp = self._logprobs([e], 0) if self.logprobs else None
        return {"index": e.index, "text": text, "logprobs": lp, "finish_reason": None}

    def finish(self, e: FinishEvent) -> dict[str, Any]:
        return {"index": e.index, "text": self._text(e.index, e.text), "logprobs": None, "finish_reason": e.reason}

    def _echoed_logprobs(self, index: int, generated: dict[str, Any]) -> dict[str, Any]:
        """`generated` with the prompt's tokens in front (scored, the first one excepted)."""
        job = self.jobs[index // self.n]
        ids = job.prompt_ids[1:]
        return {"tokens": [self.tokenizer.decode([t]) for t in ids] + generated["tokens"],
                "token_logprobs": (job.prompt_scores or []) + generated["token_logprobs"],
                "top_logprobs": [None] * len(ids) + generated["top_logprobs"],
                "text_offset": list(range(len(ids))) + generated["text_offset"]}

    def whole(self, collected: Collected, usage: dict[str, int]) -> dict[str, Any]:
        out = []
        for i in range(collected.choices):
            lp = None
            if self.logprobs:
                lp = self._logprobs(collected.tokens[i], len(self.prefix[i]))
                if self.echo:
                    lp = self._echoed_logprobs(i, lp)
            out.append({"index": i, "text": self.prefix[i] + collected.texts[i], "logprobs": lp,
                        "finish_reason": collected.reason(i)})
        return self.chunk(out, usage=usage)


class ChatFormat:
    """/v1/chat/completions: `n` assistant replies to one conversation."""

    def __init__(self, tokenizer: Tokenizer, model_name: str, *, n: int, logprobs: bool):
        self.tokenizer, self.n, self.logprobs = tokenizer, n, logprobs
        self.head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, e: TokenEvent) -> dict[str, Any]:
        top = [self._entry(t, v) for t, v in (e.top or {}).items()]
        return {**self._entry(e.token, e.logprob), "top_logprobs": top}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(self.n)]

    def token(self, e: TokenEvent) -> dict[str, Any] | None:
        if not e.text and not self.logprobs:
            return None
        lp = {"content": [self._logprobs(e)]} if self.logprobs else None
        return {"index": e.index, "delta": {"content": e.text}, "logprobs": lp, "finish_reason": None}

    def finish(self, e: FinishEvent) -> dict[str, Any]:
        return {"index": e.index, "delta": {"content": e.text} if e.text else {}, "logprobs": None,
                "finish_reason": e.reason}

    def whole(self, collected: Collected, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": i, "message": {"role": "assistant", "content": collected.texts[i]},
             "logprobs": {"content": [self._logprobs(e) for e in collected.tokens[i]]} if self.logprobs else None,
             "finish_reason": collected.reason(i)} for i in range(collected.choices)]}
