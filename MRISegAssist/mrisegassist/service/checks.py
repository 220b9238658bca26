"""Checks of a request before any work: the device rule (:func:`mrisegassist.devices.check_device`), and
:class:`~mrisegassist.errors.InputWarning` for what is accepted but ignored or changed (a device the engine does
not use, sequences nothing reads, boxes clipped to the volume). :meth:`Service.run <mrisegassist.service.core.Service.run>` runs :func:`check_request` first; the CLI runs
it too before it sends a request to a server (whose warnings stay on the server).
"""
from __future__ import annotations

import importlib
import warnings
from typing import Iterable, Optional, Sequence

from ..devices import check_device
from ..errors import InputWarning

__all__ = ["check_device", "check_engine_request", "check_request", "clipped_boxes", "unused_sequences", "warn"]


def warn(message: str) -> None:
    """Emit one :class:`InputWarning` (the CLI prints it as ``warning: <message>``)."""
    warnings.warn(message, InputWarning, stacklevel=3)


def unused_sequences(given: Iterable[str], used: Sequence[str], who: str) -> list[str]:
    """Warn about sequences given that ``who`` (e.g. ``"model 'ms-lesions-2d'"``) does not read; returns them."""
    unused = [name for name in given if name not in used]
    if unused:
        reads = ", ".join(used) if used else "only the prompted volume"
        warn(f"sequence(s) {', '.join(unused)}: not used by {who} (it reads {reads}); ignored")
    return unused


def clipped_boxes(prompts, geometry) -> None:
    """Warn for every box that reaches outside its slice: engines clip it to the volume. Each object's boxes are
    checked against the ``(k, j, i)`` shape of the grid of the view it was drawn in (``ObjectPrompt.view``,
    :func:`~mrisegassist.service.views.view_grid` of the volume's ``geometry``). Boxes wholly outside stay errors
    (:meth:`Box2D.validate <mrisegassist.prompt.base.Box2D.validate>`)."""
    from .views import view_grid

    for prompt in prompts:
        shape = view_grid(geometry, prompt.view).geometry.shape
        _, nj, ni = shape
        for box in prompt.boxes:
            clipped = box.validate(shape)
            if clipped != box:
                warn(f"object {prompt.object_id}: box {box.as_tuple()} (k, i0, j0, i1, j1) reaches outside slice "
                     f"{box.k} (i 0..{ni - 1}, j 0..{nj - 1}); clipped to {clipped.as_tuple()}")


def _engine_class(name: str):
    from ..prompt import engine_spec

    spec = engine_spec(name)
    try:
        return getattr(importlib.import_module(f"mrisegassist.prompt.{spec.module}"), spec.cls)
    except ImportError:
        return None  # reported with its install hint when the engine is loaded


def check_engine_request(engine: str, device: Optional[str], extra: Optional[dict]) -> None:
    """A promptable engine's options: device rule (weights engines need it available; the weights-free ones run
    on the CPU and warn that another device is ignored), extra sequences warned when the engine reads only
    the prompted volume."""
    from ..prompt import engine_spec

    spec = engine_spec(engine)
    name = check_device(device, used=spec.needs_weights)
    if not spec.needs_weights and name not in (None, "cpu"):
        warn(f"engine {engine!r} runs on the CPU; device {name!r} is ignored")
    if extra:
        cls = _engine_class(engine)
        if cls is not None and not getattr(cls, "accepts_channels", False):
            unused_sequences(extra, (), f"engine {engine!r}")


def check_request(request) -> None:
    """Refuse a bad device and warn about ignored or changed options, before any work (see module docstring)."""
    from .api import ATLAS_ENGINE, AutoRequest, AutoSegmentRequest, PromptRequest

    if isinstance(request, AutoSegmentRequest):
        check_device(request.device)
    elif isinstance(request, PromptRequest):
        check_engine_request(request.engine, request.device, request.extra)
        clipped_boxes(request.objects, request.volume.geometry)
    elif isinstance(request, AutoRequest):
        if request.unet is not None:
            check_request(request.unet)
        if request.engine == ATLAS_ENGINE:
            check_device(request.device, used=False)
        else:
            check_engine_request(request.engine, request.device, request.extra)
