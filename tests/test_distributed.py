"""Distributed training on CPU with gloo: real torchrun launches of 2 workers on the tiny model."""

import math
import os
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from planted import plant, rewrite_manifest
from safetensors.torch import load_file

from hanlm.checkpoint import load_checkpoint, load_latest
from hanlm.config import load_config
from hanlm.log import read_metrics
from hanlm.models import build_model
from hanlm.train.diloco import DiLoCo
from hanlm.train.quantize import Codec

COMMON = ["--config", "tiny", "--set", "log.peak_tflops=0.1", "--set", "log.every_steps=1",
          "--set", "log.progress=false", "--set", "log.tensorboard=false", "--set", "generate.max_tokens=5"]


def hanlm_train(run_dir, *args, timeout=300, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hanlm.cli", "train", *COMMON, "--set", f"train.run_dir={run_dir}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def comm_total(run_dir, step: int = 10) -> int:
    """Bytes rank 0 all-reduced over the whole run, as its final checkpoint records them."""
    ckpt = load_checkpoint(str(run_dir / "checkpoints" / f"step-{step:08d}"))
    return ckpt.train_state["ranks"][0]["sync"]["bytes_total"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    hanlm_train(run_dir, "--nproc", "2", "--set", "train.max_steps=10", "--set", "train.micro_batch=4")
    return run_dir


def test_ddp_on_two_ranks_matches_one_process_with_twice_the_batch(ddp_run, tmp_path):
    single = tmp_path / "single"
    hanlm_train(single, "--set", "train.max_steps=10", "--set", "train.micro_batch=8")
    two, one = train_losses(ddp_run), train_losses(single)
    assert len(two) == len(one) == 10
    assert max(abs(a - b) for a, b in zip(two, one)) < 1e-5
    w2 = load_file(str(ddp_run / "checkpoints" / "step-00000010" / "model.safetensors"))
    w1 = load_file(str(single / "checkpoints" / "step-00000010" / "model.safetensors"))
    for name in w1:  # Adam's m / √v turns the ranks' other summation order into larger steps where a weight's
        diff = (w1[name] - w2[name]).abs()  # gradient is near 0: a few elements in a thousand, never more
        assert diff.max() < 5e-4 and (diff > 1e-5).float().mean() < 1e-3, name


def test_muon_under_ddp_matches_one_process_and_is_the_inner_optimizer_of_diloco(tmp_path):
    muon = ["--set", "train.optimizer=muon", "--set", "train.max_steps=10"]
    two, single = tmp_path / "two", tmp_path / "single"
    hanlm_train(two, "--nproc", "2", *muon, "--set", "train.micro_batch=4")
    hanlm_train(single, *muon, "--set", "train.micro_batch=8")
    # torch's Muon orthogonalises in bf16, which turns the ranks' different summation order into
    # differences of ~1e-4 (AdamW's DDP run matches to 1e-5).
    assert max(abs(a - b) for a, b in zip(train_losses(two), train_losses(single))) < 2e-3
    diloco = tmp_path / "diloco"
    hanlm_train(diloco, "--nproc", "2", *muon, "--set", "train.micro_batch=4", "--set", "dist.sync=diloco",
                "--set", "dist.sync_every=4")
    ckpt = load_checkpoint(str(diloco / "checkpoints" / "step-00000010"))
    assert set(ckpt.train_state["ranks"][0]["optimizer"]) == {"muon", "adamw"}
    local = [r["sync"]["local"] for r in ckpt.train_state["ranks"]]
    assert all(torch.equal(a, b) for a, b in zip(*local))
    assert train_losses(diloco)[-1] < train_losses(diloco)[0] - 0.5


def test_ddp_counts_the_gradient_bytes_it_all_reduces(ddp_run):
    ckpt = load_checkpoint(str(ddp_run / "checkpoints" / "step-00000010"))
    params = sum(t.numel() for t in ckpt.weights.values())
    assert comm_total(ddp_run) == 10 * params * 4  # fp32 gradients, every step
    logged = [r for r in read_metrics(ddp_run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["comm_bytes"] for r in logged] == [params * 4] * 10
    assert len(ckpt.train_state["ranks"]) == 2
    assert "bytes sent per rank (full)" in (ddp_run / "report.md").read_text(encoding="utf-8")


def _diloco_worker(rank: int, port: int, result_queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config("tiny", ["dist.sync=diloco", "dist.outer_lr=1", "dist.outer_momentum=0", "dist.sync_every=3",
                               "dist.world_size=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 100)
    sync = DiLoCo(cfg, torch.device("cpu"))
    sync.wrap(model)
    for step in range(1, 7):
        with torch.no_grad():  # stands in for an inner optimizer step: each rank moves its own way
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * rank + step)) * 0.01)
        before = [p.detach().clone() for p in model.parameters()]
        sync.after_step(step)
        if step % 3 == 0:
            mine = torch.cat([b.flatten() for b in before])
            gathered = [torch.empty_like(mine) for _ in range(2)]
            dist.all_gather(gathered, mine)
            after = torch.cat([p.detach().flatten() for p in model.parameters()])
            everyone = [torch.empty_like(after) for _ in range(2)]
            dist.all_gather(everyone, after)
            if rank == 0:
                result_queue.put((step, (after - (gathered[0] + gathered[1]) / 2).abs().max().item(),
                                  (everyone[0] - everyone[1]).abs().max().item(), sync.bytes_total))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as hanlm.train's workers do: gloo's threads can abort the interpreter's teardown


def test_diloco_with_outer_lr_1_and_no_momentum_averages_the_weights():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_diloco_worker, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = [queue.get() for _ in range(2)]
    params = sum(p.numel() for p in build_model(load_config("tiny").model, 100).parameters())
    for step, error_from_mean, ranks_apart, sent in results:
        assert error_from_mean < 1e-6, f"step {step}: not the average of the ranks' weights"
        assert ranks_apart == 0.0, f"step {step}: ranks hold different weights after the outer step"
    assert results[-1][3] == 2 * params * 4  # two synchronisations of fp32 pseudo-gradients


def packed_send_bytes(numel: int, bits: int, block: int = 64) -> int:
    """What rank 0 of 2 sends to average `numel` values packed at `bits`: the other rank's chunk in the
    all-to-all, then its own (the wider one, which the all-gather pads to) in the all-gather."""
    codec = Codec(bits, block)
    blocks = math.ceil(numel / codec.block)
    chunks = [codec.nbytes(blocks // 2 * codec.block), codec.nbytes((blocks - blocks // 2) * codec.block)]
    return chunks[1] + max(chunks)


def diloco_args(*extra: str) -> list[str]:
    return ["--nproc", "2", "--set", "train.micro_batch=4", "--set", "dist.sync=diloco",
            "--set", "dist.sync_every=4", *(a for kv in extra for a in ("--set", kv))]


def test_streaming_diloco_with_4_bit_fragments_switches_from_full_sync_and_resumes_exactly(ddp_run, tmp_path):
    # Warm-started from the DDP run's checkpoint, as the papers start DiLoCo from a full-sync phase.
    stream = ["dist.pseudo_grad_bits=4", "dist.stream_fragments=2", "dist.stream_delay=1", "train.max_steps=22",
              "checkpoint.every_steps=7", "checkpoint.keep_last=10"]
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    done = hanlm_train(first, *diloco_args(*stream), "--resume", str(ddp_run / "checkpoints" / "step-00000010"))
    assert "note: the checkpoint was saved with another dist.sync; DiLoCo's outer loop starts" in done.stdout
    # At step 14 fragment 1 (sent at 12) has had its outer step and fragment 0 (sent at 14) is on its way.
    mid = load_checkpoint(str(first / "checkpoints" / "step-00000014")).train_state["ranks"]
    assert [len(r["sync"]["pending"]) for r in mid] == [1, 1] and mid[0]["sync"]["pending"][0][:2] == [0, 15]
    momentum = mid[0]["sync"]["momentum"]
    assert not momentum[0].any() and momentum[1].abs().sum() > 0
    hanlm_train(resumed, *diloco_args(*stream), "--resume", str(first / "checkpoints" / "step-00000014"))
    straight = load_file(str(first / "checkpoints" / "step-00000022" / "model.safetensors"))
    again = load_file(str(resumed / "checkpoints" / "step-00000022" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight), "the resumed run is not the same run"
    assert train_losses(resumed) == train_losses(first)[4:]
    other = hanlm_train(tmp_path / "other", *diloco_args(*stream, "dist.stream_fragments=1", "dist.stream_delay=0"),
                        "--resume", str(first / "checkpoints" / "step-00000014"), check=False)
    assert other.returncode != 0
    assert "does not fit this run's split into 1 fragment(s) (dist.stream_fragments differs" in other.stderr
    losses = train_losses(first)
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3
    final = load_checkpoint(str(first / "checkpoints" / "step-00000022")).train_state["ranks"]
    assert all(torch.equal(a, b) for a, b in zip(final[0]["sync"]["local"], final[1]["sync"]["local"]))
    # Six fragment sends (steps 12 … 22), then at the end fragment 1 once more: it trained on after its update
    # arrived at step 21. Fragment 0's update, sent at the last step, lands on weights that have not moved since.
    params = sum(t.numel() for t in straight.values())
    sizes = [params // 2, params - params // 2]
    sent = comm_total(first, 22) - comm_total(ddp_run)
    assert sent == 3 * packed_send_bytes(sizes[0], 4) + 4 * packed_send_bytes(sizes[1], 4)
    assert sent * 20 < comm_total(ddp_run) * 12 / 10  # vs 12 steps of fp32 all-reduce: over 20× less


@pytest.mark.parametrize("sync", ["fp16", "powersgd"])
def test_compressed_sync_trains_to_a_lower_loss_with_fewer_bytes(ddp_run, tmp_path, sync):
    run_dir = tmp_path / sync
    hanlm_train(run_dir, "--nproc", "2", "--set", "train.max_steps=10", "--set", "train.micro_batch=4",
                "--set", f"dist.sync={sync}", "--set", "dist.powersgd_start_step=2")
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0] - 0.5
    assert comm_total(run_dir) < comm_total(ddp_run) * (0.5001 if sync == "fp16" else 0.5)
    if sync == "powersgd":
        state = load_checkpoint(str(run_dir / "checkpoints" / "step-00000010")).train_state["ranks"][1]["sync"]
        assert state["powersgd"]["iter"] >= 10 and state["powersgd"]["error"]


def test_bf16_compression_is_refused_on_gloo(tmp_path):
    done = hanlm_train(tmp_path, "--nproc", "2", "--set", "dist.sync=bf16", check=False)
    assert done.returncode == 2
    assert "dist.sync bf16 compresses through NCCL" in done.stderr


def test_a_killed_diloco_worker_is_restarted_and_ends_exactly_where_an_unbroken_run_does(tmp_path):
    quantised = ["dist.pseudo_grad_bits=8", "train.max_steps=24", "checkpoint.every_steps=4"]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    hanlm_train(unbroken, *diloco_args(*quantised))
    # Every outer step holds the simulated link for a second: after the checkpoint at step 8 the run has at
    # least four seconds to go, whatever the machine's speed, so the kill lands before it ends.
    cmd = [sys.executable, "-m", "hanlm.cli", "train", *COMMON, "--set", f"train.run_dir={broken}",
           *diloco_args(*quantised, "dist.link_latency_ms=1000"), "--max-restarts", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while (latest := load_latest(str(broken / "checkpoints"), warn=lambda _: None)) is None or latest.step < 8:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "hanlm.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    starts = [r for r in read_metrics(broken / "metrics.jsonl") if r["kind"] == "start"]
    assert len(starts) == 2 and 8 <= starts[1]["step"] < 24
    # The outer momentum, the error-feedback residuals and every worker's weights came back: bit for bit.
    a, b = (load_checkpoint(str(d / "checkpoints" / "step-00000024")) for d in (unbroken, broken))
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    # Six outer steps of 8-bit pseudo-gradients; none at the end: the last step was an outer step.
    assert comm_total(unbroken, 24) == 6 * packed_send_bytes(sum(t.numel() for t in a.weights.values()), 8)
    for x, y in zip(a.train_state["ranks"], b.train_state["ranks"]):
        assert all(torch.equal(m, n) for m, n in zip(x["sync"]["momentum"], y["sync"]["momentum"]))
        assert all(torch.equal(f["sent"], g["sent"]) for f, g in zip(x["sync"]["feedback"], y["sync"]["feedback"]))


def test_two_nodes_rendezvous_on_localhost(tmp_path):
    port = free_port()
    common = [sys.executable, "-m", "hanlm.cli", "train", *COMMON, "--set", "train.max_steps=5",
              "--set", "train.micro_batch=4", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    nodes = [subprocess.Popen([*common, "--node-rank", str(r), "--set", f"train.run_dir={tmp_path / f'node{r}'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
             for r in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "metrics.jsonl").exists()]
    assert len(written) == 1, "only the global rank 0 writes logs"
    assert "batch: 4 × 1 × 2 sequences of 64" in "".join(outs)


def test_spark_torch_distributor_runs_two_local_workers(tmp_path):
    run_dir = tmp_path / "spark"
    done = hanlm_train(run_dir, "--launcher", "spark", "--spark-local", "--nproc", "2", "--set", "train.max_steps=5",
                       "--set", "train.micro_batch=4", timeout=600)
    assert "batch: 4 × 1 × 2 sequences of 64" in done.stdout + done.stderr
    assert load_latest(str(run_dir / "checkpoints")).step == 5
    assert len(load_latest(str(run_dir / "checkpoints")).train_state["ranks"]) == 2


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    hanlm_train(run_dir, "--nproc", "2", "--set", "dist.shard=fsdp", "--set", "train.max_steps=10",
                "--set", "train.micro_batch=4", "--set", "checkpoint.every_steps=5")
    return run_dir


def test_fsdp_trains_like_ddp(fsdp_run, ddp_run):
    assert max(abs(a - b) for a, b in zip(train_losses(fsdp_run), train_losses(ddp_run))) < 1e-5
    sharded = load_file(str(fsdp_run / "checkpoints" / "step-00000010" / "model.safetensors"))
    replicated = load_file(str(ddp_run / "checkpoints" / "step-00000010" / "model.safetensors"))
    for name, t in replicated.items():  # the sharded run stores tied weights under both names
        assert torch.allclose(t, sharded[name], atol=1e-5), name
    files = {p.name for p in (fsdp_run / "checkpoints" / "step-00000010").iterdir()}
    assert files == {"model.safetensors", "config.yaml", "tokenizer.json", "train_state.safetensors",
                     "manifest.json"}  # the optimizer state is in train_state: nothing pickled
    # Each rank sends half of every gather: blocks twice (forward, backward), the root's own weights once,
    # and half of the gradients' reduce-scatter.
    blocks = sum(t.numel() for name, t in replicated.items() if name.startswith("blocks."))
    params = sum(t.numel() for t in replicated.values())
    assert comm_total(fsdp_run) == 10 * 4 * (2 * blocks + (params - blocks) + params) // 2


def test_fsdp_resumes_exactly_from_its_gathered_checkpoint(fsdp_run, tmp_path):
    hanlm_train(tmp_path, "--nproc", "2", "--set", "dist.shard=fsdp", "--set", "train.max_steps=10",
                "--set", "train.micro_batch=4", "--resume", str(fsdp_run / "checkpoints" / "step-00000005"))
    assert train_losses(tmp_path)[0] == pytest.approx(train_losses(fsdp_run)[5], abs=1e-6)
    straight = load_file(str(fsdp_run / "checkpoints" / "step-00000010" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "checkpoints" / "step-00000010" / "model.safetensors"))
    for name, t in straight.items():
        assert torch.allclose(t, resumed[name], atol=1e-6), name


def test_a_planted_pickle_in_an_fsdp_checkpoint_runs_nothing_on_resume(fsdp_run, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(fsdp_run / "checkpoints", run_dir / "checkpoints")
    newest, older = run_dir / "checkpoints" / "step-00000010", run_dir / "checkpoints" / "step-00000005"
    plant(newest / "optim" / ".metadata", marker)  # where torch.distributed.checkpoint kept its pickle
    for f in older.iterdir():
        if f.name != "manifest.json":
            plant(f, marker)
    rewrite_manifest(older)
    args = ("--nproc", "2", "--set", "dist.shard=fsdp", "--set", "train.micro_batch=4", "--set", "train.max_steps=12")
    hanlm_train(run_dir, *args, "--resume", "auto")
    assert load_latest(str(run_dir / "checkpoints")).step == 12
    done = hanlm_train(run_dir, *args, "--resume", str(older), check=False)
    assert done.returncode != 0 and "step-00000005/config.yaml is damaged" in done.stdout + done.stderr
    assert not marker.exists()


def test_fsdp_refuses_other_sync_strategies(tmp_path):
    done = hanlm_train(tmp_path, "--nproc", "2", "--set", "dist.shard=fsdp", "--set", "dist.sync=diloco", check=False)
    assert done.returncode == 2 and "cannot combine with dist.sync=diloco" in done.stderr
