"""Results of the browser session: the segmentation node as a named label map, saving it, metrics against
a reference mask. Thin compositions of the MRML logic's conversions (``MRISegAssistLib.nodes``) and the
engine's label-map I/O and metrics; no computation of their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo, LabelMap, write_labelmap
from mrisegassist.metrics import lesion_detection, overlap_metrics
from mrisegassist.volume import Geometry, Volume, read_volume, resample_to

SAVE_FORMATS = {"seg.nrrd": ".seg.nrrd", "nii.gz": ".nii.gz", "nrrd": ".nrrd"}


def volume_geometry(volume_node) -> Geometry:
    """The engine :class:`Geometry` of a volume node (its IJK->RAS matrix and size)."""
    from MRISegAssistLib import nodes

    return Geometry.from_ijk_to_ras(nodes.ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions())


def segment_infos(segmentation_node) -> list[tuple[str, LabelInfo]]:
    """``[(segment_id, LabelInfo(n, name, colour, terminology)), ...]`` in segment order, values 1..N."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        terminology = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
        out.append((segment_id, LabelInfo(n + 1, segment.GetName(), tuple(float(c) for c in segment.GetColor()),
                                          terminology or None)))
    return out


def export_labelmap(segmentation_node, volume_node) -> LabelMap:
    """The segmentation as a :class:`LabelMap` on ``volume_node``'s grid (segment n -> value n + 1), through
    the logic's export (Slicer's ``ExportSegmentsToLabelmapNode``)."""
    from MRISegAssistLib import nodes

    if segmentation_node is None:
        raise InputError("there is no segmentation yet: run auto-segmentation or propagate a box first")
    pairs = segment_infos(segmentation_node)
    if not pairs:
        raise InputError("the segmentation has no segment")
    labels = nodes.read_segments(segmentation_node, volume_node, [sid for sid, _ in pairs])
    volume = Volume(labels, volume_geometry(volume_node), segmentation_node.GetName())
    return LabelMap(volume, [info for _, info in pairs])


def save_labelmap(labelmap: LabelMap, folder: Path, name: str, fmt: str) -> Path:
    """Write ``labelmap`` as ``folder/name<suffix>`` (atomic; names and colours kept: ``.seg.nrrd`` header or a
    ``.labels.json`` sidecar). ``fmt`` is a key of :data:`SAVE_FORMATS`."""
    if fmt not in SAVE_FORMATS:
        raise InputError(f"unknown format {fmt!r}; use one of {', '.join(SAVE_FORMATS)}")
    return write_labelmap(labelmap, Path(folder) / f"{name}{SAVE_FORMATS[fmt]}")


def read_reference(path: Path, geometry: Geometry) -> Volume:
    """A reference mask (label map file) on ``geometry`` (nearest-neighbour resampling when grids differ)."""
    reference = read_volume(path, kind="label", name=f"reference {Path(path).name}")
    if not reference.geometry.same_as(geometry):
        reference = resample_to(reference, geometry, "nearest")
    return reference


def compare(labelmap: LabelMap, reference: Volume,
            reference_values: Optional[Mapping[str, int]] = None) -> list[dict]:
    """Metrics rows of the segmentation against the reference mask.

    First row: all segments together vs every non-zero reference voxel. Then one row per segment whose name
    is in ``reference_values`` (``{segment name: value in the reference}``, e.g. a model's label values),
    comparing that segment with that reference label.
    """
    if reference.array.shape != labelmap.volume.array.shape:
        raise InputError(f"reference shape {reference.array.shape} differs from the segmentation's "
                         f"{labelmap.volume.array.shape}")
    spacing = labelmap.geometry.spacing
    pred, ref = labelmap.volume.array, reference.array
    rows = [{"name": "All segments", "reference": "any label", **overlap_metrics(pred > 0, ref > 0, spacing)}]
    for info in labelmap.labels:
        value = (reference_values or {}).get(info.name)
        if value is not None:
            rows.append({"name": info.name, "reference": f"label {value}",
                         **overlap_metrics(pred == info.value, ref == value, spacing)})
    return rows


def lesion_summary(labelmap: LabelMap, reference: Volume) -> str:
    """Lesion-wise detection of all segments vs the reference (26-connected components), as one line."""
    found = lesion_detection(labelmap.volume.array > 0, reference.array > 0, labelmap.geometry.spacing)
    return (f"lesions: {found['tp']} of {found['n_ref']} reference lesions found, "
            f"{found['fp']} segmented component(s) without a reference lesion")


def metrics_table(rows: list[dict]) -> list[dict]:
    """Rows for the page: Dice, HD95 and volumes rounded (``None`` shown as ``-``)."""
    def fmt(value, digits):
        return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else round(value, digits)

    return [{"name": r["name"], "reference": r["reference"], "dice": fmt(r["dice"], 3),
             "hd95": fmt(r["hd95_mm"], 1), "pred_ml": fmt(r["volume_pred_ml"], 2),
             "ref_ml": fmt(r["volume_ref_ml"], 2)} for r in rows]
