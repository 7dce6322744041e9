"""The model service measured: throughput, TTFT, TPOT and inter-token latency at 1, 8 and 32
concurrent streaming clients, beside the engine's own batched decode ceiling (decode speed against
transformers is `hanlm bench generate`).

    python -m hanlm.bench.serve [--out bench/results/serve] [--tokens 64] [--requests 32] [--system TEXT]

The model is the `small` GPT shape (4 layers, 256 wide, context 256) over the prepared char
vocabulary, freshly initialised (speed does not depend on the weights), in fp32 on the CPU. The
server runs in this process (uvicorn in a thread, `max_batch` 32); the clients run in another
(hanlm.bench.serve_client), httpx streams that time every chunk. Before each level, with the server
idle, the model's `decode_step` at that batch size is timed alone: the ceiling the clients are
measured against. Writes results.json and table.md into --out. Needs `pip install hanlm[bench]`.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from fastapi import FastAPI

from hanlm.bench import suite_parser
from hanlm.bench.serve_client import PROMPTS
from hanlm.config import load_config
from hanlm.data.prepare import prepare
from hanlm.data.tokenizer import Tokenizer
from hanlm.models import build_model
from hanlm.serve.app import create_app


def small_model():
    cfg = load_config(overrides=["model.preset=small", "tokenizer.kind=char"])
    tokenizer = Tokenizer.load(prepare(cfg, progress=False).directory / "tokenizer.json")
    torch.manual_seed(0)
    return build_model(cfg.model, tokenizer.vocab_size).eval(), cfg, tokenizer


def engine_ceiling(model, tokenizer, batch: int, length: int, steps: int = 12, compile: bool = False) -> float:
    """Tokens/s of the model's decoding batch alone (`decode_batch`, compiled or not) at `batch` sequences
    whose caches hold `length` tokens: what the engine could hand out if nothing else took time."""
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(PROMPTS[0])]])
    with torch.no_grad():
        _, state = model.log_probs(ids, model.initial_state(1))
        filler = torch.randint(4, tokenizer.vocab_size, (1, max(length - ids.size(1), 1)))
        _, state = model.log_probs(filler, state)
        rows = model.decode_batch(batch, compile=compile)
        for _ in range(batch):
            rows.admit(state, ids.size(1) + filler.size(1))
        tokens = torch.full((batch, 1), 5)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            rows.step(tokens)
            times.append(time.perf_counter() - started)
            for row in range(batch):  # back to `length`: every step sees the same caches
                rows.cut(row, 0)
    return batch / statistics.median(times[2:])


def client_process(module: str, *args: str) -> dict:
    """A load generator (`python -m MODULE ARGS`) in its own process, so that the clients' Python does not
    share the server's interpreter (and its GIL); the summary it prints as its last line."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free loopback port, once its model has loaded; its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started or (app.state.hanlm.loaded is None and app.state.hanlm.error is None):
        time.sleep(0.05)
    try:
        if app.state.hanlm.error:
            raise RuntimeError(app.state.hanlm.error)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def server_load(model, cfg, tokenizer, levels: list[int], requests: int, tokens: int, system: str = "",
                compile: bool = False, prefix_cache_tokens: int = 4096) -> list[dict]:
    """Each concurrency level's client-side summary, with the engine's ceiling at that batch size
    (measured in the same run, while the server is idle) and the share of it the clients received."""
    app = create_app(lambda: (model, cfg, tokenizer), model_name="small", max_batch=max(levels), max_queue=1024,
                     compile="on" if compile else "off", prefix_cache_tokens=prefix_cache_tokens)
    length = len(tokenizer.encode(system + PROMPTS[0])) + 1 + tokens // 2  # a typical cache mid-request
    out = []
    with live_server(app) as url:
        for c in levels:
            with app.state.hanlm.loaded.engine.lock:
                ceiling = engine_ceiling(model, tokenizer, c, length, compile=compile)
            level = client_process("hanlm.bench.serve_client", url, "--concurrency", str(c), "--requests",
                                   str(max(requests, c)), "--tokens", str(tokens), "--system", system)
            level |= {"engine_ceiling_tokens_per_s": ceiling, "of_ceiling": level["tokens_per_s"] / ceiling}
            out.append(level)
            print(json.dumps(out[-1]), flush=True)
    return out


def prefix_caching(tokens: int, requests: int, system_tokens: int = 500) -> dict:
    """TTFT of one client whose prompts share a system prompt of `system_tokens` characters of People's Daily
    text, with the prefix cache off and on: a `small` GPT whose context is 1024 so that the prompt fits."""
    from hanlm.data.corpora import CORPORA

    cfg = load_config(overrides=["model.preset=small", "model.context_length=1024", "tokenizer.kind=char"])
    tokenizer = Tokenizer.load(prepare(cfg, progress=False).directory / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size).eval()
    system = ""
    for record in CORPORA["people-daily-1998"].records():
        system += record["text"]
        if len(system) >= system_tokens:
            break
    system = system[:system_tokens]
    runs = {}
    for name, budget in (("off", 0), ("on", 8192)):
        (level,) = server_load(model, cfg, tokenizer, [1], requests, tokens, system, prefix_cache_tokens=budget)
        runs[name] = level
    return {"system_tokens": len(tokenizer.encode(system)), "off": runs["off"], "on": runs["on"],
            "ttft_p50_ratio": runs["off"]["ttft_p50_ms"] / runs["on"]["ttft_p50_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("serve", __doc__)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients (default 1,8,32)")
    parser.add_argument("--system", default="", help="a prefix every prompt shares (a system prompt)")
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (generate.compile on)")
    parser.add_argument("--prefix", action="store_true", help="also measure TTFT with a shared 500-token system "
                        "prompt, prefix cache off and on")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model, cfg, tokenizer = small_model()
    levels = server_load(model, cfg, tokenizer, [int(c) for c in args.levels.split(",")], args.requests, args.tokens,
                         args.system, compile=args.compile)
    results = {"command": "python -m hanlm.bench.serve " + " ".join(argv or sys.argv[1:]),
               "load": levels, "threads": torch.get_num_threads()}
    if args.prefix:
        results["prefix"] = prefix_caching(8, 16)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


def table(r: dict) -> str:
    """The levels side by side: throughput against one client and against the engine's ceiling, then the
    latencies as mean / p50 / p99."""
    base = r["load"][0]
    lines = [("| clients | requests/s | output tokens/s | vs 1 client | engine ceiling | reached | failed | "
              "TTFT ms mean / p50 / p99 | TPOT ms mean / p50 / p99 | ITL ms mean / p50 / p99 |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["load"]:
        lines.append(
            f"| {x['concurrency']} | {x['requests_per_s']:.2f} | {x['tokens_per_s']:,.0f} | "
            f"{x['tokens_per_s'] / base['tokens_per_s']:.1f}× | {x['engine_ceiling_tokens_per_s']:,.0f} | "
            f"{x['of_ceiling']:.0%} | {x['failed']} | " + " | ".join(
                f"{x[f'{m}_mean_ms']:.1f} / {x[f'{m}_p50_ms']:.1f} / {x[f'{m}_p99_ms']:.1f}"
                for m in ("ttft", "tpot", "itl")) + " |")
    top = r["load"][-1]
    lines += ["", f"- {top['concurrency']} clients: {top['tokens_per_s'] / base['tokens_per_s']:.1f}× one client "
                  f"(goal ≥ 8×), {top['of_ceiling']:.0%} of the engine ceiling (goal ≥ 85%)"]
    if r.get("prefix"):
        p = r["prefix"]
        lines += ["", f"Prefix caching, one client, a shared system prompt of {p['system_tokens']} tokens "
                      f"(`small` shape, context 1024):", "",
                  "| prefix cache | TTFT ms mean / p50 / p99 |", "|---|---|"]
        lines += [f"| {name} | {p[name]['ttft_mean_ms']:.1f} / {p[name]['ttft_p50_ms']:.1f} / "
                  f"{p[name]['ttft_p99_ms']:.1f} |" for name in ("off", "on")]
        lines += ["", f"- TTFT p50 cut {p['ttft_p50_ratio']:.1f}× (goal ≥ 5×)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
