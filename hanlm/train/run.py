"""The run entry: config → prepare → model → training loop (or n-gram counting) → report.

`hanlm train` calls `train` in its own process for a single worker; torchrun starts each worker
of a distributed run through `run_training_worker` (`python -m hanlm.train`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hanlm.config import Config, config_options, load_config
from hanlm.errors import ConfigError
from hanlm.eval import final_eval_scope
from hanlm.loading import resolve_served

STOP_AFTER_HELP = ("train this many more steps, then save a checkpoint and stop, as Ctrl-C does; the schedule "
                   "stays that of the whole run (train.max_steps), so --resume continues it unchanged")
RESTART_HELP = ("with --resume auto: when checkpoints exist but none is usable, move them aside into "
                "checkpoints/damaged-<time>/ and start over (without it the run stops and lists them)")


def run_training_worker(argv: Sequence[str]) -> int:
    """One worker of a distributed run, as torchrun starts it (`python -m hanlm.train`)."""
    from hanlm.train.distributed import env_info, run_worker

    parser = argparse.ArgumentParser(prog="python -m hanlm.train", parents=[config_options()],
                                     description="A training worker: run it through torchrun or hanlm train --nproc.")
    parser.add_argument("--resume", metavar="auto|PATH")
    parser.add_argument("--restart-if-damaged", action="store_true", help=RESTART_HELP)
    parser.add_argument("--stop-after", type=int, metavar="N", help=STOP_AFTER_HELP)
    args = parser.parse_args(argv)
    return run_worker(lambda: train(load_config(args.config, args.overrides, world_size=env_info().world_size),
                                    args.resume, restart_if_damaged=args.restart_if_damaged,
                                    stop_after=args.stop_after))


def train(cfg: Config, resume: str | None, *, restart_if_damaged: bool = False, stop_after: int | None = None) -> int:
    """Train (or count, for an n-gram) as `cfg` says, then print the final evaluation and samples;
    the process's exit code. With `stop_after`, stop and save after that many steps."""
    if cfg.model.arch == "ngram":
        from hanlm.train.ngram import train_ngram

        if resume not in (None, "none") or stop_after is not None:
            raise ConfigError("an n-gram model is counted in one pass, so there is nothing to resume or stop: drop "
                              "--resume and --stop-after")
        result, prepared = train_ngram(cfg)
    else:
        from hanlm.train.loop import Trainer

        trainer = Trainer(cfg, resume=resume, restart_if_damaged=restart_if_damaged)
        result, prepared = trainer.run(stop_after), trainer.prepared
        if not trainer.info.main:
            return 0
    if result.final_eval is None:
        print(f"stopped at step {result.step} ({result.stopped_by}); resume with: hanlm train --resume auto "
              f"(same --config/--set)")
        return 0
    unigram = prepared.meta["splits"]["val"]["unigram_bpc"]
    print(f"\nfinal ({final_eval_scope(cfg)}): {result.final_eval.summary()}")
    bpc = getattr(result.final_eval, "bpc", None)  # an encoder's masked figures have none
    if bpc is not None:
        print(f"val unigram character entropy: {unigram:.4f} bits (the model's BPC is {bpc / unigram:.0%} of it)")
    print(f"checkpoint: {result.checkpoint}")
    if result.checkpoint:  # what eval, mix, export, serve and finetune take when given the run directory
        chosen = resolve_served(result.checkpoint.rstrip("/").rsplit("/", 1)[0], note=print)
        if chosen.rstrip("/") != result.checkpoint.rstrip("/"):
            print(f"the run's result: {chosen}")
    print(f"report: {result.report}\n\nsamples:")
    for prompt, continuation in result.samples:
        print(f"  {prompt}|{continuation}")
    return 0
