"""The data reader on real text: local formats, compression, HTTP with caching, bad input."""

import bz2
import gzip
import http.server
import json
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from hanlm.config import DataConfig
from hanlm.data.corpora import corpus_file, strip_pos_tags
from hanlm.data.reader import DocumentReader
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


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    bodies_sent: Counter = Counter()

    def do_GET(self):
        if "Range" not in self.headers:
            type(self).bodies_sent[self.path] += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _CountingHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _CountingHandler.bodies_sent.clear()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source_is_read_once_then_served_from_the_cache(http_dir, sample, monkeypatch, tmp_path):
    monkeypatch.setenv("HANLM_HOME", str(tmp_path / "home"))
    root, base = http_dir
    with gzip.open(root / "pd.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(sample) + "\n")
    url = f"{base}/pd.txt.gz"
    assert read([url]) == sample
    downloads = _CountingHandler.bodies_sent["/pd.txt.gz"]
    assert downloads >= 1
    assert read([url]) == sample
    assert _CountingHandler.bodies_sent["/pd.txt.gz"] == downloads, "the second read downloaded again"
    assert any((tmp_path / "home" / "cache").iterdir())


def test_missing_url_is_a_clear_error(http_dir):
    _, base = http_dir
    with pytest.raises(DataError, match=r"not found"):
        list(DocumentReader([f"{base}/nope.txt"], DataConfig()))
