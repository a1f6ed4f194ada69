"""The comparison harness: ``python -m comparisons {run, ...}``."""
