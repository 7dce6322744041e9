"""The worker entry point torchrun runs: `torchrun --nproc-per-node 2 -m hanlm.train [--config F] [--set K=V]`.

`hanlm train --nproc N` launches it for you; it takes the same options as `hanlm train` minus
the launcher's.
"""

from __future__ import annotations

import sys

from hanlm.cli import run_training_worker

if __name__ == "__main__":
    sys.exit(run_training_worker(sys.argv[1:]))
