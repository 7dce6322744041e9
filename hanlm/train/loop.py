"""The training loop: forward → loss → backward → clip → optimizer with the scheduled lr.

`Trainer` composes the components (prepared data, model, optimizer, loader, checkpoints,
evaluator, logger); `run()` is the whole job `hanlm train` runs: train until max_steps,
max_tokens or max_minutes, evaluating and saving on the way, then a final evaluation on the
whole val split (unless eval.final_max_batches caps it), a report and sample continuations.
SIGINT/SIGTERM finish the current step, save a checkpoint and return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from hanlm.checkpoint import (
    STATE_FILE,
    Checkpoint,
    load_weights,
    probe_writable,
    remove_stale,
    save_checkpoint,
)
from hanlm.config import Config, with_micro_batch
from hanlm.data.loader import BatchLoader
from hanlm.data.prepare import prepare
from hanlm.data.shards import open_split, open_train_copies
from hanlm.data.tokenizer import Tokenizer
from hanlm.errors import CheckpointError, ConfigError, HanlmError
from hanlm.eval import (EvalResult, MaskedEvalResult, evaluate, evaluate_masked, final_eval_scope,
                        split_characters)
from hanlm.generate import config_samples
from hanlm.loading import open_checkpoint, require_language_model, resolve_served
from hanlm.log import RunLogger, measure_matmul_peak
from hanlm.models import build_for_training
from hanlm.models.lora import adapted, trainable_share
from hanlm.models.masking import Masker, row_seed
from hanlm.runlock import RunLock
from hanlm.train.autobatch import resolve_micro_batch
from hanlm.train.distill import NGramTeacher
from hanlm.train.distributed import (
    agreed_reason,
    all_reduce_mean,
    barrier,
    broadcast_from_main,
    env_info,
    gather_to_main,
    rng_state,
    set_rng_state,
    setup_worker,
)
from hanlm.train.device import autocast_dtype
from hanlm.train.ema import WeightAverage
from hanlm.train.optim import build_optimizer, lr_at, set_lr
from hanlm.train.runs import find_resume, set_earlier_aside, stop_on_signals
from hanlm.train.strategies import build_sync


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: str
    step: int
    tokens: int
    stopped_by: str  # max_steps | max_tokens | max_minutes | signal | stop_after
    final_eval: EvalResult | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)
    report: Path | None = None


class Trainer:
    """One training run, set up from a resolved config and optionally resumed from a checkpoint."""

    def __init__(self, cfg: Config, *, resume: str | None = None, echo: Callable[[str], None] = print,
                 restart_if_damaged: bool = False):
        self.info = env_info()
        if cfg.dist.world_size != self.info.world_size:
            raise ConfigError(f"dist.world_size is {cfg.dist.world_size} but {self.info.world_size} worker(s) "
                              "run; launch with hanlm train --nproc N, which sets it")
        self.echo = echo if self.info.main else (lambda _: None)
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        # Rank 0 is the one writer; a second run on this directory stops here, before any work.
        self._lock = RunLock(self.run_dir).acquire() if self.info.main else None
        try:
            self._build(cfg, resume, restart_if_damaged)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, resume: str | None, restart_if_damaged: bool) -> None:
        if self.info.main:
            probe_writable(self.ckpt_root)  # an unwritable checkpoint.dir stops the run here, before any step
            for leftover in remove_stale(self.ckpt_root):
                self.echo(f"removed {leftover}, left half-written by a run that died")
        self.device = setup_worker(cfg, self.info)
        self.prepared = self._prepare(cfg)
        self.tokenizer = Tokenizer.load(self.prepared.directory / "tokenizer.json")

        if self.info.restart > 0:  # an elastic restart: every worker continues from the latest checkpoint
            resume = "auto"
        ckpt = self._find_resume(resume if resume is not None else cfg.checkpoint.resume, restart_if_damaged)
        self.resumed_from = ckpt.path if ckpt is not None else None
        # Weights from a checkpoint replace the embedding anyway: don't read a vectors file for nothing.
        fresh = ckpt is None and not cfg.train.init_from
        model_cfg = cfg.model if fresh else dataclasses.replace(cfg.model, vectors=None)
        self.model = build_for_training(dataclasses.replace(cfg, model=model_cfg), self.tokenizer.vocab_size,
                                        self.tokenizer).to(self.device)
        # mlm, electra: each row is masked on the CPU, seeded by the window it holds (the same on any rank, after resume).
        t = cfg.train
        self.masker = (Masker(t.mask_rate, self.tokenizer.vocab_size, self.tokenizer, t.mask_whole_words)
                       if t.objective != "lm" else None)
        if self.model.vector_report is not None:
            self.echo(self.model.vector_report.summary())
        if ckpt is not None:
            adapted(self.model, cfg, cfg.train.lora_rank)  # a LoRA run's checkpoint holds its updates
            load_weights(self.model, ckpt.weights, ckpt.path)
            if cfg.train.micro_batch == "auto":  # keep the size the run started with: resume stays exact
                cfg = with_micro_batch(cfg, ckpt.config.train.micro_batch)
        elif cfg.train.init_from:
            source = require_language_model(open_checkpoint(resolve_served(cfg.train.init_from), self.device))
            load_weights(self.model, source.weights, source.path)
            adapted(self.model, cfg, cfg.train.lora_rank)
            self.echo(f"initialised from {source.path} (step {source.step})")
        # Measured on rank 0 and shared: every rank must run the same batch size.
        cfg = broadcast_from_main(resolve_micro_batch(cfg, self.model, self.tokenizer.vocab_size)
                                  if self.info.main else None) or cfg
        self.cfg = cfg
        if self.info.main:
            cfg.save(self.run_dir / "config.yaml")

        if cfg.train.activation_checkpointing:
            if not hasattr(self.model, "set_activation_checkpointing"):
                raise ConfigError(f"train.activation_checkpointing is not supported by model.arch {cfg.model.arch}")
            self.model.set_activation_checkpointing(True)
        self.sharded = cfg.dist.shard == "fsdp" and self.info.distributed
        self.sync = build_sync(cfg, self.device, self.info.world_size)
        self.step_model = self.sync.wrap(self.model)
        self.optimizer = build_optimizer(self.model, cfg)  # after wrapping: FSDP replaces the parameters
        if cfg.train.compile:
            self.step_model = torch.compile(self.step_model)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        # The train split, or its BPE-dropout copies (epoch e reads copy e mod K); val stays the plain encoding.
        self.loader = BatchLoader(open_train_copies(self.prepared.directory), cfg.train.block_size,
                                  cfg.derived.micro_batch, rank=self.info.rank, world_size=self.info.world_size,
                                  seed=cfg.train.seed)
        self.val_tokens = open_split(self.prepared.directory, "val")
        self.val_characters = split_characters(self.prepared.meta, "val")
        # The held-out tune split (never trained on) ranks the checkpoints, so that val stays unseen by every
        # choice; without one (older prepared data, data.tune_fraction 0, masked objectives) val ranks them.
        self.tune_tokens = (open_split(self.prepared.directory, "tune")
                            if "tune" in self.prepared.meta["splits"] and self.masker is None else None)
        self.selected_on = "val" if self.tune_tokens is None else "tune"
        self.average = WeightAverage(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.teacher = None
        if t.distill_weight > 0 and cfg.model.arch in ("gpt", "lstm") and cfg.model.task == "lm":
            self.teacher = NGramTeacher.count(open_split(self.prepared.directory, "train"), self.tokenizer.vocab_size,
                                              t.distill_order, t.distill_weight, t.distill_top_k)
            self.echo(self.teacher.summary())
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        self._elapsed_before, self._clock_started = 0.0, None
        if ckpt is not None:
            self._restore(ckpt.train_state, ckpt.path)
            self.echo(f"resumed from {ckpt.path} at step {self.step}")
        self._stop_requested = False

    def _prepare(self, cfg: Config):
        """Prepared shards: one process per machine builds them while the others wait, then all read."""
        if self.info.local_rank == 0:
            prepared = prepare(cfg, progress=cfg.log.progress and self.info.main)
        barrier()
        if self.info.local_rank != 0:
            prepared = prepare(cfg, progress=False)
        return prepared

    # -- set-up helpers ------------------------------------------------------------------------

    def _find_resume(self, resume: str, restart_if_damaged: bool) -> Checkpoint | None:
        """The checkpoint to continue from (see `find_resume`); a fresh start moves an earlier run's
        checkpoints aside at its first save (see `_set_earlier_aside`)."""
        self._fresh = resume in (None, "", "none")
        ckpt = find_resume(self.ckpt_root, resume, self.device, self.echo, restart_if_damaged=restart_if_damaged,
                           main=self.info.main)
        if ckpt is not None and ckpt.tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise CheckpointError(f"{ckpt.path} was trained with another tokenizer than the prepared data in "
                                  f"{self.prepared.directory}; resume with the config the run started with")
        return ckpt

    def _restore(self, state: dict, source: str) -> None:
        saved_world = len(state.get("ranks", ()))
        if saved_world != self.info.world_size:
            raise CheckpointError(f"{source} was saved by {saved_world} worker(s) and this run has "
                                  f"{self.info.world_size}; resume with {saved_world}, or start a new run from its "
                                  "weights with train.init_from")
        try:
            mine = state["ranks"][self.info.rank]
            if self.sharded:
                # Every rank holds the whole gathered state; each keeps its own shard of it.
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer_full"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(mine["optimizer"])
            self.loader.load_state_dict(mine["loader"])
            note = self.sync.load_state_dict(mine["sync"])
            set_rng_state(mine["rng"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{source}/{STATE_FILE} does not fit this run ({type(e).__name__}: {e})") from None
        except HanlmError as e:
            raise CheckpointError(f"{source}/{STATE_FILE}: {e}") from None
        if note:
            self.echo(f"note: {note}")
        self._restore_average(state, source)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.best_val = float(state.get("best_val", math.inf))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))

    def _restore_average(self, state: dict, source: str) -> None:
        """train.ema_decay: the checkpoint's model weights are the average, its state holds the live ones."""
        live = state.get("ema_live")
        if (live is None) != (self.average is None):
            was = "with" if live is not None else "without"
            raise CheckpointError(f"{source} was trained {was} weight averaging (train.ema_decay) and this run "
                                  f"{'is not' if live is not None else 'is'}; resume with the config the run started "
                                  "with, or start a new run from its weights with train.init_from")
        if self.average is not None:
            self.average.resume(live, source)

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The averaged weights in the model while evaluating, saving or sampling (train.ema_decay)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def elapsed_s(self) -> float:
        """Wall seconds this run has trained, earlier invocations (before a resume) included."""
        running = time.monotonic() - self._clock_started if self._clock_started is not None else 0.0
        return self._elapsed_before + running

    def rank_state(self) -> dict:
        """This rank's part of an exact resume: optimizer (unless sharded: that is gathered whole),
        data position, sync state, RNG."""
        return {"optimizer": None if self.sharded else self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                "sync": self.sync.state_dict(), "rng": rng_state(self.device)}

    # -- the step ------------------------------------------------------------------------------

    def _amp(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.amp_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns its loss, lr and grad norm."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.elapsed_s())
        set_lr(self.optimizer, lr)
        accum, total = cfg.train.grad_accum, 0.0
        for micro in range(accum):
            x, y = self.loader.next_batch()  # (B, T), (B, T)
            if self.masker is not None:  # the masked input, and the original tokens at the masked positions
                seeds = [row_seed(cfg.train.seed, epoch, start) for epoch, start in self.loader.last_rows]
                x, y = self.masker(x, row_seeds=seeds)
            soft = {"soft": self.teacher.targets(x)} if self.teacher is not None else {}
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Gradients are synchronised once per step, on the last micro-batch's backward.
            with self.sync.no_sync() if micro < accum - 1 else contextlib.nullcontext(), self._amp():
                loss = self.step_model(x, y, **soft)
                (loss * self._loss_weight(y) / accum).backward()
            total += loss.item()
        self.sync.after_backward(self.step)
        if not math.isfinite(total):
            raise HanlmError(f"the loss became {total / accum} at step {self.step + 1}; lower train.lr (now "
                             f"{cfg.train.lr}) or raise train.warmup_steps")
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.average is not None:
            self.average.update(self.step)
        self.tokens_seen += cfg.derived.tokens_per_step
        self.sync.after_step(self.step)
        return {"loss": all_reduce_mean(total / accum), "lr": lr, "grad_norm": grad_norm}

    def _loss_weight(self, y: torch.Tensor) -> torch.Tensor | float:
        """mlm: the batch's masked tokens over the number expected (mask_rate × tokens), so that the gradient is
        the sum over masked tokens divided by a count that adds up over rows: workers holding different
        numbers of masked tokens then average to exactly the one-process gradient. 1 for the other objectives."""
        if self.cfg.train.objective != "mlm":
            return 1.0
        return y.ne(-1).sum() / (self.cfg.train.mask_rate * y.numel())

    def evaluate(self, final: bool = False) -> EvalResult | MaskedEvalResult:
        """The val split (its first eval.max_batches batches, or eval.final_max_batches when `final`), with the
        averaged weights when train.ema_decay averages them."""
        with self._averaged():
            return self._evaluate(self.val_tokens, self.val_characters, final)

    def selection_loss(self, result: EvalResult | MaskedEvalResult, final: bool = False) -> tuple[float, dict]:
        """The loss that ranks checkpoints (the tune split's, or val's `result` without one) and the metrics
        to log beside `result`'s."""
        if self.tune_tokens is None:
            return result.loss, result.metrics()
        with self._averaged():
            tune = self._evaluate(self.tune_tokens, split_characters(self.prepared.meta, "tune"), final)
        return tune.loss, {**result.metrics(), "tune_loss": tune.loss}

    def _evaluate(self, tokens: np.ndarray, characters: int, final: bool) -> EvalResult | MaskedEvalResult:
        max_batches = self.cfg.eval.final_max_batches if final else self.cfg.eval.max_batches
        if self.masker is not None:
            result = evaluate_masked(self.model, tokens, self.masker, block_size=self.cfg.train.block_size,
                                     batch_size=self.cfg.eval.batch_size,
                                     max_batches=max_batches)
            self._reshard()
            return result
        result = evaluate(self.model, tokens, block_size=self.cfg.train.block_size,
                          batch_size=self.cfg.eval.batch_size, characters=characters,
                          max_batches=max_batches, autocast_dtype=self.amp_dtype,
                          stride=self.cfg.eval.stride)
        self._reshard()
        return result

    def _reshard(self) -> None:
        """FSDP leaves the root's weights gathered after a forward without backward; shard them
        again so the optimizer and checkpoints see the sharded parameters."""
        if self.sharded:
            self.model.reshard()

    def save(self, val_loss: float | None = None) -> str:
        """Checkpoint on every rank's behalf: rank 0 gathers the ranks' states and writes; all wait.

        Sharded (FSDP): the full weights and the full optimizer state are gathered to rank 0's CPU
        memory, so that the checkpoint is one safetensors-and-JSON set like any other (no pickled
        torch.distributed.checkpoint metadata), at the cost of that memory on rank 0 while saving.
        """
        weights: torch.nn.Module | dict = self.model
        state: dict = {"step": self.step, "tokens_seen": self.tokens_seen, "best_val": self.best_val,
                       "elapsed_s": self.elapsed_s()}
        if self.average is not None:
            state["ema_live"] = self.average.live_state()
        if self.sharded:
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=full)
            state["optimizer_full"] = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        ranks = gather_to_main(self.rank_state())
        path = ""
        if self.info.main:
            self._set_earlier_aside()
            with self._averaged():
                path = save_checkpoint(self.ckpt_root, weights, self.cfg, self.tokenizer, {**state, "ranks": ranks},
                                       val_loss=val_loss, selected_on=self.selected_on,
                                       protect=[self.resumed_from] if self.resumed_from else [], note=self.echo)
        barrier()
        return path

    def _set_earlier_aside(self) -> None:
        """A fresh run's first save moves an earlier run's checkpoints out of its way (see
        `set_earlier_aside`)."""
        if self._fresh:
            set_earlier_aside(self.ckpt_root, self.echo)
        self._fresh = False

    def request_stop(self) -> None:
        """Finish the current step, save and return from `run` (what SIGINT and SIGTERM do)."""
        self._stop_requested = True

    # -- the job -------------------------------------------------------------------------------

    _REASONS = ("max_steps", "max_tokens", "stop_after", "max_minutes", "signal")  # the last wins a tie

    def _minutes(self, started: float) -> float:
        """Seconds that count against max_minutes: this call's, or with schedule_clock minutes the run's
        whole (the schedule and the stop must agree on when the run ends)."""
        if self.cfg.train.schedule_clock == "minutes":
            return self.elapsed_s()
        return time.monotonic() - started

    def _stop_reason(self, started: float, steps_this_call: int, stop_after: int | None) -> str | None:
        """Why to stop now, if so; agreed by all ranks, so none is left waiting in a collective."""
        cfg, reason = self.cfg, None
        if self._stop_requested:
            reason = "signal"
        elif self.step >= cfg.derived.max_steps:
            reason = "max_tokens" if cfg.derived.max_steps < cfg.train.max_steps else "max_steps"
        elif cfg.train.max_minutes is not None and self._minutes(started) >= 60 * cfg.train.max_minutes:
            reason = "max_minutes"
        elif stop_after is not None and steps_this_call >= stop_after:
            reason = "stop_after"
        return agreed_reason(reason, self._REASONS)

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to the end of the run (or `stop_after` more steps), then evaluate, save and report;
        the run directory's lock is released at the end.

        Only rank 0 evaluates, logs and writes the report; every rank trains and checkpoints.
        """
        if self._lock is None and self.info.main:
            self._lock = RunLock(self.run_dir).acquire()
        try:
            return self._run(stop_after)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run directory for another run (what `run` does when it returns)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _run(self, stop_after: int | None) -> TrainResult:
        cfg, main = self.cfg, self.info.main
        peak = None
        if main:
            peak = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops
                    else measure_matmul_peak(self.device, self.amp_dtype or torch.float32))
        flops_per_token = self.model.flops_per_token(cfg.train.block_size)
        peak_text = f"; matmul peak {peak / 1e9:.0f} GFLOP/s" if peak else ""
        trainable, total = trainable_share(self.model)
        lora = (f", LoRA rank {cfg.train.lora_rank} on {', '.join(cfg.finetune.lora_targets)}: {trainable:,} of them "
                "train" if cfg.train.lora_rank else "")
        self.echo(f"model: {cfg.model.arch}, {self.model.num_params():,} parameters "
                  f"({self.model.num_params(embeddings=False):,} without embeddings{lora}), "
                  f"{flops_per_token / 1e6:.1f} MFLOP per token; {self.device}, "
                  f"{'bf16 autocast' if self.amp_dtype else 'fp32'}{peak_text}")
        self.echo(f"batch: {cfg.derived.micro_batch} × {cfg.train.grad_accum} × {cfg.derived.world_size} "
                  f"sequences of {cfg.train.block_size} = {cfg.derived.tokens_per_step:,} tokens per step, "
                  f"{cfg.derived.max_steps:,} steps" + (f"; sync {cfg.dist.sync}" if self.info.distributed else ""))
        seconds = None
        if cfg.train.max_minutes is not None:
            spent = self.elapsed_s() if cfg.train.schedule_clock == "minutes" else 0.0
            seconds = max(0.0, 60 * cfg.train.max_minutes - spent)
        logger = RunLogger(self.run_dir, cfg.log, total_steps=cfg.derived.max_steps, start_step=self.step,
                           peak_flops=peak, enabled=main, seconds=seconds)
        started = self._clock_started = time.monotonic()
        try:
            return self._train(started, logger, flops_per_token, stop_after)
        finally:
            self._elapsed_before, self._clock_started = self.elapsed_s(), None

    def _train(self, started: float, logger: RunLogger, flops_per_token: float, stop_after: int | None) -> TrainResult:
        """The loop, the final evaluation, the last save and the report."""
        cfg, main, steps = self.cfg, self.info.main, 0
        # A sharded model's forward is a collective: every rank takes part in evaluation.
        evaluates = main or self.sharded
        with logger, stop_on_signals(self.request_stop):
            while (reason := self._stop_reason(started, steps, stop_after)) is None:
                t0 = time.perf_counter()
                out = self.train_step()
                steps += 1
                tps = cfg.derived.tokens_per_step / (time.perf_counter() - t0)
                logger.train_step(self.step, loss=out["loss"], lr=out["lr"], grad_norm=out["grad_norm"],
                                  tokens_seen=self.tokens_seen, tokens_per_s=tps, flops_per_s=tps * flops_per_token,
                                  memory_bytes=self._memory(),
                                  **self._comm() if self.info.distributed else {})
                val_loss = None
                if self.step % cfg.eval.every_steps == 0 and self.step < cfg.derived.max_steps and evaluates:
                    val_loss, metrics = self.selection_loss(self.evaluate())
                    logger.eval(self.step, self.tokens_seen, metrics)
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < cfg.derived.max_steps:
                    self._save_best(val_loss)
            if reason in ("signal", "stop_after"):
                path = self.save()
                logger.message(f"stopped at step {self.step} ({reason}); saved {path}")
                return TrainResult(self.run_dir, path, self.step, self.tokens_seen, reason)
            self.sync.finish()  # diloco: the final model is the synchronised one
            final = self.evaluate(final=True) if evaluates else None
            chosen = self.selection_loss(final, final=True) if evaluates else None
            if main:
                logger.eval(self.step, self.tokens_seen, chosen[1])
            path = self._save_best(chosen[0] if main else None)
            samples = self.samples() if evaluates else []
            report = (logger.write_report(f"hanlm run: {self.run_dir}", self._report_sections(final, samples))
                      if main else None)
        return TrainResult(self.run_dir, path, self.step, self.tokens_seen, reason, final, samples, report)

    def _comm(self) -> dict[str, int]:
        return {"comm_bytes": self.sync.step_bytes, "comm_bytes_total": self.sync.bytes_total}

    def _save_best(self, val_loss: float | None) -> str:
        if val_loss is not None:
            self.best_val = min(self.best_val, val_loss)
        return self.save(val_loss)

    def _memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return psutil.Process().memory_info().rss

    def samples(self) -> list[tuple[str, str]]:
        """Continuations of the configured prompts with the configured sampling settings (none from an
        encoder, which does not generate)."""
        if not self.model.generates:
            return []
        with self._averaged():
            samples = config_samples(self.model, self.tokenizer, self.cfg.generate)
        self._reshard()
        return samples

    def _report_sections(self, final: EvalResult, samples: list[tuple[str, str]]) -> dict[str, str]:
        table = final.table(self.prepared.meta["splits"]["val"].get("unigram_bpc"))
        if self.info.distributed:
            table += f"\n| bytes sent per rank ({self.cfg.dist.sync}) | {self.sync.bytes_total:,} |"
        sample_md = "\n\n".join(f"**{p}**{c}" for p, c in samples)
        return {f"Evaluation ({final_eval_scope(self.cfg)})": table, "Samples": sample_md,
                "Config": f"```yaml\n{self.cfg.to_yaml()}```"}
