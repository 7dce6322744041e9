"""Masked-language-model corruption of a batch (BERT, Devlin et al. 2019): a share `rate` of the tokens
that may be masked is chosen; of those, 80% become the mask token, 10% a random token and 10% stay as
they are; the targets hold the original token at the chosen positions and -1 elsewhere.

Special tokens (<pad>, <unk>, <bos>, <eos>; an imported model's own, such as BERT's [CLS] and [SEP]) are never
chosen; the mask token is <bos> (`MASK_ID`) for hanlm's own tokenizers, the model's own ([MASK]) for an imported
one. With a segmenter (`train.mask_whole_words`:
jieba, or a hanlm tagger checkpoint), whole words are chosen instead of single tokens — Chinese-BERT-wwm's
recipe (Cui et al. 2019) — for char tokenizers, where a word is a run of characters: each word is chosen
with probability `rate`, and all its characters are masked together (each still 80/10/10).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hanlm.data.segmenters import segment_words
from hanlm.data.tokenizer import SPECIAL_TOKENS, CharTokenizer, PretrainedTokenizer, Tokenizer
from hanlm.errors import ConfigError
from hanlm.models.encoder import MASK_ID

FIRST_ORDINARY = len(SPECIAL_TOKENS)  # ids below this are special and never masked nor drawn at random


class Masker:
    """Makes (inputs, targets) for masked-LM training from a batch of token ids (B, T)."""

    def __init__(self, rate: float, vocab_size: int, tokenizer: Tokenizer | None = None,
                 whole_words: str | None = None):
        if not 0.0 < rate < 1.0:
            raise ConfigError(f"train.mask_rate must be between 0 and 1 (both excluded), got {rate}")
        if whole_words and not isinstance(tokenizer, CharTokenizer):
            kind = tokenizer.kind if tokenizer is not None else "none"
            raise ConfigError(f"train.mask_whole_words masks runs of characters: it needs tokenizer.kind char, "
                              f"not {kind} (a word tokenizer's tokens are words already)")
        self.rate, self.vocab_size, self.whole_words = rate, vocab_size, whole_words
        self.pieces = tokenizer.token_strings() if whole_words else []
        self.mask_id, self.specials = MASK_ID, None
        if isinstance(tokenizer, PretrainedTokenizer):
            if tokenizer.mask_id < 0:
                raise ConfigError("train.objective mlm replaces tokens by the mask token, and this model's tokenizer "
                                  "names none (tokenizer_config.json's mask_token)")
            self.mask_id, self.specials = tokenizer.mask_id, torch.tensor(sorted(tokenizer.special_ids()))

    def allowed(self, x: Tensor) -> Tensor:
        """Which positions may be masked (B, T): every one that holds no special token."""
        if self.specials is None:
            return x >= FIRST_ORDINARY
        return ~torch.isin(x, self.specials.to(x.device))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None,
                 row_seeds: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (B, T): inputs with the chosen positions corrupted, targets holding the
        original token there and -1 elsewhere. The draws come from `generator` (default: torch's), or with
        `row_seeds`, from a generator per row seeded so: training seeds each row by the window it holds, so
        that its masks are the same whichever rank reads it, and after a resume (see `row_seed`)."""
        if row_seeds is not None:
            rows = [self(x[i:i + 1], torch.Generator(x.device).manual_seed(s)) for i, s in enumerate(row_seeds)]
            return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        allowed = self.allowed(x)
        if self.whole_words:
            words = self.word_ids(x).to(x.device)  # (B, T): the index of each token's word in its row
            draw = torch.rand(words.shape[0], int(words.max()) + 1, generator=generator, device=x.device)
            chosen = draw.gather(1, words) < self.rate
        else:
            chosen = torch.rand(x.shape, generator=generator, device=x.device) < self.rate
        chosen &= allowed
        how = torch.rand(x.shape, generator=generator, device=x.device)
        random = torch.randint(FIRST_ORDINARY, self.vocab_size, x.shape, generator=generator, device=x.device)
        inputs = torch.where(chosen & (how < 0.8), torch.full_like(x, self.mask_id), x)
        inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random, inputs)
        return inputs, torch.where(chosen, x, torch.full_like(x, -1))

    def word_ids(self, x: Tensor) -> Tensor:
        """For each token, the index of the segmenter's word it belongs to within its row (B, T). A special or
        byte token is a word of its own; runs of ordinary characters are segmented in one batch."""
        rows = x.tolist()
        runs: list[str] = []  # every run of ordinary characters, all rows, in order
        for row in rows:
            run = ""
            for i in row:
                piece = self.pieces[i]
                if i >= FIRST_ORDINARY and len(piece) == 1:
                    run += piece
                elif run:
                    runs.append(run)
                    run = ""
            if run:
                runs.append(run)
        words = iter(segment_words(runs, self.whole_words) if runs else [])
        out = []
        for row in rows:
            ids, word, left = [], -1, 0  # left: characters still to come in the current word
            pending: list[int] = []  # the lengths of the current run's words, in order
            for i in row:
                piece = self.pieces[i]
                if i >= FIRST_ORDINARY and len(piece) == 1:
                    if left == 0:
                        if not pending:
                            pending = [len(w) for w in next(words)]
                        left = pending.pop(0)
                        word += 1
                    left -= 1
                else:
                    word, left, pending = word + 1, 0, []
                ids.append(word)
            out.append(ids)
        return torch.tensor(out, dtype=torch.long)


def row_seed(seed: int, epoch: int, start: int) -> int:
    """The mask seed of the training window at token `start` in `epoch` of a run seeded `seed`."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + start) % (1 << 63)
