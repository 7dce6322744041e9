"""`hanlm prepare`: shards that decode back to the corpus, idempotence, atomicity."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hanlm.cli import main
from hanlm.config import load_config
from hanlm.data import prepare as prepare_module
from hanlm.data import spool as spool_module
from hanlm.data.prepare import prepare
from hanlm.data.splits import split_of
from hanlm.data.shards import FORMAT_VERSION, ShardWriter, TokenShards, open_split, read_meta, token_dtype
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError, DataError


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
    assert sum(s["documents"] for s in splits.values()) == len(people_daily) == 19_484
    assert sum(s["characters"] for s in splits.values()) == sum(map(len, people_daily))
    assert 0.01 < splits["tune"]["documents"] / len(people_daily) < 0.03
    train, val = splits["train"], splits["val"]  # char: a token per character and an <eos> per document,
    assert train["tokens"] == train["characters"] + train["documents"]  # and 2-4 bytes per character unseen in train
    assert val["characters"] + val["documents"] < val["tokens"] < val["characters"] + val["documents"] + 100
    assert 0.01 < splits["val"]["documents"] / len(people_daily) < 0.03
    assert meta["distinct_characters"] == meta["vocab_size"] - 4 - 256  # specials, byte fallback, characters
    assert meta["tokenizer_hash"] == Tokenizer.load(pd_char.directory / "tokenizer.json").fingerprint()


def test_shards_decode_back_to_the_split_documents(pd_char, people_daily):
    train = [d for d in people_daily if split_of(d, 0.02, 0.02) == "train"]
    val = [d for d in people_daily if split_of(d, 0.02, 0.02) == "val"]
    assert documents_of(pd_char.directory, "train") == train
    # val characters never seen in train are spelled by their UTF-8 bytes, so val decodes exactly too
    vocab = set(Tokenizer.load(pd_char.directory / "tokenizer.json").vocab)
    assert any(c not in vocab for d in val for c in d)
    assert documents_of(pd_char.directory, "val") == val


def test_bpe_shards_round_trip_exactly(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:2000]) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source={src}", "tokenizer.kind=bpe", "tokenizer.vocab_size=1000"])
    result = prepare(cfg, tmp_path / "out", progress=False)
    docs = people_daily[:2000]
    assert documents_of(result.directory, "train") + documents_of(result.directory, "val") == \
        [d for d in docs if split_of(d, 0.02, 0.02) == "train"] + [d for d in docs if split_of(d, 0.02, 0.02) == "val"]
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

    monkeypatch.setattr(spool_module, "CHUNK_CHARS", 10_000)
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


def test_a_source_that_changes_midway_fails_prepare_and_publishes_nothing(tmp_path, people_daily, monkeypatch):
    """Issue 29's hostile tester, without the clock: the source is cut inside a character once prepare has
    read its first documents. The error names the file and the change (not the invalid UTF-8 the cut makes),
    and no shards of the part read before the cut are published, the previous directory staying as it was."""
    src = tmp_path / "pd.txt"
    data = ("\n".join(people_daily[:3000]) + "\n").encode()  # more than the reader reads ahead
    src.write_bytes(data)
    out = tmp_path / "out"
    prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cut = len(data) // 2
    while data[cut] & 0xC0 != 0x80:  # inside a multi-byte character
        cut += 1

    real_add, added = spool_module.DocumentSpool.add, []

    def add_then_cut(self, doc):
        added.append(doc)
        if len(added) == 10:
            os.truncate(src, cut)
        real_add(self, doc)

    monkeypatch.setattr(spool_module.DocumentSpool, "add", add_then_cut)
    changed = rf"{re.escape(str(src))} changed while it was being read \(size {len(data):,} → {cut:,} bytes\); " \
        "run again"
    with pytest.raises(DataError, match=changed):
        prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), out, progress=False, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pd.txt"], "a temporary was left behind"

    src.write_bytes(data)
    added.clear()
    with pytest.raises(DataError, match=changed):
        prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=char"]), tmp_path / "fresh",
                progress=False)
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
    while not any((p / "train.text").exists() for p in temporaries()):
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
    monkeypatch.setattr(spool_module, "CHUNK_CHARS", 20_000)
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
    splits = result.meta["splits"]
    assert splits["train"]["documents"] + splits["tune"]["documents"] == 400 and splits["tune"]["documents"] > 0
    one = tmp_path / "one.txt"
    one.write_text(people_daily[0] + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="the val split is empty.*data.val_fraction"):
        prepare(load_config(None, [f"data.source={one}"]), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_large_vocabularies_get_uint32_shards(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    writer = ShardWriter(tmp_path, "train", token_dtype(100_000))
    writer.write(np.array([70_000, 99_999, 3]), characters=3, documents=1)
    (tmp_path / "meta.json").write_text(json.dumps({
        "format": FORMAT_VERSION, "dtype": "uint32", "vocab_size": 100_000, "splits": {"train": writer.close()}}))
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
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["tokens"] > 1_750_000


def test_cli_prepare_reports_a_missing_source_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hanlm.cli", "prepare", "--set", "data.source=/no/such.txt"],
                         capture_output=True, text=True, env={**os.environ, "HANLM_HOME": str(tmp_path)})
    assert run.returncode == 2
    assert "hanlm: error: data source '/no/such.txt' not found" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_big_split_is_written_as_several_files_and_read_as_one(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:1500]) + "\n", encoding="utf-8")
    whole = prepare(load_config(None, [f"data.source={src}"]), tmp_path / "one", progress=False)
    split = prepare(load_config(None, [f"data.source={src}", "data.shard_tokens=40000"]), tmp_path / "many",
                    progress=False)
    index = split.meta["splits"]["train"]["files"]
    assert len(index) == 3 and [f["file"] for f in index[:2]] == ["train-00000.bin", "train-00001.bin"]
    assert all(f["tokens"] == 40_000 for f in index[:-1]) and sum(f["tokens"] for f in index) == \
        whole.meta["splits"]["train"]["tokens"]
    one, many = open_split(whole.directory, "train"), open_split(split.directory, "train")
    assert isinstance(many, TokenShards) and len(many) == len(one)
    assert np.array_equal(np.asarray(many), np.asarray(one))
    windows = np.array([[0, 39_999, 40_000], [len(one) - 1, 79_999, 80_000]])  # across file boundaries
    assert np.array_equal(many[windows], one[windows]) and np.array_equal(many[39_990:80_010], one[39_990:80_010])
    from hanlm.data.loader import BatchLoader
    a, b = BatchLoader(one, 64, 8, seed=3), BatchLoader(many, 64, 8, seed=3)
    for _ in range(5):
        assert all(x.equal(y) for x, y in zip(a.next_batch(), b.next_batch()))
    with open(split.directory / "train-00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"train-00001\.bin: 10 bytes, meta\.json promises 80000"):
        open_split(split.directory, "train")


def test_default_directories_keep_each_settings_shards_and_can_be_listed_and_cleaned(tmp_path, people_daily,
                                                                                       monkeypatch, capsys):
    monkeypatch.setenv("HANLM_HOME", str(tmp_path / "home"))
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:300]) + "\n", encoding="utf-8")
    base = [f"data.source={src}", "tokenizer.kind=char"]
    first = prepare(load_config(None, base), progress=False)
    rare = prepare(load_config(None, base + ["tokenizer.min_freq=2"]), progress=False)
    assert first.directory != rare.directory and first.directory.parent == rare.directory.parent
    assert first.directory.name.startswith("pd.txt-char-") and len(first.directory.name) == len("pd.txt-char-") + 12
    assert prepare(load_config(None, base), progress=False).reused, "the other config's shards overwrote these"
    (first.directory.parent / ".pd.txt-char-x.hnohost-p1.abc.tmp").mkdir()  # another machine's: never touched
    half = first.directory.parent / "half-written"
    half.mkdir()
    (half / "train.text").write_bytes(b"x")

    assert main(["prepare", "--list", *(a for kv in base for a in ("--set", kv))]) == 0
    out = capsys.readouterr().out
    assert f"* {first.directory.name}" in out and f"  {rare.directory.name}" in out
    assert "half-written" in out and "not a finished prepared directory" in out and "3 directories" in out
    assert main(["prepare", "--clean", "nope"]) == 2
    assert "no prepared directory of that name" in capsys.readouterr().err
    assert main(["prepare", "--clean", "stale", rare.directory.name]) == 0
    assert not half.exists() and not rare.directory.exists() and first.directory.exists()
    assert (first.directory.parent / ".pd.txt-char-x.hnohost-p1.abc.tmp").exists()


def test_tokenizer_training_reads_at_most_train_chars_spread_over_the_split(tmp_path, people_daily, monkeypatch):
    src = tmp_path / "pd.txt"
    docs = people_daily[:2000]
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    seen: list[str] = []
    real = prepare_module.train_tokenizer
    monkeypatch.setattr(prepare_module, "train_tokenizer", lambda kind, texts, **kw: real(
        kind, (seen.append(t) or t for t in texts), **kw))
    result = prepare(load_config(None, [f"data.source={src}", "tokenizer.kind=bpe", "tokenizer.vocab_size=600",
                                        "tokenizer.train_chars=40000"]), tmp_path / "o", progress=False)
    chars = sum(map(len, seen))
    assert 30_000 <= chars <= 40_000 < result.meta["splits"]["train"]["characters"] / 3
    train = [d for d in docs if split_of(d, 0.02, 0.02) == "train"]
    assert set(seen) < set(train)
    assert train.index(seen[0]) < len(train) / 10 and train.index(seen[-1]) > len(train) * 0.8, \
        "the sample spans the whole split"
    assert documents_of(result.directory, "train") == train  # every document still encoded, exactly


def test_lone_surrogates_in_a_json_source_follow_on_decode_error(tmp_path, people_daily):
    src = tmp_path / "pd.jsonl"
    lines = [json.dumps({"text": d}) for d in people_daily[:200]] + ['{"text": "坏\\ud800字"}']
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pd\.jsonl: line 201: field 'text' holds a lone surrogate"):
        prepare(load_config(None, [f"data.source={src}"]), tmp_path / "o", progress=False)
    result = prepare(load_config(None, [f"data.source={src}", "data.on_decode_error=replace"]), tmp_path / "o",
                     progress=False)
    assert "1 invalid UTF-8 sequence(s)" in result.meta["read_report"]
    docs = [d for split in result.meta["splits"] for d in documents_of(result.directory, split)]
    assert "坏\ufffd字" in docs and len(docs) == 201


def test_spark_prepare_writes_the_very_shards_of_a_local_prepare(tmp_path, people_daily):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(people_daily[:700]) + "\n", encoding="utf-8")
    with gzip.open(src / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(people_daily[700:1500]) + "\n")
    (src / "c.txt").write_text("\n".join(people_daily[1500:1800]) + "\n", encoding="utf-8")
    settings = [f"data.source={src}", "tokenizer.kind=bpe", "tokenizer.vocab_size=600",
                "tokenizer.train_chars=60000", "data.shard_tokens=50000"]
    local = prepare(load_config(None, settings), tmp_path / "local", progress=False)
    run = subprocess.run([sys.executable, "-m", "hanlm.cli", "prepare", "--launcher", "spark", "--no-progress",
                          "--out", str(tmp_path / "spark"), *(a for kv in settings for a in ("--set", kv))],
                         capture_output=True, text=True, env={**os.environ, "HANLM_HOME": str(tmp_path / "home")})
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(p.name for p in local.directory.iterdir())
    assert len(local.meta["splits"]["train"]["files"]) > 2 and names == sorted(
        p.name for p in (tmp_path / "spark").iterdir())
    for name in names:
        if name != "meta.json":
            assert (local.directory / name).read_bytes() == (tmp_path / "spark" / name).read_bytes(), name
    spark_meta = read_meta(tmp_path / "spark")
    assert {k: v for k, v in spark_meta.items() if k != "created"} == \
        {k: v for k, v in local.meta.items() if k != "created"}


def test_spark_prepare_refuses_dedup_before_starting_spark(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    src.write_text("\n".join(people_daily[:50]) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.dedup.*without --launcher spark"):
        prepare(load_config(None, [f"data.source={src}", "data.dedup=true"]), tmp_path / "o", progress=False,
                launcher="spark")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("files, message", [
    ([{"file": "../../etc/passwd", "tokens": 3}], "no valid file index"),
    ([{"file": "train.bin", "tokens": -1}], "no valid file index"),
    ("train.bin", "no valid file index"),
    ([{"file": "train.bin", "tokens": 2}], "add up to 2 tokens, not 3"),
])
def test_a_tampered_file_index_is_refused_by_name(tmp_path, files, message):
    (tmp_path / "train.bin").write_bytes(np.array([5, 6, 3], dtype="<u2").tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "dtype": "uint16", "vocab_size": 10,
                                                    "splits": {"train": {"files": files, "tokens": 3}}}))
    with pytest.raises(DataError, match=message):
        open_split(tmp_path, "train")


def test_the_tune_split_is_disjoint_from_train_and_val_and_the_same_every_time(tmp_path, people_daily):
    src = tmp_path / "pd.txt"
    docs = list(dict.fromkeys(people_daily[:1500]))  # distinct documents: each can be found in one split
    src.write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source={src}", "tokenizer.kind=char", "data.tune_fraction=0.05"])
    first, again = prepare(cfg, tmp_path / "a", progress=False), prepare(cfg, tmp_path / "b", progress=False)
    tokenizer = Tokenizer.load(first.directory / "tokenizer.json")

    def documents(directory, split):
        ids = np.asarray(open_split(directory, split), dtype=np.int64)
        cuts = np.flatnonzero(ids == tokenizer.eos_id)
        return {tokenizer.decode(part.tolist()) for part in np.split(ids, cuts + 1) if len(part) > 1}

    by_split = {split: documents(first.directory, split) for split in ("train", "val", "tune")}
    assert 0.03 * len(docs) < len(by_split["tune"]) < 0.07 * len(docs)
    assert not by_split["tune"] & by_split["train"] and not by_split["tune"] & by_split["val"]
    assert by_split["train"] | by_split["val"] | by_split["tune"] == set(docs)
    assert (first.directory / "tune.bin").read_bytes() == (again.directory / "tune.bin").read_bytes()
    none = prepare(load_config(None, [f"data.source={src}", "data.tune_fraction=0"]), tmp_path / "c", progress=False)
    assert set(none.meta["splits"]) == {"train", "val"}
