"""The traditional baseline: an interpolated modified Kneser-Ney n-gram model, counted with numpy.

Estimation follows Chen & Goodman (1998) the way KenLM's `lmplz` implements it:

- every document is a sentence `<s> w1 … wn </s>`; n-grams never cross sentences;
- the highest order keeps raw counts; lower orders get adjusted (continuation) counts, the number of
  distinct words seen to their left, except n-grams that start with `<s>`, which keep raw counts;
- three discounts per order, D1, D2 and D3+, from the counts-of-counts n1..n4 of the adjusted counts;
- every order is interpolated with the one below, the unigrams with a uniform distribution over the
  vocabulary (`<unk>` included, `<s>` excluded: it is never predicted);
- optional pruning by raw count; a pruned n-gram's whole count goes to its context's backoff.

The result is stored as a backoff model (log10 probabilities and backoff weights, the ARPA
representation), which is exact for an interpolated model: p(w | h) is the stored value of `h w`
when that n-gram exists, else backoff(h) × p(w | h minus its first word).

N-grams are numbered order by order: a unigram's index is its token id; an n-gram of order k > 1 is
the key `index of its (k-1)-word prefix × V + last word`, kept sorted, and its index is its position
in that sorted array. Counting, estimation and lookup are all sorts, `np.unique`, `np.bincount`
and `np.searchsorted` over whole arrays: no Python loop runs per n-gram.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError
from hanlm.memory import peak_rss
from hanlm.models.base import LanguageModel

LN10 = math.log(10.0)
PAD, UNK, BOS, EOS = Tokenizer.pad_id, Tokenizer.unk_id, Tokenizer.bos_id, Tokenizer.eos_id
NOT_PREDICTED = (PAD, BOS)  # ids that never follow a context: probability 0


@dataclass
class BuildReport:
    """What `estimate` did: n-grams per order, discounts, time and memory."""

    order: int
    tokens: int  # training tokens, <eos> included
    sentences: int
    counts: list[int]  # n-grams kept per order (unigrams: the vocabulary, <s> included)
    counted: list[int]  # distinct n-grams seen per order, before pruning
    discounts: list[tuple[float, float, float]]
    fallback_orders: list[int] = field(default_factory=list)  # orders that used model.discount_fallback
    seconds: float = 0.0
    peak_rss: int = 0  # bytes, the whole process

    def summary(self) -> str:
        counts = " / ".join(f"{c:,}" for c in self.counts)
        fallback = f"; fallback discounts for orders {self.fallback_orders}" if self.fallback_orders else ""
        pruned = (f" (of {' / '.join(f'{c:,}' for c in self.counted)} counted)"
                  if self.counts[1:] != self.counted[1:] else "")
        return (f"{self.order}-gram modified Kneser-Ney from {self.tokens:,} tokens ({self.sentences:,} documents): "
                f"n-grams of orders 1–{self.order}: {counts}{pruned}; built in {self.seconds:.1f} s, peak RSS "
                f"{self.peak_rss / 2**30:.2f} GiB{fallback}")


class NGramLM(LanguageModel):
    """A backoff n-gram model over token ids behind the LanguageModel interface.

    Tables (log10, as ARPA stores them): `uni_logp`/`uni_bow` are dense over the vocabulary;
    for order k ≥ 2, `keys[k]` (sorted), `logp[k]` and, below the top order, `bow[k]`.
    The state is the last order − 1 context tokens of each sequence, (B, h) int64.
    Token ids outside the model's vocabulary are looked up as `<unk>`, as KenLM does.
    """

    eval_block_size = 1 << 16  # long windows: a window start cuts only order − 1 contexts short

    def __init__(self, order: int, vocab_size: int, uni_logp: np.ndarray, uni_bow: np.ndarray,
                 keys: dict[int, np.ndarray], logp: dict[int, np.ndarray], bow: dict[int, np.ndarray]):
        super().__init__()
        self.order, self.vocab_size, self.context_length = order, vocab_size, None
        self.uni_logp, self.uni_bow = uni_logp.astype(np.float64), uni_bow.astype(np.float64)
        self.keys, self.logp, self.bow = keys, logp, bow
        self.known = np.isfinite(self.uni_logp) | (np.arange(vocab_size) == BOS)
        # Where the children of each context start in the next order's sorted keys.
        self._children = {k: np.searchsorted(keys[k], np.arange(self.count(k - 1) + 1, dtype=np.int64) * vocab_size)
                          for k in range(2, order + 1)}
        self._uni_ln = torch.from_numpy(self.uni_logp * LN10)

    # -- sizes -------------------------------------------------------------------------------

    def count(self, k: int) -> int:
        """N-grams of order k (unigrams: entries of the dense table, one per vocabulary id)."""
        return self.vocab_size if k == 1 else len(self.keys[k])

    def counts(self) -> list[int]:
        """N-grams per order as ARPA lists them: unigrams that have a probability, plus `<s>`."""
        return [int(self.known.sum())] + [len(self.keys[k]) for k in range(2, self.order + 1)]

    def num_params(self, embeddings: bool = True) -> int:
        """Stored values: one probability per n-gram plus one backoff per n-gram below the top order."""
        return sum(self.counts()) + sum(self.counts()[:-1])

    def flops_per_token(self, seq_len: int) -> float:
        return 0.0

    @property
    def tied(self) -> bool:
        return False

    # -- lookups -----------------------------------------------------------------------------

    def _find(self, k: int, prefix: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Index of the order-k n-gram `prefix` (order k−1 index, −1 = absent) + `words`, or −1."""
        if k == 1:
            return words.copy()
        keys = self.keys[k]
        out = np.full(len(words), -1, dtype=np.int64)
        has = np.flatnonzero(prefix >= 0)  # a missing prefix has no extensions: search only the others
        q = prefix[has] * self.vocab_size + words[has]
        pos = np.searchsorted(keys, q)
        found = pos < len(keys)
        found[found] = keys[pos[found]] == q[found]
        out[has[found]] = pos[found]
        return out

    def _contexts(self, seq: np.ndarray, longest: int | None = None) -> list[np.ndarray]:
        """For each position p of a context-form sequence, the index of the j-gram ending at p,
        for j = 1 … longest (default order−1; list entry j−1; −1 where that n-gram is not in the model)."""
        out: list[np.ndarray] = []
        for j in range(1, (self.order - 1 if longest is None else longest) + 1):
            prev = np.concatenate([[-1], out[-1][:-1]]) if out else None
            out.append(self._find(j, prev, seq))
        return out

    def _context_form(self, tokens: np.ndarray) -> np.ndarray:
        """Ids as contexts: `<eos>` ends a sentence, so what follows it sees `<s>`; unknown ids are `<unk>`."""
        t = np.where(tokens == EOS, BOS, tokens)
        return np.where(self.known[np.clip(t, 0, self.vocab_size - 1)] & (t < self.vocab_size), t, UNK)

    def _score(self, history: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """log10 p(y[t] | history + x[:t+1]) for one sequence; y == −1 scores 0."""
        h = len(history)
        target = np.where(y >= 0, y, UNK)
        target = np.where(self.known[np.clip(target, 0, self.vocab_size - 1)] & (target < self.vocab_size), target, UNK)
        # A stream (y is x shifted by one, as in evaluation) holds every target n-gram as the n-gram
        # ending one position later: one lookup per order instead of two. Only an `<eos>` target differs
        # (as a context it reads `<s>`), so those few are looked up as targets.
        stream = len(x) > 0 and bool((y >= 0).all()) and np.array_equal(x[1:], y[:-1])
        seq = self._context_form(np.concatenate([history, x, y[-1:]] if stream else [history, x]))
        grams = self._contexts(seq, self.order if stream else None)
        ctx = [c[h:h + len(x)] for c in grams[:self.order - 1]]  # ctx[j-1]: the j-word context before y
        ends = np.flatnonzero(target == EOS) if stream else None
        score = self.uni_logp[target].copy()
        matched = np.ones(len(y), dtype=np.int64)
        for k in range(2, self.order + 1):
            if stream:
                idx = grams[k - 1][h + 1:h + 1 + len(x)].copy()
                idx[ends] = self._find(k, ctx[k - 2][ends], target[ends])
            else:
                idx = self._find(k, ctx[k - 2], target)
            hit = idx >= 0
            score[hit] = self.logp[k][idx[hit]]
            matched[hit] = k
        for j in range(1, self.order):  # backoff weights of the contexts longer than the match
            c = ctx[j - 1]
            use = (c >= 0) & (matched <= j)
            bows = self.uni_bow if j == 1 else self.bow[j]
            score[use] += bows[c[use]]
        return np.where(y >= 0, score, 0.0)

    def known_context(self, history: np.ndarray, x: np.ndarray) -> np.ndarray:
        """For each token of x (after `history`), the length (0 … order − 1) of the longest context
        ending there that the model holds as an n-gram: how much of the context it has seen."""
        seq = self._context_form(np.concatenate([history, x]))
        longest = np.zeros(len(x), dtype=np.int64)
        for j, c in enumerate(self._contexts(seq), 1):
            longest[c[len(history):] >= 0] = j
        return longest

    # -- the LanguageModel interface ----------------------------------------------------------

    def initial_state(self, batch_size: int = 1) -> np.ndarray:
        """No context yet: (batch_size, 0). A `<eos>` token starts a sentence (context `<s>`)."""
        return np.zeros((batch_size, 0), dtype=np.int64)

    def _advance(self, state: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return np.concatenate([state, tokens], axis=1)[:, -(self.order - 1):] if self.order > 1 else state

    def token_log_probs(self, x: Tensor, y: Tensor, state: np.ndarray) -> Tensor:
        """log p(y | context) per position (B, T), float64 natural log; y == −1 gives 0."""
        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        rows = [self._score(state[b], xs[b], ys[b]) for b in range(xs.shape[0])]
        return torch.from_numpy(np.stack(rows) * LN10)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            return self.log_probs(x, self.initial_state(x.shape[0]))[0]
        logp = self.token_log_probs(x, y, self.initial_state(x.shape[0]))
        return -(logp.sum() / (y >= 0).sum()).float()

    def log_probs(self, tokens: Tensor, state: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """The full next-token distribution (B, T, V), float32 natural log, and the advanced state."""
        t = tokens.cpu().numpy()
        out = torch.empty(t.shape[0], t.shape[1], self.vocab_size)
        for b in range(t.shape[0]):
            seq = self._context_form(np.concatenate([state[b], t[b]]))
            ctx = [c[len(state[b]):] for c in self._contexts(seq)]
            out[b] = self._distributions(ctx).float()
        return out, self._advance(state, t)

    def decode_step(self, tokens: Tensor, states: list[np.ndarray]) -> tuple[Tensor, list[np.ndarray]]:
        """One token for each of B sequences, in one vectorised pass: every row's context (at most
        order − 1 tokens, left-padded with −1, which no n-gram holds) in one grid, its n-gram indices
        found for all rows at once, then all B distributions together."""
        t = tokens.cpu().numpy().reshape(-1, 1)
        B, h = len(states), self.order - 1
        advanced = [self._advance(state, t[b:b + 1]) for b, state in enumerate(states)]
        if h == 0:
            return self._distributions([]).float().expand(B, -1), advanced
        grid = np.full((B, h), -1, dtype=np.int64)
        for b, state in enumerate(states):
            row = self._context_form(np.concatenate([state[0], t[b]]))[-h:]
            grid[b, h - len(row):] = row
        # Flattened, a row's n-grams of at most h tokens ending at its last position stay inside the row.
        ctx = [c.reshape(B, h)[:, -1] for c in self._contexts(grid.ravel())]
        return self._distributions(ctx).float(), advanced

    def _explicit(self, j: int, c: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (j + 1)-grams that extend the j-token contexts `c[has]`: for each, the position it belongs to,
        its index in the order-(j + 1) table and its last token."""
        starts, ends = self._children[j + 1][c[has]], self._children[j + 1][c[has] + 1]
        sizes = ends - starts
        rows = np.repeat(has, sizes)
        child = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes) + np.repeat(starts, sizes)
        return rows, child, self.keys[j + 1][child] % self.vocab_size

    def _distributions(self, ctx: list[np.ndarray]) -> Tensor:
        """(P, V) float64 log-probabilities for P positions with contexts `ctx` (see `_contexts`):
        the unigram row, then per context length j its backoff added and its explicit children set."""
        n = len(ctx[0]) if ctx else 1
        dist = self._uni_ln.expand(n, -1).clone()
        for j in range(1, self.order):
            c = ctx[j - 1]
            has = np.flatnonzero(c >= 0)
            if len(has) == 0:
                continue
            bows = self.uni_bow if j == 1 else self.bow[j]
            dist[torch.from_numpy(has)] += torch.from_numpy(bows[c[has]] * LN10)[:, None]
            rows, child, words = self._explicit(j, c, has)
            dist[torch.from_numpy(rows), torch.from_numpy(words)] = torch.from_numpy(self.logp[j + 1][child] * LN10)
        return dist

    def top_next(self, tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k most likely next tokens after each position of `tokens` (B, T), each row read from its own
        start: ids (B, T, k) and their natural-log probabilities (float32), most likely first.

        The rows of `log_probs` without its per-row passes: every token of a row gets the unigram log-probability
        plus the backoff weights of all the row's contexts (one broadcast add), and only the explicit n-grams
        are then set, each with the backoff weights of the contexts longer than its own. Float32, about 3×
        `log_probs`'s speed: distillation asks for every training position."""
        t = tokens.cpu().numpy()
        B, T = t.shape
        ctx = [c.reshape(B, T) for c in self._contexts(self._context_form(t.reshape(-1)))] if self.order > 1 else []
        # A context cannot reach back past its row's start: cut the n-grams the flattening joined across rows.
        for j, c in enumerate(ctx, 1):
            c[:, :j - 1] = -1
        ctx = [c.reshape(-1) for c in ctx]
        bows = [np.where(c >= 0, (self.uni_bow if j == 1 else self.bow[j])[np.maximum(c, 0)], 0.0)
                for j, c in enumerate(ctx, 1)]
        later = np.cumsum([np.zeros(B * T)] + bows[::-1], axis=0)[::-1]  # later[j]: Σ of the bows of contexts > j
        dist = torch.from_numpy((self.uni_logp * LN10).astype(np.float32)).expand(B * T, -1) + \
            torch.from_numpy((later[0] * LN10).astype(np.float32))[:, None]
        for j, c in enumerate(ctx, 1):
            rows, child, words = self._explicit(j, c, np.flatnonzero(c >= 0))
            dist[torch.from_numpy(rows), torch.from_numpy(words)] = torch.from_numpy(
                ((self.logp[j + 1][child] + later[j][rows]) * LN10).astype(np.float32))
        top, ids = dist.topk(k, dim=-1)
        return ids.view(B, T, k), top.view(B, T, k)

    def next_log10(self, context: Sequence[int] | np.ndarray) -> np.ndarray:
        """log10 p(w | context) for every w (V,), float64: the last row of `log_probs` after `context`,
        in numpy for one position (a draft's next-token query costs tens of microseconds, not one ms)."""
        tail = np.asarray(context, dtype=np.int64)[-(self.order - 1):] if self.order > 1 else np.zeros(0, np.int64)
        ctx = [c[-1] for c in self._contexts(self._context_form(tail))] if len(tail) else []
        dist = self.uni_logp.copy()
        for j, c in enumerate(ctx, 1):
            if c < 0:  # a context the model lacks: so are the longer ones that end with it
                break
            dist += (self.uni_bow if j == 1 else self.bow[j])[c]
            start, end = self._children[j + 1][c], self._children[j + 1][c + 1]
            dist[self.keys[j + 1][start:end] % self.vocab_size] = self.logp[j + 1][start:end]
        return dist

    # -- scoring text like KenLM --------------------------------------------------------------

    def sentence_log10(self, ids: Sequence[int] | np.ndarray) -> float:
        """log10 p(`</s>`, ids | `<s>`): one sentence scored as `kenlm.Model.score(…, bos=True, eos=True)`."""
        ids = np.asarray(ids, dtype=np.int64)
        x = np.concatenate([[EOS], ids])
        y = np.concatenate([ids, [EOS]])
        return float(self._score(np.zeros(0, dtype=np.int64), x, y).sum())


# ---------------------------------------------------------------------------------------------
# Estimation


def kn_discounts(n: Sequence[int]) -> tuple[float, float, float] | None:
    """Chen & Goodman's modified Kneser-Ney discounts D1, D2, D3+ from the counts-of-counts
    n = (n1, n2, n3, n4); None when the counts make one undefined or out of its range [0, j]."""
    n1, n2, n3, n4 = (float(v) for v in n)
    if min(n1, n2, n3, n4) == 0:
        return None
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return d if all(0 <= dj <= j for j, dj in enumerate(d, 1)) else None


def sentence_stream(tokens: np.ndarray) -> np.ndarray:
    """The packed stream (documents each followed by `<eos>`) with `<s>` in front of every document."""
    t = np.asarray(tokens, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(t == EOS) + 1])
    return np.insert(t, starts[starts < len(t)], BOS)


def estimate(tokens: np.ndarray, vocab_size: int, order: int, *, discount_fallback: Sequence[float] = (),
             prune: Sequence[int] = ()) -> tuple[NGramLM, BuildReport]:
    """Count the n-grams of a packed token stream and estimate the interpolated modified
    Kneser-Ney model. DataError when an order's discounts cannot be estimated and no
    `discount_fallback` is given."""
    started = time.perf_counter()
    V = vocab_size
    s = sentence_stream(tokens)
    L = len(s)
    if L == 0 or not (s != BOS).any():
        raise DataError("the training split has no tokens to count")
    sid = np.cumsum(s == BOS)
    # idx[k][p]: index of the k-gram ending at position p (−1: it would cross a sentence start).
    idx: dict[int, np.ndarray] = {1: s}
    keys: dict[int, np.ndarray] = {}
    raw: dict[int, np.ndarray] = {1: np.bincount(s, minlength=V)}
    rep: dict[int, np.ndarray] = {}  # a position where each n-gram ends
    for k in range(2, order + 1):
        p = np.arange(k - 1, L)
        p = p[sid[p - k + 1] == sid[p]]
        key = idx[k - 1][p - 1] * V + s[p]
        keys[k], first, inverse, raw[k] = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        idx[k] = np.full(L, -1, dtype=np.int64)
        idx[k][p] = inverse
        rep[k] = p[first]

    # Adjusted counts: distinct left neighbours, except at the top order and after <s>.
    adj: dict[int, np.ndarray] = {order: raw[order]}
    for k in range(1, order):
        suffix = idx[k][rep[k + 1]]  # each (k+1)-gram's last k words
        a = np.bincount(suffix, minlength=len(raw[k]))
        starts_bos = (np.arange(V) == BOS) if k == 1 else (s[rep[k] - k + 1] == BOS)
        a[starts_bos] = raw[k][starts_bos]
        adj[k] = a
    adj[1][list(NOT_PREDICTED)] = 0

    thresholds = [prune[min(k, len(prune) - 1)] if prune else 0 for k in range(order)]
    keep = {k: raw[k] > thresholds[k - 1] for k in range(2, order + 1)}

    discounts, fallback_orders = [], []
    for k in range(1, order + 1):
        a = adj[k] if k > 1 else adj[1][adj[1] > 0]
        coc = np.bincount(np.minimum(a, 5), minlength=6)[1:5]
        d = kn_discounts(coc)
        if d is None:
            if not discount_fallback:
                raise DataError(
                    f"cannot estimate modified Kneser-Ney discounts for {k}-grams: their counts-of-counts n1..n4 "
                    f"are {', '.join(map(str, coc))} (too little or artificial data). Use more text or a lower "
                    f"model.order, or set fallback discounts: --set model.discount_fallback=0.5,1,1.5")
            d = tuple(float(v) for v in discount_fallback)
            fallback_orders.append(k)
        discounts.append(d)

    # Probabilities, order by order (linear scale; interpolated with the order below).
    Dtab = {k: np.array([0.0, *discounts[k - 1]]) for k in range(1, order + 1)}
    a1 = adj[1].astype(np.float64)
    predicted = np.ones(V, dtype=bool)
    predicted[list(NOT_PREDICTED)] = False
    d1 = Dtab[1][np.minimum(adj[1], 3)]
    total = a1.sum()
    gamma0 = d1.sum() / total
    prob = {1: np.where(predicted, (a1 - d1) / total + gamma0 / predicted.sum(), 0.0)}
    bow: dict[int, np.ndarray] = {}
    for k in range(2, order + 1):
        parent = keys[k] // V
        a = adj[k].astype(np.float64)
        d = Dtab[k][np.minimum(adj[k], 3)]
        n_ctx = len(prob[k - 1])
        denom = np.bincount(parent, weights=a, minlength=n_ctx)
        # A pruned n-gram gives its whole count to the backoff, so each context still sums to 1.
        mass = np.bincount(parent, weights=np.where(keep[k], d, a), minlength=n_ctx)
        with np.errstate(divide="ignore", invalid="ignore"):
            gamma = np.where(denom > 0, mass / denom, 1.0)
        suffix = keys[k] % V if k == 2 else idx[k - 1][rep[k]]
        prob[k] = (a - d) / denom[parent] + gamma[parent] * prob[k - 1][suffix]
        bow[k - 1] = gamma

    # Drop pruned n-grams and renumber their parents in the keys of the next order.
    logp = {k: _log10(prob[k]) for k in prob}
    bow_log = {k: _log10(bow[k]) for k in bow}
    for k in range(2, order + 1):
        kept = keep[k]
        if kept.all():
            continue
        renumber = np.cumsum(kept) - 1
        keys[k], logp[k] = keys[k][kept], logp[k][kept]
        if k in bow_log:
            bow_log[k] = bow_log[k][kept]
        if k < order:
            child = keys[k + 1]
            keep[k + 1] = keep[k + 1] & kept[child // V]
            keys[k + 1] = renumber[child // V] * V + child % V
    model = NGramLM(order, V, logp[1], bow_log.get(1, np.zeros(V)),
                    {k: keys[k] for k in range(2, order + 1)}, {k: logp[k] for k in range(2, order + 1)},
                    {k: bow_log[k] for k in range(2, order)})
    report = BuildReport(order=order, tokens=len(tokens), sentences=int(sid[-1]),
                         counts=model.counts(), counted=[int((raw[1] > 0).sum())] + [len(raw[k]) for k in range(2, order + 1)],
                         discounts=discounts, fallback_orders=fallback_orders,
                         seconds=time.perf_counter() - started, peak_rss=peak_rss())
    return model, report


def _log10(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log10(p)
