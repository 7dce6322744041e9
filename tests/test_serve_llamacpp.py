"""`hanlm serve --engine llama.cpp`: the tiny GPT's GGUF run by llama.cpp behind hanlm's own engine gives
what the torch engine gives (greedy text, seeded samples, logprobs, scores, streaming, batching), under
the same key and metrics; the GGUF is written once per checkpoint content; and what llama.cpp cannot
serve is refused by name before a server starts."""

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import AUTH, KEY, LiveServer, checkpoints, metric, serve  # noqa: F401

from hanlm.checkpoint import load_checkpoint, save_checkpoint
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.tokenizer import WordTokenizer
from hanlm.loading import resolve_served
from hanlm.serve import llamacpp
from hanlm.serve.app import create_app

NEEDS_LLAMA_CPP = "llama-cpp-python is the optional extra hanlm[llamacpp]"


def llama_model(path, **kwargs):
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    kwargs.setdefault("max_batch", 8)
    return llamacpp.llama_cpp_model(path, note=lambda _: None, **kwargs)


@pytest.fixture(scope="module")
def servers(checkpoints):
    """The tiny GPT served by the torch engine and by the llama.cpp engine, both keyed."""
    loaded = llama_model(checkpoints["gpt"])
    with serve(checkpoints["gpt"], api_key=KEY, max_batch=8) as torch_server, \
            LiveServer(create_app(lambda: loaded, model_name="tiny", api_key=KEY, max_batch=8)) as llama_server:
        yield torch_server.wait_ready(), llama_server.wait_ready()


def post(server, path, body):
    return httpx.post(server.url + path, headers=AUTH, json=body, timeout=60)


BODIES = [
    {"prompt": "中国经济", "max_tokens": 20, "temperature": 0},
    {"prompt": ["今天", "人民日报"], "max_tokens": 12, "temperature": 1.0, "top_k": 50, "n": 3, "seed": 7},
    {"prompt": "北京", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 1, "echo": True, "logprobs": 2},
    {"prompt": "新华社", "max_tokens": 30, "temperature": 0.7, "seed": 3, "stop": ["的"]},
]


@pytest.mark.parametrize("body", BODIES, ids=["greedy", "n-seeded", "echo-logprobs", "stop"])
def test_llama_cpp_answers_what_the_torch_engine_answers(servers, body):
    ours, theirs = (post(s, "/v1/completions", body).json() for s in servers)
    assert [c["text"] for c in theirs["choices"]] == [c["text"] for c in ours["choices"]]
    assert [c["finish_reason"] for c in theirs["choices"]] == [c["finish_reason"] for c in ours["choices"]]
    assert theirs["usage"] == ours["usage"]
    if body.get("logprobs") is not None:
        for a, b in zip(ours["choices"], theirs["choices"]):
            assert b["logprobs"]["tokens"] == a["logprobs"]["tokens"]
            assert b["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=1e-3)


def test_chat_and_score_match_and_a_prompt_beyond_the_context_is_a_400(servers):
    chat = {"messages": [{"role": "user", "content": "写一句话。"}], "max_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    ours, theirs = (post(s, "/v1/chat/completions", chat).json()["choices"][0] for s in servers)
    assert theirs["message"] == ours["message"]
    assert [t["top_logprobs"][0]["token"] for t in theirs["logprobs"]["content"]] == \
        [t["top_logprobs"][0]["token"] for t in ours["logprobs"]["content"]]
    ours, theirs = (post(s, "/v1/score", {"text": "中国经济发展很快"}).json() for s in servers)
    assert theirs["token_logprobs"] == pytest.approx(ours["token_logprobs"], abs=1e-3)
    too_long = post(servers[1], "/v1/completions", {"prompt": "今天", "max_tokens": 126})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_streams_and_concurrent_requests_batched_in_llama_cpp_give_the_greedy_text(servers):
    torch_server, llama_server = servers
    prompts = [f"第{i}天" if i % 2 else f"中国{i}" for i in range(8)]

    async def streamed(http, prompt):
        text, finish, events = "", None, []
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        text += choice["text"]
                        finish = choice["finish_reason"] or finish
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] > 0
        return text, finish

    async def together():
        async with httpx.AsyncClient(base_url=llama_server.url, headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*(streamed(http, p) for p in prompts))

    results = asyncio.run(together())
    for prompt, (text, finish) in zip(prompts, results):
        alone = post(torch_server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert (text, finish) == (alone.json()["choices"][0]["text"], alone.json()["choices"][0]["finish_reason"])


def test_the_key_and_the_metrics_apply_to_the_llama_cpp_engine(servers):
    llama_server = servers[1]
    before = metric(llama_server, "hanlm_generation_tokens_total")
    done = post(llama_server, "/v1/completions", {"prompt": "今天", "max_tokens": 5, "temperature": 0}).json()
    assert metric(llama_server, "hanlm_generation_tokens_total") - before == done["usage"]["completion_tokens"]
    assert metric(llama_server, "hanlm_requests_total", '{endpoint="/v1/completions",status="200"}') >= 1
    assert metric(llama_server, "hanlm_time_to_first_token_seconds_count") >= 1
    for path, body in [("/v1/completions", {"prompt": "今天"}), ("/v1/score", {"text": "今天"})]:
        refused = httpx.post(llama_server.url + path, json=body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(llama_server.url + "/metrics").status_code == 401
    models = httpx.get(llama_server.url + "/v1/models", headers=AUTH).json()["data"][0]
    assert models["max_model_len"] == 128 and models["arch"] == "gpt"


# -- the GGUF cache ----------------------------------------------------------------------------

def rewritten(source: str, root, step: int, *overrides: str, shift: float = 0.0, tokenizer=None) -> str:
    """`source` saved again as checkpoint `step` under `root`, with config `overrides`, `shift` added to its
    final norm's weights and `tokenizer` (None: its own); the new checkpoint's path."""
    ckpt = load_checkpoint(source)
    cfg = load_config(f"{source}/config.yaml", list(overrides))
    weights = dict(ckpt.weights)
    weights["norm.weight"] = weights["norm.weight"] + shift
    return save_checkpoint(str(root), weights, cfg, tokenizer or ckpt.tokenizer, {"step": step}, note=lambda _: None)


def test_the_gguf_is_written_once_reused_wherever_the_checkpoint_lies_and_rewritten_when_it_changes(
        checkpoints, tmp_path):
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    notes = []

    def start(path):
        llamacpp.llama_cpp_model(path, max_batch=1, note=notes.append)
        return notes[-1].split()[1:3]  # ["wrote" | "reusing", the file]

    first = rewritten(checkpoints["gpt"], tmp_path / "run", 1, shift=0.5)
    verb, gguf = start(first)
    assert verb == "wrote"
    written = Path(gguf).stat()
    assert start(first) == ["reusing", gguf]
    copy = rewritten(first, tmp_path / "elsewhere", 9)  # the same weights, config and tokenizer
    assert start(copy) == ["reusing", gguf]
    assert Path(gguf).stat().st_mtime_ns == written.st_mtime_ns  # not written again
    changed = rewritten(first, tmp_path / "run", 2, shift=0.25)  # the run's newest checkpoint
    assert resolve_served(str(tmp_path / "run")) == changed
    verb, other = start(changed)
    assert verb == "wrote" and other != gguf


# -- refusals ----------------------------------------------------------------------------------

@pytest.fixture
def no_server(monkeypatch):
    """A refusal must come before the server: uvicorn.run fails the test instead of serving."""
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)


def refused(capsys, argv, *parts):
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("hanlm: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def test_without_llama_cpp_python_the_engine_names_the_pip_command(checkpoints, capsys, monkeypatch, no_server):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    llamacpp._binding.cache_clear()
    try:
        refused(capsys, ["serve", checkpoints["gpt"], "--engine", "llama.cpp"], "pip install 'hanlm[llamacpp]'")
    finally:
        llamacpp._binding.cache_clear()


def test_what_llama_cpp_cannot_serve_is_refused_by_name(checkpoints, tmp_path, capsys, no_server):
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    gpt = checkpoints["gpt"]
    engine = ["--engine", "llama.cpp"]
    refused(capsys, ["serve", checkpoints["ngram"], *engine], "a language model of model.arch ngram",
            "serves gpt language models only", "--engine torch")
    lstm = rewritten(gpt, tmp_path / "lstm", 1, "model.arch=lstm")
    refused(capsys, ["serve", lstm, *engine], f"{lstm} is a language model of model.arch lstm")
    encoder = rewritten(gpt, tmp_path / "encoder", 1, "model.arch=encoder", "train.objective=mlm")
    refused(capsys, ["serve", encoder, *engine], "model.arch encoder")
    classifier = rewritten(gpt, tmp_path / "classifier", 1, "model.task=classify", "finetune.labels=[neg,pos]")
    refused(capsys, ["serve", classifier, *engine], "is a text classifier (model.task classify)",
            "classifiers and taggers run on torch")
    biased = rewritten(gpt, tmp_path / "biased", 1, "model.qkv_bias=true")
    refused(capsys, ["serve", biased, *engine], "model.qkv_bias is beyond the llama architecture")
    words = rewritten(gpt, tmp_path / "words", 1, tokenizer=WordTokenizer(load_checkpoint(gpt).tokenizer.vocab))
    refused(capsys, ["serve", words, *engine], "its word tokenizer is not one hanlm writes into a GGUF")
    refused(capsys, ["serve", str(tmp_path / "model.arpa"), *engine], "is an ARPA n-gram model")
    refused(capsys, ["serve", gpt, *engine, "--speculative", "prompt"], "does not speculate", "drop --speculative")
    refused(capsys, ["serve", gpt, *engine, "--device", "cuda"], "--device cuda", "runs on the CPU")
    refused(capsys, ["serve", gpt, *engine, "--max-batch", "300"], "serve.max_batch 300", "at most 255")
