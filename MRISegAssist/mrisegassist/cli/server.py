"""``mrisegassist server``: the segmentation service over HTTP, holding models between calls (GPU when present).

Clients: the Slicer panel (remote mode, or its local worker), the browser front end (``--compute-server``) and
the CLI (``segment``, ``prompt``, ``auto`` with ``--server URL --token T``). Protocol: ``mrisegassist.service
.protocol``.
"""
from __future__ import annotations

import argparse
import os

from ..service.auth import DEFAULT_HOST

TOKEN_ENV = "MRISEGASSIST_SERVER_TOKEN"


def register(sub) -> None:
    p = sub.add_parser(
        "server", help="serve segmentation to clients over HTTP (models stay loaded; GPU when present)",
        description="Serve the segmentation service (U-Net, box prompts, atlas boxes) over HTTP. Binds 127.0.0.1 "
                    "by default; bound to another address an access token is required (generated and printed when "
                    "not given). Requests carry volumes, never paths: clients reach nothing on this machine's disk.")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--token", help=f"access token clients must send (or set ${TOKEN_ENV}); generated when binding "
                                   "a non-loopback address without one")
    p.add_argument("--device", choices=("cpu", "cuda", "mps"), help="torch device (default: the best available)")
    p.add_argument("--max-request-mb", type=float, default=1024.0, help="size limit of one request (MB)")
    p.add_argument("--jobs", type=int, default=1, help="jobs run at once (default 1; others queue)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let requests name files on this machine (model folders, checkpoints, reference sets) and "
                        "download weights: for a worker serving only its own user (the Slicer panel's local worker)")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service.server import serve

    return serve(host=args.host, port=args.port, token=args.token or os.environ.get(TOKEN_ENV) or None,
                 device=args.device, max_request_mb=args.max_request_mb, allow_local_files=args.allow_local_files,
                 jobs=args.jobs, ready_file=args.ready_file, exit_with_stdin=args.exit_with_stdin)
