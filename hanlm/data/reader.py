"""Data reader: text sources -> normalised documents.

A source is a built-in corpus name (`people-daily-1998`), a local file, directory or glob, or
any fsspec URL (`https://`, `sftp://`, `s3://`, `hdfs://`, `gs://` once its driver is installed).
Remote files are read through fsspec's local file cache (`$HANLM_HOME/cache`), so a second run
does not download them again. `.gz`, `.bz2` and `.zst` are decompressed on the fly.

Formats: `.txt` (a document per line or per blank-line-separated paragraph), `.jsonl` (one
field), `.csv` (one column, a header row first) and `.parquet` (one column). Labelled data for
tasks (`DocumentReader.labelled`) reads a second field or column beside the text.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import io
import json
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec

from hanlm.config import DataConfig
from hanlm.data.corpora import CORPORA, corpus_file, hanlm_home
from hanlm.errors import DataError

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class SourceFile:
    """One file to read: where it is, how to open it, and what identifies its content."""

    url: str  # as the user would write it: a local path or a URL
    local: bool
    format: str  # txt | jsonl | csv | parquet
    fingerprint: str  # changes whenever the file does (size, mtime or ETag)
    builtin: bool = False  # an extracted built-in corpus: fixed format, user format keys ignored


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


def _is_url(spec: str) -> bool:
    return "://" in spec or "::" in spec


def _suffixes(name: str) -> tuple[str, str | None]:
    """(format suffix, compression) of a file name such as `a.jsonl.zst`."""
    lower = name.lower()
    compression = None
    for ext, comp in COMPRESSIONS.items():
        if lower.endswith(ext):
            compression, lower = comp, lower[: -len(ext)]
            break
    return os.path.splitext(lower)[1], compression


def _format_of(name: str, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    ext, _ = _suffixes(name)
    if ext not in FORMATS:
        raise DataError(f"{name}: cannot tell the format from the extension {ext or '(none)'!r}; "
                        f"use .txt, .jsonl, .csv or .parquet (optionally .gz/.bz2/.zst), or set data.format")
    return FORMATS[ext]


def _readable(name: str) -> bool:
    return _suffixes(name)[0] in FORMATS


def expand_sources(specs: list[str], cfg: DataConfig) -> list[SourceFile]:
    """Resolve source specs into files, in a deterministic order. Missing ones raise DataError."""
    files: list[SourceFile] = []
    for spec in specs:
        if spec in CORPORA:
            path = corpus_file(spec)
            st = path.stat()
            files.append(SourceFile(str(path), True, "jsonl", f"{spec}:{st.st_size}:{st.st_mtime_ns}", True))
        elif _is_url(spec):
            files.extend(_expand_url(spec, cfg))
        else:
            files.extend(_expand_local(spec, cfg))
    return files


def _expand_local(spec: str, cfg: DataConfig) -> list[SourceFile]:
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not paths:
            raise DataError(f"no files match {spec!r}")
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and _readable(p.name))
        if not paths:
            raise DataError(f"directory {spec!r} holds no .txt, .jsonl, .csv or .parquet files")
    elif path.is_file():
        paths = [path]
    else:
        known = ", ".join(CORPORA)
        raise DataError(f"data source {spec!r} not found: not a file, directory, glob, URL or built-in corpus "
                        f"({known})")
    out = []
    for p in paths:
        st = p.stat()
        out.append(SourceFile(str(p), True, _format_of(p.name, cfg), f"{p}:{st.st_size}:{st.st_mtime_ns}"))
    return out


def _expand_url(spec: str, cfg: DataConfig) -> list[SourceFile]:
    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {spec!r}: {e}") from None
    protocol = spec.split("://", 1)[0] if "://" in spec else fs.protocol
    try:
        if protocol in ("http", "https"):
            paths = [path]  # HTTP has no directories: listing would download the page itself
        elif glob.has_magic(path):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if _readable(p))
        else:
            paths = [path]
        infos = [fs.info(p) for p in paths]
    except FileNotFoundError:
        raise DataError(f"data source {spec!r} not found") from None
    except OSError as e:
        raise DataError(f"cannot reach data source {spec!r}: {e}") from None
    if not paths:
        raise DataError(f"no files match {spec!r}")
    out = []
    for p, info in zip(paths, infos):
        url = fs.unstrip_protocol(p) if not p.startswith(f"{protocol}://") else p
        stamp = info.get("ETag") or info.get("etag") or info.get("Last-Modified") or info.get("mtime") or ""
        out.append(SourceFile(url, False, _format_of(p, cfg), f"{url}:{info.get('size')}:{stamp}"))
    return out


def _open_binary(src: SourceFile) -> IO[bytes]:
    """The decompressed bytes of a source, remote ones through the local file cache."""
    compression = _suffixes(src.url)[1]
    if src.local:
        opener = fsspec.open(src.url, "rb", compression=compression)
    else:
        opener = fsspec.open(f"filecache::{src.url}", "rb", compression=compression,
                             filecache={"cache_storage": str(hanlm_home() / "cache")})
    try:
        return opener.open()
    except FileNotFoundError:
        raise DataError(f"data source {src.url!r} not found") from None
    except OSError as e:
        raise DataError(f"cannot read {src.url!r}: {e}") from None


class DocumentReader:
    """Iterates over the normalised, filtered documents of some sources.

    `stats` is complete once iteration ends. A source left with no documents after filtering
    raises DataError saying what was dropped and why.
    """

    def __init__(self, sources: list[str], cfg: DataConfig, *, text_key: str = "data.text_field"):
        """`text_key`: the config key that names cfg.text_field, for error messages (fine-tuning has its own)."""
        self.cfg, self.text_key = cfg, text_key
        self.files = expand_sources(sources, cfg)
        self.stats = ReadStats()
        self.current: str | None = None  # the file being read, for errors about its records
        self._t2s = _opencc_t2s() if cfg.t2s else None

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
        if self.stats.documents == 0:
            names = ", ".join(f.url for f in self.files)
            raise DataError(f"no documents left in {names} after filtering ({self.stats.summary()}); "
                            f"check data.min_chars (now {self.cfg.min_chars}) and the sources")

    def lines(self) -> Iterator[tuple[SourceFile, int, str]]:
        """(source, line number, normalised line) for every line of every source, blank ones included,
        for line-oriented formats (tagged text): a built-in corpus gives the text field of each record."""
        self.stats = ReadStats(files=len(self.files))
        for src in self.files:
            self.current = src.url
            with _open_binary(src) as f:
                lines = self._decoded_lines(src, io.BufferedReader(f) if not hasattr(f, "peek") else f)
                if src.builtin:
                    lines = ((n, json.loads(line)["text"]) for n, line in lines)
                for number, line in lines:
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
        with _open_binary(src) as f:
            if src.format == "parquet":
                yield from self._parquet(src, f, text_field, label_field)
                return
            lines = self._decoded_lines(src, io.BufferedReader(f) if not hasattr(f, "peek") else f)
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
        """(line number, text) for each line, applying data.on_decode_error to invalid UTF-8."""
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
            yield value, None if label_field is None else _label(record[label_field], where, label_field)

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
