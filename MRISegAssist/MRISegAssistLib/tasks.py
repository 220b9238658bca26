"""Jobs: a service request made from MRML inputs, then a main-thread ``apply`` writing its result to MRML.

A :class:`Job` is made on the main thread after the MRML inputs were read into engine objects: ``request`` is a
typed service request (``mrisegassist.service.api``), ``client`` the service that runs it (a local worker
process, a remote server, or this process), ``apply`` writes the result into MRML nodes (main thread).
Headless code and tests call :meth:`Job.run` (blocking). The Slicer widget and the browser front end use
:class:`BackgroundRunner`: ``start`` submits the request and returns; :meth:`~BackgroundRunner.poll`, called on
the main thread by a timer (a Qt timer in Slicer, the event loop in the browser front end, a loop in
:meth:`~BackgroundRunner.wait` elsewhere), asks the client for the job's state without blocking on the
computation, forwards progress, and applies the result once it is done. With a worker or a server no Python
thread runs in this process: Slicer's main thread, which holds Python's lock while Qt waits for events,
never slows the computation down.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from mrisegassist.errors import Cancelled
from mrisegassist.progress import CancelToken, ProgressFn

R = TypeVar("R")
T = TypeVar("T")


@dataclass
class Job(Generic[R, T]):
    """``client`` runs ``request`` (giving ``R``), then ``apply(R) -> T`` on the main thread."""

    description: str
    request: object
    apply: Callable[[R], T]
    client: Any

    def run(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> T:
        """Run the request to its end (blocking), then apply its result."""
        return self.apply(self.client.call(self.request, progress, cancel))


class BackgroundRunner:
    """Runs one job at a time: submitted to its client, polled and applied on the main thread.

    ``schedule(delay_ms, fn)`` re-arms polling on the main thread (``qt.QTimer.singleShot`` in Slicer); without
    it the caller polls (:meth:`wait`). Callbacks: ``on_progress(fraction, message)``, ``on_done(result)`` with
    ``apply``'s result, ``on_error(exception)`` (incl. ``Cancelled``). ``compute_seconds``: from the submission
    to the result's arrival (engine work and transfers); ``apply_seconds``: the MRML writes.
    """

    def __init__(self, schedule: Optional[Callable[[int, Callable[[], None]], Any]] = None,
                 interval_ms: int = 100) -> None:
        self.schedule = schedule
        self.interval_ms = interval_ms
        self._job: Optional[Job] = None
        self._submission = None
        self._cancel: Optional[CancelToken] = None
        self._callbacks: tuple = (None, None, None)
        self._started = 0.0
        self._last: Optional[tuple[float, str]] = None
        self.compute_seconds = 0.0
        self.apply_seconds = 0.0

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, job: Job, on_done: Optional[Callable[[Any], None]] = None,
              on_error: Optional[Callable[[BaseException], None]] = None,
              on_progress: Optional[ProgressFn] = None) -> CancelToken:
        """Submit ``job``; returns its cancel token. Raises ``RuntimeError`` if a job is running."""
        if self.busy:
            raise RuntimeError(f"busy with {self._job.description!r}")
        self._job, self._cancel, self._submission, self._last = job, CancelToken(), None, None
        self._callbacks = (on_done, on_error, on_progress)
        self._started = time.perf_counter()
        self._submit_error: Optional[BaseException] = None
        try:
            self._submission = job.client.submit(job.request)
        except Exception as exc:  # e.g. the server refused the request: reported by the first poll
            self._submit_error = exc
        if self.schedule is not None:
            self.schedule(self.interval_ms, self._scheduled_poll)
        return self._cancel

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        if self._submission is not None:
            try:
                self._submission.cancel()
            except Exception:  # noqa: BLE001 - the next poll reports an unreachable worker
                pass

    def _finish(self) -> Job:
        job, self._job = self._job, None
        self.compute_seconds = time.perf_counter() - self._started
        return job

    def poll(self) -> bool:
        """Forward progress; once the job ended, apply its result (main thread) and call back. True when
        finished (or when no job runs)."""
        if self._job is None:
            return True
        on_done, on_error, on_progress = self._callbacks
        ok, value = True, None
        if self._submit_error is not None:
            ok, value = False, self._submit_error
        else:
            try:
                status = self._submission.poll()
                if status.final:
                    value = self._submission.result()
            except BaseException as exc:  # the job's error, or the worker's
                ok, value, status = False, exc, None
            if ok and not status.final:
                if (status.progress, status.message) != self._last and on_progress is not None:
                    on_progress(status.progress, status.message)
                self._last = (status.progress, status.message)
                return False
        job = self._finish()
        if ok and self._cancel.cancelled:
            ok, value = False, Cancelled("cancelled by the user")
        self.apply_seconds = 0.0
        if ok:
            start = time.perf_counter()
            try:
                result = job.apply(value)
            except Exception as exc:
                ok, value = False, exc
            self.apply_seconds = time.perf_counter() - start
        if ok:
            if on_done is not None:
                on_done(result)
        elif on_error is not None:
            on_error(value)
        else:
            raise value
        return True

    def _scheduled_poll(self) -> None:
        if not self.poll():
            self.schedule(self.interval_ms, self._scheduled_poll)

    def wait(self, timeout: Optional[float] = None, sleep: Optional[Callable[[float], None]] = None) -> bool:
        """Poll until the job finished (headless use). False if ``timeout`` seconds passed first. ``sleep``
        (seconds) replaces ``time.sleep`` between polls."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            (sleep or time.sleep)(self.interval_ms / 1000.0)
        return True
