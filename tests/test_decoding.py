"""Decoding batches: the GPT's slot cache against per-row caches, compiled decoding against eager, and the
server engine's prefix cache and chunked prefill against plain prefill."""

import asyncio

import pytest
import torch
import torch.nn.functional as F

from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.generate import Generation, generate, prompt_ids
from hanlm.models import build_model
from hanlm.models.base import RowsBatch
from hanlm.sampling import SamplingParams
from hanlm.serve.engine import Engine, ErrorEvent, FinishEvent, Request, TokenEvent
from hanlm.serve.prefix_cache import PrefixCache
from hanlm.speculative import PromptLookup, Speculation


def lively(arch: str = "gpt", *overrides: str, vocab_size: int = 300, seed: int = 0):
    """A tiny untied model whose random weights are scaled up, so that greedy text wanders (no ties, no early
    <eos>) instead of repeating one token."""
    torch.manual_seed(seed)
    cfg = load_config("tiny", [f"model.arch={arch}", "model.tie_embeddings=false", *overrides])
    model = build_model(cfg.model, vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    return model.eval()


def full_logp(model, ids: list[int]) -> torch.Tensor:
    """Log-probabilities after the last of `ids`, from the whole sequence at once (no cache)."""
    return F.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0, -1]


@pytest.mark.parametrize("overrides", [[], ["model.n_kv_head=1"]], ids=["mha", "gqa"])
def test_the_slot_batch_equals_per_row_caches_as_rows_of_different_lengths_join_and_leave(overrides):
    model = lively("gpt", *overrides)
    gen = torch.Generator().manual_seed(1)
    batch = model.decode_batch(4)
    seqs: list[list[int]] = []

    def admit(n: int) -> None:
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        _, state = model.log_probs(torch.tensor([ids]), model.initial_state(1))
        batch.admit(state, n)
        seqs.append(ids)

    def step(width: int) -> torch.Tensor:
        tokens = torch.randint(3, 300, (len(seqs), width), generator=gen)
        logp = batch.step(tokens)
        for row, seq in enumerate(seqs):
            seq += tokens[row].tolist()
            torch.testing.assert_close(logp[row, -1], full_logp(model, seq), atol=2e-5, rtol=0)
        return tokens

    with torch.no_grad():
        for n in (5, 70, 2):  # the second is longer than the buffers' first size: they grow
            admit(n)
        step(1)
        step(1)
        batch.keep([0, 2])  # the long row leaves; the short one moves down into its place
        seqs.pop(1)
        admit(9)
        admit(1)
        tokens = step(3)  # a speculative step; each row then keeps a different part of it
        for row, kept in enumerate((3, 1, 0, 2)):
            batch.cut(row, kept)
            del seqs[row][len(seqs[row]) - 3 + kept:]
        step(1)
        batch.keep([1, 3])
        seqs = [seqs[1], seqs[3]]
        step(2)
    assert len(batch) == 2 and tokens.shape == (4, 3)


def test_the_slot_batch_names_what_it_refuses():
    model = lively()
    batch = model.decode_batch(2)
    with torch.no_grad():
        _, state = model.log_probs(torch.tensor([[5, 6]]), model.initial_state(1))
        batch.admit(state, 2)
        batch.admit(state, 2)
        with pytest.raises(ValueError, match="full .2 sequences"):
            batch.admit(state, 2)
        with pytest.raises(ValueError, match="3 rows but the batch holds 2"):
            batch.step(torch.zeros(3, 1, dtype=torch.long))
        batch.step(torch.zeros(2, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="added 2 tokens per row; cannot keep 3"):
            batch.cut(0, 3)
        with pytest.raises(ValueError, match="increasing row numbers below 2"):
            batch.keep([1, 0])
        with pytest.raises(ValueError, match="context_length 128"):
            batch.step(torch.zeros(2, 127, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sequence"):
        model.decode_batch(0)


def test_an_lstm_decodes_through_its_rows_batch_the_same_as_alone():
    model = lively("lstm")
    batch = model.decode_batch(2)
    assert isinstance(batch, RowsBatch)
    with torch.no_grad():
        seqs = [[4, 9, 7], [12]]
        for ids in seqs:
            batch.admit(model.log_probs(torch.tensor([ids]), model.initial_state(1))[1], len(ids))
        logp = batch.step(torch.tensor([[20, 21], [22, 23]]))
        batch.cut(0, 1)
        logp = batch.step(torch.tensor([[30], [31]]))
    torch.testing.assert_close(logp[0, -1], full_logp(model, [4, 9, 7, 20, 30]), atol=2e-5, rtol=0)
    torch.testing.assert_close(logp[1, -1], full_logp(model, [12, 22, 23, 31]), atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def tokenizer(people_daily):
    return train_tokenizer("char", people_daily[:2000])


def run_engine(engine: Engine, prompts: list[str], tokenizer, max_tokens: int = 12, **fields) -> list[list[int]]:
    """Each prompt's greedy tokens through the engine, the requests submitted together; fails on an error."""
    async def scenario():
        jobs = [Request(prompt_ids(tokenizer, p), SamplingParams(max_tokens=max_tokens, temperature=0.0), **fields)
                for p in prompts]
        engine.submit(jobs)
        out = [[] for _ in jobs]
        for i, job in enumerate(jobs):
            while True:
                event = await asyncio.wait_for(job.events.get(), 60)
                assert not isinstance(event, ErrorEvent), event.message
                if isinstance(event, FinishEvent):
                    break
                assert isinstance(event, TokenEvent)
                out[i].append(event.token)
        return out, [j.prompt_scores for j in jobs]

    return asyncio.run(scenario())


def alone(model, tokenizer, prompt: str, max_tokens: int = 12) -> list[int]:
    result = Generation()
    "".join(generate(model, tokenizer, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), result=result))
    return result.token_ids


def common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


SYSTEM = "新华社北京１月１日电　国务院总理李鹏今天在人民大会堂会见了"
PROMPTS = [SYSTEM + "日本客人", SYSTEM + "日本客人并且", SYSTEM + "美国", SYSTEM[:10], SYSTEM + "日本客人"]


def test_prefix_cache_hits_give_the_tokens_of_a_full_prefill_and_count_what_they_spared(tokenizer):
    model = lively(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=4, prefix_cache_tokens=4096)
    engine.start()
    try:
        # One at a time, so each finds the ones before: an exact repeat, a longer prompt that continues a
        # cached one (its cache then grows in place), shorter shared parts of both.
        got = [run_engine(engine, [p], tokenizer)[0][0] for p in PROMPTS]
    finally:
        engine.stop()
    assert got == [alone(model, tokenizer, p) for p in PROMPTS]
    ids = [prompt_ids(tokenizer, p) for p in PROMPTS]
    shared = [0, len(ids[0]), common(ids[2], ids[1]), len(ids[3]) - 1, len(ids[0])]  # at least one token is run
    assert shared[2] > len(ids[3]) and engine.prefixes.hits == 4
    assert engine.prefixes.reused == sum(shared)
    assert engine.metrics.prefix_tokens._value.get() == sum(shared)


def test_the_prefix_cache_evicts_the_least_recently_used_past_its_budget():
    model = lively()
    cache = PrefixCache(model, max_tokens=10)
    with torch.no_grad():
        for ids in ([1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9, 10]):
            logp, state = model.log_probs(torch.tensor([ids]), model.initial_state(1))
            cache.add(ids, state, logp[0, -1])
        assert len(cache) == 2  # 12 tokens > 10: the first went
        assert cache.lookup([1, 2, 3, 4, 5]).length == 2  # only [1, 2, 5, 6]'s start is left
        found = cache.lookup([7, 8, 9, 10])
        assert found.length == 4 and found.logp is not None
        cache.add(list(range(11, 22)), state, logp[0, -1])  # longer than the whole budget: not kept
        assert len(cache) == 2


def test_an_lstm_reuses_a_cached_prompt_only_when_it_is_a_whole_prefix(tokenizer):
    model = lively("lstm", vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, max_batch=2, prefix_cache_tokens=4096)
    engine.start()
    try:
        got = [run_engine(engine, [p], tokenizer)[0][0] for p in (SYSTEM, SYSTEM + "美国", SYSTEM[:10])]
    finally:
        engine.stop()
    assert got == [alone(model, tokenizer, p) for p in (SYSTEM, SYSTEM + "美国", SYSTEM[:10])]
    assert engine.prefixes.reused == len(prompt_ids(tokenizer, SYSTEM))  # the second reused the first; the
    assert engine.prefixes.hits == 1  # third could not cut it


class Calls:
    """Records the order of calls to a model's methods."""

    def __init__(self, model, *methods: str):
        self.log: list[tuple[str, int]] = []
        for name in methods:
            through = getattr(model, name)

            def patched(tokens, *args, _name=name, _through=through, **kwargs):
                self.log.append((_name, tokens.size(1)))
                return _through(tokens, *args, **kwargs)

            setattr(model, name, patched)


def test_chunked_prefill_interleaves_with_decoding_and_changes_no_token_nor_prompt_score(tokenizer):
    model = lively(vocab_size=tokenizer.vocab_size)
    calls = Calls(model, "log_probs", "slot_forward")
    prompts = ["今天", SYSTEM * 2]
    outs = {}
    for chunk in (0, 8):
        engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=chunk)
        engine.start()
        try:
            calls.log.clear()
            outs[chunk] = run_engine(engine, prompts, tokenizer, max_tokens=20, prompt_logprobs=True)
        finally:
            engine.stop()
    log = list(calls.log)  # the chunked run's calls
    (tokens0, scores0), (tokens8, scores8) = outs[0], outs[8]
    assert tokens8 == tokens0 == [alone(model, tokenizer, p, 20) for p in prompts]
    for a, b in zip(scores0, scores8):
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # With chunks of 8: the short prompt, then the long one in pieces with a decoding step of the first
    # between them.
    prefills = [i for i, (name, _) in enumerate(log) if name == "log_probs"]
    short, rest = len(prompt_ids(tokenizer, prompts[0])), len(prompt_ids(tokenizer, prompts[1])) - (8 - 3)
    assert short == 3 and rest % 8
    assert [log[i][1] for i in prefills] == [3, 5] + [8] * (rest // 8) + [rest % 8]
    between = [name for name, _ in log[prefills[1]:prefills[-1]]]
    assert between.count("slot_forward") == len(prefills) - 2


def test_compiled_decoding_gives_the_eager_greedy_tokens_with_and_without_speculation(tokenizer):
    model = lively(vocab_size=tokenizer.vocab_size)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    for speculation in (None, Speculation(PromptLookup(), k=3, adaptive=False)):
        out = {}
        for compile in (False, True):
            result = Generation()
            "".join(generate(model, tokenizer, "人民日报记者", params, result=result, compile=compile,
                             speculation=speculation))
            out[compile] = result
        assert out[True].token_ids == out[False].token_ids and len(out[False].token_ids) == 40
        assert out[False].compile_seconds == 0.0
    assert speculation.stats.steps > 0
    engine = Engine(model, tokenizer, max_batch=2, compile=True)  # compiles rows of 1 and 2 before it starts
    engine.start()
    try:
        assert engine.batch.compile_seconds > 0 and engine.metrics.compile_seconds._value.get() > 0
        got, _ = run_engine(engine, PROMPTS[:3], tokenizer)
    finally:
        engine.stop()
    assert got == [alone(model, tokenizer, p) for p in PROMPTS[:3]]
