"""Speculative decoding measured: batch-1 greedy decode of a trained GPT, plain and with each draft,
beside transformers' `generate` of the same weights (plain, and with its own prompt lookup).

    python -m hanlm.bench.speculative [--checkpoint runs/default] [--tokens 200] [--out DIR]

The model is a trained checkpoint — by default the demo's `runs/default` once `make demo` has run,
else a `small` GPT trained here for a few hundred steps — because a draft is only as good as the
model's agreement with it, which random weights do not have. The n-gram draft is a 5-gram counted
on the same prepared data (seconds; a 3-gram with --quick, whose tiny model it only has to run with).
Every speculative run's tokens are compared with plain decoding's.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from hanlm.bench import suite_parser
from hanlm.checkpoint import load_checkpoint
from hanlm.config import load_config
from hanlm.loading import load_for_inference, resolve_served
from hanlm.generate import plain_tokens, prefilled, prompt_ids
from hanlm.sampling import SamplingParams
from hanlm.speculative import DraftLength, DraftStats, NGramDraft, PromptLookup, Speculation, speculative_tokens

PROMPTS = ["中国经济", "人民日报记者", "新华社北京１月１日电", "改革开放"]
DEMO = "runs/default"


def trained_model(quick: bool, workdir: Path) -> str:
    """The demo's checkpoint when it exists (and not quick), else a GPT trained here into `workdir`."""
    from hanlm.train.loop import Trainer

    if not quick and (Path(DEMO) / "checkpoints").is_dir():
        return DEMO
    steps = 3 if quick else 400
    cfg = load_config("tiny" if quick else None, [
        f"train.run_dir={workdir / 'gpt'}", f"train.max_steps={steps}", "log.tensorboard=false", "log.progress=false",
        "log.peak_tflops=0.1", *(["train.warmup_steps=1"] if quick else [])])
    return str(Trainer(cfg, echo=lambda _: None).run().run_dir)


def ngram_draft(checkpoint: str, workdir: Path, order: int = 5) -> NGramDraft:
    """An n-gram of `order` counted on the checkpoint's own prepared data (so over its tokenizer)."""
    from hanlm.mix import count_ngram

    cfg = load_checkpoint(resolve_served(checkpoint)).config
    model, _, _ = load_for_inference(count_ngram(cfg, order, workdir, echo=lambda _: None))
    return NGramDraft(model)


def _decode(model, tokenizer, prompt: str, tokens: int, speculation: Speculation | None,
            compile: bool = False) -> tuple[list[int], float]:
    """Exactly `tokens` greedy tokens after the prompt — past an `<eos>` too, as transformers does without an
    eos id — through generate's own token loops (plain or speculative, eager or compiled), without
    detokenizing."""
    ids = prompt_ids(tokenizer, prompt)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    started = time.perf_counter()
    logp, batch = prefilled(model, ids, compile=compile)
    if speculation is None:
        stream = plain_tokens(batch, logp, params, None)
    else:
        stream = speculative_tokens(batch, ids, logp, speculation.drafter,
                                    DraftLength(speculation.k, speculation.adaptive), params, None, tokens,
                                    speculation.stats, model.context_length)
    out = list(itertools.islice(stream, tokens))
    return out, time.perf_counter() - started


def _llama_cpp(llm, tokenizer, prompt: str, tokens: int) -> tuple[list[int], float]:
    """llama.cpp's own greedy loop (top-1 sampling) through llama-cpp-python, past `<eos>` like the others."""
    ids = prompt_ids(tokenizer, prompt)
    started = time.perf_counter()
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == tokens:
            break
    return out, time.perf_counter() - started


def _llama_cpp_runs(checkpoint: str, tokenizer, tokens: int, work: Path) -> dict:
    """llama.cpp runs of the checkpoint's GGUF export, f32 and q8_0 (none without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp rows skipped: llama-cpp-python is not installed (pip install -e '.[llamacpp]')", flush=True)
        return {}
    from hanlm.export.gguf_export import export_gguf

    threads = torch.get_num_threads()
    work.mkdir(parents=True, exist_ok=True)
    runs = {}
    for dtype in ("f32", "q8_0"):
        llm = llama_cpp.Llama(str(export_gguf(checkpoint, work / f"{dtype}.gguf", dtype)), n_ctx=0,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        runs[f"llama.cpp {dtype} (its own greedy loop)"] = lambda p, llm=llm: _llama_cpp(llm, tokenizer, p, tokens)
    return runs


def _transformers(model, tokenizer, prompt: str, tokens: int, lookup: int | None) -> tuple[list[int], float]:
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_id, **extra)
    return out[0, ids.size(1):].tolist(), time.perf_counter() - started


def speculative_suite(quick: bool, checkpoint: str | None = None, tokens: int | None = None,
                      workdir: Path | None = None) -> dict:
    """Rows per engine: tokens/s over the prompts (the median of rounds), acceptance, draft time, and how
    many prompts gave plain decoding's tokens exactly; plus which model was measured."""
    import tempfile

    from hanlm.export.hf import export_hf

    tokens = tokens or (40 if quick else 200)
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="hanlm-bench-spec-") as tmp:
        work = workdir or Path(tmp)
        checkpoint = checkpoint or trained_model(quick, work)
        model, cfg, tokenizer = load_for_inference(checkpoint)
        order = 3 if quick else 5
        drafts = {"prompt lookup": PromptLookup(), f"{order}-gram": ngram_draft(checkpoint, work / "ngram", order)}
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(export_hf(checkpoint, work / "hf"))).eval()
        # Greedy, and past <eos> like hanlm's loops: the export's generation_config samples and stops at <eos>.
        hf.generation_config.update(eos_token_id=None, do_sample=False, temperature=None, top_k=None, top_p=None)
        # llama.cpp maps its file: a mapping outlives the directory on Linux.
        llama = {} if quick else _llama_cpp_runs(checkpoint, tokenizer, tokens, work / "gguf")
    runs = {"hanlm GPT": lambda p: _decode(model, tokenizer, p, tokens, None)}
    stats = {}
    for name, drafter in drafts.items():
        for adaptive in (False, True):
            label = f"hanlm GPT + {name} draft, k = {'adaptive ≤ 4' if adaptive else 4}"
            stats[label] = Speculation(drafter, k=4, adaptive=adaptive)
            runs[label] = lambda p, s=stats[label]: _decode(model, tokenizer, p, tokens, s)
    if not quick:  # compiling takes longer than the quick suite's whole run (tests/test_decoding checks it)
        runs["hanlm GPT compiled"] = lambda p: _decode(model, tokenizer, p, tokens, None, True)
        for name in drafts:
            label = f"hanlm GPT compiled + {name} draft, k = adaptive ≤ 4"
            stats[label] = Speculation(drafts[name], k=4, adaptive=True)
            runs[label] = lambda p, s=stats[label]: _decode(model, tokenizer, p, tokens, s, True)
    runs["transformers Llama generate"] = lambda p: _transformers(hf, tokenizer, p, tokens, None)
    runs["transformers generate, prompt lookup 4"] = lambda p: _transformers(hf, tokenizer, p, tokens, 4)
    runs |= llama
    outputs: dict[str, dict[str, list[int]]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    compiling = time.perf_counter()
    with torch.no_grad():
        for name, run in runs.items():  # warm-up; the compiled runs compile here, outside the timing
            if "compiled" in name:
                run(PROMPTS[0])
        compile_s = time.perf_counter() - compiling
        _decode(model, tokenizer, PROMPTS[0], 8, None)
        for _ in range(rounds):
            for name, run in runs.items():
                if name in stats:  # the counts of the last round
                    stats[name].stats = DraftStats()
                total, produced = 0.0, 0
                for prompt in PROMPTS:
                    out, took = run(prompt)
                    outputs.setdefault(name, {})[prompt] = out
                    total += took
                    produced += len(out)
                seconds[name].append(total / max(produced, 1))
    rows = []
    base = statistics.median(seconds["hanlm GPT"])
    peer = statistics.median(seconds["transformers Llama generate"])
    for name in runs:
        per_token = statistics.median(seconds[name])
        same = sum(outputs[name][p] == outputs["hanlm GPT"][p] for p in PROMPTS)
        row = {"model": name, "tokens_per_s": 1 / per_token, "vs_plain": base / per_token,
               "vs_transformers": peer / per_token, "same_output": f"{same}/{len(PROMPTS)}"}
        if name in stats:
            s = stats[name].stats
            row |= {"acceptance_rate": s.acceptance_rate,
                    "tokens_per_forward": (s.accepted + s.steps) / max(s.steps, 1),
                    "draft_ms_per_token": 1000 * s.draft_s / max(sum(len(o) for o in outputs[name].values()), 1)}
        rows.append(row)
    return {"checkpoint": checkpoint, "new_tokens": tokens, "prompts": len(PROMPTS), "rows": rows,
            "compile_s": compile_s}


def markdown(result: dict) -> list[str]:
    """The table and the goal line."""
    lines = [f"Greedy, batch 1, {result['new_tokens']} new tokens × {result['prompts']} prompts, model "
             f"`{result['checkpoint']}`:", "",
             "| engine | tokens/s | vs plain hanlm | vs transformers | drafts kept | tokens per forward | "
             "draft ms/token | same output |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kept = f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else "–"
        per = f"{r['tokens_per_forward']:.2f}" if "tokens_per_forward" in r else "–"
        draft = f"{r['draft_ms_per_token']:.2f}" if "draft_ms_per_token" in r else "–"
        lines.append(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {r['vs_plain']:.2f}× | {r['vs_transformers']:.2f}× "
                     f"| {kept} | {per} | {draft} | {r['same_output']} |")
    best = max((r for r in result["rows"] if r["model"].startswith("hanlm")), key=lambda r: r["tokens_per_s"])
    verdict = "met" if best["vs_transformers"] >= 2.5 else "not met"
    lines += ["", f"- best: {best['model']}, {best['vs_transformers']:.2f}× transformers' generate "
                  f"(goal ≥ 2.5×: {verdict})",
              f"- compiling took {result['compile_s']:.1f} s (Inductor's on-disk cache warm or not), outside the timing"]
    rows = {r["model"]: r for r in result["rows"]}
    compiled = rows.get("hanlm GPT compiled")
    if compiled is None:
        return [*lines, "- compiled decoding and llama.cpp: not measured in the quick suite", ""]
    lines.append(f"- compiled plain decoding: {compiled['vs_plain']:.2f}× eager (goal ≥ 2×: "
                 f"{'met' if compiled['vs_plain'] >= 2 else 'not met'})")
    llama = rows.get("llama.cpp f32 (its own greedy loop)")
    lookup = rows["hanlm GPT compiled + prompt lookup draft, k = adaptive ≤ 4"]
    if llama:
        ratio = lookup["tokens_per_s"] / llama["tokens_per_s"]
        lines.append(f"- compiled + prompt lookup: {ratio:.2f}× llama.cpp f32's plain decoding (goal ≥ 1×: "
                     f"{'met' if ratio >= 1 else 'not met'})")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("speculative", __doc__)
    parser.add_argument("--checkpoint", help=f"trained GPT to decode (default: {DEMO} if present, else one trained "
                        "here)")
    parser.add_argument("--tokens", type=int, help="new tokens per prompt (default 200; 40 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 40 tokens, one round")
    args = parser.parse_args(argv)
    result = speculative_suite(args.quick, args.checkpoint, args.tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    report = "\n".join(markdown(result))
    (args.out / "table.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
