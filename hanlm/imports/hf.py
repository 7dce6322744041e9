"""A Hugging Face directory — a decoder (Llama, Mistral, Qwen2, Qwen3) or a BERT — as a hanlm checkpoint:
`train.init_from`, `hanlm eval`, `generate`, `serve` and `finetune` accept one wherever they accept a checkpoint.

A decoder becomes hanlm's gpt: the mapping is `hanlm.export.hf.hf_state_dict` run backwards; num_key_value_heads,
head_dim, intermediate_size, rope_theta and rms_norm_eps become the model.* keys of the same meaning, Qwen2's qkv
biases model.qkv_bias and Qwen3's QK-norm model.qk_norm. A BERT becomes hanlm's bert (`hanlm.imports.bert`).
What hanlm cannot compute is refused with the config field that says so: other biases, rope scaling, sliding
windows, another activation or position embedding. The tokenizer is the char or BPE form `hanlm export` writes
(hanlm's own kinds), or else the model's own tokenizer.json as it is, with its special tokens where that model put
them (`PretrainedTokenizer`: Qwen's and Llama 3's byte-level BPE, WordPiece, Unigram), or a BERT's vocab.txt.
Weights are read only from safetensors files: a pytorch_model.bin is a pickle, which hanlm never loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hanlm.checkpoint import Checkpoint
from hanlm.config import load_config
from hanlm.data.tokenizer import SPECIAL_TOKENS, BpeTokenizer, CharTokenizer, PretrainedTokenizer, Tokenizer
from hanlm.errors import CheckpointError, DataError
from hanlm.imports.bert import bert_overrides, bert_weights, check_bert


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
                               "Llama (optionally with Qwen2's qkv biases or Qwen3's QK-norm) without sliding windows "
                               "or other biases")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise refuse("model_type", f"hanlm imports {', '.join(FAMILIES)} (as its gpt) and bert")
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
    rope_overrides(config, where)
    wanted = {"mlp_bias": False, "hidden_act": "silu", "use_sliding_window": False}
    if model_type in ("llama", "mistral", "qwen3"):
        wanted["attention_bias"] = False  # theirs adds an output bias too, which hanlm has not
    for field, value in wanted.items():
        if config.get(field, value) != value:
            raise refuse(field, f"hanlm computes {value!r} only")
    if model_type == "mistral" and config.get("sliding_window") not in (None, 0) and \
            config["sliding_window"] < config["max_position_embeddings"]:
        raise refuse("sliding_window", "sliding-window attention is not supported (set it to null, or "
                     "max_position_embeddings to at most the window)")


# transformers' rope scaling parameters → hanlm's model.* keys, and the least each may be.
ROPE_KEYS = {"factor": ("rope_factor", 1.0), "low_freq_factor": ("rope_low_freq_factor", 0.0),
             "high_freq_factor": ("rope_high_freq_factor", 0.0),
             "original_max_position_embeddings": ("rope_original_context", 1)}


def rope_overrides(config: dict[str, Any], where: Path) -> list[str]:
    """The model.rope_* keys of config.json's rope scaling — `rope_scaling` (transformers 4) or
    `rope_parameters` (transformers 5): none, `linear` or `llama3`; any other kind (dynamic NTK, YaRN, LongRoPE)
    is refused by field, as are parameters out of range."""
    field = "rope_scaling" if config.get("rope_scaling") is not None else "rope_parameters"
    params = config.get(field)
    if params is None:
        return []

    def refuse(name: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{where}/config.json: {name}={value!r}: {why}")
    if not isinstance(params, dict):
        raise refuse(field, params, "must be an object")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return []
    if kind not in ("linear", "llama3"):
        raise refuse(f"{field}.rope_type", kind, "hanlm computes the default rotary embedding and the linear and "
                     "llama3 scalings only")
    out = [f"model.rope_scaling={kind}"]
    for name in ["factor"] if kind == "linear" else list(ROPE_KEYS):
        key, least = ROPE_KEYS[name]
        value = params.get(name)
        whole = key == "rope_original_context"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value < least or \
                value <= 0:
            raise refuse(f"{field}.{name}", value, f"must be {'an integer' if whole else 'a number'} of at least "
                         f"{least}, above 0")
        out.append(f"model.{key}={value}")
    if kind == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise refuse(f"{field}.high_freq_factor", params["high_freq_factor"], "must exceed low_freq_factor")
    return out


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


def _read(path: Path) -> SafetensorsFiles:
    """Every tensor of the directory's safetensors files: those model.safetensors.index.json maps (a sharded
    checkpoint, each shard checked to be there), else every model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f and f.endswith(
                ".safetensors") for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to safetensors files in {path}")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names {missing[0]}, which is not in {path}: the checkpoint is incomplete")
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors (pytorch_model.bin is a pickle, which hanlm never "
                              "loads: convert it to safetensors)")
    return SafetensorsFiles(files)


class SafetensorsFiles(Mapping[str, torch.Tensor]):
    """The tensors of safetensors files by name, each read when asked for — from the memory-mapped file — and
    returned in fp32: the import converts one tensor at a time instead of holding the whole checkpoint twice
    (as stored, bf16 in most published models, and as hanlm's fp32)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, Any]] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own types for a damaged file
                raise CheckpointError(f"{f} is damaged ({type(e).__name__}: {e})") from None
            self._where |= {name: (f, handle) for name in handle.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        f, handle = self._where[name]
        try:
            return handle.get_tensor(name).float()
        except Exception as e:
            raise CheckpointError(f"{f}: tensor {name} is damaged ({type(e).__name__}: {e})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


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
        embedding = hf["model.embed_tokens.weight"]
        out = {"tok_emb.weight": embedding, "norm.weight": hf["model.norm.weight"],
               "lm_head.weight": embedding if tied else hf["lm_head.weight"]}
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
    return out


# For a BERT, hanlm's start and end tokens are its [CLS] and [SEP]: tokenizer_config.json's key for each special,
# and the spelling BERT's vocabularies use when it names none.
BERT_SPECIALS = {"pad": ("pad_token", "[PAD]"), "unk": ("unk_token", "[UNK]"), "bos": ("cls_token", "[CLS]"),
                 "eos": ("sep_token", "[SEP]"), "mask": ("mask_token", "[MASK]")}


def _spelled(tokenizer_config: dict[str, Any], key: str) -> str | None:
    token = tokenizer_config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _specials(hf, config: dict[str, Any], tokenizer_config: dict[str, Any]) -> dict[str, int]:
    """The ids of the special tokens (pad, unk, bos, eos, mask; -1 where there is none). A decoder's come from
    config.json's `<name>_token_id` (the first of a list), else tokenizer_config.json's `<name>_token` looked up
    in the vocabulary; a BERT's from `BERT_SPECIALS`. <pad> falls back to <eos>."""
    specials: dict[str, int | None] = {}
    for name in ("pad", "unk", "bos", "eos", "mask"):
        if config.get("model_type") == "bert":
            key, default = BERT_SPECIALS[name]
            specials[name] = hf.token_to_id(_spelled(tokenizer_config, key) or default)
            continue
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            specials[name] = value
            continue
        token = _spelled(tokenizer_config, f"{name}_token")
        specials[name] = hf.token_to_id(token) if token is not None else None
    if specials["eos"] is None:
        raise DataError("neither config.json's eos_token_id nor tokenizer_config.json's eos_token (a BERT's "
                        "sep_token) names the end-of-text token")
    if specials["pad"] is None:
        specials["pad"] = specials["eos"]
    return {n: -1 if v is None else v for n, v in specials.items()}


def wordpiece(vocab_file: Path, lowercase: bool):
    """The `tokenizers` form of a BERT vocab.txt: what transformers' BertTokenizer(Fast) computes — BERT's
    normaliser (Chinese characters split apart, control characters dropped, optionally lowercased and stripped of
    accents), its pre-tokenizer, WordPiece with ## continuations. Where a token is listed twice, its later line
    is its id, as transformers reads the file."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError("vocab.txt is empty")
    vocab = {token: i for i, token in enumerate(lines)}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                               lowercase=lowercase)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    hf.add_special_tokens([t for _, t in BERT_SPECIALS.values() if t in vocab])
    if "[CLS]" in vocab and "[SEP]" in vocab:  # for transformers' users of an export; hanlm adds its own
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return hf


def sentencepiece(model_file: Path):
    """The `tokenizers` form of a sentencepiece `tokenizer.model` (Llama 2's, Mistral's), converted by transformers'
    Llama converter — which reproduces sentencepiece's ids for models that do not normalise text (Llama's
    `identity`, spaces kept); a model that normalises (the default `nmt_nfkc`, or collapsing spaces) is refused
    by that field. Needs the optional
    extra hanlm[sentencepiece] (sentencepiece, transformers)."""
    from tokenizers import decoders, normalizers

    try:
        from sentencepiece import sentencepiece_model_pb2
        from transformers import LlamaTokenizer
    except ImportError:
        raise DataError("reading a sentencepiece tokenizer.model needs pip install 'hanlm[sentencepiece]' "
                        "(sentencepiece and transformers); or save the model's fast tokenizer as tokenizer.json "
                        "with transformers") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    for field, value, kept in (("name", spec.name, spec.name in ("identity", "")),
                               ("remove_extra_whitespaces", spec.remove_extra_whitespaces,
                                not spec.remove_extra_whitespaces)):
        if not kept:
            raise DataError(f"normalizer_spec.{field}={value!r}: the model normalises text, which the conversion "
                            "does not reproduce; save the model's fast tokenizer as tokenizer.json")
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise DataError(f"trainer_spec.model_type={proto.trainer_spec.model_type}: only BPE sentencepiece models "
                        "(Llama's) are converted; save the model's fast tokenizer as tokenizer.json")
    hf = LlamaTokenizer.from_pretrained(str(model_file.parent), legacy=False).backend_tokenizer
    # transformers' Metaspace prepends "▁" only where the text does not already open with a space; sentencepiece's
    # dummy prefix always does. As a normaliser, as the original Llama conversion had it, the ids are sentencepiece's.
    prefix = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    *([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])])
    return hf


def _tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    """hanlm's tokenizer from the directory's tokenizer.json: the char or BPE form `hanlm export` writes (hanlm's
    own kinds, specials at ids 0–3), else the model's own tokenizer as it is (`pretrained`), its special tokens
    from config.json and tokenizer_config.json; without a tokenizer.json, a BERT's WordPiece vocab.txt or a
    sentencepiece tokenizer.model."""
    source = path / "tokenizer.json"
    for other in ("vocab.txt", "tokenizer.model"):
        if not source.is_file() and (path / other).is_file():
            source = path / other
    tokenizer_config = _json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() \
        else {}
    try:
        if source.name == "vocab.txt":
            hf = wordpiece(source, bool(tokenizer_config.get("do_lower_case", True)))
        elif source.name == "tokenizer.model":
            hf = sentencepiece(source)
        else:
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
        return PretrainedTokenizer(hf, _specials(hf, config, tokenizer_config),
                                   max(config["vocab_size"], hf.get_vocab_size()))
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
    """The Hugging Face directory at `path` (a decoder of `FAMILIES`, or a BERT) as a hanlm checkpoint at step 0."""
    where = Path(path)
    config = _json_object(where / "config.json")
    if config.get("model_type") == "bert":
        check_bert(config, str(where))
    else:
        _check(config, where)
    tokenizer = _tokenizer(where, config)
    if tokenizer.vocab_size != config["vocab_size"]:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids, config.json's vocab_size "
                              f"is {config['vocab_size']}")
    # Evaluation reads windows of train.block_size: the model's whole context, up to 1,024 tokens.
    window = f"train.block_size={min(config['max_position_embeddings'], 1024)}"
    if config["model_type"] == "bert":
        cfg = load_config(overrides=[*bert_overrides(config), "train.objective=mlm", f"tokenizer.kind={tokenizer.kind}",
                                     window])
        return Checkpoint(path, cfg, tokenizer, bert_weights(_read(where), config, str(where)), {"step": 0})
    tied = config.get("tie_word_embeddings", True)
    heads, family = config["num_attention_heads"], FAMILIES[config["model_type"]]
    cfg = load_config(overrides=[
        "model.arch=gpt", "model.preset=null", f"model.n_layer={config['num_hidden_layers']}",
        f"model.n_head={heads}", f"model.n_embd={config['hidden_size']}",
        f"model.n_kv_head={config.get('num_key_value_heads', heads)}",
        f"model.head_dim={config.get('head_dim') or config['hidden_size'] // heads}",
        f"model.intermediate_size={config['intermediate_size']}",
        f"model.rope_theta={float(rope_theta(config))}", *rope_overrides(config, where),
        f"model.norm_eps={float(config.get('rms_norm_eps', 1e-5))}",
        f"model.qkv_bias={str(bool(family.get('qkv_bias'))).lower()}",
        f"model.qk_norm={str(bool(family.get('qk_norm'))).lower()}",
        f"model.context_length={config['max_position_embeddings']}", f"model.tie_embeddings={str(tied).lower()}",
        f"tokenizer.kind={tokenizer.kind}", window])
    return Checkpoint(path, cfg, tokenizer, _weights(where, config), {"step": 0})
