"""Benchmarks: each runs tokenmill and its peer in the same run on the same input and prints the ratio."""
