"""Training step and decoding, hanlm against Hugging Face transformers models of the same shape.

The peers are `LlamaForCausalLM` (RMSNorm, rotary, SwiGLU: hanlm's GPT block, with the same
MLP width and tied embeddings) and `GPT2LMHeadModel` (LayerNorm, learned positions, a 4d GELU
MLP: about the same parameters). Every model gets the same batch, dtype and AdamW settings
(foreach on CPU, fused on CUDA); a step is forward, loss, backward, gradient clipping and the
optimizer update. FLOPs per token use hanlm's formula with each model's own parameter count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hanlm.config import MODEL_PRESETS, Config, load_config
from hanlm.export.hf import hf_state_dict
from hanlm.models import GPT, build_model
from hanlm.models.gpt import RMS_EPS, ROPE_THETA
from hanlm.sampling import SamplingParams
from hanlm.serve.engine import Engine, ErrorEvent, FinishEvent, Request
from hanlm.serve.llamacpp import LlamaCppLM, sequences_for
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
            num_attention_heads=model.n_head, num_key_value_heads=model.n_head, rope_theta=ROPE_THETA,
            max_position_embeddings=model.context_length, tie_word_embeddings=True, rms_norm_eps=RMS_EPS,
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


def _taking_turns(runs: dict[str, Callable[[], None]], warmup: int, rounds: int,
                  device: torch.device) -> dict[str, float]:
    """Median seconds of each run after `warmup` rounds, the runs taking turns (one call of each per round),
    so that the machine's load, which drifts over minutes on shared cores, falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name, run in runs.items():
            seconds = _time_steps(run, 0, 1, device)
            if i >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


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


def _greedy_hanlm(model: GPT, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding of a batch with the KV cache (every row at the same position); row 0's tokens."""
    logp, state = model.log_probs(prompt, model.initial_state(prompt.size(0)))
    tokens = [logp[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logp, state = model.log_probs(tokens[-1], state)
        tokens.append(logp[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)[0].tolist()


def _greedy_transformers(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, prompt.size(1):].tolist()


def _greedy_llama_cpp(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """llama.cpp's greedy decode (top-1 sampling) through llama-cpp-python, as its users call it."""
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == new_tokens:
            return tokens
    return tokens


LLAMA_CPP_DTYPES = ("f32", "f16", "q8_0")
LLAMA_CPP_MISSING = "llama.cpp rows skipped: llama-cpp-python is not installed (pip install -e '.[llamacpp]')"
SERVE_ENGINE = "hanlm serve engine, llama.cpp f32"


def _greedy_engine(engine: Engine, loop: asyncio.AbstractEventLoop, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding through the server's engine (`hanlm serve --engine llama.cpp` without the HTTP):
    one request, its tokens as the engine hands them to the event loop."""
    async def run() -> list[int]:
        request = Request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0))
        engine.submit([request])
        tokens = []
        while not isinstance(event := await request.events.get(), FinishEvent):
            if isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)
            tokens.append(event.token)
        return tokens

    return loop.run_until_complete(run())


@contextlib.contextmanager
def _llama_cpp_runs(model: GPT, cfg: Config, vocab: int, workdir: Path) -> Iterator[dict[str, Callable]]:
    """Greedy decoders of `model`'s weights run by llama.cpp, `(prompt ids, new tokens) -> tokens`: its own
    loop through llama-cpp-python for each GGUF dtype, and hanlm's serving engine on the f32 file; none
    without llama-cpp-python. Closed (files unmapped, the engine stopped) on leaving.

    The vocabulary is a char tokenizer of `vocab` CJK characters: the prompt goes in as ids, so what
    the tokens spell does not matter, only that the file holds a vocabulary of the right size."""
    try:
        import llama_cpp
    except ImportError:
        print(LLAMA_CPP_MISSING, flush=True)
        yield {}
        return
    from hanlm.data.tokenizer import SPECIAL_TOKENS, CharTokenizer
    from hanlm.export.gguf_export import write_gguf

    tokenizer = CharTokenizer([*SPECIAL_TOKENS, *(chr(0x4E00 + i) for i in range(vocab - len(SPECIAL_TOKENS)))])
    weights = {k: v.float().cpu().numpy() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    files = {dtype: write_gguf(workdir / f"{dtype}.gguf", weights, cfg.model, tokenizer, dtype)
             for dtype in LLAMA_CPP_DTYPES}
    runs: dict[str, Callable] = {f"llama.cpp {dtype}": partial(_greedy_llama_cpp, llama_cpp.Llama(
        str(path), n_ctx=cfg.model.context_length, n_threads=threads, n_threads_batch=threads, verbose=False))
        for dtype, path in files.items()}
    served = LlamaCppLM(files["f32"], context_length=cfg.model.context_length, sequences=sequences_for(1),
                        threads=threads)
    engine, loop = Engine(served, tokenizer, max_batch=1), asyncio.new_event_loop()
    engine.start()
    runs[SERVE_ENGINE] = partial(_greedy_engine, engine, loop)
    try:
        yield runs
    finally:
        engine.stop()
        loop.close()
        runs.clear()  # llama.cpp maps its files: let them go before the directory does


def decode_suite(device: torch.device, quick: bool, vocab: int = 4700) -> list[dict]:
    """Greedy decode tokens/s at batch 1 and 8: hanlm's cache against transformers' `generate`
    (Llama of the same shape) and, at batch 1 on CPU, llama.cpp on GGUF files of the same weights
    (f32, f16, q8_0) and hanlm's serving engine on llama.cpp f32, the first shape of `shapes`. `same_tokens` counts how many of a peer's greedy
    tokens agree with hanlm's before the first difference."""
    shape = shapes(device.type, quick)[0]
    cfg = load_config(overrides=shape.overrides())
    torch.manual_seed(0)
    ours = build_model(cfg.model, vocab).to(device).eval()
    hf = _peers(ours, vocab)["transformers Llama"]().to(device).eval()
    # The same weights in every engine (hanlm's export mapping): then greedy tokens can be compared too.
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours.state_dict(), cfg.model), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # lm_head is tied
    new_tokens = 50 if quick else min(200, shape.context_length - 8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-gguf-") as workdir, \
            _llama_cpp_runs(ours, cfg, vocab, Path(workdir)) if device.type == "cpu" else contextlib.nullcontext({}) \
            as llama:
        for batch in (1, 8):
            prompt = torch.randint(4, vocab, (batch, 4), device=device)
            runs = {"hanlm GPT": partial(_greedy_hanlm, ours, prompt, new_tokens),
                    "transformers Llama generate": partial(_greedy_transformers, hf, prompt, new_tokens)}
            if batch == 1:
                runs |= {name: partial(run, prompt[0].tolist(), new_tokens) for name, run in llama.items()}
            outputs: dict[str, list[int]] = {}
            with torch.no_grad():
                timings = _taking_turns({name: lambda name=name, run=run: outputs.__setitem__(name, run())
                                         for name, run in runs.items()}, 1, 1 if quick else 5, device)
            for name, seconds in timings.items():
                same = next((i for i, (a, b) in enumerate(zip(outputs[name], outputs["hanlm GPT"])) if a != b),
                            new_tokens)
                # The engine ends a sequence at <eos>: its rate counts the tokens it gave.
                rows.append({"shape": shape.name, "batch": batch, "model": name, "new_tokens": new_tokens,
                             "tokens_per_s": batch * len(outputs[name]) / seconds, "same_tokens": same,
                             "hanlm_speedup": timings[name] / timings["hanlm GPT"]})
    return rows
