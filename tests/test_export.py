"""`hanlm export --format hf|gguf` and importing Hugging Face directories: transformers loads the export and
computes what hanlm computes, and the export comes back as the same model."""

import json

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


def checkpoint(tmp_path, people_daily, kind: str, *overrides: str) -> str:
    """A randomly initialised tiny GPT (untrained weights exercise every row) saved as a checkpoint."""
    cfg = load_config("tiny", [f"tokenizer.kind={kind}", "tokenizer.vocab_size=600", *overrides])
    tokenizer = train_tokenizer(kind, people_daily[:300], vocab_size=600)
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer.vocab_size)
    with torch.no_grad():  # norms away from 1, so a wrong mapping of them shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return save_checkpoint(str(tmp_path / "ckpt"), model, cfg, tokenizer, {"step": 1})


@pytest.mark.parametrize("kind, overrides", [("char", ()), ("bpe", ("model.tie_embeddings=false",))])
def test_transformers_computes_the_logits_ids_and_greedy_text_of_hanlm(tmp_path, people_daily, kind, overrides):
    path = checkpoint(tmp_path, people_daily, kind, *overrides)
    out = export_hf(path, tmp_path / "hf")
    model, cfg, tokenizer = load_for_inference(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(out)
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


def test_models_without_a_llama_form_are_refused_by_name(tmp_path, people_daily, capsys):
    lstm = checkpoint(tmp_path / "l", people_daily, "char", "model.arch=lstm")
    with pytest.raises(CheckpointError, match="cannot export a lstm model"):
        export_hf(lstm, tmp_path / "x")
    word = checkpoint(tmp_path / "w", people_daily, "word")
    assert main(["export", word, str(tmp_path / "y")]) == 2
    assert "a word tokenizer splits text with jieba" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_export_imports_back_to_identical_tensors_and_serves_as_a_checkpoint(tmp_path, people_daily, capsys):
    path = checkpoint(tmp_path, people_daily, "char")
    out = export_hf(path, tmp_path / "hf")
    original, imported = load_checkpoint(path), open_checkpoint(str(out))
    model, _, _ = load_for_inference(path)
    again, cfg, tokenizer = load_for_inference(str(out))
    assert tokenizer.fingerprint() == original.tokenizer.fingerprint()
    assert cfg.model.n_layer == original.config.model.n_layer and imported.step == 0
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["generate", str(out), "--prompt", "中国", "--max-tokens", "5", "--temperature", "0"]) == 0
    imported.tokenizer.save(tmp_path / "tokenizer.json")  # continued training encodes with the model's tokenizer
    run = Trainer(load_config("tiny", [f"train.run_dir={tmp_path / 'run'}", f"train.init_from={out}",
                                       f"tokenizer.path={tmp_path / 'tokenizer.json'}",
                                       "train.max_steps=2", "train.warmup_steps=1", "log.peak_tflops=0.1"]),
                  echo=lambda _: None).run()
    assert run.step == 2


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 1, "grouped-query attention"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_theta", 500000.0, "rope_theta=500000.0"),
    ("model_type", "mistral", "only Llama models"),
    ("intermediate_size", 100, "intermediate_size=100"),
])
def test_what_hanlm_cannot_compute_is_refused_by_field(tmp_path, people_daily, field, value, message):
    out = export_hf(checkpoint(tmp_path, people_daily, "char"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(str(out))


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


@pytest.mark.parametrize("kind, dtype", [("char", "f32"), ("bpe", "f16"), ("char", "q8_0")])
def test_gguf_reads_back_every_tensor_and_key(tmp_path, people_daily, kind, dtype):
    gguf = pytest.importorskip("gguf")
    path = checkpoint(tmp_path, people_daily, kind)
    out = tmp_path / "model.gguf"
    assert main(["export", path, str(out), "--format", "gguf", "--dtype", dtype]) == 0
    reader = gguf.GGUFReader(str(out))
    model, cfg, tokenizer = load_for_inference(path)

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("general.architecture") == "llama" and value("llama.block_count") == cfg.model.n_layer
    assert value("llama.embedding_length") == cfg.model.n_embd and value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.freq_base") == 10000.0 and value("tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == tokenizer.vocab_size and tokens[tokenizer.eos_id] == "<eos>"
    assert value("tokenizer.ggml.model") == ("gpt2" if kind == "bpe" else "llama")
    if kind == "char":
        types = value("tokenizer.ggml.token_type")[4:260]  # the byte-fallback ids are bytes, but for 0x20
        assert types[:0x20] + types[0x21:] == [6] * 255 and tokens[4 + 0x20] == "\u2581"  # (no space here)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.model.n_layer  # tied: no output.weight
    q = weights["blocks.1.attn.qkv.weight"][:cfg.model.n_embd]
    for name, ours in (("token_embd.weight", weights["tok_emb.weight"]), ("blk.1.attn_q.weight", q),
                       ("blk.0.ffn_norm.weight", weights["blocks.0.mlp_norm.weight"])):
        t = tensors[name]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 0.02 * np.abs(ours).max()}[dtype if ours.ndim == 2 else "f32"]
        assert np.abs(theirs - ours).max() <= tolerance, name


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_llama_cpp_computes_hanlm_logits_and_greedy_text_from_the_gguf(tmp_path, people_daily, kind):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional extra hanlm[llamacpp]")
    path = checkpoint(tmp_path, people_daily, kind)
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
