"""``mrisegassist bench NAME``: benchmarks that print figures (ratios against a baseline run in the same
process). Each benchmark lives in ``mrisegassist.bench.<module>`` and registers itself with
``register(subparsers)``."""
from __future__ import annotations

import importlib

BENCH_MODULES = ("unet", "prompt", "prompt_accuracy", "atlas", "web", "metrics")


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (speed, memory, accuracy) that print figures")
    inner = parser.add_subparsers(dest="bench", metavar="BENCH")
    inner.required = True
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(f"mrisegassist.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mrisegassist.bench.{name}":
                continue  # benchmark not built yet
            raise
        module.register(inner)
