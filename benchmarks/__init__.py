"""Benchmarks of vpgtrans: one command per benchmark (``python -m benchmarks.NAME``); each prints a
table and writes JSON + a PNG plot. See docs/benchmarks.md."""
