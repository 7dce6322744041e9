"""DiLoCo, local SGD and Streaming DiLoCo: workers that synchronise every H steps, not every step.

Each worker takes `dist.sync_every` (H) inner optimizer steps alone. Then the pseudo-gradient,
the global (anchor) weights minus the worker's own, is averaged over the workers and an outer
SGD with Nesterov momentum moves the anchor. Outer lr 1 without momentum is plain periodic
parameter averaging (local SGD).

- `dist.pseudo_grad_bits` 16 / 8 / 4 sends the pseudo-gradients packed (`hanlm.train.quantize`,
  `QuantizedMean`), the rounding error carried into the next outer step.
- `dist.stream_fragments` P splits the flat parameter vector into P equal ranges, each
  synchronised every H steps, fragment p at steps (p + 1)·H/P + kH, so that no moment carries
  the whole model's traffic (the outer optimizer is elementwise, so any split is exact).
- `dist.stream_delay` tau > 0 sends a fragment from a background thread and keeps training; its
  outer update is applied tau steps later. The worker's weights of the fragment then become the
  new global ones plus the tau inner steps it took meanwhile (`dist.stream_merge: replay`), or
  mix × local + (1 - mix) × global (`mix`, the rule of the Streaming DiLoCo paper).

A checkpoint holds the anchors, the outer momentum, this worker's own weights, the
error-feedback residuals and any update still on its way (waited for, then stored), so a run
resumes exactly and an elastic restart loses none of the outer optimizer's state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hanlm.config import Config
from hanlm.train.collectives import Link, QuantizedMean, all_reduce_mean_
from hanlm.train.sync import Sync


class FlatParams:
    """A model's parameters seen as one flat vector, read and written by element ranges."""

    def __init__(self, params: list[torch.Tensor]):
        self.views = [p.detach().view(-1) for p in params]
        self.starts = [0]
        for v in self.views:
            self.starts.append(self.starts[-1] + v.numel())
        self.numel = self.starts[-1]

    def _pieces(self, lo: int, hi: int):
        """(parameter slice, range of [lo, hi)) for every parameter the range touches."""
        for view, start, end in zip(self.views, self.starts, self.starts[1:]):
            a, b = max(lo, start), min(hi, end)
            if a < b:
                yield view[a - start:b - start], a - lo, b - lo

    def read(self, lo: int, hi: int) -> torch.Tensor:
        """A copy of elements [lo, hi)."""
        return torch.cat([piece for piece, _, _ in self._pieces(lo, hi)])  # (cat always allocates)

    @torch.no_grad()
    def write_(self, lo: int, hi: int, values: torch.Tensor) -> None:
        """Set elements [lo, hi) to `values`."""
        for piece, a, b in self._pieces(lo, hi):
            piece.copy_(values[a:b])


def fragment_bounds(numel: int, fragments: int) -> list[tuple[int, int]]:
    """P contiguous ranges, as equal as can be, that cover [0, numel) once."""
    edges = [p * numel // fragments for p in range(fragments + 1)]
    return list(zip(edges, edges[1:]))


def fragment_offsets(every: int, fragments: int) -> list[int]:
    """The step within each H-step cycle at which fragment p is sent: (p + 1)·H/P, the last at H."""
    return [(p + 1) * every // fragments for p in range(fragments)]


def fragments_due(inner_step: int, every: int, offsets: list[int]) -> list[int]:
    """The fragments sent after inner step `inner_step` (1-based, counted after any warm-up)."""
    return [p for p, offset in enumerate(offsets) if inner_step >= offset and (inner_step - offset) % every == 0]


class _Job:
    """A function run on a daemon thread (one that cannot hold the process open if a peer dies
    mid-collective); `result` waits for it and raises what it raised."""

    def __init__(self, fn: Callable[[], Any], device: torch.device):
        self._value: Any = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                self._value = fn()
            except BaseException as e:  # handed to the caller of result()
                self._error = e

        self._thread = threading.Thread(target=run, name="hanlm-diloco-sync", daemon=True)
        self._thread.start()

    @classmethod
    def finished(cls, value: Any) -> _Job:
        job = cls.__new__(cls)
        job._value, job._error, job._thread = value, None, None
        return job

    def result(self) -> Any:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._value


class DiLoCo(Sync):
    """DiLoCo / local SGD / Streaming DiLoCo (see the module docstring)."""

    def __init__(self, cfg: Config, device: torch.device, link: Link | None = None):
        super().__init__(link)
        d = cfg.dist
        self.every, self.warmup, self.bits, self.block = d.sync_every, d.sync_warmup_steps, d.pseudo_grad_bits, \
            d.quant_block
        self.fragments, self.delay, self.merge, self.mix = d.stream_fragments, d.stream_delay, d.stream_merge, \
            d.stream_mix
        self.outer_lr, self.momentum = d.outer_lr, d.outer_momentum
        self.device = device
        self.model: nn.Module | None = None
        self.flat: FlatParams | None = None
        self.bounds: list[tuple[int, int]] = []
        self.offsets = fragment_offsets(self.every, self.fragments)
        self.anchor: list[torch.Tensor] = []
        self.outer: torch.optim.SGD | None = None
        self.means: list[QuantizedMean] = []
        self.group: dist.ProcessGroup | None = None
        # fragment -> (the step its update is applied after, the job averaging it, the fragment's own
        # weights when it was sent: what `replay` takes its inner steps since from)
        self.pending: dict[int, tuple[int, _Job, torch.Tensor | None]] = {}
        self.wait_s = 0.0  # time the training loop stood still for pseudo-gradients

    def wrap(self, model: nn.Module) -> nn.Module:
        self.model = model
        self.flat = FlatParams(list(model.parameters()))
        self.bounds = fragment_bounds(self.flat.numel, self.fragments)
        self.anchor = [self.flat.read(lo, hi) for lo, hi in self.bounds]
        self.outer = torch.optim.SGD(self.anchor, lr=self.outer_lr, momentum=self.momentum,
                                     nesterov=self.momentum > 0)
        # Overlapped fragments travel on a process group of their own, so that their collectives,
        # on a background thread, never interleave with the training loop's.
        self.group = dist.new_group() if self.delay else None
        if self.bits < 32:
            self.means = [QuantizedMean(hi - lo, self.bits, self.block, self.group, self.device)
                          for lo, hi in self.bounds]
        return model

    def after_backward(self, step: int) -> None:
        if step >= self.warmup:
            return
        # Warm-up: plain data parallelism, gradients averaged every step.
        for p in self.model.parameters():
            if p.grad is not None:
                self._pending += all_reduce_mean_(p.grad, self.link)

    def after_step(self, step: int) -> None:
        if step <= self.warmup:
            for p, (lo, hi) in enumerate(self.bounds):  # the anchor follows the synchronised weights
                self.anchor[p].copy_(self.flat.read(lo, hi))
        else:
            for p, (due, job, sent_from) in sorted(self.pending.items()):
                if due <= step:
                    self._arrive(p, job, sent_from, delayed=True)
            for p in fragments_due(step - self.warmup, self.every, self.offsets):
                self._send(p, step)
        super().after_step(step)

    def finish(self) -> None:
        """Apply what is on its way, then synchronise every fragment that moved since its last
        synchronisation, so that every worker ends with the same (global) weights."""
        for p, (_, job, sent_from) in sorted(self.pending.items()):
            self._arrive(p, job, sent_from, delayed=True)
        moved = torch.tensor([float(not torch.equal(a, self.flat.read(lo, hi)))
                              for a, (lo, hi) in zip(self.anchor, self.bounds)], device=self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)  # agreed, so that every rank takes part in the same sends
        for p in range(self.fragments):
            if moved[p]:
                self._sync_now(p)
        self.bytes_total += self._pending
        self._pending = 0

    # -- one fragment's synchronisation ---------------------------------------------------------

    def _pseudo_gradient(self, p: int) -> torch.Tensor:
        """The way this worker moved fragment p since the anchor, reversed."""
        lo, hi = self.bounds[p]
        return self.anchor[p] - self.flat.read(lo, hi)

    def _mean(self, p: int, delta: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The workers' mean of `delta` for fragment p, and the bytes this rank sent."""
        if self.bits == 32:
            return delta, all_reduce_mean_(delta, self.link, self.group)
        return self.means[p](delta, self.link)

    def _send(self, p: int, step: int) -> None:
        if not self.delay:
            self._sync_now(p)
            return
        delta = self._pseudo_gradient(p)
        sent_from = self.flat.read(*self.bounds[p]) if self.merge == "replay" else None
        self.pending[p] = (step + self.delay, _Job(lambda: self._mean(p, delta), self.device), sent_from)

    def _sync_now(self, p: int) -> None:
        """Average fragment p's pseudo-gradient while the training loop waits, and apply it."""
        delta = self._pseudo_gradient(p)
        self._arrive(p, _Job.finished(self._timed(lambda: self._mean(p, delta))))

    def _timed(self, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self.wait_s += time.perf_counter() - started

    @torch.no_grad()
    def _arrive(self, p: int, job: _Job, sent_from: torch.Tensor | None = None, *, delayed: bool = False) -> None:
        """Step the outer optimizer on fragment p's averaged pseudo-gradient. The worker's weights become
        the new global ones; for an update that arrives late (`delayed`), merged with what the worker did
        meanwhile: its steps since `sent_from` replayed on top (replay), or a mix of the two (mix)."""
        mean, sent = self._timed(job.result)
        self.pending.pop(p, None)
        self._pending += sent
        self.anchor[p].grad = mean
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        lo, hi = self.bounds[p]
        local = self.anchor[p]
        if delayed and self.merge == "replay":
            local = self.anchor[p] + (self.flat.read(lo, hi) - sent_from)
        elif delayed:
            local = self.mix * self.flat.read(lo, hi) + (1 - self.mix) * self.anchor[p]
        self.flat.write_(lo, hi, local)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # This worker's own weights too: between synchronisations they differ from rank 0's.
        # An update on its way is waited for and stored, to be applied at its step after a resume.
        pending = [[p, due, *job.result(), sent_from] for p, (due, job, sent_from) in sorted(self.pending.items())]
        # A fragment not yet stepped has no buffer; zeros stand for it exactly (its first step sets buf = grad).
        momentum = [self.outer.state.get(a, {}).get("momentum_buffer") for a in self.anchor]
        momentum = [torch.zeros_like(a) if m is None else m.clone() for a, m in zip(self.anchor, momentum)]
        return {**super().state_dict(), "anchor": [a.clone() for a in self.anchor],
                "momentum": momentum if self.momentum > 0 else None,
                "local": [self.flat.read(lo, hi) for lo, hi in self.bounds], "pending": pending,
                "feedback": [m.state_dict() for m in self.means], "wait_s": self.wait_s}

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        note = super().load_state_dict(state)
        if "anchor" not in state:
            return ("the checkpoint was saved with another dist.sync; DiLoCo's outer loop starts from its weights, "
                    "with fresh outer momentum")
        with torch.no_grad():
            for a, saved in zip(self.anchor, self._as_fragments(state["anchor"], "anchor")):
                a.copy_(saved)
            for (lo, hi), saved in zip(self.bounds, self._as_fragments(state["local"], "local")):
                self.flat.write_(lo, hi, saved.to(self.device))
        momentum = state.get("momentum")
        if momentum is None and "outer" in state:  # written before fragments: torch's SGD state per parameter
            per_param = state["outer"]["state"]
            momentum = [per_param[i].get("momentum_buffer") for i in sorted(per_param)]
            momentum = momentum if momentum and all(m is not None for m in momentum) else None
        if momentum is not None:
            for a, m in zip(self.anchor, self._as_fragments(momentum, "momentum")):
                self.outer.state[a]["momentum_buffer"] = m.to(self.device).clone()
        feedback = state.get("feedback", [])
        if len(feedback) == len(self.means) and all(m.fits(f) for m, f in zip(self.means, feedback)):
            for mean, saved in zip(self.means, feedback):
                mean.load_state_dict(saved)
        elif feedback:
            note = ("the checkpoint's error-feedback residuals belong to other dist.pseudo_grad_bits / quant_block / "
                    "stream_fragments settings; they start again from zero")
        self.pending = {}
        for p, due, mean, sent, sent_from in state.get("pending", []):
            size = self.bounds[p][1] - self.bounds[p][0] if 0 <= p < self.fragments else -1
            if mean.numel() != size or (sent_from is not None and sent_from.numel() != size):
                raise ValueError(f"it holds an update on its way for fragment {p} ({mean.numel():,} values) that "
                                 f"does not fit this run's split into {self.fragments} fragment(s) "
                                 "(dist.stream_fragments differs; resume with the settings it was saved with)")
            if (sent_from is None) != (self.merge != "replay"):
                raise ValueError(f"its update on its way for fragment {p} was sent under another dist.stream_merge; "
                                 "resume with the settings it was saved with")
            self.pending[int(p)] = (int(due), _Job.finished((mean.to(self.device, torch.float32), int(sent))),
                                    None if sent_from is None else sent_from.to(self.device, torch.float32))
        self.wait_s = float(state.get("wait_s", 0.0))
        return note

    def _as_fragments(self, saved: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """Saved flat pieces (fragments, or per-parameter tensors from before fragments) cut into
        this run's fragments."""
        flat = torch.cat([t.reshape(-1) for t in saved]).to(self.device, torch.float32)
        if flat.numel() != self.flat.numel:
            raise ValueError(f"its DiLoCo {name} has {flat.numel():,} values and the model {self.flat.numel:,}")
        return [flat[lo:hi] for lo, hi in self.bounds]
