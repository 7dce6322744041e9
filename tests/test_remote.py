"""Remote data sources and checkpoint directories against real servers on loopback.

Each server is started here: OpenSSH's sshd (key auth, `make test` installs Debian's openssh-server),
an HTTP(S) server that sends ETag and Last-Modified, and moto's S3-compatible server. A missing server
skips its tests with a message, except under HANLM_REQUIRE_SERVERS=1 (the Makefile sets it), where it
fails them: CI never skips silently. Downloads are counted in each server's own request log.
"""

import datetime
import getpass
import gzip
import http.server
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import pytest
import torch

from hanlm.checkpoint import (
    list_checkpoints,
    load_latest,
    probe_writable,
    save_checkpoint,
    set_aside,
)
from hanlm.loading import resolve_checkpoint
from hanlm.config import DataConfig, load_config
from hanlm.data.prepare import prepare
from hanlm.data.reader import DocumentReader
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import CheckpointError, DataError
from hanlm.models import build_model
from hanlm.train.loop import Trainer

quiet = lambda _: None  # noqa: E731
STARTUP_S = 30  # how long a server may take to accept connections before its test fails


def unavailable(what: str) -> None:
    """Skip (or, under HANLM_REQUIRE_SERVERS=1, fail) a test whose server cannot be had here."""
    message = f"{what} is not available: `make test` installs it"
    if os.environ.get("HANLM_REQUIRE_SERVERS") == "1":
        pytest.fail(message + " (HANLM_REQUIRE_SERVERS=1: no skipping)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(sources: list[str], **cfg) -> list[str]:
    return list(DocumentReader(sources, DataConfig(**cfg)))


@pytest.fixture(scope="module")
def sample(people_daily) -> list[str]:
    return people_daily[:300]


# -- sshd ----------------------------------------------------------------------------------------

@dataclass
class Sshd:
    root: Path  # served as-is: sftp paths are this machine's paths
    base: str  # sftp://user@127.0.0.1:PORT
    key: Path
    log: Path  # the sftp server's log: one `open "PATH" flags READ` line per file read

    def url(self, path: Path) -> str:
        return f"{self.base}{path}"

    def reads(self, path: Path) -> int:
        return self.log.read_text().count(f'open "{path}" flags READ')


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """One OpenSSH sshd for the session, on a free loopback port, logging in with a key made here.
    The key reaches fsspec's sftp driver the way a user's would: FSSPEC_SFTP_KEY_FILENAME (read when
    fsspec is imported, so subprocesses get it; this process gets the same through fsspec.config)."""
    daemon, sftp_server = Path("/usr/sbin/sshd"), Path("/usr/lib/openssh/sftp-server")
    if not (daemon.exists() and sftp_server.exists() and shutil.which("ssh-keygen")):
        unavailable("OpenSSH's sshd (Debian's openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    # The sftp server logs each open to stderr with -e; the wrapper keeps that log for the tests.
    wrapper = d / "sftp-logged"
    wrapper.write_text(f"#!/bin/sh\nexec {sftp_server} -e -l INFO 2>>{d / 'sftp.log'}\n")
    wrapper.chmod(0o755)
    port = free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile {d / 'sshd.pid'}
Subsystem sftp {wrapper}
""")
    (d / "sftp.log").touch()
    try:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    except PermissionError:
        unavailable("/run/sshd (sshd's privilege-separation directory, which needs root to create)")
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([str(daemon), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, d / "sshd.log")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FSSPEC_SFTP_KEY_FILENAME", str(d / "user_key"))
            mp.setitem(fsspec.config.conf, "sftp", {"key_filename": str(d / "user_key")})
            served = d / "served"
            served.mkdir()
            yield Sshd(served, f"sftp://{getpass.getuser()}@127.0.0.1:{port}", d / "user_key", d / "sftp.log")
    finally:
        proc.terminate()
        proc.wait(timeout=STARTUP_S)


def wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    """Return once something accepts connections on `port`; fail with the server's log if it died
    or did not listen within STARTUP_S."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"sshd did not listen on port {port} within {STARTUP_S} s:\n{log.read_text()}")
            time.sleep(0.05)


def test_sftp_sources_keep_user_host_and_port_and_download_once(sshd, sample):
    corpus = sshd.root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("\n".join(sample[:100]) + "\n", encoding="utf-8")
    with gzip.open(corpus / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in sample[100:150])
    reader = DocumentReader([sshd.url(corpus)], DataConfig())
    assert [f.url for f in reader.files] == [sshd.url(corpus / "a.txt"), sshd.url(corpus / "sub" / "b.jsonl.gz")]
    assert list(reader) == sample[:150]
    assert read([sshd.url(corpus) + "/*.txt"]) == sample[:100]
    assert sshd.reads(corpus / "a.txt") == 1, "the second read downloaded again"

    (corpus / "a.txt").write_text("\n".join(sample[:101]) + "\n", encoding="utf-8")
    assert read([sshd.url(corpus / "a.txt")]) == sample[:101]
    assert sshd.reads(corpus / "a.txt") == 2


def test_prepare_fingerprints_sftp_sources_and_rebuilds_when_they_change(sshd, sample, tmp_path):
    path = sshd.root / "prep.txt"
    path.write_text("\n".join(sample) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source=[{sshd.url(path)}]", "tokenizer.kind=char"])
    first = prepare(cfg, tmp_path / "out", progress=False)
    assert first.meta["sources"]["train"][0].startswith(f"{sshd.url(path)}:")
    assert prepare(cfg, tmp_path / "out", progress=False).reused
    path.write_text("\n".join(sample + ["新增的一篇文档，内容与众不同"]) + "\n", encoding="utf-8")
    os.utime(path, (time.time() + 10, time.time() + 10))  # sftp reports whole seconds
    again = prepare(cfg, tmp_path / "out", progress=False)
    splits = again.meta["splits"]
    assert not again.reused and sum(s["documents"] for s in splits.values()) == 301


# -- checkpoint directories: sftp, file:// and S3 ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config("tiny", ["checkpoint.keep_last=2"])
    tokenizer = train_tokenizer("char", ["人民日报记者新华社"])
    return cfg, tokenizer, build_model(cfg.model, tokenizer.vocab_size)


def flip(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


def check_checkpoint_root(root: str, tiny_model, server_names, damage) -> None:
    """Save, prune, resume, catch a damaged file and set it aside under `root`; `server_names()` lists
    the root as the server sees it, `damage(name)` flips bytes of a file there."""
    cfg, tokenizer, model = tiny_model
    probe_writable(root)
    for step in (1, 2, 3):
        assert save_checkpoint(root, model, cfg, tokenizer, {"step": step}, note=quiet) == f"{root}/step-{step:08d}"
    assert list_checkpoints(root) == ["step-00000002", "step-00000003"]
    names = server_names()
    assert {"step-00000002", "step-00000003", "latest"} <= names and "step-00000001" not in names, names
    assert not any(n.startswith(".probe.") for n in names), names
    assert resolve_checkpoint(root) == f"{root}/step-00000003"
    latest = load_latest(root)
    assert latest.step == 3
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in latest.weights.items())

    damage("step-00000003/model.safetensors")
    warnings: list[str] = []
    assert load_latest(root, warn=warnings.append).step == 2
    assert "step-00000003/model.safetensors is damaged" in "\n".join(warnings)
    moved = set_aside(root, ["step-00000003"], "damaged")
    assert moved.startswith(f"{root}/damaged-") and list_checkpoints(root) == ["step-00000002"]


def test_sftp_checkpoint_dir_saves_prunes_resumes_and_catches_damage(sshd, tiny_model):
    where = sshd.root / "ckpts"

    def damage(name):
        (where / name).write_bytes(flip((where / name).read_bytes()))

    check_checkpoint_root(sshd.url(where), tiny_model, lambda: set(os.listdir(where)), damage)


def test_file_url_checkpoint_dir_saves_prunes_resumes_and_catches_damage(tmp_path, tiny_model):
    where = tmp_path / "ckpts"

    def damage(name):
        (where / name).write_bytes(flip((where / name).read_bytes()))

    check_checkpoint_root(f"file://{where}", tiny_model, lambda: set(os.listdir(where)), damage)


def test_training_over_sftp_resumes_from_the_remote_checkpoint(sshd, sample, tmp_path):
    """The one end-to-end run: tiny model, a few steps, checkpoints on the sftp server, then --resume auto."""
    data = tmp_path / "data.txt"
    data.write_text("\n".join(sample) + "\n", encoding="utf-8")
    root = sshd.url(sshd.root / "run-ckpts")

    def cfg(steps):
        return load_config("tiny", [f"train.run_dir={tmp_path / 'run'}", f"data.source=[{data}]",
                                    f"checkpoint.dir={root}", f"train.max_steps={steps}", "checkpoint.every_steps=2",
                                    "checkpoint.keep_last=1", "eval.every_steps=100", "eval.max_batches=1",
                                    "generate.max_tokens=2", "log.peak_tflops=0.1"])

    first = Trainer(cfg(4), echo=quiet).run()
    assert first.checkpoint == f"{root}/step-00000004"
    assert sorted(n for n in os.listdir(sshd.root / "run-ckpts") if n.startswith("step-")) == ["step-00000004"]
    resumed = Trainer(cfg(6), resume="auto", echo=quiet)
    assert resumed.resumed_from == f"{root}/step-00000004" and resumed.step == 4
    assert resumed.run().checkpoint == f"{root}/step-00000006"


# -- the probe: an unwritable checkpoint.dir stops a run before its first step ---------------------------

def test_probe_names_each_unwritable_root_and_why(sshd, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    (sshd.root / "a-file").write_text("not a directory")
    for root in (f"{blocker}/ckpts", sshd.url(sshd.root / "a-file" / "ckpts"),
                 f"sftp://{getpass.getuser()}@127.0.0.1:{free_port()}/ckpts"):
        with pytest.raises(CheckpointError, match=re.escape(root)):
            probe_writable(root)


def test_a_run_with_an_unwritable_checkpoint_dir_stops_before_its_first_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    root = f"{blocker}/ckpts"
    proc = subprocess.run([sys.executable, "-m", "hanlm.cli", "train", "--config", "tiny", "--set",
                           f"train.run_dir={tmp_path / 'run'}", "--set", f"checkpoint.dir={root}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"hanlm: error: checkpoint directory {root} cannot be written" in proc.stderr
    assert "Traceback" not in proc.stderr and "step 1" not in proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- HTTP(S) ---------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory with Last-Modified (the base class does) and an ETag of size and mtime (as
    nginx does), and keeps its request log in `server.log`."""

    def send_header(self, keyword, value):
        super().send_header(keyword, value)
        if keyword == "Last-Modified":
            st = os.stat(self.translate_path(self.path))
            super().send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')

    def log_request(self, code="-", size="-"):
        self.server.log.append((self.command, urlsplit(self.path).path, int(code)))

    def log_message(self, *args):
        pass


@dataclass
class Web:
    root: Path
    base: str
    log: list

    def downloads(self, path: str) -> int:
        return sum(1 for method, p, code in self.log if method == "GET" and p == path and code == 200)


def serve(root: Path, context: ssl.SSLContext | None = None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **k: _Handler(*a, directory=str(root), **k))
    server.log = []
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def web(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = serve(root)
    yield Web(root, f"http://127.0.0.1:{server.server_address[1]}", server.log)
    server.shutdown()
    server.server_close()


def test_http_source_is_downloaded_once_and_again_whenever_it_changes(web, sample):
    path = web.root / "pd.txt"

    def publish(docs, mtime):
        path.write_text("\n".join(docs) + "\n", encoding="utf-8")
        os.utime(path, (mtime, mtime))

    url = f"{web.base}/pd.txt"
    publish(sample, 1_700_000_000)
    assert read([url]) == sample and web.downloads("/pd.txt") == 1
    assert read([url]) == sample and web.downloads("/pd.txt") == 1, "an unchanged file was downloaded again"

    publish(sample + ["新增的一篇文档"], 1_700_000_100)  # a new size
    assert read([url]) == sample + ["新增的一篇文档"] and web.downloads("/pd.txt") == 2

    size = path.stat().st_size
    publish(sample + ["新增的一篇文章"], 1_700_000_200)  # the same size, new content and mtime
    assert path.stat().st_size == size
    assert read([url]) == sample + ["新增的一篇文章"] and web.downloads("/pd.txt") == 3


def test_compressed_http_source_is_read_through_the_cache(web, sample):
    with gzip.open(web.root / "pd.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in sample)
    url = f"{web.base}/pd.jsonl.gz"
    assert read([url]) == sample and read([url]) == sample and web.downloads("/pd.jsonl.gz") == 1


def test_prepare_records_the_fingerprint_of_the_bytes_it_read(web, sample, tmp_path):
    path = web.root / "pd.txt"
    path.write_text("\n".join(sample) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"data.source=[{web.base}/pd.txt]", "tokenizer.kind=char"])
    prepare(cfg, tmp_path / "out", progress=False)
    path.write_text("\n".join(sample + ["另一篇新的文档"]) + "\n", encoding="utf-8")
    again = prepare(cfg, tmp_path / "out", progress=False)
    splits = again.meta["splits"]
    assert sum(s["documents"] for s in splits.values()) == 301
    etag = f'"{path.stat().st_size:x}-{path.stat().st_mtime_ns:x}"'
    assert etag in again.meta["sources"]["train"][0]


def test_missing_url_is_a_clear_error(web):
    with pytest.raises(DataError, match=r"data source '.*/nope\.txt' not found"):
        read([f"{web.base}/nope.txt"])


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with cryptography (paramiko's dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_with_a_self_signed_certificate_the_client_trusts(tmp_path, sample, monkeypatch):
    cert, key = self_signed(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    root = tmp_path / "www"
    root.mkdir()
    (root / "pd.txt").write_text("\n".join(sample) + "\n", encoding="utf-8")
    server = serve(root, server_side)
    url = f"https://127.0.0.1:{server.server_address[1]}/pd.txt"
    try:
        with pytest.raises(DataError, match=r"cannot reach data source .*pd\.txt'.*certificate verify failed"):
            read([url])  # not trusted yet
        monkeypatch.setitem(fsspec.config.conf, "https", {"ssl": ssl.create_default_context(cafile=str(cert))})
        assert read([url]) == sample and read([url]) == sample
        assert sum(1 for m, p, c in server.log if m == "GET" and p == "/pd.txt" and c == 200) == 1
    finally:
        server.shutdown()
        server.server_close()


# -- S3 (moto's S3-compatible server) ------------------------------------------------------------------

class _Requests(logging.Handler):
    """moto's server logs each request through werkzeug: `"GET /bucket/key HTTP/1.1" 200 -`."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record):
        m = re.search(r'"([A-Z]+) (\S+) HTTP', record.getMessage())
        if m:
            self.lines.append((m.group(1), m.group(2)))


@dataclass
class S3:
    fs: object
    bucket: str
    requests: _Requests

    def downloads(self, key: str) -> int:
        return sum(1 for method, target in self.requests.lines if method == "GET" and target == f"/{self.bucket}/{key}")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's standalone S3 server on a free loopback port; s3fs finds it through AWS_ENDPOINT_URL_S3 and
    the AWS_* credentials, as a user's own S3-compatible store (MinIO, Ceph) would be found."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        unavailable("moto[server] and s3fs (pip install -e '.[test]')")
    requests = _Requests()
    logging.getLogger("werkzeug").addHandler(requests)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ACCESS_KEY_ID": "hanlm", "AWS_SECRET_ACCESS_KEY": "hanlm-secret",
                            "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("hanlm-test")
        yield S3(fs, "hanlm-test", requests)
    server.stop()
    logging.getLogger("werkzeug").removeHandler(requests)


def test_s3_source_is_downloaded_once_and_again_when_it_changes(s3, sample):
    s3.fs.pipe("hanlm-test/corpus/a.txt", ("\n".join(sample) + "\n").encode())
    s3.fs.pipe("hanlm-test/corpus/notes.md", b"ignored")
    reader = DocumentReader(["s3://hanlm-test/corpus"], DataConfig())
    assert [f.url for f in reader.files] == ["s3://hanlm-test/corpus/a.txt"]
    assert list(reader) == sample and read(["s3://hanlm-test/corpus/a.txt"]) == sample
    assert s3.downloads("corpus/a.txt") == 1
    s3.fs.pipe("hanlm-test/corpus/a.txt", ("\n".join(sample[:-1] + ["改过的最后一篇"]) + "\n").encode())
    assert read(["s3://hanlm-test/corpus"]) == sample[:-1] + ["改过的最后一篇"]
    assert s3.downloads("corpus/a.txt") == 2


def test_s3_checkpoint_dir_saves_prunes_resumes_and_catches_damage(s3, tiny_model):
    def names():
        return {p.rsplit("/", 1)[-1] for p in s3.fs.ls("hanlm-test/ckpts", refresh=True)}

    def damage(name):
        key = f"hanlm-test/ckpts/{name}"
        s3.fs.pipe(key, flip(s3.fs.cat(key)))

    check_checkpoint_root("s3://hanlm-test/ckpts", tiny_model, names, damage)


# -- HDFS: no server can be had here; the driver's absence must be a clear error --------------------------

def test_hdfs_without_a_jvm_says_what_to_install(monkeypatch, tmp_path):
    driver = fsspec.get_filesystem_class("hdfs")
    if not driver.__module__.startswith("fsspec.implementations.arrow"):
        pytest.skip(f"hdfs:// goes to {driver.__module__} here; this test is about pyarrow's libhdfs")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no libjvm.so there: a machine without Java
    for name in ("HADOOP_HOME", "CLASSPATH"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DataError, match=r"cannot open hdfs://namenode:8020/corpus/\*\.txt: .*hanlm\[hdfs\].*JAVA_HOME"):
        DocumentReader(["hdfs://namenode:8020/corpus/*.txt"], DataConfig())
    with pytest.raises(CheckpointError, match=r"cannot open hdfs://namenode:8020/ckpts: .*hanlm\[hdfs\].*HADOOP_HOME"):
        probe_writable("hdfs://namenode:8020/ckpts")
