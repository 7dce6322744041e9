"""Spark launcher: the same training workers, started by pyspark's TorchDistributor (Spark 4, Java 17).

For users whose cluster runs Spark on YARN or Kubernetes: submit `hanlm train --launcher spark
--nproc N ...` with spark-submit and the workers run as Spark barrier tasks on the executors
(`--spark-local` runs them on the driver instead). TorchDistributor starts each group of workers
with torchrun, so the run is the same as `hanlm train --nproc N`, with one difference: it does no
elastic restart. A failed worker fails the job; start it again with `--resume auto`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hanlm.errors import ConfigError


def launch_on_spark(worker_args: list[str], *, nproc: int, local: bool) -> int:
    """Run `nproc` training workers through TorchDistributor; 0 when they all succeeded."""
    try:
        from pyspark.ml.torch.distributor import TorchDistributor
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("--launcher spark needs pyspark: pip install 'hanlm[spark]' (Spark 4 wants Java 17)") \
            from None
    SparkSession.builder.appName("hanlm train").getOrCreate()  # spark-submit's master, else local[*]
    worker = Path(__file__).with_name("__main__.py")  # the module torchrun runs as `-m hanlm.train`
    distributor = TorchDistributor(num_processes=nproc, local_mode=local, use_gpu=torch.cuda.is_available())
    try:
        distributor.run(str(worker), *worker_args)
    except RuntimeError as e:
        print(f"hanlm: error: a Spark training worker failed: {e}", file=sys.stderr)
        return 1
    return 0
