"""Named-entity data: the built-in `people-daily-1998-ner` and users' files, read as `NerSentence`s.

Formats (`finetune.ner_format`):
- `jsonl`: one record per line, `{"text": "...", "entities": [{"start": 0, "end": 3, "type": "PER"}, ...]}`
  (character offsets, end excluded). The built-in corpus is stored so.
- `conll`: one character per line, `CHAR<TAB>TAG` (BIO or BIOES tags: B-PER, I-PER, O, E-, S-), a blank
  line between sentences, `#` lines are comments.
- `auto`: .jsonl and built-in corpora are jsonl; .conll, .tsv, .bio, .bioes and .txt files are conll.

Texts are read exactly as they are — no data.* normalisation, which would move the offsets. Every
mistake is a DataError naming the file and line: a record without text, a span out of range or overlapping
another, a tag outside the schemes, a CoNLL token that is not one character.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
from collections.abc import Iterator

from hanlm.config import DataConfig
from hanlm.data.entities import Entity, NerSentence, check_entities, tags_to_spans
from hanlm.data.sources import SourceFile, expand_sources, open_binary
from hanlm.errors import DataError

FORMATS = ("auto", "conll", "jsonl")
CONLL_SUFFIXES = (".conll", ".tsv", ".bio", ".bioes", ".txt")
_PREFIXES = ("B", "I", "E", "S")


def read_ner(sources: list[str], data: DataConfig, fmt: str = "auto") -> Iterator[NerSentence]:
    """Every sentence of `sources` (files, directories, globs, URLs or built-in corpus names) with its
    entities, in order."""
    if fmt not in FORMATS:
        raise DataError(f"finetune.ner_format {fmt!r}: use one of {', '.join(FORMATS)}")
    # The format is chosen here (by name, or finetune.ner_format), not by data.format's suffixes.
    for src in expand_sources(sources, dataclasses.replace(data, format="txt")):
        kind = _format_of(src, fmt)
        with open_binary(src) as raw:
            lines = _lines(src, raw)
            yield from (_jsonl(src.url, lines) if kind == "jsonl" else _conll(src.url, lines))


def _format_of(src: SourceFile, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = src.url.lower().rsplit("/", 1)[-1]
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    if src.builtin or name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(CONLL_SUFFIXES):
        return "conll"
    raise DataError(f"{src.url}: cannot tell its entity format from the name; set finetune.ner_format to jsonl or "
                    "conll")


def _lines(src: SourceFile, raw) -> Iterator[tuple[int, str]]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    number, pending = 0, ""
    while chunk := raw.read(1 << 16):
        try:
            pending += decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise DataError(f"{src.url}:{number + pending.count(chr(10)) + 1}: invalid UTF-8 ({e.reason})") from None
        *complete, pending = pending.split("\n")
        for line in complete:
            number += 1
            yield number, line.rstrip("\r")
    if pending:
        yield number + 1, pending.rstrip("\r")


def _jsonl(url: str, lines: Iterator[tuple[int, str]]) -> Iterator[NerSentence]:
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{url}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{where}: not a JSON record ({e})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: a record needs a non-empty string \"text\"")
        spans = record.get("entities", [])
        if not isinstance(spans, list):
            raise DataError(f"{where}: \"entities\" must be a list of {{start, end, type}}")
        entities = []
        for i, span in enumerate(spans):
            if not (isinstance(span, dict) and isinstance(span.get("start"), int) and isinstance(span.get("end"), int)
                    and isinstance(span.get("type"), str)) or isinstance(span.get("start"), bool):
                raise DataError(f"{where}: entities[{i}] must be {{\"start\": int, \"end\": int, \"type\": str}}, "
                                f"got {span!r:.80}")
            entities.append(Entity(span["start"], span["end"], span["type"]))
        yield NerSentence(text, check_entities(text, entities, where), where)


def _conll(url: str, lines: Iterator[tuple[int, str]]) -> Iterator[NerSentence]:
    chars: list[str] = []
    tags: list[str] = []
    first = 0
    for number, line in itertools.chain(lines, [(-1, "")]):
        if line.startswith("#"):
            continue
        if not line.strip():
            if chars:
                where = f"{url}:{first}"
                text = "".join(chars)
                yield NerSentence(text, check_entities(text, tags_to_spans(tags), where), where)
            chars, tags = [], []
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) != 2 or len(cols[0]) != 1:
            raise DataError(f"{url}:{number}: expected one character and its tag separated by a tab, got {line!r:.60}")
        tag = cols[1]
        prefix, dash, kind = tag.partition("-")
        if tag != "O" and not (prefix in _PREFIXES and dash and kind):
            raise DataError(f"{url}:{number}: tag {tag!r} is not O or B-/I-/E-/S- with a type (BIO or BIOES)")
        if not chars:
            first = number
        chars.append(cols[0])
        tags.append(tag)
