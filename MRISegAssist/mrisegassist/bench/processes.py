"""Server processes for benchmarks and tests: ``python -m MODULE ARGS`` on a free port, ready once it prints
``MRISegAssist serving at URL`` (the line both ``mrisegassist server`` and ``mrisegassist serve`` print)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

from ..service.protocol import READY_PREFIX

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding mrisegassist (and MRISegAssistWeb)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m MODULE --port P ARGS`` in a subprocess (``module``: ``MRISegAssistWeb`` for the browser front
    end, ``mrisegassist server`` for the segmentation server); ``url`` once it listens, its output in ``log``."""

    def __init__(self, *args: str, module: str = "MRISegAssistWeb", timeout: float = 300.0,
                 env: Optional[dict] = None) -> None:
        self.args = ["--port", str(free_port()), *args]
        cmd = [sys.executable, "-X", "faulthandler", "-m", *module.split(), *self.args]
        environ = {**os.environ, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=PACKAGE_ROOT, env=environ, bufsize=1)
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{self.log[-4000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX):].strip()
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(line for line in self.lines if "WindowResizeEvent" not in line and "ConfigureEvent" not in line)

    @property
    def base(self) -> str:
        """``http://host:port`` without path or token."""
        return self.url.split("/?")[0].rstrip("/")

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
