"""Benchmarks: scripts that measure, not tests. `python -m benchmarks` runs them all (see docs/performance.md)."""
