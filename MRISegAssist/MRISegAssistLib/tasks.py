"""Jobs with a worker-safe compute phase and a main-thread apply phase, run synchronously or in background.

A :class:`Job` is made on the main thread after the MRML inputs were read into engine objects. ``compute``
does engine work only (no MRML access; it may run in a worker thread); ``apply`` writes MRML nodes and must
run on the main thread. Headless code and tests call :meth:`Job.run`; the Slicer widget uses
:class:`BackgroundRunner`, whose :meth:`~BackgroundRunner.poll` runs on the main thread (a Qt timer in
Slicer, a loop in :meth:`~BackgroundRunner.wait` elsewhere).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

from mrisegassist.progress import CancelToken, ProgressFn

R = TypeVar("R")
T = TypeVar("T")


@dataclass
class Job(Generic[R, T]):
    """``compute(progress, cancel) -> R`` (engine only, any thread) then ``apply(R) -> T`` (main thread)."""

    description: str
    compute: Callable[[Optional[ProgressFn], Optional[CancelToken]], R]
    apply: Callable[[R], T]

    def run(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> T:
        """Both phases in the calling thread."""
        return self.apply(self.compute(progress, cancel))


class BackgroundRunner:
    """Runs one job at a time: ``compute`` in a daemon thread, ``apply`` and callbacks in :meth:`poll`.

    ``schedule(delay_ms, fn)`` re-arms polling on the main thread (``qt.QTimer.singleShot`` in Slicer);
    without it the caller polls (:meth:`wait`). Callbacks: ``on_progress(fraction, message)``,
    ``on_done(result)`` with ``apply``'s result, ``on_error(exception)`` (incl. ``Cancelled``).
    ``compute_seconds`` / ``apply_seconds``: wall time of the last job's phases (engine work / MRML writes).
    """

    def __init__(self, schedule: Optional[Callable[[int, Callable[[], None]], Any]] = None,
                 interval_ms: int = 100) -> None:
        self.schedule = schedule
        self.interval_ms = interval_ms
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._job: Optional[Job] = None
        self._cancel: Optional[CancelToken] = None
        self._progress: Optional[tuple[float, str]] = None
        self._outcome: Optional[tuple[bool, Any]] = None
        self._callbacks: tuple = (None, None, None)
        self.compute_seconds = 0.0
        self.apply_seconds = 0.0

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, job: Job, on_done: Optional[Callable[[Any], None]] = None,
              on_error: Optional[Callable[[BaseException], None]] = None,
              on_progress: Optional[ProgressFn] = None) -> CancelToken:
        """Start ``job``; returns its cancel token. Raises ``RuntimeError`` if a job is running."""
        if self.busy:
            raise RuntimeError(f"busy with {self._job.description!r}")
        self._job, self._cancel, self._outcome, self._progress = job, CancelToken(), None, None
        self._callbacks = (on_done, on_error, on_progress)
        self._thread = threading.Thread(target=self._work, name=f"mrisegassist: {job.description}", daemon=True)
        self._thread.start()
        if self.schedule is not None:
            self.schedule(self.interval_ms, self._scheduled_poll)
        return self._cancel

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def _report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (fraction, message)

    def _work(self) -> None:
        start = time.perf_counter()
        try:
            outcome = (True, self._job.compute(self._report, self._cancel))
        except BaseException as exc:  # handed to the main thread
            outcome = (False, exc)
        with self._lock:
            self.compute_seconds = time.perf_counter() - start
            self._outcome = outcome

    def poll(self) -> bool:
        """Forward progress; once compute ended, apply (main thread) and call back. True when finished."""
        if self._job is None:
            return True
        with self._lock:
            progress, self._progress = self._progress, None
            outcome = self._outcome
        on_done, on_error, on_progress = self._callbacks
        if progress is not None and on_progress is not None:
            on_progress(*progress)
        if outcome is None:
            return False
        job, self._job = self._job, None
        self._thread.join()
        ok, value = outcome
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

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Poll until the job finished (headless use). False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(self.interval_ms / 1000.0)
        return True
