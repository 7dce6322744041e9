"""Named entities as character spans, their character tags (BIO, BIOES), and the People's Daily 1998
conversion that makes the built-in `people-daily-1998-ner` corpus.

Conversion rules (the PKU tag set's nr / ns / nt, as in the MSRA and People's Daily NER corpora):
- a word tagged `nr` is a person (PER); adjacent `nr` words are one person (`江/nr 泽民/nr` → 江泽民);
- `ns` is a location (LOC), `nt` an organisation (ORG); adjacent ones stay separate entities;
- a bracketed compound (`[香港/ns 特别/a 行政区/n]ns`) whose outer tag is nr, ns or nt is one entity of that
  type spanning all its words; the entities inside it are absorbed. A compound with any other outer tag
  (`[...]nz`, `[...]l`) falls back to its words, whose own tags count;
- every other word is outside any entity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from hanlm.errors import DataError

TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SCHEMES = ("bio", "bioes")
OUTSIDE = "O"
_TOKEN = re.compile(r"^(\[?)(.+)/([A-Za-z]+)(?:\]([A-Za-z]+))?$")


@dataclass(frozen=True, order=True)
class Entity:
    """Characters start … end − 1 of a text, of `type` (PER, LOC, ORG or a user's type)."""

    start: int
    end: int
    type: str


@dataclass
class NerSentence:
    """A text, its entities (sorted, never overlapping), and where it was read."""

    text: str
    entities: list[Entity]
    where: str = ""


def check_entities(text: str, entities: Sequence[Entity], where: str) -> list[Entity]:
    """`entities` sorted; DataError naming `where` for a span out of the text, empty, or overlapping another."""
    out = sorted(entities)
    for e in out:
        if not (0 <= e.start < e.end <= len(text)):
            raise DataError(f"{where}: entity {e.type} [{e.start}, {e.end}) is outside the text of {len(text)} "
                            "characters (or empty)")
        if not e.type or e.type != e.type.strip():
            raise DataError(f"{where}: entity [{e.start}, {e.end}) has no type")
    for a, b in zip(out, out[1:]):
        if b.start < a.end:
            raise DataError(f"{where}: entities {a.type} [{a.start}, {a.end}) and {b.type} [{b.start}, {b.end}) "
                            "overlap; nested entities are not supported")
    return out


def spans_to_tags(length: int, entities: Sequence[Entity], scheme: str = "bio") -> list[str]:
    """One tag per character: B-T (begin), I-T (inside), O; with bioes also E-T (end) and S-T (single)."""
    if scheme not in SCHEMES:
        raise DataError(f"unknown entity tag scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    tags = [OUTSIDE] * length
    for e in entities:
        if scheme == "bioes" and e.end - e.start == 1:
            tags[e.start] = f"S-{e.type}"
            continue
        tags[e.start] = f"B-{e.type}"
        for i in range(e.start + 1, e.end):
            tags[i] = f"I-{e.type}"
        if scheme == "bioes":
            tags[e.end - 1] = f"E-{e.type}"
    return tags


def tags_to_spans(tags: Sequence[str]) -> list[Entity]:
    """The entities of a tag sequence in BIO or BIOES, read as conlleval does: an entity starts at B or S, or
    at an I / E whose type differs from the entity before it (or that follows O), and ends before the next
    O, B, S or change of type, or at its E."""
    out: list[Entity] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, _, t = tag.partition("-")
        continues = prefix in ("I", "E") and kind == t and start is not None
        if start is not None and not continues:
            out.append(Entity(start, i, kind))
            start, kind = None, None
        if prefix in ("B", "S") or (prefix in ("I", "E") and start is None):
            start, kind = i, t
        if prefix in ("E", "S") and start is not None:
            out.append(Entity(start, i + 1, kind))
            start, kind = None, None
    return out


def people_daily_entities(line: str, where: str = "") -> NerSentence:
    """The text and entities of one `word/pos` line of People's Daily 1998 (see the module docstring)."""
    text, entities = "", []
    person: list[int] | None = None  # [start, end] of the person being extended by adjacent nr words
    compound: tuple[int, list[Entity]] | None = None  # its start and the entities of its words so far
    for token in line.split():
        m = _TOKEN.match(token)
        if m is None:
            raise DataError(f"{where}: {token!r} is not a word/TAG token")
        opens, word, tag, closes = m.groups()
        start = len(text)
        text += word
        if opens:
            if compound is not None:
                raise DataError(f"{where}: a compound opens inside another at {token!r}")
            compound = (start, [])
        kind = TYPES.get(tag)
        inner = compound[1] if compound is not None else entities
        if tag == "nr" and person is not None and person[1] == start and inner and inner[-1].type == "PER":
            inner[-1] = Entity(inner[-1].start, len(text), "PER")  # 江/nr 泽民/nr: one person
        elif kind is not None:
            inner.append(Entity(start, len(text), kind))
        person = [start, len(text)] if tag == "nr" else None
        if closes:
            if compound is None:
                raise DataError(f"{where}: {token!r} closes a compound that never opened")
            first, words = compound
            if closes in TYPES:
                entities.append(Entity(first, len(text), TYPES[closes]))  # the inner entities are absorbed
            else:
                entities.extend(words)
            compound, person = None, None
    if compound is not None:
        raise DataError(f"{where}: a compound opened at character {compound[0]} is never closed")
    return NerSentence(text, entities, where)
