"""The n-gram model's trainer: one counting pass instead of a training loop.

`hanlm train --set model.arch=ngram` lands here. It shares everything else with the neural
runs: the prepared shards, the checkpoint layout (with `model.arpa` for the weights), the
evaluator (BPC on the same val split), the run log and report, and the closing samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hanlm.checkpoint import list_checkpoints, remove_stale, save_checkpoint, set_aside, stored_model_file
from hanlm.config import Config
from hanlm.data.prepare import Prepared, prepare
from hanlm.data.shards import open_split
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import ConfigError
from hanlm.eval import EvalResult, evaluate, split_characters
from hanlm.generate import config_samples
from hanlm.log import RunLogger
from hanlm.models.ngram import BuildReport, estimate
from hanlm.runlock import RunLock
from hanlm.train.loop import TrainResult


def train_ngram(cfg: Config, echo: Callable[[str], None] = print) -> tuple[TrainResult, Prepared]:
    """Count, estimate, evaluate on the whole val split, save a checkpoint and write the report,
    holding the run directory's lock throughout."""
    with RunLock(cfg.train.run_dir):
        return _count(cfg, echo)


def _count(cfg: Config, echo: Callable[[str], None]) -> tuple[TrainResult, Prepared]:
    m = cfg.model
    run_dir = Path(cfg.train.run_dir)
    root = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    neural = [n for n in list_checkpoints(root) if stored_model_file(f"{root.rstrip('/')}/{n}") != "model.arpa"]
    if neural:
        # Its single checkpoint (step 1) would sort before theirs and be pruned, or `latest` mix models.
        raise ConfigError(f"{root} already holds checkpoints of a neural run ({', '.join(neural[-3:])}); give the "
                          f"n-gram model its own run directory, e.g. --set train.run_dir=runs/ngram{m.order}")
    for leftover in remove_stale(root):
        echo(f"removed {leftover}, left half-written by a run that died")
    prepared = prepare(cfg, progress=cfg.log.progress)
    tokenizer = Tokenizer.load(prepared.directory / "tokenizer.json")
    if (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) != (0, 1, 2, 3):
        raise ConfigError(f"the n-gram model keeps <pad> <unk> <bos> <eos> at ids 0–3, and this {tokenizer.kind} "
                          "tokenizer has them elsewhere; count it with a char, bpe or word tokenizer")
    if list_checkpoints(root):  # an earlier count: kept, out of the way of this one's save
        echo(f"note: the earlier n-gram checkpoint in {root} was moved to "
             f"{set_aside(root, list_checkpoints(root), 'earlier')}")
    cfg.save(run_dir / "config.yaml")
    train = np.asarray(open_split(prepared.directory, "train"))
    echo(f"model: ngram, order {m.order}, interpolated modified Kneser-Ney over {tokenizer.vocab_size:,} "
         f"{tokenizer.kind} tokens" + (f"; pruning counts ≤ {m.prune}" if any(m.prune) else ""))
    model, build = estimate(train, tokenizer.vocab_size, m.order, discount_fallback=m.discount_fallback,
                            prune=m.prune)
    echo(build.summary())
    echo("discounts D1 / D2 / D3+ by order: " + "; ".join(
        f"{k}: {' / '.join(f'{d:.3f}' for d in ds)}" for k, ds in enumerate(build.discounts, 1)))
    # No progress bar: there are no steps to count.
    with RunLogger(run_dir, dataclasses.replace(cfg.log, progress=False), total_steps=1) as logger:
        final = evaluate(model, open_split(prepared.directory, "val"), block_size=cfg.train.block_size,
                         batch_size=cfg.eval.batch_size, characters=split_characters(prepared.meta, "val"))
        logger.eval(1, len(train), final.metrics())
        path = save_checkpoint(root, model, cfg, tokenizer,
                               {"step": 1, "tokens": len(train), "build": asdict(build)}, val_loss=final.loss)
        samples = config_samples(model, tokenizer, cfg.generate)
        report = logger.write_report(f"hanlm run: {run_dir}", _sections(cfg, build, final, samples, prepared))
    return TrainResult(run_dir, path, 1, len(train), "counted", final, samples, report), prepared


def _sections(cfg: Config, build: BuildReport, final: EvalResult, samples: list[tuple[str, str]],
              prepared: Prepared) -> dict[str, str]:
    rows = ["| order | n-grams | D1 | D2 | D3+ |", "|---|---|---|---|---|"]
    rows += [f"| {k} | {n:,} | {d[0]:.4f} | {d[1]:.4f} | {d[2]:.4f} |"
             for k, (n, d) in enumerate(zip(build.counts, build.discounts), 1)]
    rows += ["", (f"Built in {build.seconds:.2f} s from {build.tokens:,} tokens ({build.sentences:,} documents); "
                  f"peak RSS {build.peak_rss / 2**30:.2f} GiB.")]
    if build.fallback_orders:
        rows.append(f"Orders {build.fallback_orders} used model.discount_fallback.")
    unigram = prepared.meta["splits"]["val"].get("unigram_bpc")
    return {"Evaluation (whole val split)": final.table(unigram), "N-grams and discounts": "\n".join(rows),
            "Samples": "\n\n".join(f"**{p}**{c}" for p, c in samples),
            "Config": f"```yaml\n{cfg.to_yaml()}```"}
