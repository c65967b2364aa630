"""Benchmarks of sfg_fast: one script per op or workload, sharing bench/common.py."""
