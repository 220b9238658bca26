"""``mrisegassist bench NAME``: benchmarks that print figures (ratios against a baseline run in the same
process). Each benchmark lives in ``mrisegassist.bench.<module>`` and registers itself with
``register(subparsers)``."""
from __future__ import annotations

from . import register_modules

BENCH_MODULES = ("unet", "prompt", "prompt_accuracy", "atlas", "web", "metrics", "service", "batch")


def register(sub) -> None:
    parser = sub.add_parser("bench", help="benchmarks (speed, memory, accuracy) that print figures")
    inner = parser.add_subparsers(dest="bench", metavar="BENCH")
    inner.required = True
    register_modules(inner, "mrisegassist.bench", BENCH_MODULES)
