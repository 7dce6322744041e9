"""A Hugging Face BERT (`BertForMaskedLM`, `BertModel`: bert-base-chinese, RoBERTa-wwm-ext, MacBERT) as hanlm's
`bert` arch, both ways: `bert_weights` reads transformers' tensors into hanlm's names, `hf_bert_weights` writes
them back (the export), from one table of names so the two cannot drift apart. The one layout change is the
fused projection: hanlm's `attn.qkv` holds BERT's query, key and value rows in that order.

Published checkpoints differ in small ways the reader absorbs: `bert.` before every name (the task classes) or
not (`BertModel`), TensorFlow's LayerNorm `gamma` / `beta` (bert-base-chinese), a pooler and a next-sentence
head (ignored: hanlm's heads pool for themselves), and no masked-LM head at all (`BertModel`: one starts fresh,
and the reader says so).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from hanlm.config import ModelConfig
from hanlm.errors import CheckpointError
from hanlm.models.bert import bert_mlp_width

# The BERT config fields whose value hanlm's bert must match exactly to compute what transformers computes.
WANTED = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
          "add_cross_attention": False}


def check_bert(config: dict[str, Any], where: str) -> None:
    """Refuse, by field, a BERT config that hanlm's bert cannot compute."""
    def refuse(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}/config.json: {field}={config.get(field)!r}: {why}; hanlm's bert is BERT as "
                               "published (absolute positions, GELU, post-norm LayerNorm), an encoder only")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
                  "type_vocab_size"):
        if not isinstance(config.get(field), int) or isinstance(config[field], bool) or config[field] < 1:
            raise refuse(field, "must be a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise refuse("num_attention_heads", "must divide hidden_size")
    width = config.get("intermediate_size", 4 * config["hidden_size"])
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise refuse("intermediate_size", "must be a positive integer")
    eps = config.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise refuse("layer_norm_eps", "must be a number in (0, 1]")
    for field, value in WANTED.items():
        if config.get(field, value) != value:
            raise refuse(field, f"hanlm computes {value!r} only")


def bert_overrides(config: dict[str, Any]) -> list[str]:
    """hanlm's model.* config keys for a checked BERT config."""
    return ["model.arch=bert", "model.preset=null", f"model.n_layer={config['num_hidden_layers']}",
            f"model.n_head={config['num_attention_heads']}", f"model.n_embd={config['hidden_size']}",
            f"model.intermediate_size={config.get('intermediate_size', 4 * config['hidden_size'])}",
            f"model.norm_eps={float(config.get('layer_norm_eps', 1e-12))}",
            f"model.type_vocab_size={config['type_vocab_size']}",
            f"model.context_length={config['max_position_embeddings']}",
            f"model.tie_embeddings={str(bool(config.get('tie_word_embeddings', True))).lower()}"]


def _names(n_layer: int) -> dict[str, str]:
    """hanlm's name → transformers' (without the `bert.` of the task classes) for every tensor but the fused qkv
    and the output head's."""
    names = {"tok_emb.weight": "embeddings.word_embeddings.weight",
             "pos_emb.weight": "embeddings.position_embeddings.weight",
             "type_emb.weight": "embeddings.token_type_embeddings.weight",
             "emb_norm.weight": "embeddings.LayerNorm.weight", "emb_norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(n_layer):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                             ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"),
                             ("mlp_norm", "output.LayerNorm")):
            names |= {f"{src}{ours}.{p}": f"{dst}{theirs}.{p}" for p in ("weight", "bias")}
    return names


HEAD = {"head_dense.weight": "cls.predictions.transform.dense.weight",
        "head_dense.bias": "cls.predictions.transform.dense.bias",
        "head_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "head_norm.bias": "cls.predictions.transform.LayerNorm.bias", "lm_head.bias": "cls.predictions.bias"}
QKV = ("query", "key", "value")


def _canonical(name: str) -> str:
    """A tensor name without the task classes' `bert.` and with TensorFlow's LayerNorm gamma / beta renamed."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def _fresh_head(width: int, vocab: int) -> dict[str, torch.Tensor]:
    """A masked-LM head as BERT initialises one: N(0, 0.02) dense, zero biases, unit LayerNorm."""
    seeded = torch.Generator().manual_seed(0)  # the same head at every load of the same directory
    return {"head_dense.weight": torch.randn(width, width, generator=seeded) * 0.02,
            "head_dense.bias": torch.zeros(width), "head_norm.weight": torch.ones(width),
            "head_norm.bias": torch.zeros(width),
            "lm_head.bias": torch.zeros(vocab)}


class _Canonical(dict):
    """Canonical name → the tensor of `tensors` stored under its own name, read when asked for."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__({_canonical(k): k for k in tensors})
        self.tensors = tensors
        if "cls.predictions.decoder.bias" in self and "cls.predictions.bias" not in self:
            self["cls.predictions.bias"] = super().__getitem__("cls.predictions.decoder.bias")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[super().__getitem__(name)]


def bert_weights(tensors: Mapping[str, torch.Tensor], config: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """hanlm's bert state dict from transformers' tensors of a checked `config` (read one at a time)."""
    hf = _Canonical(tensors)
    n_layer, width, vocab = config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    try:
        out = {ours: hf[theirs] for ours, theirs in _names(n_layer).items()}
        for i in range(n_layer):
            stem = f"encoder.layer.{i}.attention.self."
            for p in ("weight", "bias"):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([hf[f"{stem}{part}.{p}"] for part in QKV])
        if all(theirs in hf for theirs in HEAD.values()):
            out |= {ours: hf[theirs] for ours, theirs in HEAD.items()}
        else:
            sys.stderr.write(f"note: {where} has no masked-LM head (a BertModel): hanlm's bert starts one fresh; "
                             "the task heads of hanlm finetune do not read it\n")
            out |= _fresh_head(width, vocab)
        tied = config.get("tie_word_embeddings", True)
        out["lm_head.weight"] = out["tok_emb.weight"] if tied else hf["cls.predictions.decoder.weight"]
    except KeyError as e:
        raise CheckpointError(f"{where}: the weights lack {e.args[0]}, which a bert model with this config.json "
                              "has") from None
    except RuntimeError as e:
        raise CheckpointError(f"{where}: a tensor does not fit config.json's shape ({e})") from None
    return {name: t.float() for name, t in out.items()}


def hf_bert_weights(weights: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' `BertForMaskedLM` tensors for a hanlm bert state dict: `bert_weights` backwards."""
    out = {f"bert.{theirs}": weights[ours] for ours, theirs in _names(n_layer).items()}
    out |= {theirs: weights[ours] for ours, theirs in HEAD.items()}
    for i in range(n_layer):
        stem = f"bert.encoder.layer.{i}.attention.self."
        for p in ("weight", "bias"):
            for part, t in zip(QKV, weights[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                out[f"{stem}{part}.{p}"] = t
    if not tied:
        out["cls.predictions.decoder.weight"] = weights["lm_head.weight"]
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def hf_bert_config(m: ModelConfig, vocab_size: int, pad_id: int) -> dict[str, Any]:
    """config.json of the `BertForMaskedLM` for a hanlm bert of model config `m`."""
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "torch_dtype": "float32",
            "vocab_size": vocab_size, "hidden_size": m.n_embd, "num_hidden_layers": m.n_layer,
            "num_attention_heads": m.n_head, "intermediate_size": bert_mlp_width(m),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": m.context_length, "type_vocab_size": m.type_vocab_size,
            "layer_norm_eps": m.norm_eps, "position_embedding_type": "absolute", "initializer_range": 0.02,
            "tie_word_embeddings": m.tie_embeddings, "pad_token_id": pad_id if pad_id >= 0 else None,
            "is_decoder": False, "add_cross_attention": False}
