"""`hanlm export CKPT --format gguf OUT.gguf [--dtype f32|f16|q8_0]`: one file for llama.cpp.

The architecture is `llama`. hanlm rotates interleaved pairs, as Meta's Llama and llama.cpp's llama
rope do, so the query and key rows go in as they are (it is the Hugging Face layout that needs the
permutation). Norm weights stay f32 whatever `--dtype`, as llama.cpp's own converter keeps them.
Tokenizers: byte-level BPE as llama.cpp's `gpt2` model (tokens and merges); the char vocabulary as
its `llama` (sentencepiece) model with byte tokens typed as bytes and no space prefix. llama.cpp's
sentencepiece model writes a space as U+2581 before it looks it up, so the space token is stored so
spelled (without one, byte 0x20's token is, which gives hanlm's id for a space either way).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hanlm.atomic import atomic_path
from hanlm.checkpoint import Checkpoint
from hanlm.loading import model_of, open_checkpoint, require_language_model, resolve_served
from hanlm.config import ModelConfig
from hanlm.data.tokenizer import BYTE_BASE, BYTE_TOKENS, SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, Tokenizer
from hanlm.errors import CheckpointError, ConfigError
from hanlm.export.target import check_output
from hanlm.models.gpt import mlp_width, qkv_sizes

DTYPES = ("f32", "f16", "q8_0")
# Bump when write_gguf writes other bytes from the same inputs: the files `gguf_cache` keeps are then written anew.
LAYOUT = 1
# GGUF token types (llama.cpp's llama_token_type): normal, unknown, control, byte.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

_TENSORS = {"attn_norm.weight": "attn_norm.weight", "attn.proj.weight": "attn_output.weight",
            "mlp_norm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate.weight",
            "mlp.up.weight": "ffn_up.weight", "mlp.down.weight": "ffn_down.weight"}


def gguf_tensors(weights: dict[str, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp's tensor names for a hanlm GPT state dict (float32 numpy arrays) of shape `m`."""
    n_layer, tied = m.n_layer, m.tie_embeddings
    q_rows, k_rows, _ = qkv_sizes(m)
    out = {"token_embd.weight": weights["tok_emb.weight"], "output_norm.weight": weights["norm.weight"]}
    if not tied:
        out["output.weight"] = weights["lm_head.weight"]
    for i in range(n_layer):
        src, dst = f"blocks.{i}.", f"blk.{i}."
        q, k, v = np.split(weights[src + "attn.qkv.weight"], [q_rows, q_rows + k_rows], axis=0)
        out |= {dst + "attn_q.weight": q, dst + "attn_k.weight": k, dst + "attn_v.weight": v}
        out |= {dst + theirs: weights[src + ours] for ours, theirs in _TENSORS.items()}
    return {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in out.items()}


TOKENIZERS = ("char", "bpe")  # the tokenizer kinds a GGUF is written with (llama.cpp's llama and gpt2 models)


def _add_tokenizer(writer, tokenizer: Tokenizer, source: str) -> None:
    types = [CONTROL if i < len(SPECIAL_TOKENS) else NORMAL for i in range(tokenizer.vocab_size)]
    types[tokenizer.unk_id] = UNKNOWN
    if isinstance(tokenizer, BpeTokenizer):
        model = json.loads(tokenizer.hf.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokenizer.token_strings())
        writer.add_token_merges(merges)
    elif isinstance(tokenizer, CharTokenizer):
        tokens = [t.replace(" ", "\u2581") for t in tokenizer.token_strings()]
        if getattr(tokenizer, "byte_fallback", False):
            types[BYTE_BASE:BYTE_BASE + len(BYTE_TOKENS)] = [BYTE] * len(BYTE_TOKENS)
            if " " not in tokenizer.stoi:  # llama.cpp looks a space up as U+2581: let that find byte 0x20's id
                tokens[BYTE_BASE + 0x20], types[BYTE_BASE + 0x20] = "\u2581", NORMAL
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])  # no merges: scores only rank
        writer.add_add_space_prefix(False)
    else:
        why = ("splits text with jieba or a tagger, which llama.cpp cannot; export a char or bpe model"
               if tokenizer.kind == "word" else "is an imported model's own, which this export does not write: "
               "export --format hf and convert that directory with llama.cpp's convert_hf_to_gguf.py")
        raise CheckpointError(f"{source}: a {tokenizer.kind} tokenizer {why}")
    writer.add_token_types(types)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _gguf(dtype: str):
    """The gguf package, once `dtype` is known to be one it writes."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("--format gguf needs the gguf package: pip install gguf") from None
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: GGUF export writes {', '.join(DTYPES)}")
    return gguf


def write_gguf(out: str | Path, weights: dict[str, np.ndarray], m: ModelConfig, tokenizer: Tokenizer,
               dtype: str = "f32", name: str = "hanlm", source: str = "model") -> Path:
    """Write a GPT's float32 state dict `weights` (shape `m`, vocabulary `tokenizer`) as one GGUF file
    `out` with matrices in `dtype`; `source` names the model in errors. Returns `out`."""
    gguf = _gguf(dtype)
    out = Path(out)
    with atomic_path(out) as tmp:  # a failed export leaves no file that looks finished
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name)
        writer.add_context_length(m.context_length)
        writer.add_embedding_length(m.n_embd)
        writer.add_block_count(m.n_layer)
        writer.add_feed_forward_length(mlp_width(m))
        writer.add_head_count(m.n_head)
        writer.add_head_count_kv(m.n_kv_head or m.n_head)
        writer.add_rope_dimension_count(m.n_embd // m.n_head)
        writer.add_rope_freq_base(m.rope_theta)
        writer.add_layer_norm_rms_eps(m.norm_eps)
        writer.add_vocab_size(tokenizer.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        _add_tokenizer(writer, tokenizer, source)
        for tensor, array in gguf_tensors(weights, m).items():
            if array.ndim == 1 or dtype == "f32":
                writer.add_tensor(tensor, array)
            elif dtype == "f16":
                writer.add_tensor(tensor, array.astype(np.float16))
            else:
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(tensor, gguf.quants.quantize(array, q8), raw_dtype=q8)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def beyond_llama(m: ModelConfig) -> list[str]:
    """The model.* keys of a gpt of shape `m` that the llama architecture written here cannot hold (empty:
    it fits)."""
    return [k for k in ("qkv_bias", "qk_norm") if getattr(m, k)] + \
        (["head_dim"] if m.head_dim not in (None, m.n_embd // m.n_head) else []) + \
        (["rope_scaling"] if m.rope_scaling != "none" else [])


def gguf_weights(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The float32 state dict `write_gguf` takes, of the gpt language model in `ckpt` (LoRA updates folded
    in by `open_checkpoint`, tied tensors as the model shares them)."""
    return {k: v.float().numpy() for k, v in model_of(ckpt).state_dict().items()}


def export_gguf(spec: str, out: str | Path, dtype: str = "f32") -> Path:
    """Write the GPT checkpoint `spec` as one GGUF file `out` with matrices in `dtype`; returns it. An `out`
    inside the checkpoint, a directory or anything but a regular file is refused before anything is written
    (`hanlm.export.target`); an existing regular file is replaced once the new one is complete."""
    _gguf(dtype)  # before loading: a wrong --dtype fails at once
    path = resolve_served(spec)
    target = check_output(out, "gguf", path)
    ckpt = require_language_model(open_checkpoint(path))
    m = ckpt.config.model
    if m.arch != "gpt":
        raise CheckpointError(f"{path}: cannot export a {m.arch} model to GGUF: only the gpt architecture has a "
                              "llama form")
    beyond = beyond_llama(m)
    if beyond:
        raise CheckpointError(f"{path}: model.{beyond[0]} is beyond the llama architecture this GGUF export writes; "
                              "export it with --format hf (transformers computes it)")
    try:  # written at the real path: a symlink to a file stays one, its file gets the export
        write_gguf(target.path, gguf_weights(ckpt), ckpt.config.model, ckpt.tokenizer, dtype,
                   name=Path(path).parent.parent.name or "hanlm", source=str(path))
    except OSError as e:
        raise target.failed(e) from None
    return Path(out)
