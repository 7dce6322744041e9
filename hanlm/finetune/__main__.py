"""The fine-tuning worker torchrun runs: `torchrun --nproc-per-node 2 -m hanlm.finetune [--config F] [--set K=V]`.

`hanlm finetune --nproc N` launches it for you.
"""

from __future__ import annotations

import os
import sys

from hanlm.finetune.run import run_finetune_worker

if __name__ == "__main__":
    code = run_finetune_worker(sys.argv[1:])
    # As hanlm.train's worker: skip the interpreter's teardown, where gloo's threads can abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
