"""Benchmark suites: each measures hanlm beside its peers in the same run."""

SUITES = ("train", "generate", "data", "dist", "ngram", "serve")  # `hanlm bench` runs them in this order
