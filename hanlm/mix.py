"""`hanlm mix`: a neural checkpoint and an n-gram checkpoint combined into one model.

    hanlm mix runs/default runs/ngram5 --out runs/mix     # tune the weights, write runs/mix/mixture.json
    hanlm eval runs/mix                                   # then use it like any checkpoint

The weights are tuned on the prepared data's `tune` split (data.tune_fraction of the training
sources' documents, by hash), which neither part trained on and which is not the val split: the
weights are fitted on text as new to both as the val text is (at most `tune_tokens` of it). Data
prepared without a tune split falls back to the last `tune_tokens` tokens of the train split with
the n-gram re-estimated without them (same order, discounts and pruning; seconds); the neural
model trained on that text, which biases the weight towards it, and the output says so.

`mixture.json` holds the weights and the two parts' paths with the digest of their manifests:
the parts stay where they are, and loading refuses a part that has changed since the tuning.

Beside the val split, the parts and the mixture are scored on off-domain text (`--off-domain`, default the
distinct texts of the built-in chn-reviews product reviews, an evenly spaced `--off-domain-texts` of them):
how much each model's gain holds on text unlike its training data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hanlm.atomic import atomic_write_text
from hanlm.checkpoint import Checkpoint
from hanlm.config import Config
from hanlm.errors import CheckpointError, HanlmError
from hanlm.data.offdomain import OFF_DOMAIN, OFF_DOMAIN_TEXTS, TextSet, read_text_set
from hanlm.eval import EvalResult, evaluate, evaluate_text_set, prepared_for, prepared_split, token_scores
from hanlm.loading import model_of, open_checkpoint, require_language_model, resolve_served
from hanlm.mixture_file import MIXTURE_FILE, MIXTURE_FORMAT, is_mixture, manifest_digest
from hanlm.models.mixture import MixtureLM, fit_weights, mixed_nats
from hanlm.data.shards import open_split
from hanlm.models.ngram import NGramLM, estimate
from hanlm.train.ngram import train_ngram



@dataclass
class MixReport:
    """What tuning found: the weights, and held-out nats per token of each part and the mixture."""

    weights: list[float]
    bucket_tokens: list[int]
    tune_tokens: int
    nats: dict[str, float]  # neural, ngram (re-estimated without the held-out text), mixture
    names: dict[str, str] = field(default_factory=dict)  # what each row is
    val: dict[str, EvalResult] | None = None  # the same three on the val split, when evaluated
    unigram_bpc: float | None = None  # the val split's unigram character entropy
    protocol: str = ""
    off_domain: dict[str, EvalResult] | None = None  # the same three on the off-domain text, when evaluated
    off_domain_text: str = ""  # what that text was (spec, distinct texts, characters)

    def table(self) -> str:
        """One row per model: held-out training nats/token, val BPC and perplexity per character, and
        off-domain BPC."""
        rows = ["| model | tuning text (nats/token) | val BPC | val perplexity per character | off-domain BPC |",
                "|---|---|---|---|---|"]
        if self.unigram_bpc:
            rows.append(f"| unigram character entropy | | {self.unigram_bpc:.4f} | {2 ** self.unigram_bpc:.1f} | — |")
        for name in ("ngram", "neural", "mixture"):
            v = self.val[name] if self.val else None
            o = self.off_domain[name] if self.off_domain else None
            rows.append(f"| {self.names.get(name, name)} | {self.nats[name]:.4f} | {f'{v.bpc:.4f}' if v else '—'} | "
                        f"{f'{v.ppl_char:.2f}' if v else '—'} | {f'{o.bpc:.4f}' if o else '—'} |")
        return ("\n".join(rows) + (f"\n\nProtocol: {self.protocol}." if self.protocol else "") +
                (f"\n\nOff-domain text: {self.off_domain_text}, scored in the same windows."
                 if self.off_domain_text else ""))


def build_mixture(neural_spec: str, ngram_spec: str | None, out: str | Path, *, order: int = 5, buckets: bool = True,
                  tune_tokens: int = 100_000, evaluate_val: bool = True, device: str = "cpu",
                  off_domain: str | None = OFF_DOMAIN, off_domain_texts: int = OFF_DOMAIN_TEXTS,
                  echo: Callable[[str], None] = print) -> MixReport:
    """Tune the mixture of the two checkpoints and write `out`/mixture.json; with `evaluate_val`
    also score the parts and the mixture on the neural run's val split, and on the distinct texts of
    `off_domain` (None: not), `off_domain_texts` of them evenly spaced (0: all). Without `ngram_spec`, an
    n-gram of `order` is first counted on the neural run's prepared data into `out`/ngram<order>."""
    _check_out(Path(out))
    if off_domain_texts < 0:  # refused before any work
        raise HanlmError(f"--off-domain-texts must be 0 (every distinct text) or a positive number of texts, got "
                         f"{off_domain_texts}")
    neural_path = _part_path(neural_spec)
    neural_ckpt = require_language_model(open_checkpoint(neural_path, device))
    other: TextSet | None = None
    if evaluate_val and off_domain is not None:  # read (and refused) before the n-gram is counted
        other = read_text_set(off_domain, neural_ckpt.config.data, off_domain_texts)
    ngram_path = _part_path(ngram_spec) if ngram_spec else count_ngram(neural_ckpt.config, order, Path(out), echo)
    ngram_ckpt = open_checkpoint(ngram_path)
    _check_parts(neural_ckpt, ngram_ckpt)
    neural, cfg, tokenizer = model_of(neural_ckpt, device), neural_ckpt.config, neural_ckpt.tokenizer
    held, leave_out = _tuning_text(cfg, tokenizer, ngram_ckpt, tune_tokens, echo)
    x, y = held[:-1], held[1:]
    neural_lp = torch.cat(list(token_scores(neural, held, block_size=cfg.train.block_size,
                                            batch_size=cfg.eval.batch_size))).numpy()
    ngram_lp = leave_out.token_log_probs(torch.from_numpy(x)[None], torch.from_numpy(y)[None],
                                         leave_out.initial_state(1))[0].numpy()
    order = ngram_ckpt.ngram.order
    bucket = leave_out.known_context(np.zeros(0, dtype=np.int64), x) if buckets else np.zeros(len(x), np.int64)
    weights, counts = fit_weights(neural_lp, ngram_lp, bucket, order if buckets else 1)
    report = MixReport(weights, counts, len(y), {"neural": float(-neural_lp.mean()), "ngram": float(-ngram_lp.mean()),
                                                 "mixture": mixed_nats(neural_lp, ngram_lp, bucket, weights)},
                       names={"neural": f"{cfg.model.arch} ({neural_path})",
                              "ngram": f"{order}-gram ({ngram_path})"})
    write_mixture(out, neural_path, ngram_path, report)
    echo("neural weight by the n-gram's longest known context (tokens): " + ", ".join(
        f"{k}: {w:.3f} ({n:,} tokens)" for k, (w, n) in enumerate(zip(weights, counts))) if buckets
         else f"neural weight {weights[0]:.3f}")
    if evaluate_val:
        report.unigram_bpc = prepared_for(cfg, tokenizer)[1]["splits"]["val"].get("unigram_bpc")
        report.protocol = (f"the whole val split, each token scored once: {cfg.model.arch} and mixture in windows of "
                           f"{cfg.train.block_size} tokens" + (f" sliding by {cfg.eval.stride}" if cfg.eval.stride
                                                               else " side by side") +
                           f"; the n-gram in windows of {ngram_ckpt.ngram.eval_block_size:,} (it reads "
                           f"{order - 1} tokens of context)")
        val, characters = prepared_split(cfg, tokenizer, "val")
        mixture = MixtureLM(neural, ngram_ckpt.ngram.eval(), weights)
        report.val = {name: evaluate(model, val, block_size=cfg.train.block_size, batch_size=cfg.eval.batch_size,
                                     characters=characters, stride=cfg.eval.stride)
                      for name, model in (("neural", neural), ("ngram", ngram_ckpt.ngram), ("mixture", mixture))}
        if other is not None:
            echo(f"scoring the three on off-domain text: {other.describe()} ...")
            report.off_domain_text = other.describe()
            report.off_domain = {name: evaluate_text_set(model, other, tokenizer, block_size=cfg.train.block_size,
                                                         batch_size=cfg.eval.batch_size, stride=cfg.eval.stride)
                                 for name, model in (("neural", neural), ("ngram", ngram_ckpt.ngram),
                                                     ("mixture", mixture))}
    return report


def _tuning_text(cfg: Config, tokenizer, ngram_ckpt, tune_tokens: int,
                 echo: Callable[[str], None]) -> tuple[np.ndarray, NGramLM]:
    """The tokens the weights are fitted on, and the n-gram that scores them: the prepared data's tune split
    (data.tune_fraction), which neither part trained on, with the n-gram as it is; else, for data prepared
    without one, the last `tune_tokens` of the train split with the n-gram re-estimated without them — but the
    neural model did train on them, so its weight comes out too high (the output says so)."""
    directory, meta = prepared_for(cfg, tokenizer)
    if "tune" in meta["splits"]:
        held = np.asarray(open_split(directory, "tune"), dtype=np.int64)[:tune_tokens]
        echo(f"tuning on {len(held):,} tokens of the tune split (data.tune_fraction: text neither part trained on) ...")
        return held, ngram_ckpt.ngram
    train = np.asarray(open_split(directory, "train"), dtype=np.int64)
    cut = _heldout_start(train, tune_tokens, tokenizer.eos_id)
    m = ngram_ckpt.config.model
    echo(f"no tune split in {directory} (data.tune_fraction is 0, or too little data): tuning on the last "
         f"{len(train) - cut:,} tokens of the train split, which the neural model trained on, so its weight comes out "
         f"too high; re-estimating the {ngram_ckpt.ngram.order}-gram without them ...")
    leave_out, _ = estimate(train[:cut], tokenizer.vocab_size, ngram_ckpt.ngram.order,
                            discount_fallback=m.discount_fallback, prune=m.prune)
    return train[cut:], leave_out


def count_ngram(cfg: Config, order: int, out: Path, echo: Callable[[str], None]) -> str:
    """Count an n-gram of `order` on the prepared data of the neural run whose config is `cfg` (so
    with its tokenizer) into `out`/ngram<order>; return its checkpoint."""
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, arch="ngram", order=order),
        train=dataclasses.replace(cfg.train, run_dir=str(out / f"ngram{order}")),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=None),
        log=dataclasses.replace(cfg.log, progress=False, tensorboard=False))
    result, _ = train_ngram(cfg, echo=lambda _: None)
    echo(f"counted a {order}-gram on the same data: val BPC {result.final_eval.bpc:.4f} ({result.checkpoint})")
    return result.checkpoint


def _check_out(out: Path) -> None:
    """The mixture gets a directory of its own: in a run or checkpoint directory its mixture.json would
    make `hanlm eval DIR` mean the mixture instead of the checkpoints there."""
    if (out / "checkpoints").is_dir() or any(out.glob("step-*")) or any(out.glob("model.*")):
        raise HanlmError(f"--out {out} holds checkpoints; give the mixture a directory of its own, e.g. {out / 'mix'}")


def _part_path(spec: str) -> str:
    if is_mixture(spec):
        raise CheckpointError(f"{spec} is itself a mixture; mix a neural checkpoint with an n-gram checkpoint")
    return resolve_served(spec)


def _check_parts(neural: Checkpoint, ngram: Checkpoint) -> None:
    """One neural part, one n-gram part, one tokenizer: errors that name the files."""
    if neural.ngram is not None:
        raise CheckpointError(f"{neural.path} is an n-gram checkpoint; the first part must be a neural one (gpt or "
                              "lstm), the second the n-gram")
    if ngram.ngram is None:
        raise CheckpointError(f"{ngram.path} is a {ngram.config.model.arch} checkpoint; the second part must be an "
                              "n-gram (hanlm train --set model.arch=ngram)")
    if neural.tokenizer.fingerprint() != ngram.tokenizer.fingerprint():
        raise CheckpointError(f"the parts use different tokenizers: {neural.path}/tokenizer.json "
                              f"({neural.tokenizer.kind}, {neural.tokenizer.vocab_size:,} tokens) and "
                              f"{ngram.path}/tokenizer.json ({ngram.tokenizer.kind}, {ngram.tokenizer.vocab_size:,} "
                              "tokens); train the n-gram on the neural run's prepared data (the same tokenizer)")


def _heldout_start(train: np.ndarray, tokens: int, eos: int) -> int:
    """Where the held-out tail starts: just after the last `<eos>` at least `tokens` from the end."""
    if len(train) < 4 * tokens:
        raise HanlmError(f"the train split has {len(train):,} tokens, too few to hold out {tokens:,} for tuning "
                         "(at most a quarter); lower --tune-tokens")
    ends = np.flatnonzero(train[: len(train) - tokens] == eos)
    return int(ends[-1]) + 1 if len(ends) else len(train) - tokens


def write_mixture(out: str | Path, neural: str, ngram: str, report: MixReport) -> Path:
    """Write `out`/mixture.json atomically; local part paths are stored absolute."""
    def where(p: str) -> str:
        return p if "://" in p else str(Path(p).resolve())

    path = Path(out) / MIXTURE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": MIXTURE_FORMAT,
              "neural": {"path": where(neural), "manifest_sha256": manifest_digest(neural)},
              "ngram": {"path": where(ngram), "manifest_sha256": manifest_digest(ngram)},
              "weights": report.weights, "bucket_tokens": report.bucket_tokens,
              "tuned_on": {"tokens": report.tune_tokens, "text": "the tail of the neural run's train split"},
              "heldout_nats": report.nats}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def summary(report: MixReport) -> str:
    """The report's table, and how far the mixture's val (and off-domain) BPC is below the better part's."""
    gain = ""
    for what, results in (("val", report.val), ("off-domain", report.off_domain)):
        if results:
            best = min(results["neural"].bpc, results["ngram"].bpc)
            gain += (f"\nthe mixture's {what} BPC is {100 * (1 - results['mixture'].bpc / best):.1f}% below the "
                     "better part's")
    return report.table() + gain
