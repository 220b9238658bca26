"""``mrisegassist serve``: the browser front end (trame-slicer), started as ``python -m MRISegAssistWeb``.

The web application is a front end of its own: this command only checks that it is installed and runs it in a
child process with the same options (``mrisegassist serve --help`` shows them), so the command line never
imports it.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from ..errors import InputError


def register(sub) -> None:
    parser = sub.add_parser("serve", add_help=False, prefix_chars="\0",
                            help="serve the segmentation assistant to a web browser (Slicer views + panel)",
                            description="Runs `python -m MRISegAssistWeb` with these options (see --help).")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of python -m MRISegAssistWeb")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("trame_slicer", "slicer", "MRISegAssistWeb") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"the browser front end needs {', '.join(missing)}: pip install 'mrisegassist[web]'")
    process = subprocess.Popen([sys.executable, "-m", "MRISegAssistWeb", *args.options])
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
