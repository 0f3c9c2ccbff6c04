"""Benchmarks (figures in BENCHMARKS.md) and the helpers only they and the tests use (baselines, switch check)."""
