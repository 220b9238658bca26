"""Benchmarks (``mrisegassist bench ...``). Each prints figures against a baseline run in the same process."""
