"""The first-order hidden Markov model tagger: states are character tags, observations characters.

Trained by counting: start, transition and emission frequencies of the gold tags, with add-δ
smoothing (finetune.hmm_smoothing) over the transitions the tag grammar allows (the others stay
impossible). The observation alphabet is a char tokenizer trained on the train split with
min_freq 2, so characters seen once share the <unk> id and teach the model what an unseen
character looks like. Decoding is the batched Viterbi of `hanlm.tasks.viterbi`.

The model is a module of three buffers (log_start, log_trans, log_emit), saved as every
checkpoint's weights are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hanlm.data.tagged import TaggedSentence
from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.tasks.bmes import allowed_transitions, char_tags
from hanlm.tasks.tagging import Tagger
from hanlm.tasks.viterbi import decode_rows

BATCH = 256


class HMMTagger(nn.Module, Tagger):
    def __init__(self, tags: Sequence[str], tokenizer: Tokenizer):
        super().__init__()
        self.tags, self.tokenizer = list(tags), tokenizer
        n = len(self.tags)
        self.register_buffer("log_start", torch.zeros(n))
        self.register_buffer("log_trans", torch.zeros(n, n))
        self.register_buffer("log_emit", torch.zeros(n, tokenizer.vocab_size))
        self.register_buffer("log_end", torch.zeros(n))

    @classmethod
    def fit(cls, sentences: Sequence[TaggedSentence], tags: Sequence[str], scheme: str,
            smoothing: float = 0.1) -> HMMTagger:
        """Count and normalise the gold tags of `sentences`."""
        # One emission per character: an unseen character is <unk>, never several byte tokens.
        tokenizer = train_tokenizer("char", (s.text for s in sentences), min_freq=2, byte_fallback=False)
        model = cls(tags, tokenizer)
        index = {t: i for i, t in enumerate(model.tags)}
        n, v = len(model.tags), tokenizer.vocab_size
        start, trans, emit = torch.zeros(n), torch.zeros(n * n), torch.zeros(n * v)
        for s in sentences:
            states = torch.tensor([index[t] for t in char_tags(s, scheme)])
            ids = torch.as_tensor(tokenizer.encode_array(s.text))
            start[states[0]] += 1
            trans.index_add_(0, states[:-1] * n + states[1:], torch.ones(len(states) - 1))
            emit.index_add_(0, states * v + ids, torch.ones(len(states)))
        allowed_start, allowed, allowed_end = allowed_transitions(model.tags)
        model.log_start.copy_(_normalise(start + smoothing, allowed_start))
        model.log_trans.copy_(_normalise(trans.view(n, n) + smoothing, allowed))
        observable = torch.ones(n, v, dtype=torch.bool)
        observable[:, [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]] = False  # never in text; <unk> is
        model.log_emit.copy_(_normalise(emit.view(n, v) + smoothing, observable))
        model.log_end.copy_(torch.where(allowed_end, 0.0, float("-inf")))
        return model

    def tag(self, texts: Sequence[str]) -> list[list[str]]:
        by_char = self.log_emit.t()  # (vocabulary, S): a character's emission scores, one row per id
        emissions = [by_char[torch.as_tensor(self.tokenizer.encode_array(t))] for t in texts]
        paths = decode_rows(emissions, self.log_start, self.log_trans, self.log_end, BATCH)
        return [[self.tags[s] for s in path] for path in paths]


def _normalise(counts: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Log relative frequencies along the last axis, -inf where not allowed."""
    counts = torch.where(allowed, counts, 0.0)
    total = counts.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.where(allowed, (counts / total).clamp(min=1e-30).log(), float("-inf"))
