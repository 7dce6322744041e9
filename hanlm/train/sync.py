"""How workers synchronise, behind one small interface, on standard torch.distributed APIs.

- `full`: DistributedDataParallel: gradients all-reduced every step in buckets that overlap
  communication with the backward pass.
- `fp16` / `bf16`: DDP with its fp16 / bf16 gradient-compression comm hook (bf16 needs NCCL).
- `powersgd`: DDP with its PowerSGD comm hook (low-rank gradients, error feedback).
- `dist.shard: fsdp`: FSDP2, parameters, gradients and optimizer state sharded across workers.
- `diloco`: DiLoCo, local SGD and Streaming DiLoCo (`hanlm.train.diloco`).

`hanlm.train.strategies.build_sync` picks one from the config.

Every strategy counts the bytes this rank sends (`bytes_total`, `step_bytes`; see
`hanlm.train.collectives`), so strategies can be compared, and sends them over `dist.link_mbps`'
simulated link when one is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from hanlm.config import Config
from hanlm.train.collectives import Link, ring_all_reduce_bytes


class Sync:
    """No synchronisation: one worker. The base of the strategies below."""

    def __init__(self, link: Link | None = None) -> None:
        self.bytes_total = 0
        self.step_bytes = 0
        self._pending = 0
        self.link = link or Link()

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
        return {"bytes_total": self.bytes_total, "link_s": self.link.busy_s}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Restore what `state_dict` saved; a note for the log when the state needed adapting."""
        self.bytes_total = int(state.get("bytes_total", 0))
        self.link.busy_s = float(state.get("link_s", 0.0))
        return None


class DDPSync(Sync):
    """DistributedDataParallel, optionally with a gradient-compression comm hook."""

    def __init__(self, cfg: Config, device: torch.device, link: Link, world_size: int):
        super().__init__(link)
        self.kind, self.cfg, self.device, self.world_size = cfg.dist.sync, cfg, device, world_size
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
            return self._sent(hook(state, bucket), bucket.buffer().numel() * bytes_per_element)
        return counted

    def _counted_powersgd(self, state, bucket):
        vanilla = state.iter < state.start_powerSGD_iter
        before = state.total_numel_after_compression
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        numel = bucket.buffer().numel() if vanilla else state.total_numel_after_compression - before
        return self._sent(future, numel * 4)

    def _sent(self, future, payload: int):
        """Count a bucket's all-reduce of `payload` bytes; on a simulated link, its result arrives
        when the link has carried it (the backward pass goes on meanwhile, as with a real network)."""
        sent = ring_all_reduce_bytes(payload, self.world_size)
        self._pending += sent
        if not self.link.shaped:
            return future
        arrival = self.link.reserve(sent)

        def arrive(done):
            Link.wait_until(arrival)
            return done.value()
        return future.then(arrive)

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

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        note = super().load_state_dict(state)
        if self.powersgd is None:
            return note
        if "powersgd" not in state:
            return ("the checkpoint was saved with another dist.sync; PowerSGD starts afresh (plain all-reduce for "
                    "dist.powersgd_start_step steps, then compression)")
        s, saved = self.powersgd, state["powersgd"]
        s.iter = saved["iter"]
        s.error_dict, s.p_memory_dict, s.q_memory_dict = dict(saved["error"]), dict(saved["p"]), dict(saved["q"])
        r = saved["rng"]
        s.rng.set_state(("MT19937", r["keys"].numpy().astype(np.uint32), r["pos"], r["has_gauss"], r["cached"]))
        s.total_numel_before_compression, s.total_numel_after_compression = saved["before"], saved["after"]
        return note


class FSDPSync(Sync):
    """FSDP2 (`fully_shard`): each worker keeps a shard of the parameters, gradients and optimizer
    state; parameters are all-gathered for forward and backward, gradients reduce-scattered.

    Bytes counted per step: what this rank sends in the all-gathers of the parameters, per
    micro-batch two for each block's (forward, backward: blocks reshard after forward) and one for
    the root's own (embeddings, final norm, head: the root keeps them gathered), and in the
    reduce-scatter of the gradients, once; each sends (W-1)/W of the full tensor. On a simulated
    link they are held after the backward pass, not overlapped.
    """

    def __init__(self, cfg: Config, world_size: int, link: Link):
        super().__init__(link)
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
        in_blocks = sum(p.numel() for block in getattr(model, "blocks", ()) for p in block.parameters())
        gathered = self.accum * (2 * in_blocks + (numel - in_blocks))
        self.bytes_per_step = 4 * (gathered + numel) * (self.world_size - 1) // self.world_size
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
        self.link.hold(self.bytes_per_step)
