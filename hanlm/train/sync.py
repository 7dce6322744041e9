"""How workers synchronise, behind one small interface, on standard torch.distributed APIs.

- `full`: DistributedDataParallel: gradients all-reduced every step in buckets that overlap
  communication with the backward pass.
- `fp16` / `bf16`: DDP with its fp16 / bf16 gradient-compression comm hook (bf16 needs NCCL).
- `powersgd`: DDP with its PowerSGD comm hook (low-rank gradients, error feedback).
- `dist.shard: fsdp`: FSDP2, parameters, gradients and optimizer state sharded across workers.
- `diloco`: each worker takes `dist.sync_every` (H) inner optimizer steps alone; then the
  pseudo-gradients (anchor minus current weights) are averaged and an outer SGD with Nesterov
  momentum moves the anchor, which every worker copies. Outer lr 1 without momentum is
  periodic parameter averaging (local SGD).

Every strategy counts the bytes this rank hands to all-reduce (`bytes_total`, `step_bytes`),
so strategies can be compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from hanlm.config import Config
from hanlm.errors import CheckpointError


class Sync:
    """No synchronisation: one worker. The base of the strategies below."""

    def __init__(self) -> None:
        self.bytes_total = 0
        self.step_bytes = 0
        self._pending = 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls."""
        return model

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches before the last one of an accumulated step."""
        return contextlib.nullcontext()

    def after_backward(self, step: int) -> None:
        """After the last micro-batch's backward of optimizer step `step` (0-based)."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based count of steps done)."""
        self.step_bytes, self._pending = self._pending, 0
        self.bytes_total += self.step_bytes

    def finish(self) -> None:
        """At the end of a run, before the final evaluation and checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {"bytes_total": self.bytes_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes_total = int(state.get("bytes_total", 0))


class DDPSync(Sync):
    """DistributedDataParallel, optionally with a gradient-compression comm hook."""

    def __init__(self, cfg: Config, device: torch.device):
        super().__init__()
        self.kind, self.cfg, self.device = cfg.dist.sync, cfg, device
        self.ddp: DDP | None = None
        self.powersgd: powerSGD_hook.PowerSGDState | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DDP(model, device_ids=ids, bucket_cap_mb=self.cfg.dist.bucket_mb)
        if self.kind == "full":
            self.ddp.register_comm_hook(None, self._counted(default_hooks.allreduce_hook, 4))
        elif self.kind in ("fp16", "bf16"):
            hook = default_hooks.fp16_compress_hook if self.kind == "fp16" else default_hooks.bf16_compress_hook
            self.ddp.register_comm_hook(None, self._counted(hook, 2))
        else:
            d = self.cfg.dist
            self.powersgd = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=d.powersgd_rank,
                start_powerSGD_iter=d.powersgd_start_step, use_error_feedback=d.powersgd_error_feedback,
                warm_start=True, random_seed=self.cfg.train.seed)
            self.ddp.register_comm_hook(self.powersgd, self._counted_powersgd)
        return self.ddp

    # The hooks below carry no annotations: DDP checks them against the runtime classes, and
    # with postponed evaluation they would be strings (state, bucket: dist.GradBucket -> Future).
    def _counted(self, hook: Callable, bytes_per_element: int) -> Callable:
        def counted(state, bucket):
            self._pending += bucket.buffer().numel() * bytes_per_element
            return hook(state, bucket)
        return counted

    def _counted_powersgd(self, state, bucket):
        vanilla = state.iter < state.start_powerSGD_iter
        before = state.total_numel_after_compression
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        numel = bucket.buffer().numel() if vanilla else state.total_numel_after_compression - before
        self._pending += numel * 4
        return future

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.powersgd is not None:
            s = self.powersgd
            rng = s.rng.get_state()
            state["powersgd"] = {
                "iter": s.iter, "error": dict(s.error_dict), "p": dict(s.p_memory_dict), "q": dict(s.q_memory_dict),
                "rng": {"keys": torch.from_numpy(rng[1].astype(np.int64)), "pos": int(rng[2]),
                        "has_gauss": int(rng[3]), "cached": float(rng[4])},
                "before": s.total_numel_before_compression, "after": s.total_numel_after_compression}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.powersgd is None:
            return
        if "powersgd" not in state:
            raise CheckpointError("the checkpoint has no PowerSGD state; it was saved with another dist.sync")
        s, saved = self.powersgd, state["powersgd"]
        s.iter = saved["iter"]
        s.error_dict, s.p_memory_dict, s.q_memory_dict = dict(saved["error"]), dict(saved["p"]), dict(saved["q"])
        r = saved["rng"]
        s.rng.set_state(("MT19937", r["keys"].numpy().astype(np.uint32), r["pos"], r["has_gauss"], r["cached"]))
        s.total_numel_before_compression, s.total_numel_after_compression = saved["before"], saved["after"]


class DiLoCo(Sync):
    """DiLoCo / local SGD: H inner steps per worker, then an outer step on averaged pseudo-gradients."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.dist
        self.every, self.warmup, self.fp16 = d.sync_every, d.sync_warmup_steps, d.pseudo_grad_fp16
        self.outer_lr, self.momentum = d.outer_lr, d.outer_momentum
        self.model: nn.Module | None = None
        self.in_sync = True  # all workers hold the anchor's weights
        self.anchor: list[torch.Tensor] = []
        self.outer: torch.optim.SGD | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.anchor = [p.detach().clone() for p in model.parameters()]
        self.outer = torch.optim.SGD(self.anchor, lr=self.outer_lr, momentum=self.momentum,
                                     nesterov=self.momentum > 0)
        return model

    def _params(self) -> Iterator[torch.Tensor]:
        return self.model.parameters()

    def after_backward(self, step: int) -> None:
        if step >= self.warmup:
            return
        # Warm-up: plain data parallelism, gradients averaged every step.
        for p in self._params():
            if p.grad is not None:
                self._pending += _all_reduce_mean_(p.grad, fp16=False)

    def after_step(self, step: int) -> None:
        self.in_sync = step <= self.warmup or (step - self.warmup) % self.every == 0
        if step <= self.warmup:
            self._copy_to_anchor()  # the anchor follows the synchronised warm-up weights
        elif self.in_sync:
            self.outer_step()
        super().after_step(step)

    def finish(self) -> None:
        if not self.in_sync:
            self.outer_step()
            self.bytes_total += self._pending
            self._pending = 0
            self.in_sync = True

    @torch.no_grad()
    def _copy_to_anchor(self) -> None:
        for a, p in zip(self.anchor, self._params()):
            a.copy_(p)

    @torch.no_grad()
    def outer_step(self) -> None:
        """Average the pseudo-gradients, step the outer optimizer, give every worker the new anchor."""
        for a, p in zip(self.anchor, self._params()):
            a.grad = a - p  # (the pseudo-gradient) the way this worker moved, reversed
            self._pending += _all_reduce_mean_(a.grad, fp16=self.fp16)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for a, p in zip(self.anchor, self._params()):
            p.copy_(a)

    def state_dict(self) -> dict[str, Any]:
        # This worker's own weights too: between synchronisations they differ from rank 0's.
        return {**super().state_dict(), "anchor": [a.clone() for a in self.anchor],
                "outer": self.outer.state_dict(), "local": [p.detach().clone() for p in self._params()],
                "in_sync": self.in_sync}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "anchor" not in state:
            raise CheckpointError("the checkpoint has no DiLoCo anchor; it was saved with another dist.sync")
        with torch.no_grad():
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
            for p, saved in zip(self._params(), state["local"]):
                p.copy_(saved)
        self.outer.load_state_dict(state["outer"])
        self.in_sync = bool(state["in_sync"])


class FSDPSync(Sync):
    """FSDP2 (`fully_shard`): each worker keeps a shard of the parameters, gradients and optimizer
    state; parameters are all-gathered for forward and backward, gradients reduce-scattered.

    Bytes counted per step: this rank's parameter shard handed to all-gather twice per
    micro-batch (forward, backward) and its full gradient handed to reduce-scatter once.
    """

    def __init__(self, cfg: Config, world_size: int):
        super().__init__()
        self.accum, self.world_size = cfg.train.grad_accum, world_size
        self.model: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in getattr(model, "blocks", ()):  # per block: gather one block's weights at a time
            fully_shard(block)
        fully_shard(model)
        register_fsdp_forward_method(model, "log_probs")  # evaluation and generation gather weights too
        self.model = model
        numel = sum(p.numel() for p in model.parameters())
        self.bytes_per_step = 4 * (2 * self.accum * numel // self.world_size + numel)
        return model

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def after_backward(self, step: int) -> None:
        self._pending += self.bytes_per_step


def _all_reduce_mean_(t: torch.Tensor, fp16: bool) -> int:
    """Average `t` over all ranks in place; returns the bytes this rank sent."""
    payload = t.to(torch.float16) if fp16 else t
    payload.div_(dist.get_world_size())
    dist.all_reduce(payload)
    if fp16:
        t.copy_(payload)
    return payload.numel() * payload.element_size()


def build_sync(cfg: Config, device: torch.device, world_size: int) -> Sync:
    """The strategy `dist.sync` names; plain `Sync` for a single worker."""
    if world_size == 1:
        return Sync()
    if cfg.dist.shard == "fsdp":
        return FSDPSync(cfg, world_size)
    if cfg.dist.sync == "diloco":
        return DiLoCo(cfg)
    return DDPSync(cfg, device)
