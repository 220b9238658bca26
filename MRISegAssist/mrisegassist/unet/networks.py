"""U-Net architectures, built from a JSON-able spec on MONAI's ``UNet``.

Why ``monai.networks.nets.UNet``: a small residual-unit U-Net whose width/depth is fully set by the spec
(so a 2D slice-wise model stays ~1.6 M parameters / 6.5 MB and runs a 240x240x155 case in a few seconds on
2 CPU cores), with instance normalisation (batch-size independent, robust on CPU with small batches), and it
scripts to TorchScript. ``BasicUNet`` has fixed 5 levels and more parameters; ``DynUNet`` (nnU-Net) is
heavier than a CPU budget allows.

2D models are early-fusion slice-wise: the input sequences are stacked as channels of one axial slice
``(N, C, P, L)``; 3D models take ``(N, C, S, P, L)`` patches. Outputs are class logits (class 0 = background).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.networks.nets import UNet

from ..errors import CheckpointError

DEFAULT_CHANNELS = {"2d": (16, 32, 64, 128, 256), "3d": (16, 32, 64, 128, 256)}


def default_spec(dims: str, in_channels: int, out_channels: int) -> dict[str, Any]:
    """Architecture spec (stored in ``model.json`` under ``network``) for a 2D or 3D U-Net."""
    if dims not in ("2d", "3d"):
        raise ValueError(f"dims must be '2d' or '3d', got {dims!r}")
    channels = DEFAULT_CHANNELS[dims]
    return {"name": "UNet", "spatial_dims": 2 if dims == "2d" else 3, "in_channels": int(in_channels),
            "out_channels": int(out_channels), "channels": list(channels),
            "strides": [2] * (len(channels) - 1), "num_res_units": 2, "norm": "instance", "dropout": 0.0}


def build_network(spec: Mapping[str, Any]) -> torch.nn.Module:
    """A MONAI network from a spec (see :func:`default_spec`). Raises :class:`CheckpointError` on a bad spec."""
    spec = dict(spec)
    name = spec.pop("name", "UNet")
    if name != "UNet":
        raise CheckpointError(f"unknown network {name!r} in the model spec (supported: UNet)")
    try:
        return UNet(spatial_dims=int(spec["spatial_dims"]), in_channels=int(spec["in_channels"]),
                    out_channels=int(spec["out_channels"]), channels=tuple(spec["channels"]),
                    strides=tuple(spec["strides"]), num_res_units=int(spec.get("num_res_units", 2)),
                    norm=spec.get("norm", "instance"), dropout=float(spec.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise CheckpointError(f"invalid network spec {dict(spec, name=name)}: {exc}") from None


def size_divisor(spec: Mapping[str, Any]) -> int:
    """Spatial sizes must be multiples of this (product of the strides)."""
    out = 1
    for s in spec.get("strides", []):
        out *= int(s)
    return out


def load_state(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``network`` strictly; a mismatch raises :class:`CheckpointError` naming it."""
    from ..prompt.weights import load_into

    load_into(network, state, "U-Net", source)
