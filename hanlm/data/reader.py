"""Data reader: text sources -> normalised documents.

A source is a built-in corpus name (`people-daily-1998`), a local file, directory or glob, or
any fsspec URL (`https://`, `sftp://`, `s3://`, `hdfs://`, `gs://` once its driver is installed).
Remote files are copied into `$HANLM_HOME/cache` under their fingerprint (URL, size and ETag /
modification time), so a second run with an unchanged file does not download it again and a
changed file is always downloaded afresh: the bytes read are the bytes fingerprinted. `.gz`,
`.bz2` and `.zst` are decompressed on the fly; a truncated or damaged stream is a DataError that
names the file and how far it got. A UTF-8 byte-order mark at the start of a file is dropped.
Each file is checked against its fingerprint once it has been read (one stat): a file that changed
while it was being read is a DataError saying so (`sources.SourceChanged`), and that error wins over
the invalid UTF-8, cut record or damaged stream the change caused midway.

Formats: `.txt` (a document per line or per blank-line-separated paragraph), `.jsonl` (one
field), `.csv` (one column, a header row first) and `.parquet` (one column). Labelled data for
tasks (`DocumentReader.labelled`) reads a second field or column beside the text.
Finding, fetching and opening the files is `hanlm.data.sources`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TypeVar

from hanlm.config import DataConfig
from hanlm.data.sources import SourceChanged, SourceFile, expand_sources, open_binary, source_changed, verify_source
from hanlm.errors import DataError

_WHITESPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_T = TypeVar("_T")


@dataclass
class ReadStats:
    """What the reader saw and dropped; filled in while iterating."""

    files: int = 0
    documents: int = 0
    characters: int = 0
    bytes_read: int = 0
    invalid_sequences: int = 0  # invalid UTF-8 byte sequences met (on_decode_error replace or skip)
    skipped: int = 0  # lines dropped for holding them (skip)
    too_short: int = 0
    duplicates: int = 0
    damaged_files: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.documents:,} documents", f"{self.characters:,} characters", f"from {self.files} file(s)"]
        dropped = [f"{n:,} {what}" for n, what in ((self.too_short, "too short"),
                                                    (self.duplicates, "duplicates")) if n]
        if dropped:
            parts.append("dropped " + ", ".join(dropped))
        if self.invalid_sequences:
            parts.append(f"{self.invalid_sequences:,} invalid UTF-8 sequence(s) in "
                         + ", ".join(f"{f} ({n})" for f, n in self.damaged_files.items())
                         + (f", {self.skipped:,} line(s) skipped" if self.skipped else ", replaced by U+FFFD"))
        return "; ".join(parts)


class DocumentReader:
    """Iterates over the normalised, filtered documents of some sources.

    `stats` is complete once iteration ends. A source left with no documents after filtering
    raises DataError saying what was dropped and why.
    """

    def __init__(self, sources: list[str], cfg: DataConfig, *, text_key: str = "data.text_field",
                 allow_empty: bool = False):
        """`text_key`: the config key that names cfg.text_field, for error messages (fine-tuning has its own).
        `allow_empty`: no documents after filtering is no error (a reader over one of many files)."""
        self.cfg, self.text_key, self.allow_empty = cfg, text_key, allow_empty
        self.files = expand_sources(sources, cfg)
        self.stats = ReadStats()
        self.current: str | None = None  # the file being read, for errors about its records
        self._t2s = _opencc_t2s() if cfg.t2s else None

    @classmethod
    def of_files(cls, files: list[SourceFile], cfg: DataConfig, *, allow_empty: bool = False) -> DocumentReader:
        """A reader over files another reader already expanded (a Spark task reading one of them)."""
        reader = cls([], cfg, allow_empty=allow_empty)
        reader.files = list(files)
        return reader

    def fingerprints(self) -> list[str]:
        return [f.fingerprint for f in self.files]

    def __iter__(self) -> Iterator[str]:
        for doc, _ in self._records(None):
            yield doc

    def labelled(self, label_field: str) -> Iterator[tuple[str, str]]:
        """(document, label) pairs: the text as `__iter__` yields it and the record's `label_field`
        (a string, or an integer taken as its decimal text). A record without the field, or with a
        label that is empty or not text, raises DataError naming the file, line and field."""
        for doc, label in self._records(label_field):
            yield doc, label  # type: ignore[misc]

    def _records(self, label_field: str | None) -> Iterator[tuple[str, str | None]]:
        self.stats = ReadStats(files=len(self.files))
        seen: set[bytes] = set()
        for src in self.files:
            self.current = src.url
            for raw, label in self._raw_records(src, label_field):
                doc = self.normalise(raw)
                if len(doc) < max(self.cfg.min_chars, 1):
                    self.stats.too_short += 1
                    continue
                if self.cfg.dedup:
                    digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
                    if digest in seen:
                        self.stats.duplicates += 1
                        continue
                    seen.add(digest)
                self.stats.documents += 1
                self.stats.characters += len(doc)
                yield doc, label
        if self.stats.documents == 0 and not self.allow_empty:
            names = ", ".join(f.url for f in self.files)
            raise DataError(f"no documents left in {names} after filtering ({self.stats.summary()}); "
                            f"check data.min_chars (now {self.cfg.min_chars}) and the sources")

    def lines(self) -> Iterator[tuple[SourceFile, int, str]]:
        """(source, line number, normalised line) for every line of every source, blank ones included,
        for line-oriented formats (tagged text): a built-in corpus gives the text field of each record."""
        self.stats = ReadStats(files=len(self.files))
        for src in self.files:
            self.current = src.url
            with open_binary(src) as f:
                lines = self._decoded_lines(src, f)
                if src.builtin:
                    lines = ((n, json.loads(line)["text"]) for n, line in lines)
                for number, line in _held_to_fingerprint(f, lines):
                    yield src, number, self.normalise(line)

    def _keys(self, label_field: str | None) -> str:
        return self.text_key + (" or finetune.label_field" if label_field is not None else "")

    def normalise(self, text: str) -> str:
        """Apply the configured normalisation to one document."""
        if self.cfg.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self._t2s is not None:
            text = self._t2s.convert(text)
        if self.cfg.clean_whitespace:
            text = _WHITESPACE.sub(" ", text).strip()
        return text

    def _raw_records(self, src: SourceFile, label_field: str | None) -> Iterator[tuple[str, str | None]]:
        """(raw text, raw label or None) for each record of one file."""
        text_field = "text" if src.builtin else self.cfg.text_field
        with open_binary(src) as f:
            yield from _held_to_fingerprint(f, self._parsed(src, f, text_field, label_field))

    def _parsed(self, src: SourceFile, f: IO[bytes], text_field: str,
                label_field: str | None) -> Iterator[tuple[str, str | None]]:
        if src.format == "parquet":  # pyarrow seeks: a compressed file is decompressed into memory first
            yield from self._parquet(src, f if f.seekable() else io.BytesIO(f.read()), text_field, label_field)
            return
        lines = self._decoded_lines(src, f)
        if src.format == "jsonl":
            yield from self._jsonl(src, lines, text_field, label_field)
        elif src.format == "csv":
            yield from self._csv(src, lines, text_field, label_field)
        elif label_field is not None:
            raise DataError(f"{src.url}: a .txt file holds only text, no {label_field!r} field for labels; "
                            "give labelled data as .jsonl, .csv or .parquet")
        else:
            yield from ((doc, None) for doc in self._txt(lines))

    def _txt(self, lines: Iterator[tuple[int, str]]) -> Iterator[str]:
        if self.cfg.txt_documents == "line":
            for _, line in lines:
                yield line.rstrip("\r\n")
            return
        para: list[str] = []
        for _, line in lines:
            if line.strip():
                para.append(line.rstrip("\r\n"))
            elif para:
                yield "\n".join(para)
                para = []
        if para:
            yield "\n".join(para)

    def _decoded_lines(self, src: SourceFile, f: IO[bytes]) -> Iterator[tuple[int, str]]:
        """(line number, text) for each line, applying data.on_decode_error to invalid UTF-8 and dropping
        a UTF-8 byte-order mark at the start (byte offsets still count it: they are the file's)."""
        offset = 0
        for number, raw in enumerate(f, 1):
            self.stats.bytes_read += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                policy = self.cfg.on_decode_error
                if policy == "error":
                    raise DataError(
                        f"{src.url}: invalid UTF-8 at byte offset {offset + e.start} (line {number}); convert the "
                        "file to UTF-8, or set data.on_decode_error to replace or skip") from None
                bad = _count_invalid(raw)
                self.stats.invalid_sequences += bad
                self.stats.damaged_files[src.url] = self.stats.damaged_files.get(src.url, 0) + bad
                if policy == "skip":
                    self.stats.skipped += 1
                    offset += len(raw)
                    continue
                text = raw.decode("utf-8", errors="replace")
            offset += len(raw)
            if number == 1 and text.startswith("\ufeff"):  # a byte-order mark: no part of the text
                text = text[1:]
            yield number, text

    def _jsonl(self, src: SourceFile, lines: Iterator[tuple[int, str]], text_field: str,
               label_field: str | None) -> Iterator[tuple[str, str | None]]:
        for number, line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{src.url}: line {number} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{src.url}: line {number} nests too deeply to be a record") from None
            where = f"{src.url}: line {number}"
            for name, key_name in ((text_field, self.text_key), (label_field, "finetune.label_field")):
                if name is not None and (not isinstance(record, dict) or name not in record):
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{where} has no field {name!r} (it has: {keys}); set {key_name}")
            value = record[text_field]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
            if _SURROGATE.search(value):
                value = self._lone_surrogates(src, where, text_field, value)
                if value is None:
                    continue
            yield value, None if label_field is None else _label(record[label_field], where, label_field)

    def _lone_surrogates(self, src: SourceFile, where: str, text_field: str, value: str) -> str | None:
        """A JSON text with lone surrogates (escapes such as \\ud800, which no UTF-8 can hold) under
        data.on_decode_error, as invalid UTF-8 is: an error, U+FFFD for each, or the record skipped (None)."""
        policy = self.cfg.on_decode_error
        if policy == "error":
            raise DataError(f"{where}: field {text_field!r} holds a lone surrogate (an escape such as \\ud800 that "
                            "is no character); fix the file, or set data.on_decode_error to replace or skip")
        bad = len(_SURROGATE.findall(value))
        self.stats.invalid_sequences += bad
        self.stats.damaged_files[src.url] = self.stats.damaged_files.get(src.url, 0) + bad
        if policy == "skip":
            self.stats.skipped += 1
            return None
        return _SURROGATE.sub("\ufffd", value)

    def _csv(self, src: SourceFile, lines: Iterator[tuple[int, str]], text_field: str,
             label_field: str | None) -> Iterator[tuple[str, str | None]]:
        rows = csv.reader(line for _, line in lines)
        try:
            header = next(rows, None)
            if header is None:
                return
            columns = {name.strip().lstrip("\ufeff"): i for i, name in enumerate(header)}
            for name in (text_field, label_field):
                if name is not None and name not in columns:
                    raise DataError(f"{src.url}: no column {name!r} in the header row (it has: "
                                    f"{', '.join(columns)}); set {self._keys(label_field)}")
            for row in rows:
                if not row:
                    continue
                where = f"{src.url}: line {rows.line_num}"
                if len(row) != len(header):
                    raise DataError(f"{where} has {len(row)} columns, the header {len(header)}")
                label = None if label_field is None else _label(row[columns[label_field]], where, label_field)
                yield row[columns[text_field]], label
        except csv.Error as e:
            raise DataError(f"{src.url}: line {rows.line_num} is not valid CSV ({e})") from None

    def _parquet(self, src: SourceFile, f: IO[bytes], text_field: str,
                 label_field: str | None) -> Iterator[tuple[str, str | None]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {src.url} needs pyarrow: pip install 'hanlm[parquet]'") from None
        try:
            table = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises its own types for a damaged file
            raise DataError(f"{src.url}: not a readable Parquet file ({e})") from None
        columns = [text_field] + ([label_field] if label_field is not None else [])
        for column in columns:
            if column not in table.schema_arrow.names:
                raise DataError(f"{src.url}: no column {column!r} (it has: {', '.join(table.schema_arrow.names)}); "
                                f"set {self._keys(label_field)}")
        row = 0
        for batch in table.iter_batches(columns=columns):
            self.stats.bytes_read += batch.nbytes
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if label_field is not None else [None] * len(texts)
            for value, label in zip(texts, labels):
                row += 1
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{src.url}: row {row}: column {text_field!r} is {type(value).__name__}, "
                                    "not text")
                yield value, None if label_field is None else _label(label, f"{src.url}: row {row}", label_field)


def _held_to_fingerprint(f: IO[bytes], items: Iterator[_T]) -> Iterator[_T]:
    """`items`, parsed from `f`, then the file checked against its fingerprint (free when reading to its end
    did it). An error met on the way (invalid UTF-8, a JSON line cut short, damaged Parquet) gives way to
    SourceChanged, caused by it, when the file changed meanwhile: the change is what needs fixing."""
    try:
        yield from items
    except SourceChanged:
        raise
    except Exception as e:
        changed = source_changed(f)
        if changed is not None:
            raise changed from e
        raise
    verify_source(f)


def _label(value: object, where: str, field_name: str) -> str:
    """A record's label as text: a non-empty string, or an integer's decimal form."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label field {field_name!r} is {type(value).__name__}, not a string or an "
                        "integer")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: label field {field_name!r} is empty")
    return text


def _count_invalid(raw: bytes) -> int:
    """How many invalid UTF-8 sequences `raw` holds (each becomes one U+FFFD under `replace`)."""
    count = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    view = raw
    while view:
        try:
            decoder.decode(view, final=True)
            break
        except UnicodeDecodeError as e:
            count += 1
            view = view[e.end:]
            decoder.reset()
    return count


def _opencc_t2s():
    try:
        import opencc
    except ImportError:
        raise DataError("data.t2s needs OpenCC: pip install 'hanlm[opencc]'") from None
    return opencc.OpenCC("t2s")
