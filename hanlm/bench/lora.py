"""LoRA against full fine-tuning on a network of Qwen2.5-0.5B's shape or bert-base-chinese's (issue 32): peak memory
and tokens/s of a few classification steps on this machine.

    python -m hanlm.bench.lora [--shape qwen2.5-0.5b|bert-base-chinese] [--steps 3] [--batch 4] [--length 128]
                               [--rank 8] [--out bench/results/lora]

The network is hanlm's GPT with Qwen2.5-0.5B's configuration (24 layers, hidden 896, 14 query and 2 key/value
heads of 64, MLP 4,864, vocabulary 151,936, tied embeddings, qkv biases, rope theta 1e6, norm eps 1e-6:
494 M parameters), or hanlm's bert with bert-base-chinese's (12 layers, hidden 768, 12 heads, MLP 3,072,
vocabulary 21,128, 512 positions: 102 M), and random weights — the shapes decide memory and speed, not the
values — with a two-label classification head, trained with the Finetuner's optimizer on random token ids. Each
mode runs in a fresh process (so each peak RSS is its own): `lora` (rank --rank on every projection: the head and
the updates train) and `full` (every weight trains, AdamW's two moments for all of them). Writes results.json and
table.md into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from hanlm.bench import suite_parser

QWEN25_05B = ["model.arch=gpt", "model.preset=null", "model.n_layer=24", "model.n_embd=896", "model.n_head=14",
              "model.n_kv_head=2", "model.head_dim=64", "model.intermediate_size=4864", "model.context_length=32768",
              "model.rope_theta=1000000", "model.norm_eps=1e-6", "model.qkv_bias=true", "model.tie_embeddings=true"]
BERT_BASE_CHINESE = ["model.arch=bert", "model.preset=null", "model.n_layer=12", "model.n_embd=768", "model.n_head=12",
                     "model.intermediate_size=3072", "model.context_length=512", "model.norm_eps=1e-12",
                     "train.objective=mlm"]
SHAPES = {"qwen2.5-0.5b": (QWEN25_05B, 151_936), "bert-base-chinese": (BERT_BASE_CHINESE, 21_128)}


def measure(shape: str, mode: str, steps: int, batch: int, length: int, rank: int) -> dict:
    """One mode's figures, in this process: build, then `steps` optimizer steps (the first is a warm-up)."""
    import torch

    from hanlm.config import load_config
    from hanlm.finetune.run import finetune_optimizer
    from hanlm.memory import peak_rss
    from hanlm.models.lora import trainable_share
    from hanlm.tasks.classifier import build_classifier

    network, vocab = SHAPES[shape]
    overrides = [*network, "model.task=classify", "finetune.labels=[neg,pos]", "finetune.dropout=0.0",
                 *([f"finetune.lora_rank={rank}"] if mode == "lora" else [])]
    cfg = load_config(overrides=overrides)
    torch.manual_seed(0)
    model = build_classifier(cfg, vocab)
    trainable, total = trainable_share(model)
    optimizer = finetune_optimizer(model, cfg)
    x = torch.randint(4, vocab, (batch, length))
    lengths, y = torch.full((batch,), length), torch.randint(0, 2, (batch,))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(x, lengths, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    timed = times[1:] or times
    return {"shape": shape, "mode": mode, "parameters": total, "trainable": trainable,
            "peak_rss_gb": peak_rss() / 2**30,
            "seconds_per_step": sum(timed) / len(timed), "tokens_per_s": batch * length * len(timed) / sum(timed),
            "steps": steps, "batch": batch, "length": length, "rank": rank if mode == "lora" else None}


def table(rows: list[dict]) -> str:
    lines = ["| shape | mode | parameters | trained | peak RSS | s / step | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"LoRA rank {r['rank']}, every projection" if r["mode"] == "lora" else "full fine-tuning (AdamW)"
        lines.append(f"| {r.get('shape', 'qwen2.5-0.5b')} | {name} | {r['parameters'] / 1e6:,.0f} M | "
                     f"{r['trainable'] / 1e6:,.2f} M "
                     f"({100 * r['trainable'] / r['parameters']:.2f}%) | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['seconds_per_step']:.1f} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("lora", __doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b",
                        help="the network's shape (default qwen2.5-0.5b)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per mode, the first a warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=4, help="texts per step (default 4)")
    parser.add_argument("--length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full (default both)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process that measures one mode
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.shape, args.one, args.steps, args.batch, args.length, args.rank)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in ("lora", "full"):
            parser.error(f"--modes: unknown mode {mode!r}; modes: lora, full")
        command = [sys.executable, "-m", "hanlm.bench.lora", "--shape", args.shape, "--one", mode,
                   "--steps", str(args.steps), "--batch",
                   str(args.batch), "--length", str(args.length), "--rank", str(args.rank)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: {done.stderr.strip()[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
