"""Segmentation networks, built from a JSON-able spec on MONAI's network classes, and the wrappers that adapt a
network to the pipeline (array order, test-time flips, ensembles).

A spec is ``{"name": <class>, **literal keyword arguments}``; ``name`` must be one of :data:`ALLOWED_NETWORKS`
(MONAI core classes, looked up by name: nothing is imported or evaluated from a model file). This allow-list is
the one rule for what a model file may build; MONAI bundles are parsed into the same spec
(:mod:`mrisegassist.unet.bundle`).

The project's own models use ``monai.networks.nets.UNet``: a small residual-unit U-Net whose width/depth is fully
set by the spec (a 2D slice-wise model of ~0.4-1.6 M parameters runs a 240x240x155 case in seconds on 2 CPU
cores), with instance normalisation (batch-size independent) and TorchScript support.

2D models are early-fusion slice-wise: the input sequences (and, for 2.5D models, their neighbouring slices)
are stacked as channels of one axial slice ``(N, C, P, L)``; 3D models take ``(N, C, S, P, L)`` patches.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError

DEFAULT_CHANNELS = {"2d": (16, 32, 64, 128, 256), "3d": (16, 32, 64, 128, 256)}

#: MONAI network classes a model spec (or a MONAI bundle's ``network_def``) may name -> module path.
ALLOWED_NETWORKS = {
    "UNet": "monai.networks.nets", "BasicUNet": "monai.networks.nets", "DynUNet": "monai.networks.nets",
    "SegResNet": "monai.networks.nets", "SwinUNETR": "monai.networks.nets", "UNETR": "monai.networks.nets",
    "AttentionUnet": "monai.networks.nets",
}
#: Spatial size divisor by network (product of the downsampling strides); UNet/DynUNet read it from the spec.
_DIVISORS = {"BasicUNet": 16, "SwinUNETR": 32, "UNETR": 16, "AttentionUnet": 16}
LITERAL_TYPES = (bool, int, float, str, type(None))


def default_spec(dims: str, in_channels: int, out_channels: int) -> dict[str, Any]:
    """Architecture spec (stored in ``model.json`` under ``network``) for a 2D or 3D U-Net."""
    if dims not in ("2d", "3d"):
        raise ValueError(f"dims must be '2d' or '3d', got {dims!r}")
    channels = DEFAULT_CHANNELS[dims]
    return {"name": "UNet", "spatial_dims": 2 if dims == "2d" else 3, "in_channels": int(in_channels),
            "out_channels": int(out_channels), "channels": list(channels),
            "strides": [2] * (len(channels) - 1), "num_res_units": 2, "norm": "instance", "dropout": 0.0}


def network_class_name(target: str) -> Optional[str]:
    """The allow-listed class named by ``target`` (``"SegResNet"`` or ``"monai.networks.nets.SegResNet"``)."""
    module, _, name = str(target).rpartition(".")
    if name in ALLOWED_NETWORKS and module in ("", ALLOWED_NETWORKS[name]):
        return name
    return None


def is_literal(value: Any) -> bool:
    """True for JSON literals (numbers, strings, booleans, null) and lists/dicts of them."""
    if isinstance(value, LITERAL_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_literal(v) for k, v in value.items())
    return False


def _as_args(value: Any) -> Any:
    """JSON lists -> tuples (MONAI accepts sequences; tuples also for ``norm=("group", {...})``)."""
    if isinstance(value, list):
        return tuple(_as_args(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_args(v) for k, v in value.items()}
    return value


def build_network(spec: Mapping[str, Any]) -> torch.nn.Module:
    """A MONAI network from a spec; :class:`CheckpointError` on an unknown class or bad arguments."""
    spec = dict(spec)
    name = spec.pop("name", "UNet")
    if network_class_name(name) is None:
        raise CheckpointError(f"unknown network {name!r} in the model spec (allowed: {', '.join(ALLOWED_NETWORKS)})")
    name = network_class_name(name)
    bad = sorted(k for k, v in spec.items() if not is_literal(v))
    if bad:
        raise CheckpointError(f"network {name}: argument(s) {', '.join(bad)} are not literal values")
    cls = getattr(importlib.import_module(ALLOWED_NETWORKS[name]), name)
    try:
        return cls(**{k: _as_args(v) for k, v in spec.items()})
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"invalid network spec {dict(spec, name=name)}: {exc}") from None


def size_divisor(spec: Mapping[str, Any]) -> int:
    """Spatial sizes must be multiples of this (product of the downsampling strides)."""
    name = network_class_name(spec.get("name", "UNet")) or "UNet"
    if name == "SegResNet":
        return 2 ** (len(spec.get("blocks_down", (1, 2, 2, 4))) - 1)
    if name in _DIVISORS:
        return _DIVISORS[name]
    out = 1
    for s in spec.get("strides", [2, 2, 2, 2]):
        out *= int(s) if not isinstance(s, (list, tuple)) else int(max(s))
    return out


def load_state(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``network`` strictly; a mismatch raises :class:`CheckpointError` naming it."""
    from ..prompt.weights import load_into

    load_into(network, state, type(network).__name__, source)


# ------------------------------------------------------------------------------------------- wrappers
#: How a network sees a volume, given the pipeline's model-grid arrays ``[S, P, L]`` (axis-aligned LPS,
#: index increasing towards superior, posterior, left): ``"kji"`` as is; ``"ijk"`` transposed to ``[L, P, S]``
#: (the voxel order of BraTS NIfTI files as MONAI/nibabel load them without reorientation); ``"ras"``
#: ``[R, A, S]`` (MONAI ``Orientationd(axcodes="RAS")``).
ARRAY_ORDERS = ("kji", "ijk", "ras")


class ArrayOrder(torch.nn.Module):
    """Runs ``network`` on ``(N, C, S, P, L)`` input reordered to ``order``; returns output in ``[S, P, L]``."""

    def __init__(self, network: torch.nn.Module, order: str) -> None:
        super().__init__()
        if order not in ARRAY_ORDERS:
            raise CheckpointError(f"unknown array order {order!r} (use one of {', '.join(ARRAY_ORDERS)})")
        self.network, self.order = network, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "kji":
            return self.network(x)
        x = x.permute(0, 1, 4, 3, 2)  # [L, P, S]
        if self.order == "ras":
            x = torch.flip(x, dims=(2, 3))  # L -> R, P -> A
        y = self.network(x.contiguous())
        if self.order == "ras":
            y = torch.flip(y, dims=(2, 3))
        return y.permute(0, 1, 4, 3, 2)


class AveragedSoftmax(torch.nn.Module):
    """Mean softmax of several networks (an ensemble) and of test-time flips of the input.

    ``flips``: each a list of spatial axes of the input (0 = first spatial axis) flipped before the network and
    flipped back after; the unflipped input is always included. Returns the log of the mean probability, so that
    the pipeline's softmax/argmax of the output give the averaged probabilities.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], flips: Sequence[Sequence[int]] = ()) -> None:
        super().__init__()
        self.networks = torch.nn.ModuleList(networks)
        self.flips = [tuple(int(a) for a in f) for f in flips]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total, count = None, 0
        for net in self.networks:
            for axes in [()] + self.flips:
                dims = tuple(a + 2 for a in axes)
                y = net(torch.flip(x, dims) if dims else x)
                p = torch.softmax(y.float(), dim=1)
                p = torch.flip(p, dims) if dims else p
                total = p if total is None else total + p
                count += 1
        return torch.log(torch.clamp(total / count, min=1e-8))
