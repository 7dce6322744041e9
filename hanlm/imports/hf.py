"""A Hugging Face Llama directory as a hanlm checkpoint: `train.init_from`, `hanlm eval`, `generate`
and `serve` accept one wherever they accept a checkpoint.

The mapping is `hanlm.export.hf.hf_state_dict` run backwards; grouped-query attention (num_key_value_heads) and
any rope_theta map onto model.n_kv_head and model.rope_theta. What hanlm's GPT cannot express is refused with
the config field that says so: biases, rope scaling, norm epsilon, activation or MLP width. The tokenizer must be one hanlm can be: byte-level BPE with
hanlm's special tokens at ids 0–3 (what `hanlm export` writes for bpe), or the per-character form
`hanlm export` writes for char tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hanlm.checkpoint import Checkpoint
from hanlm.config import load_config
from hanlm.data.tokenizer import SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, Tokenizer
from hanlm.errors import CheckpointError, DataError
from hanlm.models.gpt import RMS_EPS, SwiGLU


def is_hf_dir(path: str) -> bool:
    """Whether `path` is a local Hugging Face model directory (a config.json, no hanlm config.yaml)."""
    p = Path(path)
    return "://" not in path and (p / "config.json").is_file() and not (p / "config.yaml").exists()


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / 'config.json'} is unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'} is not a JSON object")
    return config


def _check(config: dict[str, Any], where: Path) -> None:
    """Refuse, by field, what hanlm's GPT cannot compute."""
    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}/config.json: {field}={config.get(field)!r}: {why}; hanlm's GPT is a "
                               "Llama with no biases, RMSNorm eps 1e-5, no rope scaling and an MLP of "
                               "64·ceil(8·hidden/3/64)")
    if config.get("model_type") != "llama":
        raise refuse("model_type", "only Llama models map onto hanlm's GPT")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        if not isinstance(config.get(field), int) or config[field] < 1:
            raise refuse(field, "must be a positive integer")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = config.get("num_key_value_heads", heads)
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise refuse("num_key_value_heads", "must be a positive integer that divides num_attention_heads")
    theta = config.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta <= 1e12:
        raise refuse("rope_theta", "must be a number in (0, 1e12]")
    if hidden % heads or config.get("head_dim", hidden // heads) != hidden // heads:
        raise refuse("head_dim", "must be hidden_size / num_attention_heads")
    wanted = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rope_scaling": None,
              "rms_norm_eps": RMS_EPS}
    for field, value in wanted.items():
        if config.get(field, value) != value:
            raise refuse(field, f"hanlm computes {value!r} only")
    if config.get("intermediate_size") != SwiGLU(hidden).gate.out_features:
        raise refuse("intermediate_size", f"hanlm's MLP for hidden_size {hidden} is {SwiGLU(hidden).gate.out_features}")


def _to_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from transformers' rotary halves to hanlm's interleaved pairs."""
    out, inp = w.shape
    return w.view(n_head, 2, out // n_head // 2, inp).transpose(1, 2).reshape(out, inp)


def _weights(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
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
    biases = [k for k in hf if k.endswith(".bias")]
    if biases:
        raise CheckpointError(f"{path}: the model has biases ({biases[0]}, …), which hanlm's GPT has not")
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
    except KeyError as e:
        raise CheckpointError(f"{path}: the weights lack {e.args[0]}, which a Llama with this config.json has")
    return {name: t.float() for name, t in out.items()}


def _tokenizer(path: Path) -> Tokenizer:
    """hanlm's tokenizer from the directory's tokenizer.json (see the module docstring)."""
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

        return BpeTokenizer(HFTokenizer.from_str(json.dumps(data)))
    except OSError as e:
        raise CheckpointError(f"{source}: cannot read it ({e})") from None
    except (ValueError, KeyError, TypeError, AttributeError, DataError, RecursionError) as e:
        raise CheckpointError(f"{source}: not a tokenizer hanlm can use ({type(e).__name__}: {e}); it needs "
                              f"{', '.join(SPECIAL_TOKENS)} at ids 0–3 and byte-level BPE, or the char form "
                              "`hanlm export` writes") from None
    except Exception as e:  # `tokenizers` raises bare Exception on JSON it cannot parse
        raise CheckpointError(f"{source}: not a tokenizer hanlm can use ({e})") from None


def load_hf(path: str) -> Checkpoint:
    """The Llama directory at `path` as a hanlm checkpoint at step 0."""
    where = Path(path)
    config = _config(where)
    _check(config, where)
    tokenizer = _tokenizer(where)
    if tokenizer.vocab_size != config["vocab_size"]:
        raise CheckpointError(f"{where}: tokenizer.json has {tokenizer.vocab_size} ids, config.json's vocab_size "
                              f"is {config['vocab_size']}")
    tied = config.get("tie_word_embeddings", True)
    cfg = load_config(overrides=[
        "model.arch=gpt", "model.preset=null", f"model.n_layer={config['num_hidden_layers']}",
        f"model.n_head={config['num_attention_heads']}", f"model.n_embd={config['hidden_size']}",
        f"model.n_kv_head={config.get('num_key_value_heads', config['num_attention_heads'])}",
        f"model.rope_theta={float(config.get('rope_theta', 10000.0))}",
        f"model.context_length={config['max_position_embeddings']}", f"model.tie_embeddings={str(tied).lower()}",
        f"tokenizer.kind={tokenizer.kind}"])
    return Checkpoint(path, cfg, tokenizer, _weights(where, config), {"step": 0})
