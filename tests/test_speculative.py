"""Speculative decoding: greedy output is plain greedy output, sampling keeps the model's distribution,
and the cache is rewound with nothing stale left in it."""

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hanlm.loading import load_for_inference
from hanlm.config import load_config
from hanlm.data.tokenizer import train_tokenizer
from hanlm.errors import ConfigError
from hanlm.generate import Generation, generate, prompt_ids
from hanlm.sampling import SamplingParams, filter_logits
from hanlm.models import build_model
from hanlm.models.ngram import estimate
from hanlm.speculative import NGramDraft, PromptLookup, Speculation, accept, load_drafter

PROMPTS = ["中国经济", "今天", "人民日报记者", "新华社北京１月１日电", "改革开放", "科技", "农民的收入", "教育",
           "江泽民", "国务院"]


def lively_model(arch: str, vocab_size: int, seed: int):
    """A tiny untied model whose random weights are scaled up, so that greedy text wanders instead of
    repeating one character."""
    torch.manual_seed(seed)
    model = build_model(load_config("tiny", [f"model.arch={arch}", "model.tie_embeddings=false"]).model, vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    return model.eval()


@pytest.fixture(scope="module")
def vocab(people_daily):
    tokenizer = train_tokenizer("char", people_daily[:2000])
    ngram, _ = estimate(np.asarray(tokenizer.encode_documents(people_daily[:2000]), dtype=np.int64),
                        tokenizer.vocab_size, 3)
    return tokenizer, ngram.eval()


class Oracle:
    """Drafts the model's own greedy continuation with every third token wrong: kept and rejected
    drafts at every offset."""

    def __init__(self, reference: list[int], prompt_len: int, vocab_size: int):
        self.reference, self.prompt_len, self.vocab_size = reference, prompt_len, vocab_size

    def propose(self, context, k):
        at = len(context) - self.prompt_len
        out = list(self.reference[at:at + k])
        return [t if (at + i) % 3 else (t + 1) % self.vocab_size for i, t in enumerate(out)]


def greedy(model, tokenizer, prompt, speculation=None, max_tokens=40):
    result = Generation()
    "".join(generate(model, tokenizer, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                     result=result, speculation=speculation))
    return result


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_speculative_greedy_output_is_plain_greedy_output(vocab, arch):
    tokenizer, ngram = vocab
    model = lively_model(arch, tokenizer.vocab_size, seed=0)
    kept = Counter()
    for prompt in PROMPTS[:6] if arch == "gpt" else PROMPTS[:3]:
        plain = greedy(model, tokenizer, prompt)
        assert len(set(plain.token_ids)) > 5  # the text is not one character over and over
        oracle = Oracle(plain.token_ids, len(prompt_ids(tokenizer, prompt)), tokenizer.vocab_size)
        for name, drafter, adaptive in [("oracle", oracle, False), ("prompt", PromptLookup(), True),
                                        ("ngram", NGramDraft(ngram), True)]:
            speculation = Speculation(drafter, k=4, adaptive=adaptive)
            result = greedy(model, tokenizer, prompt, speculation)
            assert result.token_ids == plain.token_ids, (name, prompt)
            assert result.finish_reason == plain.finish_reason
            kept[name, "proposed"] += speculation.stats.proposed
            kept[name, "accepted"] += speculation.stats.accepted
    rate = kept["oracle", "accepted"] / kept["oracle", "proposed"]
    assert 0.3 < rate < 0.8  # both kept and rejected drafts were checked
    assert kept["ngram", "proposed"] > 0 and kept["prompt", "proposed"] > 0


def test_a_draft_that_is_always_right_takes_fewer_forwards(vocab):
    tokenizer, _ = vocab
    model = lively_model("gpt", tokenizer.vocab_size, seed=0)
    plain = greedy(model, tokenizer, "中国经济", max_tokens=41)

    class Perfect(Oracle):
        def propose(self, context, k):
            at = len(context) - self.prompt_len
            return list(self.reference[at:at + k])

    speculation = Speculation(Perfect(plain.token_ids, 5, tokenizer.vocab_size), k=4, adaptive=False)
    assert greedy(model, tokenizer, "中国经济", speculation, max_tokens=41).token_ids == plain.token_ids
    stats = speculation.stats
    assert stats.acceptance_rate == 1.0 and stats.steps == 8  # 1 sampled + 8 forwards × 5 tokens


def test_the_rewound_cache_has_no_stale_entries_and_continues_like_a_fresh_one(vocab):
    tokenizer, _ = vocab
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, tokenizer.vocab_size).eval()
    ids = torch.tensor([prompt_ids(tokenizer, "中国经济发展")])
    draft = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        _, before = model.log_probs(ids, model.initial_state(1))
        _, after = model.log_probs(draft, before)
        cut = model.rewound(before, after, draft, 2)
        assert cut.pos == ids.size(1) + 2 and cut.store.filled == cut.pos
        for buffer in (*cut.store.k, *cut.store.v):  # where the rejected drafts' keys and values were
            assert buffer[:, :, cut.pos:after.pos].abs().sum() == 0 and buffer[:, :, :cut.pos].abs().sum() > 0
        more = torch.tensor([[21, 22]])
        logp, _ = model.log_probs(more, cut)
        fresh, _ = model.log_probs(torch.cat([ids, draft[:, :2], more], 1), model.initial_state(1))
    assert (logp - fresh[:, -2:]).abs().max() < 1e-5


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 4)])
def test_sampling_with_a_draft_keeps_the_models_distribution(temperature, top_k):
    """The rule on a tiny model's distributions, many samples: the first token follows p(· | prompt),
    the second, where the first was the draft, p(· | prompt, d1), and so on; a chi-square test each."""
    cfg = load_config("tiny", ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "model.context_length=16",
                               "train.block_size=16"])
    torch.manual_seed(3)
    model = build_model(cfg.model, 6)
    with torch.no_grad():
        model.tok_emb.weight.mul_(8)  # unequal distributions, so that a wrong rule shows
        model.eval()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0)
        ids = [3, 1]
        d1 = int(target(model, ids, params)[-1].argsort()[-2])  # the second most likely: often rejected
        d2 = int(target(model, ids + [d1], params)[-1].argmax())
        logp, _ = model.log_probs(torch.tensor([ids + [d1, d2]]), model.initial_state(1))
        rows = logp[0, len(ids) - 1:]  # after the prompt, after d1, after d2
        wanted = target(model, ids + [d1, d2], params)[len(ids) - 1:]
        other = target(model, ids, SamplingParams(temperature=temperature * 1.5, top_k=top_k))[-1]
    generator = torch.Generator().manual_seed(0)
    n = 12000
    outputs = [tuple(accept(rows, [d1, d2], params, generator)) for _ in range(n)]
    for depth in range(3):  # the token at `depth`, among the samples that kept the drafts before it
        seen = Counter(out[depth] for out in outputs if out[:depth] == (d1, d2)[:depth])
        total = sum(seen.values())
        assert total > 500, depth
        assert chi_square_p(seen, wanted[depth], total) > 1e-3, depth
    # The test has power: the first tokens against the distribution at another temperature fail it.
    assert chi_square_p(Counter(out[0] for out in outputs), other, n) < 1e-6


def target(model, ids, params) -> torch.Tensor:
    """The distributions sampling draws from after each of `ids` (temperature and top-k applied)."""
    logp, _ = model.log_probs(torch.tensor([ids]), model.initial_state(1))
    return filter_logits(logp[0] / params.temperature, params.top_k, params.top_p).softmax(-1)


def chi_square_p(counts: Counter, probs: torch.Tensor, n: int) -> float:
    """Pearson's test of `counts` (token → count) against `probs`, cells expecting fewer than 5 pooled."""
    expected = (probs.double() * n).tolist()
    cells = [t for t, e in enumerate(expected) if e >= 5]
    observed = [counts[t] for t in cells]
    exp = [expected[t] for t in cells]
    if n - sum(exp) > 1e-6:
        observed.append(n - sum(observed))
        exp.append(n - sum(exp))
    return chisquare(observed, np.asarray(exp) * sum(observed) / sum(exp)).pvalue


def test_draft_settings_are_checked_by_name(vocab, tmp_path):
    tokenizer, _ = vocab
    assert load_drafter("none", None, tokenizer) is None
    assert isinstance(load_drafter("prompt", None, tokenizer), PromptLookup)
    with pytest.raises(ConfigError, match="needs generate.draft_model"):
        load_drafter("ngram", None, tokenizer)
    with pytest.raises(ConfigError, match="choose one of"):
        load_drafter("medusa", None, tokenizer)


def test_the_ngrams_one_position_query_is_the_last_row_of_its_log_probs(vocab, people_daily):
    tokenizer, ngram = vocab
    rng = np.random.default_rng(0)
    text = tokenizer.encode(people_daily[2100])
    contexts = [text[:n] for n in range(1, 12)] + [rng.integers(0, tokenizer.vocab_size, 5).tolist(), [3], [3, 3]]
    for context in contexts:
        state = np.asarray([context[-3:-1]], dtype=np.int64).reshape(1, -1)
        logp, _ = ngram.log_probs(torch.tensor([context[-1:]]), state)
        ours = torch.from_numpy(ngram.next_log10(context) * np.log(10))
        finite = torch.isfinite(ours)
        assert torch.equal(finite, torch.isfinite(logp[0, -1]))
        assert (ours[finite] - logp[0, -1][finite].double()).abs().max() < 1e-5, context
    draft = NGramDraft(ngram)
    assert draft.propose(text[:6], 3) == [int(ngram.next_log10(text[:6]).argmax()), *draft.propose(text[:6], 3)[1:]]


def test_prompt_lookup_drafts_what_followed_the_context_before():
    lookup = PromptLookup()
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]
    assert lookup.propose([1, 2, 3], 4) == []
    assert lookup.propose([4, 4, 4, 4, 4], 3) == [4, 4]  # a loop: the earliest match has the most after it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset's GPT (trained for its few steps) and a 3-gram over the same prepared data."""
    from hanlm.train.loop import Trainer
    from hanlm.train.ngram import train_ngram

    root = tmp_path_factory.mktemp("spec")

    def tiny(run_dir, *more):
        return load_config("tiny", [f"train.run_dir={run_dir}", "log.peak_tflops=0.1", *more])

    neural = Trainer(tiny(root / "gpt"), echo=lambda _: None).run()
    ngram, _ = train_ngram(tiny(root / "ngram", "model.arch=ngram", "model.order=3"), echo=lambda _: None)
    return str(neural.run_dir), str(ngram.run_dir)


def test_hanlm_generate_speculates_with_the_ngram_and_prints_the_same_text(trained, capsys):
    from hanlm.cli import main

    gpt, ngram = trained
    args = ["generate", gpt, "--prompt", "中国经济", "--max-tokens", "40", "--temperature", "0", "-v"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main([*args, "--speculative", "ngram", "--draft-model", ngram, "--draft-tokens", "3"]) == 0
    speculated = capsys.readouterr()
    assert speculated.out == plain.out
    assert "drafted tokens kept" in speculated.err and "drafted" not in plain.err
    assert main([*args, "--speculative", "prompt"]) == 0
    assert capsys.readouterr().out == plain.out


@pytest.mark.parametrize("draft, message", [("gpt", "an ngram draft is an n-gram model"),
                                            ("missing", "missing"), (None, "needs generate.draft_model"),
                                            ("k=0", "generate.draft_tokens 0"),
                                            ("k=100000", "generate.draft_tokens 100000")])
def test_a_wrong_draft_model_is_refused_by_name(trained, tmp_path, capsys, draft, message):
    from hanlm.cli import main

    gpt, ngram = trained
    path = {"gpt": gpt, "missing": str(tmp_path / "missing"), None: None}.get(draft, ngram)
    args = ["generate", gpt, "--prompt", "中国", "--speculative", "ngram", *(["--draft-model", path] if path else [])]
    if draft and draft.startswith("k="):
        args += ["--draft-tokens", draft[2:]]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def engine_tokens(model, tokenizer, speculation, prompts, budgets):
    """Each prompt's greedy tokens from the batched server engine, all submitted at once."""
    import asyncio

    from hanlm.serve.engine import Engine, ErrorEvent, FinishEvent, Request

    engine = Engine(model, tokenizer, max_batch=4, speculation=speculation)

    async def run():
        requests = [Request(prompt_ids(tokenizer, p), SamplingParams(max_tokens=n, temperature=0.0))
                    for p, n in zip(prompts, budgets)]
        engine.submit(requests)
        out = []
        for request in requests:
            tokens = []
            while not isinstance(event := await request.events.get(), FinishEvent):
                assert not isinstance(event, ErrorEvent), event.message
                tokens.append(event.token)
            out.append(tokens)
        return out

    engine.start()
    try:
        return asyncio.run(run()), engine.metrics
    finally:
        engine.stop()


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_the_batched_engine_speculates_per_row_and_gives_plain_greedy_output(vocab, arch):
    tokenizer, ngram = vocab
    model = lively_model(arch, tokenizer.vocab_size, seed=1)
    prompts = PROMPTS[:6] if arch == "gpt" else PROMPTS[:3]
    budgets = [30, 7, 25, 1, 30, 12][:len(prompts)]  # rows end at different steps, one after its first token
    wanted = [greedy(model, tokenizer, p, max_tokens=n).token_ids for p, n in zip(prompts, budgets)]
    for drafter in (PromptLookup(), NGramDraft(ngram)):
        got, metrics = engine_tokens(model, tokenizer, Speculation(drafter, k=4), prompts, budgets)
        assert got == wanted, type(drafter).__name__
        assert metrics.draft_tokens._value.get() > 0
    if arch == "gpt":  # with drafts that are sometimes right, the rows kept different numbers of them
        got, metrics = engine_tokens(model, tokenizer, Speculation(Oracle(wanted[0], 5, tokenizer.vocab_size), k=4),
                                     prompts[:1] * 3, budgets[:1] * 3)
        assert got == [wanted[0]] * 3
        assert 0 < metrics.draft_accepted._value.get() < metrics.draft_tokens._value.get()


def test_the_server_speculates_with_the_ngram_and_answers_like_hanlm_generate(trained, capsys):
    import httpx
    from serve_helpers import metric, serve

    from hanlm.serve.app import _drafts

    gpt, ngram = trained
    cfg = load_config("tiny")
    with serve(gpt, speculation=_drafts(cfg.generate, "ngram", ngram, 3)) as server:
        server.wait_ready()
        body = {"prompt": "中国经济", "max_tokens": 30, "temperature": 0}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert metric(server, "hanlm_draft_tokens_total") > 0
    model, _, tokenizer = load_for_inference(gpt)
    assert answer["choices"][0]["text"] == "".join(generate(model, tokenizer, "中国经济",
                                                            SamplingParams(max_tokens=30, temperature=0.0)))


def test_batched_sampling_draws_each_row_as_sample_does_and_from_its_distribution():
    from hanlm.sampling import sample, sample_rows

    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 50) * 3, -1)
    settings = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
                [(1.0, 0, 1.0), (0.7, 5, 1.0), (0.0, 0, 1.0), (1.0, 0, 0.8), (1.0, 0, 1.0), (1.3, 10, 0.9)]]
    rows = sample_rows(logp, settings, [torch.Generator().manual_seed(i) for i in range(6)])
    one_by_one = [int(sample(logp[i:i + 1], p, torch.Generator().manual_seed(i))) for i, p in enumerate(settings)]
    assert rows == one_by_one and rows[2] == int(logp[2].argmax())
    # Inverse-CDF sampling follows the filtered distribution (and never picks a token it filtered out).
    n = 20000
    params = settings[1]
    draws = sample(logp[1:2].expand(n, -1), params, torch.Generator().manual_seed(7))
    probs = filter_logits(logp[1:2] / params.temperature, params.top_k, params.top_p).softmax(-1)[0]
    assert set(draws.tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    assert chi_square_p(Counter(draws.tolist()), probs, n) > 1e-3
