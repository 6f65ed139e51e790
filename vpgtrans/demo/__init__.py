"""A synthetic visual world and a tiny model zoo built from it, offline, for the demo, tests and benchmarks."""
