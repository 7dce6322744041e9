"""Where text comes from: source specs (built-in corpus names, local files, directories and globs, fsspec
URLs) expanded into `SourceFile`s with fingerprints, remote files copied into `$HANLM_HOME/cache` under
their fingerprint, filesystems whose missing drivers are named, and files opened as bytes with
`.gz`, `.bz2` and `.zst` decompressed on the fly (damage named with how far it got).
`hanlm.data.reader` turns the bytes into documents.

Sources are fingerprinted after reading too: a file whose size or modification time (a remote one's
size and ETag) differs once it has been read from what its fingerprint saw, or whose read ended at
another offset than the fingerprinted size, raises `SourceChanged` ("... changed while it was being
read"); that error wins over the decompression or decoding errors the change caused midway. It costs
one stat at the end of each file (and one fsspec info after each download), nothing per line.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass
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
    size: int | None = None  # bytes, as the fingerprint saw them (checked after each read and download)
    mtime_ns: int | None = None  # a local file's modification time, as the fingerprint saw it
    version: str | None = None  # a remote file's ETag (else its modification time), as the fingerprint saw it


class SourceChanged(DataError):
    """A source file changed while it was being read: its bytes may belong to no fingerprint at all."""


def _changed(url: str, before: int | None, after: int | None, how: str = "") -> SourceChanged:
    """The error for a file found changed: `before` the fingerprinted size, `after` the size now (None: removed)."""
    was = f"{before:,}" if before is not None else "unknown"
    now = "removed" if after is None else f"{after:,} bytes{how}"
    return SourceChanged(f"{url} changed while it was being read (size {was} → {now}); run again")


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
            files.append(SourceFile(str(path), True, "jsonl", f"{spec}:{st.st_size}:{st.st_mtime_ns}", True,
                                    size=st.st_size, mtime_ns=st.st_mtime_ns))
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
        out.append(SourceFile(str(p), True, _format_of(p.name, cfg), f"{p}:{st.st_size}:{st.st_mtime_ns}",
                              size=st.st_size, mtime_ns=st.st_mtime_ns))
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
                              size=info.get("size"), version=_version(info)))
    return out


def _stamp(info: dict) -> str:
    """What tells one version of a remote file from the next: its ETag and its modification time,
    each under the names the drivers use (http: ETag, Last-Modified; s3: ETag, LastModified; sftp: mtime)."""
    keys = ("ETag", "etag", "Last-Modified", "LastModified", "mtime", "modification_time")
    return "|".join(str(info[k]) for k in keys if info.get(k))


def _version(info: dict) -> str:
    """What a second look at a remote file compares: its ETag where the driver gives one (a listing's and a
    HEAD's agree; their modification times need not, S3's differ in precision), else its `_stamp`."""
    etag = info.get("ETag") or info.get("etag")
    return f"ETag {etag}" if etag else _stamp(info)


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
            raise _changed(src.url, src.size, got, " downloaded")
        _check_after_download(src, fs, path)
    for old in folder.iterdir():  # older versions of the same URL; temporaries (dot names) are atomic_path's
        if old != copy and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return copy


def _check_after_download(src: SourceFile, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """One fsspec info after a download: a remote file whose size or version (ETag, else modification time)
    is no longer the fingerprinted one changed while it was being downloaded (SourceChanged)."""
    try:
        fs.invalidate_cache(path)  # the server's answer now, not the listing's
        info = fs.info(path)
    except FileNotFoundError:
        raise _changed(src.url, src.size, None) from None
    except Exception as e:  # the driver's own types, as in filesystem()
        raise DataError(f"cannot download {src.url!r}: {type(e).__name__}: {_first_line(e)}") from None
    size = info.get("size")
    if src.size is not None and size is not None and size != src.size:
        raise _changed(src.url, src.size, size)
    if src.version is not None and _version(info) != src.version:
        raise _changed(src.url, src.size, size, f", {src.version} → {_version(info)}")


def source_changed(f: IO[bytes]) -> SourceChanged | None:
    """The error to raise if the source `f` (from `open_binary`) is no longer as fingerprinted (one stat now),
    else None. For the reader to call when the bytes make no sense (invalid UTF-8, a record cut short): a
    change explains them."""
    return _watched(f).changed()


def verify_source(f: IO[bytes]) -> None:
    """Raise SourceChanged if the source `f` (from `open_binary`) changed since it was fingerprinted; free when
    reading it to its end checked it already."""
    watched = _watched(f)
    if not watched.verified:
        watched.verify(None)


def _watched(f: IO[bytes]) -> _Watched:
    raw = f.raw  # type: ignore[attr-defined]
    return raw if isinstance(raw, _Watched) else raw.watched


def open_binary(src: SourceFile) -> IO[bytes]:
    """The decompressed bytes of a source, buffered; remote ones from their cached copy. Reading to the end of
    the file checks it against its fingerprint (SourceChanged); `source_changed` and `verify_source` check it
    on demand."""
    compression = _suffixes(src.url)[1]
    path = Path(src.url) if src.local else _cached_copy(src)
    try:
        # A remote file's cached copy is checked against the fingerprinted size only: the copy's own
        # modification time is no part of the fingerprint (another run may place the same copy anew).
        watched = _Watched(path, src.url, src.size, src.mtime_ns if src.local else None)
    except FileNotFoundError:
        raise DataError(f"data source {src.url!r} not found") from None
    except OSError as e:
        raise DataError(f"cannot read {src.url!r}: {e}") from None
    if compression is None:
        return io.BufferedReader(watched, buffer_size=_CHUNK)
    raw = io.BufferedReader(watched, buffer_size=_CHUNK)
    return io.BufferedReader(_Decompressing(raw, compression, src.url, watched), buffer_size=_CHUNK)


class _Watched(io.RawIOBase):
    """A source file's raw bytes, held to its fingerprint. Reaching the end of the file stats it once (one stat a
    file, none per line) and raises SourceChanged when its size or modification time differ from the
    fingerprinted ones, or when a front-to-back read ended at another offset than the fingerprinted size."""

    def __init__(self, path: Path, url: str, size: int | None, mtime_ns: int | None):
        super().__init__()
        self._file = open(path, "rb", buffering=0)
        self._path, self._url = path, url
        # A SourceFile made without them (by hand, by an older hanlm) is held to the file as it was opened.
        self._size = os.fstat(self._file.fileno()).st_size if size is None else size
        self._mtime_ns = mtime_ns
        self._read = 0  # bytes read front to back; None once the file was seeked (Parquet)
        self.verified = False  # the end of the file was reached and checked

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self._file.seek(offset, whence)
        if position != self._read:
            self._read = None
        return position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        if n:
            if self._read is not None:
                self._read += n
        elif len(memoryview(buffer)) and not self.verified:  # the end of the file
            self.verify(self._read)
        return n

    def verify(self, read: int | None) -> None:
        """Raise SourceChanged if the file changed; `read`: the bytes a front-to-back read got, if it was one."""
        self.verified = True
        error = self.changed(read)
        if error is not None:
            raise error

    def changed(self, read: int | None = None) -> SourceChanged | None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return _changed(self._url, self._size, None)
        except OSError as e:
            return SourceChanged(f"{self._url} changed while it was being read (it can no longer be looked at: {e}); "
                                 "run again")
        if st.st_size != self._size:
            return _changed(self._url, self._size, st.st_size)
        if self._mtime_ns is not None and st.st_mtime_ns != self._mtime_ns:
            return _changed(self._url, self._size, st.st_size, ", modified meanwhile")
        if read is not None and read != self._size:
            return _changed(self._url, self._size, read, " read")
        return None

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _Decompressing(io.RawIOBase):
    """The decompressed bytes of a compressed file. A stream that ends early or holds bad bytes raises
    DataError naming the file, the decompressed bytes read before the error, and how far into the
    compressed file the decompressor had read (it reads ahead, so that is where the damage was seen); unless
    the file changed since it was fingerprinted, which explains the damage: then SourceChanged."""

    def __init__(self, raw: IO[bytes], compression: str, name: str, watched: _Watched):
        super().__init__()
        self._raw, self._compression, self._name, self.watched = raw, compression, name, watched
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
            changed = self.watched.changed()  # a file cut short or rewritten while read: that is the error
            if changed is not None:
                raise changed from e
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
