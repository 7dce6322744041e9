"""Low-communication DiLoCo: packed pseudo-gradients, error feedback, streaming fragments, the simulated link."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hanlm.config import load_config
from hanlm.errors import ConfigError
from hanlm.models import build_model
from hanlm.train.collectives import Link, QuantizedMean, ring_all_reduce_bytes
from hanlm.train.diloco import DiLoCo, FlatParams, fragment_bounds, fragment_offsets, fragments_due
from hanlm.train.quantize import Codec, ErrorFeedback


def spread_values(seed: int, blocks: int, block: int = 64) -> torch.Tensor:
    """Blocks of very different magnitudes (1e-7 … 10), one all zero, one with a lone outlier."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(blocks, 1, generator=g) * 8 - 7)
    x = (torch.randn(blocks, block, generator=g) * scale).view(-1)
    x[:block] = 0
    x[block:2 * block] *= 1e-3
    x[block + 5] = 3.0
    return x


@pytest.mark.parametrize(("bits", "block"), [(8, 64), (4, 64), (4, 6)])
def test_block_quantisation_stays_within_half_a_step_of_every_value(bits, block):
    codec = Codec(bits, block)
    blocks = 50 * 64 // block | 1  # an odd number of blocks: with block 6 at 4 bits the scales start at an odd byte
    x = spread_values(0, 60)[:blocks * block - 3]  # not a whole number of blocks: the last block is padded
    packed = codec.encode(x)
    assert packed.dtype == torch.uint8 and packed.numel() == codec.nbytes(x.numel())
    assert packed.numel() == blocks * block * bits // 8 + blocks * 2  # codes, then one fp16 scale per block
    back = codec.decode(packed, x.numel())
    assert torch.equal(codec.decode(torch.cat([packed[:1], packed])[1:], x.numel()), back)  # at an odd offset
    padded = torch.nn.functional.pad(x, (0, 3)).view(blocks, block)
    step = (padded.abs().amax(dim=1, keepdim=True) / codec.qmax).expand(blocks, block).reshape(-1)[:x.numel()]
    # the scale is rounded up to fp16: at most one fp16 ulp above the block's own (or fp16's smallest subnormal)
    bound = 0.5 * step * (1 + 2 ** -10) + 2 ** -25
    error = (x - back).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert (error > 0.25 * bound).any(), "the bound is far from tight: is anything quantised at all?"
    big = x.abs() > 2 * bound
    assert (back[:64] == 0).all() and torch.equal(torch.sign(back[big]), torch.sign(x[big]))


def test_fp16_packing_is_a_cast_and_extreme_values_do_not_become_inf_or_nan():
    codec = Codec(16, 64)
    x = torch.tensor([1e-3, -2.5, 0.0, 1e6, -1e6, 3e-9])
    back = codec.decode(codec.encode(x), x.numel())
    assert codec.encode(x).numel() == 12 and torch.isfinite(back).all()
    assert torch.equal(back[:3], x[:3].half().float()) and back[3] == 65504 and back[4] == -65504
    big = Codec(8, 4).decode(Codec(8, 4).encode(torch.tensor([1e9, 1.0, 0.0, -1e9])), 4)
    assert torch.isfinite(big).all()


def test_codec_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="16, 8 or 4 bits"):
        Codec(2, 64)
    with pytest.raises(ValueError, match="odd"):
        Codec(4, 33)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_error_feedback_keeps_the_sum_of_what_was_sent_within_a_step_of_the_true_sum(bits):
    codec = Codec(bits, 64)
    fed, plain = ErrorFeedback(codec, 640, torch.device("cpu")), torch.zeros(640, dtype=torch.float64)
    true_sum, sent_sum = torch.zeros(640, dtype=torch.float64), torch.zeros(640, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        # a drift the rounding keeps cutting off: without feedback it adds up
        x = torch.randn(640, generator=g) * 1e-3 + 2e-4
        true_sum += x.double()
        sent_sum += codec.decode(fed.encode(x)[0], 640).double()
        plain += codec.decode(codec.encode(x), 640).double()
    gap = (sent_sum - true_sum).abs()
    assert torch.allclose(sent_sum - true_sum, -fed.residual.double(), atol=1e-6)
    # blocks of 64 such values peak below 5e-3: half a step is below 2.5e-3 / q (fp16: half an ulp of 5e-3)
    assert gap.max() <= (2.5e-3 / codec.qmax if bits < 16 else 2e-6)
    if bits < 16:
        assert (plain - true_sum).abs().max() > 10 * gap.max(), "without feedback the rounding error accumulates"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean_worker(rank: int, world: int, port: int, bits: int, block: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # 1,000 values in 167 blocks of 6 over 3 ranks: chunks of 55, 56 and 56 blocks, 4-bit chunks of an odd number
    # of bytes, so scales at odd offsets in the gathered buffers (fp16: chunks of 333, 333 and 334 values)
    numel = 1000
    mean = QuantizedMean(numel, bits, block, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(10 + rank)
    applied, true = torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64)
    sent = []
    for _ in range(60):
        x = torch.randn(numel, generator=g) * 1e-2 * (rank + 1) + 1e-3
        everyone = [torch.empty(numel) for _ in range(world)]
        dist.all_gather(everyone, x)
        result, n = mean(x, Link())
        exact = torch.stack(everyone).double().mean(0)
        applied += result.double()
        true += exact
        sent.append(n)
    results = [torch.empty(numel, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(results, applied)
    residuals = [torch.empty(mean.sent.residual.numel()) for _ in range(world)]
    dist.all_gather(residuals, mean.sent.residual)
    owned = [torch.zeros(mean.sent.residual.numel()) for _ in range(world)]
    lo, hi = mean.bounds[rank]
    owned[rank][lo:hi] = mean.owned.residual
    for t in owned:
        dist.all_reduce(t)
    if rank == 0:
        carried = torch.stack(residuals).mean(0) + torch.stack(owned).sum(0)  # what the two roundings hold back
        out.put({"identical": all(torch.equal(results[0], r) for r in results),
                 "gap_vs_carried": (applied - true + carried[:numel].double()).abs().max().item(),
                 "gap": (applied - true).abs().max().item(), "sent": sent,
                 "chunk_bytes": mean.chunk_bytes})
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize(("bits", "block"), [(4, 6), (16, 64)])
def test_quantised_mean_over_three_ranks_agrees_everywhere_and_its_sum_tracks_the_true_one(bits, block):
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_mean_worker, args=(3, free_port(), bits, block, out), nprocs=3, start_method="spawn")
    r = out.get()
    assert r["identical"], "ranks applied different means"
    # Error feedback on both roundings: the applied sum is the true sum less what is still carried …
    assert r["gap_vs_carried"] < 1e-5
    # … which is under one quantisation step, while a single round can be off by more.
    step = 0.03 * 3 / (7 if bits == 4 else 2 ** 11)
    assert r["gap"] < step
    widest = max(r["chunk_bytes"])
    assert r["sent"] == [sum(r["chunk_bytes"][1:]) + 2 * widest] * 60  # rank 0: all-to-all, then all-gather


def _delayed_worker(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for merge in ("replay", "mix"):
        cfg = load_config("tiny", ["dist.sync=diloco", "dist.outer_lr=1", "dist.outer_momentum=0", "dist.sync_every=4",
                                   "dist.stream_delay=2", f"dist.stream_merge={merge}", "dist.stream_mix=0.25",
                                   "dist.pseudo_grad_bits=32", "dist.world_size=2"])
        torch.manual_seed(0)
        model = build_model(cfg.model, 100)
        sync = DiLoCo(cfg, torch.device("cpu"))
        sync.wrap(model)
        flat = FlatParams(list(model.parameters()))
        for step in range(1, 7):
            with torch.no_grad():  # stands in for an inner optimizer step: each rank moves its own way
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * rank + step)) * 0.01)
            before = flat.read(0, flat.numel)
            sync.after_step(step)
            after = flat.read(0, flat.numel)
            if step == 4:
                sent = before
                both = [torch.empty_like(sent) for _ in range(2)]
                dist.all_gather(both, sent)
                assert torch.equal(after, before), "sending leaves the weights alone: training goes on"
            if step == 6:  # the update sent after step 4 arrives after step 6
                mean = (both[0] + both[1]) / 2  # outer lr 1, no momentum: the new global weights are the mean
                expected = mean + (before - sent) if merge == "replay" else 0.25 * before + 0.75 * mean
                out.put((rank, merge, (after - expected).abs().max().item(), (before - sent).abs().max().item()))
        dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_a_delayed_update_lands_on_the_steps_taken_meanwhile_by_the_configured_rule():
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_delayed_worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    results = [out.get() for _ in range(4)]
    assert {(rank, merge) for rank, merge, _, _ in results} == {(r, m) for r in (0, 1) for m in ("replay", "mix")}
    for rank, merge, error, moved in results:
        assert moved > 0.01, "the worker trained on while the update travelled"
        assert error < 1e-6, f"rank {rank}, {merge}: not the delayed-update rule"


def test_fragments_cover_every_parameter_exactly_once_per_cycle():
    model = build_model(load_config("tiny").model, 300)
    flat = FlatParams(list(model.parameters()))
    assert flat.numel == sum(p.numel() for p in model.parameters())
    for fragments, every in [(1, 8), (3, 8), (4, 32), (5, 5)]:
        bounds, offsets = fragment_bounds(flat.numel, fragments), fragment_offsets(every, fragments)
        assert offsets[-1] == every and len(set(offsets)) == fragments
        for cycle in range(3):
            sent = [p for step in range(cycle * every + 1, (cycle + 1) * every + 1)
                    for p in fragments_due(step, every, offsets)]
            assert sorted(sent) == list(range(fragments)), (fragments, every, cycle, sent)
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            for p in sent:
                lo, hi = bounds[p]
                flat.write_(lo, hi, flat.read(lo, hi) + 1)
            for name, p in model.named_parameters():
                assert (p == 1).all(), f"{name}: covered {p.min().item()}…{p.max().item()} times"


def test_link_queues_transfers_and_holds_them_for_their_time():
    link = Link(mbps=8, latency_ms=50)  # a megabyte a second
    first, second = link.reserve(500_000), link.reserve(250_000)
    assert second - first == pytest.approx(0.25)  # the second waits for the first to leave the link
    assert link.busy_s == pytest.approx(0.5 + 0.25 + 2 * 0.05)
    started = time.monotonic()
    Link(mbps=8, latency_ms=50).hold(1000)
    assert time.monotonic() - started >= 0.051  # its millisecond on the wire, then the latency
    assert not Link().shaped and Link().reserve(10**9) == 0.0
    assert ring_all_reduce_bytes(400, 2) == 400 and ring_all_reduce_bytes(400, 4) == 600


@pytest.mark.parametrize(("overrides", "message"), [
    (["dist.pseudo_grad_bits=3"], "dist.pseudo_grad_bits must be one of 32, 16, 8, 4"),
    (["dist.sync_every=8", "dist.stream_fragments=4", "dist.stream_delay=2"], "must be below"),
    (["dist.sync_every=4", "dist.stream_fragments=5"], "is above dist.sync_every"),
    (["dist.quant_block=63"], "must be even"),
    (["dist.stream_mix=1.5"], "dist.stream_mix must be <= 1"),
    (["dist.link_mbps=-1"], "dist.link_mbps must be >= 0"),
])
def test_low_communication_keys_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["dist.sync=diloco", *overrides])


def test_the_retired_fp16_key_of_saved_configs_still_reads():
    assert load_config("tiny", ["dist.pseudo_grad_fp16=true"]).dist.pseudo_grad_bits == 16
    assert load_config("tiny", ["dist.pseudo_grad_fp16=false"]).dist.pseudo_grad_bits == 32
    with pytest.raises(ConfigError, match="dist.pseudo_grad_fp16 must be true or false"):
        load_config("tiny", ["dist.pseudo_grad_fp16=maybe"])
