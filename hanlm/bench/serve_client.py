"""The load generator of `python -m hanlm.bench.serve`, in a process of its own so that the clients'
Python does not share the server's interpreter (and its GIL):

    python -m hanlm.bench.serve_client URL --concurrency 32 --requests 64 --tokens 64

Each client streams /v1/completions and stamps every chunk. Prints one JSON line with what vLLM's
`benchmark_serving` reports: request throughput, output tokens/s, TTFT, TPOT (per request: the time
after the first token over the tokens after it) and inter-token latency, each as mean, p50 and p99,
and the failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time

import numpy as np

PROMPTS = ["今天", "中国经济", "人民日报记者", "新华社北京", "改革开放", "科技", "农民", "教育"]


async def _client(http, prompt: str, tokens: int, system: str) -> dict:
    started = time.perf_counter()
    stamps = []
    body = {"prompt": system + prompt, "max_tokens": tokens, "temperature": 1.0, "seed": 1, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"failed": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    if not stamps:
        return {"failed": "no tokens"}
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"ttft": stamps[0] - started, "itl": gaps, "tpot": tpot, "tokens": len(stamps)}


def _stats(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = np.asarray(values) * 1000
    return {f"{name}_mean_ms": float(ms.mean()), f"{name}_p50_ms": float(np.percentile(ms, 50)),
            f"{name}_p99_ms": float(np.percentile(ms, 99))}


async def load(url: str, concurrency: int, requests: int, tokens: int, system: str = "") -> dict:
    """`requests` streamed completions of `tokens` tokens, `concurrency` at a time; the summary."""
    import httpx

    queue = list(range(requests))
    results: list[dict] = []

    async def worker(http) -> None:
        while queue:
            i = queue.pop()
            results.append(await _client(http, PROMPTS[i % len(PROMPTS)], tokens, system))

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await _client(http, "预热", 4, system)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    done = [r for r in results if "failed" not in r]
    out = {"concurrency": concurrency, "requests": requests, "failed": len(results) - len(done), "seconds": elapsed,
           "requests_per_s": len(done) / elapsed, "tokens_per_s": sum(r["tokens"] for r in done) / elapsed}
    out |= _stats("ttft", [r["ttft"] for r in done])
    out |= _stats("tpot", [r["tpot"] for r in done if r["tpot"] is not None])
    out |= _stats("itl", [g for r in done for g in r["itl"]])
    out["itl_stdev_ms"] = 1000 * statistics.pstdev([g for r in done for g in r["itl"]] or [0.0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanlm.bench.serve_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--system", default="", help="a prefix every prompt shares (a system prompt)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(load(args.url, args.concurrency, args.requests, args.tokens, args.system))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
