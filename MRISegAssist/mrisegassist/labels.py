"""Named label maps: label values with names, colours and standard terminology, and their file I/O.

A :class:`LabelMap` is an integer ``Volume`` (``array[k, j, i]``, 0 = background) plus one
:class:`LabelInfo` per non-zero value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .volume import Volume


@dataclass(frozen=True)
class LabelInfo:
    """One label: value in the label map, display name, RGB colour in 0..1, optional terminology.

    ``terminology`` is a Slicer terminology string (``"SCT^...^...~SCT^...^...~..."``) or ``None``.
    """

    value: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    terminology: Optional[str] = None


@dataclass
class LabelMap:
    """Integer label volume with named labels (values absent from ``labels`` have no name)."""

    volume: Volume
    labels: list[LabelInfo] = field(default_factory=list)

    def info(self, value: int) -> Optional[LabelInfo]:
        return next((lab for lab in self.labels if lab.value == value), None)

    def mask(self, value: int) -> np.ndarray:
        return self.volume.array == value
