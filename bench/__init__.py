"""Benchmarks: the bare relay ceiling, the detector and the naive path, measured in one run."""
