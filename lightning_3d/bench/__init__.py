"""Benchmarks: figures measured side by side, with the commands in docs/benchmarks.md."""
