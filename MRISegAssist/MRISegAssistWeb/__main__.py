"""``python -m MRISegAssistWeb [options]``: serve the browser front end (``mrisegassist serve`` runs this)."""
from __future__ import annotations

import argparse
import os
import sys

from mrisegassist.errors import InputError
from mrisegassist.service.auth import DEFAULT_HOST

TOKEN_ENV = "MRISEGASSIST_TOKEN"
COMPUTE_TOKEN_ENV = "MRISEGASSIST_SERVER_TOKEN"


def build_parser(prog: str = "python -m MRISegAssistWeb") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve MRISegAssist in a web browser. Binds 127.0.0.1 by default; bound to another "
                               "address an access token is required (generated and printed when not given).")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--data", metavar="DIR", help="data folder the page may open studies from (only this folder)")
    parser.add_argument("--output", metavar="DIR", help="folder Save writes to (default ./mrisegassist-output)")
    parser.add_argument("--token", help=f"access token required on every request (or set ${TOKEN_ENV}); "
                                        "generated when binding a non-loopback address without one")
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="size limit of one upload (MB)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), help="torch device (default: best available)")
    parser.add_argument("--compute-server", metavar="URL",
                        help="segment on this segmentation server (`mrisegassist server`, e.g. a GPU machine) "
                             "instead of in this process")
    parser.add_argument("--compute-token", help=f"that server's access token (or set ${COMPUTE_TOKEN_ENV})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from .server import serve

        return serve(host=args.host, port=args.port, data_dir=args.data, output_dir=args.output,
                     token=args.token or os.environ.get(TOKEN_ENV) or None, max_upload_mb=args.max_upload_mb,
                     device=args.device, compute_server=args.compute_server,
                     compute_token=args.compute_token or os.environ.get(COMPUTE_TOKEN_ENV) or None)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
