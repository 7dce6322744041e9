"""Taggers as checkpoints: training the counted ones (hmm, crf), loading any tagger, segmenting files.

`hanlm finetune --task tag` trains every tagger into the same run layout: neural taggers through
the Finetuner (`hanlm.tasks.finetune`), hmm and crf here, in one pass over the train split, each
saved as one checkpoint (`step-00000001`) with results.json and report.md beside it. A tagger
checkpoint is a checkpoint like any other (config.yaml with model.task tag and finetune.tagger,
tokenizer.json, model.safetensors, the manifest), so `load_tagger` reads every kind.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hanlm.checkpoint import Checkpoint, load_checkpoint, load_weights, resolve_served, save_checkpoint
from hanlm.config import Config, derive
from hanlm.data.tagged import TaggedSentence, read_tagged, text_lines
from hanlm.data.tokenizer import Tokenizer, train_tokenizer
from hanlm.errors import CheckpointError, ConfigError
from hanlm.log import RunLogger
from hanlm.runlock import RunLock
from hanlm.tasks.finetune import FinetuneResult, write_results
from hanlm.tasks.metrics import SegmentationScores
from hanlm.tasks.tagging import Tagger, evaluate_segmenter, read_tagged_data


@dataclass
class LoadedTagger:
    tagger: Tagger
    config: Config
    tokenizer: Tokenizer
    path: str

    @property
    def description(self) -> str:
        ft = self.config.finetune
        kind = f"neural ({self.config.model.arch}, {ft.tag_head} head)" if ft.tagger == "neural" else ft.tagger
        return f"{kind} tagger, scheme {ft.tag_scheme}, {len(ft.labels)} tags"


def tagger_of(ckpt: Checkpoint, device: str | torch.device = "cpu") -> Tagger:
    """The tagger a checkpoint of model.task tag holds."""
    ft = ckpt.config.finetune
    if ckpt.config.model.task != "tag":
        raise CheckpointError(f"{ckpt.path} is not a tagger (model.task {ckpt.config.model.task}): train one with "
                              "`hanlm finetune --task tag`")
    if not ft.labels:
        raise CheckpointError(f"{ckpt.path}/config.yaml lists no tags (finetune.labels)")
    if ft.tagger == "crf":
        from hanlm.tasks.crf import CRFTagger

        return CRFTagger.from_weights(ft.labels, ckpt.weights, f"{ckpt.path}/model.safetensors")
    if ft.tagger == "hmm":
        from hanlm.tasks.hmm import HMMTagger

        model = HMMTagger(ft.labels, ckpt.tokenizer)
        load_weights(model, ckpt.weights, ckpt.path)
        return model
    from hanlm.tasks.neural_tagger import NeuralTagger, build_tagger_network

    network = build_tagger_network(ckpt.config, ckpt.tokenizer.vocab_size)
    load_weights(network, ckpt.weights, ckpt.path)
    return NeuralTagger(network.to(device).eval(), ckpt.tokenizer, ft.labels, ft.max_length)


def load_tagger(spec: str, device: str | torch.device = "cpu") -> LoadedTagger:
    """The tagger in a checkpoint of `hanlm finetune --task tag` (a step directory, or its checkpoints or
    run directory: then the best by dev F1)."""
    ckpt = load_checkpoint(resolve_served(spec), device)
    return LoadedTagger(tagger_of(ckpt, device), ckpt.config, ckpt.tokenizer, ckpt.path)


def counted_config(cfg: Config) -> Config:
    """The run's config for an hmm or crf tagger: model.task tag; the model.* network keys are unused."""
    if cfg.finetune.init_from:
        raise ConfigError(f"finetune.tagger {cfg.finetune.tagger} trains from the tagged data alone; drop the "
                          f"checkpoint ({cfg.finetune.init_from}) or use finetune.tagger neural")
    run = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task="tag"))
    run.derived = derive(run)
    return run


def fit_counted(cfg: Config, echo: Callable[[str], None] = print) -> FinetuneResult:
    """Train an hmm or crf tagger on the train split, save it, and score it on dev and test."""
    cfg = counted_config(cfg)
    ft = cfg.finetune
    run_dir = Path(ft.run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        data = read_tagged_data(cfg)
        ft.labels = data.tags
        echo(f"tag data: {data.summary()}")
        train = data.splits["train"]
        started = time.monotonic()
        if ft.tagger == "hmm":
            from hanlm.tasks.hmm import HMMTagger

            tagger = HMMTagger.fit(train, data.tags, ft.tag_scheme, ft.hmm_smoothing)
            tokenizer, weights = tagger.tokenizer, tagger
        else:
            from hanlm.tasks.crf import CRFTagger

            def progress(iteration: int, loss: float) -> None:
                if iteration % 10 == 0 or iteration == ft.crf_iterations:
                    echo(f"crf: L-BFGS iteration {iteration}/{ft.crf_iterations}, loss {loss:,.0f} "
                         f"({time.monotonic() - started:.0f} s)")

            echo(f"crf: training on {len(train):,} sentences ({data.sizes['train']:,} characters)")
            tagger = CRFTagger.fit(train, data.tags, c1=ft.crf_c1, c2=ft.crf_c2, iterations=ft.crf_iterations,
                                   progress=progress)
            tokenizer = train_tokenizer("char", (s.text for s in train))
            weights = tagger.state_dict()
        seconds = time.monotonic() - started
        echo(f"{ft.tagger}: trained in {seconds:.1f} s")
        dev = evaluate_segmenter(tagger.segment, data.splits["dev"], data.vocabulary)
        test = evaluate_segmenter(tagger.segment, data.splits["test"], data.vocabulary)
        state = {"step": 1, "train_seconds": seconds}
        path = save_checkpoint(str(run_dir / "checkpoints"), weights, cfg, tokenizer, state,
                               val_loss=1.0 - dev.scores.f1, note=echo)
        results = {"task": "tag", "tagger": ft.tagger, "tag_scheme": ft.tag_scheme, "best_checkpoint": path,
                   "steps": 1, "seconds": seconds, "data": {"summary": data.summary(), **data.split_sizes()},
                   "dev": {**dev.scores.as_dict(), "chars_per_s": dev.chars_per_s},
                   "test": {**test.scores.as_dict(), "chars_per_s": test.chars_per_s}}
        quiet = dataclasses.replace(cfg.log, progress=False, tensorboard=False)  # one step: nothing to follow
        logger = RunLogger(run_dir, quiet, total_steps=1, start_step=0, enabled=True)
        with logger:
            logger.eval(1, data.sizes["train"], dev.scores.headline)
            report = write_results(logger, run_dir, results, {"dev": dev.scores, "test": test.scores},
                                   data.split_sizes(), {}, cfg)
        return FinetuneResult(run_dir, path, 1, "end", dev.scores, test.scores, report)
    finally:
        lock.release()


def segment_file(loaded: LoadedTagger, sources: list[str], fmt: str = "words", *, gold: bool = False,
                 batch: int = 256) -> tuple[Iterator[TaggedSentence], Callable[[], SegmentationScores | None]]:
    """Segment every line of `sources` (read with the tagger's data.* settings). With `gold`, the files
    are read as tagged text in format `fmt` and scored; else each line is raw text. Returns the
    predicted sentences (lazily, in order) and a function giving the scores once they are consumed."""
    scores = SegmentationScores() if gold else None

    def texts() -> Iterator[TaggedSentence]:
        if gold:
            yield from read_tagged(sources, loaded.config.data, fmt)
            return
        for src, number, line in text_lines(sources, loaded.config.data):
            if line.strip():
                yield TaggedSentence([line], None, f"{src.url}:{number}")

    def predicted() -> Iterator[TaggedSentence]:
        source = texts()
        while chunk := list(itertools.islice(source, batch)):
            for g, p in zip(chunk, loaded.tagger.segment([s.text if gold else s.words[0] for s in chunk])):
                if scores is not None:
                    scores.add(g.words, p.words, frozenset(), g.tags, p.tags)
                p.where = g.where
                yield p

    return predicted(), lambda: scores
