"""``mrisegassist report RESULTS -o report.html``: the study report of a batch (one HTML page with embedded
plots: volumes, Dice per label, Dice by each grouping column with counts, time and energy per study, the worst
studies with overlay thumbnails, failed studies)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import add_json_flag, emit


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML study report of a batch's results table", description=__doc__)
    p.add_argument("results", help="results folder of `mrisegassist batch`, or its results.parquet / .csv")
    p.add_argument("-o", "--output", help="HTML file (default: RESULTS/report.html)")
    p.add_argument("--title", default="MRISegAssist study report")
    p.add_argument("--worst", type=int, default=5, help="number of worst studies shown with thumbnails")
    add_json_flag(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..batch.report import write_report

    results = Path(args.results)
    output = Path(args.output) if args.output else (results if results.is_dir() else results.parent) / "report.html"
    path = write_report(results, output, args.title, args.worst)
    emit(args, {"report": str(path)}, lambda d: f"wrote {d['report']}")
    return 0
