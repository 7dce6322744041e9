"""Benchmark suites: each measures hanlm beside its peers in the same run."""
