"""Off-domain text: the distinct documents of a source, for scoring models on text unlike their training data.

The default is the built-in `chn-reviews` (product reviews: off-domain for models trained on People's Daily
news). Its 35,123 reviews hold 17,410 distinct texts, 17,408 once the reader has cleaned their whitespace
(data.clean_whitespace); duplicates would count the same review's loss several times, so each distinct text
is scored once, in first-seen order, optionally as an evenly spaced sample.
`hanlm.eval.evaluate_text_set` scores a model on it; `hanlm mix` and the recipe study report it beside val BPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hanlm.config import DataConfig
from hanlm.data.reader import DocumentReader
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError

OFF_DOMAIN = "chn-reviews"  # the default off-domain source
OFF_DOMAIN_TEXTS = 2000  # hanlm mix's default sample: keeps `make demo` within its budget (0: all)


@dataclass(frozen=True)
class TextSet:
    """Texts to score: `texts` (a sample of the `available` distinct texts of `spec`, in first-seen order)."""

    spec: str
    texts: list[str]
    available: int  # distinct texts the source holds

    @property
    def characters(self) -> int:
        """The characters BPC divides by: each text's, and one for the `<eos>` that ends it (as prepare counts)."""
        return sum(map(len, self.texts)) + len(self.texts)

    def encode(self, tokenizer: Tokenizer) -> np.ndarray:
        """The texts packed as prepare packs documents: each followed by `<eos>`."""
        return np.asarray(tokenizer.encode_documents(self.texts), dtype=np.int64)

    def describe(self) -> str:
        """`chn-reviews: 2,000 of its 17,408 distinct texts (evenly spaced), 147,000 characters`."""
        which = (f"all {self.available:,} distinct texts" if len(self.texts) == self.available else
                 f"{len(self.texts):,} of its {self.available:,} distinct texts (evenly spaced)")
        return f"{self.spec}: {which}, {self.characters:,} characters (each text's <eos> counted as one)"


def distinct(docs: Iterable[str]) -> list[str]:
    """Each text once, in the order first seen."""
    return list(dict.fromkeys(docs))


def evenly_spaced(items: list[str], n: int) -> list[str]:
    """`n` of `items` spread evenly over them, in their order, always the same ones (n = 0 or ≥ len: all)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def read_text_set(specs: str | list[str], cfg: DataConfig, texts: int = 0, *, option: str = "--off-domain",
                  count_option: str = "--off-domain-texts") -> TextSet:
    """The distinct documents of `specs` (files, globs, URLs or built-in corpora) read with `cfg` (the
    checkpoint's normalisation and filters), in first-seen order, `texts` of them evenly spaced (0: all). Errors name `option` / `count_option`, the flags that chose them."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    name = ", ".join(specs)
    if texts < 0:
        raise DataError(f"{count_option} must be 0 (every distinct text) or a positive number of texts, got {texts}")
    if not specs or not all(s.strip() for s in specs):
        raise DataError(f"{option}: give a source (a file, directory, glob, URL or built-in corpus such as "
                        f"{OFF_DOMAIN}), or none to skip it")
    try:
        docs = list(DocumentReader(specs, cfg))
    except DataError as e:
        raise DataError(f"{option} {name}: {e}") from None
    unique = distinct(docs)
    if not unique:  # the reader refuses an empty source; kept for readers that allow it
        raise DataError(f"{option} {name}: no texts to score")
    return TextSet(name, evenly_spaced(unique, texts), len(unique))
