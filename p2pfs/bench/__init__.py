"""Benchmarks: each prints a table comparing p2pfs with a reference measured in the same run."""
