"""Training step and decoding, hanlm against Hugging Face transformers models of the same shape.

The peers are `LlamaForCausalLM` (RMSNorm, rotary, SwiGLU: hanlm's GPT block, with the same
MLP width and tied embeddings) and `GPT2LMHeadModel` (LayerNorm, learned positions, a 4d GELU
MLP: about the same parameters). Every model gets the same batch, dtype and AdamW settings
(foreach on CPU, fused on CUDA); a step is forward, loss, backward, gradient clipping and the
optimizer update. FLOPs per token use hanlm's formula with each model's own parameter count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hanlm.config import MODEL_PRESETS, Config, load_config
from hanlm.models import GPT, build_model
from hanlm.train.optim import build_optimizer


@dataclasses.dataclass
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    context_length: int

    @classmethod
    def preset(cls, name: str) -> Shape:
        return cls(name, **MODEL_PRESETS[name])

    def overrides(self) -> list[str]:
        return [f"model.n_layer={self.n_layer}", f"model.n_head={self.n_head}", f"model.n_embd={self.n_embd}",
                f"model.context_length={self.context_length}", "model.preset=null"]


def shapes(device: str, quick: bool) -> list[Shape]:
    """The `small` preset and a `base`-like shape (half of base's layers and width, its real shape
    takes many seconds a step) on CPU; the `base` and `1b` presets on CUDA."""
    if device == "cuda":
        return [Shape.preset("base")] + ([] if quick else [Shape.preset("1b")])
    return [Shape.preset("small")] + ([] if quick else [Shape("base-like", 6, 6, 384, 256)])


def _peers(model: GPT, vocab: int) -> dict[str, Callable[[], nn.Module]]:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    d, hidden = model.n_embd, model.blocks[0].mlp.up.out_features
    return {
        "transformers Llama": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=d, intermediate_size=hidden, num_hidden_layers=model.n_layer,
            num_attention_heads=model.n_head, num_key_value_heads=model.n_head,
            max_position_embeddings=model.context_length, tie_word_embeddings=True, rms_norm_eps=1e-5,
            attn_implementation="sdpa", eos_token_id=None, pad_token_id=0)),
        "transformers GPT-2": lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=model.context_length, n_embd=d, n_layer=model.n_layer,
            n_head=model.n_head, attn_implementation="sdpa", bos_token_id=None, eos_token_id=None)),
    }


def _flops_per_token(model: nn.Module, n_layer: int, n_embd: int, seq_len: int) -> float:
    """hanlm's formula for any of these (tied) models: 6 × parameters — the one V×d matrix counts as the
    head, the embedding lookup is free — plus attention's 12 · layers · width · sequence length."""
    return 6.0 * sum(p.numel() for p in model.parameters()) + 12.0 * n_layer * n_embd * seq_len


def _hanlm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x[:, :-1], x[:, 1:])


def _transformers_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What transformers' own loss does with `labels`: fp32 logits, then cross-entropy."""
    return F.cross_entropy(model(input_ids=x[:, :-1]).logits.float().flatten(0, 1), x[:, 1:].flatten())


def _time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per step after `warmup` steps."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_suite(device: torch.device, peak: float, quick: bool, vocab: int = 4700) -> list[dict]:
    """tokens/s and MFU of one training step for each shape: hanlm, hanlm compiled (CUDA, and CPU
    unless quick), then its peers."""
    batch, seq = (8, 128) if quick else (16, 256)
    if device.type == "cuda":
        batch, seq = (8, 1024) if quick else (16, 1024)
    warmup, steps = (1, 3) if quick else (2, 6)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    rows = []
    for shape in shapes(device.type, quick):
        cfg: Config = load_config(overrides=[*shape.overrides(), f"train.block_size={seq}",
                                             f"train.device={device.type}"])
        torch.manual_seed(0)
        ours = build_model(cfg.model, vocab).to(device)
        x = torch.randint(4, vocab, (batch, seq + 1), device=device)
        # Factories: one peer at a time in memory (a 1b model with AdamW state is ~18 GB).
        models: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]]] = {
            "hanlm GPT": (lambda ours=ours: ours, _hanlm_loss)}
        if device.type == "cuda" or not quick:  # inductor kernels (train.compile); the eager row's weights
            models["hanlm GPT, torch.compile"] = (lambda ours=ours: torch.compile(ours), _hanlm_loss)
        for name, make in _peers(ours, vocab).items():
            models[name] = (lambda make=make: make().to(device), _transformers_loss)
        for name, (make, loss_of) in models.items():
            model = make().train()
            optimizer = build_optimizer(model, cfg)

            def step(model=model, loss_of=loss_of, optimizer=optimizer, x=x) -> None:
                with autocast():
                    loss = loss_of(model, x)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            seconds = _time_steps(step, warmup, steps, device)
            flops = _flops_per_token(model, shape.n_layer, shape.n_embd, seq)
            tps = batch * seq / seconds
            rows.append({"shape": shape.name, "model": name, "params": sum(p.numel() for p in model.parameters()),
                         "batch": f"{batch}×{seq}", "step_s": seconds, "tokens_per_s": tps,
                         "flops_per_token": flops, "mfu": tps * flops / peak})
            del model, optimizer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del ours
    for r in rows:
        base = next(o for o in rows if o["shape"] == r["shape"] and o["model"] == "hanlm GPT")
        r["hanlm_speedup"] = base["tokens_per_s"] / r["tokens_per_s"]
    return rows


def _greedy_hanlm(model: GPT, prompt: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding of a batch with the KV cache (every row at the same position)."""
    logp, state = model.log_probs(prompt, model.initial_state(prompt.size(0)))
    for _ in range(new_tokens - 1):
        logp, state = model.log_probs(logp[:, -1].argmax(-1, keepdim=True), state)


def decode_suite(device: torch.device, quick: bool, vocab: int = 4700) -> list[dict]:
    """Greedy decode tokens/s at batch 1 and 8: hanlm's cache against transformers' `generate`
    (Llama of the same shape), the first shape of `shapes`."""
    shape = shapes(device.type, quick)[0]
    cfg = load_config(overrides=shape.overrides())
    torch.manual_seed(0)
    ours = build_model(cfg.model, vocab).to(device).eval()
    hf = _peers(ours, vocab)["transformers Llama"]().to(device).eval()
    new_tokens = 50 if quick else min(200, shape.context_length - 8)
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(4, vocab, (batch, 4), device=device)
        runs = {"hanlm GPT": partial(_greedy_hanlm, ours, prompt, new_tokens),
                "transformers Llama generate": partial(hf.generate, prompt, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)}
        with torch.no_grad():
            timings = {name: _time_steps(run, 1, 1 if quick else 3, device) for name, run in runs.items()}
        for name, seconds in timings.items():
            rows.append({"shape": shape.name, "batch": batch, "model": name, "new_tokens": new_tokens,
                         "tokens_per_s": batch * new_tokens / seconds,
                         "hanlm_speedup": timings[name] / timings["hanlm GPT"]})
    return rows
