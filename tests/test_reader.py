"""The data reader on real text: local formats, compression, bad input (remote sources: test_remote.py)."""

import bz2
import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from hanlm.config import DataConfig, load_config
from hanlm.data.corpora import corpus_file, strip_pos_tags
from hanlm.data.prepare import prepare
from hanlm.data.reader import DocumentReader
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError


@pytest.fixture(scope="module")
def sample(people_daily) -> list[str]:
    return people_daily[:300]


def read(sources, **cfg) -> list[str]:
    return list(DocumentReader([str(s) for s in sources], DataConfig(**cfg)))


def test_people_daily_has_the_documented_size(people_daily):
    text = "".join(people_daily)
    assert len(people_daily) == 19_484
    assert 1_830_000 < len(text) < 1_850_000
    assert len(set(text)) == 4_687
    assert "/" not in people_daily[0] and people_daily[0].startswith("迈向充满希望的新世纪")


def test_pos_tags_and_compound_brackets_are_stripped():
    assert strip_pos_tags("[中央/n  电视台/n]nt  ，/w  新华社/nt  记者/n\n") == "中央电视台，新华社记者"


def test_chn_reviews_are_labelled():
    records = [json.loads(line) for line in open(corpus_file("chn-reviews"), encoding="utf-8")]
    labels = Counter(r["label"] for r in records)
    assert labels["pos"] > 15_000 and labels["neg"] > 15_000
    assert all(r["text"] for r in records)


@pytest.mark.parametrize("suffix, opener", [
    (".txt", open), (".txt.gz", gzip.open), (".txt.bz2", bz2.open), (".txt.zst", zstandard.open)])
def test_txt_one_document_per_line_in_every_compression(tmp_path, sample, suffix, opener):
    path = tmp_path / f"pd{suffix}"
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(sample) + "\n")
    assert read([path]) == sample


def test_txt_paragraph_mode_splits_at_blank_lines(tmp_path, sample):
    path = tmp_path / "paras.txt"
    path.write_text("\n".join(sample[:3]) + "\n\n\n" + sample[3] + "\n\n" + sample[4], encoding="utf-8")
    assert read([path], txt_documents="paragraph", clean_whitespace=False) == [
        "\n".join(sample[:3]), sample[3], sample[4]]
    assert read([path], txt_documents="paragraph")[0] == " ".join(sample[:3])


def test_jsonl_reads_the_configured_field(tmp_path, sample):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(sample):
            f.write(json.dumps({"id": i, "content": doc}, ensure_ascii=False) + "\n")
    assert read([path], text_field="content") == sample
    with pytest.raises(DataError, match=r"docs\.jsonl\.gz: line 1 has no field 'text' \(it has: id, content\)"):
        read([path])


def test_parquet_reads_the_configured_column(tmp_path, sample):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": sample}), path, row_group_size=64)
    assert read([path], text_field="body") == sample
    with pytest.raises(DataError, match="no column 'text'"):
        read([path])


def test_directories_and_globs_expand_in_sorted_order(tmp_path, sample):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text(sample[1], encoding="utf-8")
    (tmp_path / "b" / "1.txt").write_text(sample[0], encoding="utf-8")
    (tmp_path / "b" / "notes.md").write_text("ignored", encoding="utf-8")
    assert read([tmp_path / "b"]) == sample[:2]
    assert read([f"{tmp_path}/b/*.txt"]) == sample[:2]


def test_normalisation_nfkc_whitespace_t2s_dedup_and_min_chars(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("　１９９８年　ＧＤＰ  增长\t\n漢語模型\n短\n漢語模型\n", encoding="utf-8")
    assert read([path]) == ["１９９８年 ＧＤＰ 增长", "漢語模型", "短", "漢語模型"]
    assert read([path], nfkc=True, t2s=True, dedup=True, min_chars=2) == ["1998年 GDP 增长", "汉语模型"]
    raw = read([path], clean_whitespace=False)
    assert raw[0] == "　１９９８年　ＧＤＰ  增长\t"


def test_filters_report_what_they_dropped(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("甲乙丙\n甲乙丙\n丁\n", encoding="utf-8")
    reader = DocumentReader([str(path)], DataConfig(dedup=True, min_chars=2))
    assert list(reader) == ["甲乙丙"]
    assert (reader.stats.duplicates, reader.stats.too_short, reader.stats.documents) == (1, 1, 1)


def test_a_corpus_left_empty_by_filtering_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("一\n二\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no documents left in .*short\.txt after filtering.*2 too short"):
        read([path], min_chars=5)


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    good = "人民日报\n".encode()
    path.write_bytes(good + "新华社".encode() + b"\xff\xfe" + "记者\n".encode())
    offset = len(good) + len("新华社".encode())
    with pytest.raises(DataError, match=rf"bad\.txt: invalid UTF-8 at byte offset {offset} \(line 2\)"):
        read([path])


def test_invalid_utf8_in_a_compressed_file_counts_decompressed_bytes(tmp_path):
    path = tmp_path / "bad.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("第一行\n".encode() + b"\xc3(" + b"\n")
    with pytest.raises(DataError, match=r"bad\.txt\.gz: invalid UTF-8 at byte offset 10"):
        read([path])


def test_replace_and_skip_count_the_damage(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("甲\n".encode() + b"\xff\xfe\xfd" + "乙\n".encode() + b"\x80\n" + "丙\n".encode())
    replace = DocumentReader([str(path)], DataConfig(on_decode_error="replace"))
    assert list(replace) == ["甲", "\ufffd\ufffd\ufffd乙", "\ufffd", "丙"]
    assert replace.stats.invalid_sequences == 4
    assert "4 invalid UTF-8 sequence(s) in" in replace.stats.summary()
    skip = DocumentReader([str(path)], DataConfig(on_decode_error="skip"))
    assert list(skip) == ["甲", "丙"]
    assert (skip.stats.invalid_sequences, skip.stats.skipped) == (4, 2)
    assert "2 line(s) skipped" in skip.stats.summary()


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/corpus.txt", "data source '/nonexistent/corpus.txt' not found"),
    ("/nonexistent/*.txt", "no files match"),
    ("people-daily-1999", "not found: not a file, directory, glob, URL or built-in corpus"),
])
def test_missing_sources_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        DocumentReader([spec], DataConfig())


def test_unknown_extension_asks_for_data_format(tmp_path):
    path = tmp_path / "corpus.tsv"
    path.write_text("文本\n", encoding="utf-8")
    with pytest.raises(DataError, match="set data.format"):
        DocumentReader([str(path)], DataConfig())
    assert read([path], format="txt") == ["文本"]


def test_concatenated_zstd_frames_are_all_read(tmp_path, sample):
    path = tmp_path / "frames.txt.zst"
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(("\n".join(part) + "\n").encode())
                              for part in (sample[:100], sample[100:])))
    assert read([path]) == sample


# -- damaged compressed files: a DataError naming the file and how far it got ----------------------------

def write_compressed(path: Path, docs: list[str]) -> None:
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".zst": zstandard.open}[path.suffix]
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs] if ".jsonl" in path.name else docs
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] if how == "truncated" else data[:middle] + b"\x55" * 64 + data[middle + 64:])


DAMAGED = [("pd.txt.gz", "gzip", "truncated"), ("pd.txt.gz", "gzip", "corrupt"), ("pd.txt.bz2", "bz2", "truncated"),
           ("pd.txt.zst", "zstd", "truncated"), ("pd.jsonl.gz", "gzip", "truncated")]


@pytest.mark.parametrize("name, compression, how", DAMAGED)
def test_a_damaged_compressed_file_names_the_file_and_the_offset(tmp_path, sample, name, compression, how):
    path = tmp_path / name
    write_compressed(path, sample)
    damage(path, how)
    size = path.stat().st_size
    message = (rf"{re.escape(name)}: damaged {compression} data, "
               + ("the file ends early" if how == "truncated" else "bad bytes in the stream")
               + rf".*: [\d,]+ decompressed bytes were read, the decompressor stopped at compressed byte offset "
               rf"[\d,]+ of {size:,}")
    # replace: bytes a corrupt stream decodes to before the decompressor notices are no UTF-8 error
    with pytest.raises(DataError, match=message):
        read([path], on_decode_error="replace")
    with pytest.raises(DataError, match=message):
        list(DocumentReader([str(path)], DataConfig(on_decode_error="replace")).lines())


def test_prepare_on_a_truncated_file_is_a_one_line_error(tmp_path, sample):
    path = tmp_path / "pd.jsonl.gz"
    write_compressed(path, sample)
    damage(path, "truncated")
    proc = subprocess.run([sys.executable, "-m", "hanlm.cli", "prepare", "--set", f"data.source=[{path}]",
                           "--set", "tokenizer.kind=char", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"hanlm: error: {path}: damaged gzip data, the file ends early" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- byte-order marks --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, body", [
    ("bom.txt", "人民日报\n新华社\n"),
    ("bom.jsonl", '{"text": "人民日报"}\n{"text": "新华社"}\n'),
    ("bom.csv", "text\n人民日报\n新华社\n"),
])
def test_a_utf8_byte_order_mark_is_dropped(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read([path]) == ["人民日报", "新华社"]


def test_a_byte_order_mark_never_reaches_the_vocabulary(tmp_path, sample):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(sample) + "\n").encode())
    result = prepare(load_config(None, [f"data.source=[{path}]", "tokenizer.kind=char"]), tmp_path / "out",
                     progress=False)
    vocabulary = Tokenizer.load(result.directory / "tokenizer.json").token_strings()
    assert "\ufeff" not in "".join(vocabulary)


# -- a source that changes while it is read: the error says so, whatever the change broke ---------------------
# The files are bigger than what the reader has read ahead when the first documents come out (64 KiB, and
# gzip's 128 KiB of compressed input), so a change made then lands in bytes not yet read.

@pytest.fixture(scope="module")
def big(people_daily) -> list[str]:
    return people_daily[:3000]  # 0.8 MB of text, 0.36 MB gzipped


def half_read(path: Path, **cfg):
    """The documents of `path` still to come, after the first five: the file is open and partly read."""
    docs = iter(DocumentReader([str(path)], DataConfig(**cfg)))
    for _ in range(5):
        next(docs)
    return docs


def cut_inside_a_character(data: bytes, at: int) -> int:
    """The first offset from `at` on that falls inside a multi-byte UTF-8 character."""
    while data[at] & 0xC0 != 0x80:
        at += 1
    return at


def changed(path: Path, before: int, after: str) -> str:
    return rf"^{re.escape(str(path))} changed while it was being read \(size {before:,} → {after}\); run again$"


@pytest.mark.parametrize("where", ["ahead of the reader", "behind it, as in issue 29"])
def test_a_file_truncated_inside_a_character_while_read_says_it_changed_not_invalid_utf8(tmp_path, big, where):
    path = tmp_path / "pd.txt"
    data = ("\n".join(big) + "\n").encode()
    path.write_bytes(data)
    docs = half_read(path)
    cut = cut_inside_a_character(data, len(data) // 2 if where.startswith("ahead") else 1000)
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(DataError, match=changed(path, len(data), f"{cut:,} bytes")):
        list(docs)
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte offset"):  # what the cut alone makes of it
        read([path])


def test_a_file_cut_then_written_on_is_changed_not_invalid_utf8_midway(tmp_path, big):
    """Truncated inside a character and written on (a log rewritten in place): the invalid UTF-8 comes in
    mid-file, before the end is reached; the reader looks at the file again and blames the change."""
    path = tmp_path / "pd.txt"
    data = ("\n".join(big) + "\n").encode()
    path.write_bytes(data)
    docs = half_read(path)
    cut = cut_inside_a_character(data, len(data) // 2)
    more = ("\n".join(big[:10]) + "\n").encode()
    with open(path, "r+b") as f:
        f.truncate(cut)
        f.seek(cut)
        f.write(more)
    with pytest.raises(DataError, match=changed(path, len(data), f"{cut + len(more):,} bytes")) as caught:
        list(docs)
    assert "invalid UTF-8" in str(caught.value.__cause__)


def test_a_file_that_grows_or_goes_while_read_says_it_changed(tmp_path, big):
    path = tmp_path / "pd.jsonl"
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in big).encode()
    path.write_bytes(data)
    docs = half_read(path)
    extra = (json.dumps({"text": big[0]}, ensure_ascii=False) + "\n").encode()
    with open(path, "ab") as f:
        f.write(extra)
    with pytest.raises(DataError, match=changed(path, len(data), f"{len(data) + len(extra):,} bytes")):
        list(docs)

    path.write_bytes(data)
    docs = half_read(path)
    path.unlink()  # the open file is read to its end, but the source is no more
    with pytest.raises(DataError, match=changed(path, len(data), "removed")):
        list(docs)


def test_a_gz_file_shrunk_while_read_says_it_changed_not_damaged(tmp_path, big):
    path = tmp_path / "pd.txt.gz"
    write_compressed(path, big)
    size = path.stat().st_size
    docs = half_read(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match=changed(path, size, f"{size // 2:,} bytes")):
        list(docs)
    with pytest.raises(DataError, match=r"damaged gzip data, the file ends early"):  # the cut alone
        read([path])


def test_a_gz_file_rewritten_in_place_while_read_says_it_changed_not_damaged(tmp_path, big):
    """The same size, bad bytes in the middle and a new modification time: the decompressor fails midway,
    and the error it raises is the cause of the 'changed' one."""
    path = tmp_path / "pd.txt.gz"
    write_compressed(path, big)
    size, mtime = path.stat().st_size, path.stat().st_mtime
    docs = half_read(path)
    with open(path, "r+b") as f:
        f.seek(size * 3 // 4)
        f.write(b"\x55" * 64)
    os.utime(path, (mtime + 10, mtime + 10))  # the clock need not have moved on since the file was written
    with pytest.raises(DataError, match=changed(path, size, f"{size:,} bytes, modified meanwhile")) as caught:
        list(docs)
    assert caught.value.__cause__ is not None
    with pytest.raises(DataError, match=r"damaged gzip data|invalid UTF-8"):  # the damage alone
        read([path])


def test_an_unchanged_file_read_twice_is_fine(tmp_path, big):
    path = tmp_path / "pd.txt.gz"
    write_compressed(path, big)
    assert read([path]) == big and read([path]) == big
