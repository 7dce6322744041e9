"""Data reader: text sources -> normalised documents.

A source is a built-in corpus name (`people-daily-1998`), a local file, directory or glob, or
any fsspec URL (`https://`, `sftp://`, `s3://`, `hdfs://`, `gs://` once its driver is installed).
Remote files are copied into `$HANLM_HOME/cache` under their fingerprint (URL, size and ETag /
modification time), so a second run with an unchanged file does not download it again and a
changed file is always downloaded afresh: the bytes read are the bytes fingerprinted. `.gz`,
`.bz2` and `.zst` are decompressed on the fly; a truncated or damaged stream is a DataError that
names the file and how far it got. A UTF-8 byte-order mark at the start of a file is dropped.

Formats: `.txt` (a document per line or per blank-line-separated paragraph), `.jsonl` (one
field), `.csv` (one column, a header row first) and `.parquet` (one column). Labelled data for
tasks (`DocumentReader.labelled`) reads a second field or column beside the text.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec
import zstandard
from fsspec.implementations.local import LocalFileSystem

from hanlm.atomic import atomic_path
from hanlm.config import DataConfig
from hanlm.data.corpora import CORPORA, corpus_file, hanlm_home
from hanlm.errors import DataError, HanlmError

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}
FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_WHITESPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")
# What each decompressor raises on a truncated or damaged stream: gzip EOFError, BadGzipFile (an OSError)
# or zlib.error; bz2 OSError or EOFError; zstandard ZstdError (and our EOFError for a truncated frame).
_DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, zstandard.ZstdError)
_CHUNK = 1 << 16

# What a protocol's driver needs, said when it is missing or cannot start.
_DRIVER_HELP = {
    "sftp": "sftp:// needs paramiko (pip install paramiko); it logs in with ssh-agent or ~/.ssh/id_* keys, "
            "or the key in FSSPEC_SFTP_KEY_FILENAME",
    "s3": "s3:// needs s3fs (pip install 'hanlm[s3]'); credentials and endpoint come from AWS_ACCESS_KEY_ID, "
          "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL_S3 (or ~/.aws)",
    "hdfs": "hdfs:// needs a driver: pip install 'hanlm[hdfs]' (hdfs-native, no Java needed), or pyarrow's "
            "libhdfs with a Java runtime (JAVA_HOME pointing at a JDK with lib/server/libjvm.so), a Hadoop client "
            "(HADOOP_HOME) and its jars (export CLASSPATH=$($HADOOP_HOME/bin/hdfs classpath --glob))",
}
_DRIVER_HELP.update(ssh=_DRIVER_HELP["sftp"], s3a=_DRIVER_HELP["s3"], arrow_hdfs=_DRIVER_HELP["hdfs"],
                    viewfs=_DRIVER_HELP["hdfs"])


@dataclass(frozen=True)
class SourceFile:
    """One file to read: where it is, how to open it, and what identifies its content."""

    url: str  # as the user would write it: a local path or a URL
    local: bool
    format: str  # txt | jsonl | csv | parquet
    fingerprint: str  # changes whenever the file does (size, mtime or ETag)
    builtin: bool = False  # an extracted built-in corpus: fixed format, user format keys ignored
    size: int | None = None  # bytes, as the fingerprint saw them (checks a remote file's download)


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


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].rsplit("::", 1)[-1].lower() if "://" in url else "file"


def filesystem(url: str, error: type[HanlmError] = DataError) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem for `url` and the path inside it. A missing driver, one that cannot start
    (HDFS without its JVM) or a server that cannot be reached or refuses the login raises `error`
    naming the URL and, for the protocols hanlm documents, what to install or set."""
    try:
        return fsspec.core.url_to_fs(url)
    # Drivers connect here and raise their own types (paramiko's SSHException, pyarrow's OSError for a
    # missing libjvm, socket errors): every one of them becomes a message naming the URL.
    except Exception as e:
        help_text = _DRIVER_HELP.get(_protocol(url))
        raise error(f"cannot open {url}: {type(e).__name__}: {_first_line(e)}"
                    + (f"; {help_text}" if help_text else "")) from None


def _first_line(e: BaseException) -> str:
    """An exception's message, its first line only (pyarrow's libjvm error lists every path it tried)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _url_prefix(spec: str, path: str) -> str | None:
    """What the user wrote before the filesystem path fsspec found in `spec` (`sftp://user@host:2222` of
    `sftp://user@host:2222/data`, `s3://` of `s3://bucket/data`), so found files keep the user, host and
    port; None when the path is not a tail of the spec (chained URLs)."""
    stripped, tail = spec.rstrip("/"), path.rstrip("/")
    return stripped[: len(stripped) - len(tail)] if stripped.endswith(tail) else None


def _expand_url(spec: str, cfg: DataConfig) -> list[SourceFile]:
    fs, path = filesystem(spec)
    if isinstance(fs, LocalFileSystem):  # file://: read in place like any local path
        return _expand_local(path, cfg)
    protocol = _protocol(spec)
    try:
        fs.invalidate_cache()  # a fingerprint must come from the server, not from an earlier listing
        if protocol in ("http", "https"):
            paths = [path]  # HTTP has no directories: listing would download the page itself
        elif glob.has_magic(path):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if _readable(p))
        else:
            paths = [path]
        infos = [fs.info(p) for p in paths]
    except FileNotFoundError as e:
        # fsspec's http driver reports every failed request so (a refused connection, an untrusted
        # certificate), with the real error as the cause: only a 404 means not found.
        cause = e.__cause__
        if protocol in ("http", "https") and cause is not None and getattr(cause, "status", None) != 404:
            raise DataError(f"cannot reach data source {spec!r}: {type(cause).__name__}: {_first_line(cause)}") \
                from None
        raise DataError(f"data source {spec!r} not found") from None
    except Exception as e:  # drivers raise their own types for a refused or broken connection
        raise DataError(f"cannot reach data source {spec!r}: {type(e).__name__}: {_first_line(e)}") from None
    if not paths:
        raise DataError(f"no files match {spec!r}")
    prefix = _url_prefix(spec, path)
    out = []
    for p, info in zip(paths, infos):
        url = p if p.startswith(f"{protocol}://") else prefix + p if prefix is not None else fs.unstrip_protocol(p)
        out.append(SourceFile(url, False, _format_of(p, cfg), f"{url}:{info.get('size')}:{_stamp(info)}",
                              size=info.get("size")))
    return out


def _stamp(info: dict) -> str:
    """What tells one version of a remote file from the next: its ETag and its modification time,
    each under the names the drivers use (http: ETag, Last-Modified; s3: ETag, LastModified; sftp: mtime)."""
    keys = ("ETag", "etag", "Last-Modified", "LastModified", "mtime", "modification_time")
    return "|".join(str(info[k]) for k in keys if info.get(k))


def _cached_copy(src: SourceFile) -> Path:
    """A local copy of a remote source, under `$HANLM_HOME/cache/<hash of URL>/<hash of fingerprint>-<name>`.

    The fingerprint in the name is the one `expand_sources` took, so the bytes read always belong to
    the fingerprint recorded: an unchanged file is served from the copy, a changed one (new size,
    ETag or mtime) is downloaded again and replaces the older copies of the same URL."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    folder = hanlm_home() / "cache" / digest(src.url)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", src.url.rsplit("/", 1)[-1])[-100:]
    copy = folder / f"{digest(src.fingerprint)}-{name}"
    if copy.is_file():
        return copy
    fs, path = filesystem(src.url)
    with atomic_path(copy) as tmp:
        try:
            fs.get_file(path, str(tmp))
        except FileNotFoundError:
            raise DataError(f"data source {src.url!r} not found") from None
        except Exception as e:  # the driver's own types, as in filesystem()
            raise DataError(f"cannot download {src.url!r}: {type(e).__name__}: {_first_line(e)}") from None
        got = tmp.stat().st_size
        if src.size is not None and got != src.size:
            raise DataError(f"{src.url} changed while it was being read ({src.size:,} bytes when listed, "
                            f"{got:,} downloaded); run again")
    for old in folder.iterdir():  # older versions of the same URL; temporaries (dot names) are atomic_path's
        if old != copy and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return copy


def _open_binary(src: SourceFile) -> IO[bytes]:
    """The decompressed bytes of a source, buffered; remote ones from their cached copy."""
    compression = _suffixes(src.url)[1]
    path = Path(src.url) if src.local else _cached_copy(src)
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"data source {src.url!r} not found") from None
    except OSError as e:
        raise DataError(f"cannot read {src.url!r}: {e}") from None
    if compression is None:
        return raw
    return io.BufferedReader(_Decompressing(raw, compression, src.url), buffer_size=_CHUNK)


class _Decompressing(io.RawIOBase):
    """The decompressed bytes of a compressed file. A stream that ends early or holds bad bytes raises
    DataError naming the file, the decompressed bytes read before the error, and how far into the
    compressed file the decompressor had read (it reads ahead, so that is where the damage was seen)."""

    def __init__(self, raw: IO[bytes], compression: str, name: str):
        super().__init__()
        self._raw, self._compression, self._name = raw, compression, name
        self._stream: IO[bytes] = {"gzip": lambda: gzip.GzipFile(fileobj=raw, mode="rb"),
                                   "bz2": lambda: bz2.BZ2File(raw, "rb"),
                                   "zstd": lambda: _ZstdFrames(raw)}[compression]()
        self.delivered = 0  # decompressed bytes handed out so far

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            n = self._stream.readinto(buffer)
        except _DECOMPRESSION_ERRORS as e:
            raise DataError(self._damage(e)) from None
        self.delivered += n
        return n

    def _damage(self, e: BaseException) -> str:
        reached, total = self._raw.tell(), os.fstat(self._raw.fileno()).st_size
        where = "the file ends early (truncated?)" if isinstance(e, EOFError) else "bad bytes in the stream"
        return (f"{self._name}: damaged {self._compression} data, {where}: {self.delivered:,} decompressed bytes "
                f"were read, the decompressor stopped at compressed byte offset {reached:,} of {total:,} "
                f"({type(e).__name__}: {_first_line(e)}); copy or download the file again, or recompress it")

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._raw.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """zstd frames, one after another, decompressed. zstandard's own stream reader ends quietly at a
    truncated frame (the rest of the file simply goes missing); this raises EOFError instead."""

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self._raw, self._dctx = raw, zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the current frame
        self._out, self._pos = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the input ends inside a zstd frame")
                return 0
            self._out, self._pos = memoryview(self._feed(chunk)), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
        return b"".join(out)


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
            with _open_binary(src) as f:
                lines = self._decoded_lines(src, f)
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
