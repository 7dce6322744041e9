"""`hanlm export CKPT --format hf OUT/`: a Hugging Face `LlamaForCausalLM` directory.

hanlm's GPT is the Llama block (pre-norm RMSNorm with eps 1e-5, rotary positions with model.rope_theta,
grouped-query attention with model.n_kv_head, SwiGLU, no biases, optionally tied embeddings), so the export
is a renaming plus one layout change:
hanlm rotates the pairs (2i, 2i+1) of each head, transformers the halves (i, i + head_dim/2), so the
rows of the query and key projections are permuted within each head. The tokenizer becomes a
`tokenizer.json` that `PreTrainedTokenizerFast` loads and that gives hanlm's ids: byte-level BPE as it
is; the char vocabulary as a BPE model without merges over single characters, with `byte_fallback`
standing for hanlm's byte tokens. A word vocabulary needs jieba to split text and cannot be written
so; LSTM and n-gram checkpoints have no Llama form (an n-gram is an ARPA file already).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hanlm.checkpoint import Checkpoint
from hanlm.data.tokenizer import SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, Tokenizer
from hanlm.errors import CheckpointError
from hanlm.export.target import check_output, output_dir
from hanlm.loading import model_of, open_checkpoint, require_language_model, resolve_served
from hanlm.models.gpt import RMS_EPS, SwiGLU, qkv_sizes


def _to_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection from hanlm's interleaved rotary pairs to transformers' halves."""
    out, inp = w.shape
    return w.view(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def hf_state_dict(weights: dict[str, torch.Tensor], n_head: int, n_kv_head: int | None,
                  tied: bool) -> dict[str, torch.Tensor]:
    """transformers' Llama tensor names and layout for a hanlm GPT state dict."""
    out = {"model.embed_tokens.weight": weights["tok_emb.weight"], "model.norm.weight": weights["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = weights["lm_head.weight"]
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        qkv = weights[src + "attn.qkv.weight"]
        q, k, v = qkv.split(qkv_sizes(qkv.size(1), n_head, n_kv_head), dim=0)
        out |= {
            dst + "self_attn.q_proj.weight": _to_halves(q, n_head),
            dst + "self_attn.k_proj.weight": _to_halves(k, n_kv_head or n_head),
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": weights[src + "attn.proj.weight"],
            dst + "mlp.gate_proj.weight": weights[src + "mlp.gate.weight"],
            dst + "mlp.up_proj.weight": weights[src + "mlp.up.weight"],
            dst + "mlp.down_proj.weight": weights[src + "mlp.down.weight"],
            dst + "input_layernorm.weight": weights[src + "attn_norm.weight"],
            dst + "post_attention_layernorm.weight": weights[src + "mlp_norm.weight"],
        }
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def hf_config(ckpt: Checkpoint) -> dict[str, Any]:
    """config.json of `LlamaForCausalLM` for a GPT checkpoint."""
    m, tok = ckpt.config.model, ckpt.tokenizer
    hidden = SwiGLU(m.n_embd).gate.out_features  # hanlm's rounding of 8/3 × n_embd
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": tok.vocab_size, "hidden_size": m.n_embd, "intermediate_size": hidden,
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": m.n_embd // m.n_head, "hidden_act": "silu", "max_position_embeddings": m.context_length,
        "rms_norm_eps": RMS_EPS, "rope_theta": m.rope_theta, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": m.tie_embeddings,
        "pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "initializer_range": 0.02, "use_cache": True,
    }


def hf_tokenizer_json(tokenizer: Tokenizer, source: str) -> str:
    """A `tokenizer.json` that gives `tokenizer`'s ids for any text (see the module docstring)."""
    if isinstance(tokenizer, BpeTokenizer):
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


def _tokenizer_config(tokenizer: Tokenizer, context_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
        "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
        # hanlm encodes text that spells "<eos>" as text: so must the export.
        "split_special_tokens": True, "clean_up_tokenization_spaces": False,
    }


def export_hf(spec: str, out: str | Path, force: bool = False) -> Path:
    """Write the Hugging Face directory of the GPT checkpoint `spec` into `out`; returns it. An `out` that is,
    lies inside or contains the checkpoint, is not a directory, or (unless `force`) is a directory holding
    anything is refused before anything is written (`hanlm.export.target`)."""
    path = resolve_served(spec)
    target = check_output(out, "hf", path, force)
    ckpt = require_language_model(open_checkpoint(path))
    arch = ckpt.config.model.arch
    if arch != "gpt":
        why = "an n-gram model is an ARPA file already (model.arpa in the checkpoint)" if arch == "ngram" else \
            "only the gpt architecture has a Llama form"
        raise CheckpointError(f"{path}: cannot export a {arch} model to Hugging Face: {why}")
    tokenizer_json = hf_tokenizer_json(ckpt.tokenizer, path)
    m = ckpt.config.model
    weights = model_of(ckpt).state_dict()  # every name, tied ones too (a checkpoint stores a tied tensor once)
    tok = ckpt.tokenizer
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                  "do_sample": ckpt.config.generate.temperature > 0, "temperature": ckpt.config.generate.temperature,
                  "top_k": ckpt.config.generate.top_k, "max_new_tokens": ckpt.config.generate.max_tokens}
    with output_dir(target) as tmp:  # complete or not there: a failed export leaves what was
        save_file(hf_state_dict(weights, m.n_head, m.n_kv_head, m.tie_embeddings), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(ckpt), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok, m.context_length), indent=2)
                                                   + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}, indent=2)
            + "\n")
    return Path(out)
