"""Segmented and tagged text: read and write the common formats, through the one reader.

A `TaggedSentence` is a line's words and, where the source has them, one tag per word. Formats
(`finetune.tag_format`):

- `words`: words separated by spaces (SIGHAN bakeoff gold files); no tags.
- `slash`: `word/TAG` tokens (the PKU People's Daily format). A compound's brackets
  (`[中央/n 电视台/n]nt`) are dropped and its inner words kept, the PKU standard's segmentation.
- `conll`: one token per line, sentences separated by blank lines, `#` lines are comments. The
  columns are FORM and TAG, or CoNLL-U's ID FORM LEMMA UPOS … (then UPOS is the tag). A sentence
  whose forms are single characters tagged B/M/E/S (optionally `B-TAG`) is read as words.
- `auto`: built-in corpora are `slash`; `.conll`, `.conllu`, `.tsv` files are `conll`; any other
  file is `slash` when every token of its first line carries a tag, else `words`.

Files are read with the data.* normalisation (the reader collapses whitespace, so CoNLL columns
may be separated by tabs or spaces). A malformed token is a DataError naming file and line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

from hanlm.config import DataConfig
from hanlm.data.reader import DocumentReader
from hanlm.data.sources import SourceFile
from hanlm.errors import DataError

FORMATS = ("auto", "words", "slash", "conll")
CONLL_SUFFIXES = (".conll", ".conllu", ".tsv")
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_CHAR_TAG = re.compile(r"^([BMES])(?:-(.+))?$")


@dataclass
class TaggedSentence:
    """One line's (or CoNLL sentence's) words, their tags (None when the source has none), and where it is."""

    words: list[str]
    tags: list[str] | None
    where: str = ""

    @property
    def text(self) -> str:
        return "".join(self.words)


def parse_words(line: str) -> TaggedSentence:
    return TaggedSentence(line.split(), None)


def _slash_token(token: str, where: str) -> tuple[str, str]:
    word, slash, tag = token.rpartition("/")
    if "]" in tag:  # a compound's closing token: `电台/n]nt`
        tag = tag.split("]", 1)[0]
    if len(word) > 1 and word.startswith("["):  # a compound's opening token; `[/w` is the bracket itself
        word = word[1:]
    if not slash or not _TAG.match(tag):
        raise DataError(f"{where}: token {token!r} has no /TAG (format slash wants word/TAG tokens; set "
                        "finetune.tag_format words for untagged text)")
    if not word:
        raise DataError(f"{where}: token {token!r} has an empty word")
    return word, tag


def parse_slash(line: str, where: str = "") -> TaggedSentence:
    words, tags = [], []
    for token in line.split():
        word, tag = _slash_token(token, where)
        words.append(word)
        tags.append(tag)
    return TaggedSentence(words, tags, where)


def _looks_tagged(line: str) -> bool:
    try:
        parse_slash(line)
    except DataError:
        return False
    return True


def _conll_sentence(rows: list[tuple[int, list[str]]], url: str) -> TaggedSentence:
    """Words and tags of one CoNLL sentence: (line number, columns) for each of its tokens."""
    forms, tags = [], []
    for number, cols in rows:
        conllu = len(cols) >= 4 and cols[0].isdigit()
        form, tag = (cols[1], cols[3]) if conllu else (cols[0], cols[1] if len(cols) > 1 else None)
        if conllu and "-" in cols[0]:
            continue  # a CoNLL-U multi-word token's range line; its parts follow
        forms.append(form)
        tags.append(tag)
    where = f"{url}:{rows[0][0]}"
    if any(t is None for t in tags):
        missing = next(n for (n, _), t in zip(rows, tags) if t is None)
        if any(t is not None for t in tags):
            raise DataError(f"{url}:{missing}: token {forms[tags.index(None)]!r} has no tag column while others "
                            "in its sentence do")
        return TaggedSentence(forms, None, where)
    char_tagged = [bool(_CHAR_TAG.match(t)) for t in tags]
    if all(len(f) == 1 for f in forms) and all(char_tagged):
        return _char_sentence(forms, tags, rows, url)
    if all(len(f) == 1 for f in forms) and any(char_tagged):
        # One character per line, mostly B/M/E/S: a tag outside them is a mistake, not a word's POS tag.
        (number, _), tag = next((row, t) for row, t, ok in zip(rows, tags, char_tagged) if not ok)
        raise DataError(f"{url}:{number}: tag {tag!r} is not B, M, E or S (optionally with -TAG) while its sentence "
                        "is tagged a character per line with them")
    return TaggedSentence(forms, tags, where)


def _char_sentence(chars: list[str], tags: list[str], rows: list[tuple[int, list[str]]], url: str) -> TaggedSentence:
    """Words of a character-per-line sentence tagged B/M/E/S (with an optional -TAG)."""
    words: list[str] = []
    word_tags: list[str | None] = []
    open_word = False
    for ch, tag, (number, _) in zip(chars, tags, rows):
        position, pos = _CHAR_TAG.match(tag).groups()
        if position in "BS":
            if open_word:
                raise DataError(f"{url}:{number}: {tag} follows a word that was not closed with E")
            words.append(ch)
            word_tags.append(pos)
            open_word = position == "B"
        else:
            if not open_word:
                raise DataError(f"{url}:{number}: {tag} continues a word that no B began")
            words[-1] += ch
            open_word = position == "M"
    if open_word:
        raise DataError(f"{url}:{rows[-1][0]}: the sentence ends inside a word (its last tag is not E or S)")
    has_pos = [t is not None for t in word_tags]
    return TaggedSentence(words, list(word_tags) if all(has_pos) else None, f"{url}:{rows[0][0]}")


def _format_of(src: SourceFile, fmt: str, first_line: str) -> str:
    if fmt != "auto":
        return fmt
    if src.builtin:
        return "slash"
    if PurePosixPath(src.url.split("?")[0]).suffix.lower() in CONLL_SUFFIXES:
        return "conll"
    return "slash" if _looks_tagged(first_line) else "words"


def text_lines(sources: list[str], cfg: DataConfig) -> Iterator[tuple[SourceFile, int, str]]:
    """(source, line number, normalised line) of every line of `sources`, read as text whatever their
    suffix (`.conll`, `.tsv`, …): how tagged files and raw text to segment are read."""
    return DocumentReader(sources, dataclasses.replace(cfg, format="txt")).lines()


def read_tagged(sources: list[str], cfg: DataConfig, fmt: str = "auto") -> Iterator[TaggedSentence]:
    """Every sentence of `sources`, in order; blank lines (outside CoNLL) are skipped."""
    if fmt not in FORMATS:
        raise DataError(f"finetune.tag_format {fmt!r} is unknown; formats: {', '.join(FORMATS)}")
    current: SourceFile | None = None
    file_format = ""
    rows: list[tuple[int, list[str]]] = []
    for src, number, line in text_lines(sources, cfg):
        if src is not current:
            if rows:
                yield _conll_sentence(rows, current.url)
                rows = []
            current, file_format = src, ""
        if not file_format:
            if not line.strip():
                continue
            file_format = _format_of(src, fmt, line)
        if file_format == "conll":
            if line.startswith("#"):
                continue
            if line.strip():
                rows.append((number, line.split()))
            elif rows:
                yield _conll_sentence(rows, src.url)
                rows = []
        elif line.strip():
            where = f"{src.url}:{number}"
            sentence = parse_slash(line, where) if file_format == "slash" else parse_words(line)
            sentence.where = where
            yield sentence
    if rows:
        yield _conll_sentence(rows, current.url)


def format_sentence(sentence: TaggedSentence, fmt: str) -> str:
    """The sentence in `fmt` (words, slash or conll), without a trailing newline; slash and conll
    need tags."""
    if fmt == "words":
        return "  ".join(sentence.words)
    if sentence.tags is None:
        raise DataError(f"format {fmt} writes tags, and this sentence has none; use words")
    if fmt == "slash":
        return "  ".join(f"{w}/{t}" for w, t in zip(sentence.words, sentence.tags))
    if fmt == "conll":
        return "\n".join(f"{w}\t{t}" for w, t in zip(sentence.words, sentence.tags)) + "\n"
    raise DataError(f"unknown output format {fmt!r}; formats: words, slash, conll")
