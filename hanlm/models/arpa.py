"""ARPA files, the standard text format of backoff n-gram models (SRILM, KenLM, …).

    \\data\\
    ngram 1=4690
    ngram 2=281235

    \\1-grams:
    -2.345678<TAB>的<TAB>-0.456789
    …
    \\end\\

Each line holds log10 p(last word | the others), the n-gram, and below the top order its log10
backoff weight. Words are separated by spaces, so a token that contains whitespace is written with
each whitespace character as `<U+XXXX>` (a space is `<U+0020>`); `<s>`, `</s>` and `<unk>` are the
tokenizer's `<bos>`, `<eos>` and `<unk>`. Writing is vectorised; reading parses a section at a
time and names the line of anything malformed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import fsspec
import numpy as np
from numpy.dtypes import StringDType

from hanlm.atomic import atomic_write_text
from hanlm.data.tokenizer import BYTE_TOKENS, SPECIAL_TOKENS, CharTokenizer, Tokenizer, WordTokenizer
from hanlm.errors import DataError
from hanlm.models.ngram import BOS, EOS, PAD, UNK, NGramLM

SPECIAL_WORDS = {PAD: "<pad>", UNK: "<unk>", BOS: "<s>", EOS: "</s>"}
_RESERVED = frozenset(SPECIAL_WORDS.values())
_WHITESPACE = re.compile(r"\s")
_FIELDS = re.compile(r"[ \t]+")  # ARPA separators; other whitespace (U+3000) may be part of a word
_ESCAPED = re.compile(r"<U\+([0-9A-F]{4,6})>")
DECIMALS = 6  # log10 values to 1e-6: far below what changes a score, and write → read → write is exact


def arpa_words(tokens: Sequence[str]) -> list[str]:
    """The ARPA spelling of every token id (see the module doc); DataError if two collide."""
    words = []
    for i, t in enumerate(tokens):
        if i in SPECIAL_WORDS:
            words.append(SPECIAL_WORDS[i])
            continue
        w = _WHITESPACE.sub(lambda m: f"<U+{ord(m.group()):04X}>", t)
        if w in _RESERVED or not w:  # a literal "<s>" in the text is not the sentence start
            w = "<U+003C>" + w[1:] if w else "<U+0000>"
        words.append(w)
    if len(set(words)) != len(words):
        seen: dict[str, int] = {}
        for i, w in enumerate(words):
            if w in seen:
                raise DataError(f"tokens {seen[w]} and {i} are both written {w!r} in ARPA; the vocabulary cannot be "
                                "saved as an ARPA file")
            seen[w] = i
    return words


def unescape(word: str) -> str:
    """The token text of an ARPA word written by `arpa_words`."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), word)


# ---------------------------------------------------------------------------------------------
# Writing


def write_arpa(model: NGramLM, words: Sequence[str], path: str | os.PathLike) -> None:
    """Write `model` to `path` atomically; `words` is `arpa_words(tokenizer.token_strings())`."""
    if len(words) != model.vocab_size:
        raise ValueError(f"{len(words)} words for a model over {model.vocab_size} ids")
    atomic_write_text(path, arpa_text(model, words))


def arpa_text(model: NGramLM, words: Sequence[str]) -> str:
    """The whole ARPA file as one string."""
    table = np.array(words, dtype=StringDType())
    counts = model.counts()
    parts = ["\\data\\\n", *(f"ngram {k}={n}\n" for k, n in enumerate(counts, 1))]
    grams = table  # the text of every n-gram of the previous order, by index
    for k in range(1, model.order + 1):
        if k == 1:
            ids = np.flatnonzero(model.known)
            listed, logp = table[ids], model.uni_logp[ids]
            bow = model.uni_bow[ids] if model.order > 1 else None
        else:  # an n-gram's text is its prefix's text, a space and its last word
            keys = model.keys[k]
            grams = np.strings.add(np.strings.add(grams[keys // model.vocab_size], " "),
                                   table[keys % model.vocab_size])
            listed, logp, bow = grams, model.logp[k], model.bow.get(k)
        lines = np.strings.add(np.strings.add(_format(logp), "\t"), listed)
        if bow is not None:
            lines = np.strings.add(np.strings.add(lines, "\t"), _format(bow))
        parts += [f"\n\\{k}-grams:\n", "\n".join(lines.tolist()), "\n"]
    parts.append("\n\\end\\\n")
    return "".join(parts)


def _format(values: np.ndarray) -> np.ndarray:
    """Shortest decimal text of each value rounded to DECIMALS; log10(0) is written -99, as is usual."""
    v = np.round(np.where(np.isfinite(values), values, -99.0), DECIMALS)
    return v.astype(StringDType())


# ---------------------------------------------------------------------------------------------
# Reading


class _Lines:
    """The file's text with a cursor, so that errors can name the line."""

    def __init__(self, text: str, source: str):
        self.text, self.source, self.pos, self.line = text, source, 0, 1

    def error(self, message: str, line: int | None = None) -> DataError:
        return DataError(f"{self.source}:{line or self.line}: {message}")

    def next(self) -> str | None:
        """The next line without its newline, or None at the end of the file."""
        if self.pos >= len(self.text):
            return None
        end = self.text.find("\n", self.pos)
        end = len(self.text) if end < 0 else end
        line = self.text[self.pos:end].rstrip("\r")
        self.pos, self.line = end + 1, self.line + 1
        return line

    def next_content(self) -> str | None:
        """The next non-blank line (stripped), or None at the end of the file."""
        while (line := self.next()) is not None:
            if line.strip():
                return line.strip()
        return None


def read_arpa(path: str | os.PathLike, vocab: Sequence[str] | None = None) -> tuple[NGramLM, list[str]]:
    """Read an ARPA file (plain or compressed, local or an fsspec URL).

    `vocab`: the ARPA spelling of every token id (a checkpoint's tokenizer through `arpa_words`);
    every word of the file must be in it. Without it the file's unigrams define the ids: the
    specials first, then the other words in file order. Returns the model and the words of its ids.
    """
    source = str(path)
    try:
        with fsspec.open(source, "rt", encoding="utf-8", compression="infer") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{source}: no such ARPA file") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{source}: cannot read the ARPA file ({type(e).__name__}: {e})") from None
    return parse_arpa(text, source, vocab)


def parse_arpa(text: str, source: str, vocab: Sequence[str] | None = None) -> tuple[NGramLM, list[str]]:
    """`read_arpa` on text already in memory; `source` names it in errors."""
    lines = _Lines(text, source)
    while (line := lines.next_content()) != "\\data\\":
        if line is None:
            raise lines.error("no \\data\\ header: not an ARPA file")
    declared: list[int] = []
    header_lines: list[int] = []
    while (line := lines.next_content()) is not None and line.startswith("ngram "):
        m = re.fullmatch(r"ngram\s+(\d+)\s*=\s*(\d+)", line)
        if not m or int(m.group(1)) != len(declared) + 1:
            raise lines.error(f"expected `ngram {len(declared) + 1}=COUNT`, found {line!r}", lines.line - 1)
        declared.append(int(m.group(2)))
        header_lines.append(lines.line - 1)
    if not declared:
        raise lines.error("the \\data\\ header declares no n-gram counts")
    order = len(declared)
    words = list(vocab) if vocab is not None else list(SPECIAL_WORDS.values())
    word_id = {w: i for i, w in enumerate(words) if i != PAD}
    sections: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    first_lines: dict[int, int] = {}
    for k in range(1, order + 1):
        if line != f"\\{k}-grams:":
            raise lines.error(f"expected the \\{k}-grams: section, found {line!r}"
                              if line is not None else f"the file ends before the \\{k}-grams: section (truncated?)",
                              lines.line - 1)
        first_lines[k] = lines.line
        body_end = text.find("\n\\", lines.pos)
        body_end = len(text) if body_end < 0 else body_end
        body = text[lines.pos:body_end]
        sections[k] = _parse_section(body, k, order, (declared[k - 1], header_lines[k - 1]), lines, word_id,
                                     words, grow=vocab is None and k == 1)
        lines.line += body.count("\n") + (1 if body_end < len(text) else 0)
        lines.pos = body_end + 1
        line = lines.next_content()
    if line != "\\end\\":
        raise lines.error("expected \\end\\ after the last section" if line is not None
                          else "the file ends without \\end\\ (truncated?)", lines.line - 1)
    return _build(order, words, sections, first_lines, source), words


def _parse_section(body: str, k: int, order: int, header: tuple[int, int], lines: _Lines, word_id: dict[str, int],
                   words: list[str], grow: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(token ids (n, k), log10 probabilities, log10 backoffs or None) of one section;
    `header`: the count the header declares for it, and that header line."""
    declared, header_line = header
    rows = body.rstrip("\n").split("\n") if body.strip() else []
    while rows and not rows[-1].strip():
        rows.pop()
    if len(rows) != declared:
        raise lines.error(f"the \\{k}-grams: section has {len(rows):,} entries but the header declares "
                          f"ngram {k}={declared} (line {header_line})" + (" (truncated file?)" if len(rows) < declared else ""),
                          lines.line + len(rows))
    # Fast path: every line has k + 1 fields, or every line k + 2 (the file is well formed).
    flat = body.replace("\t", " ").replace("\r", "").replace("\n", " ").strip(" ").split(" ")
    if declared and len(flat) in (declared * (k + 1), declared * (k + 2)):
        width = len(flat) // declared
        try:
            logp = np.array(flat[0::width], dtype=np.float64)
            bow = np.array(flat[k + 1::width], dtype=np.float64) if width == k + 2 else None
            if grow:
                for w in flat[1::width]:
                    word_id.setdefault(w, len(words))
                    if word_id[w] == len(words):
                        words.append(w)
            ids = np.stack([np.fromiter(map(word_id.__getitem__, flat[1 + j::width]), np.int64, declared)
                            for j in range(k)], axis=1)
            if not (logp <= 0).all() or not np.isfinite(logp).all() or (bow is not None and not np.isfinite(bow).all()):
                raise ValueError
            if bow is not None and k == order:
                raise ValueError
            return ids, logp, bow
        except (ValueError, KeyError):
            pass  # find and name the bad line below
    ids = np.empty((declared, k), dtype=np.int64)
    logp = np.empty(declared)
    bow = np.zeros(declared) if k < order else None
    for r, row in enumerate(rows):
        at = lines.line + r
        fields = _FIELDS.split(row.strip(" \t\r"))
        if len(fields) not in (k + 1, k + 2) or (k == order and len(fields) == k + 2):
            raise lines.error(f"a {k}-gram line needs a log10 probability, {k} word(s)"
                              f"{' and an optional backoff' if k < order else ''}; found {row!r}", at)
        try:
            logp[r] = float(fields[0])
            if len(fields) == k + 2:
                bow[r] = float(fields[-1])
        except ValueError:
            raise lines.error(f"not a number in {row!r}", at) from None
        if not (math.isfinite(logp[r]) and (len(fields) == k + 1 or math.isfinite(bow[r]))):
            raise lines.error(f"{row!r} holds a value that is not a finite number (nan or inf): ARPA log10 "
                              "probabilities and backoffs are finite (-99 stands for 'never')", at)
        if logp[r] > 0:
            raise lines.error(f"log10 probability {fields[0]} is above 0", at)
        for j, w in enumerate(fields[1:k + 1]):
            if w not in word_id:
                if not grow:
                    raise lines.error(f"word {w!r} is not in the model's vocabulary", at)
                word_id[w] = len(words)
                words.append(w)
            ids[r, j] = word_id[w]
    return ids, logp, bow


def _build(order: int, words: list[str], sections: dict, first_lines: dict[int, int], source: str) -> NGramLM:
    V = len(words)
    uni_logp, uni_bow = np.full(V, -np.inf), np.zeros(V)
    ids, logp, bow = sections[1]
    uni_logp[ids[:, 0]] = logp
    if bow is not None:
        uni_bow[ids[:, 0]] = bow
    uni_logp[BOS] = -np.inf  # "<s> -99": never predicted
    keys, logps, bows = {}, {}, {}
    for k in range(2, order + 1):
        ids, logp, bow = sections[k]
        parent = ids[:, 0].copy()
        for j in range(1, k - 1):
            q = parent * V + ids[:, j]
            pos = np.searchsorted(keys[j + 1], q)
            ok = (pos < len(keys[j + 1])) & (keys[j + 1][np.minimum(pos, len(keys[j + 1]) - 1)] == q)
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                prefix = " ".join(words[i] for i in ids[bad, :j + 1])
                raise DataError(f"{source}:{first_lines[k] + bad}: the {k}-gram's prefix {prefix!r} is not among the "
                                f"{j + 1}-grams; not a valid backoff model")
            parent = pos
        key = parent * V + ids[:, k - 1]
        sort = np.argsort(key, kind="stable")
        key = key[sort]
        dup = np.flatnonzero(key[1:] == key[:-1])
        if len(dup):
            raise DataError(f"{source}:{first_lines[k] + int(sort[dup[0] + 1])}: this {k}-gram is listed twice")
        keys[k], logps[k] = key, logp[sort]
        if k < order:
            bows[k] = bow[sort] if bow is not None else np.zeros(len(key))
    return NGramLM(order, V, uni_logp, uni_bow, keys, logps, bows)


def tokenizer_for(words: Sequence[str]) -> Tokenizer:
    """A tokenizer over an ARPA file's own vocabulary: characters when every word is one
    character (a char model), else words (jieba segmentation, falling back to characters)."""
    tokens = [unescape(w) for w in words[len(SPECIAL_TOKENS):]]
    byte_fallback = tuple(tokens[:len(BYTE_TOKENS)]) == BYTE_TOKENS  # written by a byte-fallback tokenizer
    vocab = [*SPECIAL_TOKENS, *tokens]
    text = tokens[len(BYTE_TOKENS):] if byte_fallback else tokens
    if all(len(t) == 1 for t in text):
        return CharTokenizer(vocab, byte_fallback)
    return WordTokenizer(vocab, byte_fallback=byte_fallback)
