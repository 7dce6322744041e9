"""/v1/segment and /v1/classify against hostile users, on live servers whose models are stand-ins (no
training): the per-request limits named in their 400s, the key, the task worker's bounded queue (a
429 at once when it is full, never an unbounded wait) and its one thread; and the deadline for a
request head, which closes a connection that never finishes one.

Timing is the test's to decide: a Gate holds the tagger until the test opens it, the queue's state
is read from /metrics, and a timeout is observed as the server closing the connection (recv
returning b""), never as elapsed time."""

import json
import socket
import threading

import httpx
import pytest
import torch
import uvicorn
from serve_helpers import AUTH, KEY, WAIT_S, Gate, LiveServer, error_of, metric, queued_together, wait_for_metric

from hanlm.config import load_config
from hanlm.serve.app import create_app
from hanlm.serve.connections import uvicorn_settings
from hanlm.serve.protocol import MAX_TEXT_CHARS, MAX_TEXTS, MAX_TEXTS_CHARS
from hanlm.tasks.tagging import Tagger

WAITING = "hanlm_task_requests_waiting"
BATCHES = "hanlm_task_batches_total"  # model batches the task worker ran
JOINED = "hanlm_task_batched_requests_total"  # requests answered from them


class OneCharWords(Tagger):
    """A tagger that makes every character a word, and notes the thread (and its torch thread count)
    each batch runs on."""

    tags = ["B", "M", "E", "S"]

    def __init__(self):
        self.threads: list[tuple[str, int]] = []

    def tag(self, texts):
        self.threads.append((threading.current_thread().name, torch.get_num_threads()))
        return [["S"] * len(t) for t in texts]


def tagger_app(tagger, gate=None, **kwargs):
    cfg = load_config("tiny", ["model.task=tag", "finetune.task=tag", "finetune.tagger=hmm"])

    def load():
        if gate is not None:
            gate.install(tagger)
        return tagger, cfg, None

    return create_app(load, model_name="stand-in", api_key=KEY, **kwargs)


def classifier_app():
    """A classifier server whose model is never reached: for what is refused before it runs."""
    cfg = load_config("tiny", ["model.task=classify", "finetune.labels=[neg,pos]"])
    return create_app(lambda: (object(), cfg, None), model_name="stand-in", api_key=KEY)


@pytest.fixture(scope="module")
def tagger_server():
    with LiveServer(tagger_app(OneCharWords())) as server:
        yield server.wait_ready()


@pytest.fixture(scope="module")
def classifier_server():
    with LiveServer(classifier_app()) as server:
        yield server.wait_ready()


def servers(request):
    return {"/v1/segment": request.getfixturevalue("tagger_server"),
            "/v1/classify": request.getfixturevalue("classifier_server")}


ROUTES = ["/v1/segment", "/v1/classify"]
LONG = MAX_TEXT_CHARS + 1


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body, param, says", [
    ({"input": ["好"] * (MAX_TEXTS + 1)}, "input", f"{MAX_TEXTS + 1} texts; at most {MAX_TEXTS} per request"),
    ({"input": ["好", "好", "好", "字" * LONG]}, "input.3",
     f"the text has {LONG:,} characters; at most {MAX_TEXT_CHARS:,} per text"),
    ({"input": "字" * LONG}, "input.0", f"at most {MAX_TEXT_CHARS:,} per text"),
    ({"input": ["a" * MAX_TEXT_CHARS] * 4}, "input",
     f"the texts have {4 * MAX_TEXT_CHARS:,} characters in all; at most {MAX_TEXTS_CHARS:,} per request"),
    ({"input": []}, "input", f"1 to {MAX_TEXTS}"),
    ({"input": ["好", ""]}, "input.1", "at least 1 character"),
    ({"input": ["好", 3]}, "input.1", "valid string"),
    ({"input": 3}, "input", "a string or a list of strings"),
    ({}, "input", "required"),
])
def test_a_request_over_a_limit_is_a_400_naming_the_field_and_the_limit(request, route, body, param, says):
    response = httpx.post(servers(request)[route].url + route, json=body, headers=AUTH, timeout=WAIT_S)
    error = error_of(response, 400)
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    assert says in error["message"], error


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no key", "a wrong key"])
def test_the_task_routes_need_the_key(request, route, headers):
    response = httpx.post(servers(request)[route].url + route, json={"input": "好"}, headers=headers, timeout=WAIT_S)
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_a_batch_runs_on_the_task_worker_with_its_thread_count(tagger_server):
    answer = httpx.post(tagger_server.url + "/v1/segment", json={"input": ["你好", "世界 和平"]}, headers=AUTH,
                        timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    assert [d["words"] for d in answer.json()["data"]] == [["你", "好"], ["世", "界", "和", "平"]]
    tagger = tagger_server.app.state.hanlm.loaded.model
    assert tagger.threads[-1] == ("hanlm-tasks", 1)  # an hmm tagger's default: one intra-op thread
    tagger = OneCharWords()
    with LiveServer(tagger_app(tagger, task_threads=2)) as server:
        server.wait_ready()
        for _ in range(2):
            assert httpx.post(server.url + "/v1/segment", json={"input": "好"}, headers=AUTH,
                              timeout=WAIT_S).status_code == 200
    assert tagger.threads == [("hanlm-tasks", 2)] * 2


def post_in_thread(url, body, into: dict, key):
    def post():
        into[key] = httpx.post(url + "/v1/segment", json=body, headers=AUTH, timeout=WAIT_S)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_a_full_task_queue_answers_429_at_once_and_the_waiting_requests_still_finish():
    gate = Gate("segment")  # holds every batch until the test opens it
    with LiveServer(tagger_app(OneCharWords(), gate, max_task_queue=2), on_exit=[gate.release]) as server:
        server.wait_ready()
        answers: dict[int, httpx.Response] = {}
        threads = [post_in_thread(server.url, {"input": "第一"}, answers, 0)]
        gate.wait_reached()  # the first batch runs (held); the next two wait
        threads += [post_in_thread(server.url, {"input": f"第{i}"}, answers, i) for i in (1, 2)]
        wait_for_metric(server, WAITING, at_least=2)
        error = error_of(httpx.post(server.url + "/v1/segment", json={"input": "多"}, headers=AUTH,
                                    timeout=WAIT_S), 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full", error
        assert "2 classify, segment and ner requests can wait" in error["message"], error
        assert "serve.max_task_queue" in error["message"], error
        error_of(httpx.post(server.url + "/v1/segment", json={"input": "多"}, timeout=WAIT_S), 401)  # the key first
        gate.release()
        for thread in threads:
            thread.join(WAIT_S)
        assert [answers[i].status_code for i in range(3)] == [200] * 3
        assert answers[2].json()["data"][0]["words"] == ["第", "2"]
        assert metric(server, WAITING) == 0
        assert metric(server, "hanlm_requests_total", '{endpoint="/v1/segment",status="429"}') == 1


def test_a_waiting_request_whose_client_left_is_skipped():
    gate = Gate("segment")
    with LiveServer(tagger_app(OneCharWords(), gate), on_exit=[gate.release]) as server:
        server.wait_ready()
        answers: dict[int, httpx.Response] = {}
        first = post_in_thread(server.url, {"input": "第一"}, answers, 0)
        gate.wait_reached()
        body = json.dumps({"input": "走了"}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for_metric(server, WAITING, at_least=1)
        wait_for_metric(server, "hanlm_requests_total", '{endpoint="/v1/segment",status="499"}', at_least=1)
        gate.release()
        first.join(WAIT_S)
        assert answers[0].status_code == 200
        after = httpx.post(server.url + "/v1/segment", json={"input": "后来"}, headers=AUTH, timeout=WAIT_S)
        assert after.status_code == 200
        assert gate.calls == 2  # the first and the last: the batch nobody waited for never ran


class FailsOn(OneCharWords):
    """A tagger that breaks on any text holding 坏, as a model with a bug would."""

    def tag(self, texts):
        if any("坏" in t for t in texts):
            raise RuntimeError("injected failure on 坏")
        return super().tag(texts)


def segmented(response):
    assert response.status_code == 200, response.text
    return [d["words"] for d in response.json()["data"]]


def test_requests_waiting_together_run_as_one_batch_and_each_gets_its_answer_alone():
    gate = Gate("segment")
    with LiveServer(tagger_app(OneCharWords(), gate), on_exit=[gate.release]) as server:
        server.wait_ready()
        bodies = [{"input": "第一"}, {"input": ["你好", "世界 和平"]}, {"input": "走"}, {"input": ["甲乙", "丙"]}]
        together = queued_together(server, gate, "/v1/segment", bodies)
        assert gate.calls == 2  # the held batch, then the three that waited, joined
        assert metric(server, BATCHES) == 2 and metric(server, JOINED) == 4
        alone = [httpx.post(server.url + "/v1/segment", json=b, headers=AUTH, timeout=WAIT_S) for b in bodies]
        assert [r.json() for r in together] == [r.json() for r in alone]
        assert segmented(together[1]) == [["你", "好"], ["世", "界", "和", "平"]]
        assert together[3].json()["usage"] == {"characters": 3, "words": 3}
        assert metric(server, BATCHES) == 6 and metric(server, WAITING) == 0


def test_a_batch_joins_waiting_requests_in_order_up_to_task_batch_texts():
    gate = Gate("segment")
    with LiveServer(tagger_app(OneCharWords(), gate, task_batch_texts=4), on_exit=[gate.release]) as server:
        server.wait_ready()
        bodies = [{"input": "零"}, {"input": ["一", "二"]}, {"input": ["三", "四"]}, {"input": ["五", "六"]},
                  {"input": "七"}]
        together = queued_together(server, gate, "/v1/segment", bodies)
        assert [segmented(r) for r in together] == [[["零"]], [["一"], ["二"]], [["三"], ["四"]], [["五"], ["六"]],
                                                    [["七"]]]
        assert metric(server, BATCHES) == 3  # 零 held; 一二三四 (4 texts); 五六七: one more text would pass the cap


def test_when_a_joined_batch_fails_only_the_request_that_broke_it_fails():
    gate = Gate("segment")
    with LiveServer(tagger_app(FailsOn(), gate), on_exit=[gate.release]) as server:
        server.wait_ready()
        bodies = [{"input": "第一"}, {"input": "好"}, {"input": ["也好", "坏"]}, {"input": "还好"}]
        together = queued_together(server, gate, "/v1/segment", bodies)
        assert [r.status_code for r in together] == [200, 200, 500, 200]
        assert [segmented(together[i]) for i in (1, 3)] == [[["好"]], [["还", "好"]]]
        assert "injected failure" in error_of(together[2], 500)["message"]
        assert metric(server, BATCHES) == 5  # the held one, the joined one that failed, then each of its three alone
        assert metric(server, JOINED) == 3


# -- the request head's deadline ------------------------------------------------------------------

class HeadDeadlineServer(LiveServer):
    """A live server configured as `hanlm serve` configures uvicorn, with this header timeout."""

    def __init__(self, app, header_timeout_s, on_exit=()):
        super().__init__(app, on_exit)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **uvicorn_settings(header_timeout_s)))
        self.thread = threading.Thread(target=self.server.run, daemon=True)


@pytest.fixture(scope="module")
def held():
    """A tagger server with a half-second header timeout, whose batches wait for the test's gate."""
    gate = Gate("segment")
    with HeadDeadlineServer(tagger_app(OneCharWords(), gate), 0.5, on_exit=[gate.release]) as server:
        server.gate = gate
        yield server.wait_ready()


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)


def until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection; each recv waits at most WAIT_S."""
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
        assert len(reply) < 1 << 20
    return reply


def request(path: str, body: bytes = b"") -> bytes:
    method = "POST" if body else "GET"
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def responses(reply: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each whole response in `reply` (each has a content-length)."""
    out = []
    while b"\r\n\r\n" in reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        length = next(int(v) for k, _, v in (h.partition(b":") for h in lines) if k.lower() == b"content-length")
        if len(rest) < length:
            break
        out.append((status, rest[:length]))
        reply = rest[length:]
    return out


def answers(sock: socket.socket, count: int = 1) -> list[tuple[bytes, bytes]]:
    """The next `count` whole responses on a connection that stays open."""
    reply = b""
    while len(responses(reply)) < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {reply!r}"
        reply += chunk
    return responses(reply)


@pytest.mark.parametrize("sent", [b"POST /v1/segm", b"GET /health HTTP/1.1\r\nHost: x\r\n"],
                         ids=["half a request line", "headers without their end"])
def test_an_unfinished_request_head_gets_408_and_a_closed_connection(held, sent):
    with connect(held) as sock:
        sock.sendall(sent)
        ((status, body),) = responses(until_closed(sock))
    assert status == b"HTTP/1.1 408 Request Timeout"
    error = json.loads(body)["error"]
    assert error["code"] == "header_timeout" and "serve.header_timeout_s" in error["message"], error
    assert "within 0.5 s" in error["message"]


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(held):
    with connect(held) as sock:
        assert until_closed(sock) == b""


def test_a_kept_alive_connection_must_finish_its_next_head_in_time(held):
    with connect(held) as sock:
        sock.sendall(request("/health"))
        assert answers(sock)[0][0] == b"HTTP/1.1 200 OK"
        sock.sendall(b"GET /he")  # the next request never finishes its head
        ((status, _),) = responses(until_closed(sock))
    assert status == b"HTTP/1.1 408 Request Timeout"


def test_a_request_being_answered_is_not_cut_by_the_head_deadline(held):
    """The deadline is for heads only: a request held longer than it (and one pipelined behind a
    quick one) still gets its answer. Another connection's deadline, armed later, is the clock."""
    with connect(held) as slow, connect(held) as piped:
        slow.sendall(request("/v1/segment", b'{"input": "\\u6162"}'))
        held.gate.wait_reached()
        piped.sendall(request("/health") + request("/v1/segment", b'{"input": "\\u7ba1"}'))
        ((health, _),) = answers(piped)  # the second (held) request was read as this answer ended
        with connect(held) as clock:
            clock.sendall(b"GET /")
            assert until_closed(clock).startswith(b"HTTP/1.1 408")  # a deadline later than both heads' has passed
        held.gate.release()
        ((slow_status, slow_body),) = answers(slow)
        ((piped_status, piped_body),) = answers(piped)
    assert slow_status == piped_status == health == b"HTTP/1.1 200 OK"
    assert json.loads(slow_body)["data"][0]["words"] == ["慢"]
    assert json.loads(piped_body)["data"][0]["words"] == ["管"]

