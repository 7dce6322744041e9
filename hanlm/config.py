"""Hyperparameter configuration manager.

One `Config` object is built once (defaults <- YAML file <- `--set` overrides), checked, and
passed down; each module reads its own section. Every key is declared with its type,
default, range and help text (`hanlm.config_sections`, whose names this module re-exports): that
declaration is the single source for validation, `--set` coercion and the key table of
docs/guide/config.md (`hanlm config keys`).

Values that follow from others (global batch, tokens per step, scaled learning rate,
warmup steps) are computed in one place, `derive()`, and saved with the run as `derived`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from hanlm.config_sections import (  # re-exported: the one typed config is hanlm.config
    CheckpointConfig,
    Config,
    DataConfig,
    Derived,
    DistConfig,
    EvalConfig,
    FinetuneConfig,
    GenerateConfig,
    LogConfig,
    MODEL_PRESETS,
    ModelConfig,
    SECTIONS,
    ServeConfig,
    TokenizerConfig,
    TrainConfig,
)
from hanlm.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
NETWORKS = ("gpt", "lstm", "encoder", "bert")  # the archs with weights (and hidden states for task heads)

__all__ = [
    "CONFIG_DIR",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "Derived",
    "DistConfig",
    "EvalConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "LogConfig",
    "MODEL_PRESETS",
    "NETWORKS",
    "ModelConfig",
    "SECTIONS",
    "ServeConfig",
    "TokenizerConfig",
    "TrainConfig",
    "all_keys",
    "check",
    "config_options",
    "derive",
    "find_config_file",
    "keys_markdown",
    "load_config",
    "set_key",
    "with_micro_batch",
]


# ---------------------------------------------------------------------------------------------
# Types: description and coercion, driven by the annotations above.

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        item = _describe(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {item}s (or one {item})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a --set string) to the declared type, or raise ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise ValueError
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise ValueError
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            # --set model.prune=0,0,1 (or "[0, 0, 1]", or "0 0 1"); a string list takes the string whole.
            value = [value] if item is str else [v for v in re.split(r"[\s,]+", value.strip(" []")) if v]
        if not isinstance(value, list) or (item is str and not all(isinstance(v, str) for v in value)):
            raise ValueError
        return [_coerce(v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ValueError
    if isinstance(value, bool):  # YAML `yes`/`true` is never a number or a string here
        raise ValueError
    if tp is int:
        if isinstance(value, int):
            return value
        number = float(value)  # accepts "1e6" and 1e6, which YAML 1.1 leaves as text
        if not number.is_integer():
            raise ValueError
        return int(number)
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        return float(str(value))
    if tp is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError
    raise TypeError(f"unsupported config type {tp!r}")


def _check_range(name: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """The one rule for numbers: finite, and within the key's declared bounds (each item of a list too)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(f"{name}[{i}]", item, meta)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    lo, hi, above, below = meta.get("min"), meta.get("max"), meta.get("above"), meta.get("below")
    if lo is not None and value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")
    if above is not None and value <= above:
        raise ConfigError(f"{name} must be > {above}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value}")
    if below is not None and value >= below:
        raise ConfigError(f"{name} must be < {below}, got {value}")


def _number(value: float) -> str:
    """A bound as the key table shows it: 1,099,511,627,776 rather than 1099511627776."""
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def describe_range(meta: typing.Mapping[str, Any]) -> str:
    """A key's allowed range for the key table: `≥ 0, ≤ 10`, `> 0`, `≥ 0, < 1`, or empty when it has none."""
    parts = [f"≥ {_number(meta['min'])}" if meta.get("min") is not None else "",
             f"> {_number(meta['above'])}" if meta.get("above") is not None else "",
             f"≤ {_number(meta['max'])}" if meta.get("max") is not None else "",
             f"< {_number(meta['below'])}" if meta.get("below") is not None else ""]
    return ", ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Building a Config

def all_keys() -> list[str]:
    """Every settable dotted key, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key_error(name: str, where: str) -> ConfigError:
    known = all_keys()
    leaf = name.rsplit(".", 1)[-1]
    # The same key in another section is the likeliest slip, then a typo.
    guesses = [k for k in known if k.endswith("." + leaf)]
    guesses += difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {guesses[0]!r}?" if guesses else "; `hanlm config keys` lists every key."
    return ConfigError(f"{where}: unknown key {name!r}{hint}")


def set_key(cfg: Config, name: str, value: Any, where: str) -> None:
    """Set dotted key `name` to `value`, coerced to its declared type and range-checked.

    `where` names the origin (a file or a --set argument) for error messages.
    """
    if name.startswith("derived."):
        raise ConfigError(f"{where}: {name} is computed by hanlm; set the keys it comes from instead "
                          "(train.micro_batch, train.grad_accum, dist.world_size, train.lr, train.lr_scaling, "
                          "train.warmup_steps, train.max_steps, train.max_tokens)")
    if name == "dist.pseudo_grad_fp16":  # replaced by dist.pseudo_grad_bits; saved configs still hold it
        try:
            fp16 = _coerce(value, bool)
        except ValueError:
            raise ConfigError(f"{where}: {name} must be true or false, got {value!r}") from None
        if fp16:
            set_key(cfg, "dist.pseudo_grad_bits", 16, where)
        return
    section, _, leaf = name.partition(".")
    if section not in SECTIONS:
        raise _unknown_key_error(name, where)
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if leaf not in fields:
        raise _unknown_key_error(name, where)
    tp = _hints(cls)[leaf]
    try:
        coerced = _coerce(value, tp)
    except ValueError:
        raise ConfigError(f"{where}: {name} must be {_describe(tp)}, got {value!r}") from None
    _check_range(f"{where}: {name}", coerced, fields[leaf].metadata)
    setattr(getattr(cfg, section), leaf, coerced)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        named = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config file {str(path)!r} not found (built-in configs: {', '.join(named)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # a document nested thousands of levels deep
        raise ConfigError(f"{path}: nested too deeply to be a hanlm config (sections hold keys, two levels)") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train:, ...) at the top")
    return raw


def find_config_file(spec: str | Path) -> Path:
    """A path as given, or the name of a built-in config (`tiny`, `default`, `base`)."""
    path = Path(spec)
    if not path.exists() and path.suffix == "" and (CONFIG_DIR / f"{spec}.yaml").exists():
        return CONFIG_DIR / f"{spec}.yaml"
    return path


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
                world_size: int | None = None) -> Config:
    """Build the resolved config: key defaults, then the YAML file (the built-in `default`, the
    demo, when none is given), then `--set key=value` overrides.

    `world_size`, when given (by a launcher), overrides dist.world_size. Raises ConfigError
    naming the file or override and the key for anything unknown, mistyped, out of range or
    inconsistent.
    """
    cfg = Config()
    file = find_config_file(path if path is not None else "default")
    for section, values in _read_yaml(file).items():
        if section == "derived":  # a saved resolved config: recomputed below
            continue
        if not isinstance(values, dict):
            if section in SECTIONS:
                raise ConfigError(f"{file}: section {section!r} must be a mapping of keys, got {values!r}")
            raise _unknown_key_error(str(section), str(file))
        for leaf, value in values.items():
            set_key(cfg, f"{section}.{leaf}", value, str(file))
    for override in overrides:
        name, eq, text = override.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except (yaml.YAMLError, RecursionError):
            value = text
        set_key(cfg, name.strip(), value, f"--set {override}")
    if world_size is not None:
        set_key(cfg, "dist.world_size", world_size, "launcher")
    _apply_preset(cfg.model)
    _check_paths(cfg)
    check(cfg)
    cfg.derived = derive(cfg)
    return cfg


def _apply_preset(model: ModelConfig) -> None:
    if model.preset is None:
        return
    for name, value in MODEL_PRESETS[model.preset].items():
        if getattr(model, name) is None:
            setattr(model, name, value)


def _check_paths(cfg: Config) -> None:
    """Directories a run writes into are named: an empty one would scatter its files in the current directory."""
    for name, value in (("train.run_dir", cfg.train.run_dir), ("finetune.run_dir", cfg.finetune.run_dir),
                        ("checkpoint.dir", cfg.checkpoint.dir), ("data.prepared_dir", cfg.data.prepared_dir)):
        if value is not None and not value.strip():
            raise ConfigError(f"{name} is empty: name a directory (null, where allowed, means the default)")


def check(cfg: Config) -> None:
    """Checks that involve more than one key."""
    m, t = cfg.model, cfg.train
    if cfg.tokenizer.bpe_dropout and cfg.tokenizer.kind != "bpe":
        raise ConfigError(f"tokenizer.bpe_dropout ({cfg.tokenizer.bpe_dropout}) skips BPE merges: it applies to "
                          f"tokenizer.kind bpe, not {cfg.tokenizer.kind}")
    if m.arch in NETWORKS:
        missing = [k for k in ("n_layer", "n_embd", "context_length") + (("n_head",) if m.arch != "lstm" else ())
                   if getattr(m, k) is None]
        if missing:
            raise ConfigError(f"model.{missing[0]} is not set and model.preset is null: set a preset "
                              f"({', '.join(MODEL_PRESETS)}) or model.{missing[0]}")
    if m.arch in ("gpt", "encoder"):
        if m.head_dim is None and m.n_embd % m.n_head:
            raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
                              f"e.g. n_head={_divisor_near(m.n_embd, m.n_head)} (or set model.head_dim)")
        if m.n_kv_head is not None and m.n_head % m.n_kv_head:
            raise ConfigError(f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}): each key/value "
                              "head serves the same number of query heads")
        if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor ({m.rope_high_freq_factor}) must exceed "
                              f"model.rope_low_freq_factor ({m.rope_low_freq_factor}): the band between them is "
                              "blended")
        head_dim = m.head_dim or m.n_embd // m.n_head
        if head_dim % 2:
            raise ConfigError(f"the head width ({'model.head_dim' if m.head_dim else 'model.n_embd / model.n_head'} = "
                              f"{head_dim}) must be even for rotary position embeddings")
    if m.arch == "bert" and m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}) in a bert; "
                          f"e.g. n_head={_divisor_near(m.n_embd, m.n_head)}")
    if m.arch in ("gpt", "encoder", "bert") and t.block_size > m.context_length:
        raise ConfigError(f"train.block_size ({t.block_size}) is above model.context_length "
                          f"({m.context_length}); lower train.block_size or raise model.context_length")
    if m.arch == "ngram":
        _check_ngram(cfg)
    neural_task = m.task == "classify" or (m.task in ("tag", "ner") and cfg.finetune.tagger == "neural")
    if neural_task and m.arch not in NETWORKS:
        raise ConfigError(f"model.task {m.task} needs a neural network (model.arch {', '.join(NETWORKS)}), not "
                          f"{m.arch}")
    _check_objective(cfg)
    # Refused only where a network would train with it: an n-gram counted from a distilled run's config, or a
    # classifier fine-tuned from its checkpoint, inherit the key and do not use it.
    if t.distill_weight > 0 and m.task == "lm" and (m.arch in ("encoder", "bert") or (
            m.arch in ("gpt", "lstm") and cfg.tokenizer.kind == "pretrained")):
        raise ConfigError("train.distill_weight distils an n-gram into a gpt or lstm language model over a char, bpe "
                          f"or word tokenizer (here model.arch {m.arch}, tokenizer.kind {cfg.tokenizer.kind}); set it "
                          "to 0")
    if t.ema_decay > 0 and cfg.dist.shard == "fsdp":
        raise ConfigError("train.ema_decay averages whole weights on each worker; with dist.shard fsdp each holds a "
                          "shard: use dist.shard none (DDP) or train.ema_decay 0")
    if cfg.finetune.dev_fraction + cfg.finetune.test_fraction >= 1:
        raise ConfigError(f"finetune.dev_fraction ({cfg.finetune.dev_fraction}) + finetune.test_fraction "
                          f"({cfg.finetune.test_fraction}) leave no train split; keep their sum below 1")
    if cfg.finetune.task == "ner" and cfg.finetune.tagger == "hmm":
        raise ConfigError("finetune.task ner trains finetune.tagger neural (on a checkpoint) or crf, not hmm")
    ft = cfg.finetune
    if ft.lora_rank or t.lora_rank:
        unknown = sorted(set(ft.lora_targets) - {"qkv", "proj", "gate", "up", "down"})
        if unknown or not ft.lora_targets:
            raise ConfigError(f"finetune.lora_targets {ft.lora_targets}: name some of qkv, proj, gate, up, down "
                              "(the transformer's projections)")
        if ft.lora_rank and ft.from_scratch:
            raise ConfigError("finetune.lora_rank adapts pretrained weights; finetune.from_scratch has none to adapt")
    if t.lora_rank:
        _check_train_lora(cfg)
    if cfg.finetune.tagger == "crf" and cfg.finetune.tag_scheme == "bmes-pos":
        raise ConfigError("finetune.tagger crf supports tag_scheme bmes only: with ~170 joint BMES-POS tags "
                          "its training is quadratic in them; use hmm or neural for bmes-pos")
    if len(set(cfg.finetune.labels)) != len(cfg.finetune.labels):
        raise ConfigError(f"finetune.labels names a label twice: {cfg.finetune.labels}")
    if m.arch == "mix":
        raise ConfigError("model.arch mix is not trained: `hanlm mix NEURAL NGRAM --out DIR` combines a trained "
                          "neural checkpoint and a trained n-gram checkpoint")
    if cfg.eval.stride is not None and cfg.eval.stride > t.block_size:
        raise ConfigError(f"eval.stride ({cfg.eval.stride}) is above train.block_size ({t.block_size}), so windows "
                          "would skip tokens; use a stride of at most the block size")
    if t.warmup_steps is not None and t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps ({t.warmup_steps}) is above train.max_steps ({t.max_steps})")
    if isinstance(t.micro_batch, int) and t.micro_batch > t.micro_batch_max:
        raise ConfigError(f"train.micro_batch ({t.micro_batch}) is above train.micro_batch_max "
                          f"({t.micro_batch_max}); raise the bound or lower the batch")
    if cfg.data.val_fraction == 0 and not cfg.data.val_source:
        raise ConfigError("data.val_fraction is 0 and data.val_source is empty, so there is no validation "
                          "data; set one of them")
    if cfg.dist.backend == "nccl" and t.device == "cpu":
        raise ConfigError("dist.backend nccl needs CUDA but train.device is cpu; use dist.backend=gloo")
    if cfg.dist.shard == "fsdp" and cfg.dist.sync != "full":
        raise ConfigError(f"dist.shard fsdp synchronises gradients itself (reduce-scatter every step); it cannot "
                          f"combine with dist.sync={cfg.dist.sync}: use dist.sync=full")
    if cfg.dist.shard == "fsdp" and t.optimizer == "muon":
        raise ConfigError("train.optimizer muon orthogonalises each whole weight matrix, and dist.shard fsdp gives "
                          "every worker only a shard of it; use train.optimizer=adamw with FSDP, or DDP "
                          "(dist.shard=none) with Muon")
    if t.schedule_clock == "minutes" and t.max_minutes is None:
        raise ConfigError("train.schedule_clock minutes measures the schedule against train.max_minutes, which is "
                          "not set; set train.max_minutes or use train.schedule_clock=steps")
    _check_diloco(cfg.dist)
    if cfg.dist.sync == "bf16" and (cfg.dist.backend == "gloo" or t.device == "cpu"):
        raise ConfigError("dist.sync bf16 compresses through NCCL, which needs CUDA; gloo cannot all-reduce "
                          "bf16. Use dist.sync=fp16 on CPU")


def _check_objective(cfg: Config) -> None:
    """train.objective fits model.arch: next tokens for decoders, masked ones for the encoder."""
    arch, objective = cfg.model.arch, cfg.train.objective
    if arch in ("encoder", "bert") and objective == "lm" and cfg.model.task == "lm":
        raise ConfigError(f"model.arch {arch} reads both sides, so it cannot learn next tokens: set "
                          "train.objective=mlm" + (" or train.objective=electra" if arch == "encoder" else ""))
    if arch == "bert" and objective == "electra":
        raise ConfigError("train.objective electra pretrains hanlm's own encoder (model.arch encoder); a bert "
                          "continues with train.objective mlm")
    if arch not in ("encoder", "bert") and objective != "lm":
        raise ConfigError(f"train.objective {objective} pretrains an encoder (model.arch encoder); model.arch "
                          f"{arch} learns next tokens (train.objective lm)")
    if cfg.train.mask_whole_words is not None and objective == "lm":
        raise ConfigError("train.mask_whole_words applies to train.objective mlm or electra")


def _check_train_lora(cfg: Config) -> None:
    """train.lora_rank: continued training of pretrained weights, by a plain optimizer over the whole network."""
    if not cfg.train.init_from:
        raise ConfigError("train.lora_rank adapts pretrained weights: set train.init_from to the checkpoint (or "
                          "Hugging Face directory) to continue from")
    if cfg.train.objective == "electra":
        raise ConfigError("train.lora_rank with train.objective electra would adapt a fresh generator too; continue "
                          "an encoder with train.objective mlm, or set train.lora_rank 0")
    if cfg.dist.shard == "fsdp" or cfg.dist.sync == "diloco":
        which = "dist.shard fsdp" if cfg.dist.shard == "fsdp" else "dist.sync diloco"
        raise ConfigError(f"train.lora_rank trains a few small updates beside frozen weights: {which} is for "
                          "training every weight; use dist.shard none and dist.sync full (or fp16 / powersgd)")


def _check_diloco(d: DistConfig) -> None:
    if d.stream_fragments > d.sync_every:
        raise ConfigError(f"dist.stream_fragments ({d.stream_fragments}) is above dist.sync_every ({d.sync_every}): "
                          "each fragment needs a step of its own in every cycle; use at most sync_every fragments")
    gap = d.sync_every // d.stream_fragments
    if d.stream_delay >= gap:
        raise ConfigError(f"dist.stream_delay ({d.stream_delay}) must be below dist.sync_every / "
                          f"dist.stream_fragments ({gap}), so that one fragment's update has arrived before the next "
                          f"fragment is sent; use at most {gap - 1}")
    if d.quant_block % 2:
        raise ConfigError(f"dist.quant_block ({d.quant_block}) must be even: 4-bit values are packed two to a byte")


def _check_ngram(cfg: Config) -> None:
    m = cfg.model
    if cfg.dist.world_size > 1:
        raise ConfigError(f"model.arch ngram is estimated by counting in one process; run it without --nproc "
                          f"(dist.world_size is {cfg.dist.world_size})")
    if m.discount_fallback:
        if len(m.discount_fallback) != 3:
            raise ConfigError(f"model.discount_fallback needs three discounts D1 D2 D3+, got "
                              f"{m.discount_fallback}")
        for j, d in enumerate(m.discount_fallback, 1):
            if not 0 <= d <= j:
                raise ConfigError(f"model.discount_fallback: D{j}{'+' if j == 3 else ''} must be between 0 and "
                                  f"{j}, got {d}")
    if m.prune:
        if m.prune[0] != 0:
            raise ConfigError(f"model.prune starts with the unigram threshold, which must be 0 (unigrams are never "
                              f"pruned), got {m.prune}")
        if any(b < a for a, b in zip(m.prune, m.prune[1:])):
            raise ConfigError(f"model.prune thresholds must not decrease with the order (a pruned n-gram takes its "
                              f"extensions with it), got {m.prune}")
        if len(m.prune) > m.order:
            raise ConfigError(f"model.prune has {len(m.prune)} thresholds but model.order is {m.order}")


def _divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def derive(cfg: Config) -> Derived:
    """Compute every derived value; the one place that knows how they follow from the keys."""
    t, world = cfg.train, cfg.dist.world_size
    micro = t.micro_batch if isinstance(t.micro_batch, int) else None
    global_batch = micro * t.grad_accum * world if micro is not None else None
    tokens_per_step = global_batch * t.block_size if global_batch is not None else None
    max_steps = t.max_steps
    if t.max_tokens is not None and tokens_per_step is not None:
        max_steps = max(1, min(max_steps, math.ceil(t.max_tokens / tokens_per_step)))
    lr_scale = {"none": 1.0, "linear": float(world), "sqrt": math.sqrt(world)}[t.lr_scaling]
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_frac * max_steps)
    return Derived(world_size=world, micro_batch=micro, global_batch=global_batch,
                   tokens_per_step=tokens_per_step, lr_scale=lr_scale, lr=t.lr * lr_scale,
                   max_steps=max_steps, warmup_steps=min(warmup, max_steps))


def with_micro_batch(cfg: Config, micro_batch: int) -> Config:
    """The config with a measured micro-batch in place of `auto`, and derived values updated."""
    new = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch=micro_batch))
    new.derived = derive(new)
    return new


def config_options() -> argparse.ArgumentParser:
    """The `--config` and `--set` options every command that reads a config takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config file over the key defaults, or a built-in one by name: tiny, default, base "
                        "(default: `default`, the demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set train.lr=3e-4 (repeatable; `hanlm config keys` lists keys)")
    return p


def keys_markdown() -> str:
    """The table of every key, type, default, allowed range and meaning, as docs/guide/config.md shows it."""
    rows = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append(f"| `{section}.{f.name}` | {_describe(hints[f.name])} | `{_yaml_scalar(default)}` "
                        f"| {describe_range(f.metadata)} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip().removesuffix("\n...")
