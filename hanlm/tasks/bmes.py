"""Character tags for segmentation: BMES (begin, middle, end, single), or BMES joined with a POS tag.

Every tagger in hanlm labels characters. `bmes` has four tags; `bmes-pos` has `B-n`, `E-n`, … for
each POS tag of the training data, so one decoding gives words and their tags together. The
tags of a valid sequence follow a grammar (a word is S, or B M* E, with one POS throughout):
`allowed_transitions` is that grammar as a matrix, which every decoder obeys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hanlm.data.entities import OUTSIDE
from hanlm.data.tagged import TaggedSentence
from hanlm.errors import DataError

SCHEMES = ("bmes", "bmes-pos")
POSITIONS = ("S", "B", "M", "E")
SENTENCE_ENDS = frozenset("。！？；")  # characters after which a long paragraph may be cut


def tag_inventory(scheme: str, pos_tags: Sequence[str] = ()) -> list[str]:
    """The tags of `scheme`: S B M E, or S-x B-x M-x E-x for each POS tag x (sorted)."""
    if scheme == "bmes":
        return list(POSITIONS)
    if scheme != "bmes-pos":
        raise DataError(f"unknown tag scheme {scheme!r}; schemes: {', '.join(SCHEMES)}")
    if not pos_tags:
        raise DataError("tag scheme bmes-pos needs POS-tagged training data (word/TAG or CoNLL with tags)")
    return [f"{p}-{t}" for t in sorted(pos_tags) for p in POSITIONS]


def _split(tag: str) -> tuple[str, str | None]:
    position, _, pos = tag.partition("-")
    return position, pos or None


def allowed_transitions(tags: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(start (S,), transition (S, S) [previous, next], end (S,)) boolean masks of the tag grammar: BMES
    words (with one POS throughout), or, when the tags hold the entity tags' O, BIO / BIOES entities."""
    if OUTSIDE in tags:
        return entity_transitions(tags)
    parts = [_split(t) for t in tags]
    start = torch.tensor([p in "SB" for p, _ in parts])
    end = torch.tensor([p in "SE" for p, _ in parts])
    trans = torch.zeros(len(tags), len(tags), dtype=torch.bool)
    for i, (p, pos) in enumerate(parts):
        for j, (q, pos2) in enumerate(parts):
            if p in "SE":
                trans[i, j] = q in "SB"
            else:  # inside a word: continue it, with the same POS
                trans[i, j] = q in "ME" and pos == pos2
    return start, trans, end


def entity_transitions(tags: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BIO / BIOES grammar over O, B-T, I-T (and E-T, S-T): an entity opens with B (or is one S) and
    continues with I of its own type; under BIOES it must close with E, so B and I cannot end a text."""
    parts = [(OUTSIDE, "") if t == OUTSIDE else (t[:1], t[2:]) for t in tags]
    bioes = any(p in "ES" for p, _ in parts)
    start = torch.tensor([p in "OBS" for p, _ in parts])
    end = torch.tensor([p in "OES" or not bioes for p, _ in parts])
    trans = torch.zeros(len(tags), len(tags), dtype=torch.bool)
    for i, (p, kind) in enumerate(parts):
        inside = p in "BI"
        for j, (q, kind2) in enumerate(parts):
            continues = q in ("IE" if bioes else "I") and kind == kind2
            opens = q in "OBS"
            trans[i, j] = (continues or (opens and not bioes)) if inside else opens
    return start, trans, end


def char_tags(sentence: TaggedSentence, scheme: str) -> list[str]:
    """One tag per character of the sentence."""
    out = []
    pos_of = sentence.tags if scheme == "bmes-pos" else None
    if scheme == "bmes-pos" and pos_of is None:
        raise DataError(f"{sentence.where}: the sentence has no POS tags, which tag scheme bmes-pos needs")
    for k, word in enumerate(sentence.words):
        positions = "S" if len(word) == 1 else "B" + "M" * (len(word) - 2) + "E"
        suffix = f"-{pos_of[k]}" if pos_of is not None else ""
        out += [p + suffix for p in positions]
    return out


def words_of(text: str, tags: Sequence[str]) -> TaggedSentence:
    """The words (and POS tags, under bmes-pos) that a tag per character spells. A word ends at E or
    S and begins at B or S; a sequence that breaks the grammar still gives words (a stray M or E
    continues the open word, or begins one)."""
    if len(text) != len(tags):
        raise ValueError(f"{len(text)} characters but {len(tags)} tags")
    words: list[str] = []
    pos: list[str | None] = []
    closed = True
    for ch, tag in zip(text, tags):
        position, p = _split(tag)
        if position in "BS" or closed:
            words.append(ch)
            pos.append(p)
        else:
            words[-1] += ch
        closed = position in "SE"
    with_pos = bool(pos) and all(p is not None for p in pos)
    return TaggedSentence(words, [p for p in pos] if with_pos else None)


def cut_sentence(sentence: TaggedSentence, max_chars: int) -> list[TaggedSentence]:
    """A long paragraph as pieces of at most `max_chars` characters (a word longer than that is a
    piece of its own), cut after sentence-final punctuation where possible, else at word boundaries."""
    pieces: list[TaggedSentence] = []
    start = chars = last_end = 0
    words, tags = sentence.words, sentence.tags

    def emit(stop: int) -> None:
        pieces.append(TaggedSentence(words[start:stop], tags[start:stop] if tags is not None else None,
                                     sentence.where))

    for k, word in enumerate(words):
        if chars + len(word) > max_chars and k > start:
            cut = last_end if last_end > start else k
            emit(cut)
            start, chars = cut, sum(len(w) for w in words[cut:k])
        chars += len(word)
        if word in SENTENCE_ENDS:
            last_end = k + 1
    if start < len(words):
        emit(len(words))
    return pieces


def text_pieces(text: str, max_chars: int) -> list[tuple[int, int]]:
    """(start, stop) character spans covering `text`, each at most `max_chars`, cut after sentence-final
    punctuation where possible: how raw text is fed to a tagger with a bounded input."""
    spans: list[tuple[int, int]] = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = max((i + 1 for i, ch in enumerate(window) if ch in SENTENCE_ENDS), default=max_chars)
        spans.append((start, start + cut))
        start += cut
    if start < len(text):
        spans.append((start, len(text)))
    return spans
