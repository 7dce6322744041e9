"""Evaluator: loss, perplexity per token and per character, and bits per character (BPC).

BPC is the figure that compares models with different tokenizers (char, BPE, word, n-gram) on the
same text: the total negative log-likelihood in bits divided by the number of characters of
the original text, not by the number of tokens. Each document's `<eos>` counts as one character
(the line break that ends it), the same for every tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hanlm.config import Config
from hanlm.data.offdomain import TextSet, read_text_set
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import DataError
from hanlm.models import LanguageModel
from hanlm.models.masking import Masker


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood per predicted token, in nats
    ppl_token: float
    ppl_char: float
    bpc: float
    tokens: int  # tokens predicted
    characters: float  # characters of text those tokens cover

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The figures a log records: loss, BPC and both perplexities."""
        return {"loss": self.loss, "bpc": self.bpc, "ppl_char": self.ppl_char, "ppl_token": self.ppl_token}

    def table(self, unigram_bpc: float | None = None) -> str:
        """The figures as a Markdown table, for reports; with the split's unigram entropy if known."""
        rows = ["| metric | value |", "|---|---|", f"| val loss (nats/token) | {self.loss:.4f} |",
                f"| val BPC | {self.bpc:.4f} |", f"| val perplexity per character | {self.ppl_char:.2f} |",
                f"| val perplexity per token | {self.ppl_token:.2f} |"]
        if unigram_bpc:
            rows.append(f"| val unigram character entropy (bits) | {unigram_bpc:.4f} |")
        return "\n".join(rows)

    def summary(self) -> str:
        return (f"val loss {self.loss:.4f} | bpc {self.bpc:.4f} | ppl/char {self.ppl_char:.2f} | "
                f"ppl/token {self.ppl_token:.2f} | {self.tokens:,} tokens, {self.characters:,.0f} characters")


@dataclass
class MaskedEvalResult:
    """An encoder's figures on masked text (`evaluate_masked`): bits per character need a model that predicts
    each token from its left, which an encoder is not, so it has none."""

    loss: float  # the pretraining loss per masked token (mlm: cross-entropy; electra: generator + weighted RTD)
    masked_accuracy: float  # mlm: the encoder's; electra: the generator's
    tokens: int  # masked tokens scored
    rtd_accuracy: float | None = None  # electra: the discriminator's, over every position

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.as_dict().items() if k != "tokens"}

    def table(self, unigram_bpc: float | None = None) -> str:
        rows = ["| metric | value |", "|---|---|", f"| val masked loss (nats/masked token) | {self.loss:.4f} |",
                f"| val masked-token accuracy | {self.masked_accuracy:.4f} |"]
        if self.rtd_accuracy is not None:
            rows.append(f"| val replaced-token detection accuracy | {self.rtd_accuracy:.4f} |")
        rows.append("| val BPC | does not apply: an encoder reads both sides of each token |")
        return "\n".join(rows)

    def summary(self) -> str:
        rtd = f" | rtd accuracy {self.rtd_accuracy:.4f}" if self.rtd_accuracy is not None else ""
        return (f"val masked loss {self.loss:.4f} | masked-token accuracy {self.masked_accuracy:.4f}{rtd} | "
                f"{self.tokens:,} masked tokens (BPC does not apply to an encoder)")


def final_eval_scope(cfg: Config) -> str:
    """What a run's final evaluation read, as its report and `hanlm train` name it (an n-gram's count
    always reads the whole split)."""
    cap = cfg.eval.final_max_batches
    if cap is None or cfg.model.arch == "ngram":
        return "whole val split"
    return f"the val split's first {cap} batches: eval.final_max_batches"


@torch.no_grad()
def evaluate_masked(model: LanguageModel, tokens: np.ndarray, masker: Masker, *, block_size: int, batch_size: int,
                    max_batches: int | None = None, seed: int = 0) -> MaskedEvalResult:
    """Mask `tokens` in windows of `block_size` side by side, always the same way (`seed`), and score the
    model's pretraining objective on them: the same positions at every evaluation, so figures compare."""
    device = model.device
    starts = np.arange(0, max(1, len(tokens) - 1), block_size)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    masks = torch.Generator().manual_seed(seed)
    loss = correct = rtd = 0.0
    count = positions = 0
    was_training = model.training
    model.eval()
    # ELECTRA samples its replacements from torch's generator: draw them from a fixed one, and leave the
    # training run's own random state as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for i in range(0, len(starts), batch_size):
                x, _ = _windows(tokens, starts[i:i + batch_size], block_size)
                inputs, targets = masker(x, masks)
                n = int(targets.ne(-1).sum())
                if n == 0:
                    continue
                inputs, targets = inputs.to(device), targets.to(device)
                batch_loss = float(model(inputs, targets))
                last = getattr(model, "last", None)
                if last is not None:  # electra: the generator's accuracy is not its loss's by-product here
                    rtd += last["rtd_accuracy"] * x.numel()
                    positions += x.numel()
                    correct += _generator_hits(model, inputs, targets)
                else:
                    correct += int((model(inputs).argmax(-1) == targets).sum())
                loss += batch_loss * n
                count += n
        finally:
            model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: no token of the split could be masked")
    return MaskedEvalResult(loss / count, correct / count, count, rtd / positions if positions else None)


def _generator_hits(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """How many masked tokens an ELECTRA generator puts first."""
    masked = targets.ne(-1)
    g = model.generator(model.discriminator.tok_emb(inputs))[masked]
    return int((torch.nn.functional.linear(g, model.discriminator.tok_emb.weight).argmax(-1) == targets[masked]).sum())


def split_characters(meta: dict[str, Any], split: str) -> int:
    """Characters of a prepared split, counting each document's <eos> as one."""
    s = meta["splits"][split]
    return s["characters"] + s["documents"]


def evaluate(model: LanguageModel, tokens: np.ndarray, *, block_size: int, batch_size: int, characters: int,
             max_batches: int | None = None, autocast_dtype: torch.dtype | None = None,
             stride: int | None = None) -> EvalResult:
    """Score `tokens` (a whole split), each token predicted once, in windows of `block_size`.

    Without `stride` the windows follow each other, so a token's context is what precedes it in
    its window (on average half a window). With `stride` (at most block_size) the windows slide
    by `stride` tokens and each scores only its last `stride` positions (the first window all of
    them): every token but the first block_size sees at least block_size − stride tokens of context.
    `characters` is the text length of the whole split (see `split_characters`); when
    `max_batches` stops early, the characters covered are prorated by the tokens scored.
    A model's own `eval_block_size` (the n-gram's: its context is short) replaces block_size and stride.
    """
    nll, predicted = 0.0, 0
    for picked in token_scores(model, tokens, block_size=block_size, batch_size=batch_size, max_batches=max_batches,
                               autocast_dtype=autocast_dtype, stride=stride):
        nll -= picked.sum().item()
        predicted += len(picked)
    if predicted == 0:
        raise ValueError("nothing to evaluate: the split has fewer than 2 tokens")
    covered = characters * predicted / (len(tokens) - 1)
    return EvalResult(loss=nll / predicted, ppl_token=perplexity(nll / predicted),
                      ppl_char=perplexity(nll / covered), bpc=nll / covered / math.log(2), tokens=predicted, characters=covered)


@torch.no_grad()
def token_scores(model: LanguageModel, tokens: np.ndarray, *, block_size: int, batch_size: int,
                 max_batches: int | None = None, autocast_dtype: torch.dtype | None = None,
                 stride: int | None = None) -> Iterator[torch.Tensor]:
    """The log-probabilities (natural log, float64, CPU) of the tokens `evaluate` scores, batch by
    batch in text order: tokens[1], tokens[2], … (see `evaluate` for the windows)."""
    if model.eval_block_size:
        block_size = stride = model.eval_block_size
    stride = stride or block_size
    if not 0 < stride <= block_size:
        raise ValueError(f"the evaluation stride must be between 1 and the window ({block_size}), got {stride}")
    device = model.device
    n = len(tokens)
    # Window i starts at i × stride; the last one is the first that reaches the split's last token.
    windows = 1 + max(0, -(-(n - 1 - block_size) // stride))
    starts = np.arange(windows) * stride if n > 1 else np.zeros(0, dtype=np.int64)
    if max_batches is not None:
        starts = starts[: max_batches * batch_size]
    was_training = model.training
    model.eval()
    amp = torch.autocast(device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    try:
        for i in range(0, len(starts), batch_size):
            x, y = _windows(tokens, starts[i:i + batch_size], block_size)  # (B, T), (B, T) with -1 padding
            y[torch.from_numpy(starts[i:i + batch_size] > 0), :block_size - stride] = -1  # scored by the previous
            x, y = x.to(device), y.to(device)
            with amp:
                picked = model.token_log_probs(x, y, model.initial_state(x.shape[0]))  # (B, T)
            yield picked.double().cpu()[(y >= 0).cpu()]
    finally:
        model.train(was_training)


def perplexity(nats: float) -> float:
    """exp(nats) for a loss in nats, inf where that is beyond a float (a diverged model's loss), instead of OverflowError."""
    return math.exp(nats) if nats < _EXP_LIMIT else math.inf


_EXP_LIMIT = math.log(sys.float_info.max)


def _windows(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for windows starting at `starts`; the split's last window is padded
    (input 0, target -1: ignored)."""
    x = np.zeros((len(starts), T), dtype=np.int64)
    y = np.full((len(starts), T), -1, dtype=np.int64)
    for row, s in enumerate(starts):
        seg = np.asarray(tokens[s:s + T + 1], dtype=np.int64)
        x[row, : len(seg) - 1] = seg[:-1]
        y[row, : len(seg) - 1] = seg[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


def evaluate_text_set(model: LanguageModel, text: TextSet, tokenizer: Tokenizer, *, block_size: int,
                      batch_size: int, stride: int | None = None,
                      autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Score `model` on a set of texts (`hanlm.data.offdomain`: the off-domain text) with `evaluate`: the texts
    packed as prepare packs documents (each followed by <eos>), BPC per character of them."""
    return evaluate(model, text.encode(tokenizer), block_size=block_size, batch_size=batch_size,
                    characters=text.characters, stride=stride, autocast_dtype=autocast_dtype)


def evaluate_checkpoint(spec: str, data: list[str] | None = None, device: str | None = None,
                        stride: int | None = None, distinct: bool = False,
                        texts: int = 0) -> EvalResult | MaskedEvalResult:
    """Evaluate a checkpoint on its run's val split, or on the documents of `data` sources, in windows
    of its train.block_size sliding by `stride` (default: its eval.stride; see `evaluate`); an encoder on
    its masked objective (`evaluate_masked`). With `distinct`, each distinct document of `data` is scored
    once, in first-seen order (`texts` of them evenly spaced; 0: all): the off-domain figure."""
    from hanlm.loading import load_for_inference
    from hanlm.data.reader import DocumentReader

    if distinct and not data:
        raise DataError("--distinct scores the distinct texts of --data sources; give --data (e.g. --data "
                        "chn-reviews), or leave --distinct out to score the val split")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, tokenizer = load_for_inference(spec, device)
    if stride is not None and not 0 < stride <= cfg.train.block_size:
        raise DataError(f"--stride {stride}: the windows of {spec} are {cfg.train.block_size} tokens (its "
                        f"train.block_size); choose a stride from 1 to {cfg.train.block_size}")
    if data and distinct:
        text = read_text_set(data, cfg.data, texts, option="--data", count_option="--off-domain-texts")
        tokens, characters = text.encode(tokenizer), text.characters
    elif data:
        docs = list(DocumentReader(data, cfg.data))
        tokens, characters = tokenizer.encode_documents(docs), sum(map(len, docs)) + len(docs)
    else:
        tokens, characters = prepared_split(cfg, tokenizer, "val")
    if not model.generates:  # an encoder: its masked objective on the text, the same masks every time
        masker = Masker(cfg.train.mask_rate, tokenizer.vocab_size, tokenizer, cfg.train.mask_whole_words)
        return evaluate_masked(model, tokens, masker, block_size=cfg.train.block_size, batch_size=cfg.eval.batch_size)
    return evaluate(model, tokens, block_size=cfg.train.block_size, batch_size=cfg.eval.batch_size,
                    characters=characters, autocast_dtype=torch.bfloat16 if device == "cuda" else None,
                    stride=stride or cfg.eval.stride)


def prepared_split(cfg: Config, tokenizer: Tokenizer, split: str) -> tuple[np.ndarray, int]:
    """A run's `split` (train or val) encoded with the checkpoint's tokenizer, and its characters."""
    from hanlm.data.shards import open_split

    directory, meta = prepared_for(cfg, tokenizer)
    return open_split(directory, split), split_characters(meta, split)


def prepared_for(cfg: Config, tokenizer: Tokenizer) -> tuple[Path, dict]:
    """The directory and meta.json of a run's data encoded with the checkpoint's tokenizer: the prepared
    shards when their tokenizer is that one, else the data prepared anew with it."""
    from hanlm.data.corpora import hanlm_home
    from hanlm.data.prepare import default_dir, prepare
    from hanlm.data.shards import read_meta

    directory = Path(cfg.data.prepared_dir or default_dir(cfg))
    fingerprint = tokenizer.fingerprint()
    try:
        meta = read_meta(directory)
        if meta.get("tokenizer_hash") == fingerprint:
            return directory, meta
    except DataError:
        pass
    saved = hanlm_home() / "tokenizers" / f"{fingerprint}.json"
    if not saved.exists():
        tokenizer.save(saved)
    cfg = dataclasses.replace(
        cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(saved)),
        data=dataclasses.replace(cfg.data, prepared_dir=str(hanlm_home() / "prepared" / f"eval-{fingerprint[:16]}")))
    prepared = prepare(cfg, progress=False)
    return prepared.directory, prepared.meta
