"""The model service measured: throughput, TTFT and inter-token latency at 1, 8 and 32 concurrent
streaming clients (decode speed against transformers is `hanlm bench generate`).

    python -m hanlm.bench.serve [--out bench/results/serve] [--tokens 64] [--requests 32]

The model is the `small` GPT shape (4 layers, 256 wide, context 256) over the prepared char
vocabulary, freshly initialised (speed does not depend on the weights), in fp32 on the CPU. The
server runs in this process (uvicorn in a thread, `max_batch` 32); the clients are httpx streams
that time every chunk. Writes results.json and table.md into --out. Needs `pip install hanlm[bench]`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import statistics
import sys
import threading
import time

import torch

from hanlm.bench import suite_parser
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.tokenizer import Tokenizer
from hanlm.models import build_model
from hanlm.serve.app import create_app

PROMPTS = ["今天", "中国经济", "人民日报记者", "新华社北京", "改革开放", "科技", "农民", "教育"]


def small_model():
    cfg = load_config(overrides=["model.preset=small", "tokenizer.kind=char"])
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


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("serve", __doc__)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients (default 1,8,32)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, cfg, tokenizer = small_model()
    levels = server_load(model, cfg, tokenizer, [int(c) for c in args.levels.split(",")], args.requests, args.tokens)
    results = {"command": "python -m hanlm.bench.serve " + " ".join(argv or sys.argv[1:]),
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
