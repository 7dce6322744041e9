"""BPE-dropout (tokenizer.bpe_dropout): varied segmentations that decode exactly, the train split's copies that
prepare writes, the loader reading copy e mod K in epoch e and resuming exactly, and what is refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_prepare import documents_of

from hanlm.config import load_config
from hanlm.data.loader import BatchLoader
from hanlm.data.prepare import prepare, settings_hash
from hanlm.data.shards import dropout_split, open_split, open_train_copies
from hanlm.data.tokenizer import BpeTokenizer, CharTokenizer, train_tokenizer
from hanlm.errors import ConfigError, DataError
from hanlm.state_file import load_state, save_state

COPIES = 3


@pytest.fixture(scope="module")
def bpe(people_daily) -> BpeTokenizer:
    return train_tokenizer("bpe", people_daily[:300], vocab_size=400)


@pytest.fixture(scope="module")
def dropout_cfg(tmp_path_factory, people_daily):
    src = tmp_path_factory.mktemp("dropout-source") / "pd.txt"
    src.write_text("\n".join(people_daily[:300]) + "\n", encoding="utf-8")
    return load_config(None, [f"data.source={src}", "tokenizer.kind=bpe", "tokenizer.vocab_size=400",
                              "tokenizer.bpe_dropout=0.2", f"tokenizer.dropout_copies={COPIES}", "data.num_workers=1"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, dropout_cfg):
    return prepare(dropout_cfg, tmp_path_factory.mktemp("dropout") / "out", progress=False)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_varies_the_segmentation_and_every_one_decodes_exactly(bpe, people_daily, p):
    text = people_daily[0][:200]
    bpe.encode(text)  # a plain encoding first: nothing it leaves behind may stand in for a dropout one
    dropped = bpe.with_dropout(p)
    encodings = [dropped.encode(text) for _ in range(10)] + dropped.encode_batch([text] * 5)
    assert len({tuple(ids) for ids in encodings}) >= 2
    for ids in encodings:
        assert dropped.decode(ids) == bpe.decode(ids) == text
        assert all(0 <= i < bpe.vocab_size for i in ids)
    assert min(map(len, encodings)) >= len(bpe.encode(text))  # skipped merges only ever add tokens
    assert bpe.with_dropout(p).fingerprint() != bpe.fingerprint() and bpe.with_dropout(p).vocab_size == bpe.vocab_size


def test_zero_dropout_is_the_plain_encoding(bpe, people_daily):
    plain = bpe.with_dropout(0.0)
    for text in people_daily[:20]:
        assert plain.encode(text) == bpe.encode(text)


def test_dropout_is_not_bypassed_by_ignore_merges(bpe):
    # A whole-word token: with ignore_merges, a `tokenizers` version that looks a word up whole before merging
    # would never drop a merge inside it (0.23 drops them anyway; with_dropout turns it off whatever the version).
    words = [w for i in range(bpe.vocab_size) if "\ufffd" not in (w := bpe.decode([i])) and bpe.encode(w) == [i]]
    word = max(words, key=lambda w: (len(w.encode()), w))
    assert len(word.encode()) >= 3
    data = json.loads(bpe.hf.to_str())
    data["model"]["ignore_merges"] = True
    ignoring = BpeTokenizer.from_dict({"kind": "bpe", "format": 1, "hf": data})
    dropped = ignoring.with_dropout(0.5)
    assert len({tuple(dropped.encode(word)) for _ in range(40)}) >= 2


def test_prepare_writes_copies_that_decode_to_the_train_split(prepared, dropout_cfg):
    meta, directory = prepared.meta, prepared.directory
    names = [dropout_split(k) for k in range(1, COPIES + 1)]
    assert [s for s in meta["splits"] if s.startswith("train-dropout")] == names
    assert meta["bpe_dropout"] == {"p": 0.2, "copies": COPIES}
    train_docs = documents_of(directory, "train")
    plain = np.asarray(open_split(directory, "train"))
    copies = [np.asarray(c) for c in open_train_copies(directory)]
    assert len(copies) == COPIES
    for name, ids in zip(names, copies):
        entry = meta["splits"][name]
        assert entry["tokens"] == len(ids) > len(plain)  # skipped merges: more, shorter tokens
        assert entry["documents"] == meta["splits"]["train"]["documents"]
        assert entry["characters"] == meta["splits"]["train"]["characters"]
        assert documents_of(directory, name) == train_docs
    assert len({c.tobytes() for c in copies}) == COPIES  # each segments the train split its own way
    assert "3 more encodings" in prepared.summary()
    again = prepare(dropout_cfg, directory, progress=False)  # the stored copies are reused, not drawn anew
    assert again.reused and again.meta == meta


def test_settings_hash_changes_only_when_dropout_is_on():
    default = load_config("default")
    # Pinned before these keys existed: prepared directories (and their names) stay valid.
    assert settings_hash(default) == "71b330c884b6"
    assert settings_hash(load_config("default", ["tokenizer.dropout_copies=9"])) == "71b330c884b6"
    on = settings_hash(load_config("default", ["tokenizer.kind=bpe", "tokenizer.bpe_dropout=0.1"]))
    assert on != "71b330c884b6"
    assert settings_hash(load_config("default", ["tokenizer.kind=bpe", "tokenizer.bpe_dropout=0.1",
                                                 "tokenizer.dropout_copies=9"])) != on


def test_a_training_run_reads_the_plain_train_split_where_there_are_no_copies(tmp_path, dropout_cfg):
    out = prepare(load_config(None, [f"data.source={dropout_cfg.data.source[0]}", "tokenizer.kind=char"]),
                  tmp_path / "out", progress=False).directory
    (only,) = open_train_copies(out)
    assert np.array_equal(np.asarray(only), np.asarray(open_split(out, "train")))


T, B = 16, 4


def test_the_loader_reads_copy_e_mod_k_in_epoch_e(prepared):
    copies = open_train_copies(prepared.directory)
    loader = BatchLoader(copies, T, B, shuffle=False)
    for epoch in range(2 * COPIES + 1):
        copy = copies[epoch % COPIES]
        assert loader.epoch == epoch and loader.tokens is copy
        assert loader.num_windows == (len(copy) - 1) // T
        batches = list(loader.epoch_batches())
        assert len(batches) == loader_batches(copy)
        x, y = batches[0]
        assert torch.equal(x[0], torch.from_numpy(np.asarray(copy[:T], dtype=np.int64)))
        assert torch.equal(y[0], torch.from_numpy(np.asarray(copy[1 : T + 1], dtype=np.int64)))


def loader_batches(copy) -> int:
    return (len(copy) - 1) // T // B


@pytest.mark.parametrize("epoch", [1, COPIES + 2])
def test_the_loader_over_copies_resumes_exactly_mid_epoch(prepared, tmp_path, epoch):
    copies = open_train_copies(prepared.directory)
    args = dict(block_size=T, micro_batch=B, rank=1, world_size=2, seed=5)
    uninterrupted = BatchLoader(copies, **args)
    while uninterrupted.epoch < epoch:
        uninterrupted.next_batch()
    for _ in range(uninterrupted.batches_per_epoch // 2):
        uninterrupted.next_batch()
    # Through the state file training writes.
    save_state({"loader": uninterrupted.state_dict()}, tmp_path / "state.safetensors")
    state = load_state(tmp_path / "state.safetensors")["loader"]
    assert state["copy_tokens"] == [len(c) for c in copies]

    resumed = BatchLoader(open_train_copies(prepared.directory), **args)
    resumed.load_state_dict(state)
    assert resumed.epoch == epoch and resumed.tokens is resumed.copies[epoch % COPIES]
    for _ in range(2 * uninterrupted.batches_per_epoch):
        (x1, y1), (x2, y2) = uninterrupted.next_batch(), resumed.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert uninterrupted.last_rows == resumed.last_rows


def test_a_loader_state_over_other_copies_is_refused(prepared):
    copies = open_train_copies(prepared.directory)
    state = BatchLoader(copies, T, B).state_dict()
    with pytest.raises(DataError, match="same token shards"):
        BatchLoader(copies[:2], T, B).load_state_dict(state)
    with pytest.raises(DataError, match="same token shards"):
        BatchLoader(copies[0], T, B).load_state_dict(state)
    with pytest.raises(DataError, match="same token shards"):
        BatchLoader(copies, T, B).load_state_dict(BatchLoader(copies[0], T, B).state_dict())


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, float("nan")])
def test_a_dropout_outside_0_to_1_is_refused_naming_the_key(bpe, p):
    with pytest.raises(ConfigError, match="tokenizer.bpe_dropout"):
        bpe.with_dropout(p)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1"])
def test_the_config_refuses_a_dropout_outside_0_to_1(value):
    with pytest.raises(ConfigError, match="tokenizer.bpe_dropout"):
        load_config("default", ["tokenizer.kind=bpe", f"tokenizer.bpe_dropout={value}"])


def test_dropout_on_another_kind_is_refused_naming_tokenizer_kind(people_daily):
    char = train_tokenizer("char", people_daily[:50])
    assert isinstance(char, CharTokenizer)
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        char.with_dropout(0.1)
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config("default", ["tokenizer.kind=char", "tokenizer.bpe_dropout=0.1"])



def test_training_reads_the_copies_and_resumes_on_them_exactly(tmp_path, dropout_cfg):
    from test_train import tiny

    from hanlm.train.loop import Trainer

    def trainer(run_dir, resume):
        cfg = tiny(run_dir, f"data.source={dropout_cfg.data.source[0]}", "tokenizer.kind=bpe",
                   "tokenizer.vocab_size=400", "tokenizer.bpe_dropout=0.2", f"tokenizer.dropout_copies={COPIES}",
                   "data.num_workers=1", "train.max_steps=6", "train.warmup_steps=2", "checkpoint.every_steps=3",
                   "eval.every_steps=3", "eval.max_batches=1", "generate.max_tokens=2")
        t = Trainer(cfg, resume=resume, echo=lambda _: None)
        assert len(t.loader.copies) == COPIES  # the dropout copies, not the plain train split
        return t

    straight = trainer(tmp_path / "straight", "none").run()
    trainer(tmp_path / "resumed", "none").run(stop_after=3)
    resumed = trainer(tmp_path / "resumed", "auto").run()  # on the stored copies: the same data as before
    assert straight.step == resumed.step == 6
    a, b = (load_file(f"{r.checkpoint}/model.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
