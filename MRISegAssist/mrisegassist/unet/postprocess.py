"""Post-processing of U-Net label maps: class -> label mapping, BraTS regions, small-component removal.

Arrays are ``[k, j, i]``; ``spacing`` is ``(i, j, k)`` mm as in :class:`~mrisegassist.volume.Geometry`.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

# BraTS 2013-2021 label values (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing) -> evaluation regions.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "whole tumour": (1, 2, 3, 4),
    "tumour core": (1, 3, 4),
    "enhancing tumour": (4,),
}


#: Network outputs: ``"softmax"``: K class logits (class 0 = background), argmax; ``"sigmoid-brats"``: three
#: independent sigmoid channels, tumour core / whole tumour / enhancing tumour (the MONAI BraTS bundles).
OUTPUTS = ("softmax", "sigmoid-brats")


def decode_brats_sigmoid(probs: np.ndarray) -> np.ndarray:
    """``(3, ...)`` TC/WT/ET probabilities -> class indices ``(...)`` uint8, as the MONAI BraTS bundles decode
    them (each channel thresholded at 0.5; whole tumour -> 2, tumour core -> 1, enhancing -> 3, painted in that
    order so that the nested regions win). Classes map to BraTS 2018 labels 1 (core), 2 (oedema), 4 (enhancing)."""
    tc, wt, et = (np.asarray(probs[c]) > 0.5 for c in range(3))
    out = np.zeros(tc.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out


def map_classes(classes: np.ndarray, class_to_label: Sequence[int]) -> np.ndarray:
    """Network class indices -> label values (``class_to_label[c]``); returns a new uint8/int32 array."""
    lut = np.asarray(class_to_label, dtype=np.int64)
    dtype = np.uint8 if lut.max(initial=0) <= 255 else np.int32
    return lut.astype(dtype)[classes]


def region_masks(labels: np.ndarray, regions: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, np.ndarray]:
    """Boolean masks of label-value unions (default: BraTS whole tumour / tumour core / enhancing tumour)."""
    return {name: np.isin(labels, list(values)) for name, values in (regions or BRATS_REGIONS).items()}


def remove_small_components(labels: np.ndarray, spacing: Sequence[float], min_mm3: float,
                            per_label: bool = False) -> np.ndarray:
    """Remove connected components (26-connected) smaller than ``min_mm3`` mm³; returns a new array.

    ``per_label=False`` judges components of the whole foreground (all non-zero labels together, so a tumour's
    sub-regions stay); ``per_label=True`` judges each label value on its own (e.g. separate lesions).
    """
    out = np.array(labels, copy=True)
    if min_mm3 <= 0 or not out.any():
        return out
    voxel_mm3 = float(np.prod(spacing))
    min_voxels = min_mm3 / voxel_mm3
    structure = np.ones((3, 3, 3), dtype=bool)
    groups = [out == v for v in np.unique(out) if v != 0] if per_label else [out != 0]
    for mask in groups:
        components, n = ndimage.label(mask, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small != 0]
        if small.size:
            out[np.isin(components, small)] = 0
    return out
