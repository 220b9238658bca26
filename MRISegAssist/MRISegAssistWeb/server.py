"""Running the browser front end: bind policy, the printed address, the blocking server loop."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from mrisegassist.errors import InputError
from mrisegassist.service.protocol import READY_PREFIX

from . import security


@contextmanager
def _plain_argv() -> Iterator[None]:
    """trame parses ``sys.argv`` itself; hide ``mrisegassist serve``'s own options from it."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def page_url(host: str, port: int, token: Optional[str]) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?{security.TOKEN_QUERY}={token}" if token else "")


def serve(host: str = security.DEFAULT_HOST, port: int = 8080, data_dir: Optional[str] = None,
          output_dir: Optional[str] = None, token: Optional[str] = None,
          max_upload_mb: float = security.DEFAULT_MAX_UPLOAD_MB, device: Optional[str] = None,
          server_name: str = "mrisegassist", compute_server: Optional[str] = None,
          compute_token: Optional[str] = None) -> int:
    """Serve the page on ``host:port`` until interrupted (``port=0``: a free port, printed when ready).

    On loopback no token is needed unless given; elsewhere one is required and generated when missing. The
    address (with its token) is printed as ``MRISegAssist serving at http://...`` once the server listens.
    """
    if not 0 <= int(port) <= 65535:
        raise InputError(f"port {port} is outside 0..65535")
    if max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be positive")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise InputError(f"{data_dir}: data folder does not exist")
    token, generated = security.access_token_for(host, token)
    loopback = security.is_loopback(host)
    with _plain_argv():
        from trame.app import get_server

        from .app import create_app

        server = get_server(server_name, client_type="vue3")
        app = create_app(server, data_dir=data_dir, output_dir=output_dir, token=token, loopback_only=loopback,
                         max_upload_mb=max_upload_mb, device=device, compute_server=compute_server,
                         compute_token=compute_token)

        def announce(**_) -> None:
            if generated:
                print(f"access token generated (bound to {host}, not loopback): give it only to your users",
                      flush=True)
            print(READY_PREFIX + page_url(host, server.port, token), flush=True)

        server.controller.on_server_ready.add(announce)
        try:
            server.start(port=int(port), host=host, open_browser=False, show_connection_info=False, timeout=0,
                         disable_logging=True)
        finally:
            app.close()
    return 0
