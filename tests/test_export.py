"""`hanlm export --format hf|gguf` and importing Hugging Face directories: transformers loads the export and
computes what hanlm computes, and the export comes back as the same model."""

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from hanlm.checkpoint import load_checkpoint, save_checkpoint
from hanlm.loading import load_for_inference, open_checkpoint
from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import CheckpointError
from hanlm.export.gguf_export import export_gguf
from hanlm.export.hf import export_hf
from hanlm.generate import Generation, generate, prompt_ids
from hanlm.sampling import SamplingParams
from hanlm.models import build_model
from hanlm.train.loop import Trainer

transformers = pytest.importorskip("transformers")

TEXTS = ["１２月３１日，中共中央总书记、国家主席江泽民发表１９９８年新年讲话。", "GPT模型 2024 年在北京", "写<eos>字"]


def checkpoint(tmp_path, people_daily, kind: str, *overrides: str, root: str = "ckpt") -> str:
    """A randomly initialised tiny GPT (untrained weights exercise every row) saved as a checkpoint under
    `tmp_path / root`."""
    cfg = load_config("tiny", [f"tokenizer.kind={kind}", "tokenizer.vocab_size=600", *overrides])
    tokenizer = train_tokenizer(kind, people_daily[:300], vocab_size=600)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong mapping of them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return save_checkpoint(str(tmp_path / root), model, cfg, tokenizer, {"step": 1})


GQA = ("model.n_kv_head=1", "model.rope_theta=500000")  # multi-query attention, Llama 3's rotary base


QWEN2 = ("model.qkv_bias=true", "model.n_kv_head=1", "model.norm_eps=1e-6")
QWEN3 = ("model.qk_norm=true", "model.head_dim=48", "model.intermediate_size=100", "model.rope_theta=1000000")


@pytest.mark.parametrize("kind, overrides", [("char", ()), ("bpe", ("model.tie_embeddings=false",)), ("char", GQA),
                                             ("char", QWEN2), ("bpe", QWEN3)],
                         ids=["llama-char", "llama-bpe-untied", "gqa", "qwen2", "qwen3"])
def test_transformers_computes_the_logits_ids_and_greedy_text_of_hanlm(tmp_path, people_daily, kind, overrides):
    path = checkpoint(tmp_path, people_daily, kind, *overrides)
    out = export_hf(path, tmp_path / "hf")
    model, cfg, tokenizer = load_for_inference(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # transformers 5 gives model_type qwen2 its own Qwen2Tokenizer whatever tokenizer_config.json names
    tokenizer_class = transformers.PreTrainedTokenizerFast if cfg_of(path).qkv_bias else transformers.AutoTokenizer
    their_tok = tokenizer_class.from_pretrained(out)
    texts = TEXTS + people_daily[-20:]
    for text in texts:  # val text, ASCII, full-width digits, a spelled special token
        ids = tokenizer.encode(text)
        assert their_tok(text)["input_ids"] == ids, text
        assert their_tok.decode(ids) == tokenizer.decode(ids)
    batch = torch.tensor([tokenizer.encode(t)[:24] for t in people_daily[:4] if len(tokenizer.encode(t)) >= 24][:3])
    with torch.no_grad():
        ours, hf = model(batch), theirs(batch).logits
    assert ours.shape == hf.shape and (ours - hf).abs().max() < 1e-4
    result = Generation()
    "".join(generate(model, tokenizer, "中国经济", SamplingParams(max_tokens=20, temperature=0.0), result=result))
    prompt = prompt_ids(tokenizer, "中国经济")
    their = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.pad_id)
    assert len(result.token_ids) > 0 and their[0, len(prompt):].tolist()[:len(result.token_ids)] == result.token_ids


def cfg_of(path: str):
    return load_checkpoint(path).config.model


SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def hf_decoder(tmp_path, people_daily, name: str, config_class, randomise: bool = False, **config):
    """A tiny random transformers decoder (`config_class` of SHAPE updated by `config`) saved under tmp_path / name
    with the tokenizer files of a hanlm char export beside it; returns (its directory, the model in eval mode)."""
    tokens = export_hf(checkpoint(tmp_path, people_daily, "char", root="tok"), tmp_path / "tok-hf")
    vocab = json.loads((tokens / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config_class(vocab_size=vocab, **(SHAPE | config))).eval()
    if randomise:
        with torch.no_grad():
            for key, p in theirs.named_parameters():
                if "norm" in key:
                    p.uniform_(0.5, 1.5)
                elif key.endswith("bias"):
                    p.uniform_(-0.5, 0.5)
    theirs.save_pretrained(tmp_path / name, safe_serialization=True)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name / file).write_bytes((tokens / file).read_bytes())
    return tmp_path / name, theirs


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_a_transformers_model_of_each_family_imports_computes_the_same_and_exports_back_exactly(tmp_path, people_daily,
                                                                                                family):
    from safetensors.torch import load_file

    config_class, extra = {"qwen2": (transformers.Qwen2Config, {}), "qwen3": (transformers.Qwen3Config, {"head_dim": 24}),
                           "mistral": (transformers.MistralConfig, {"sliding_window": None})}[family]
    _, theirs = hf_decoder(tmp_path, people_daily, family, config_class, randomise=True, rms_norm_eps=1e-6,
                           rope_theta=1e6, tie_word_embeddings=family != "mistral", **extra)
    model, cfg, tokenizer = load_for_inference(str(tmp_path / family))
    assert (cfg.model.n_kv_head, cfg.model.qkv_bias, cfg.model.qk_norm) == (2, family == "qwen2", family == "qwen3")
    batch = torch.tensor([tokenizer.encode(t)[:24] for t in people_daily[:40] if len(tokenizer.encode(t)) >= 24][:3])
    with torch.no_grad():
        assert (model(batch) - theirs(batch).logits).abs().max() < 1e-4
    result = Generation()
    "".join(generate(model, tokenizer, "中国经济", SamplingParams(max_tokens=12, temperature=0.0), result=result))
    prompt = prompt_ids(tokenizer, "中国经济")
    their = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert len(result.token_ids) > 0 and their[0, len(prompt):].tolist()[:len(result.token_ids)] == result.token_ids
    back = export_hf(str(tmp_path / family), tmp_path / f"{family}-again")
    original, again = load_file(str(tmp_path / family / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    exported = json.loads((back / "config.json").read_text())
    assert exported["model_type"] == ("llama" if family == "mistral" else family)  # Mistral without a window is Llama


@pytest.mark.parametrize("task", ["classify", "ner"])
def test_an_imported_qwen2_fine_tunes_with_lora_for_a_label_and_for_entities(tmp_path, people_daily, task):
    from hanlm.data.corpora import corpus_file
    from hanlm.finetune.run import Finetuner
    from hanlm.loading import load_classifier, load_entity_tagger

    hf_decoder(tmp_path, people_daily, "qwen2", transformers.Qwen2Config)
    corpus = "chn-reviews" if task == "classify" else "people-daily-1998-ner"
    with open(corpus_file(corpus), encoding="utf-8") as f:
        lines = f.readlines()
    (tmp_path / "data.jsonl").write_text("".join(lines[::len(lines) // 400][:400]), encoding="utf-8")
    run = tmp_path / "run"
    cfg = load_config("tiny", [f"finetune.task={task}", f"finetune.init_from={tmp_path / 'qwen2'}",
                               f"finetune.data=[{tmp_path / 'data.jsonl'}]", f"finetune.run_dir={run}",
                               "finetune.max_length=64", "finetune.micro_batch=16", "finetune.epochs=1",
                               "finetune.lora_rank=4", "log.progress=false", "log.tensorboard=false"])
    result = Finetuner(cfg, echo=lambda _: None).run()
    assert result.stopped_by == "end" and result.test is not None
    if task == "classify":
        classifier = load_classifier(str(run))
        assert classifier.config.model.qkv_bias and classifier.config.finetune.lora_rank == 4
        assert classifier.probabilities(["这本书很好看"]).shape == (1, 2)
    else:
        tagger, ner_cfg, _ = load_entity_tagger(str(run))
        assert tagger.kind == "neural" and ner_cfg.model.n_kv_head == 2
        (found,) = tagger.entities(["江泽民主席在北京会见新华社记者"])
        assert all(0 <= e.start < e.end <= 15 for e in found)


def test_a_model_with_its_own_tokenizer_imports_generates_trains_and_exports_it_back(tmp_path, people_daily):
    """A Qwen-like directory: byte-level BPE whose special tokens come after the vocabulary (<|endoftext|> at
    600), an embedding padded past the tokenizer, no <pad> <unk> <bos> <eos> at 0–3."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(people_daily[:300], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    size = hf.get_vocab_size()
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model_dir = tmp_path / "qwen-like"
    model_dir.mkdir()
    hf.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=size + 8, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=size, bos_token_id=None,
        pad_token_id=None)).eval()
    theirs.save_pretrained(model_dir, safe_serialization=True)
    model, cfg, tokenizer = load_for_inference(str(model_dir))
    assert (cfg.tokenizer.kind, tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id,
            tokenizer.vocab_size) == ("pretrained", size, size, -1, -1, size + 8)
    assert tokenizer.token_strings()[size + 5] == f"<unused:{size + 5}>"
    their_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    for text in TEXTS[:2] + people_daily[-5:]:
        assert their_tok(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert size not in tokenizer.encode("写<|endoftext|>字")  # a special's spelling in text stays text
    batch = torch.tensor([[size, *tokenizer.encode(people_daily[0])[:20]]])
    with torch.no_grad():
        assert (model(batch) - theirs(batch).logits).abs().max() < 1e-4
    result = Generation()
    "".join(generate(model, tokenizer, "中国经济", SamplingParams(max_tokens=10, temperature=0.0), result=result))
    prompt = prompt_ids(tokenizer, "中国经济")
    assert prompt[0] == size
    ids = torch.tensor([prompt])  # the prompt opens with <|endoftext|>, the pad token too: say it is not padding
    their = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=size)
    assert their[0, len(prompt):].tolist()[:len(result.token_ids)] == result.token_ids
    back = export_hf(str(model_dir), tmp_path / "back")
    exported = json.loads((back / "tokenizer_config.json").read_text())
    assert exported["eos_token"] == exported["pad_token"] == "<|endoftext|>" and "bos_token" not in exported
    assert json.loads((back / "config.json").read_text())["bos_token_id"] is None
    assert open_checkpoint(str(back)).tokenizer.fingerprint() == tokenizer.fingerprint()
    tokenizer.save(tmp_path / "tokenizer.json")  # continued training encodes with the model's own tokenizer
    run = Trainer(load_config("tiny", [f"train.run_dir={tmp_path / 'run'}", f"train.init_from={model_dir}",
                                       f"tokenizer.path={tmp_path / 'tokenizer.json'}", "model.n_kv_head=2",
                                       "model.n_head=4", "model.n_embd=64", "model.intermediate_size=96",
                                       "model.qkv_bias=true", "model.norm_eps=1e-6", "model.rope_theta=1000000",
                                       "train.max_steps=2", "train.warmup_steps=1", "log.peak_tflops=0.1"]),
                  echo=lambda _: None).run()
    assert run.step == 2


def test_models_without_a_llama_form_are_refused_by_name(tmp_path, people_daily, capsys):
    lstm = checkpoint(tmp_path / "l", people_daily, "char", "model.arch=lstm")
    with pytest.raises(CheckpointError, match="cannot export a lstm model"):
        export_hf(lstm, tmp_path / "x")
    word = checkpoint(tmp_path / "w", people_daily, "word")
    assert main(["export", word, str(tmp_path / "y")]) == 2
    assert "a word tokenizer splits text with jieba" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("overrides", [(), GQA], ids=["mha", "gqa"])
def test_an_export_imports_back_to_identical_tensors_and_serves_as_a_checkpoint(tmp_path, people_daily, capsys,
                                                                               overrides):
    path = checkpoint(tmp_path, people_daily, "char", *overrides)
    out = export_hf(path, tmp_path / "hf")
    original, imported = load_checkpoint(path), open_checkpoint(str(out))
    model, _, _ = load_for_inference(path)
    again, cfg, tokenizer = load_for_inference(str(out))
    assert tokenizer.fingerprint() == original.tokenizer.fingerprint()
    assert cfg.model.n_layer == original.config.model.n_layer and imported.step == 0
    shape = ("n_kv_head", "rope_theta")
    assert [getattr(cfg.model, k) or 2 for k in shape] == [getattr(original.config.model, k) or 2 for k in shape]
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["generate", str(out), "--prompt", "中国", "--max-tokens", "5", "--temperature", "0"]) == 0
    imported.tokenizer.save(tmp_path / "tokenizer.json")  # continued training encodes with the model's tokenizer
    run = Trainer(load_config("tiny", [f"train.run_dir={tmp_path / 'run'}", f"train.init_from={out}",
                                       f"tokenizer.path={tmp_path / 'tokenizer.json'}", *overrides,
                                       "train.max_steps=2", "train.warmup_steps=1", "log.peak_tflops=0.1"]),
                  echo=lambda _: None).run()
    assert run.step == 2


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 3, "num_key_value_heads=3: must be a positive integer that divides"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_theta", -1, "rope_theta=-1"),
    ("rope_theta", "big", "rope_theta='big'"),
    ("rope_scaling", {"rope_type": "longrope", "factor": 8.0}, "rope_scaling.rope_type='longrope'"),
    ("model_type", "gpt2", "model_type='gpt2': hanlm imports llama, mistral, qwen2, qwen3 .as its gpt. and bert"),
    ("intermediate_size", True, "intermediate_size=True: must be a positive integer"),
    ("head_dim", 15, "head_dim=15: must be an even integer"),
    ("use_sliding_window", True, "use_sliding_window=True"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ({"model_type": "mistral", "sliding_window": 64}, None, "sliding_window=64: sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}}, None,
     "rope_parameters.rope_type='yarn': hanlm computes the default rotary embedding and the linear and llama3"),
])
def test_what_hanlm_cannot_compute_is_refused_by_field(tmp_path, people_daily, field, value, message):
    out = export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | (field if isinstance(field, dict) else {field: value})))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(out))


def test_gguf_refuses_what_the_llama_architecture_cannot_hold(tmp_path, people_daily, capsys):
    pytest.importorskip("gguf")
    path = checkpoint(tmp_path, people_daily, "char", *QWEN2)
    assert main(["export", path, str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    assert "model.qkv_bias is beyond the llama architecture" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, people_daily):
    out = export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="mlp"):
        load_for_inference(str(out))


def test_a_damaged_or_pickled_hf_directory_is_refused(tmp_path, people_daily):
    out = export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf")
    (out / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        open_checkpoint(str(out))
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="never loads"):
        open_checkpoint(str(out))
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a tokenizer hanlm can use"):
        open_checkpoint(str(out))


@pytest.mark.parametrize("kind, dtype, overrides", [("char", "f32", ()), ("bpe", "f16", ()), ("char", "q8_0", ()),
                                                     ("char", "f32", GQA)])
def test_gguf_reads_back_every_tensor_and_key(tmp_path, people_daily, kind, dtype, overrides):
    gguf = pytest.importorskip("gguf")
    path = checkpoint(tmp_path, people_daily, kind, *overrides)
    out = tmp_path / "model.gguf"
    assert main(["export", path, str(out), "--format", "gguf", "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(str(out))
    model, cfg, tokenizer = load_for_inference(path)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama" and value("llama.block_count") == cfg.model.n_layer
    kv_heads = cfg.model.n_kv_head or cfg.model.n_head
    assert value("llama.embedding_length") == cfg.model.n_embd and value("llama.attention.head_count_kv") == kv_heads
    assert value("llama.rope.freq_base") == cfg.model.rope_theta
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.eos_id] == "<eos>"
    assert value("tokenizer.ggml.model") == ("gpt2" if kind == "bpe" else "llama")
    if kind == "char":
        types = value("tokenizer.ggml.token_type")[4:260]  # the byte-fallback ids are bytes, but for 0x20
        assert types[:0x20] + types[0x21:] == [6] * 255 and tokens[4 + 0x20] == "\u2581"  # (no space here)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.model.n_layer  # tied: no output.weight
    head_dim = cfg.model.n_embd // cfg.model.n_head
    q, k = np.split(weights["blocks.1.attn.qkv.weight"], [cfg.model.n_embd, cfg.model.n_embd + kv_heads * head_dim])[:2]
    for name, ours in (("token_embd.weight", weights["tok_emb.weight"]), ("blk.1.attn_q.weight", q),
                       ("blk.1.attn_k.weight", k),
                       ("blk.0.ffn_norm.weight", weights["blocks.0.mlp_norm.weight"])):
        t = tensors[name]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 0.02 * np.abs(ours).max()}[dtype if ours.ndim == 2 else "f32"]
        assert np.abs(theirs - ours).max() <= tolerance, name


@pytest.mark.parametrize("kind, overrides", [("char", ()), ("bpe", ()), ("char", GQA)])
def test_llama_cpp_computes_hanlm_logits_and_greedy_text_from_the_gguf(tmp_path, people_daily, kind, overrides):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional extra hanlm[llamacpp]")
    path = checkpoint(tmp_path, people_daily, kind, *overrides)
    out = export_gguf(path, tmp_path / "model.gguf")
    model, _, tokenizer = load_for_inference(path)
    llm = llama_cpp.Llama(str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    for text in ["中国经济发展", "GPT模型 2024 年", people_daily[-1][:40]]:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        llm.reset()
        llm.eval(prompt_ids(tokenizer, text))
        theirs = torch.tensor(np.asarray(llm.scores[:llm.n_tokens]))
        with torch.no_grad():
            ours = model(torch.tensor([prompt_ids(tokenizer, text)]))[0]
        assert (ours - theirs).abs().max() < 1e-3, text
    result = Generation()
    "".join(generate(model, tokenizer, "中国经济", SamplingParams(max_tokens=20, temperature=0.0), result=result))
    llm.reset()
    greedy = []
    for token in llm.generate(prompt_ids(tokenizer, "中国经济"), temp=0.0, top_k=1):
        greedy.append(token)
        if len(greedy) == len(result.token_ids):
            break
    assert greedy == result.token_ids


# Hostile outputs (issue 29): nothing an export is pointed at is destroyed, and every refusal is a hanlm error
# (exit 2, one line on stderr, no traceback) that names the path and says what to give instead.

def contents(directory) -> dict[str, str]:
    """Every file under `directory` by its relative path → sha256: what must not change."""
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *message: str) -> str:
    """Run `hanlm ARGV`, expect the exit status 2 and each of `message` in its one-line error; returns it."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("hanlm: error: ") and "Traceback" not in err, err
    for part in message:
        assert part in err, (part, err)
    return err


def test_an_export_onto_or_into_its_own_checkpoint_is_refused(tmp_path, people_daily, capsys):
    step = checkpoint(tmp_path, people_daily, "char", root="run/checkpoints")
    run, root = str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")
    before = contents(run)
    os.symlink(step, tmp_path / "alias")
    for argv, why in [
        ([step, step], "is the checkpoint being exported"),  # 1: the hostile tester's `export STEP STEP`
        ([step, step, "--force"], "is the checkpoint being exported"),
        ([step, str(tmp_path / "alias"), "--force"], "is the checkpoint being exported"),  # through a symlink
        ([run, run, "--force"], "contains the checkpoint being exported"),  # a run directory, resolved
        ([root, root, "--force"], "contains the checkpoint being exported"),
        ([run, f"{step}/hf"], "lies inside the checkpoint being exported"),
        ([step, f"{step}/model.safetensors", "--format", "gguf"], "lies inside"),  # 2
        ([step, f"{step}/config.yaml", "--format", "gguf"], "lies inside"),
        ([run, f"{tmp_path}/alias/model.safetensors", "--format", "gguf"], "lies inside"),
        ([step, step, "--format", "gguf"], "is the checkpoint being exported"),
    ]:
        err = refused(capsys, ["export", *argv], f"export OUT {argv[1]} ", why, step, "give an OUT outside")
        assert err.count("\n") == 1
    assert contents(run) == before
    assert load_checkpoint(step).step == 1  # loads and verifies against its manifest


def test_a_hugging_face_input_is_protected_as_well(tmp_path, people_daily, capsys):
    hf = str(export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf"))
    before = contents(hf)
    refused(capsys, ["export", hf, hf, "--force"], "is the checkpoint being exported")
    refused(capsys, ["export", hf, f"{hf}/model.safetensors", "--format", "gguf"], "lies inside the checkpoint")
    assert contents(hf) == before and open_checkpoint(hf).step == 0


def test_a_directory_that_holds_anything_is_replaced_only_with_force(tmp_path, people_daily, capsys):
    step = checkpoint(tmp_path, people_daily, "char")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(capsys, ["export", step, str(out)], f"export OUT {out} is a directory that is not empty (notes.txt)",
            "add --force to replace it")  # 3
    assert contents(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert main(["export", step, str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and open_checkpoint(str(out)).step == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    assert load_checkpoint(step).step == 1


def test_an_empty_directory_is_written_into_where_it_is(tmp_path, people_daily, capsys):
    step = checkpoint(tmp_path, people_daily, "char")
    out = tmp_path / "mounted"  # an empty directory stays itself (a mount point cannot be renamed)
    out.mkdir()
    inode = out.stat().st_ino
    assert main(["export", step, str(out)]) == 0
    assert out.stat().st_ino == inode and open_checkpoint(str(out)).step == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_failed_forced_export_leaves_the_old_directory(tmp_path, people_daily, capsys, monkeypatch):
    step = checkpoint(tmp_path, people_daily, "char")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hanlm.export.hf.save_file", full)
    refused(capsys, ["export", step, str(out), "--force"], f"export OUT {out}: cannot write there: No space left",
            "nothing that was there before has been replaced")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_device_nodes_fifos_and_links_to_them_are_never_replaced(tmp_path, people_daily, capsys):
    step = checkpoint(tmp_path, people_daily, "char")
    if os.path.exists("/dev/full"):  # 4: the atomic rename would put a regular file in the device's place
        refused(capsys, ["export", step, "/dev/full", "--format", "gguf"],
                "export OUT /dev/full is a character device, not a regular file")
        refused(capsys, ["export", step, "/dev/full", "--force"], "is a character device, not a directory")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "link")
    refused(capsys, ["export", step, str(fifo), "--format", "gguf"], "is a FIFO (named pipe), not a regular file")
    refused(capsys, ["export", step, str(tmp_path / "link"), "--format", "gguf"], f"(a symlink to {fifo}) is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(tmp_path / "link")
    assert load_checkpoint(step).step == 1


def test_impossible_output_paths_are_refused_by_name(tmp_path, people_daily, capsys, monkeypatch):
    step = checkpoint(tmp_path, people_daily, "char")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    under = f"export OUT {afile}/x.gguf: {afile} is a regular file, not a directory"
    refused(capsys, ["export", step, f"{afile}/x.gguf", "--format", "gguf"], under)  # 5
    refused(capsys, ["export", step, f"{afile}/deeper/x.gguf", "--format", "gguf"], f"{afile} is a regular file")
    refused(capsys, ["export", step, f"{afile}/hf"], f"{afile} is a regular file, not a directory")
    refused(capsys, ["export", step, str(afile)], f"export OUT {afile} is a regular file, not a directory",
            "use --format gguf")
    (tmp_path / "adir").mkdir()
    refused(capsys, ["export", step, str(tmp_path / "adir"), "--format", "gguf"], "is a directory, but --format "
            f"gguf writes one file: give a file path, e.g. {tmp_path}/adir/model.gguf")
    refused(capsys, ["export", step, "s3://bucket/model.gguf", "--format", "gguf"], "writes local files only")
    assert afile.read_text() == "keep"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty OUT used to write the export into the current directory
    refused(capsys, ["export", step, ""], "export OUT is empty ('')")
    refused(capsys, ["export", step, "", "--format", "gguf"], "export OUT is empty ('')", "e.g. model.gguf")
    assert list(cwd.iterdir()) == [] and load_checkpoint(step).step == 1


def test_a_gguf_replaces_a_regular_file_and_writes_through_a_link_to_one(tmp_path, people_daily, capsys):
    pytest.importorskip("gguf")
    step = checkpoint(tmp_path, people_daily, "char")
    old = tmp_path / "old.gguf"
    old.write_text("an older export")
    os.symlink(old, tmp_path / "current.gguf")
    assert main(["export", step, str(tmp_path / "current.gguf"), "--format", "gguf"]) == 0
    assert os.path.islink(tmp_path / "current.gguf") and old.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_a_llama_with_rope_scaling_imports_computes_the_same_and_exports_it_back(tmp_path, people_daily, scaling):
    _, theirs = hf_decoder(tmp_path, people_daily, "llama3", transformers.LlamaConfig, rope_theta=500000.0,
                           rope_scaling=scaling)
    model, cfg, tokenizer = load_for_inference(str(tmp_path / "llama3"))
    assert (cfg.model.rope_scaling, cfg.model.rope_factor) == (scaling["rope_type"], scaling["factor"])
    batch = torch.tensor([[3, *tokenizer.encode(people_daily[1])[:100]]])  # past the original 32 positions
    with torch.no_grad():
        assert (model(batch) - theirs(batch).logits).abs().max() < 1e-4
    back = export_hf(str(tmp_path / "llama3"), tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        assert (again(batch).logits - theirs(batch).logits).abs().max() < 1e-5
    with pytest.raises(CheckpointError, match="model.rope_scaling is beyond the llama architecture"):
        export_gguf(str(tmp_path / "llama3"), tmp_path / "x.gguf")


@pytest.mark.parametrize("params, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_parameters.rope_type='yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type='dynamic'"),
    ({"rope_type": "linear", "factor": 0.5}, r"rope_parameters.factor=0.5: must be a number of at least 1"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 32}, "rope_parameters.high_freq_factor=1.0: must exceed"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_parameters.low_freq_factor=None")])
def test_rope_scalings_hanlm_cannot_compute_are_refused_by_field(tmp_path, people_daily, params, message):
    out = export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config |= {"rope_scaling": None, "rope_parameters": {"rope_theta": 10000.0, **params}}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(out))


def sentencepiece_model(tmp_path, people_daily, **options) -> Path:
    """A sentencepiece BPE model trained on People's Daily, Llama 2's settings unless `options` say otherwise: no
    normalisation, spaces kept, bytes for what the vocabulary lacks."""
    spm = pytest.importorskip("sentencepiece")
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "train.txt").write_text("\n".join(people_daily[:1500]), encoding="utf-8")
    settings = dict(vocab_size=3000, model_type="bpe", byte_fallback=True, character_coverage=0.995,
                    normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2) | options
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"), **settings)
    return tmp_path / "spm.model"


def test_a_llama_with_only_a_sentencepiece_tokenizer_model_imports_with_sentencepieces_ids(tmp_path, people_daily):
    spm = pytest.importorskip("sentencepiece")
    model_file = sentencepiece_model(tmp_path, people_daily)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=3000, **(SHAPE | {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}))).eval()
    directory = tmp_path / "llama2-like"
    theirs.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.model").write_bytes(model_file.read_bytes())
    model, cfg, tokenizer = load_for_inference(str(directory))
    assert (cfg.tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == ("pretrained", 1, 2, 2)
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    for text in TEXTS + ["新年好😀！", " two  spaces\\nand a newline", "ÉCOLE"] + people_daily[-10:]:
        assert tokenizer.encode(text) == processor.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == processor.decode(processor.encode(text))
    batch = torch.tensor([[1, *tokenizer.encode(people_daily[3])[:40]]])
    with torch.no_grad():
        assert (model(batch) - theirs(batch).logits).abs().max() < 1e-4
    nfkc = tmp_path / "nfkc"
    nfkc.mkdir()
    for f in ("config.json", "model.safetensors"):
        (nfkc / f).write_bytes((directory / f).read_bytes())
    (nfkc / "tokenizer.model").write_bytes(
        sentencepiece_model(tmp_path / "n", people_daily, normalization_rule_name="nmt_nfkc").read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer.model: .*normalizer_spec.name='nmt_nfkc'"):
        open_checkpoint(str(nfkc))
    (nfkc / "tokenizer.model").write_bytes(b"\x0a\xff not a sentencepiece model")
    with pytest.raises(CheckpointError, match="tokenizer.model: not a tokenizer hanlm can use"):
        open_checkpoint(str(nfkc))
