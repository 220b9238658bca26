"""Long steps of the browser session: the logic's :class:`~MRISegAssistLib.tasks.Job` objects run with its
:class:`~MRISegAssistLib.tasks.BackgroundRunner`: the request is submitted to the logic's client (this process,
computing in a thread, or a segmentation server), its state polled, and MRML writes and page updates done on
the server's event loop (polled with ``loop.call_later``), so the page stays live, shows progress and can cancel.
"""
from __future__ import annotations

import asyncio
import logging
import time
from functools import wraps
from typing import Any, Callable, Optional

from mrisegassist.errors import Cancelled, InputError, MRISegAssistError

from MRISegAssistLib.tasks import BackgroundRunner, Job

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """The message the page shows: the engine's own message for user-facing errors, else type + message."""
    if isinstance(exc, MRISegAssistError):
        return str(exc)
    return f"internal error ({type(exc).__name__}): {exc}"


def page_action(fn: Callable) -> Callable:
    """A page callback that never breaks the page: errors become the ``error`` message shown in the panel."""

    @wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            self.state.error = ""
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged when unexpected
            if not isinstance(exc, InputError):
                log.exception("%s failed", fn.__name__)
            self.state.error = describe_error(exc)
            return None
        finally:
            self.state.actions += 1  # handled (a job it started may still run): automation waits on this

    return wrapper


class PageJobs:
    """One job at a time, reflected in page state: ``busy``, ``job_name``, ``progress`` (0-100),
    ``progress_msg``, ``error``, ``info``, and ``timing`` of the last finished job (seconds: ``engine_s``
    the logic's compute phase, ``apply_s`` its MRML writes, ``results_s`` the page's result update
    (``on_done``: segment list, metrics), ``step_s`` from the start to the page update).

    ``state`` is the trame state. Without a running event loop (in-process tests) nothing polls by itself:
    call :meth:`wait`.
    """

    def __init__(self, state, interval_ms: int = 100) -> None:
        self.state = state
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.runner = BackgroundRunner(schedule=self._schedule, interval_ms=interval_ms)
        self.started_at = 0.0
        self.last_duration = 0.0

    def _schedule(self, delay_ms: int, fn: Callable[[], None]) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_later(delay_ms / 1000.0, self._guarded, fn)

    def _guarded(self, fn: Callable[[], None]) -> None:
        with self.state:  # flush state changes made by poll() and the callbacks to the page
            fn()

    @property
    def busy(self) -> bool:
        return self.runner.busy

    def start(self, job: Job, on_done: Optional[Callable[[Any], Optional[str]]] = None) -> None:
        """Run ``job``; ``on_done(result)`` runs on the event loop and may return an info message."""
        if self.runner.busy:
            self.state.error = "another step is still running; wait for it or cancel it"
            return
        self.started_at = time.perf_counter()
        self.state.update({"busy": True, "job_name": job.description, "progress": 0.0, "progress_msg": "starting",
                           "error": "", "info": ""})

        def done(result: Any) -> None:
            self.last_duration = time.perf_counter() - self.started_at
            message = None
            try:
                message = on_done(result) if on_done is not None else None
            except Exception as exc:  # the page must survive any failure
                log.exception("finishing %s failed", job.description)
                self.state.error = describe_error(exc)
            step = time.perf_counter() - self.started_at
            self.state.timing = {"engine_s": round(self.runner.compute_seconds, 3),
                                 "apply_s": round(self.runner.apply_seconds, 3),
                                 "results_s": round(step - self.last_duration, 3), "step_s": round(step, 3)}
            self._finish(info=message or f"{job.description}: done in {self.last_duration:.1f} s")

        def failed(exc: BaseException) -> None:
            self.last_duration = time.perf_counter() - self.started_at
            if isinstance(exc, Cancelled):
                self._finish(info=f"{job.description}: cancelled")
            else:
                if not isinstance(exc, MRISegAssistError):
                    log.error("%s failed", job.description, exc_info=exc)
                self._finish(error=describe_error(exc))

        def progress(fraction: float, message: str) -> None:
            self.state.progress = round(100.0 * fraction, 1)
            self.state.progress_msg = message

        self.runner.start(job, on_done=done, on_error=failed, on_progress=progress)

    def _finish(self, info: str = "", error: str = "") -> None:
        self.state.update({"busy": False, "job_name": "", "progress": 100.0 if not error else 0.0,
                           "progress_msg": "", "info": info})
        if error:
            self.state.error = error

    def cancel(self) -> None:
        if self.runner.busy:
            self.state.progress_msg = "cancelling..."
            self.runner.cancel()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Poll until the running job finished (in-process use without an event loop)."""
        return self.runner.wait(timeout)
