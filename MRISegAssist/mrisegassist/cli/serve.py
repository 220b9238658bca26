"""``mrisegassist serve``: the browser front end (trame-slicer; imported only when the command runs)."""
from __future__ import annotations

import argparse
import os

from ..errors import InputError

TOKEN_ENV = "MRISEGASSIST_TOKEN"


def register(sub) -> None:
    parser = sub.add_parser(
        "serve", help="serve the segmentation assistant to a web browser (Slicer views + panel)",
        description="Serve MRISegAssist in a web browser. Binds 127.0.0.1 by default; bound to another "
                    "address an access token is required (generated and printed when not given).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--data", metavar="DIR", help="data folder the page may open studies from (only this folder)")
    parser.add_argument("--output", metavar="DIR", help="folder Save writes to (default ./mrisegassist-output)")
    parser.add_argument("--token", help=f"access token required on every request (or set ${TOKEN_ENV}); "
                                        "generated when binding a non-loopback address without one")
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="size limit of one upload (MB)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), help="torch device (default: best available)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("trame_slicer", "slicer", "MRISegAssistWeb") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"the browser front end needs {', '.join(missing)}: pip install 'mrisegassist[web]'")
    from MRISegAssistWeb import serve

    return serve(host=args.host, port=args.port, data_dir=args.data, output_dir=args.output,
                 token=args.token or os.environ.get(TOKEN_ENV) or None, max_upload_mb=args.max_upload_mb,
                 device=args.device)
