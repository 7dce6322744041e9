"""Models: the LanguageModel interface (loss, logits, log_probs with state), init, parameter and FLOP
counts, activation checkpointing, pretrained vectors and the registry."""

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hanlm.config import ModelConfig, load_config
from hanlm.data.tokenizer import BYTE_BASE, train_tokenizer
from hanlm.errors import ConfigError, DataError
from hanlm.models import build_model, load_vectors

ARCHS = ["gpt", "lstm", "gpt-gqa", "gpt-qwen3", "gpt-qwen2"]
B, T = 8, 64
# gpt-gqa: the GPT with one key/value head for its two query heads (multi-query) and Llama 3's rotary base
VARIANTS = {"gpt-gqa": ("gpt", ["model.n_kv_head=1", "model.rope_theta=500000"]),
            # Qwen3's shape: QK-norm and heads wider than n_embd / n_head, another MLP width and norm epsilon
            "gpt-qwen3": ("gpt", ["model.qk_norm=true", "model.head_dim=48", "model.intermediate_size=100",
                                  "model.norm_eps=1e-6"]),
            "gpt-qwen2": ("gpt", ["model.qkv_bias=true", "model.n_kv_head=1"])}


def tiny(arch: str, *overrides: str) -> ModelConfig:
    """The tiny preset (2 layers, 2 heads, 64-d, context 128) of `arch` (or of a variant in VARIANTS)."""
    arch, extra = VARIANTS.get(arch, (arch, []))
    return load_config("tiny", [f"model.arch={arch}", *extra, *overrides]).model


@pytest.fixture(scope="module")
def tok(people_daily):
    return train_tokenizer("char", people_daily[:300])


@pytest.fixture(scope="module")
def ids(people_daily, tok) -> torch.Tensor:
    return torch.from_numpy(tok.encode_documents(people_daily[:300]))


@pytest.fixture(scope="module")
def batch(ids) -> tuple[torch.Tensor, torch.Tensor]:
    """B rows of T characters of People's Daily and their next characters."""
    return ids[: B * T].view(B, T), ids[1 : B * T + 1].view(B, T)


# ---------------------------------------------------------------------------------------------
# Training interface

@pytest.mark.parametrize("arch", ARCHS)
def test_loss_at_init_is_near_uniform_and_logits_cover_the_vocabulary(arch, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch), tok.vocab_size)
    x, y = batch
    loss = model(x, y)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(tok.vocab_size)) < 0.05  # small init: near-uniform predictions
    assert model(x).shape == (B, T, tok.vocab_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_ignores_targets_marked_minus_one(arch, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch), tok.vocab_size)
    x, y = batch
    masked = y.clone()
    masked[:, : T // 2] = -1
    expected = F.cross_entropy(model(x)[:, T // 2 :].reshape(-1, tok.vocab_size), y[:, T // 2 :].reshape(-1))
    torch.testing.assert_close(model(x, masked), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_adamw_steps_on_real_text_lower_the_loss(arch, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch), tok.vocab_size)
    x, y = batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model(x, y).item()
    for _ in range(10):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert model(x, y).item() < before - 0.8


# ---------------------------------------------------------------------------------------------
# Incremental decoding

def incremental_log_probs(model, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """log_probs over `tokens` (B, T) fed in chunks of the given sizes, concatenated to (B, T, V)."""
    state, out, start = model.initial_state(tokens.size(0)), [], 0
    for n in chunks:
        lp, state = model.log_probs(tokens[:, start : start + n], state)
        out.append(lp)
        start += n
    assert start == tokens.size(1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[24], [10] + [1] * 14, [5, 1, 3, 7, 1, 2, 5]],
                         ids=["whole", "prefill+steps", "uneven"])
def test_incremental_log_probs_equal_the_full_forward(arch, chunks, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch, "model.dropout=0.2"), tok.vocab_size).eval()  # eval turns dropout off
    tokens = batch[0][:3, :24]
    with torch.no_grad():
        full = F.log_softmax(model(tokens).float(), dim=-1)
        steps = incremental_log_probs(model, tokens, chunks)
    assert steps.dtype == torch.float32 and steps.shape == full.shape
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_log_probs_leaves_the_state_it_was_given_reusable(arch, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch), tok.vocab_size).eval()
    prompt, a, b = batch[0][:2, :8], batch[0][:2, 8:12], batch[0][2:4, 8:12]
    with torch.no_grad():
        _, after_prompt = model.log_probs(prompt, model.initial_state(2))
        _, after_a = model.log_probs(a, after_prompt)  # one continuation...
        from_b, _ = model.log_probs(b, after_prompt)  # ...must not disturb another from the same state
        then_a, _ = model.log_probs(b, after_a)  # ...nor be disturbed by it
        full = F.log_softmax(model(torch.cat([prompt, b], dim=1)).float(), dim=-1)
        full_a = F.log_softmax(model(torch.cat([prompt, a, b], dim=1)).float(), dim=-1)
    torch.testing.assert_close(from_b, full[:, 8:], atol=1e-5, rtol=0)
    torch.testing.assert_close(then_a, full_a[:, 12:], atol=1e-5, rtol=0)


def test_grouped_query_attention_caches_fewer_heads_and_decodes_ragged_rows_exactly(tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny("gpt-gqa"), tok.vocab_size).eval()
    assert model.blocks[0].attn.qkv.weight.shape == ((2 + 2 * 1) * 32, 64)  # 2 query heads, 1 key and 1 value
    tokens = batch[0][:3, :12]
    batch = model.decode_batch(3)
    with torch.no_grad():
        for row, n in zip(tokens, (5, 9, 2)):  # rows of different lengths, decoded together
            _, state = model.log_probs(row[None, :n], model.initial_state(1))
            batch.admit(state, n)
        assert state.layer(0)[0].shape == (1, 1, 2, 32)
        nxt = torch.stack([row[n] for row, n in zip(tokens, (5, 9, 2))])
        logp = batch.step(nxt[:, None])[:, -1]
        for b, (row, n) in enumerate(zip(tokens, (5, 9, 2))):
            full = F.log_softmax(model(row[None, :n + 1]).float(), dim=-1)[0, -1]
            torch.testing.assert_close(logp[b], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (["model.n_kv_head=3", "model.n_head=4", "model.n_embd=64"], "model.n_kv_head .3. must divide model.n_head .4."),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.head_dim=15"], "model.head_dim = 15. must be even"),
    (["model.n_head=3"], r"must be divisible by model.n_head \(3\); e.g. n_head=2 \(or set model.head_dim\)"),
    (["model.norm_eps=0"], "model.norm_eps"),
])
def test_impossible_attention_shapes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_the_gpt_cache_grows_in_place_and_copies_only_when_it_must(tok, ids):
    torch.manual_seed(0)
    model = build_model(tiny("gpt"), tok.vocab_size).eval()  # context 128
    tokens = ids[:128].view(1, 128)
    with torch.no_grad():
        full = F.log_softmax(model(tokens).float(), dim=-1)
        logp, state = model.log_probs(tokens[:, :3], model.initial_state(1))
        stores, steps = {id(state.store)}, [logp]
        for t in range(3, 128):
            logp, state = model.log_probs(tokens[:, t:t + 1], state)
            stores.add(id(state.store))
            steps.append(logp)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert len(stores) == 2 and state.store.capacity == 128  # 64 positions, then doubled once to the context


@pytest.mark.parametrize("arch", ARCHS)
def test_independent_initial_states_share_nothing(arch, tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny(arch), tok.vocab_size).eval()
    x = batch[0]
    with torch.no_grad():
        first, second = model.initial_state(1), model.initial_state(1)
        model.log_probs(x[:1, :20], first)
        lp, _ = model.log_probs(x[1:2, :5], second)
        fresh, _ = model.log_probs(x[1:2, :5], model.initial_state(1))
    assert torch.equal(lp, fresh)
    if arch == "gpt":
        assert second.pos == 0


def test_gpt_refuses_to_run_past_its_context_length_naming_both_lengths(tok, ids):
    model = build_model(tiny("gpt"), tok.vocab_size).eval()  # context_length 128
    with torch.no_grad():
        _, state = model.log_probs(ids[:100].view(1, -1), model.initial_state())
        with pytest.raises(ValueError, match=r"129.*128"):
            model.log_probs(ids[100:129].view(1, -1), state)
        model.log_probs(ids[100:128].view(1, -1), state)  # exactly full is fine
        with pytest.raises(ValueError, match=r"129.*128"):
            model(ids[:129].view(1, -1))


# ---------------------------------------------------------------------------------------------
# Shapes, counts, FLOPs

@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embeddings_share_storage_and_are_counted_once(arch, tok):
    V, d = tok.vocab_size, 64
    tied = build_model(tiny(arch, "model.tie_embeddings=true"), V)
    untied = build_model(tiny(arch, "model.tie_embeddings=false"), V)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * d
    assert tied.num_params() - tied.num_params(embeddings=False) == V * d
    assert untied.num_params() - untied.num_params(embeddings=False) == V * d  # only the input embedding


@pytest.mark.parametrize("tie", ["true", "false"])
def test_gpt_params_and_flops_match_the_hand_formula_for_tiny(tie, tok):
    V, L, d, seq = tok.vocab_size, 2, 64, 64
    hidden = 192  # 8/3 · 64 = 170.7, rounded up to a multiple of 64
    per_layer = 3 * d * d + d * d + 3 * d * hidden + 2 * d  # qkv, proj, gate/up/down, two RMSNorm weights
    non_embedding = L * per_layer + d  # + the final norm
    model = build_model(tiny("gpt", f"model.tie_embeddings={tie}"), V)
    head = V * d if tie == "false" else 0
    assert model.num_params(embeddings=False) == non_embedding + head
    assert model.flops_per_token(seq) == 6 * (non_embedding + V * d) + 12 * L * d * seq


def test_lstm_flops_are_six_per_weight_including_the_head(tok):
    V, L, d = tok.vocab_size, 2, 64
    lstm_params = L * (4 * d * d * 2 + 4 * d * 2)  # W_ih, W_hh and their two biases per layer
    model = build_model(tiny("lstm"), V)
    assert model.context_length is None
    assert model.flops_per_token(64) == model.flops_per_token(1) == 6 * (lstm_params + V * d)


# ---------------------------------------------------------------------------------------------
# The fused head + loss against the plain path (logits, then F.cross_entropy)

def _loss_and_grads(model, loss):
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_rows", [100, 4096])  # several chunks with a ragged last one; one chunk
def test_fused_loss_equals_logits_then_cross_entropy_with_the_same_gradients(arch, tie, chunk_rows, tok, batch,
                                                                               monkeypatch):
    from hanlm.models import loss as fused

    monkeypatch.setattr(fused, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    model = build_model(tiny(arch, f"model.tie_embeddings={str(tie).lower()}"), tok.vocab_size)
    x, y = batch
    y = y.clone()
    y[0, :10] = -1
    y[3, 40:] = -1
    plain = _loss_and_grads(model, F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-1))
    ours = _loss_and_grads(model, model(x, y))
    torch.testing.assert_close(ours[0], plain[0], atol=1e-6, rtol=1e-6)
    assert plain[1].keys() == ours[1].keys()
    for name, g in plain[1].items():
        torch.testing.assert_close(ours[1][name], g, atol=1e-7, rtol=1e-4, msg=name)


def test_fused_loss_under_bf16_autocast_matches_the_plain_path_to_bf16_precision(tok, batch):
    torch.manual_seed(0)
    model = build_model(tiny("gpt"), tok.vocab_size)
    x, y = batch
    with torch.autocast("cpu", torch.bfloat16):
        plain = _loss_and_grads(model, F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()))
        ours = _loss_and_grads(model, model(x, y))
    torch.testing.assert_close(ours[0], plain[0], atol=2e-3, rtol=0)
    for name, g in plain[1].items():
        assert ours[1][name].dtype == g.dtype == torch.float32
        torch.testing.assert_close(ours[1][name], g, atol=2e-3, rtol=2e-2, msg=name)


def test_fused_loss_without_grad_computes_no_gradients(tok, batch):
    model = build_model(tiny("gpt"), tok.vocab_size)
    x, y = batch
    with torch.no_grad():
        loss = model(x, y)
    assert not loss.requires_grad and torch.isfinite(loss)


def test_torch_compile_gives_the_plain_loss_and_gradients(tok, batch):
    """train.compile: inductor's C++ kernels (the fused loss included) against eager PyTorch."""
    torch.manual_seed(0)
    model = build_model(tiny("gpt"), tok.vocab_size)
    x, y = batch
    compiled = _loss_and_grads(model, torch.compile(model)(x, y))
    plain = _loss_and_grads(model, model(x, y))
    torch.testing.assert_close(compiled[0], plain[0], atol=1e-5, rtol=1e-5)
    for name, g in plain[1].items():
        torch.testing.assert_close(compiled[1][name], g, atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing

def test_activation_checkpointing_gives_the_same_loss_and_gradients(tok, batch):
    x, y = batch
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny("gpt", "model.dropout=0.1"), tok.vocab_size)  # dropout: the recompute must replay it
        model.set_activation_checkpointing(enabled)
        calls = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (calls0, calls1) == (2, 4)  # checkpointed blocks run again in backward
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Pretrained vectors

N_CHARS, OOV_WORDS, DIM = 50, ["人民日报", "改革开放", "社会主义", "经济建设", "新世纪"], 64


@pytest.fixture(scope="module")
def vector_entries(tok) -> list[tuple[str, np.ndarray]]:
    """50 characters of the vocabulary and 5 words outside it (a char vocabulary has no words)."""
    rng = np.random.default_rng(0)
    tokens = tok.vocab[BYTE_BASE + 256 : BYTE_BASE + 256 + N_CHARS]  # past the specials and the byte ids
    tokens = tokens[:20] + OOV_WORDS[:3] + tokens[20:] + OOV_WORDS[3:]
    return [(t, rng.standard_normal(DIM).astype(np.float32)) for t in tokens]


def write_text(path, entries, header=None) -> None:
    lines = [header or f"{len(entries)} {len(entries[0][1])}"]
    lines += [t + " " + " ".join(f"{v:.9g}" for v in vec) + " " for t, vec in entries]  # word2vec's trailing space
    data = ("\n".join(lines) + "\n").encode("utf-8")
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def write_binary(path, entries) -> None:
    data = f"{len(entries)} {len(entries[0][1])}\n".encode()
    data += b"".join(t.encode("utf-8") + b" " + vec.astype("<f4").tobytes() + b"\n" for t, vec in entries)
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


@pytest.mark.parametrize("name", ["chars.vec", "chars.txt.gz", "chars.bin", "chars.bin.gz", "chars.data"])
def test_vectors_fill_exactly_the_rows_of_vocabulary_tokens_in_the_file(name, tmp_path, tok, vector_entries):
    path = tmp_path / name
    (write_binary if ".bin" in name or name == "chars.data" else write_text)(path, vector_entries)
    emb = build_model(tiny("gpt"), tok.vocab_size).tok_emb
    before = emb.weight.detach().clone()
    report = load_vectors(path, tok, emb)
    V = tok.vocab_size
    assert (report.dim, report.vectors_in_file, report.tokens_covered, report.vocab_size) == (DIM, 55, N_CHARS, V)
    assert report.coverage == N_CHARS / (V - 4)
    assert report.summary() == f"loaded 50 of {V - 4:,} tokens ({50 / (V - 4):.1%}) from {name} (64-d, 55 vectors)"
    expected = before.clone()
    for token, vec in vector_entries:
        if token in tok.stoi:
            expected[tok.stoi[token]] = torch.from_numpy(vec)
    assert torch.equal(emb.weight.detach(), expected)  # found rows exactly, the rest untouched
    assert (emb.weight != before).any(dim=1).sum() == N_CHARS


def test_build_model_loads_configured_vectors_and_reports_them(tmp_path, tok, vector_entries):
    path = tmp_path / "chars.vec"
    write_text(path, vector_entries)
    cfg = tiny("gpt", f"model.vectors={path}")
    model = build_model(cfg, tok.vocab_size, tok)
    assert model.vector_report.tokens_covered == N_CHARS
    first, vec = vector_entries[0]
    assert torch.equal(model.tok_emb.weight[tok.stoi[first]].detach(), torch.from_numpy(vec))
    assert torch.equal(model.lm_head.weight[tok.stoi[first]].detach(), torch.from_numpy(vec))  # tied
    with pytest.raises(ConfigError, match="tokenizer"):
        build_model(cfg, tok.vocab_size)
    assert build_model(tiny("gpt"), tok.vocab_size).vector_report is None


def test_bpe_tokens_are_matched_by_their_decoded_text(tmp_path, people_daily):
    bpe = train_tokenizer("bpe", people_daily[:300], vocab_size=600)
    clean = [i for i in range(4, bpe.vocab_size) if len(bpe.decode([i])) > 1 and "\ufffd" not in bpe.decode([i])
             and bpe.decode([i]).strip() == bpe.decode([i])][:10]
    assert len(clean) == 10
    rng = np.random.default_rng(1)
    entries = [(bpe.decode([i]), rng.standard_normal(DIM).astype(np.float32)) for i in clean]
    write_text(tmp_path / "bpe.vec", entries)
    emb = torch.nn.Embedding(bpe.vocab_size, DIM)
    report = load_vectors(tmp_path / "bpe.vec", bpe, emb)
    assert report.tokens_covered == 10
    for i, (_, vec) in zip(clean, entries):
        assert torch.equal(emb.weight[i].detach(), torch.from_numpy(vec))


def test_vectors_of_the_wrong_dimension_are_a_config_error_naming_both(tmp_path, tok, vector_entries):
    path = tmp_path / "small.vec"
    write_text(path, [(t, v[:32]) for t, v in vector_entries])
    with pytest.raises(ConfigError, match=r"small\.vec.*32-d.*n_embd is 64"):
        load_vectors(path, tok, torch.nn.Embedding(tok.vocab_size, DIM))


@pytest.mark.parametrize("damage", ["63 numbers", "not a number"])
def test_a_malformed_line_is_a_data_error_naming_its_line(damage, tmp_path, tok, vector_entries):
    entries = list(vector_entries)
    token, vec = entries[5]  # line 7: after the header and five good lines
    entries[5] = (token, vec[:63]) if damage == "63 numbers" else (token, vec)
    path = tmp_path / "bad.vec"
    write_text(path, entries, header=f"55 {DIM}")
    if damage == "not a number":
        lines = path.read_text(encoding="utf-8").splitlines()
        fields = lines[6].split(" ")
        fields[1] = "abc"  # a word where the first number belongs
        lines[6] = " ".join(fields)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.vec, line 7"):
        load_vectors(path, tok, torch.nn.Embedding(tok.vocab_size, DIM))


def test_a_truncated_binary_file_is_a_data_error(tmp_path, tok, vector_entries):
    path = tmp_path / "cut.bin"
    write_binary(path, vector_entries)
    path.write_bytes(path.read_bytes()[:-100])  # the file stops inside the last entry
    with pytest.raises(DataError, match=r"cut\.bin.*entry 54"):
        load_vectors(path, tok, torch.nn.Embedding(tok.vocab_size, DIM))


def test_a_text_file_shorter_than_its_header_is_a_data_error(tmp_path, tok, vector_entries):
    path = tmp_path / "short.vec"
    write_text(path, vector_entries, header=f"60 {DIM}")
    with pytest.raises(DataError, match=r"60 vectors.*holds 55"):
        load_vectors(path, tok, torch.nn.Embedding(tok.vocab_size, DIM))


def test_a_missing_vectors_file_is_a_data_error(tmp_path, tok):
    with pytest.raises(DataError, match="nowhere.vec"):
        load_vectors(tmp_path / "nowhere.vec", tok, torch.nn.Embedding(tok.vocab_size, DIM))


# ---------------------------------------------------------------------------------------------
# Registry

def test_the_ngram_arch_is_refused_with_a_pointer_to_its_own_trainer(tok):
    with pytest.raises(ConfigError, match="estimated from counts.*hanlm.train.ngram"):
        build_model(tiny("ngram"), tok.vocab_size)
