#!/usr/bin/env bash
# The GPU benchmark: hanlm's training step (tokens/s, MFU against the measured bf16 matmul peak) for
# the `base` (89 M parameters at the char vocabulary) and `1b` presets against transformers Llama and
# GPT-2 of the same shapes, and greedy decoding against transformers' generate; bf16 autocast, fused
# AdamW, torch.compile (hanlm) and flash SDPA. Meant to finish in under 10 minutes on one H200.
#
#   scripts/gpu_bench.sh                     # the real thing, on CUDA
#   scripts/gpu_bench.sh --device cpu --quick  # the same harness on a CPU, in a minute (how it is tested)
#
# Results: bench/results/<date>-<host>.{json,md} and PNG plots. Needs the bench extra:
#   pip install -e '.[bench]'   (with the CUDA build of torch already installed)
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --quick) extra+=(--quick); shift ;;
    --out) extra+=(--out "$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m hanlm.cli bench train generate --device "$device" "${extra[@]}"
