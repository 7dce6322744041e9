"""Process group, rank helpers and the torchrun launcher.

Workers are started by torchrun (`torch.distributed.run`), either through `hanlm train --nproc N`
or directly as `torchrun -m hanlm.train ...`; each reads its rank from the environment torchrun
sets. With one process nothing is initialised and every helper is a no-op.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hanlm.config import Config
from hanlm.errors import ConfigError, HanlmError
from hanlm.train.device import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    restart: int  # how many times torchrun has restarted the workers (elastic restarts)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, reports and the shared parts of checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """This process's place in the job, from the variables torchrun sets (defaults: alone)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))


def init_process_group(cfg: Config, device: torch.device) -> DistInfo:
    """Join the job's process group (gloo on CPU, NCCL on CUDA unless dist.backend says otherwise)."""
    info = env_info()
    if info.distributed and not dist.is_initialized():
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("dist.backend nccl needs CUDA devices; use dist.backend=gloo on CPU")
        dist.init_process_group(backend, store=_round_store(info), rank=info.rank, world_size=info.world_size,
                                device_id=device if backend == "nccl" else None)
    return info


def _round_store(info: DistInfo) -> dist.Store:
    """The rendezvous store torchrun points at, under a prefix of its own for each restart round.

    Without the prefix, workers of a restarted round can read the addresses the previous
    round's (dead) workers published and fail to connect.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                          is_master=info.rank == 0 and not agent_hosts_it, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"hanlm/round-{info.restart}/", store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """The mean of a scalar over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def agreed_reason(reason: str | None, reasons: Sequence[str]) -> str | None:
    """The reason to stop that every rank acts on: of those the ranks give, the one latest in `reasons`
    (None when no rank has one), so that none is left waiting in a collective."""
    if not dist.is_initialized():
        return reason
    code = torch.tensor([reasons.index(reason) + 1 if reason else 0])
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return reasons[int(code) - 1] if int(code) else None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random number generator states (torch's, and the device's on CUDA)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list in rank order), None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(together: bool) -> None:
    """Leave the process group. After a successful run the ranks leave together: one that tears
    down gloo while a peer still holds a connection can abort ("terminate called without an
    active exception"). After a failure they don't wait for each other."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def run_worker(job: Callable[[], int]) -> int:
    """Run one worker's `job` and leave the process group: together after success, at once after a
    failure. A HanlmError is printed with the rank (exit code 2), not raised."""
    try:
        code = job()
    except HanlmError as e:
        print(f"hanlm: error (rank {env_info().rank}): {e}", file=sys.stderr)
        shutdown(together=False)
        return 2
    except BaseException:
        shutdown(together=False)
        raise
    shutdown(together=True)
    return code


def setup_worker(cfg: Config, info: DistInfo) -> torch.device:
    """This worker's device (its own GPU by local rank under CUDA), joined to the process group, with
    train.threads applied and the seed set (the same on every rank: identical initial weights)."""
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    init_process_group(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    return device


def torchrun_args(worker_args: list[str], *, nproc: int, nnodes: int, node_rank: int,
                  rdzv_endpoint: str | None, max_restarts: int, module: str = "hanlm.train") -> list[str]:
    """torchrun's command line that runs `python -m <module> <worker_args>` on every worker
    (hanlm.train for training, hanlm.finetune for fine-tuning)."""
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    args = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1 and not rdzv_endpoint:
        args.append("--standalone")
    else:
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}"]
    return [*args, "-m", module, *worker_args]


def launch(worker_args: list[str], **launch_options: Any) -> int:
    """Run the workers through torchrun in this process; returns 0 when they all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(torchrun_args(worker_args, **launch_options))
    except ChildFailedError as e:
        print(f"hanlm: error: a worker failed: {e}", file=sys.stderr)
        return 1
    return 0
