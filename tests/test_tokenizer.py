"""Tokenizer claims, checked on real text: the People's Daily January 1998 corpus (~1.86 M chars)."""

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hanlm.data.tokenizer import (
    BYTE_BASE,
    BYTE_TOKENS,
    SPECIAL_TOKENS,
    Tokenizer,
    char_tokenizer_from_counts,
    train_tokenizer,
)
from hanlm.errors import ConfigError, DataError

KINDS = ("char", "bpe", "word")
HARD_TEXT = (
    "１９９８年，GDP增长8.8%！😀 emoji 👨‍👩‍👧\n\ttabs  two spaces\r\n한국어 العربية e\u0301 末尾 "
)
FIRST_TEXT_ID = BYTE_BASE + len(BYTE_TOKENS)  # under byte fallback, the first character's id
PROMPT = "GPT模型 2024"  # ASCII letters, a space and half-width digits: none is in People's Daily


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


def test_char_round_trip_without_byte_fallback_replaces_exactly_the_rare_chars_with_fffd(docs):
    text = "".join(docs)
    tok = train_tokenizer("char", docs, min_freq=2, byte_fallback=False)
    counts = Counter(text)
    rare = {c for c, n in counts.items() if n < 2}
    assert rare, "the corpus should have characters seen once"
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(counts) - len(rare)
    ids = tok.encode_array(text)
    assert int((ids == tok.unk_id).sum()) == len(rare)
    assert tok.decode(ids.tolist()) == text.translate({ord(c): "\ufffd" for c in rare})


def test_char_byte_fallback_round_trips_the_rare_chars_exactly(docs):
    text = "".join(docs)
    tok = train_tokenizer("char", docs, min_freq=2)
    rare = {c for c, n in Counter(text).items() if n < 2}
    ids = tok.encode_array(text)
    assert tok.unk_id not in ids and tok.vocab_size == FIRST_TEXT_ID + len(set(text)) - len(rare)
    assert len(ids) == len(text) + sum(len(c.encode()) - 1 for c in rare)
    assert tok.decode(ids.tolist()) == text


def test_char_encoding_keeps_the_count_of_every_character(docs, trained):
    tok, text = trained["char"], "".join(docs)
    ids = tok.encode_array(text)
    vocab = tok.to_dict()["vocab"]
    expected = np.zeros(tok.vocab_size, dtype=np.int64)
    for c, n in Counter(text).items():
        expected[vocab.index(c)] = n
    assert len(ids) == len(text)
    np.testing.assert_array_equal(np.bincount(ids, minlength=tok.vocab_size), expected)


def plain_ids(tok: Tokenizer, text: str) -> list[int]:
    """What a char tokenizer should give, one dict lookup per character: its id, else its UTF-8 bytes
    (byte fallback; a lone surrogate has none), else <unk>."""
    vocab = tok.to_dict()["vocab"]
    byte_fallback = tok.to_dict().get("byte_fallback", False)
    stoi = {c: i for i, c in enumerate(vocab) if i >= (FIRST_TEXT_ID if byte_fallback else BYTE_BASE)}
    ids = []
    for c in text:
        if c in stoi:
            ids.append(stoi[c])
        elif byte_fallback and not "\ud800" <= c <= "\udfff":
            ids.extend(BYTE_BASE + b for b in c.encode("utf-8"))
        else:
            ids.append(tok.unk_id)
    return ids


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_char_lookup_table_agrees_with_a_plain_dict_lookup(docs, byte_fallback):
    tok = train_tokenizer("char", docs[:2000], byte_fallback=byte_fallback)
    text = "".join(docs[2000:2500]) + HARD_TEXT + "\ud800" + "\U0010ffff"  # unseen chars, a lone surrogate
    assert tok.encode(text) == plain_ids(tok, text)


def test_char_vocab_is_ordered_by_frequency_then_codepoint(docs, trained):
    counts = Counter("".join(docs))
    vocab = trained["char"].to_dict()["vocab"][FIRST_TEXT_ID:]
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
    assert tuple(vocab[BYTE_BASE:FIRST_TEXT_ID]) == BYTE_TOKENS
    assert all(len(v) == 1 for v in vocab[FIRST_TEXT_ID : FIRST_TEXT_ID + n_chars])
    assert all(len(v) > 1 for v in vocab[FIRST_TEXT_ID + n_chars :])


def test_word_keeps_every_char_even_past_vocab_size(docs):
    word = train_tokenizer("word", docs[:300], vocab_size=100)
    assert word.vocab_size == FIRST_TEXT_ID + len(set("".join(docs[:300]))) > 100


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_word_out_of_vocabulary_word_falls_back_to_its_chars_then_bytes(byte_fallback):
    first = FIRST_TEXT_ID if byte_fallback else BYTE_BASE
    small = train_tokenizer("word", ["我爱北京天安门"], vocab_size=first + 7, byte_fallback=byte_fallback)  # chars
    big = train_tokenizer("word", ["我爱北京天安门"], vocab_size=first + 100, byte_fallback=byte_fallback)
    assert len(big.encode("天安门")) == 1
    ids = small.encode("天安门")
    assert len(ids) == 3 and small.unk_id not in ids
    assert small.decode(ids) == "天安门"
    ids, spans = small.encode_spans("天安门广场")
    if byte_fallback:
        assert ids[3:] == [BYTE_BASE + b for b in "广场".encode()] and small.decode(ids) == "天安门广场"
        assert spans[3:] == [(3, 4)] * 3 + [(4, 5)] * 3
    else:
        assert small.decode(ids) == "天安门\ufffd\ufffd" and spans[3:] == [(3, 4), (4, 5)]


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
        ('{"kind": "char", "format": 1, "vocab": ["<pad>", "<unk>", "<bos>", "<eos>", "ab"]}', "single characters"),
        (json.dumps({"kind": "char", "format": 1, "vocab": [*SPECIAL_TOKENS, *BYTE_TOKENS], "byte_fallback": "yes"}),
         "byte_fallback must be true or false"),
        (json.dumps({"kind": "word", "format": 1, "vocab": [*SPECIAL_TOKENS, "中"], "byte_fallback": True}),
         r"id 4 must be the byte token <0x00>, not '中'"),
        (json.dumps({"kind": "char", "format": 1, "vocab": [*SPECIAL_TOKENS, *BYTE_TOKENS[:255], "<0xff>", "中"],
                     "byte_fallback": True}), r"id 259 must be the byte token <0xFF>, not '<0xff>'"),
        (json.dumps({"kind": "char", "format": 1, "vocab": [*SPECIAL_TOKENS, *BYTE_TOKENS[:100]],
                     "byte_fallback": True}), r"id 104 must be the byte token <0x64>, not None"),
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
    with pytest.raises(ConfigError, match=r"tokenizer\.kind=pretrained is an imported model's own tokenizer"):
        train_tokenizer("pretrained", ["文本"])


@pytest.mark.parametrize("specials, vocab, message", [
    ({"pad": 0, "unk": -1, "bos": -1}, 10, "special token eos"),
    ({"pad": 0, "unk": -1, "bos": -1, "eos": 99}, 10, "eos: id 99 is not an id"),
    ({"pad": 0, "unk": -1, "bos": -1, "eos": -1}, 10, "no end-of-text token"),
    ({"pad": 0, "unk": -1, "bos": -1, "eos": 3}, 2, "vocab_size 2 is below"),
])
def test_a_pretrained_tokenizer_with_impossible_specials_is_refused_by_name(specials, vocab, message):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    from hanlm.data.tokenizer import PretrainedTokenizer

    hf = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(6)}, unk_token="w0"))
    with pytest.raises(DataError, match=message):
        PretrainedTokenizer(hf, specials, vocab)


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


# --- byte fallback (char, word): any text is encodable -------------------------------------------------


@pytest.fixture(scope="module")
def small(docs) -> dict[str, Tokenizer]:
    """Byte-fallback tokenizers from a few hundred documents, so ordinary text has unknown characters."""
    return {"char": train_tokenizer("char", docs[:300]), "word": train_tokenizer("word", docs[:300], vocab_size=3000)}


MIXED = st.text(st.one_of(st.sampled_from("人民日报中国的了GPT模型 2024\n"), st.sampled_from("😀👨‍👩‍👧🀄é"),
                          st.characters(codec="utf-8")))  # no lone surrogates: they have no UTF-8 and stay <unk>


@pytest.mark.parametrize("kind", ["char", "word"])
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(text=st.one_of(st.text(), MIXED))
def test_byte_fallback_round_trips_any_text_exactly(small, kind, text):
    tok = small[kind]
    ids, spans = tok.encode_spans(text)
    assert tok.unk_id not in ids and all(BYTE_BASE <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text and tok.encode(text) == ids and len(spans) == len(ids)
    if kind == "char":
        assert tok.encode_array(text).tolist() == ids == plain_ids(tok, text)


@pytest.mark.parametrize("kind", ["char", "word"])
def test_a_prompt_with_ascii_round_trips_without_unk(trained, kind):
    tok = trained[kind]
    ids = tok.encode(PROMPT)
    assert any(BYTE_BASE <= i < FIRST_TEXT_ID for i in ids), "the prompt should have characters outside the corpus"
    assert tok.unk_id not in ids and tok.decode(ids) == PROMPT


@pytest.mark.parametrize("kind", ["char", "word"])
def test_the_byte_tokens_of_a_character_share_its_span(small, kind):
    tok = small[kind]
    ids, spans = tok.encode_spans("人😀A")
    assert ids[-5:] == [BYTE_BASE + b for b in "😀A".encode()]
    assert spans[-5:] == [(1, 2)] * 4 + [(2, 3)]


@pytest.mark.parametrize("kind", ["char", "word"])
def test_text_spelling_a_byte_token_is_characters(docs, small, kind):
    tok = train_tokenizer(kind, docs[:200] + ["<0x41>"], vocab_size=1000)
    assert tok.decode(tok.encode("<0x41>")) == "<0x41>"
    assert not [i for i in tok.encode("<0x41>") if i < FIRST_TEXT_ID]  # its characters are known
    ids = small[kind].encode("<0x41>")  # unknown characters: six byte tokens, never the byte A
    assert ids == [BYTE_BASE + b for b in b"<0x41>"]
    assert "<0x41>" not in tok.stoi and tok.token_strings()[BYTE_BASE + 0x41] == "<0x41>"


@pytest.mark.parametrize("kind", ["char", "word"])
def test_decode_of_invalid_byte_runs_gives_fffd(small, kind):
    tok = small[kind]
    b = [BYTE_BASE + x for x in (0xE4, 0xB8)]  # the first two bytes of 中
    assert tok.decode([*b, *tok.encode("人"), BYTE_BASE + 0xFF, BYTE_BASE + 0x80, *b]) == "\ufffd人\ufffd\ufffd\ufffd"
    assert tok.decode([*b, tok.eos_id, BYTE_BASE + 0xAD]) == "\ufffd\ufffd"  # only adjacent bytes join


@pytest.mark.parametrize("kind", ["char", "word"])
def test_without_byte_fallback_unknown_chars_are_unk(docs, kind):
    tok = train_tokenizer(kind, docs[:300], vocab_size=3000, byte_fallback=False)
    assert "byte_fallback" not in tok.to_dict() and BYTE_TOKENS[0] not in tok.token_strings()
    unknown = [c for c in PROMPT if c not in tok.stoi]
    assert unknown, "the prompt should have characters outside the corpus"
    ids = tok.encode(PROMPT)
    assert ids.count(tok.unk_id) == len(unknown) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "".join("\ufffd" if c in unknown else c for c in PROMPT)


# Files written before byte fallback existed, with the fingerprints and ids the code of that time gave.
OLD_FILES = {
    "char": ({"kind": "char", "format": 1, "vocab": [*SPECIAL_TOKENS, "的", "人", "民", "A"]},
             "33fef94b46eb43af9cec4eec20512068c7d4b1621ca3c1576e34d919484f8790", "人民B<0x41>",
             [5, 6, 1, 1, 1, 1, 1, 1, 1]),
    "word": ({"kind": "word", "format": 1, "vocab": [*SPECIAL_TOKENS, "的", "人", "民", "A", "人民"]},
             "33ea771a61f7b4fc3e6c8d1000e1640a1eb7d9775d63e96a5d647f29a71e7dc7", "人民B的", [8, 1, 4]),
}


@pytest.mark.parametrize("kind", ["char", "word"])
def test_a_file_from_before_byte_fallback_loads_unchanged(tmp_path, kind):
    payload, fingerprint, text, ids = OLD_FILES[kind]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.load(path)
    assert tok.fingerprint() == fingerprint and tok.to_dict() == payload
    assert tok.encode(text) == ids and tok.decode(ids) == text.replace("B", "\ufffd").replace("<0x41>", "\ufffd" * 6)


def test_byte_fallback_is_saved_and_loaded(small, tmp_path):
    for tok in small.values():
        tok.save(tmp_path / "t.json")
        loaded = Tokenizer.load(tmp_path / "t.json")
        assert loaded.to_dict()["byte_fallback"] is True and loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode(PROMPT) == tok.encode(PROMPT)


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_char_encode_documents_equals_encoding_each_then_eos(docs, byte_fallback):
    tok = train_tokenizer("char", docs[:300], byte_fallback=byte_fallback)
    sample = ["", *docs[300:340], PROMPT, "", HARD_TEXT, "\ud800😀", "", "<eos>"]
    expected = [i for d in sample for i in (*tok.encode_array(d).tolist(), tok.eos_id)]
    assert tok.encode_documents(sample).tolist() == expected
    assert tok.encode_documents([]).tolist() == []


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_char_tokenizer_from_counts_equals_training_on_the_texts(docs, byte_fallback):
    texts = docs[:500]
    trained = train_tokenizer("char", texts, min_freq=2, byte_fallback=byte_fallback)
    counts = Counter("".join(texts))
    as_numpy = {c: np.int64(n) for c, n in counts.items()}  # how data preparation counts
    for c in (counts, as_numpy):
        built = char_tokenizer_from_counts(c, min_freq=2, byte_fallback=byte_fallback)
        assert built.to_dict() == trained.to_dict() and built.fingerprint() == trained.fingerprint()


def test_streamed_text_never_shows_half_a_character(small):
    from hanlm.generate import TextStream

    for tok in small.values():
        text = "人民😀模型 GPT\u0301"
        stream = TextStream(tok)
        pieces = [stream.push(i) for i in tok.encode(text)]
        assert "".join(pieces) + stream.finish() == text and "\ufffd" not in "".join(pieces)
        assert "😀" in pieces  # its four byte tokens come out as one piece


def test_byte_tokens_are_distinct_arpa_words(small):
    from hanlm.models.arpa import arpa_words

    for tok in small.values():
        words = arpa_words(tok.token_strings())
        assert words[BYTE_BASE:FIRST_TEXT_ID] == list(BYTE_TOKENS) and len(set(words)) == len(words)
