"""The model service measured: throughput, TTFT and inter-token latency at 1, 8 and 32 concurrent
streaming clients, and single-stream decode speed against Hugging Face transformers' `generate`.

    python -m hanlm.bench.serve [--out bench/results/serve] [--tokens 64] [--requests 32]

The model is the `small` GPT shape (4 layers, 256 wide, context 256) over the prepared char
vocabulary, freshly initialised (speed does not depend on the weights), in fp32 on the CPU. The
server runs in this process (uvicorn in a thread, `max_batch` 32); the clients are httpx streams
that time every chunk. Writes results.json and table.md into --out. Needs `pip install hanlm[bench]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.tokenizer import Tokenizer
from hanlm.generate import SamplingParams, generate
from hanlm.models import build_model
from hanlm.serve.app import create_app

PROMPTS = ["今天", "中国经济", "人民日报记者", "新华社北京", "改革开放", "科技", "农民", "教育"]


def _model():
    cfg = load_config(overrides=["model.preset=small"])
    tokenizer = Tokenizer.load(prepare(cfg, progress=False).directory / "tokenizer.json")
    torch.manual_seed(0)
    return build_model(cfg.model, tokenizer.vocab_size).eval(), cfg, tokenizer


async def _client(http, prompt: str, tokens: int) -> dict:
    started = time.perf_counter()
    stamps = []
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "seed": 1, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] - started, "itl": gaps, "tokens": len(stamps) - 1, "seconds": stamps[-1] - started}


async def _load(url: str, concurrency: int, requests: int, tokens: int) -> dict:
    import httpx

    queue = list(range(requests))
    results: list[dict] = []

    async def worker(http) -> None:
        while queue:
            i = queue.pop()
            results.append(await _client(http, PROMPTS[i % len(PROMPTS)], tokens))

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await _client(http, "预热", 4)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    itl = [g for r in results for g in r["itl"]]
    return {"concurrency": concurrency, "requests": requests, "seconds": elapsed,
            "requests_per_s": requests / elapsed, "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_mean_ms": 1000 * statistics.fmean(r["ttft"] for r in results),
            "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in results),
            "itl_mean_ms": 1000 * statistics.fmean(itl), "itl_p50_ms": 1000 * statistics.median(itl)}


def server_load(model, cfg, tokenizer, levels: list[int], requests: int, tokens: int) -> list[dict]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(lambda: (model, cfg, tokenizer), model_name="small", max_batch=max(levels), max_queue=1024)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started or app.state.hanlm.loaded is None:
        time.sleep(0.05)
    try:
        out = []
        for c in levels:
            out.append(asyncio.run(_load(f"http://127.0.0.1:{port}", c, max(requests, c), tokens)))
            print(json.dumps(out[-1]), flush=True)
        return out
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def decode_speed(model, tokenizer, new_tokens: int, repeat: int = 3) -> dict:
    """Single-stream greedy decode tokens/s: hanlm's `generate` against transformers' on a Llama of
    the same shape (RMSNorm, rotary, SwiGLU of the same width, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.blocks[0]
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=model.n_embd, intermediate_size=c.mlp.up.out_features,
        num_hidden_layers=model.n_layer, num_attention_heads=model.n_head, num_key_value_heads=model.n_head,
        max_position_embeddings=model.context_length, tie_word_embeddings=True, rms_norm_eps=1e-5,
        eos_token_id=None, pad_token_id=0)).eval()
    n_ours = sum(p.numel() for p in model.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    prompt = torch.tensor([[tokenizer.eos_id, *tokenizer.encode("今天")]])
    best_ours = best_hf = float("inf")
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in generate(model, tokenizer, "今天", params):
            pass
        best_ours = min(best_ours, time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best_hf = min(best_hf, time.perf_counter() - t0)
    return {"new_tokens": new_tokens, "hanlm_tokens_per_s": new_tokens / best_ours,
            "hf_tokens_per_s": new_tokens / best_hf, "speedup": best_hf / best_ours,
            "params_hanlm": n_ours, "params_hf": n_hf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanlm.bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve"), help="output directory")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients (default 1,8,32)")
    parser.add_argument("--decode-tokens", type=int, default=200, help="tokens for the decode comparison")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, cfg, tokenizer = _model()
    decode = decode_speed(model, tokenizer, args.decode_tokens)
    print(json.dumps(decode), flush=True)
    levels = server_load(model, cfg, tokenizer, [int(c) for c in args.levels.split(",")], args.requests, args.tokens)
    results = {"command": "python -m hanlm.bench.serve " + " ".join(argv or sys.argv[1:]), "decode": decode,
               "load": levels, "threads": torch.get_num_threads()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


def table(r: dict) -> str:
    base = r["load"][0]
    lines = [("| concurrent clients | requests/s | output tokens/s | vs 1 client | TTFT mean (p50) | "
              "inter-token latency mean (p50) |"), "|---|---|---|---|---|---|"]
    for x in r["load"]:
        lines.append(f"| {x['concurrency']} | {x['requests_per_s']:.2f} | {x['tokens_per_s']:,.0f} | "
                     f"{x['tokens_per_s'] / base['tokens_per_s']:.1f}× | {x['ttft_mean_ms']:.0f} ms "
                     f"({x['ttft_p50_ms']:.0f}) | {x['itl_mean_ms']:.1f} ms ({x['itl_p50_ms']:.1f}) |")
    d = r["decode"]
    lines += ["", "| single-stream greedy decode | tokens/s |", "|---|---|",
              f"| hanlm `generate` (KV cache) | {d['hanlm_tokens_per_s']:,.0f} |",
              f"| transformers `LlamaForCausalLM.generate`, same shape | {d['hf_tokens_per_s']:,.0f} |",
              f"| ratio | {d['speedup']:.2f}× |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
