"""The local worker: one ``mrisegassist server`` process started and owned by a front end (the Slicer panel).

It runs with Slicer's own Python (``PythonSlicer``, found on ``PATH`` inside Slicer as SlicerMONAIAuto3DSeg
does; else ``sys.executable``), bound to ``127.0.0.1`` on a free port with a random token, and holds the models
between calls, so Slicer's process only sends volumes and receives label maps. Nothing here blocks on the
worker's start or on a job: :meth:`LocalWorker.submit` returns at once and its submission is polled (it
starts the worker if needed, waits for it to listen, then uploads the request). The worker exits when told
(:meth:`LocalWorker.stop`, e.g. *Release models*) and by itself when the process that started it ends (its
standard input closes). If it dies, the running job fails with :class:`ServiceUnavailable` naming its exit
code and last log lines, and the next submission starts a new one.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..progress import CancelToken, ProgressFn
from .api import ServiceInfo, WeightsStatus
from .client import HttpClient, SegmentationClient, Submission
from .protocol import JobStatus, ServiceUnavailable

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the mrisegassist package


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` when it is on ``PATH`` (inside Slicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class LocalWorker(SegmentationClient):
    """A worker process on this machine (see module docstring).

    ``python``: interpreter to run it with (default :func:`python_executable`); ``device``: its torch device
    (default: the best available there); ``start_timeout``: seconds it may take to listen; ``env``: extra
    environment variables.
    """

    def __init__(self, python: Optional[str] = None, device: Optional[str] = None, start_timeout: float = 180.0,
                 env: Optional[dict] = None) -> None:
        self.python = python or python_executable()
        self.device = device
        self.start_timeout = start_timeout
        self.env = dict(env or {})
        self.process: Optional[subprocess.Popen] = None
        self.http: Optional[HttpClient] = None
        self.starts = 0
        self._folder: Optional[Path] = None
        self._log = None
        self._started_at = 0.0
        self._token = ""
        self.last_exit: Optional[int] = None

    @property
    def where(self) -> str:
        return "the local worker" + (f" (pid {self.process.pid})" if self.process is not None else "")

    # ------------------------------------------------------------------------------------- process
    def start(self) -> None:
        """Start the worker process (returns at once; :meth:`ready` says when it listens)."""
        if self.process is not None and self.process.poll() is None:
            return
        self._cleanup()
        self._folder = Path(tempfile.mkdtemp(prefix="mrisegassist-worker-"))
        self._token = secrets.token_urlsafe(24)
        cmd = [self.python, "-m", "mrisegassist", "server", "--host", "127.0.0.1", "--port", "0",
               f"--token={self._token}", "--ready-file", str(self._folder / "ready.json"), "--exit-with-stdin",
               "--allow-local-files"]
        if self.device:
            cmd += ["--device", self.device]
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                  else []))
        self._log = open(self._folder / "worker.log", "wb")
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, cwd=str(self._folder))
        self.http, self.last_exit = None, None
        self.starts += 1
        self._started_at = time.monotonic()

    def log_tail(self, lines: int = 15) -> str:
        """The worker's last output lines (for error messages)."""
        if self._folder is None or not (self._folder / "worker.log").is_file():
            return ""
        text = (self._folder / "worker.log").read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def _died(self) -> ServiceUnavailable:
        code = self.process.poll() if self.process is not None else None
        self.last_exit = code
        tail = self.log_tail()
        return ServiceUnavailable(f"the MRISegAssist worker process stopped (exit code {code}); a new one starts "
                                  f"on the next run" + (f". Its last output:\n{tail}" if tail else ""))

    def _lost(self, exc: ServiceUnavailable) -> ServiceUnavailable:
        """The error to report when the worker cannot be reached: its exit if it died (waiting up to a second
        for the system to report it), else ``exc``."""
        if self.process is not None:
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                return exc
        return self._died()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Non-blocking: True once the worker listens (its client is then :attr:`http`). Raises
        :class:`ServiceUnavailable` if it died or did not start in time."""
        if self.http is not None:
            if not self.alive:
                raise self._died()
            return True
        if self.process is None:
            self.start()
        if not self.alive:
            raise self._died()
        ready = self._folder / "ready.json"
        if ready.is_file():
            url = json.loads(ready.read_text())["url"]
            self.http = HttpClient(url, self._token)
            self.http.where = self.where
            return True
        if time.monotonic() - self._started_at > self.start_timeout:
            self.stop()
            raise ServiceUnavailable(f"the MRISegAssist worker did not start within {self.start_timeout:.0f} s"
                                     + (f". Its output:\n{self.log_tail()}" if self.log_tail() else ""))
        return False

    def wait_ready(self) -> HttpClient:
        """Start the worker if needed and block until it listens."""
        if not self.alive:
            self.start()
        while not self.ready():
            time.sleep(0.05)
        return self.http

    def status(self) -> str:
        """A short description for the panel: not started, starting, ready, stopped."""
        if self.process is None:
            return "not started" if self.last_exit is None else f"stopped (exit code {self.last_exit})"
        code = self.process.poll()
        if code is not None:
            return f"stopped (exit code {code}); restarts on the next run"
        if self.http is None:
            return f"starting (pid {self.process.pid})"
        return f"ready at {self.http.url} (pid {self.process.pid})"

    def stop(self) -> None:
        """Stop the worker (its models and GPU memory are freed with it)."""
        process, self.process = self.process, None
        if self.http is not None:
            self.http.close()
        self.http = None
        if process is not None:
            if process.poll() is None:
                try:
                    process.stdin.close()  # the worker exits when its standard input closes
                    process.wait(5)
                except (OSError, subprocess.TimeoutExpired):
                    process.terminate()
                    try:
                        process.wait(5)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
            self.last_exit = process.returncode
        self._cleanup()

    def _cleanup(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None and self.process is None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # -------------------------------------------------------------------------------------- client
    def submit(self, request) -> Submission:
        if not self.alive:
            self.start()
        return _WorkerSubmission(self, request)

    def call(self, request, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             interval: float = 0.05):
        http = self.wait_ready()
        try:
            return http.call(request, progress, cancel)
        except ServiceUnavailable as exc:
            raise self._lost(exc) from None

    def info(self) -> ServiceInfo:
        info = self.wait_ready().info()
        info.where = self.where
        return info

    def weights_status(self, engine: str) -> WeightsStatus:
        """The worker runs on this machine with these files: answered here, without starting it."""
        from .core import weights_status

        return weights_status(engine)

    def release(self) -> None:
        """Stop the worker: everything it held is freed; the next run starts a new one."""
        self.stop()

    def forget_volumes(self) -> None:
        if self.http is not None:
            self.http.close()

    def close(self) -> None:
        self.stop()


class _WorkerSubmission(Submission):
    """Waits (non-blocking) for the worker to listen, uploads the request, then follows the job."""

    def __init__(self, worker: LocalWorker, request) -> None:
        self.worker, self.request = worker, request
        self.inner = None
        self._cancelled = False
        self._final: Optional[JobStatus] = None

    def _fail(self, exc: Exception) -> JobStatus:
        self._final = JobStatus("failed", 0.0, "", "unavailable", str(exc))
        self._error = exc
        return self._final

    def poll(self) -> JobStatus:
        if self._final is not None:
            return self._final
        try:
            if self.inner is None:
                if self._cancelled:
                    self._final = JobStatus("cancelled", 0.0, "", "cancelled", "cancelled by the user")
                    return self._final
                if not self.worker.ready():
                    return JobStatus("starting", 0.0, "starting the local worker")
                self.inner = self.worker.http.submit(self.request)
                self.request = None
            status = self.inner.poll()
        except ServiceUnavailable as exc:
            return self._fail(self.worker._lost(exc))
        if status.final:
            self._final = status
        return status

    def cancel(self) -> None:
        self._cancelled = True
        if self.inner is not None and self._final is None:
            try:
                self.inner.cancel()
            except ServiceUnavailable:
                pass

    def result(self) -> Any:
        status = self.poll()
        if status.state == "failed" and status.error_kind == "unavailable":
            raise self._error
        try:
            return self.inner.result() if self.inner is not None else status.raise_error()
        except ServiceUnavailable as exc:
            raise self.worker._lost(exc) from None
