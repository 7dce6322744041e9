"""`hanlm prepare`: shards that decode back to the corpus, idempotence, atomicity."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data import prepare as prepare_module
from hanlm.data.prepare import is_val, prepare
from hanlm.data.shards import ShardWriter, open_split, read_meta, token_dtype
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError


def documents_of(directory, split) -> list[str]:
    """Decode a shard back into its documents (split at <eos>)."""
    tok = Tokenizer.load(directory / "tokenizer.json")
    ids = np.asarray(open_split(directory, split))
    ends = np.flatnonzero(ids == tok.eos_id)
    assert ends[-1] == len(ids) - 1, "a shard ends with <eos>"
    return [tok.decode(d) for d in np.split(ids, ends + 1)[:-1]]


@pytest.fixture(scope="module")
def pd_char(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "pd-char"
    return prepare(load_config("default", ["tokenizer.kind=char"]), out, progress=False)


def test_people_daily_char_shards_hold_the_whole_corpus(pd_char, people_daily):
    meta, splits = pd_char.meta, pd_char.meta["splits"]
    assert meta["dtype"] == "uint16" and meta["tokenizer_kind"] == "char"
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(people_daily) == 19_484
    assert splits["train"]["characters"] + splits["val"]["characters"] == sum(map(len, people_daily))
    for s in splits.values():  # char: one token per character plus one <eos> per document
        assert s["tokens"] == s["characters"] + s["documents"]
    assert 0.01 < splits["val"]["documents"] / len(people_daily) < 0.03
    assert meta["distinct_characters"] == meta["vocab_size"] - 4
    assert meta["tokenizer_hash"] == Tokenizer.load(pd_char.directory / "tokenizer.json").fingerprint()


def test_shards_decode_back_to_the_split_documents(pd_char, people_daily):
    train = [d for d in people_daily if not is_val(d, 0.02)]
    val = [d for d in people_daily if is_val(d, 0.02)]
    assert documents_of(pd_char.directory, "train") == train
    # val characters never seen in train are <unk>: everything else decodes exactly
    decoded = documents_of(pd_char.directory, "val")
    assert len(decoded) == len(val)
    vocab = set(Tokenizer.load(pd_char.directory / "tokenizer.json").vocab)
    assert decoded == ["".join(c if c in vocab else "\ufffd" for c in d) for d in val]


def test_bpe_shards_round_trip_exactly(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:2000]) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source={src}", "tokenizer.kind=bpe", "tokenizer.vocab_size=1000"])
    result = prepare(cfg, tmp_path / "out", progress=False)
    docs = people_daily[:2000]
    assert documents_of(result.directory, "train") + documents_of(result.directory, "val") == \
        [d for d in docs if not is_val(d, 0.02)] + [d for d in docs if is_val(d, 0.02)]
    assert result.meta["vocab_size"] == 1000


def test_second_prepare_reuses_and_any_change_rebuilds(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:1000]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cfg = load_config(None, [f"data.source={src}", "tokenizer.kind=char"])
    first = prepare(cfg, out, progress=False)
    stamp = (out / "train.bin").stat().st_mtime_ns
    again = prepare(cfg, out, progress=False)
    assert again.reused and again.meta == first.meta and (out / "train.bin").stat().st_mtime_ns == stamp

    changed = prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char",
                                       "tokenizer.min_freq=3"]), out, progress=False)
    assert not changed.reused and changed.meta["vocab_size"] < first.meta["vocab_size"]

    src.write_text("\n".join(people_daily[:900]) + "\n", encoding="utf-8")
    edited = prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char",
                                       "tokenizer.min_freq=3"]), out, progress=False)
    assert not edited.reused
    assert edited.meta["splits"]["train"]["documents"] < changed.meta["splits"]["train"]["documents"]


def test_a_damaged_shard_is_detected_and_rebuilt(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:500]) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source={src}", "tokenizer.kind=char"])
    out = prepare(cfg, tmp_path / "out", progress=False).directory
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"train\.bin: 100 bytes, meta\.json promises .*run `hanlm prepare --force`"):
        open_split(out, "train")
    assert not prepare(cfg, out, progress=False).reused
    open_split(out, "train")


def test_an_interrupted_prepare_leaves_the_previous_shards_untouched(tmp_path, people_daily, monkeypatch):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:3000]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 10_000)
    real_write, calls = ShardWriter.write, []

    def failing_write(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-shard
        real_write(self, *args)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char",
                                       "tokenizer.min_freq=2"]), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pd.txt"], "a temporary was left behind"

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()


def test_a_killed_prepare_never_leaves_a_directory_that_looks_complete(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:6000]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "hanlm.cli", "prepare", "--no-progress", "--out", str(out),
                             "--set", f"data.source={src}", "--set", "tokenizer.kind=word",
                             "--set", "data.num_workers=1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def temporaries():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    # Kill it once it is writing (its temporary holds the split documents), however long that takes.
    deadline = time.monotonic() + 300
    while not any((p / "train.docs").exists() for p in temporaries()):
        assert proc.poll() is None, "prepare finished before it could be killed; give it more data"
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert temporaries() and all(not (p / "meta.json").exists() for p in temporaries())
    # The next prepare of the same directory removes what the killed one left.
    prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), out, progress=False)
    assert (out / "meta.json").exists() and temporaries() == []


def test_parallel_encoding_gives_the_same_shards(tmp_path, people_daily, monkeypatch):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:3000]) + "\n", encoding="utf-8")
    serial = prepare(load_config(None, [f"data.source={src}", "data.num_workers=1"]), tmp_path / "a",
                     progress=False)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 20_000)
    monkeypatch.setattr(prepare_module, "POOL_WORTH_SECONDS", 0.0)
    parallel = prepare(load_config(None, [f"data.source={src}", "data.num_workers=2"]), tmp_path / "b",
                       progress=False)
    for split in ("train", "val"):
        assert (serial.directory / f"{split}.bin").read_bytes() == (parallel.directory / f"{split}.bin").read_bytes()


def test_explicit_val_source_and_empty_val_split(tmp_path, people_daily):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n".join(people_daily[:400]) + "\n", encoding="utf-8")
    val.write_text("\n".join(people_daily[400:450]) + "\n", encoding="utf-8")
    result = prepare(load_config(None, [f"data.source={train}", f"data.val_source={val}"]), tmp_path / "o",
                     progress=False)
    assert result.meta["splits"]["val"]["documents"] == 50
    assert result.meta["splits"]["train"]["documents"] == 400
    one = tmp_path / "one.txt"
    one.write_text(people_daily[0] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="the val split is empty.*data.val_fraction"):
        prepare(load_config(None, [f"data.source={one}"]), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_large_vocabularies_get_uint32_shards(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    (tmp_path / "meta.json").write_text(json.dumps({
        "format": 2, "dtype": "uint32", "vocab_size": 100_000,
        "splits": {"train": {"file": "train.bin", "tokens": 3, "characters": 3, "documents": 1}}}))
    writer = ShardWriter(tmp_path / "train.bin", token_dtype(100_000))
    writer.write(np.array([70_000, 99_999, 3]), characters=3, documents=1)
    writer.close()
    assert open_split(tmp_path, "train").tolist() == [70_000, 99_999, 3]


def test_read_meta_names_a_directory_that_was_never_prepared(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json not found.*run `hanlm prepare`"):
        read_meta(tmp_path)


def test_cli_prepare_prints_the_statistics(capsys, pd_char):
    assert main(["prepare", "--out", str(pd_char.directory), "--no-progress", "--set", "tokenizer.kind=char"]) == 0
    out = capsys.readouterr().out
    assert "(up to date, reused)" in out
    train = pd_char.meta["splits"]["train"]
    assert f"{train['documents']:,} documents" in out and f"{train['tokens']:,} tokens" in out
    assert f"distinct characters (train): {pd_char.meta['distinct_characters']:,}" in out
    assert main(["prepare", "--out", str(pd_char.directory), "--json", "--set", "tokenizer.kind=char"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["tokens"] > 1_800_000


def test_cli_prepare_reports_a_missing_source_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hanlm.cli", "prepare", "--set", "data.source=/no/such.txt"],
                         capture_output=True, text=True, env={**os.environ, "HANLM_HOME": str(tmp_path)})
    assert run.returncode == 2
    assert "hanlm: error: data source '/no/such.txt' not found" in run.stderr
    assert "Traceback" not in run.stderr
