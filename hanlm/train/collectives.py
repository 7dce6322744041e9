"""Collectives the sync strategies share: the bytes a rank puts on the wire, a simulated slow
link, and a mean over the workers sent at 16, 8 or 4 bits per value.

Bytes are counted as what this rank sends. A ring all-reduce of P bytes sends 2(W-1)/W × P per
rank (a reduce-scatter then an all-gather, each moving (W-1)/W of the data); with two workers
that is P.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from hanlm.train.quantize import Codec, ErrorFeedback

# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); earlier releases have only that.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ring_all_reduce_bytes(payload: int, world_size: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `payload` bytes."""
    return 2 * (world_size - 1) * payload // world_size


class Link:
    """A simulated network link of `mbps` megabits per second and `latency_ms` per transfer.

    Transfers queue on it one after another, as on a real link; `hold` sleeps until a transfer
    of its bytes, started after those already queued, would have arrived. Used by the
    benchmark to measure what overlapping communication with computation saves; with
    `mbps` 0 and `latency_ms` 0 it does nothing.
    """

    def __init__(self, mbps: float = 0.0, latency_ms: float = 0.0):
        self.bytes_per_s = mbps * 1e6 / 8
        self.latency_s = latency_ms / 1000
        self.busy_s = 0.0  # link time of every transfer so far: what communication costs if nothing hides it
        self._free_at = 0.0
        self._lock = threading.Lock()

    @property
    def shaped(self) -> bool:
        return self.bytes_per_s > 0 or self.latency_s > 0

    def reserve(self, nbytes: int) -> float:
        """Queue a transfer of `nbytes`; the monotonic time at which it arrives."""
        if not self.shaped:
            return 0.0
        seconds = (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            self.busy_s += seconds + self.latency_s
            return self._free_at + self.latency_s

    @staticmethod
    def wait_until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def hold(self, nbytes: int) -> None:
        """Sleep as long as sending `nbytes` over the link would take."""
        self.wait_until(self.reserve(nbytes))


def all_reduce_mean_(t: torch.Tensor, link: Link, group: dist.ProcessGroup | None = None) -> int:
    """Average `t` over the group in place (fp32 all-reduce); the bytes this rank sent."""
    world = dist.get_world_size(group)
    t.div_(world)
    dist.all_reduce(t, group=group)
    sent = ring_all_reduce_bytes(t.numel() * t.element_size(), world)
    link.hold(sent)
    return sent


class QuantizedMean:
    """The mean of a flat fp32 tensor of `numel` values over a process group, at `bits` per value.

    A reduce-scatter by all-to-all, then an all-gather, both packed: every rank packs its tensor
    (error feedback on its own rounding), sends chunk r to rank r, averages the W copies of its
    own chunk in fp32, packs that mean (error feedback on the owner's rounding) and gathers every
    rank's chunk. Each rank sends about 2(W-1)/W of the packed size, as in a ring all-reduce, and
    every rank ends with the same bytes, so the same result. Chunks are whole blocks.
    """

    def __init__(self, numel: int, bits: int, block: int, group: dist.ProcessGroup | None,
                 device: torch.device):
        self.codec = Codec(bits, block)
        self.numel, self.group = numel, group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        blocks = self.codec.padded(numel) // self.codec.block
        edges = [r * blocks // self.world * self.codec.block for r in range(self.world + 1)]
        self.bounds = [(edges[r], edges[r + 1]) for r in range(self.world)]
        lo, hi = self.bounds[self.rank]
        self.sent = ErrorFeedback(self.codec, self.codec.padded(numel), device)
        self.owned = ErrorFeedback(self.codec, hi - lo, device)
        self.chunk_bytes = [self.codec.nbytes(b - a) for a, b in self.bounds]

    def __call__(self, x: torch.Tensor, link: Link) -> tuple[torch.Tensor, int]:
        """The mean over the group of every rank's `x`, and the bytes this rank sent."""
        padded = torch.nn.functional.pad(x, (0, self.codec.padded(self.numel) - self.numel))
        parts = self.sent.encode(padded, self.bounds)
        mine = self.chunk_bytes[self.rank]
        received = torch.empty(mine * self.world, dtype=torch.uint8, device=x.device)
        dist.all_to_all_single(received, torch.cat(parts), [mine] * self.world, self.chunk_bytes, group=self.group)
        lo, hi = self.bounds[self.rank]
        total = torch.zeros(hi - lo, device=x.device)
        for copy in received.split(mine):  # in rank order, so the sum is the same wherever it runs
            total += self.codec.decode(copy, hi - lo)
        widest = max(self.chunk_bytes)
        packed = torch.zeros(widest, dtype=torch.uint8, device=x.device)
        packed[:mine] = self.owned.encode(total / self.world)[0]
        gathered = torch.empty(widest * self.world, dtype=torch.uint8, device=x.device)
        _all_gather_single(gathered, packed, group=self.group)
        mean = torch.cat([self.codec.decode(gathered[r * widest:r * widest + n], b - a)
                          for r, (n, (a, b)) in enumerate(zip(self.chunk_bytes, self.bounds))])
        sent = sum(n for r, n in enumerate(self.chunk_bytes) if r != self.rank) + (self.world - 1) * widest
        link.hold(sent)
        return mean[:self.numel], sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sent": self.sent.residual.clone(), "owned": self.owned.residual.clone()}

    def fits(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether `state` holds residuals of this layout (values, blocks, ranks)."""
        return all(name in state and state[name].shape == f.residual.shape
                   for name, f in (("sent", self.sent), ("owned", self.owned)))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, feedback in (("sent", self.sent), ("owned", self.owned)):
            feedback.residual = state[name].to(feedback.residual.device, torch.float32).clone()
