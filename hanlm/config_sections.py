"""The declaration of every config key: one dataclass per section (`data`, `tokenizer`, `model`, …), each
key with its type, default, allowed range and help text (`key`), and the `Config` that holds them.

That declaration is the single source for validation, `--set` coercion and the key table of
docs/guide/config.md; reading, checking and deriving values is `hanlm.config`, which re-exports
these names: import them from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hanlm.atomic import atomic_write_text
from hanlm.limits import (
    CONTEXT_MAX,
    MAX_TOKENS_LIMIT,
    NPROC_MAX,
    SEED_LIMIT,
    STEPS_MAX,
    TEMPERATURE_MAX,
    THREADS_MAX,
    TOKENS_MAX,
    TOP_K_LIMIT,
    WIDTH_MAX,
)


def key(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        above: float | None = None, below: float | None = None) -> Any:
    """Declare a config key: its default, help text and allowed range (inclusive `min`/`max`,
    exclusive `above`/`below`)."""
    meta = {"help": help, "min": min, "max": max, "above": above, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: list[str] = key(["people-daily-1998"],
                            "Training text: built-in corpus names, files, directories, globs or fsspec URLs.")
    val_source: list[str] = key([], "Validation text; when empty, `val_fraction` of the documents is held out.")
    val_fraction: float = key(0.02, "Share of documents held out for validation, chosen by a hash of each "
                              "document (deterministic).", min=0.0, max=0.5)
    tune_fraction: float = key(0.02, "Share of the training sources' documents held out as the `tune` split, by "
                               "the same hash, disjoint from val: never trained on, it is what hanlm mix fits the "
                               "mixture's weights on; 0: none.", min=0.0, max=0.5)
    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = key("auto", "File format; `auto` goes by the "
                                                                    "extension.")
    txt_documents: Literal["line", "paragraph"] = key("line", "In .txt files a document is one line, or a "
                                                      "paragraph ending at a blank line.")
    text_field: str = key("text", "Field (.jsonl) or column (.csv, .parquet) that holds the text.")
    nfkc: bool = key(False, "Unicode NFKC normalisation (full-width ASCII becomes half-width).")
    clean_whitespace: bool = key(True, "Strip documents and collapse runs of whitespace into one space.")
    t2s: bool = key(False, "Convert Traditional to Simplified Chinese with OpenCC (`pip install hanlm[opencc]`).")
    dedup: bool = key(False, "Drop exact duplicate documents, keeping the first.")
    min_chars: int = key(1, "Drop documents shorter than this many characters after normalisation.", min=0,
                         max=1_000_000)
    on_decode_error: Literal["error", "replace", "skip"] = key(
        "error", "Invalid UTF-8: stop with the file and byte offset, replace the bad bytes with U+FFFD, or "
        "skip the line that holds them; replace and skip report the damage.")
    prepared_dir: str | None = key(None, "Where `hanlm prepare` writes shards; default "
                                   "`$HANLM_HOME/prepared/<sources>-<tokenizer kind>-<hash of every setting that "
                                   "changes the shards>`.")
    num_workers: int = key(0, "Processes that encode documents; 0 means one per CPU core.", min=0, max=NPROC_MAX)
    shard_tokens: int = key(1 << 28, "Most tokens in one shard file: a bigger split is written as several files "
                            "listed in meta.json, which the loader memory-maps together.", min=1024, max=TOKENS_MAX)


@dataclass
class TokenizerConfig:
    kind: Literal["char", "bpe", "word", "pretrained"] = key(
        "char", "Characters, byte-level BPE, or jieba words with character fallback; `pretrained` is an imported "
        "model's own tokenizer (set by importing a Hugging Face directory; train on with tokenizer.path), never "
        "trained.")
    vocab_size: int = key(8000, "Target vocabulary for bpe, upper bound for word; char keeps every "
                          "character seen `min_freq` times.", min=8, max=1 << 24)
    min_freq: int = key(1, "Rarer characters (char, word) or words (word) map to `<unk>` or fall back to "
                        "characters.", min=1, max=1 << 40)
    split_digits: bool = key(True, "bpe: split numbers into single digits before merging.")
    path: str | None = key(None, "Load this tokenizer.json instead of training one.")
    segmenter: str = key("jieba", "word: what splits text into words: jieba, or a tagger checkpoint (run directory) "
                         "of `hanlm finetune --task tag`, saved with the vocabulary.")
    byte_fallback: bool = key(True, "char, word: a character outside the vocabulary becomes its UTF-8 bytes (256 "
                              "reserved ids), so any text is encoded and decoded back exactly; false: `<unk>`.")
    train_chars: int = key(20_000_000, "bpe, word: train on at most this many characters of the train split, a "
                           "deterministic sample spread over all of it (char counts every character); 0: all.",
                           min=0, max=TOKENS_MAX)
    bpe_dropout: float = key(0.0, "bpe: BPE-dropout (Provilkov et al. 2020), subword regularisation for multi-epoch "
                             "training: `hanlm prepare` also writes tokenizer.dropout_copies encodings of the train "
                             "split that skip this share of merges, each segmenting words differently, and epoch e "
                             "of training reads copy e mod dropout_copies; val, tune and the plain train split keep "
                             "the plain encoding. The copies come from an unseeded RNG, so two prepares differ (a "
                             "resumed run reads the stored copies and stays exact); 0: none.", min=0.0, below=1.0)
    dropout_copies: int = key(4, "bpe with tokenizer.bpe_dropout: how many differently segmented encodings of the "
                              "train split prepare writes (each as big as the train split).", min=1, max=64)


# Shapes of the model presets; explicit model.* keys override them.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "context_length": 128},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256, "context_length": 256},
    "base": {"n_layer": 12, "n_head": 12, "n_embd": 768, "context_length": 1024},
    "1b": {"n_layer": 22, "n_head": 32, "n_embd": 2048, "context_length": 2048},
}


@dataclass
class ModelConfig:
    arch: Literal["gpt", "lstm", "ngram", "mix", "encoder", "bert"] = key(
        "gpt", "Model family; `encoder` is a bidirectional transformer (pretrained with train.objective mlm or "
        "electra, then fine-tuned); `bert` is BERT's own shape (absolute positions, post-norm LayerNorm, GELU), what "
        "an imported Chinese BERT, RoBERTa-wwm-ext or MacBERT is; `mix` is what a mixture made by `hanlm mix` "
        "reports, never trained.")
    preset: Literal["tiny", "small", "base", "1b"] | None = key("small", "Shape preset: " + ", ".join(
        f"{n} ({p['n_layer']}L/{p['n_head']}H/{p['n_embd']}d/{p['context_length']}ctx)"
        for n, p in MODEL_PRESETS.items()) + ".")
    n_layer: int | None = key(None, "Layers; default from the preset.", min=1, max=4096)
    n_head: int | None = key(None, "Attention heads (gpt); default from the preset.", min=1, max=WIDTH_MAX)
    n_embd: int | None = key(None, "Embedding width; default from the preset.", min=1, max=WIDTH_MAX)
    n_kv_head: int | None = key(None, "Key/value heads (gpt, encoder): fewer than n_head share each among n_head / "
                                "n_kv_head query heads (grouped-query attention; 1: multi-query), which shrinks the "
                                "KV cache by that factor; null: one per query head.", min=1, max=WIDTH_MAX)
    rope_theta: float = key(10000.0, "Rotary position base (gpt, encoder): Llama 2's 10,000; Llama 3 and Qwen use "
                            "500,000 and 1,000,000 for long contexts.", above=0.0, max=1e12)
    rope_scaling: Literal["none", "linear", "llama3"] = key(
        "none", "Rotary frequencies rescaled for a longer context (gpt, encoder): `linear` divides them all by "
        "rope_factor; `llama3` (Llama 3.1 / 3.2) divides only the low ones, keeps the high ones and blends the band "
        "between (rope_low_freq_factor, rope_high_freq_factor, rope_original_context).")
    rope_factor: float = key(8.0, "How much model.rope_scaling stretches the context (Llama 3.1's 8).", min=1.0,
                             max=1e6)
    rope_low_freq_factor: float = key(1.0, "rope_scaling llama3: wavelengths above rope_original_context / this are "
                                      "divided by rope_factor.", above=0.0, max=1e6)
    rope_high_freq_factor: float = key(4.0, "rope_scaling llama3: wavelengths below rope_original_context / this are "
                                       "kept; it must exceed rope_low_freq_factor.", above=0.0, max=1e6)
    rope_original_context: int = key(8192, "rope_scaling llama3: the context the model was pretrained at before "
                                     "the scaling (Llama 3's 8,192).", min=1, max=CONTEXT_MAX)
    head_dim: int | None = key(None, "Width of each attention head (gpt, encoder); null: n_embd / n_head. Qwen3 "
                               "sets it apart from the embedding width.", min=2, max=WIDTH_MAX)
    intermediate_size: int | None = key(None, "Hidden width of the MLP: gpt and encoder's SwiGLU (null: "
                                        "64·ceil(8·n_embd/3/64), as many weights as a 4·n_embd GELU MLP), bert's "
                                        "GELU (null: 4·n_embd).", min=1, max=1 << 22)
    norm_eps: float = key(1e-5, "Epsilon of every RMSNorm (gpt, encoder: Llama's 1e-5; Qwen uses 1e-6) or "
                          "LayerNorm (bert, whose checkpoints use 1e-12).", above=0.0, max=1.0)
    type_vocab_size: int = key(2, "Token-type rows of a bert (segment A / B); hanlm feeds one text, type 0, and "
                               "keeps the rest for export.", min=1, max=1024)
    qkv_bias: bool = key(False, "Biases on the query, key and value projections (gpt, encoder), as Qwen2 has.")
    qk_norm: bool = key(False, "RMSNorm over each head's queries and keys before the rotation (gpt, encoder), as "
                        "Qwen3 has.")
    context_length: int | None = key(None, "Longest sequence the model accepts; default from the preset.", min=1,
                                     max=CONTEXT_MAX)
    dropout: float = key(0.0, "Dropout probability.", min=0.0, max=0.9)
    tie_embeddings: bool = key(True, "Share the input embedding and output projection.")
    order: int = key(5, "n-gram order (arch ngram).", min=1, max=6)
    discount_fallback: list[float] = key(
        [], "ngram: discounts D1 D2 D3+ for an order whose counts-of-counts give no valid modified Kneser-Ney "
        "discounts (tiny or artificial data), e.g. [0.5, 1, 1.5] as lmplz --discount_fallback; empty: an error.",
        min=0.0, max=3.0)
    prune: list[int] = key(
        [], "ngram: drop n-grams seen at most this many times, one threshold per order from unigrams (0: keep "
        "all; non-decreasing; the last repeats for higher orders), as lmplz --prune; empty keeps every n-gram.",
        min=0, max=TOKENS_MAX)
    vectors: str | None = key(None, "Pretrained word or character vectors (word2vec text or binary) for the "
                              "embedding.")
    task: Literal["lm", "classify", "tag", "ner"] = key(
        "lm", "What the model's output is: next-token probabilities (lm), a label for the whole text (classify), "
        "a tag per character (tag: segmentation), or named entities (ner); classify, tag and ner checkpoints are "
        "written by `hanlm finetune`, their labels or tags in finetune.labels.")


@dataclass
class TrainConfig:
    block_size: int = key(256, "Tokens per training sequence; at most model.context_length.", min=1, max=CONTEXT_MAX)
    micro_batch: int | Literal["auto"] = key(
        16, "Sequences per forward pass on one worker; `auto` picks the largest that fits memory.", min=1, max=1 << 20)
    micro_batch_max: int = key(512, "Upper bound of the `micro_batch: auto` search.", min=1, max=1 << 20)
    memory_fraction: float = key(0.8, "Share of free RAM (CPU) or device memory (CUDA) that `micro_batch: "
                                 "auto` may fill.", above=0.0, max=1.0)
    grad_accum: int = key(1, "Micro-batches accumulated per optimizer step.", min=1, max=1 << 20)
    lr: float = key(1e-3, "Peak learning rate for one worker; see lr_scaling.", above=0.0, max=10.0)
    lr_scaling: Literal["none", "linear", "sqrt"] = key(
        "none", "Scale lr with the number of workers: lr × W, lr × √W, or not at all.")
    warmup_steps: int | None = key(None, "Linear warm-up steps; default warmup_frac × max steps.", min=0, max=STEPS_MAX)
    warmup_frac: float = key(0.02, "Warm-up as a share of the run when warmup_steps is unset.", min=0.0, max=1.0)
    max_steps: int = key(2000, "Stop after this many optimizer steps.", min=1, max=STEPS_MAX)
    max_tokens: int | None = key(None, "Stop after this many training tokens (all workers), if sooner.", min=1,
                                 max=TOKENS_MAX)
    max_minutes: float | None = key(None, "Stop after this much wall time, if sooner.", above=0.0, max=525_600.0)
    schedule: Literal["cosine", "wsd"] = key(
        "cosine", "After warm-up: cosine decay to min_lr_ratio × lr, or warmup-stable-decay (constant, then a "
        "linear decay over the last decay_frac of the run).")
    min_lr_ratio: float = key(0.1, "Final learning rate as a share of the peak.", min=0.0, max=1.0)
    decay_frac: float = key(0.2, "wsd: share of the run spent decaying.", above=0.0, max=1.0)
    schedule_clock: Literal["steps", "minutes"] = key(
        "steps", "What the schedule's progress counts after warm-up: optimizer steps out of max_steps, or wall "
        "minutes out of max_minutes (whichever ends first), so that a run stopped by time still ends its decay. "
        "minutes makes the lr depend on the machine's speed: a resumed run is exact only with steps.")
    optimizer: Literal["adamw", "muon"] = key(
        "adamw", "adamw for every weight, or Muon (orthogonalised momentum) for the 2-D hidden matrices with "
        "AdamW on embeddings, head, norms and biases.")
    muon_lr: float = key(0.02, "muon: peak learning rate of the hidden matrices (train.lr is AdamW's); it follows "
                         "the same schedule and lr_scaling.", above=0.0, max=10.0)
    muon_momentum: float = key(0.95, "muon: momentum (Nesterov).", min=0.0, max=1.0)
    weight_decay: float = key(0.1, "Weight decay of the projection matrices, AdamW's or Muon's (never on norms, "
                              "biases or embeddings).", min=0.0, max=10.0)
    beta1: float = key(0.9, "AdamW beta1.", min=0.0, max=1.0)
    beta2: float = key(0.95, "AdamW beta2.", min=0.0, max=1.0)
    ema_decay: float = key(0.0, "Weight averaging: evaluate, save and serve an exponential moving average of the "
                           "weights, each step keeping min(ema_decay, (1 + step) / (10 + step)) of the old average "
                           "(about the last 1 / (1 − ema_decay) steps); the live weights stay in the training state "
                           "for resume. 0: off.", min=0.0, max=0.99999)
    distill_weight: float = key(0.0, "Distillation from an n-gram counted on the train split when the run starts: "
                                "each position's target is (1 − w) · its next token + w · the n-gram's next-token "
                                "distribution (its distill_top_k most likely tokens); the train loss logged is that "
                                "mixed objective. 0: off.", min=0.0, max=0.99)
    distill_order: int = key(3, "distill_weight: the teacher n-gram's order.", min=1, max=8)
    distill_top_k: int = key(32, "distill_weight: the teacher's most likely tokens per position that the target "
                             "keeps (renormalised).", min=1, max=4096)
    grad_clip: float = key(1.0, "Clip the gradient norm to this; 0 turns clipping off.", min=0.0, max=1e6)
    seed: int = key(1337, "Seed for initialisation, data order and sampling.", min=0, max=(1 << 32) - 1)
    device: Literal["auto", "cpu", "cuda"] = key("auto", "`auto` uses CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = key(
        "auto", "`auto`: bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16 or AMX, e.g. AMD "
        "Zen 4, Intel Sapphire Rapids: 2–4× the fp32 matmul speed), fp32 on other CPUs (bf16 is emulated there, "
        "~100× slower).")
    compile: bool = key(False, "Compile the model with torch.compile.")
    activation_checkpointing: bool = key(False, "Recompute activations in the backward pass to save memory.")
    threads: int = key(0, "CPU threads for torch; 0 keeps torch's default (one per core).", min=0, max=THREADS_MAX)
    init_from: str | None = key(None, "Start from this checkpoint's weights (continued training) with a fresh "
                                "optimizer and step count.")
    lora_rank: int = key(0, "LoRA for continued training from train.init_from: train a rank-r update beside each "
                         "frozen projection (finetune.lora_targets, scaled by finetune.lora_alpha / r) instead of "
                         "every weight; loading the checkpoint anywhere folds the updates in. 0: every weight trains.",
                         min=0, max=4096)
    run_dir: str = key("runs/default", "Run directory: resolved config, logs, checkpoints.")
    objective: Literal["lm", "mlm", "electra"] = key(
        "lm", "What the network learns: next tokens (lm: gpt, lstm), masked tokens (mlm: encoder, BERT's), or "
        "replaced-token detection with a small masked-LM generator (electra: encoder; Clark et al. 2020).")
    mask_rate: float = key(0.15, "mlm, electra: share of the (non-special) tokens, or words, chosen for masking; "
                           "each becomes the mask token (80%), a random token (10%) or stays (10%).", above=0.0,
                           max=0.9)
    mask_whole_words: str | None = key(None, "mlm, electra: mask whole words of this segmenter (jieba, or a tagger "
                                       "checkpoint) instead of single tokens; needs tokenizer.kind char.")
    electra_generator: float = key(0.25, "electra: the generator's width as a share of the discriminator's (same "
                                   "depth, shared token embeddings); at most 1.", above=0.0, max=1.0)
    rtd_weight: float = key(50.0, "electra: weight of the discriminator's replaced-token-detection loss beside the "
                            "generator's masked-LM loss (the paper's 50).", above=0.0, max=1000.0)


@dataclass
class DistConfig:
    world_size: int = key(1, "Number of workers; the launcher sets it.", min=1, max=1 << 20)
    backend: Literal["auto", "gloo", "nccl"] = key("auto", "`auto`: NCCL on CUDA, gloo on CPU.")
    sync: Literal["full", "diloco", "powersgd", "fp16", "bf16"] = key(
        "full", "How workers synchronise: all-reduce gradients every step (DDP), DiLoCo / local SGD every "
        "sync_every steps, or DDP with PowerSGD, fp16 or bf16 (NCCL only) gradient compression.")
    shard: Literal["none", "fsdp"] = key("none", "fsdp: shard parameters, gradients and optimizer state across "
                                         "workers with FSDP2 (fully_shard), for models that do not fit one device; "
                                         "checkpoints gather the weights and optimizer state to rank 0.")
    bucket_mb: float = key(25.0, "DDP gradient bucket size in MB; buckets overlap communication with backward.",
                           above=0.0, max=1 << 16)
    sync_every: int = key(32, "diloco: inner steps between synchronisations (H).", min=1, max=STEPS_MAX)
    sync_warmup_steps: int = key(0, "diloco: all-reduce gradients every step for this many steps first.", min=0,
                                 max=STEPS_MAX)
    outer_lr: float = key(0.7, "diloco: outer SGD learning rate (1.0 with outer_momentum 0 is plain parameter "
                          "averaging).", above=0.0, max=10.0)
    outer_momentum: float = key(0.9, "diloco: outer Nesterov momentum.", min=0.0, max=1.0)
    pseudo_grad_bits: Literal[32, 16, 8, 4] = key(
        32, "diloco: bits per pseudo-gradient value on the wire: 32 (fp32 all-reduce), 16 (fp16), or 8 / 4 (integers "
        "with one fp16 scale per dist.quant_block values). Below 32 the rounding error is carried into the next "
        "outer step (error feedback).")
    quant_block: int = key(64, "diloco: values per quantisation scale for pseudo_grad_bits 8 and 4.", min=2, max=65536)
    stream_fragments: int = key(1, "diloco: split the parameters into this many fragments synchronised on a "
                                "staggered schedule (Streaming DiLoCo): each every sync_every steps, offset by "
                                "sync_every / stream_fragments from the last; 1: all at once.", min=1, max=1 << 16)
    stream_delay: int = key(0, "diloco: inner steps a fragment's synchronisation overlaps with training before its "
                            "outer update is applied (tau); 0 waits for it. Below sync_every / stream_fragments.",
                            min=0, max=STEPS_MAX)
    stream_merge: Literal["replay", "mix"] = key(
        "replay", "diloco with stream_delay > 0, when a fragment's update arrives: `replay`: the worker's weights "
        "become the new global ones plus the inner steps it took since sending; `mix`: stream_mix × its own + (1 − "
        "stream_mix) × the global ones (the Streaming DiLoCo paper's rule).")
    stream_mix: float = key(0.5, "diloco with stream_merge mix: the share of the worker's own weights kept (0: take "
                            "the global weights).", min=0.0, max=1.0)
    link_mbps: float = key(0.0, "Simulated slow link for benchmarks: after each collective, a rank waits as long as "
                           "its bytes take at this many megabits per second, queued behind its earlier ones (on a "
                           "background thread for overlapped work); 0: no shaping.", min=0.0, max=1e9)
    link_latency_ms: float = key(0.0, "Simulated link: milliseconds added to every transfer on it.", min=0.0,
                                 max=3_600_000.0)
    powersgd_rank: int = key(1, "powersgd: rank of the low-rank approximation.", min=1, max=WIDTH_MAX)
    powersgd_start_step: int = key(10, "powersgd: plain all-reduce before this step.", min=1, max=STEPS_MAX)
    powersgd_error_feedback: bool = key(True, "powersgd: carry the compression error into the next step.")


@dataclass
class CheckpointConfig:
    dir: str | None = key(None, "Checkpoint directory or fsspec URL; default `<run_dir>/checkpoints`.")
    every_steps: int = key(500, "Save every this many steps (and at the end).", min=1, max=STEPS_MAX)
    keep_last: int = key(3, "Keep this many recent checkpoints.", min=1, max=1 << 20)
    keep_best: bool = key(True, "Also keep the checkpoint with the lowest val loss.")
    resume: str = key("none", "`none`, `auto` (latest good checkpoint) or a checkpoint path.")


@dataclass
class EvalConfig:
    every_steps: int = key(250, "Evaluate on the val split every this many steps (and at the end).", min=1,
                           max=STEPS_MAX)
    max_batches: int | None = key(20, "Cap on val (and tune) batches per periodic evaluation; null for the whole "
                                  "split. The final evaluation has its own cap, eval.final_max_batches.", min=1,
                                  max=STEPS_MAX)
    final_max_batches: int | None = key(None, "Cap on val (and tune) batches for the final evaluation of a run, the "
                                        "one its report and result give; null: the whole split. Only for quick "
                                        "runs that are not measurements (the tiny config of the tests).", min=1,
                                        max=STEPS_MAX)
    batch_size: int = key(16, "Sequences per evaluation batch.", min=1, max=1 << 20)
    stride: int | None = key(None, "Sliding-window evaluation: windows of train.block_size tokens move by this many, "
                             "each scoring its last `stride` tokens, so every token is scored once with at least "
                             "block_size − stride tokens of context; null: windows side by side (stride = "
                             "block_size), each token seeing only what precedes it in its window.", min=1,
                             max=CONTEXT_MAX)


@dataclass
class GenerateConfig:
    prompts: list[str] = key(["今天", "中国经济", "人民日报记者"], "Prompts whose continuations end a training run.")
    max_tokens: int = key(60, "Tokens to generate.", min=1, max=MAX_TOKENS_LIMIT)
    temperature: float = key(0.8, "Sampling temperature; 0 is greedy.", min=0.0, max=TEMPERATURE_MAX)
    top_k: int = key(50, "Sample from the k most likely tokens; 0 (or -1, as vLLM) turns it off.", min=-1,
                     max=TOP_K_LIMIT)
    top_p: float = key(0.95, "Sample from the smallest set of tokens whose probability reaches p.", above=0.0,
                       max=1.0)
    seed: int | None = key(1, "Sampling seed; null for a different sample each time.", min=0, max=SEED_LIMIT - 1)
    speculative: Literal["none", "ngram", "prompt"] = key(
        "none", "Speculative decoding: a draft proposes tokens the model checks several per forward (same greedy "
        "output, same sampling distribution). `ngram`: the greedy continuation of generate.draft_model; `prompt`: "
        "what followed the last tokens earlier in the prompt or output.")
    draft_model: str | None = key(None, "For speculative=ngram: an n-gram checkpoint or ARPA file over the model's "
                                  "tokenizer.")
    draft_tokens: int = key(4, "Most tokens drafted per forward.", min=1, max=64)
    draft_adaptive: bool = key(True, "Adapt the draft length: one more after a step that kept every draft, half "
                               "after one that kept none.")
    compile: Literal["auto", "on", "off"] = key(
        "auto", "Compile the decoding step with torch.compile (Inductor; CUDA graphs on a GPU) over a preallocated "
        "KV cache, for hanlm generate, its speculation and the server: the same greedy tokens; the first steps "
        "compile (seconds to a minute, reported; Inductor caches the result on disk). auto: on for a GPU, off on a "
        "CPU. GPT checkpoints only; other models ignore it.")


@dataclass
class ServeConfig:
    host: str = key("127.0.0.1", "Address to bind; loopback by default.")
    port: int = key(8000, "TCP port.", min=1, max=65535)
    max_batch: int = key(16, "Sequences decoded together.", min=1, max=4096)
    max_queue: int = key(256, "Waiting requests before new ones get 429.", min=1, max=1 << 20)
    max_body_bytes: int = key(1 << 20, "Largest request body; bigger ones get 413.", min=1, max=1 << 30)
    max_json_depth: int = key(32, "Deepest nesting of arrays and objects a JSON body may have; deeper ones get 400 "
                              "before they are parsed.", min=2, max=500)
    body_timeout_s: float = key(30.0, "Seconds a client may take to send its whole body (e.g. one shorter than its "
                                "Content-Length); then 408.", above=0.0, max=3600.0)
    metrics_public: bool = key(False, "Serve /metrics without the API key (e.g. for a Prometheus scraper that sends "
                               "none); every other endpoint but /health always needs it.")
    max_task_queue: int = key(8, "/v1/classify, /v1/segment and /v1/ner: requests waiting behind the running batch "
                              "before new ones get 429 (they run on one worker thread).", min=0, max=1 << 16)
    task_batch_texts: int = key(256, "Dynamic batching on that worker: the texts of requests waiting together run "
                                "through the model as one batch, joined up to this many texts (a bigger request "
                                "runs alone); 1: each request alone.", min=1, max=1 << 16)
    task_threads: int | None = key(None, "Torch threads of that worker; null: 1 for hmm and crf taggers (their "
                                   "decode gains nothing from more), torch's default for networks.", min=1,
                                   max=THREADS_MAX)
    prefill_chunk: int = key(256, "Most prompt tokens prefilled between two decoding steps: a long prompt is "
                             "prefilled a chunk at a time while the running sequences go on; 0: whole prompts at "
                             "once.", min=0, max=1 << 20)
    prefix_cache_tokens: int = key(4096, "Prompt tokens whose prefilled state is kept, most recently used first, so "
                                   "that a prompt sharing a cached prompt's beginning (a system prompt) prefills only "
                                   "the rest; 0: no prefix cache.", min=0, max=1 << 24)
    header_timeout_s: float = key(10.0, "Seconds a client may take to send a request head (line and headers); then "
                                  "408 and the connection closes.", above=0.0, max=3600.0)
    engine: Literal["torch", "llama.cpp"] = key(
        "torch", "What computes a gpt language model's tokens: torch, or llama.cpp (the extra hanlm[llamacpp]) on "
        "the checkpoint's GGUF, written once per checkpoint content under $HANLM_HOME/gguf. Sampling, streaming, "
        "auth and metrics stay hanlm's either way; other models, classifiers and taggers need torch.")
    gguf_dtype: Literal["f32", "f16", "q8_0"] = key(
        "f32", "The GGUF's matrices with engine llama.cpp: f32 computes what torch does; f16 and q8_0 stream half "
        "and a quarter of the bytes per token (faster; tokens may differ).")


@dataclass
class FinetuneConfig:
    init_from: str | None = key(None, "The pretrained checkpoint (gpt, lstm, encoder, bert; a run directory or a Hugging "
                                "Face directory) to start from; its "
                                "model.*, tokenizer and data.* normalisation are used. `hanlm finetune CKPT` sets it.")
    lora_rank: int = key(0, "LoRA: train a rank-r update B·A beside each frozen projection of the backbone "
                         "(finetune.lora_targets) and the task head, instead of every weight; 0: full fine-tuning.",
                         min=0, max=4096)
    lora_alpha: float = key(16.0, "LoRA: the update is scaled by lora_alpha / lora_rank.", above=0.0, max=1e6)
    lora_targets: list[str] = key(["qkv", "proj", "gate", "up", "down"], "LoRA: the backbone's projections that "
                                  "get an update, by module name (qkv, proj: attention; gate, up, down: the MLP).")
    from_scratch: bool = key(False, "Keep the checkpoint's shape and tokenizer but start from random weights: the "
                             "baseline that measures what pretraining is worth.")
    task: Literal["classify", "tag", "ner"] = key(
        "classify", "What to fine-tune for: a label per text (classify), word segmentation / POS tagging as a tag "
        "per character (tag), or named entities (ner: person, location, organisation; neural or crf).")
    data: list[str] = key([], "Labelled text: built-in corpus names, files, directories, globs or fsspec URLs "
                          "(read with the checkpoint's data.* settings): .jsonl/.csv/.parquet for classify, tagged "
                          "text (finetune.tag_format) for tag. Empty: the built-in chn-reviews (classify) or "
                          "people-daily-1998-tagged (tag).")
    text_field: str = key("text", "Field (.jsonl) or column (.csv, .parquet) that holds the text.")
    label_field: str = key("label", "Field or column that holds the label (a string or an integer).")
    labels: list[str] = key([], "The labels, in the order of the head's outputs; empty: every label found in "
                            "the train split, sorted. Saved with the checkpoint.")
    dev_fraction: float = key(0.1, "Share of distinct texts for the dev split (epoch and checkpoint selection).",
                              above=0.0, max=0.5)
    test_fraction: float = key(0.1, "Share of distinct texts for the test split, reported once at the end.",
                               above=0.0, max=0.5)
    tagger: Literal["neural", "hmm", "crf"] = key(
        "neural", "tag: the model. neural: a head on the pretrained network (hanlm finetune CKPT); hmm: a "
        "first-order hidden Markov model; crf: a linear-chain CRF on character n-grams (python-crfsuite). hmm "
        "and crf need no checkpoint.")
    tag_scheme: Literal["bmes", "bmes-pos"] = key(
        "bmes", "tag: character tags. bmes segments; bmes-pos segments and POS-tags in one pass (B-n, E-v, ...; "
        "needs tagged data; not with crf).")
    ner_scheme: Literal["bio", "bioes"] = key("bioes", "ner: the character tags entities are learned as: B/I/O, "
                                              "or with E (end) and S (single) too.")
    ner_format: Literal["auto", "jsonl", "conll"] = key(
        "auto", "ner: the files' format: jsonl (text + entities with start / end / type) or conll (a character and "
        "its BIO/BIOES tag per line); auto: by the file name. Empty finetune.data: people-daily-1998-ner.")
    tag_format: Literal["auto", "words", "slash", "conll"] = key(
        "auto", "tag: the files' format: words (space-separated), slash (word/TAG), conll (a token per line); "
        "auto: conll for .conll/.conllu/.tsv, else slash when the first line is word/TAG tokens, else words.")
    tag_crf: bool = key(False, "neural tagger: a CRF output layer — learned start / transition / end scores, the "
                        "gold path's likelihood as the loss (forward algorithm), Viterbi under them — instead of "
                        "per-character cross-entropy decoded under the tag grammar alone.")
    tag_bigrams: bool = key(False, "neural tagger: embed each character's two bigrams (with its left and right "
                            "neighbours, hashed into 131,071 rows of 64, projected to the network's width) beside "
                            "the character: the CRF's strongest boundary evidence.")
    tag_head: Literal["bilstm", "lookahead", "causal"] = key(
        "bilstm", "neural tagger: how a character sees the text to its right, which a causal model does not: a "
        "BiLSTM over the network's states (bilstm), the state finetune.tag_lookahead characters ahead joined "
        "to its own (lookahead), or nothing (causal).")
    tag_lookahead: int = key(2, "lookahead head: characters to the right whose state is joined.", min=1, max=64)
    hmm_smoothing: float = key(0.1, "hmm: add-δ smoothing of the counts.", above=0.0, max=1e6)
    crf_c1: float = key(0.1, "crf: L1 regularisation (OWL-QN): it zeroes most feature weights, so the model is "
                        "small.", min=0.0, max=1e6)
    crf_c2: float = key(0.1, "crf: L2 regularisation.", min=0.0, max=1e6)
    crf_iterations: int = key(120, "crf: L-BFGS iterations at most.", min=1, max=1_000_000)
    pooling: Literal["last", "mean", "first"] = key(
        "last", "The text's vector: the last token's hidden state (a decoder's has seen the whole text), the "
        "mean over its tokens, or the first token's (the <eos> that opens every text: an encoder's [CLS]).")
    max_length: int = key(128, "Tokens kept per text (the first ones); at most the model's context_length.", min=2,
                          max=CONTEXT_MAX)
    epochs: float = key(2.0, "Passes over the train split.", above=0.0, max=10_000.0)
    lr: float = key(3e-4, "Peak learning rate (linear warm-up, cosine decay to train.min_lr_ratio × lr).",
                    above=0.0, max=10.0)
    warmup_frac: float = key(0.06, "Warm-up as a share of the run.", min=0.0, max=1.0)
    weight_decay: float = key(0.01, "AdamW weight decay of the projection matrices and the head.", min=0.0, max=10.0)
    dropout: float = key(0.1, "Dropout in the backbone and before the head.", min=0.0, max=0.9)
    micro_batch: int | Literal["auto"] = key(32, "Texts per forward pass on one worker; `auto` picks the "
                                             "largest that fits memory (train.memory_fraction).", min=1, max=1 << 20)
    eval_every_steps: int = key(100, "Evaluate on the dev split (and checkpoint) every this many steps, and at "
                                "the end.", min=1, max=STEPS_MAX)
    run_dir: str = key("runs/finetune", "Run directory: resolved config, logs, checkpoints, report.")


@dataclass
class LogConfig:
    every_steps: int = key(10, "Console and metrics.jsonl line every this many steps.", min=1, max=STEPS_MAX)
    progress: bool = key(True, "Show progress bars.")
    tensorboard: bool = key(True, "Write TensorBoard event files.")
    peak_tflops: float | None = key(None, "Peak TFLOP/s for MFU; default measured at start (dense matmul in the "
                                    "training precision).", above=0.0, max=1e6)


@dataclass
class Derived:
    """Values computed from the keys above by `derive()`; never set directly."""

    world_size: int
    micro_batch: int | None  # None while train.micro_batch is `auto` and not yet measured
    global_batch: int | None  # sequences per optimizer step, all workers
    tokens_per_step: int | None
    lr_scale: float
    lr: float
    max_steps: int  # train.max_steps, lowered when max_tokens is reached sooner
    warmup_steps: int


SECTIONS: dict[str, type] = {
    "data": DataConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "train": TrainConfig,
    "dist": DistConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig, "generate": GenerateConfig,
    "serve": ServeConfig, "finetune": FinetuneConfig, "log": LogConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    log: LogConfig = field(default_factory=LogConfig)
    derived: Derived | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (with `derived`) atomically; `load_config(path)` reads it back."""
        atomic_write_text(path, "# hanlm resolved config: derived values are recomputed on load.\n"
                          + self.to_yaml())
