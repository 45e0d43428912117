"""Latency harness and the demo report: programs (`python -m benchmarks.NAME --help`) and their helpers."""
