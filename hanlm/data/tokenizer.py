"""Tokenizers: one interface, three kinds hanlm trains (char, byte-level BPE, words) and one it imports
(`pretrained`: a published model's tokenizer.json, its special tokens where that model put them).

Words come from jieba, or from one of hanlm's own taggers (`tokenizer.segmenter: CKPT`, a
checkpoint of `hanlm finetune --task tag`), whose path is saved with the vocabulary.

Every trained kind reserves ids 0..3 for SPECIAL_TOKENS; every kind saves to one JSON file and has a
fingerprint (sha256 of its canonical JSON) that is recorded with the shards it encoded.
Text that merely spells a special token ("<eos>") is encoded as ordinary text, so data
can never inject control tokens.

Byte fallback (char and word, on for new tokenizers): ids 4..259 are the 256 bytes, spelled
`<0x00>` … `<0xFF>` as sentencepiece does, and a character outside the vocabulary becomes the
byte tokens of its UTF-8 encoding, so any text is encoded and decoded back exactly. Like the
specials, byte tokens are never looked up as text: "<0x41>" in text is six characters. A lone
surrogate (from surrogateescape decoding) has no UTF-8 encoding and stays <unk>. Tokenizers
saved before byte fallback have no "byte_fallback" field and load unchanged, without it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hanlm.atomic import atomic_write_text
from hanlm.data.segmenters import JIEBA, segment_words
from hanlm.errors import ConfigError, DataError


SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
FORMAT = 1
UNK_CHAR = "\ufffd"  # one character, so decoded text stays aligned char-for-char with the input
_MIN_BPE_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the byte alphabet
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # byte b is id BYTE_BASE + b under byte fallback
BYTE_BASE = len(SPECIAL_TOKENS)
# Never learned as words: a word spelled like a special or a byte would share its token string (ARPA export).
_RESERVED = frozenset(SPECIAL_TOKENS) | frozenset(BYTE_TOKENS)
_DOC_END = 0x110000  # one past Unicode: the codepoint CharTokenizer.encode_documents puts after each document


class Tokenizer(ABC):
    """Maps text to token ids and back; ids 0..3 are <pad>, <unk>, <bos>, <eos> in every trained kind (a pretrained
    one has its own: read pad_id, unk_id, bos_id, eos_id, never the numbers)."""

    kind: ClassVar[str]
    pad_id: ClassVar[int] = 0
    unk_id: ClassVar[int] = 1
    bos_id: ClassVar[int] = 2
    eos_id: ClassVar[int] = 3

    @property
    def start_id(self) -> int:
        """The token a task's input opens with: <eos>, since pretraining puts it between documents (<bos> is never
        in hanlm's data)."""
        return self.eos_id

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; every id is in range(vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no <bos>/<eos> added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, as `encode` would give them."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`'s ids with the (start, end) character span of `text` each came from; tokens that split
        one character (byte-level BPE, byte fallback) share its span."""

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of `text` as a 1-D int64 array (the path data preparation uses)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        """`docs` encoded one after another, each followed by <eos>: the packed form shards store."""
        eos = np.array([self.eos_id], dtype=np.int64)
        return np.concatenate([eos[:0], *(part for d in docs for part in (self.encode_array(d), eos))])

    def _packed_batch(self, docs: Sequence[str]) -> np.ndarray:
        """`encode_documents` through one `encode_batch` call, for kinds whose batches beat single calls."""
        packed: list[int] = []
        for ids in self.encode_batch(docs):
            packed += ids
            packed.append(self.eos_id)
        return np.asarray(packed, dtype=np.int64)

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: <pad>/<bos>/<eos> are dropped, <unk> becomes U+FFFD, byte tokens are read as UTF-8
        (an invalid or cut sequence becomes U+FFFD)."""

    def with_dropout(self, p: float) -> Tokenizer:
        """This tokenizer with BPE-dropout (Provilkov et al. 2020): each merge skipped with probability p.
        Only bpe has merges: every other kind refuses, naming tokenizer.kind."""
        raise ConfigError(f"tokenizer.bpe_dropout applies to tokenizer.kind bpe (it skips BPE merges), not "
                          f"{self.kind}; set tokenizer.bpe_dropout: 0 or tokenizer.kind: bpe")

    @abstractmethod
    def token_strings(self) -> list[str]:
        """The vocabulary entry of every id, specials included (bpe: its byte-level spelling; byte fallback:
        `<0xNN>`), all distinct."""

    @abstractmethod
    def _payload(self) -> dict[str, Any]:
        """The kind-specific part of `to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description from which `from_dict` rebuilds this tokenizer."""
        return {"kind": self.kind, "format": FORMAT, **self._payload()}

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_dict()` to one UTF-8 JSON file, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON: equal fingerprints mean equal encodings (word: same jieba too)."""
        canonical = json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @staticmethod
    def from_dict(data: dict[str, Any], source: str = "tokenizer dict") -> Tokenizer:
        """Rebuild a tokenizer from `to_dict()` output; DataError (naming `source`) if it is malformed."""
        kind = data.get("kind") if isinstance(data, dict) else None
        if not isinstance(kind, str) or kind not in _KINDS:
            raise DataError(f"{source}: unknown tokenizer kind {kind!r}; expected one of {', '.join(sorted(_KINDS))}")
        if data.get("format") != FORMAT:
            raise DataError(
                f"{source}: tokenizer format {data.get('format')!r} is not supported (expected {FORMAT}); retrain it"
            )
        try:
            return _KINDS[kind]._from_payload(data)
        except DataError as e:
            raise DataError(f"{source}: {e}") from e
        except Exception as e:  # `tokenizers` raises bare Exception on malformed JSON
            raise DataError(f"{source}: malformed {kind} tokenizer ({type(e).__name__}: {e})") from e

    @staticmethod
    def load(path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by `save`; DataError naming `path` if it is missing or malformed."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"{path}: cannot read tokenizer file ({e.strerror or e}); train one or fix the path") from e
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, or JSON nested thousands deep
            raise DataError(f"{path}: not a tokenizer JSON file ({e})") from e
        return Tokenizer.from_dict(data, source=str(path))

    @classmethod
    @abstractmethod
    def _from_payload(cls, data: dict[str, Any]) -> Tokenizer:
        """Inverse of `to_dict` for this kind."""

    @classmethod
    @abstractmethod
    def _train(cls, texts: Iterable[str], vocab_size: int, min_freq: int, split_digits: bool,
               byte_fallback: bool) -> Tokenizer:
        """Learn a vocabulary from `texts`; see `train_tokenizer`."""


class _ListTokenizer(Tokenizer):
    """A tokenizer whose vocabulary is a list of strings; id = index, specials first, then (byte fallback)
    the 256 byte tokens."""

    def __init__(self, vocab: Sequence[str], byte_fallback: bool = False):
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise DataError(f"vocabulary must start with {list(SPECIAL_TOKENS)}")
        if byte_fallback:
            for b, want in enumerate(BYTE_TOKENS):
                got = vocab[BYTE_BASE + b] if BYTE_BASE + b < len(vocab) else None
                if got != want:
                    raise DataError(f"with byte_fallback, id {BYTE_BASE + b} must be the byte token {want}, "
                                    f"not {got!r}")
        self.vocab = list(vocab)
        self.byte_fallback = byte_fallback
        first_text = BYTE_BASE + (len(BYTE_TOKENS) if byte_fallback else 0)
        self.stoi = {s: i for i, s in enumerate(self.vocab) if i >= first_text}  # specials and bytes: never text
        self._itos = ["", UNK_CHAR, "", ""] + self.vocab[len(SPECIAL_TOKENS) :]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Iterable[int]) -> str:
        if not self.byte_fallback:
            return "".join(map(self._itos.__getitem__, ids))
        # Adjacent byte tokens spell characters together; "replace" because a model may sample any bytes.
        pieces: list[str] = []
        for is_byte, run in itertools.groupby(ids, _is_byte_id):
            if is_byte:
                pieces.append(bytes(i - BYTE_BASE for i in run).decode("utf-8", "replace"))
            else:
                pieces.extend(map(self._itos.__getitem__, run))
        return "".join(pieces)

    def _char_ids(self, c: str) -> list[int]:
        """Ids of one character: its own, else (byte fallback) its UTF-8 bytes, else <unk>."""
        i = self.stoi.get(c)
        if i is not None:
            return [i]
        if self.byte_fallback and not "\ud800" <= c <= "\udfff":
            return [BYTE_BASE + b for b in c.encode("utf-8")]
        return [self.unk_id]

    def token_strings(self) -> list[str]:
        return list(self.vocab)

    def _payload(self) -> dict[str, Any]:
        # Written only when on, so files saved before byte fallback keep their fingerprints.
        return {"vocab": self.vocab, **({"byte_fallback": True} if self.byte_fallback else {})}

    @staticmethod
    def _byte_fallback_of(data: dict[str, Any]) -> bool:
        byte_fallback = data.get("byte_fallback", False)
        if not isinstance(byte_fallback, bool):
            raise DataError(f"byte_fallback must be true or false, got {byte_fallback!r}")
        return byte_fallback

    @classmethod
    def _from_payload(cls, data: dict[str, Any]) -> Tokenizer:
        return cls(data["vocab"], cls._byte_fallback_of(data))


def _is_byte_id(i: int) -> bool:
    return BYTE_BASE <= i < BYTE_BASE + len(BYTE_TOKENS)


def _codepoints(text: str) -> np.ndarray:
    # surrogatepass: a lone surrogate (from surrogateescape decoding) is a codepoint, not an exception.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharTokenizer(_ListTokenizer):
    """One id per Unicode character in the vocabulary; any other character becomes its UTF-8 byte tokens
    (byte fallback) or <unk>."""

    kind = "char"

    def __init__(self, vocab: Sequence[str], byte_fallback: bool = False):
        super().__init__(vocab, byte_fallback)
        for c in self.stoi:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f"a char vocabulary holds single characters, not {c!r}")

    @functools.cached_property
    def _table(self) -> np.ndarray:
        # A codepoint -> id table (9 MB) turns encoding into one numpy gather; built on first use. Its one
        # entry past Unicode, _DOC_END, is <eos>, so encode_documents gathers all documents at once.
        table = np.full(_DOC_END + 1, self.unk_id, dtype=np.int64)
        table[[ord(c) for c in self.stoi]] = list(self.stoi.values())
        table[_DOC_END] = self.eos_id
        return table

    def _encode_codepoints(self, cps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of codepoints (_DOC_END: <eos>), the indices of the codepoints that became byte tokens and
        how many byte tokens each became (both empty when none did)."""
        ids = self._table[cps]
        none = np.zeros(0, dtype=np.int64)
        # Every codepoint maps to <unk> or above it, so one min() (no temporary array) finds the common
        # case, text whose characters are all known.
        if not self.byte_fallback or not len(ids) or ids.min() > self.unk_id:
            return ids, none, none
        unknown = np.flatnonzero(ids == self.unk_id)
        cp = cps[unknown]
        keep = (cp < 0xD800) | (cp > 0xDFFF)  # a lone surrogate has no UTF-8 encoding: it stays <unk>
        unknown, cp = unknown[keep], cp[keep]
        # The unknown characters' bytes, in order, through the codecs rather than a loop per character.
        utf8 = np.frombuffer(cp.astype("<u4").tobytes().decode("utf-32-le").encode("utf-8"), dtype=np.uint8)
        byte_ids = utf8.astype(np.int64) + BYTE_BASE
        lengths = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)  # of each character's UTF-8
        # Each character's first byte takes its place, the others go in after it: one np.insert, whose
        # cost is a copy of ids, not a pass per character.
        first = np.cumsum(lengths) - lengths
        ids[unknown] = byte_ids[first]
        others = np.ones(len(byte_ids), dtype=bool)
        others[first] = False
        return np.insert(ids, np.repeat(unknown + 1, lengths - 1), byte_ids[others]), unknown, lengths

    def encode_array(self, text: str) -> np.ndarray:
        return self._encode_codepoints(_codepoints(text))[0]

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        # One string, one gather: _DOC_END goes in after each document and is gathered as <eos>.
        ends = np.cumsum(np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)))
        return self._encode_codepoints(np.insert(_codepoints("".join(docs)), ends, _DOC_END))[0]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, unknown, lengths = self._encode_codepoints(_codepoints(text))
        counts = np.ones(len(text), dtype=np.int64)
        counts[unknown] = lengths  # a character's byte tokens share its span
        starts = np.repeat(np.arange(len(text)), counts)
        return ids.tolist(), list(zip(starts.tolist(), (starts + 1).tolist()))

    @classmethod
    def _train(cls, texts: Iterable[str], vocab_size: int, min_freq: int, split_digits: bool,
               byte_fallback: bool) -> CharTokenizer:
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(t)
        return char_tokenizer_from_counts(counts, min_freq, byte_fallback)


def char_tokenizer_from_counts(counts: Mapping[str, int], min_freq: int = 1,
                               byte_fallback: bool = True) -> CharTokenizer:
    """The char tokenizer that training on texts with these character counts gives: every character
    counted at least `min_freq` (>= 1) times, most frequent first, ties by codepoint."""
    if min_freq < 1:
        raise ConfigError(f"tokenizer.min_freq={min_freq} must be at least 1")
    prefix = [*SPECIAL_TOKENS, *(BYTE_TOKENS if byte_fallback else ())]
    return CharTokenizer(prefix + _frequent(counts, min_freq), byte_fallback)


class WordTokenizer(_ListTokenizer):
    """Words (jieba's, or a hanlm tagger's); a word outside the vocabulary falls back to its characters,
    then to their UTF-8 bytes (byte fallback) or <unk>."""

    kind = "word"

    def __init__(self, vocab: Sequence[str], segmenter: str = JIEBA, byte_fallback: bool = False):
        super().__init__(vocab, byte_fallback)
        self.segmenter = segmenter

    def encode(self, text: str) -> list[int]:
        return self.encode_spans(text)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(words)[0] for words in segment_words(list(texts), self.segmenter)]

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        return self._packed_batch(docs)  # one batch through the segmenter: a tagger decodes many at once

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return self._ids(segment_words([text], self.segmenter)[0])

    def _ids(self, words: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        ids, spans, at = [], [], 0
        for w in words:
            i = self.stoi.get(w)
            if i is None:
                for k, c in enumerate(w):
                    char_ids = self._char_ids(c)
                    ids.extend(char_ids)
                    spans.extend([(at + k, at + k + 1)] * len(char_ids))  # a character's bytes share its span
            else:
                ids.append(i)
                spans.append((at, at + len(w)))
            at += len(w)
        return ids, spans

    def _payload(self) -> dict[str, Any]:
        # jieba is left unnamed, so tokenizers saved before segmenters existed keep their fingerprints.
        return {**super()._payload(), **({"segmenter": self.segmenter} if self.segmenter != JIEBA else {})}

    @classmethod
    def _from_payload(cls, data: dict[str, Any]) -> Tokenizer:
        segmenter = data.get("segmenter", JIEBA)
        if not isinstance(segmenter, str):
            raise DataError(f"segmenter must be a string (jieba or a tagger checkpoint), got {segmenter!r}")
        return cls(data["vocab"], segmenter, cls._byte_fallback_of(data))

    @classmethod
    def _train(cls, texts: Iterable[str], vocab_size: int, min_freq: int, split_digits: bool,
               byte_fallback: bool, segmenter: str = JIEBA) -> WordTokenizer:
        chars: Counter[str] = Counter()
        words: Counter[str] = Counter()
        batch: list[str] = []

        def count(batch: list[str]) -> None:
            for t, ws in zip(batch, segment_words(batch, segmenter)):
                chars.update(t)
                words.update(w for w in ws if len(w) > 1 and w not in _RESERVED)

        for t in texts:
            batch.append(t)
            if len(batch) == 1024:
                count(batch)
                batch = []
        count(batch)
        vocab = [*SPECIAL_TOKENS, *(BYTE_TOKENS if byte_fallback else ()), *_frequent(chars, min_freq)]
        # Every character stays even past vocab_size, so any known text remains encodable.
        return cls(vocab + _frequent(words, min_freq)[: max(0, vocab_size - len(vocab))], segmenter, byte_fallback)


class _HFBacked(Tokenizer):
    """What the kinds run by a Hugging Face `tokenizers` model share: encoding through it (specials' spellings
    stay text) and decoding around the special ids."""

    hf: HFTokenizer

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = self.hf.encode(text, add_special_tokens=False)
        return e.ids, list(e.offsets)

    def encode_documents(self, docs: Sequence[str]) -> np.ndarray:
        return self._packed_batch(docs)  # encode_batch runs in parallel in Rust; per-document calls would not

    def decode(self, ids: Iterable[int]) -> str:
        # Decode the runs between <unk>s separately so each <unk> shows as exactly one U+FFFD.
        runs: list[list[int]] = [[]]
        known = self.hf.get_vocab_size()  # a padded embedding's extra ids spell nothing
        for i in ids:
            if i == self.unk_id:
                runs.append([])
            elif i not in (self.pad_id, self.bos_id, self.eos_id) and i < known:
                runs[-1].append(i)
        return UNK_CHAR.join(self.hf.decode(r, skip_special_tokens=False) for r in runs)


class BpeTokenizer(_HFBacked):
    """Byte-level BPE (Hugging Face `tokenizers`): every text round-trips exactly, no <unk>."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        # Not serialised by `tokenizers`, so set on every construction: literal "<eos>" stays text.
        self.hf.encode_special_tokens = True
        for i, s in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(s) != i:
                raise DataError(f"special token {s} must have id {i}, has {hf.token_to_id(s)}")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_strings(self) -> list[str]:
        return [self.hf.id_to_token(i) for i in range(self.vocab_size)]

    def _payload(self) -> dict[str, Any]:
        return {"hf": json.loads(self.hf.to_str())}

    def with_dropout(self, p: float) -> BpeTokenizer:
        """A copy of this tokenizer whose encodings skip each BPE merge with probability p (BPE-dropout,
        Provilkov et al. 2020): the same text gets a different segmentation on each call, into the same
        vocabulary, and decodes back exactly (the byte alphabet is always there to fall back on). p = 0 gives
        the plain encoding. Hugging Face draws the skips from its own unseeded RNG, so the segmentations are
        not reproducible: store what they encode (as `hanlm prepare` does) rather than re-encode.
        ConfigError, naming tokenizer.bpe_dropout, unless 0 <= p < 1 (p = 1 would never merge)."""
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"tokenizer.bpe_dropout={p!r} must be at least 0 and below 1 (the share of merges "
                              "skipped; 0: none)")
        data = json.loads(self.hf.to_str())
        data["model"]["dropout"] = float(p) if p else None
        # ignore_merges would take a word that is in the vocabulary whole, never dropping a merge inside it.
        data["model"]["ignore_merges"] = False
        # A new Hugging Face tokenizer has a cache of its own: no word segmented without dropout is reused, and
        # its BPE model skips the cache whenever dropout is set.
        return BpeTokenizer(HFTokenizer.from_str(json.dumps(data)))

    @classmethod
    def _from_payload(cls, data: dict[str, Any]) -> BpeTokenizer:
        return cls(HFTokenizer.from_str(json.dumps(data["hf"])))

    @classmethod
    def _train(cls, texts: Iterable[str], vocab_size: int, min_freq: int, split_digits: bool,
               byte_fallback: bool) -> BpeTokenizer:  # byte_fallback: byte-level BPE needs none
        if vocab_size < _MIN_BPE_VOCAB:
            raise ConfigError(f"tokenizer.vocab_size={vocab_size} is too small for bpe; use at least {_MIN_BPE_VOCAB}")
        hf = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # Single digits keep numbers compositional instead of memorising "1998" as one token.
        digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
        hf.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_freq,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)


class PretrainedTokenizer(_HFBacked):
    """A published model's own tokenizer (its `tokenizer.json`, any model `tokenizers` runs: byte-level BPE as
    Qwen and Llama 3 have, WordPiece, Unigram), with its special tokens where that model put them. It is imported,
    never trained. `vocab_size` is the model's (embedding rows, often padded past the tokenizer's last id); ids
    the tokenizer never produces are spelled `<unused:N>`. As in every kind, text that spells a special token is
    encoded as text."""

    kind = "pretrained"

    def __init__(self, hf: HFTokenizer, specials: Mapping[str, int], vocab_size: int):
        self.hf = hf
        self.hf.encode_special_tokens = True
        self._vocab_size = int(vocab_size)
        if self._vocab_size < hf.get_vocab_size():
            raise DataError(f"the model's vocab_size {vocab_size} is below the tokenizer's {hf.get_vocab_size()} ids")
        for name in ("pad", "unk", "bos", "eos", "mask"):
            value = specials.get(name, -1 if name == "mask" else None)
            if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < self._vocab_size:
                raise DataError(f"special token {name}: id {value!r} is not an id of the vocabulary (-1: none)")
            setattr(self, f"{name}_id", value)
        if self.eos_id < 0:
            raise DataError("the tokenizer has no end-of-text token (eos), which hanlm puts between documents")

    @property
    def start_id(self) -> int:
        """The model's own start token where it has one (BERT's [CLS], Llama's <s>), else <eos>."""
        return self.bos_id if self.bos_id >= 0 else self.eos_id

    def special_ids(self) -> set[int]:
        """Every id that stands for no text: the named specials and the tokenizer's own special tokens."""
        named = {getattr(self, f"{n}_id") for n in ("pad", "unk", "bos", "eos", "mask")} - {-1}
        return named | {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_strings(self) -> list[str]:
        return [self.hf.id_to_token(i) or f"<unused:{i}>" for i in range(self.vocab_size)]

    def _payload(self) -> dict[str, Any]:
        specials = {n: getattr(self, f"{n}_id") for n in ("pad", "unk", "bos", "eos")}
        if self.mask_id >= 0:  # only where there is one: older payloads, and their fingerprints, stay as they were
            specials["mask"] = self.mask_id
        return {"hf": json.loads(self.hf.to_str()), "vocab_size": self._vocab_size, "specials": specials}

    @classmethod
    def _from_payload(cls, data: dict[str, Any]) -> PretrainedTokenizer:
        if not isinstance(data.get("specials"), dict) or not isinstance(data.get("vocab_size"), int):
            raise DataError("a pretrained tokenizer needs its specials and vocab_size")
        return cls(HFTokenizer.from_str(json.dumps(data["hf"])), data["specials"], data["vocab_size"])

    @classmethod
    def _train(cls, texts: Iterable[str], vocab_size: int, min_freq: int, split_digits: bool,
               byte_fallback: bool) -> Tokenizer:
        raise ConfigError("a pretrained tokenizer comes with its model (a Hugging Face directory); it is not trained: "
                          "use tokenizer.kind char, bpe or word")


_KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BpeTokenizer, "word": WordTokenizer,
                                      "pretrained": PretrainedTokenizer}


def train_tokenizer(
    kind: str, texts: Iterable[str], *, vocab_size: int = 8000, min_freq: int = 1, split_digits: bool = True,
    segmenter: str = "jieba", byte_fallback: bool = True,
) -> Tokenizer:
    """Train a tokenizer of `kind` ("char", "bpe" or "word") on `texts`, read once.

    vocab_size counts the specials (and byte tokens). It is the exact size for bpe, a cap on words
    for word (all characters with count >= min_freq are kept even beyond it), and ignored for char,
    whose vocabulary is every character with count >= min_freq. split_digits applies to bpe,
    segmenter (jieba, or a tagger checkpoint) to word, byte_fallback to char and word (bpe is
    byte-level already): other characters become their UTF-8 bytes, not <unk>.
    """
    trained = sorted(k for k in _KINDS if k != PretrainedTokenizer.kind)
    if kind == PretrainedTokenizer.kind:
        raise ConfigError("tokenizer.kind=pretrained is an imported model's own tokenizer, never trained: import the "
                          "model (train.init_from) and give its tokenizer as tokenizer.path, or train one of "
                          f"{', '.join(trained)}")
    if kind not in _KINDS:
        raise ConfigError(f"tokenizer.kind={kind!r} is unknown; valid kinds: {', '.join(trained)}")
    if min_freq < 1:
        raise ConfigError(f"tokenizer.min_freq={min_freq} must be at least 1")
    n_chars = 0

    def counted() -> Iterator[str]:
        nonlocal n_chars
        for t in texts:
            n_chars += len(t)
            yield t

    if segmenter != JIEBA and kind != "word":
        raise ConfigError(f"tokenizer.segmenter {segmenter!r} applies to tokenizer.kind word, not {kind}")
    if kind == "word":
        tok = WordTokenizer._train(counted(), vocab_size, min_freq, split_digits, byte_fallback, segmenter)
    else:
        tok = _KINDS[kind]._train(counted(), vocab_size, min_freq, split_digits, byte_fallback)
    if n_chars == 0:
        raise DataError("tokenizer training texts are empty; check the corpus and its filters")
    if isinstance(tok, _ListTokenizer) and not tok.stoi:
        raise DataError(f"no character occurs at least tokenizer.min_freq={min_freq} times; lower min_freq")
    return tok


def _frequent(counts: Mapping[str, int], min_freq: int) -> list[str]:
    """Keys with count >= min_freq, most frequent first, ties by codepoint so training is deterministic."""
    return [s for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_freq]
