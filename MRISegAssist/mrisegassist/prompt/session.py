"""Interactive box prompting on one volume, for front ends (Slicer module, browser, notebooks).

A :class:`PromptSession` holds an engine, the volume prepared once, and the current objects. Adding, moving
or removing a box and calling :meth:`PromptSession.run` re-segments only the objects whose prompts changed;
the volume is never prepared again and unchanged objects keep their results. :meth:`PromptSession.labels`
fuses the current results (:func:`.fusion.fuse`).

    session = PromptSession("classical", volume_array)            # [k, j, i]
    session.set_object(ObjectPrompt(1, [Box2D(k=80, i0=100, j0=90, i1=140, j1=130)]))
    session.run()
    session.set_object(ObjectPrompt(1, [Box2D(k=80, i0=104, j0=90, i1=144, j1=130)]))  # box moved
    session.run()                                                  # object 1 only, no re-encoding
    labels = session.labels()                                      # uint16 [k, j, i]
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn
from .base import ObjectPrompt, ObjectResult, PromptableEngine
from .fusion import fuse


class PromptSession:
    """Engine + prepared volume + objects (see module docstring). Not thread-safe: one run at a time."""

    def __init__(self, engine: Union[str, PromptableEngine], volume: np.ndarray, *, device: str = "cpu",
                 checkpoint: Optional[str] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None) -> None:
        if isinstance(engine, str):
            from . import get_engine

            engine = get_engine(engine, device=device, checkpoint=checkpoint)
        self.engine = engine
        self.shape = tuple(np.shape(volume))
        self.prepared = engine.prepare(volume, progress=progress, cancel=cancel)
        self.prompts: dict[int, ObjectPrompt] = {}
        self.results: dict[int, ObjectResult] = {}
        self._done: dict[int, ObjectPrompt] = {}  # the prompt each result was computed from
        self.segmented = 0  #: objects segmented so far (re-runs of unchanged objects are not counted)

    def next_object_id(self) -> int:
        return max(self.prompts, default=0) + 1

    def set_object(self, prompt: ObjectPrompt) -> ObjectPrompt:
        """Add or replace an object's prompt (validated now: :class:`InputError` leaves the session as it was)."""
        checked = prompt.validate(self.shape)
        self.prompts[checked.object_id] = checked
        return checked

    def remove_object(self, object_id: int) -> None:
        if object_id not in self.prompts:
            raise InputError(f"there is no object {object_id} (objects: {sorted(self.prompts)})")
        del self.prompts[object_id]
        self.results.pop(object_id, None)
        self._done.pop(object_id, None)

    def pending(self) -> list[int]:
        """Ids of the objects whose current prompt has not been segmented yet."""
        return [oid for oid, p in sorted(self.prompts.items()) if self._done.get(oid) != p]

    def run(self, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelToken] = None) -> list[ObjectResult]:
        """Segment the changed objects; returns every current result, by object id."""
        todo = [self.prompts[oid] for oid in self.pending()]
        if todo:
            for prompt, result in zip(todo, self.engine.segment(self.prepared, todo, progress=progress,
                                                                cancel=cancel)):
                self.results[prompt.object_id] = result
                self._done[prompt.object_id] = prompt
            self.segmented += len(todo)
        return [self.results[oid] for oid in sorted(self.results)]

    def labels(self, keep_largest_component: bool = True) -> np.ndarray:
        """Fused ``uint16`` label map ``[k, j, i]`` of the current results (run first if objects changed)."""
        if self.pending():
            raise InputError(f"object(s) {self.pending()} changed since the last run; call run() first")
        if not self.results:
            return np.zeros(self.shape, dtype=np.uint16)
        return fuse([self.results[oid] for oid in sorted(self.results)], keep_largest_component)
