"""A Hugging Face decoder directory (Llama, Mistral, Qwen2, Qwen3) as a hanlm checkpoint: `train.init_from`,
`hanlm eval`, `generate`, `serve` and `finetune` accept one wherever they accept a checkpoint.

The mapping is `hanlm.export.hf.hf_state_dict` run backwards; num_key_value_heads, head_dim, intermediate_size,
rope_theta and rms_norm_eps become the model.* keys of the same meaning, Qwen2's qkv biases model.qkv_bias and
Qwen3's QK-norm model.qk_norm. What hanlm's GPT cannot compute is refused with the config field that says so:
other biases, rope scaling, sliding windows, another activation. The tokenizer is the char or BPE form `hanlm
export` writes (hanlm's own kinds), or else the model's own tokenizer.json as it is, with its special tokens
where that model put them (`PretrainedTokenizer`: Qwen's and Llama 3's byte-level BPE, WordPiece, Unigram).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hanlm.checkpoint import Checkpoint
from hanlm.config import load_config
from hanlm.data.tokenizer import SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer
from hanlm.errors import CheckpointError, DataError


def is_hf_dir(path: str) -> bool:
    """Whether `path` is a local Hugging Face model directory (a config.json, no hanlm config.yaml)."""
    p = Path(path)
    return "://" not in path and (p / "config.json").is_file() and not (p / "config.yaml").exists()


# model_type → what its attention adds to Llama's: qkv biases (Qwen2), QK-norm (Qwen3).
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}


def _check(config: dict[str, Any], where: Path) -> None:
    """Refuse, by field, what hanlm's GPT cannot compute."""
    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}/config.json: {field}={config.get(field)!r}: {why}; hanlm's GPT is a "
                               "Llama (optionally with Qwen2's qkv biases or Qwen3's QK-norm) without rope scaling, "
                               "sliding windows or other biases")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise refuse("model_type", f"hanlm's GPT computes {', '.join(FAMILIES)}")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
                  "intermediate_size"):
        if not isinstance(config.get(field), int) or isinstance(config[field], bool) or config[field] < 1:
            raise refuse(field, "must be a positive integer")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = config.get("num_key_value_heads", heads)
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise refuse("num_key_value_heads", "must be a positive integer that divides num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim % 2 or (config.get("head_dim") is None and hidden % heads):
        raise refuse("head_dim", "must be an even integer (by default hidden_size / num_attention_heads)")
    for field, low, high in (("rope_theta", 0.0, 1e12), ("rms_norm_eps", 0.0, 1.0)):
        value = rope_theta(config) if field == "rope_theta" else config.get(field, 1e-5)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
            raise refuse(field, f"must be a number in ({low:g}, {high:g}]")
    parameters = config.get("rope_parameters")
    if parameters is not None and (not isinstance(parameters, dict) or
                                   parameters.get("rope_type", "default") != "default"):
        raise refuse("rope_parameters", "only the default rotary embedding (no scaling) is computed")
    wanted = {"mlp_bias": False, "hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False}
    if model_type in ("llama", "mistral", "qwen3"):
        wanted["attention_bias"] = False  # theirs adds an output bias too, which hanlm has not
    for field, value in wanted.items():
        if config.get(field, value) != value:
            raise refuse(field, f"hanlm computes {value!r} only")
    if model_type == "mistral" and config.get("sliding_window") not in (None, 0) and \
            config["sliding_window"] < config["max_position_embeddings"]:
        raise refuse("sliding_window", "sliding-window attention is not supported (set it to null, or "
                     "max_position_embeddings to at most the window)")


def rope_theta(config: dict[str, Any]) -> Any:
    """The rotary base: `rope_theta`, or transformers 5's `rope_parameters.rope_theta`; 10,000 when neither."""
    parameters = config.get("rope_parameters")
    nested = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    return config.get("rope_theta", nested if nested is not None else 10000.0)


def _to_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from transformers' rotary halves to hanlm's interleaved pairs."""
    out, inp = w.shape
    return w.view(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def _pairs_vector(b: torch.Tensor, heads: int) -> torch.Tensor:
    return _to_pairs(b.unsqueeze(1), heads).squeeze(1)


def _read(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors (pytorch_model.bin is a pickle, which hanlm never "
                              "loads: convert it to safetensors)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf |= load_file(str(f))
        except Exception as e:  # safetensors raises its own types for a damaged file
            raise CheckpointError(f"{f} is damaged ({type(e).__name__}: {e})") from None
    return hf


def _weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    hf = _read(path)
    family = FAMILIES[config["model_type"]]
    expected = (".q_proj.bias", ".k_proj.bias", ".v_proj.bias") if family.get("qkv_bias") else ()
    biases = [k for k in hf if k.endswith(".bias") and not k.endswith(expected)]
    if biases:
        raise CheckpointError(f"{path}: the model has biases ({biases[0]}, …) that hanlm's GPT has not")
    heads, tied = config["num_attention_heads"], config.get("tie_word_embeddings", True)
    kv = config.get("num_key_value_heads", heads)
    try:
        out = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
               "lm_head.weight": hf["model.embed_tokens.weight"] if tied else hf["lm_head.weight"]}
        for i in range(config["num_hidden_layers"]):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            q = _to_pairs(hf[src + "self_attn.q_proj.weight"], heads)
            k = _to_pairs(hf[src + "self_attn.k_proj.weight"], kv)
            out |= {dst + "attn.qkv.weight": torch.cat([q, k, hf[src + "self_attn.v_proj.weight"]]),
                    dst + "attn.proj.weight": hf[src + "self_attn.o_proj.weight"],
                    dst + "mlp.gate.weight": hf[src + "mlp.gate_proj.weight"],
                    dst + "mlp.up.weight": hf[src + "mlp.up_proj.weight"],
                    dst + "mlp.down.weight": hf[src + "mlp.down_proj.weight"],
                    dst + "attn_norm.weight": hf[src + "input_layernorm.weight"],
                    dst + "mlp_norm.weight": hf[src + "post_attention_layernorm.weight"]}
            if family.get("qkv_bias"):
                out[dst + "attn.qkv.bias"] = torch.cat([_pairs_vector(hf[src + "self_attn.q_proj.bias"], heads),
                                                        _pairs_vector(hf[src + "self_attn.k_proj.bias"], kv),
                                                        hf[src + "self_attn.v_proj.bias"]])
            if family.get("qk_norm"):
                out[dst + "attn.q_norm.weight"] = _pairs_vector(hf[src + "self_attn.q_norm.weight"], 1)
                out[dst + "attn.k_norm.weight"] = _pairs_vector(hf[src + "self_attn.k_norm.weight"], 1)
    except KeyError as e:
        raise CheckpointError(f"{path}: the weights lack {e.args[0]}, which a {config['model_type']} model with "
                              "this config.json has") from None
    except RuntimeError as e:  # a tensor of the wrong size for the config's shape
        raise CheckpointError(f"{path}: a tensor does not fit config.json's shape ({e})") from None
    return {name: t.float() for name, t in out.items()}


def _special_id(hf, config: dict[str, Any], tokenizer_config: dict[str, Any], name: str) -> int | None:
    """The id of special token `name` (pad, unk, bos, eos): config.json's `<name>_token_id` (the first of a list),
    else tokenizer_config.json's `<name>_token` looked up in the vocabulary; None when neither names one."""
    value = config.get(f"{name}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    token = tokenizer_config.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return hf.token_to_id(token) if isinstance(token, str) else None


def _tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    """hanlm's tokenizer from the directory's tokenizer.json: the char or BPE form `hanlm export` writes (hanlm's
    own kinds, specials at ids 0–3), else the model's own tokenizer as it is (`pretrained`), its special tokens
    from config.json and tokenizer_config.json."""
    source = path / "tokenizer.json"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") == "BPE" and not model.get("merges") and (data.get("pre_tokenizer") or {}).get(
                "type") == "Split":
            vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
            if [i for _, i in vocab] != list(range(len(vocab))):
                raise DataError("the vocabulary's ids are not 0, 1, 2, …")
            return CharTokenizer([s for s, _ in vocab], bool(model.get("byte_fallback")))
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(json.dumps(data))
        if all(hf.token_to_id(s) == i for i, s in enumerate(SPECIAL_TOKENS)):
            return BpeTokenizer(hf)
        tokenizer_config = _json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() \
            else {}
        specials = {n: _special_id(hf, config, tokenizer_config, n) for n in ("pad", "unk", "bos", "eos")}
        if specials["eos"] is None:
            raise DataError("neither config.json's eos_token_id nor tokenizer_config.json's eos_token names the "
                            "end-of-text token")
        if specials["pad"] is None:
            specials["pad"] = specials["eos"]
        specials = {n: -1 if v is None else v for n, v in specials.items()}
        return PretrainedTokenizer(hf, specials, max(config["vocab_size"], hf.get_vocab_size()))
    except OSError as e:
        raise CheckpointError(f"{source}: cannot read it ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError, DataError, RecursionError) as e:
        raise CheckpointError(f"{source}: not a tokenizer hanlm can use ({type(e).__name__}: {e})") from None
    except Exception as e:  # `tokenizers` raises bare Exception on JSON it cannot parse
        raise CheckpointError(f"{source}: not a tokenizer hanlm can use ({e})") from None


def _json_object(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return data


def load_hf(path: str) -> Checkpoint:
    """The Llama directory at `path` as a hanlm checkpoint at step 0."""
    where = Path(path)
    config = _json_object(where / "config.json")
    _check(config, where)
    tokenizer = _tokenizer(where, config)
    if tokenizer.vocab_size != config["vocab_size"]:
        raise CheckpointError(f"{where}: tokenizer.json has {tokenizer.vocab_size} ids, config.json's vocab_size "
                              f"is {config['vocab_size']}")
    tied = config.get("tie_word_embeddings", True)
    heads, family = config["num_attention_heads"], FAMILIES[config["model_type"]]
    cfg = load_config(overrides=[
        "model.arch=gpt", "model.preset=null", f"model.n_layer={config['num_hidden_layers']}",
        f"model.n_head={heads}", f"model.n_embd={config['hidden_size']}",
        f"model.n_kv_head={config.get('num_key_value_heads', heads)}",
        f"model.head_dim={config.get('head_dim') or config['hidden_size'] // heads}",
        f"model.intermediate_size={config['intermediate_size']}",
        f"model.rope_theta={float(rope_theta(config))}",
        f"model.norm_eps={float(config.get('rms_norm_eps', 1e-5))}",
        f"model.qkv_bias={str(bool(family.get('qkv_bias'))).lower()}",
        f"model.qk_norm={str(bool(family.get('qk_norm'))).lower()}",
        f"model.context_length={config['max_position_embeddings']}", f"model.tie_embeddings={str(tied).lower()}",
        f"tokenizer.kind={tokenizer.kind}"])
    return Checkpoint(path, cfg, tokenizer, _weights(where, config), {"step": 0})
