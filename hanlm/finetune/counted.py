"""The counted taggers (`finetune.tagger: hmm | crf`, and the crf entity tagger of `finetune.task ner`):
trained in one pass over the train split, saved as one
checkpoint (`step-00000001`) with results.json and report.md beside it, in the same run layout as the
neural taggers that the Finetuner (`hanlm.finetune.run`) trains."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from hanlm.checkpoint import save_checkpoint
from hanlm.config import Config, derive
from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.errors import ConfigError
from hanlm.finetune.run import FinetuneResult, write_results
from hanlm.log import RunLogger
from hanlm.runlock import RunLock
from hanlm.tasks.crf import CRFTagger
from hanlm.tasks.hmm import HMMTagger
from hanlm.tasks.ner import EntityTagger, evaluate_entities, read_ner_data
from hanlm.tasks.tagging import evaluate_segmenter, read_tagged_data


def counted_config(cfg: Config) -> Config:
    """The run's config for an hmm or crf tagger: model.task tag (or ner); the model.* network keys are unused."""
    if cfg.finetune.init_from:
        raise ConfigError(f"finetune.tagger {cfg.finetune.tagger} trains from the tagged data alone; drop the "
                          f"checkpoint ({cfg.finetune.init_from}) or use finetune.tagger neural")
    task = "ner" if cfg.finetune.task == "ner" else "tag"
    run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task=task))
    run.derived = derive(run)
    return run


def fit_counted(cfg: Config, echo: Callable[[str], None] = print) -> FinetuneResult:
    """Train an hmm or crf tagger (segmentation, POS) or a crf entity tagger (ner) on the train split, save it,
    and score it on dev and test."""
    cfg = counted_config(cfg)
    run_dir = Path(cfg.finetune.run_dir)
    lock = RunLock(run_dir, "finetune.run_dir").acquire()
    try:
        fit = _fit_entities if cfg.model.task == "ner" else _fit_segmenter
        return fit(cfg, run_dir, echo)
    finally:
        lock.release()


def _crf_progress(cfg: Config, started: float, echo: Callable[[str], None]) -> Callable[[int, float], None]:
    iterations = cfg.finetune.crf_iterations

    def progress(iteration: int, loss: float) -> None:
        if iteration % 10 == 0 or iteration == iterations:
            echo(f"crf: L-BFGS iteration {iteration}/{iterations}, loss {loss:,.0f} "
                 f"({time.monotonic() - started:.0f} s)")
    return progress


def _fit_segmenter(cfg: Config, run_dir: Path, echo: Callable[[str], None]) -> FinetuneResult:
    ft = cfg.finetune
    data = read_tagged_data(cfg)
    ft.labels = data.tags
    echo(f"tag data: {data.summary()}")
    train = data.splits["train"]
    started = time.monotonic()
    if ft.tagger == "hmm":
        tagger = HMMTagger.fit(train, data.tags, ft.tag_scheme, ft.hmm_smoothing)
        tokenizer, weights = tagger.tokenizer, tagger
    else:
        echo(f"crf: training on {len(train):,} sentences ({data.sizes['train']:,} characters)")
        tagger = CRFTagger.fit(train, data.tags, c1=ft.crf_c1, c2=ft.crf_c2, iterations=ft.crf_iterations,
                               progress=_crf_progress(cfg, started, echo))
        tokenizer = train_tokenizer("char", (s.text for s in train))
        weights = tagger.state_dict()
    seconds = time.monotonic() - started
    echo(f"{ft.tagger}: trained in {seconds:.1f} s")
    dev = evaluate_segmenter(tagger.segment, data.splits["dev"], data.vocabulary)
    test = evaluate_segmenter(tagger.segment, data.splits["test"], data.vocabulary)
    results = {"task": "tag", "tagger": ft.tagger, "tag_scheme": ft.tag_scheme}
    return _save_and_report(cfg, run_dir, weights, tokenizer, seconds, results, data, dev, test, echo)


def _fit_entities(cfg: Config, run_dir: Path, echo: Callable[[str], None]) -> FinetuneResult:
    ft = cfg.finetune
    data = read_ner_data(cfg)
    ft.labels = data.tags
    echo(f"ner data: {data.summary()}")
    train = data.splits["train"]
    started = time.monotonic()
    echo(f"crf: training on {len(train):,} texts ({data.sizes['train']:,} characters)")
    tagger = EntityTagger.fit(train, data.tags, ft.ner_scheme, c1=ft.crf_c1, c2=ft.crf_c2,
                              iterations=ft.crf_iterations, progress=_crf_progress(cfg, started, echo))
    seconds = time.monotonic() - started
    echo(f"crf: trained in {seconds:.1f} s")
    dev = evaluate_entities(tagger.entities, data.splits["dev"])
    test = evaluate_entities(tagger.entities, data.splits["test"])
    tokenizer = train_tokenizer("char", (s.text for s in train))
    results = {"task": "ner", "tagger": ft.tagger, "ner_scheme": ft.ner_scheme}
    return _save_and_report(cfg, run_dir, tagger.state_dict(), tokenizer, seconds, results, data, dev, test, echo)


def _save_and_report(cfg: Config, run_dir: Path, weights, tokenizer: Tokenizer, seconds: float, results: dict,
                     data, dev, test, echo: Callable[[str], None]) -> FinetuneResult:
    """One checkpoint (step 1, its dev error as the val loss), results.json and report.md."""
    path = save_checkpoint(str(run_dir / "checkpoints"), weights, cfg, tokenizer, {"step": 1, "train_seconds": seconds},
                           val_loss=1.0 - dev.scores.f1, selected_on="dev", note=echo)
    results |= {"best_checkpoint": path, "steps": 1, "seconds": seconds,
                "data": {"summary": data.summary(), **data.split_sizes()},
                "dev": {**dev.scores.as_dict(), "chars_per_s": dev.chars_per_s},
                "test": {**test.scores.as_dict(), "chars_per_s": test.chars_per_s}}
    quiet = dataclasses.replace(cfg.log, progress=False, tensorboard=False)  # one step: nothing to follow
    logger = RunLogger(run_dir, quiet, total_steps=1, start_step=0, enabled=True)
    with logger:
        logger.eval(1, data.sizes["train"], dev.scores.headline)
        report = write_results(logger, run_dir, results, {"dev": dev.scores, "test": test.scores},
                               data.split_sizes(), {}, cfg)
    return FinetuneResult(run_dir, path, 1, "end", dev.scores, test.scores, report)
