"""The load generator of `python -m hanlm.bench.nlu`, in a process of its own so that the clients'
Python does not share the server's interpreter (and its GIL):

    python -m hanlm.bench.nlu_client URL --route /v1/segment --texts texts.json --concurrency 8 --requests 64

Each client POSTs one text per request (the next of the JSON list in --texts, round and round) until
`requests` have been sent. Prints one JSON line: requests, texts and characters per second, the latency
as mean, p50 and p99, and the failed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def load(url: str, route: str, texts: list[str], concurrency: int, requests: int) -> dict:
    """`requests` POSTs of one text each to `route`, `concurrency` at a time; the summary."""
    import httpx

    queue = list(range(requests))
    latencies: list[float] = []
    failed: list[str] = []
    characters = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal characters
        while queue:
            text = texts[queue.pop() % len(texts)]
            started = time.perf_counter()
            r = await http.post(route, json={"input": text})
            if r.status_code != 200:
                failed.append(f"HTTP {r.status_code}")
                continue
            latencies.append(time.perf_counter() - started)
            characters += len(text)

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await http.post(route, json={"input": texts[0]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies or [0.0]) * 1000
    return {"concurrency": concurrency, "requests": requests, "failed": len(failed), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "chars_per_s": characters / elapsed, "latency_mean_ms": float(ms.mean()),
            "latency_p50_ms": float(np.percentile(ms, 50)), "latency_p99_ms": float(np.percentile(ms, 99))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hanlm.bench.nlu_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--route", default="/v1/segment")
    parser.add_argument("--texts", type=Path, required=True, help="a JSON list of texts")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args(argv)
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    print(json.dumps(asyncio.run(load(args.url, args.route, texts, args.concurrency, args.requests))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
