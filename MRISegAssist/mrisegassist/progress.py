"""Progress reporting and cancellation shared by every long step.

A long step takes ``progress`` (``callable(fraction: float, message: str)`` or ``None``) and ``cancel``
(a :class:`CancelToken` or ``None``). Front ends adapt these to tqdm (CLI), a Qt progress bar (Slicer) or
page state (browser).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from .errors import Cancelled

ProgressFn = Callable[[float, str], None]
T = TypeVar("T")


class CancelToken:
    """Thread-safe cancellation flag. ``check()`` raises :class:`Cancelled` once ``cancel()`` was called."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.check()


def report(progress: Optional[ProgressFn], fraction: float, message: str = "") -> None:
    if progress is not None:
        progress(float(min(max(fraction, 0.0), 1.0)), message)


def track(items: Iterable[T], total: int, message: str, progress: Optional[ProgressFn] = None,
          cancel: Optional[CancelToken] = None, start: float = 0.0, stop: float = 1.0) -> Iterator[T]:
    """Yield ``items`` while reporting progress in ``[start, stop]`` and checking ``cancel`` before each."""
    total = max(int(total), 1)
    for n, item in enumerate(items):
        check(cancel)
        report(progress, start + (stop - start) * n / total, message)
        yield item
    report(progress, stop, message)


def tqdm_progress(desc: str = "", disable: bool = False) -> tuple[ProgressFn, Callable[[], None]]:
    """A ``progress`` callback drawing a tqdm bar (percent); returns ``(callback, close)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=100, desc=desc, disable=disable, leave=False, bar_format="{l_bar}{bar}| {postfix}")

    def callback(fraction: float, message: str) -> None:
        bar.n = round(100 * fraction, 1)
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return callback, bar.close
