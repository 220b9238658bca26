"""A process-wide setting changed while any caller needs it, restored when the last one is done.

Used for settings that live in a library's global state rather than in an object we own: ITK's default thread
count (:mod:`.atlas.registration`) and the progress bar of ``sam2``'s video predictor (:mod:`.prompt.sam2_engine`).
Nesting- and thread-safe: the first caller in applies the change, the last one out restores what was there.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator


class SharedOverride:
    """``with override(): ...`` runs the body with ``apply()`` in effect; ``apply`` returns what ``restore`` needs
    to put the setting back."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], None]) -> None:
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = self._apply()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._restore(self._saved)
