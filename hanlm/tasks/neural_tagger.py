"""The neural tagger: a character-tag head on a pretrained gpt or lstm network (the backbone).

The backbone reads the text's tokens (<eos> first, as pretraining put it between documents). A
character's state is the hidden state of the token that completes it (byte-level BPE may split a
rare character over several tokens), plus an embedding of where the character sits in its token
(S, B, M, E) — a BPE token is often a word, so its edges are evidence — plus an embedding of the
character itself (its code point hashed into CHAR_BUCKETS rows, so no vocabulary is needed): the
characters inside one multi-character token share its state, and only this tells them apart. With
finetune.tag_bigrams the character's two bigrams (with the characters before and after it) are embedded too,
hashed into BIGRAM_BUCKETS rows of BIGRAM_WIDTH and projected to the network's width: the feature that makes
the CRF strong at word boundaries (Chen et al. 2015; Zhang et al. 2016 for bigrams in neural segmenters). A
causal backbone has not seen the text to the right of a character, which decides where its word
ends, so the head adds it
(finetune.tag_head): `bilstm` runs a bidirectional LSTM over the character states, `lookahead`
joins the state finetune.tag_lookahead characters ahead, `causal` adds nothing (the baseline).
The emissions are decoded by Viterbi under the tag grammar, so every output is a valid segmentation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hanlm.config import Config
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError
from hanlm.models import build_model
from hanlm.models.base import LanguageModel
from hanlm.models.lora import adapted
from hanlm.data.tagged import TaggedSentence
from hanlm.tasks.bmes import POSITIONS, allowed_transitions, char_tags, cut_sentence, text_pieces
from hanlm.tasks.tagging import Tagger
from hanlm.tasks.crf_layer import CRFLayer
from hanlm.tasks.viterbi import batched_by_length, decode_rows, mask_scores

IGNORE = -100  # the target of padding characters
CHAR_BUCKETS = 16_384  # rows of the character embedding: code points modulo this (CJK's 20,992 mostly distinct)
BIGRAM_BUCKETS = 131_071  # rows of the bigram embedding (a prime: the hash of a pair is taken modulo it)
BIGRAM_WIDTH = 64  # narrow rows, projected up: 8.4 M parameters rather than the network's width × 131 k
EDGE = CHAR_BUCKETS  # the character id standing for the text's edge in the first and last bigrams


@dataclass
class TaggerRow:
    """One text as the tagger reads it: token ids (with the leading <eos>), for each character the
    position of the token that completes it and its place in that token, and its gold tag ids."""

    ids: list[int]
    char_token: list[int]
    char_piece: list[int]
    char_ids: list[int]
    targets: list[int] | None = None

    def __len__(self) -> int:
        return len(self.char_token)


def encode_row(tokenizer: Tokenizer, text: str, targets: list[int] | None = None) -> TaggerRow:
    ids, spans = tokenizer.encode_spans(text)
    char_token = [0] * len(text)
    char_piece = [0] * len(text)
    for position, (a, b) in enumerate(spans, start=1):  # position 0 is the start token (Tokenizer.start_id)
        char_token[a:b] = [position] * (b - a)  # the last token touching a character completes it
        char_piece[a:b] = [_S] if b - a == 1 else [_B, *[_M] * (b - a - 2), _E]
    return TaggerRow([tokenizer.start_id, *ids], char_token, char_piece, [ord(c) % CHAR_BUCKETS for c in text], targets)


_S, _B, _M, _E = (POSITIONS.index(p) for p in "SBME")


def collate_rows(rows: Sequence[TaggerRow], pad_id: int = 0) -> tuple[Tensor, ...]:
    """(ids (B, T), char_token (B, N), char_piece (B, N), char_ids (B, N), char lengths (B,), targets (B, N)
    or None)."""
    def padded(lists: list[list[int]], fill: int) -> Tensor:  # one tensor from Python lists: no tensor per row
        width = max(map(len, lists))
        return torch.tensor([x + [fill] * (width - len(x)) for x in lists], dtype=torch.long)

    has_targets = all(r.targets is not None for r in rows)
    return (padded([r.ids for r in rows], pad_id), padded([r.char_token for r in rows], 0),
            padded([r.char_piece for r in rows], 0), padded([r.char_ids for r in rows], 0),
            torch.tensor([len(r) for r in rows]),
            padded([r.targets for r in rows], IGNORE) if has_targets else None)


class SequenceTagger(nn.Module):
    """backbone → character states → head (bilstm | lookahead | causal) → emissions (B, N, n_tags)."""

    def __init__(self, backbone: LanguageModel, n_tags: int, head: str, lookahead: int, dropout: float,
                 crf: tuple[Tensor, Tensor, Tensor] | None = None, bigrams: bool = False):
        super().__init__()
        self.backbone, self.head_kind, self.lookahead = backbone, head, lookahead
        width = backbone.tok_emb.weight.size(1)
        self.piece_emb = nn.Embedding(len(POSITIONS), width)
        self.char_emb = nn.Embedding(CHAR_BUCKETS, width)
        for emb in (self.piece_emb, self.char_emb):
            nn.init.normal_(emb.weight, std=0.02)
        if bigrams:
            self.bigram_emb = nn.Embedding(BIGRAM_BUCKETS, BIGRAM_WIDTH)
            nn.init.normal_(self.bigram_emb.weight, std=0.02)
            self.bigram_proj = nn.Linear(2 * BIGRAM_WIDTH, width, bias=False)
        else:
            self.bigram_emb = self.bigram_proj = None
        self.dropout = nn.Dropout(dropout)
        if head == "bilstm":
            self.context = nn.LSTM(width, width // 2, batch_first=True, bidirectional=True)
            out_width = 2 * (width // 2)
        else:
            out_width = 2 * width if head == "lookahead" else width
        self.out = nn.Linear(out_width, n_tags)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        if not backbone.tied:
            backbone.lm_head.weight.requires_grad_(False)  # unused by tagging (as in the classifier)
        # With the grammar's allowed (start, transitions, end): a CRF output layer, trained on whole paths.
        self.crf = CRFLayer(crf) if crf is not None else None

    @property
    def context_length(self) -> int | None:
        return self.backbone.context_length

    def forward(self, ids: Tensor, char_token: Tensor, char_piece: Tensor, char_ids: Tensor, lengths: Tensor,
                targets: Tensor | None = None) -> Tensor:
        """Emission logits (B, N, n_tags) in float32; with targets, their mean cross-entropy instead (with a CRF
        layer: the gold paths' negative log-likelihood per character)."""
        # A row's tokens: <eos> and those up to the one completing its last character (padding after them).
        tokens = char_token.gather(1, (lengths.to(char_token.device) - 1).clamp(min=0)[:, None]).squeeze(1) + 1
        h = self.backbone.hidden(ids, tokens)
        states = (h.gather(1, char_token.unsqueeze(-1).expand(-1, -1, h.size(-1))) + self.piece_emb(char_piece)
                  + self.char_emb(char_ids))
        if self.bigram_emb is not None:
            states = states + self.bigram_proj(self.bigram_emb(bigram_ids(char_ids, lengths)).flatten(2))
        states = self.dropout(states)
        if self.head_kind == "bilstm":
            states = self.dropout(bidirectional(self.context, states.float(), lengths))
        elif self.head_kind == "lookahead":
            ahead = torch.arange(states.size(1), device=states.device)[None, :] + self.lookahead
            ahead = torch.minimum(ahead, (lengths.to(states.device) - 1).clamp(min=0)[:, None])
            states = torch.cat([states, states.gather(1, ahead.unsqueeze(-1).expand(-1, -1, states.size(-1)))], -1)
        logits = self.out(states).float()
        if targets is None:
            return logits
        if self.crf is not None:
            return self.crf.loss(logits, targets, lengths)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def bidirectional(lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
    """A one-layer bidirectional `lstm` over right-padded rows x (B, N, C) of `lengths` (B,): (B, N, 2 · hidden),
    at each row's characters what the LSTM gives over the packed rows. The backward direction reads each row
    reversed within its length, so it starts at the row's last character, not at its padding. Unpacked, each
    direction is one call of the fused (oneDNN) kernel: packed rows took a slower step-by-step path on the CPU."""
    steps = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)
    n = lengths.to(x.device)[:, None]
    back = torch.where(steps < n, n - 1 - steps, steps)[..., None]  # (B, N, 1): a row's characters last to first
    forward = _direction(lstm, x, "")
    backward = _direction(lstm, x.gather(1, back.expand_as(x)), "_reverse")
    return torch.cat([forward, backward.gather(1, back.expand_as(backward))], -1)


def _direction(lstm: nn.LSTM, x: Tensor, suffix: str) -> Tensor:
    """One direction of a one-layer `lstm` (its weights named with `suffix`) over x (B, N, C), from zero states."""
    weights = [getattr(lstm, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    zeros = x.new_zeros(1, x.size(0), lstm.hidden_size)
    return torch.lstm(x, (zeros, zeros), weights, True, 1, 0.0, lstm.training, False, True)[0]


def bigram_ids(char_ids: Tensor, lengths: Tensor) -> Tensor:
    """(B, N, 2) hashed ids of each character's left bigram (previous character, it) and right bigram (it, next
    character), the text's edges standing in past either end."""
    live = torch.arange(char_ids.size(1), device=char_ids.device)[None, :] < lengths.to(char_ids.device)[:, None]
    chars = torch.where(live, char_ids, EDGE)
    edge = chars.new_full((chars.size(0), 1), EDGE)
    before, after = torch.cat([edge, chars[:, :-1]], 1), torch.cat([chars[:, 1:], edge], 1)
    return torch.stack([pair_hash(before, chars), pair_hash(chars, after)], -1)


def pair_hash(a: Tensor, b: Tensor) -> Tensor:
    """The bucket of the character pair (a, b): no vocabulary, so unseen pairs at test time still get a row."""
    return (a * 1_000_003 + b * 8_191) % BIGRAM_BUCKETS


def build_tagger_network(cfg: Config, vocab_size: int) -> SequenceTagger:
    """A tagger network for a resolved config whose model.task is tag or ner (its tags in finetune.labels)."""
    if cfg.model.task not in ("tag", "ner") or cfg.finetune.tagger != "neural":
        raise ConfigError(f"model.task {cfg.model.task} / finetune.tagger {cfg.finetune.tagger} is not a neural tagger")
    model_cfg = dataclasses.replace(cfg.model, vectors=None, dropout=cfg.finetune.dropout)
    ft = cfg.finetune
    backbone = adapted(build_model(model_cfg, vocab_size), cfg)
    return SequenceTagger(backbone, len(ft.labels), ft.tag_head, ft.tag_lookahead, ft.dropout,
                          allowed_transitions(ft.labels) if ft.tag_crf else None, ft.tag_bigrams)


def fitted_pieces(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[tuple[int, int]]:
    """Character spans of `text` whose rows hold at most `max_tokens` ids (the <eos> included): cut at
    sentence ends first, then in halves wherever a piece still encodes to too many tokens."""
    out = []
    pending = list(text_pieces(text, max_tokens - 1))
    while pending:
        a, b = pending.pop(0)
        if b - a > 1 and len(tokenizer.encode(text[a:b])) + 1 > max_tokens:
            mid = (a + b) // 2
            pending[:0] = [(a, mid), (mid, b)]
        else:
            out.append((a, b))
    return out


class NeuralTagger(Tagger):
    """A SequenceTagger with its tokenizer, decoding under the tag grammar."""

    def __init__(self, model: SequenceTagger, tokenizer: Tokenizer, tags: Sequence[str], max_length: int, *,
                 batch_size: int = 64, autocast_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.tags = model, tokenizer, list(tags)
        self.max_length, self.batch_size, self.autocast_dtype = max_length, batch_size, autocast_dtype
        start, trans, end = allowed_transitions(self.tags)
        self._grammar = mask_scores(start), mask_scores(trans), mask_scores(end)

    def tag(self, texts: Sequence[str]) -> list[list[str]]:
        pieces = [(k, a, b) for k, t in enumerate(texts) for a, b in fitted_pieces(self.tokenizer, t, self.max_length)]
        rows = [encode_row(self.tokenizer, texts[k][a:b]) for k, a, b in pieces]
        paths = self.decode(rows)
        out: list[list[str]] = [[] for _ in texts]
        for (k, _, _), path in zip(pieces, paths):
            out[k] += [self.tags[s] for s in path]
        return out

    @torch.no_grad()
    def emissions(self, rows: Sequence[TaggerRow]) -> list[Tensor]:
        """Each row's characters' scores (N_i, n_tags), on the CPU: log-probabilities, or with a CRF layer the
        emission scores its paths add up."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        amp = (torch.autocast(device.type, self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        out: list[Tensor] = [torch.empty(0)] * len(rows)
        try:
            for chunk in batched_by_length(len(rows), [len(r.ids) for r in rows], self.batch_size):
                ids, char_token, char_piece, char_ids, lengths, _ = collate_rows([rows[i] for i in chunk],
                                                                                 self.tokenizer.pad_id)
                with amp:
                    logits = self.model(ids.to(device), char_token.to(device), char_piece.to(device),
                                        char_ids.to(device), lengths)
                logp = (logits.float() if self.model.crf is not None else logits.float().log_softmax(-1)).cpu()
                for j, i in enumerate(chunk):
                    out[i] = logp[j, :len(rows[i])]
        finally:
            self.model.train(was_training)
        return out

    def decode(self, rows: Sequence[TaggerRow]) -> list[list[int]]:
        """The best grammatical tag ids of each row (under the CRF layer's learned scores when it has one)."""
        scores = self._grammar if self.model.crf is None else tuple(s.detach().cpu() for s in self.model.crf.scores())
        return decode_rows(self.emissions(rows), *scores)

    def tag_words(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """The POS tag of each given word (a gold segmentation), by a bmes-pos tagger: the best grammatical path
        whose positions (S, B, M, E) spell exactly those words; a word's tag is its first character's."""
        if not all("-" in t for t in self.tags):
            raise ConfigError(f"tagging given words needs a bmes-pos tagger; this one has the tags "
                              f"{', '.join(self.tags[:8])}")
        pieces = [(k, piece) for k, words in enumerate(sentences) for piece in self._word_pieces(list(words))]
        emissions = self.emissions([encode_row(self.tokenizer, piece.text) for _, piece in pieces])
        tag_position = torch.tensor([POSITIONS.index(t.partition("-")[0]) for t in self.tags])
        for e, (_, piece) in zip(emissions, pieces):
            gold = torch.tensor([POSITIONS.index(t) for t in char_tags(piece, "bmes")])
            e.masked_fill_(gold[:, None] != tag_position[None, :], float("-inf"))
        scores = self._grammar if self.model.crf is None else tuple(s.detach().cpu() for s in self.model.crf.scores())
        out: list[list[str]] = [[] for _ in sentences]
        for (k, piece), path in zip(pieces, decode_rows(emissions, *scores)):
            at = 0
            for word in piece.words:
                out[k].append(self.tags[path[at]].partition("-")[2])
                at += len(word)
        return out

    def _word_pieces(self, words: list[str], limit: int | None = None) -> list[TaggedSentence]:
        """The words cut between words into pieces of at most `limit` characters that fit the network (in order;
        a piece that still encodes to too many tokens is cut again at half the length)."""
        limit = self.max_length - 2 if limit is None else limit
        out = []
        for piece in cut_sentence(TaggedSentence(words, None), limit):
            if limit > 1 and len(piece.words) > 1 and len(self.tokenizer.encode(piece.text)) + 1 > self.max_length:
                out += self._word_pieces(piece.words, limit // 2)
            elif piece.words:
                out.append(piece)
        return out
