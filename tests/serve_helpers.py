"""What the serve tests share: tiny checkpoints trained once per session, live servers on 127.0.0.1,
and patches that make a model's timing the test's to decide (a gate it holds, a failure it plans)."""

import functools
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from hanlm.loading import load_for_inference
from hanlm.config import load_config
from hanlm.serve.app import create_app
from hanlm.train.loop import Trainer
from hanlm.train.ngram import train_ngram

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT_S = 30  # the longest any test waits for a server to reach a state


def tiny(run_dir, *overrides):
    return load_config("tiny", [f"train.run_dir={run_dir}", "train.max_steps=30", "checkpoint.every_steps=30",
                                "eval.every_steps=30", "generate.max_tokens=4", *overrides])


@functools.cache
def trained(root: Path, arch: str) -> str:
    """A tiny checkpoint of `arch` (the GPT's context is the tiny preset's 128), trained once per session
    under `root`, whichever test file asks for it first."""
    cfg = tiny(root / arch, f"model.arch={arch}", *(["model.order=3"] if arch == "ngram" else []))
    if arch == "ngram":
        return train_ngram(cfg, echo=lambda _: None)[0].checkpoint
    return Trainer(cfg, echo=lambda _: None).run().checkpoint


class Checkpoints:
    """checkpoints["gpt"], ["lstm"], ["ngram"]: each trained when a test first asks for it."""

    def __init__(self, root: Path):
        self.root = root

    def __getitem__(self, arch: str) -> str:
        return trained(self.root, arch)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Import it into a test file to use it; every file gets the same checkpoints."""
    return Checkpoints(tmp_path_factory.getbasetemp() / "serve-checkpoints")


class _Patch:
    """Wraps one method of a model; `before(call)` runs ahead of each call (numbered from 1)."""

    def __init__(self, method: str):
        self.method, self.calls = method, 0

    def install(self, model) -> None:
        through = getattr(model, self.method)

        def patched(*args, **kwargs):
            self.calls += 1
            self.before(self.calls)
            return through(*args, **kwargs)

        setattr(model, self.method, patched)

    def before(self, call: int) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Lets every held call go on (before the server stops)."""


class Gate(_Patch):
    """Holds a model method from its (after + 1)-th call on until the test opens the gate, so a test can
    act while a generation is certainly still running (or still prefilling), however fast or loaded the
    machine is. `reached` is set when a call is held."""

    def __init__(self, method: str, after: int = 0):
        super().__init__(method)
        self.after = after
        self.reached, self.opened = threading.Event(), threading.Event()

    def before(self, call: int) -> None:
        if call > self.after:
            self.reached.set()
            assert self.opened.wait(WAIT_S), "the test never opened the gate"

    def wait_reached(self) -> None:
        assert self.reached.wait(WAIT_S), f"{self.method} was not called {self.after + 1} times"

    def release(self) -> None:
        self.opened.set()


class FailAfter(_Patch):
    """Makes a model method raise from its (calls + 1)-th call on, as a model that breaks mid-generation."""

    def __init__(self, method: str, calls: int):
        super().__init__(method)
        self.limit = calls

    def before(self, call: int) -> None:
        if call > self.limit:
            raise RuntimeError(f"injected failure at call {call} of {self.method}")


class LiveServer:
    """uvicorn in a thread on a free loopback port; `on_exit` runs before it shuts down."""

    def __init__(self, app, on_exit=()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app, self.on_exit = app, on_exit
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self):
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        for release in self.on_exit:
            release()
        self.server.should_exit = True
        self.thread.join(timeout=20)
        # A server still running at interpreter exit aborts it (its engine thread is inside torch).
        assert not self.thread.is_alive(), "the server did not shut down within 20 s"


def serve(checkpoint, *, patches=(), tasks=("lm",), **kwargs):
    """A live server for `checkpoint` (a model of one of `tasks`), whose model has `patches` (Gate, FailAfter)
    installed; they are released before the server stops, so that a held gate cannot hold the shutdown."""
    def load():
        model, cfg, tokenizer = load_for_inference(checkpoint, tasks=tasks)
        for patch in patches:
            patch.install(model)
        return model, cfg, tokenizer

    kwargs.setdefault("model_name", "tiny")
    return LiveServer(create_app(load, **kwargs), on_exit=[p.release for p in patches])


def metric(server, name, labels=""):
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    values = [float(v) for v in re.findall(pattern, text, re.M)]
    return values[0] if values else 0.0


def wait_for_metric(server, name, labels="", *, at_least):
    """Polls /metrics until `name{labels}` is at least `at_least` (observable state, not a guess at timing)."""
    deadline = time.monotonic() + WAIT_S
    while (value := metric(server, name, labels)) < at_least:
        assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}, below {at_least}"
        time.sleep(0.02)
    return value


def queued_together(server, gate, route, bodies):
    """POSTs bodies[0] to `route`; while `gate` holds its batch, the other bodies, which so wait together
    (seen in /metrics); then opens the gate. The responses, in the bodies' order."""
    answers = {}

    def post(i):
        answers[i] = httpx.post(server.url + route, json=bodies[i], headers=AUTH, timeout=WAIT_S)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    threads[0].start()
    gate.wait_reached()
    for thread in threads[1:]:
        thread.start()
    wait_for_metric(server, "hanlm_task_requests_waiting", at_least=len(bodies) - 1)
    gate.release()
    for thread in threads:
        thread.join(WAIT_S)
    return [answers[i] for i in range(len(bodies))]


def joined_batch(run_dir, method, task, route, bodies):
    """Serves the `task` checkpoint in `run_dir` with its `method` gated, sends `bodies` so that all but the
    first wait together (`queued_together`), checks that they ran as one batch after the held one, and
    returns the bodies of the answers, each a 200."""
    gate = Gate(method)
    with serve(run_dir, patches=[gate], tasks=(task,), api_key=KEY) as server:
        server.wait_ready()
        together = queued_together(server, gate, route, bodies)
        assert gate.calls == 2 and metric(server, "hanlm_task_batched_requests_total") == len(bodies)
    for response in together:
        assert response.status_code == 200, response.text
    return [response.json() for response in together]


def error_of(response, status):
    """The response's error object, after checking its status and OpenAI's error shape."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium (the Makefile installs Debian's chromium and its driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


def ask_the_playground(browser, url: str, model_name: str, button: str, text: str, done: str) -> str:
    """Open the playground at `url`, wait for it to show `model_name`, check that only `button` of the
    task buttons shows, type `text`, press `button` and wait for `done` in the status line; the output."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == model_name)
    assert browser.find_element(By.ID, button).is_displayed()
    assert not browser.find_element(By.ID, "generate").is_displayed()
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, button).click()
    WebDriverWait(browser, 30).until(lambda d: done in d.find_element(By.ID, "status").text)
    return browser.find_element(By.ID, "output").text
