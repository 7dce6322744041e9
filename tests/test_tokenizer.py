"""Tokenizer claims, checked on real text: the People's Daily January 1998 corpus (~1.86 M chars)."""

import json
from collections import Counter

import numpy as np
import pytest

from hanlm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from hanlm.errors import ConfigError, DataError

KINDS = ("char", "bpe", "word")
HARD_TEXT = (
    "１９９８年，GDP增长8.8%！😀 emoji 👨‍👩‍👧\n\ttabs  two spaces\r\n한국어 العربية e\u0301 末尾 "
)


@pytest.fixture(scope="module")
def docs(people_daily) -> list[str]:
    assert sum(map(len, people_daily)) > 1_800_000
    return people_daily


@pytest.fixture(scope="module")
def trained(docs) -> dict[str, Tokenizer]:
    # BPE learns from a quarter of the corpus (fast) and must still round-trip all of it;
    # word sees a few thousand documents because jieba segments ~200 k chars/s.
    return {
        "char": train_tokenizer("char", docs),
        "bpe": train_tokenizer("bpe", docs[:5000], vocab_size=2000),
        "word": train_tokenizer("word", docs[:3000], vocab_size=8000),
    }


def test_bpe_round_trips_the_whole_corpus_exactly(docs, trained):
    bpe = trained["bpe"]
    assert [bpe.decode(ids) for ids in bpe.encode_batch(docs)] == docs


@pytest.mark.parametrize(
    "text", [HARD_TEXT, "１９９８", "<eos>", " ", "\n\n", "", "a" * 5000, "中" * 3000 + "🀄" * 7]
)
def test_bpe_round_trips_unseen_scripts_emoji_digits_and_whitespace(trained, text):
    bpe = trained["bpe"]
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocab_size_is_the_requested_size(trained):
    assert trained["bpe"].vocab_size == 2000


def test_char_round_trip_replaces_exactly_the_rare_chars_with_fffd(docs):
    text = "".join(docs)
    tok = train_tokenizer("char", docs, min_freq=2)
    counts = Counter(text)
    rare = {c for c, n in counts.items() if n < 2}
    assert rare, "the corpus should have characters seen once"
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(counts) - len(rare)
    ids = tok.encode_array(text)
    assert int((ids == tok.unk_id).sum()) == len(rare)
    assert tok.decode(ids.tolist()) == text.translate({ord(c): "\ufffd" for c in rare})


def test_char_encoding_keeps_the_count_of_every_character(docs, trained):
    tok, text = trained["char"], "".join(docs)
    ids = tok.encode_array(text)
    vocab = tok.to_dict()["vocab"]
    expected = np.zeros(tok.vocab_size, dtype=np.int64)
    for c, n in Counter(text).items():
        expected[vocab.index(c)] = n
    assert len(ids) == len(text)
    np.testing.assert_array_equal(np.bincount(ids, minlength=tok.vocab_size), expected)


def test_char_lookup_table_agrees_with_a_plain_dict_lookup(docs, trained):
    tok = trained["char"]
    text = "".join(docs[:2000]) + HARD_TEXT + "\ud800"  # unseen chars and a lone surrogate -> <unk>
    stoi = {c: i for i, c in enumerate(tok.to_dict()["vocab"]) if i >= len(SPECIAL_TOKENS)}
    assert tok.encode(text) == [stoi.get(c, tok.unk_id) for c in text]


def test_char_vocab_is_ordered_by_frequency_then_codepoint(docs, trained):
    counts = Counter("".join(docs))
    vocab = trained["char"].to_dict()["vocab"][len(SPECIAL_TOKENS) :]
    assert vocab == sorted(counts, key=lambda c: (-counts[c], c))


def test_word_round_trips_thousands_of_documents(docs, trained):
    word = trained["word"]
    sample = docs[:3000]
    assert [word.decode(word.encode(d)) for d in sample] == sample


def test_word_vocab_fills_vocab_size_with_words_after_all_chars(docs, trained):
    word = trained["word"]
    vocab = word.to_dict()["vocab"]
    n_chars = len(set("".join(docs[:3000])))
    assert word.vocab_size == 8000
    assert all(len(v) == 1 for v in vocab[len(SPECIAL_TOKENS) : len(SPECIAL_TOKENS) + n_chars])
    assert all(len(v) > 1 for v in vocab[len(SPECIAL_TOKENS) + n_chars :])


def test_word_keeps_every_char_even_past_vocab_size(docs):
    word = train_tokenizer("word", docs[:300], vocab_size=100)
    assert word.vocab_size == len(SPECIAL_TOKENS) + len(set("".join(docs[:300]))) > 100


def test_word_out_of_vocabulary_word_falls_back_to_its_chars():
    small = train_tokenizer("word", ["我爱北京天安门"], vocab_size=len(SPECIAL_TOKENS) + 7)  # chars only
    big = train_tokenizer("word", ["我爱北京天安门"], vocab_size=100)
    assert len(big.encode("天安门")) == 1
    ids = small.encode("天安门")
    assert len(ids) == 3 and small.unk_id not in ids
    assert small.decode(ids) == "天安门"
    assert small.decode(small.encode("天安门广场")) == "天安门\ufffd\ufffd"


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_load_gives_an_identical_tokenizer(docs, trained, tmp_path, kind):
    tok = trained[kind]
    path = tmp_path / f"{kind}.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert type(loaded) is type(tok) and loaded.kind == kind
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.to_dict() == tok.to_dict() == json.loads(path.read_text(encoding="utf-8"))
    sample = docs[-200:] + [HARD_TEXT, "<eos>"]
    assert loaded.encode_batch(sample) == tok.encode_batch(sample)


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_is_reproducible_and_changes_with_the_vocab(docs, kind):
    a = train_tokenizer(kind, docs[:300], vocab_size=600)
    again = train_tokenizer(kind, docs[:300], vocab_size=600)
    other = train_tokenizer(kind, docs[300:600], vocab_size=600)
    assert a.fingerprint() == again.fingerprint()
    assert a.fingerprint() != other.fingerprint()
    assert len(a.fingerprint()) == 64


@pytest.mark.parametrize(
    "content, complaint",
    [
        (None, "cannot read"),
        ('{"kind": "char", "vocab": [', "not a tokenizer JSON"),
        (b"\xff\xfe garbage", "not a tokenizer JSON"),
        ('{"kind": "sentencepiece", "format": 1}', "unknown tokenizer kind"),
        ('["char"]', "unknown tokenizer kind"),
        ('{"kind": "char", "format": 99, "vocab": []}', "format"),
        ('{"kind": "char", "format": 1}', "malformed char"),
        ('{"kind": "char", "format": 1, "vocab": ["a"]}', "must start with"),
        ('{"kind": "bpe", "format": 1, "hf": {"model": 3}}', "malformed bpe"),
    ],
)
def test_load_of_a_bad_file_raises_data_error_naming_it(tmp_path, content, complaint):
    path = tmp_path / "tok.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=complaint) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_literal_special_token_text_is_encoded_as_plain_text(docs, tmp_path, kind):
    text = "用户写了<eos>和<pad><bos><unk>再见"
    tok = train_tokenizer(kind, docs[:200] + [text], vocab_size=600)
    tok.save(tmp_path / "t.json")
    for t in (tok, Tokenizer.load(tmp_path / "t.json")):  # bpe's guard is not in the HF JSON
        for ids in (t.encode(text), t.encode_batch([text])[0], t.encode_array(text).tolist()):
            assert not set(ids) & {0, 1, 2, 3}
            assert t.decode(ids) == text


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_are_0_to_3(trained, kind):
    tok = trained[kind]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    d = tok.to_dict()
    if kind == "bpe":
        assert {t["content"]: t["id"] for t in d["hf"]["added_tokens"]} == dict(zip(SPECIAL_TOKENS, range(4)))
    else:
        assert tuple(d["vocab"][:4]) == SPECIAL_TOKENS


@pytest.mark.parametrize("kind", KINDS)
def test_decode_drops_pad_bos_eos_and_shows_unk_as_one_fffd(trained, kind):
    tok = trained[kind]
    ids = [tok.bos_id, *tok.encode("中国"), tok.unk_id, *tok.encode("人民"), tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "中国\ufffd人民"


@pytest.mark.parametrize("kind", KINDS)
def test_encode_batch_and_encode_array_agree_with_encode(docs, trained, kind):
    tok = trained[kind]
    sample = docs[:100] + [HARD_TEXT, ""]
    batch = tok.encode_batch(sample)
    assert batch == [tok.encode(t) for t in sample]
    for text, ids in zip(sample, batch):
        arr = tok.encode_array(text)
        assert arr.dtype == np.int64 and arr.ndim == 1 and arr.tolist() == ids
    assert max(max(ids, default=0) for ids in batch) < tok.vocab_size


def test_unknown_kind_raises_config_error_listing_the_valid_kinds():
    with pytest.raises(ConfigError, match=r"tokenizer\.kind.*bpe, char, word"):
        train_tokenizer("sentencepiece", ["文本"])


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_empty_text_raises_data_error(kind):
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(kind, iter(["", ""]))


@pytest.mark.parametrize("kind", ["char", "word"])
def test_training_with_min_freq_above_every_count_raises_data_error(kind):
    with pytest.raises(DataError, match="min_freq"):
        train_tokenizer(kind, ["一二三"], min_freq=2)


def test_bpe_vocab_smaller_than_the_byte_alphabet_raises_config_error():
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        train_tokenizer("bpe", ["文本"], vocab_size=100)


def test_bpe_splits_digits_only_when_asked(docs):
    split = train_tokenizer("bpe", docs[:500] + ["1998年"] * 2000, vocab_size=1000)
    joined = train_tokenizer("bpe", docs[:500] + ["1998年"] * 2000, vocab_size=1000, split_digits=False)
    assert len(split.encode("1998")) == 4
    assert len(joined.encode("1998")) < 4
