"""Benchmarks: each module has main(argv) -> int and reports ratios against a baseline from the same run."""
