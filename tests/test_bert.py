"""Importing a Hugging Face BERT (bert-base-chinese, RoBERTa-wwm-ext, MacBERT) as hanlm's `bert` arch: tiny random
models built here with transformers compute the same hidden states and masked-LM logits in hanlm, WordPiece gives
transformers' ids, the export comes back tensor for tensor, and the import fine-tunes for a label and for words."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hanlm.config import load_config
from hanlm.data.corpora import corpus_file
from hanlm.errors import CheckpointError, ConfigError
from hanlm.export.hf import export_hf
from hanlm.loading import load_for_inference, open_checkpoint

transformers = pytest.importorskip("transformers")

QUIET = ["log.progress=false", "log.tensorboard=false"]
TEXTS = ["１２月３１日，中共中央总书记、国家主席江泽民发表１９９８年新年讲话。", "GPT模型 2024 年在Beijing", "新年好😀！",
         "ÉCOLE café"]


def vocabulary(people_daily: list[str]) -> list[str]:
    """A BERT-style vocab.txt: the specials and [unused] rows where BERT has them, the characters of 200
    paragraphs, and a few ASCII WordPieces."""
    chars = sorted({c for text in people_daily[:200] for c in text if not c.isspace()})
    return (["[PAD]", *(f"[unused{i}]" for i in range(1, 4)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
             "gp", "##t", "20", "##24", "be", "##ij", "##ing", "eco", "##le", "ca", "##fe", "!", "."])


def randomised(model) -> None:
    """LayerNorms away from 1 and biases away from 0, so that a wrong mapping of either shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)


def bert_config(vocab_size: int, **extra):
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64, **extra)


@pytest.fixture(scope="module")
def bert_dir(people_daily, tmp_path_factory):
    """A tiny random BertForMaskedLM with a Chinese vocab.txt and no tokenizer.json, as RoBERTa-wwm-ext ships."""
    path = tmp_path_factory.mktemp("bert") / "chinese-bert"
    vocab = vocabulary(people_daily)
    torch.manual_seed(0)
    theirs = transformers.BertForMaskedLM(bert_config(len(vocab))).eval()
    randomised(theirs)
    theirs.save_pretrained(path, safe_serialization=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    return path


def test_an_imported_bert_computes_transformers_hidden_states_logits_and_token_ids(bert_dir, people_daily):
    theirs = transformers.BertForMaskedLM.from_pretrained(bert_dir).eval()
    their_tok = transformers.BertTokenizer.from_pretrained(bert_dir)
    model, cfg, tokenizer = load_for_inference(str(bert_dir))
    assert (cfg.model.arch, cfg.tokenizer.kind, cfg.model.norm_eps) == ("bert", "pretrained", 1e-12)
    assert [tokenizer.token_strings()[i] for i in (tokenizer.start_id, tokenizer.eos_id, tokenizer.mask_id,
                                                   tokenizer.pad_id, tokenizer.unk_id)] == \
        ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"]
    for text in TEXTS + people_daily[-20:]:  # Chinese, ASCII, full-width, emoji, accents, unseen characters
        assert tokenizer.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"], text
    rows = [[tokenizer.start_id, *tokenizer.encode(t)[:30], tokenizer.eos_id] for t in people_daily[:3]]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        assert (model(x[:1, :lengths[0]]) - theirs(x[:1, :lengths[0]]).logits).abs().max() < 1e-4
        ours, hf = model.hidden(x, lengths), theirs.bert(x, attention_mask=attention).last_hidden_state
    for row, n in enumerate(lengths.tolist()):
        assert (ours[row, :n] - hf[row, :n]).abs().max() < 1e-4


def test_a_bert_exports_back_tensor_for_tensor_and_transformers_reads_the_export(bert_dir, tmp_path):
    back = export_hf(str(bert_dir), tmp_path / "again")
    original, again = load_file(str(bert_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    exported = json.loads((back / "config.json").read_text())
    assert (exported["model_type"], exported["architectures"]) == ("bert", ["BertForMaskedLM"])
    reread = transformers.BertForMaskedLM.from_pretrained(back).eval()
    model, _, tokenizer = load_for_inference(str(back))  # now from the exported tokenizer.json
    assert open_checkpoint(str(back)).tokenizer.fingerprint() == open_checkpoint(str(bert_dir)).tokenizer.fingerprint()
    their_tok = transformers.AutoTokenizer.from_pretrained(back)
    x = torch.tensor([[tokenizer.start_id, *tokenizer.encode(TEXTS[0]), tokenizer.eos_id]])
    assert their_tok(TEXTS[0])["input_ids"][1:-1] == x[0, 1:-1].tolist()
    with torch.no_grad():
        assert (model(x) - reread(x).logits).abs().max() < 1e-4


def test_a_bert_model_without_its_head_and_with_tensorflow_names_imports(people_daily, tmp_path, capsys):
    """`BertModel` (no masked-LM head, a pooler) whose LayerNorms are called gamma / beta, as bert-base-chinese's
    converted weights are; its tokenizer.json is what transformers writes for it."""
    vocab = vocabulary(people_daily)
    path = tmp_path / "bert-model"
    torch.manual_seed(1)
    theirs = transformers.BertModel(bert_config(len(vocab))).eval()
    randomised(theirs)
    theirs.save_pretrained(path, safe_serialization=True)
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer(vocab=str(tmp_path / "vocab.txt")).save_pretrained(path)
    assert (path / "tokenizer.json").is_file()
    model, _, tokenizer = load_for_inference(str(path))
    assert "has no masked-LM head" in capsys.readouterr().err
    x = torch.tensor([[tokenizer.start_id, *tokenizer.encode(people_daily[5])[:40], tokenizer.eos_id]])
    with torch.no_grad():
        assert (model.hidden(x) - theirs(x).last_hidden_state).abs().max() < 1e-4


@pytest.mark.parametrize("field, value, message", [
    ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
    ("hidden_act", "relu", "hidden_act='relu'"), ("is_decoder", True, "is_decoder=True"),
    ("num_attention_heads", 5, "must divide hidden_size"), ("type_vocab_size", 0, "type_vocab_size=0")])
def test_what_hanlm_bert_cannot_compute_is_refused_by_field(bert_dir, tmp_path, field, value, message):
    path = tmp_path / "changed"
    path.mkdir()
    for f in bert_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    config = json.loads((bert_dir / "config.json").read_text()) | {field: value}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: .*{message}"):
        open_checkpoint(str(path))


def test_a_pickled_missing_or_misshapen_bert_is_refused_by_name(bert_dir, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        (path / name).write_bytes((bert_dir / name).read_bytes())
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a pickle"):
        open_checkpoint(str(path))
    tensors = load_file(str(bert_dir / "model.safetensors"))
    del tensors["bert.encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lack bert.encoder.layer.1.attention.self.key.bias|lack encoder.layer.1"):
        open_checkpoint(str(path))
    (path / "vocab.txt").write_text("", encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocab.txt: .*empty"):
        open_checkpoint(str(path))


def test_masked_lm_on_an_imported_bert_masks_with_its_mask_token_and_never_its_specials(bert_dir):
    from hanlm.models.masking import Masker

    tokenizer = open_checkpoint(str(bert_dir)).tokenizer
    rows = [[tokenizer.start_id, *tokenizer.encode(t)[:40], tokenizer.eos_id] for t in TEXTS[:2] * 20]
    width = max(len(r) for r in rows)
    x = torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    inputs, targets = Masker(0.5, tokenizer.vocab_size, tokenizer)(x, torch.Generator().manual_seed(0))
    chosen = targets >= 0
    assert chosen.any() and not torch.isin(x[chosen], torch.tensor(sorted(tokenizer.special_ids()))).any()
    assert (inputs == tokenizer.mask_id).sum() > 0.6 * chosen.sum()
    assert ((inputs == tokenizer.mask_id) <= chosen).all()


def test_hanlm_trains_its_own_bert_with_masked_lm_and_refuses_electra(tmp_path):
    from hanlm.train.loop import Trainer

    with pytest.raises(ConfigError, match="train.objective electra pretrains hanlm's own encoder"):
        load_config("tiny", ["model.arch=bert", "train.objective=electra"])
    with pytest.raises(ConfigError, match="model.arch bert reads both sides"):
        load_config("tiny", ["model.arch=bert"])
    with pytest.raises(ConfigError, match="must be divisible by model.n_head"):
        load_config("tiny", ["model.arch=bert", "train.objective=mlm", "model.n_head=3"])
    cfg = load_config("tiny", ["model.arch=bert", "train.objective=mlm", f"train.run_dir={tmp_path / 'run'}",
                               "train.max_steps=3", "train.warmup_steps=1", "eval.every_steps=3",
                               "log.peak_tflops=0.1", *QUIET])
    run = Trainer(cfg, echo=lambda _: None).run()
    assert run.step == 3
    assert load_for_inference(str(tmp_path / "run"))[1].model.arch == "bert"


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_an_imported_bert_fine_tunes_for_a_label_and_for_words(bert_dir, tmp_path, task):
    from hanlm.finetune.run import Finetuner
    from hanlm.loading import load_classifier, load_tagger

    corpus = "chn-reviews" if task == "classify" else "people-daily-1998-tagged"
    with open(corpus_file(corpus), encoding="utf-8") as f:
        lines = f.readlines()
    if task == "tag":
        lines = [json.loads(line)["text"] + "\n" for line in lines]
    data = tmp_path / ("data.jsonl" if task == "classify" else "data.txt")
    data.write_text("".join(lines[::len(lines) // 300][:300]), encoding="utf-8")
    run = tmp_path / "run"
    cfg = load_config("tiny", [f"finetune.task={task}", f"finetune.init_from={bert_dir}", f"finetune.data=[{data}]",
                               f"finetune.run_dir={run}", "finetune.max_length=48", "finetune.micro_batch=16",
                               "finetune.epochs=1", "finetune.pooling=first", *QUIET])
    result = Finetuner(cfg, echo=lambda _: None).run()
    assert result.stopped_by == "end" and result.test is not None
    if task == "classify":
        classifier = load_classifier(str(run))
        assert classifier.config.model.arch == "bert"
        assert classifier.probabilities(["这本书很好看"]).shape == (1, 2)
    else:
        loaded = load_tagger(str(run))
        text = "中共中央总书记、国家主席江泽民发表新年讲话"
        (out,) = loaded.tagger.segment([text])
        assert loaded.config.model.arch == "bert" and "".join(out.words) == text


def test_a_sharded_bert_imports_from_its_index_and_a_missing_shard_is_named(bert_dir, tmp_path):
    whole = transformers.BertForMaskedLM.from_pretrained(bert_dir)
    whole.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    path = tmp_path / "sharded"
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").is_file()
    for name in ("vocab.txt", "tokenizer_config.json"):
        (path / name).write_bytes((bert_dir / name).read_bytes())
    ours, original = open_checkpoint(str(path)).weights, open_checkpoint(str(bert_dir)).weights
    assert ours.keys() == original.keys() and all(torch.equal(ours[k], original[k]) for k in ours)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"names {shards[-1].name}, which is not in"):
        open_checkpoint(str(path))


def test_an_imported_bert_is_evaluated_on_masked_lm_and_refused_by_generation(bert_dir, tmp_path, capsys,
                                                                               people_daily):
    from hanlm.cli import main

    text = tmp_path / "val.txt"
    text.write_text("\n".join(people_daily[:100]) + "\n", encoding="utf-8")
    assert main(["eval", str(bert_dir), "--data", str(text), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"loss", "masked_accuracy", "tokens"} and figures["tokens"] > 100
    assert main(["generate", str(bert_dir), "--prompt", "中国"]) == 2
    assert "Bert: model.arch encoder or bert) reads both sides" in capsys.readouterr().err
