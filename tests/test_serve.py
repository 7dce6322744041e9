"""The model service, against live servers on 127.0.0.1: the openai client, streaming, batching,
cancellation, errors, metrics, and the playground page in headless Chromium."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import AUTH, KEY, Gate, LiveServer, browser, checkpoints, metric, serve, wait_for_metric  # noqa: F401

from hanlm.loading import load_for_inference
from hanlm.generate import generate
from hanlm.sampling import SamplingParams
from hanlm.serve.app import create_app


@pytest.fixture(scope="module")
def gpt_server(checkpoints):
    with serve(checkpoints["gpt"], api_key=KEY, max_batch=8) as server:
        yield server.wait_ready()


@pytest.fixture
def client(gpt_server):
    return openai.OpenAI(base_url=gpt_server.url + "/v1", api_key=KEY, max_retries=0)


# -- health and loading ------------------------------------------------------------------------

def test_health_is_503_until_the_model_has_loaded(checkpoints):
    release = threading.Event()
    path = checkpoints["gpt"]

    def slow_load():
        release.wait(30)
        return load_for_inference(path)

    with LiveServer(create_app(slow_load, model_name="tiny")) as server:
        assert httpx.get(server.url + "/health").status_code == 503
        reply = httpx.post(server.url + "/v1/completions", json={"prompt": "今天"})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "model_not_ready"
        release.set()
        server.wait_ready()
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


# -- the openai client -------------------------------------------------------------------------

def test_completions_chat_and_models_through_the_openai_client(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="今天", max_tokens=8, temperature=0.8, seed=1)
    assert done.object == "text_completion" and len(done.choices) == 1
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.prompt_tokens == 2
    assert 0 < done.usage.completion_tokens <= 8
    again = client.completions.create(model="tiny", prompt="今天", max_tokens=8, temperature=0.8, seed=1)
    assert again.choices[0].text == done.choices[0].text  # a seed makes sampling reproducible
    two = client.completions.create(model="tiny", prompt=["今天", "中国"], n=2, max_tokens=4, echo=True,
                                    logprobs=2, extra_body={"top_k": 20, "ignored_field": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[2].text.startswith("中国")
    lp = two.choices[0].logprobs
    assert lp.tokens[:2] == ["今", "天"] and all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="tiny", max_tokens=6, messages=[
        {"role": "system", "content": "你是人民日报的编辑。"}, {"role": "user", "content": "写一句话。"}])
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len("系统：你是人民日报的编辑。用户：写一句话。助手：")


def test_streaming_chunks_share_an_id_end_with_the_finish_reason_and_usage_only_when_asked(client, gpt_server):
    chunks = list(client.completions.create(model="tiny", prompt="人民", max_tokens=10, stream=True,
                                            temperature=0))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    streamed = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model="tiny", prompt="人民", max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].text
    with_usage = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "你好"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert with_usage[0].choices[0].delta.role == "assistant"
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in with_usage)
    # On the wire: data: {json} events and a final data: [DONE].
    with httpx.stream("POST", gpt_server.url + "/v1/completions", headers=AUTH,
                      json={"prompt": "今天", "max_tokens": 3, "stream": True}) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_errors_have_the_openai_shape_and_status(client, gpt_server):
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt="")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="今天", temperature=5)
    with pytest.raises(openai.BadRequestError, match=r"3 tokens .* max_tokens is 126: 129 .* context of 128"):
        client.completions.create(model="tiny", prompt="今天", max_tokens=126)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gpt_server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    bad_json = httpx.post(gpt_server.url + "/v1/completions", headers=AUTH, content=b"{not json")
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    huge = httpx.post(gpt_server.url + "/v1/completions", headers=AUTH, json={"prompt": "今" * (1 << 20)})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    no_key = httpx.post(gpt_server.url + "/v1/completions", json={"prompt": "今天"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    wrong_type = httpx.post(gpt_server.url + "/v1/completions", headers=AUTH, json={"prompt": "今天", "n": "x"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "n"


def test_a_full_queue_answers_429(checkpoints):
    # The first request's prefill is held: it has left the queue but cannot finish, so the second
    # one certainly waits, and the queue (max_queue=1) is full for the third.
    prefill = Gate("log_probs")

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"prompt": "今天", "max_tokens": 5, "temperature": 0}
            first = asyncio.create_task(http.post("/v1/completions", json={**body, "stream": True}))
            await asyncio.to_thread(prefill.wait_reached)
            second = asyncio.create_task(http.post("/v1/completions", json=body))
            while "hanlm_requests_waiting 1.0" not in (await http.get("/metrics")).text:
                await asyncio.sleep(0.01)  # until the second request waits in the queue (bounded below)
            third = await http.post("/v1/completions", json=body)
            prefill.release()
            return third, await first, await second

    with serve(checkpoints["gpt"], patches=[prefill], max_batch=1, max_queue=1) as server:
        server.wait_ready()
        third, first, second = asyncio.run(asyncio.wait_for(scenario(server.url), timeout=60))
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
    assert "retry later" in third.json()["error"]["message"]
    assert first.status_code == second.status_code == 200  # both finish once the prefill goes on


# -- batching ----------------------------------------------------------------------------------

def test_32_concurrent_streams_finish_and_greedy_output_equals_unbatched(checkpoints, gpt_server):
    prompts = [f"第{i}天" if i % 2 else f"中国{i}" for i in range(32)]

    async def one(http, prompt):
        text, finish = "", None
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"]
                    finish = choice["finish_reason"] or finish
        return text, finish

    async def all_of_them():
        async with httpx.AsyncClient(base_url=gpt_server.url, headers=AUTH,
                                     timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    before = metric(gpt_server, "hanlm_requests_total", '{endpoint="/v1/completions",status="200"}')
    results = asyncio.run(all_of_them())
    assert all(finish in ("length", "stop") for _, finish in results)
    model, _, tokenizer = load_for_inference(checkpoints["gpt"])
    for prompt, (text, _) in zip(prompts, results):
        alone = "".join(generate(model, tokenizer, prompt, SamplingParams(max_tokens=12, temperature=0)))
        assert text == alone, prompt
    after = metric(gpt_server, "hanlm_requests_total", '{endpoint="/v1/completions",status="200"}')
    assert after - before == 32
    assert metric(gpt_server, "hanlm_time_to_first_token_seconds_count") >= 32
    assert metric(gpt_server, "hanlm_generation_tokens_total") >= 32
    assert metric(gpt_server, "hanlm_prompt_tokens_total") > 0


def test_a_client_disconnect_cancels_its_generation(checkpoints):
    decode = Gate("slot_forward", after=2)  # two steps go, the third is held until the client has left
    with serve(checkpoints["gpt"], patches=[decode]) as server:
        server.wait_ready()
        body = {"prompt": "今天", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            decode.wait_reached()
            assert next(r.iter_lines()).startswith("data: {")
            assert metric(server, "hanlm_requests_running") == 1
        # The server counts the stream whose client left, and cancels its generation.
        wait_for_metric(server, "hanlm_requests_total", '{endpoint="/v1/completions",status="499"}', at_least=1)
        decode.release()
        wait_for_metric(server, "hanlm_sequences_cancelled_total", at_least=1)
        # Three tokens, one before each decoding step; the held step's result was dropped.
        assert metric(server, "hanlm_generation_tokens_total") == 3
        assert metric(server, "hanlm_requests_running") == 0


# -- other endpoints ---------------------------------------------------------------------------

def test_score_tokenize_and_detokenize(checkpoints, gpt_server):
    text = "中国经济发展"
    scored = httpx.post(gpt_server.url + "/v1/score", headers=AUTH, json={"text": text}).json()
    model, _, tokenizer = load_for_inference(checkpoints["gpt"])
    ids = tokenizer.encode(text)
    with torch.no_grad():
        expected = model.token_log_probs(torch.tensor([[tokenizer.eos_id, *ids[:-1]]]), torch.tensor([ids]),
                                         model.initial_state(1))[0]
    assert scored["token_logprobs"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert scored["nll"] == pytest.approx(-expected.sum().item(), rel=1e-5)
    assert scored["bpc"] == pytest.approx(scored["nll"] / 0.6931471805599453 / len(text), rel=1e-9)
    assert scored["perplexity"] == pytest.approx(2.718281828459045 ** (scored["nll"] / len(ids)), rel=1e-6)
    tokens = httpx.post(gpt_server.url + "/tokenize", headers=AUTH, json={"prompt": text}).json()
    assert tokens["tokens"] == ids and tokens["count"] == 6 and tokens["max_model_len"] == 128
    back = httpx.post(gpt_server.url + "/detokenize", headers=AUTH, json={"tokens": ids}).json()
    assert back == {"prompt": text}
    bad = httpx.post(gpt_server.url + "/detokenize", headers=AUTH, json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens.0"


@pytest.mark.parametrize("arch", ["lstm", "ngram"])
def test_lstm_and_ngram_checkpoints_are_served_the_same_way(checkpoints, arch):
    with serve(checkpoints[arch], max_batch=4) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        texts = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
                 for p in ("今天", "中国")]
        model, _, tokenizer = load_for_inference(checkpoints[arch])
        for p, text in zip(("今天", "中国"), texts):
            assert text == "".join(generate(model, tokenizer, p, SamplingParams(max_tokens=6, temperature=0)))
        scored = httpx.post(server.url + "/v1/score", json={"text": "今天天气"}).json()
        assert scored["bpc"] > 0


# -- the playground ----------------------------------------------------------------------------

def generate_in_page(driver, prompt="人民日报"):
    """Types a prompt, asks for 20 tokens, and returns the status line once the stream has ended."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "max_tokens").clear()
    driver.find_element(By.ID, "max_tokens").send_keys("20")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "generate").is_enabled()
                                    and d.find_element(By.ID, "status").text not in ("", "generating…"))
    return driver.find_element(By.ID, "status").text


def test_the_playground_streams_text_in_headless_chromium(checkpoints, browser):
    from selenium.webdriver.common.by import By

    with serve(checkpoints["gpt"]) as server:
        server.wait_ready()
        browser.get(server.url + "/")
        assert "hanlm playground" in browser.title
        assert "tokens/s" in generate_in_page(browser)
        generated = browser.find_element(By.ID, "generated").text
        assert generated and browser.find_element(By.ID, "output").text.startswith("人民日报")
        assert browser.find_element(By.ID, "model").text == "tiny"


def test_the_playground_sends_the_key_it_is_given_and_keeps_it_for_the_tab(checkpoints, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def model_shown(text):
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == text)

    with serve(checkpoints["gpt"], api_key=KEY) as server:
        server.wait_ready()
        browser.get(server.url + "/")  # the page itself needs no key, and tells nothing of the server
        assert "tiny" not in browser.page_source
        model_shown("(enter the API key)")
        assert "missing or wrong API key" in generate_in_page(browser)
        browser.find_element(By.ID, "api_key").send_keys(KEY)
        browser.find_element(By.ID, "prompt").click()  # leaving the field: the page checks the key
        model_shown("tiny")
        assert "tokens/s" in generate_in_page(browser)
        browser.refresh()
        model_shown("tiny")  # the key outlives a reload of the tab


# -- the command -------------------------------------------------------------------------------

def test_hanlm_serve_runs_the_server_and_names_a_wrong_checkpoint(checkpoints, tmp_path, capsys):
    import subprocess
    import sys

    from hanlm.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hanlm.cli", "serve", checkpoints["ngram"], "--port", str(port),
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        models = httpx.get(url + "/v1/models", headers=AUTH).json()
        assert models["data"][0]["id"] == "ngram" and models["data"][0]["arch"] == "ngram"
        done = httpx.post(url + "/v1/completions", headers=AUTH,
                          json={"prompt": "今天", "max_tokens": 5}).json()
        assert done["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
