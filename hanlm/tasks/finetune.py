"""`hanlm finetune`: train a classification head (and the whole network under it) on labelled text.

The run starts from a pretrained gpt or lstm checkpoint (finetune.init_from), whose model.*,
tokenizer and data.* normalisation it keeps; with finetune.from_scratch the same shape and
tokenizer start from random weights instead. It reads and splits the labelled data
(`hanlm.tasks.labelled`), trains with AdamW on a warm-up + cosine schedule, evaluates the dev
split every finetune.eval_every_steps steps and checkpoints there; the checkpoint with the best
dev accuracy is the result, and only it is scored on the test split, once, at the end.

Distributed like training: `--nproc N` runs DDP (dist.sync full), each worker taking its share
of every global batch. A resumed run is exact: the batch order follows from the seed and the
step, and the optimizer and RNG states are checkpointed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hanlm.atomic import atomic_write_text
from hanlm.checkpoint import (
    STATE_FILE,
    Checkpoint,
    load_checkpoint,
    load_weights,
    read_best,
    remove_stale,
    require_language_model,
    resolve_checkpoint,
    save_checkpoint,
)
from hanlm.config import Config, config_options, derive, load_config
from hanlm.errors import CheckpointError, ConfigError, HanlmError
from hanlm.log import METRICS_FILE, RunLogger, line_plot, read_metrics
from hanlm.runlock import RunLock
from hanlm.tasks.classifier import SequenceClassifier, build_classifier
from hanlm.tasks.labelled import collate, encode_texts, read_labelled
from hanlm.tasks.metrics import ClassificationScores
from hanlm.tasks.predict import rows_probabilities
from hanlm.train.autobatch import MemoryProbe, largest_fitting
from hanlm.train.distributed import (
    agreed_reason,
    all_reduce_mean,
    barrier,
    broadcast_from_main,
    env_info,
    gather_to_main,
    rng_state,
    run_worker,
    set_rng_state,
    setup_worker,
)
from hanlm.train.loop import autocast_dtype, find_resume, set_earlier_aside, stop_on_signals
from hanlm.train.optim import _roles, scheduled_lr, set_lr

RESULTS_FILE = "results.json"
BUCKET_BATCHES = 50  # batches whose texts are sorted by length together: little padding, order still random


@dataclass
class FinetuneResult:
    run_dir: Path
    checkpoint: str  # the best checkpoint by dev accuracy
    step: int
    stopped_by: str  # end | signal | stop_after
    dev: ClassificationScores | None = None
    test: ClassificationScores | None = None
    report: Path | None = None


def finetune_config(cfg: Config, source: Checkpoint) -> Config:
    """The run's config: `cfg` with the pretrained checkpoint's model (task classify), tokenizer and
    data normalisation, which the classifier must share with it."""
    if source.ngram is not None:
        raise ConfigError(f"finetune.init_from {source.path} is an n-gram model, which has no hidden states to "
                          "classify from; start from a gpt or lstm checkpoint")
    require_language_model(source)
    model = dataclasses.replace(source.config.model, vectors=None, task="classify", dropout=cfg.finetune.dropout)
    run = dataclasses.replace(cfg, model=model, tokenizer=source.config.tokenizer, data=source.config.data)
    limit = model.context_length if model.arch == "gpt" else None
    if limit is not None and cfg.finetune.max_length > limit:
        raise ConfigError(f"finetune.max_length ({cfg.finetune.max_length}) is above the model's context_length "
                          f"({limit}); lower finetune.max_length")
    if cfg.dist.sync != "full" or cfg.dist.shard != "none":
        raise ConfigError("hanlm finetune synchronises workers with DDP (dist.sync full, dist.shard none); "
                          f"got dist.sync {cfg.dist.sync}, dist.shard {cfg.dist.shard}")
    run.derived = derive(run)
    return run


def epoch_batches(lengths: Sequence[int], batch: int, epoch: int, seed: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into groups of BUCKET_BATCHES batches,
    each group sorted by length and cut into batches, the batches then shuffled. The last partial
    batch is dropped. The same (seed, epoch) always gives the same batches."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    span = batch * BUCKET_BATCHES
    batches = []
    for start in range(0, len(perm), span):
        group = sorted(perm[start:start + span], key=lambda i: lengths[i])
        batches += [group[i:i + batch] for i in range(0, len(group) - batch + 1, batch)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def _optimizer(model: SequenceClassifier, cfg: Config) -> torch.optim.AdamW:
    """AdamW, decaying the backbone's matrices and the head's weight (never embeddings, norms, biases)."""
    hidden, decayed, plain = _roles(model.backbone)
    groups = [{"params": hidden + decayed + [model.head.weight], "weight_decay": cfg.finetune.weight_decay},
              {"params": plain + [model.head.bias], "weight_decay": 0.0}]
    cuda = model.head.weight.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.finetune.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             **({"fused": True} if cuda else {"foreach": True}))


class Finetuner:
    """One fine-tuning run, set up from a config and optionally resumed (`--resume auto|PATH`)."""

    def __init__(self, cfg: Config, *, resume: str | None = None, echo: Callable[[str], None] = print):
        self.info = env_info()
        if cfg.dist.world_size != self.info.world_size:
            raise ConfigError(f"dist.world_size is {cfg.dist.world_size} but {self.info.world_size} worker(s) run; "
                              "launch with hanlm finetune --nproc N, which sets it")
        if not cfg.finetune.init_from:
            raise ConfigError("finetune.init_from is not set: name the pretrained checkpoint or run directory "
                              "(hanlm finetune CKPT)")
        self.echo = echo if self.info.main else (lambda _: None)
        self.run_dir = Path(cfg.finetune.run_dir)
        self.ckpt_root = str(self.run_dir / "checkpoints")
        self._lock = RunLock(self.run_dir).acquire() if self.info.main else None
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, resume: str | None) -> None:
        if self.info.main:
            remove_stale(self.ckpt_root)
        self.device = setup_worker(cfg, self.info)
        source = load_checkpoint(resolve_checkpoint(cfg.finetune.init_from), self.device)
        cfg = finetune_config(cfg, source)
        self.tokenizer = source.tokenizer
        self.data = read_labelled(cfg)
        cfg.finetune.labels = self.data.labels
        self.echo(f"labelled data: {self.data.summary()}")
        ft = cfg.finetune
        self.rows = {name: encode_texts(self.tokenizer, split.texts, ft.max_length)
                     for name, split in self.data.splits.items()}
        self.model = build_classifier(cfg, self.tokenizer.vocab_size).to(self.device)
        self._fresh = resume in (None, "", "none")
        ckpt = find_resume(self.ckpt_root, resume, self.device, self.echo, restart_if_damaged=False,
                           main=self.info.main)
        if ckpt is not None:
            self._check_resumable(ckpt, cfg)
            load_weights(self.model, ckpt.weights, ckpt.path)
            ft.micro_batch = ckpt.config.finetune.micro_batch
        elif not ft.from_scratch:
            load_weights(self.model.backbone, source.weights, source.path)
            self.echo(f"initialised from {source.path} (step {source.step})")
        else:
            self.echo(f"from scratch: the shape and tokenizer of {source.path}, random weights")
        self.amp_dtype = autocast_dtype(cfg, self.device)
        if ft.micro_batch == "auto":
            ft.micro_batch = broadcast_from_main(self._measure_micro_batch(cfg) if self.info.main else None)
        self.cfg = cfg
        if self.info.main:
            cfg.save(self.run_dir / "config.yaml")
        self.step_model = DDP(self.model) if self.info.distributed else self.model
        self.optimizer = _optimizer(self.model, cfg)
        self.global_batch = ft.micro_batch * self.info.world_size
        train_size = len(self.rows["train"])
        if train_size < self.global_batch:
            raise ConfigError(f"the train split has {train_size} texts, fewer than one global batch "
                              f"({ft.micro_batch} × {self.info.world_size} workers); lower finetune.micro_batch")
        self.steps_per_epoch = train_size // self.global_batch
        self.total_steps = max(1, math.ceil(ft.epochs * self.steps_per_epoch))
        self.warmup = round(ft.warmup_frac * self.total_steps)
        self.step, self.best_dev, self._elapsed_before = 0, -1.0, 0.0
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.resumed_from = ckpt.path if ckpt is not None else None
        if ckpt is not None:
            self._restore(ckpt)
            self.echo(f"resumed from {ckpt.path} at step {self.step}")
        self._stop_requested = False

    def _check_resumable(self, ckpt: Checkpoint, cfg: Config) -> None:
        if ckpt.config.model.task != "classify":
            raise CheckpointError(f"{ckpt.path} is not a fine-tuning checkpoint (model.task "
                                  f"{ckpt.config.model.task}); resume a run of hanlm finetune")
        if ckpt.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise CheckpointError(f"{ckpt.path} was fine-tuned from a model with another tokenizer than "
                                  f"{cfg.finetune.init_from}; resume with the command the run started with")
        if ckpt.config.finetune.labels != cfg.finetune.labels:
            raise CheckpointError(f"{ckpt.path} was trained on the labels {ckpt.config.finetune.labels}, the data "
                                  f"now gives {cfg.finetune.labels}; resume with the data the run started with")

    def _measure_micro_batch(self, cfg: Config) -> int:
        """`finetune.micro_batch: auto`: the largest batch of max_length texts whose step fits memory."""
        n_labels, length = len(cfg.finetune.labels), cfg.finetune.max_length

        def batch(b: int) -> tuple[torch.Tensor, ...]:
            x = torch.randint(0, self.tokenizer.vocab_size, (b, length), device=self.device)
            full = torch.full((b,), length, device=self.device)
            return x, full, torch.randint(0, n_labels, (b,), device=self.device)

        probe = MemoryProbe(self.model, length, self.tokenizer.vocab_size, cfg.train.memory_fraction,
                            make_batch=batch)
        size = largest_fitting(probe, cfg.train.micro_batch_max)
        self.echo(f"finetune.micro_batch auto: {size} texts of up to {length} tokens fit in memory")
        return size

    # -- state -----------------------------------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.train_state
        if len(state.get("ranks", ())) != self.info.world_size:
            raise CheckpointError(f"{ckpt.path} was saved by {len(state.get('ranks', ()))} worker(s) and this run "
                                  f"has {self.info.world_size}; resume with as many")
        try:
            mine = state["ranks"][self.info.rank]
            self.optimizer.load_state_dict(mine["optimizer"])
            set_rng_state(mine["rng"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{ckpt.path}/{STATE_FILE} does not fit this run ({type(e).__name__}: {e})") from None
        self.step = int(state["step"])
        self.best_dev = float(state.get("best_dev", -1.0))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))

    def _rank_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "rng": rng_state(self.device)}

    def save(self, dev: ClassificationScores | None, elapsed_s: float) -> str:
        """Checkpoint on every rank's behalf (rank 0 writes). Its recorded val loss is the dev error
        rate, so the `best` pointer names the checkpoint with the best dev accuracy."""
        ranks = gather_to_main(self._rank_state())
        path = ""
        if self.info.main:
            if self._fresh:
                set_earlier_aside(self.ckpt_root, self.echo)
                self._fresh = False
            state = {"step": self.step, "best_dev": self.best_dev, "elapsed_s": elapsed_s, "ranks": ranks}
            path = save_checkpoint(self.ckpt_root, self.model, self.cfg, self.tokenizer, state,
                                   val_loss=None if dev is None else 1.0 - dev.accuracy,
                                   protect=[self.resumed_from] if self.resumed_from else [], note=self.echo)
        barrier()
        return path

    # -- training --------------------------------------------------------------------------------

    def _batch(self, step: int) -> list[int]:
        """This rank's share of global batch `step` (0-based), as indices into the train split."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            lengths = [len(r) for r in self.rows["train"]]
            self._epoch_cache = (epoch, epoch_batches(lengths, self.global_batch, epoch, self.cfg.train.seed))
        return self._epoch_cache[1][index][self.info.rank::self.info.world_size]

    def _amp(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this rank's share of the next global batch."""
        ft = self.cfg.finetune
        lr = scheduled_lr(self.step, peak=ft.lr, warmup=self.warmup, total=self.total_steps,
                          floor=ft.lr * self.cfg.train.min_lr_ratio)
        set_lr(self.optimizer, lr)
        picked = self._batch(self.step)
        x, lengths = collate([self.rows["train"][i] for i in picked], self.tokenizer.pad_id)
        y = torch.tensor([self.data.splits["train"].labels[i] for i in picked])
        self.model.train()
        with self._amp():
            loss = self.step_model(x.to(self.device), lengths.to(self.device), y.to(self.device))
        loss.backward()
        if not math.isfinite(loss.item()):
            raise HanlmError(f"the loss became {loss.item()} at step {self.step + 1}; lower finetune.lr "
                             f"(now {ft.lr})")
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": all_reduce_mean(loss.item()), "lr": lr, "grad_norm": grad_norm,
                "tokens": int(lengths.sum()) * self.info.world_size}

    def evaluate(self, split: str) -> tuple[ClassificationScores, float]:
        """Scores and mean cross-entropy (nats) of the current model on a split."""
        data = self.data.splits[split]
        probs = rows_probabilities(self.model, self.rows[split], batch_size=2 * self.cfg.finetune.micro_batch,
                                   autocast_dtype=self.amp_dtype)
        gold = torch.tensor(data.labels)
        loss = float(-probs[torch.arange(len(gold)), gold].clamp(min=1e-12).log().mean())
        return ClassificationScores.of(data.labels, probs.argmax(-1).tolist(), self.data.labels), loss

    def request_stop(self) -> None:
        self._stop_requested = True

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def run(self, stop_after: int | None = None) -> FinetuneResult:
        """Fine-tune to the end (or `stop_after` more steps), keep the best dev checkpoint, score it on test."""
        try:
            return self._run(stop_after)
        finally:
            self.close()

    def _stop_reason(self, steps: int, stop_after: int | None) -> str | None:
        reason = None
        if self._stop_requested:
            reason = "signal"
        elif self.step >= self.total_steps:
            reason = "end"
        elif stop_after is not None and steps >= stop_after:
            reason = "stop_after"
        return agreed_reason(reason, ("end", "stop_after", "signal"))

    def _run(self, stop_after: int | None) -> FinetuneResult:
        cfg, main, ft = self.cfg, self.info.main, self.cfg.finetune
        self.echo(f"model: {cfg.model.arch} + {ft.pooling}-pooled head over {len(ft.labels)} labels, "
                  f"{sum(p.numel() for p in self.model.parameters()):,} parameters; {self.device}, "
                  f"{'bf16 autocast' if self.amp_dtype else 'fp32'}")
        self.echo(f"batch: {ft.micro_batch} × {self.info.world_size} texts per step, {self.steps_per_epoch:,} steps "
                  f"per epoch, {self.total_steps:,} steps ({ft.epochs:g} epochs)")
        logger = RunLogger(self.run_dir, cfg.log, total_steps=self.total_steps, start_step=self.step, enabled=main)
        started, steps, tokens = time.monotonic(), 0, 0
        with logger, stop_on_signals(self.request_stop):
            while (reason := self._stop_reason(steps, stop_after)) is None:
                t0 = time.perf_counter()
                out = self.train_step()
                steps += 1
                tokens += out["tokens"]
                logger.train_step(self.step, loss=out["loss"], lr=out["lr"], grad_norm=out["grad_norm"],
                                  tokens_seen=tokens, tokens_per_s=out["tokens"] / (time.perf_counter() - t0))
                if self.step % ft.eval_every_steps == 0 and self.step < self.total_steps:
                    self._checkpoint(logger, self._elapsed_before + time.monotonic() - started, tokens)
            elapsed = self._elapsed_before + time.monotonic() - started
            if reason != "end":
                path = self.save(None, elapsed)
                logger.message(f"stopped at step {self.step} ({reason}); saved {path}; resume with --resume auto")
                return FinetuneResult(self.run_dir, path, self.step, reason)
            self._checkpoint(logger, elapsed, tokens)
            best = self._load_best()
            dev = test = None
            if main:
                dev, _ = self.evaluate("dev")
                test, _ = self.evaluate("test")
            report = self._write_results(logger, best, dev, test, elapsed) if main else None
        return FinetuneResult(self.run_dir, best, self.step, reason, dev, test, report)

    def _checkpoint(self, logger: RunLogger, elapsed: float, tokens: int) -> None:
        """Score the dev split (rank 0), log it and save a checkpoint that records it."""
        dev = None
        if self.info.main:
            dev, loss = self.evaluate("dev")
            self.best_dev = max(self.best_dev, dev.accuracy)
            logger.eval(self.step, tokens, {"loss": loss, "accuracy": dev.accuracy, "macro_f1": dev.macro_f1})
        self.save(dev, elapsed)

    def _load_best(self) -> str:
        """Put the weights of the best dev checkpoint into the model (every rank); its path."""
        best = broadcast_from_main(read_best(self.ckpt_root) if self.info.main else None)
        if best is None:
            raise CheckpointError(f"{self.ckpt_root} has no checkpoint with a dev score")
        path = f"{self.ckpt_root}/{best[0]}"
        load_weights(self.model, load_checkpoint(path, self.device).weights, path)
        return path

    def _write_results(self, logger: RunLogger, best: str, dev: ClassificationScores, test: ClassificationScores,
                       elapsed: float) -> Path:
        ft = self.cfg.finetune
        results = {"init_from": ft.init_from, "from_scratch": ft.from_scratch, "pooling": ft.pooling,
                   "best_checkpoint": best, "steps": self.step, "seconds": elapsed,
                   "data": {"summary": self.data.summary(),
                            **{name: len(s) for name, s in self.data.splits.items()}},
                   "dev": dev.as_dict(), "test": test.as_dict()}
        atomic_write_text(self.run_dir / RESULTS_FILE, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
        plot_dev_curves({self.run_dir.name: self.run_dir}, self.run_dir / "dev_accuracy.png")
        table = ("| split | texts | accuracy | macro-F1 |\n|---|---|---|---|\n"
                 + "\n".join(f"| {name} | {s.total:,} | {s.accuracy:.4f} | {s.macro_f1:.4f} |"
                             for name, s in (("dev", dev), ("test", test))))
        sections = {"Result (best checkpoint by dev accuracy)": f"{table}\n\nbest checkpoint: `{best}`",
                    "Confusion matrix (test)": test.confusion_table(),
                    "Dev accuracy": "![dev accuracy](dev_accuracy.png)",
                    "Data": self.data.summary(), "Config": f"```yaml\n{self.cfg.to_yaml()}```"}
        return logger.write_report(f"hanlm finetune: {self.run_dir}", sections)


def plot_dev_curves(runs: dict[str, Path], path: Path) -> None:
    """Dev accuracy against steps for each named run directory, in one PNG."""
    series = {}
    for name, run_dir in runs.items():
        evals = [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if r.get("kind") == "eval" and "accuracy" in r]
        if evals:
            series[name] = ([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-")
    line_plot(series, "optimizer step", "dev accuracy", path)


def print_result(result: FinetuneResult) -> None:
    if result.test is None:
        print(f"stopped at step {result.step} ({result.stopped_by}); resume with: hanlm finetune ... --resume auto")
        return
    print(f"\nbest checkpoint (dev accuracy): {result.checkpoint}")
    print(f"dev:  {result.dev.summary()}\ntest: {result.test.summary()}\n\n{result.test.confusion_table()}")
    print(f"report: {result.report}")


def run_finetune_worker(argv: Sequence[str]) -> int:
    """One worker of a distributed fine-tuning run, as torchrun starts it (`python -m hanlm.tasks`)."""
    parser = argparse.ArgumentParser(prog="python -m hanlm.tasks", parents=[config_options()],
                                     description="A fine-tuning worker: run it through hanlm finetune --nproc.")
    parser.add_argument("--resume", metavar="auto|PATH")
    args = parser.parse_args(argv)

    def job() -> int:
        cfg = load_config(args.config, args.overrides, world_size=env_info().world_size)
        result = Finetuner(cfg, resume=args.resume).run()
        if env_info().main:
            print_result(result)
        return 0

    return run_worker(job)
