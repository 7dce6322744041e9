"""`hanlm export CKPT --format hf OUT/`: a Hugging Face `LlamaForCausalLM` directory (`Qwen2ForCausalLM` for a GPT
with qkv biases, `Qwen3ForCausalLM` for one with QK-norm), or a `BertForMaskedLM` for a bert (`hanlm.imports.bert`
holds its mapping, both ways).

hanlm's GPT is the Llama block (pre-norm RMSNorm, rotary positions with model.rope_theta, grouped-query
attention with model.n_kv_head, SwiGLU, optionally tied embeddings; Qwen2's qkv biases and Qwen3's QK-norm on
request), so the export is a renaming plus one layout change: hanlm rotates the pairs (2i, 2i+1) of each head,
transformers the halves (i, i + head_dim/2), so the rows of the query and key projections (and their biases
and norm weights) are permuted within each head. The tokenizer becomes a `tokenizer.json` that
`PreTrainedTokenizerFast` loads and that gives hanlm's ids: byte-level BPE as it is; the char vocabulary as a
BPE model without merges over single characters, with `byte_fallback` standing for hanlm's byte tokens. A word
vocabulary needs jieba to split text and cannot be written so; LSTM and n-gram checkpoints have no Llama form
(an n-gram is an ARPA file already).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hanlm.checkpoint import Checkpoint
from hanlm.data.tokenizer import SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer
from hanlm.errors import CheckpointError
from hanlm.export.target import check_output, output_dir
from hanlm.imports.bert import hf_bert_config, hf_bert_weights
from hanlm.loading import model_of, open_checkpoint, require_language_model, resolve_served
from hanlm.config import ModelConfig
from hanlm.models.encoder import MASK_ID
from hanlm.models.gpt import head_dim_of, mlp_width, qkv_sizes


def _to_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from hanlm's interleaved rotary pairs to transformers' halves."""
    out, inp = w.shape
    return w.view(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _halves_vector(b: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k bias (or a per-head norm weight, `heads` = 1) from hanlm's interleaved pairs to halves."""
    return _to_halves(b.unsqueeze(1), heads).squeeze(1)


def hf_state_dict(weights: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' tensor names and layout (Llama, Qwen2 and Qwen3 share them) for a hanlm GPT state dict of
    shape `m`."""
    out = {"model.embed_tokens.weight": weights["tok_emb.weight"], "model.norm.weight": weights["norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"]
    heads, kv, sizes = m.n_head, m.n_kv_head or m.n_head, qkv_sizes(m)
    for i in range(m.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = weights[src + "attn.qkv.weight"].split(sizes, dim=0)
        out |= {
            dst + "self_attn.q_proj.weight": _to_halves(q, heads),
            dst + "self_attn.k_proj.weight": _to_halves(k, kv),
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": weights[src + "attn.proj.weight"],
            dst + "mlp.gate_proj.weight": weights[src + "mlp.gate.weight"],
            dst + "mlp.up_proj.weight": weights[src + "mlp.up.weight"],
            dst + "mlp.down_proj.weight": weights[src + "mlp.down.weight"],
            dst + "input_layernorm.weight": weights[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": weights[src + "mlp_norm.weight"],
        }
        if m.qkv_bias:
            qb, kb, vb = weights[src + "attn.qkv.bias"].split(sizes)
            out |= {dst + "self_attn.q_proj.bias": _halves_vector(qb, heads),
                    dst + "self_attn.k_proj.bias": _halves_vector(kb, kv), dst + "self_attn.v_proj.bias": vb}
        if m.qk_norm:
            out |= {dst + "self_attn.q_norm.weight": _halves_vector(weights[src + "attn.q_norm.weight"], 1),
                    dst + "self_attn.k_norm.weight": _halves_vector(weights[src + "attn.k_norm.weight"], 1)}
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def hf_architecture(m: ModelConfig, source: str) -> tuple[str, str]:
    """(architecture, model_type) of the transformers class that computes a GPT of shape `m`: Llama, or Qwen2 for
    qkv biases, or Qwen3 for QK-norm."""
    if m.qkv_bias and m.qk_norm:
        raise CheckpointError(f"{source}: no transformers model has qkv biases and QK-norm together (Qwen2 has the "
                              "first, Qwen3 the second)")
    if m.qk_norm:
        return "Qwen3ForCausalLM", "qwen3"
    return ("Qwen2ForCausalLM", "qwen2") if m.qkv_bias else ("LlamaForCausalLM", "llama")


def rope_scaling(m: ModelConfig) -> dict[str, Any] | None:
    """config.json's `rope_scaling` for model.rope_scaling: null, or the parameters transformers reads."""
    if m.rope_scaling == "none":
        return None
    out = {"rope_type": m.rope_scaling, "factor": m.rope_factor}
    if m.rope_scaling == "llama3":
        out |= {"low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_context}
    return out


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json of the transformers model (`hf_architecture`) for a GPT checkpoint."""
    m, tok = ckpt.config.model, ckpt.tokenizer
    architecture, model_type = hf_architecture(m, ckpt.path)
    config = {
        "architectures": [architecture], "model_type": model_type, "torch_dtype": "float32",
        "vocab_size": tok.vocab_size, "hidden_size": m.n_embd, "intermediate_size": mlp_width(m),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": head_dim_of(m), "hidden_act": "silu", "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_scaling": rope_scaling(m),
        "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings,
        "pad_token_id": _id(tok.pad_id), "bos_token_id": _id(tok.bos_id), "eos_token_id": tok.eos_id,
        "initializer_range": 0.02, "use_cache": True,
    }
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layer}
        if model_type == "qwen3":
            config["attention_bias"] = False
    return config


def hf_tokenizer_json(tokenizer: Tokenizer, source: str) -> str:
    """A `tokenizer.json` that gives `tokenizer`'s ids for any text (see the module docstring)."""
    if isinstance(tokenizer, (BpeTokenizer, PretrainedTokenizer)):
        return tokenizer.hf.to_str()
    if not isinstance(tokenizer, CharTokenizer):
        raise CheckpointError(f"{source}: a {tokenizer.kind} tokenizer splits text with jieba or a tagger, which a "
                              "tokenizer.json cannot express; export a char or bpe model")
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    fallback = getattr(tokenizer, "byte_fallback", False)
    vocab = {s: i for i, s in enumerate(tokenizer.vocab)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=fallback))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return hf.to_str()


def _id(token_id: int) -> int | None:
    """A special token's id for config.json: null where the tokenizer has none (-1)."""
    return None if token_id < 0 else token_id


def special_tokens(tokenizer: Tokenizer, bert: bool = False) -> dict[str, str]:
    """pad_token, unk_token, bos_token, eos_token: each special the tokenizer has, by its spelling; for a `bert`,
    also its cls_token (the start token), sep_token (<eos>) and mask_token."""
    strings = tokenizer.token_strings()
    out = {f"{n}_token": strings[getattr(tokenizer, f"{n}_id")] for n in ("pad", "unk", "bos", "eos")
           if getattr(tokenizer, f"{n}_id") >= 0}
    if bert:
        mask = tokenizer.mask_id if isinstance(tokenizer, PretrainedTokenizer) else MASK_ID
        out |= {"cls_token": strings[tokenizer.start_id], "sep_token": strings[tokenizer.eos_id]}
        if mask >= 0:
            out["mask_token"] = strings[mask]
    return out


def _tokenizer_config(tokenizer: Tokenizer, context_length: int, bert: bool) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
        **special_tokens(tokenizer, bert),
        # hanlm encodes text that spells a special token as text: so must the export.
        "split_special_tokens": True, "clean_up_tokenization_spaces": False,
    }


def export_hf(spec: str, out: str | Path, force: bool = False) -> Path:
    """Write the Hugging Face directory of the gpt or bert checkpoint `spec` into `out`; returns it. An `out` that
    is, lies inside or contains the checkpoint, is not a directory, or (unless `force`) is a directory holding
    anything is refused before anything is written (`hanlm.export.target`)."""
    path = resolve_served(spec)
    target = check_output(out, "hf", path, force)
    ckpt = require_language_model(open_checkpoint(path))
    arch = ckpt.config.model.arch
    if arch not in ("gpt", "bert"):
        why = "an n-gram model is an ARPA file already (model.arpa in the checkpoint)" if arch == "ngram" else \
            "only the gpt (a Llama) and bert architectures have a transformers form"
        raise CheckpointError(f"{path}: cannot export a {arch} model to Hugging Face: {why}")
    tokenizer_json = hf_tokenizer_json(ckpt.tokenizer, path)
    m, tok, bert = ckpt.config.model, ckpt.tokenizer, arch == "bert"
    weights = model_of(ckpt).state_dict()  # every name, tied ones too (a checkpoint stores a tied tensor once)
    if bert:
        config, state = hf_bert_config(m, tok.vocab_size, tok.pad_id), hf_bert_weights(weights, m.n_layer,
                                                                                        m.tie_embeddings)
    else:
        config, state = hf_config(ckpt), hf_state_dict(weights, m)
    generation = {"bos_token_id": _id(tok.bos_id), "eos_token_id": tok.eos_id, "pad_token_id": _id(tok.pad_id),
                  "do_sample": ckpt.config.generate.temperature > 0, "temperature": ckpt.config.generate.temperature,
                  "top_k": ckpt.config.generate.top_k, "max_new_tokens": ckpt.config.generate.max_tokens}
    with output_dir(target) as tmp:  # complete or not there: a failed export leaves what was
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not bert:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok, m.context_length, bert),
                                                              indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_tokens(tok, bert), indent=2) + "\n")
    return Path(out)
