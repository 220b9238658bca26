"""U-Net auto-segmentation: model entries/registry, networks, inference, post-processing and training.

Public API::

    from mrisegassist.unet import list_models, get_model, UNetSegmenter, segment_files
    labelmap = UNetSegmenter("glioma-2d").segment(case)          # case = volume.load_case({...})

Names are imported on first use (PEP 562), so ``mrisegassist --help`` and the CLI's argument parsing do not
import torch or MONAI.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelEntry": "entries", "get_model": "entries", "list_models": "entries",
    "UNetSegmenter": "inference", "segment_files": "inference",
    "BRATS_REGIONS": "postprocess", "region_masks": "postprocess", "remove_small_components": "postprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
