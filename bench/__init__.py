"""Benchmarks (not tests): each prints figures and writes them to bench/results/."""
