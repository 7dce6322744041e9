"""Bounds shared by config keys, command-line flags and the server's request fields, so that each value
has one rule wherever it is given."""

from __future__ import annotations

# Seeds fit a signed 64-bit integer, as OpenAI's do; torch takes at most 2^64 − 1, and choice i of a
# request is seeded with seed + i.
SEED_LIMIT = 1 << 63
# No model here generates 2^20 tokens in less than hours; the cap matters for the LSTM and n-gram,
# which have no context to bound max_tokens.
MAX_TOKENS_LIMIT = 1 << 20
# top_k at or above the vocabulary size is off; 2^31 − 1 is above every vocabulary.
TOP_K_LIMIT = (1 << 31) - 1
TEMPERATURE_MAX = 2.0  # OpenAI's bound
# Threads for torch: far above any machine's cores, far below what makes OpenMP's runtime crash (100,000 did).
THREADS_MAX = 1024
# Processes on one machine (hanlm train / finetune --nproc).
NPROC_MAX = 1024
# Positions and widths: 2^20 tokens of context, 2^16 channels are beyond any model hanlm trains, and refuse
# values whose tables alone would fill the machine before the memory pre-flight can speak.
CONTEXT_MAX = 1 << 20
WIDTH_MAX = 1 << 16
# Counts of steps, tokens and bytes: 2^40 steps is beyond any run; 2^60 tokens beyond any corpus.
STEPS_MAX = 1 << 40
TOKENS_MAX = 1 << 60
