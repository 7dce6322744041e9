"""`hanlm finetune`: train a task head (and the network under it): a label per text, or a tag per character.

The task (finetune.task: classify or tag, `hanlm.tasks.objectives`) brings its data, head,
batches and scores; everything else is shared. The run starts from a pretrained gpt or lstm
checkpoint (finetune.init_from), whose model.*, tokenizer and data.* normalisation it keeps;
with finetune.from_scratch the same shape and tokenizer start from random weights instead. It
reads and splits the task's data, trains with AdamW on a warm-up + cosine schedule, evaluates
the dev split every finetune.eval_every_steps steps and checkpoints there; the checkpoint with
the best dev score (accuracy, or word F1) is the result, and only it is scored on the test
split, once, at the end. (The hmm and crf taggers train without a network: `hanlm.finetune.counted`.)

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
    save_checkpoint,
)
from hanlm.config import Config, config_options, derive, load_config
from hanlm.errors import CheckpointError, ConfigError, HanlmError
from hanlm.loading import open_checkpoint, require_language_model, resolve_served
from hanlm.models.electra import backbone_weights
from hanlm.models.lora import trainable_share, with_own_lora
from hanlm.log import METRICS_FILE, RunLogger, line_plot, read_metrics
from hanlm.memory import peak_rss
from hanlm.runlock import RunLock
from hanlm.tasks.objectives import TASKS, headline_table
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
from hanlm.train.device import autocast_dtype
from hanlm.train.runs import find_resume, set_earlier_aside, stop_on_signals
from hanlm.train.optim import _roles, scheduled_lr, set_lr

RESULTS_FILE = "results.json"
DEV_PLOT = "dev_curve.png"
BUCKET_BATCHES = 50  # batches whose texts are sorted by length together: little padding, order still random


@dataclass
class FinetuneResult:
    run_dir: Path
    checkpoint: str  # the best checkpoint by dev score
    step: int
    stopped_by: str  # end | signal | stop_after
    dev: object | None = None  # the task's scores (ClassificationScores or SegmentationScores)
    test: object | None = None
    report: Path | None = None


def finetune_config(cfg: Config, source: Checkpoint) -> Config:
    """The run's config: `cfg` with the pretrained checkpoint's model (task finetune.task), tokenizer and
    data normalisation, which the task's network must share with it."""
    if source.ngram is not None:
        raise ConfigError(f"finetune.init_from {source.path} is an n-gram model, which has no hidden states to "
                          "fine-tune; start from a gpt, lstm or encoder checkpoint")
    require_language_model(source)
    if cfg.finetune.task == "tag" and cfg.finetune.tagger != "neural":
        raise ConfigError(f"finetune.tagger {cfg.finetune.tagger} is trained without a network: run hanlm finetune "
                          "without a checkpoint")
    model = dataclasses.replace(source.config.model, vectors=None, task=cfg.finetune.task,
                                dropout=cfg.finetune.dropout)
    run = dataclasses.replace(cfg, model=model, tokenizer=source.config.tokenizer, data=source.config.data)
    limit = model.context_length if model.arch in ("gpt", "encoder", "bert") else None
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


def finetune_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW, decaying the backbone's matrices and the head's (never embeddings, norms, biases)."""
    hidden, decayed, plain = _roles(model.backbone)
    head_decayed, head_plain = [], []
    for name, p in model.named_parameters():
        if not name.startswith("backbone."):
            (head_decayed if p.dim() >= 2 and "emb" not in name else head_plain).append(p)
    groups = [{"params": hidden + decayed + head_decayed, "weight_decay": cfg.finetune.weight_decay},
              {"params": plain + head_plain, "weight_decay": 0.0}]
    cuda = next(model.parameters()).device.type == "cuda"
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
        self._lock = RunLock(self.run_dir, "finetune.run_dir").acquire() if self.info.main else None
        try:
            self._build(cfg, resume)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, resume: str | None) -> None:
        if self.info.main:
            remove_stale(self.ckpt_root)
        self.device = setup_worker(cfg, self.info)
        source = open_checkpoint(resolve_served(cfg.finetune.init_from), self.device)
        cfg = finetune_config(cfg, source)
        self.tokenizer = source.tokenizer
        self.task = TASKS[cfg.finetune.task]()
        self.task.prepare(cfg, self.tokenizer)
        cfg.finetune.labels = self.task.labels
        self.echo(f"{cfg.finetune.task} data: {self.task.summary()}")
        ft = cfg.finetune
        self.model = self.task.build(cfg, self.tokenizer.vocab_size).to(self.device)
        self._fresh = resume in (None, "", "none")
        ckpt = find_resume(self.ckpt_root, resume, self.device, self.echo, restart_if_damaged=False,
                           main=self.info.main)
        if ckpt is not None:
            self._check_resumable(ckpt, cfg)
            load_weights(self.model, ckpt.weights, ckpt.path)
            ft.micro_batch = ckpt.config.finetune.micro_batch
        elif not ft.from_scratch:
            load_weights(self.model.backbone, with_own_lora(self.model.backbone, backbone_weights(source.weights)),
                         source.path)
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
        self.optimizer = finetune_optimizer(self.model, cfg)
        self.global_batch = ft.micro_batch * self.info.world_size
        train_size = len(self.task.train_lengths())
        if train_size < self.global_batch:
            raise ConfigError(f"the train split has {train_size} examples, fewer than one global batch "
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
        if ckpt.config.model.task != cfg.model.task:
            raise CheckpointError(f"{ckpt.path} is not a checkpoint of this fine-tuning task (model.task "
                                  f"{ckpt.config.model.task}, this run {cfg.model.task}); resume a run of the same "
                                  "hanlm finetune command")
        if ckpt.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise CheckpointError(f"{ckpt.path} was fine-tuned from a model with another tokenizer than "
                                  f"{cfg.finetune.init_from}; resume with the command the run started with")
        if ckpt.config.finetune.labels != cfg.finetune.labels:
            raise CheckpointError(f"{ckpt.path} was trained on the labels {ckpt.config.finetune.labels}, the data "
                                  f"now gives {cfg.finetune.labels}; resume with the data the run started with")

    def _measure_micro_batch(self, cfg: Config) -> int:
        """`finetune.micro_batch: auto`: the largest batch of max_length examples whose step fits memory."""
        length = cfg.finetune.max_length

        def batch(b: int) -> tuple[torch.Tensor, ...]:
            return self.task.probe_batch(b, length, self.tokenizer.vocab_size, self.device)

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

    def save(self, dev, elapsed_s: float) -> str:
        """Checkpoint on every rank's behalf (rank 0 writes). Its recorded val loss is 1 − the dev score,
        so the `best` pointer names the checkpoint with the best dev score."""
        ranks = gather_to_main(self._rank_state())
        path = ""
        if self.info.main:
            if self._fresh:
                set_earlier_aside(self.ckpt_root, self.echo)
                self._fresh = False
            state = {"step": self.step, "best_dev": self.best_dev, "elapsed_s": elapsed_s, "ranks": ranks}
            path = save_checkpoint(self.ckpt_root, self.model, self.cfg, self.tokenizer, state,
                                   val_loss=None if dev is None else 1.0 - dev.primary, selected_on="dev",
                                   protect=[self.resumed_from] if self.resumed_from else [], note=self.echo)
        barrier()
        return path

    # -- training --------------------------------------------------------------------------------

    def _batch(self, step: int) -> list[int]:
        """This rank's share of global batch `step` (0-based), as indices into the train split."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_batches(self.task.train_lengths(), self.global_batch, epoch,
                                                      self.cfg.train.seed))
        return self._epoch_cache[1][index][self.info.rank::self.info.world_size]

    def _amp(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this rank's share of the next global batch."""
        ft = self.cfg.finetune
        lr = scheduled_lr(self.step, peak=ft.lr, warmup=self.warmup, total=self.total_steps,
                          floor=ft.lr * self.cfg.train.min_lr_ratio)
        set_lr(self.optimizer, lr)
        inputs, n_tokens = self.task.batch(self._batch(self.step))
        self.model.train()
        with self._amp():
            loss = self.step_model(*(t.to(self.device) for t in inputs))
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
                "tokens": n_tokens * self.info.world_size}

    def evaluate(self, split: str):
        """The task's scores and mean loss (None when it has none) of the current model on a split."""
        return self.task.evaluate(self.model, split, 2 * self.cfg.finetune.micro_batch, self.amp_dtype)

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
        head = (f"{ft.pooling}-pooled head over {len(ft.labels)} labels" if ft.task == "classify"
                else f"{ft.tag_head} tagging head over {len(ft.labels)} tags")
        trainable, total = trainable_share(self.model)
        lora = (f" (LoRA rank {ft.lora_rank} on {', '.join(ft.lora_targets)}: {trainable:,} of them train)"
                if ft.lora_rank else "")
        self.echo(f"model: {cfg.model.arch} + {head}, {total:,} parameters{lora}; {self.device}, "
                  f"{'bf16 autocast' if self.amp_dtype else 'fp32'}")
        self.echo(f"batch: {ft.micro_batch} × {self.info.world_size} examples per step, {self.steps_per_epoch:,} steps "
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
            report = self._write_results(logger, best, dev, test, elapsed, tokens) if main else None
        return FinetuneResult(self.run_dir, best, self.step, reason, dev, test, report)

    def _checkpoint(self, logger: RunLogger, elapsed: float, tokens: int) -> None:
        """Score the dev split (rank 0), log it and save a checkpoint that records it."""
        dev = None
        if self.info.main:
            dev, loss = self.evaluate("dev")
            self.best_dev = max(self.best_dev, dev.primary)
            logger.eval(self.step, tokens, {**({"loss": loss} if loss is not None else {}), **dev.headline})
        self.save(dev, elapsed)

    def _load_best(self) -> str:
        """Put the weights of the best dev checkpoint into the model (every rank); its path."""
        best = broadcast_from_main(read_best(self.ckpt_root) if self.info.main else None)
        if best is None:
            raise CheckpointError(f"{self.ckpt_root} has no checkpoint with a dev score")
        path = f"{self.ckpt_root}/{best[0]}"
        load_weights(self.model, load_checkpoint(path, self.device).weights, path)
        return path

    def _write_results(self, logger: RunLogger, best: str, dev, test, elapsed: float, tokens: int) -> Path:
        ft = self.cfg.finetune
        sizes = self.task.split_sizes()
        trainable, total = trainable_share(self.model)
        results = {"task": ft.task, "init_from": ft.init_from, "from_scratch": ft.from_scratch,
                   **({"pooling": ft.pooling} if ft.task == "classify" else {"tag_head": ft.tag_head}),
                   "best_checkpoint": best, "steps": self.step, "seconds": elapsed,
                   "parameters": total, "trainable_parameters": trainable, "lora_rank": ft.lora_rank,
                   "peak_rss_gb": peak_rss() / 2**30, "train_tokens_per_s": tokens / max(elapsed, 1e-9),
                   "data": {"summary": self.task.summary(), **sizes},
                   "dev": dev.as_dict(), "test": test.as_dict()}
        return write_results(logger, self.run_dir, results, {"dev": dev, "test": test}, sizes,
                             self.task.report_sections(test), self.cfg)


def write_results(logger: RunLogger, run_dir: Path, results: dict, scores: dict, sizes: dict[str, int],
                  extra_sections: dict[str, str], cfg: Config) -> Path:
    """results.json, the dev curve and report.md of a finished run (any task, any tagger); the report's path."""
    atomic_write_text(run_dir / RESULTS_FILE, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    metric = "accuracy" if cfg.finetune.task == "classify" else "f1"
    sections = {"Result (best checkpoint by dev score)":
                f"{headline_table(scores, sizes, 'examples')}\n\nbest checkpoint: `{results['best_checkpoint']}`",
                **extra_sections}
    if plot_dev_curves({run_dir.name: run_dir}, run_dir / DEV_PLOT, metric):
        sections[f"Dev {metric}"] = f"![dev {metric}]({DEV_PLOT})"
    sections.update({"Data": results["data"]["summary"], "Config": f"```yaml\n{cfg.to_yaml()}```"})
    return logger.write_report(f"hanlm finetune: {run_dir}", sections)


def plot_dev_curves(runs: dict[str, Path], path: Path, metric: str = "accuracy") -> bool:
    """The dev `metric` against steps for each named run directory, in one PNG; False when no run has
    more than one evaluation to draw."""
    series = {}
    for name, run_dir in runs.items():
        evals = [r for r in read_metrics(Path(run_dir) / METRICS_FILE) if r.get("kind") == "eval" and metric in r]
        if len(evals) > 1:
            series[name] = ([r["step"] for r in evals], [r[metric] for r in evals], "o-")
    if series:
        line_plot(series, "optimizer step", f"dev {metric}", path)
    return bool(series)


def print_result(result: FinetuneResult) -> None:
    if result.test is None:
        print(f"stopped at step {result.step} ({result.stopped_by}); resume with: hanlm finetune ... --resume auto")
        return
    print(f"\nbest checkpoint (dev score): {result.checkpoint}")
    print(f"dev:  {result.dev.summary()}\ntest: {result.test.summary()}")
    if hasattr(result.test, "confusion_table"):
        print(f"\n{result.test.confusion_table()}")
    print(f"report: {result.report}")


def run_finetune_worker(argv: Sequence[str]) -> int:
    """One worker of a distributed fine-tuning run, as torchrun starts it (`python -m hanlm.finetune`)."""
    parser = argparse.ArgumentParser(prog="python -m hanlm.finetune", parents=[config_options()],
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
