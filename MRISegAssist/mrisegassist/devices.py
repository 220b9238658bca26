"""The device rule, one place for every layer: ``None`` (the default), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

Any other name is an :class:`~mrisegassist.errors.InputError`; a device that will run something must also be
available here. The service's request checks (:func:`mrisegassist.service.checks.check_device`), the promptable
engines and the U-Net (:func:`mrisegassist.unet.inference.resolve_device`) all use :func:`check_device`.
"""
from __future__ import annotations

import re
from typing import Optional

from .errors import InputError

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_device(device: Optional[str], *, used: bool = True, option: str = "device") -> Optional[str]:
    """``device`` as a checked name (``None`` stays ``None``). ``used``: it will run something here, so CUDA / MPS
    must also be available. ``option``: how the message names the setting (``--device``)."""
    if device is None:
        return None
    name = str(device).strip()
    if not _DEVICE.match(name):
        raise InputError(f"{option} {name!r}: unknown device; use cpu, cuda, cuda:N or mps")
    if used and name != "cpu":
        import torch

        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise InputError(f"{option} {name!r} requested but CUDA is not available on this machine")
            index = int(name.split(":")[1]) if ":" in name else 0
            if index >= torch.cuda.device_count():
                raise InputError(f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"{option} {name!r} requested but Apple MPS is not available on this machine")
    return name
