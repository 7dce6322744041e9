"""The worker entry point torchrun runs: `torchrun --nproc-per-node 2 -m hanlm.train [--config F] [--set K=V]`.

`hanlm train --nproc N` launches it for you; it takes the same options as `hanlm train` minus
the launcher's.
"""

from __future__ import annotations

import os
import sys

from hanlm.train.run import run_training_worker

if __name__ == "__main__":
    code = run_training_worker(sys.argv[1:])
    # The run is over: saved, logged and out of the process group. Skip the interpreter's teardown,
    # where gloo's threads can still abort the process ("terminate called without an active
    # exception"; pytorch/pytorch#179291) and torchrun would report a finished worker as failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
