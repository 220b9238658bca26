"""MRISegAssist in the browser: a trame-slicer application (Slicer views + the MRISegAssist panel) that
drives the same MRML logic as the Slicer module. Start it with ``mrisegassist serve``.

Importing this package imports nothing heavy; :func:`create_app` and :func:`serve` import trame-slicer.
"""
from __future__ import annotations


def create_app(server=None, **kwargs):
    """Build :class:`~MRISegAssistWeb.app.MRISegAssistWebApp` on a trame server (or server name)."""
    from .app import create_app as _create

    return _create(server, **kwargs)


def serve(**kwargs) -> int:
    """Build and run the server (blocking); see :func:`MRISegAssistWeb.server.serve`."""
    from .server import serve as _serve

    return _serve(**kwargs)
