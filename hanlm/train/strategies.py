"""The one place that turns `dist.sync` / `dist.shard` into a synchronisation strategy.

It sits above both the strategies' base module (`hanlm.train.sync`) and DiLoCo, which builds on it.
"""

from __future__ import annotations

import torch

from hanlm.config import Config
from hanlm.train.collectives import Link
from hanlm.train.diloco import DiLoCo
from hanlm.train.sync import DDPSync, FSDPSync, Sync


def build_sync(cfg: Config, device: torch.device, world_size: int) -> Sync:
    """The strategy `dist.sync` names; plain `Sync` for a single worker."""
    if world_size == 1:
        return Sync()
    link = Link(cfg.dist.link_mbps, cfg.dist.link_latency_ms)
    if cfg.dist.shard == "fsdp":
        return FSDPSync(cfg, world_size, link)
    if cfg.dist.sync == "diloco":
        return DiLoCo(cfg, device, link)
    return DDPSync(cfg, device, link, world_size)
