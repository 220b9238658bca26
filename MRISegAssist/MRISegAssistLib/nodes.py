"""Conversions between MRML nodes and engine objects (no Qt; works on slicer-core and in Slicer).

Conventions
-----------
* Engine arrays are ``[k, j, i]`` (what ``slicer.util.arrayFromVolume`` returns); IJK extents are
  ``(i0, i1, j0, j1, k0, k1)``, inclusive, as VTK image extents.
* Geometry comes from the node's own IJK->RAS matrix (``GetIJKToRASMatrix``), i.e. the node's local
  coordinates. A parent transform of the input volume is given to every node made from it (ROIs,
  segmentations), so they share the volume's frame.
* A ROI covers the voxels that lie wholly inside the IJK bounding box of its corners, within 0.001 voxel
  (Slicer's rule: ``vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent`` takes
  ``ceil(lo + 0.5 - 0.001) .. floor(hi - 0.5 + 0.001)`` per axis); rounding the corners would add a
  partly covered voxel on some sides.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR, vtkStringArray
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo
from mrisegassist.prompt.base import Box2D, ObjectPrompt
from mrisegassist.service.core import prompt_from_extents
from mrisegassist.volume import Geometry, Volume

Extent = tuple[int, int, int, int, int, int]
#: ROI attribute holding the engine's own prompt for that ROI (atlas boxes): used while the ROI is unchanged.
ROI_PROMPT = "MRISegAssist.Prompt"

#: Sequence names the engine uses, with the node-name patterns that guess them (checked in this order:
#: FLAIR before T2, post-contrast T1 before T1). Names are lower-cased and split on non-alphanumerics.
SEQUENCE_PATTERNS: dict[str, str] = {
    "flair": r"flair|\bt2f\b|\bt2 ?fl|dark ?fluid",
    "t1c": r"\bt1 ?(c|ce|gd|gad|post|contrast|\+c)\b|\bt1(c|ce|gd|post)\b|\bpost|\bgad|\bgd\b|contrast|\bce\b",
    "t1": r"\bt1(n|w)?\b|mprage|\bspgr\b",
    "t2": r"\bt2(w)?\b",
}


# ---------------------------------------------------------------------------------------------- matrices
def matrix_to_numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix (node coordinates)."""
    matrix = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


# ----------------------------------------------------------------------------------------------- volumes
def _check_volume_node(volume_node) -> None:
    if volume_node is None:
        raise InputError("no input volume selected")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{volume_node.GetName()}: is a {volume_node.GetClassName()}, not a scalar volume")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{volume_node.GetName()}: volume has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{volume_node.GetName()}: has {image.GetNumberOfScalarComponents()} components per "
                         f"voxel; select one 3D scalar volume per sequence")


def volume_from_node(volume_node, name: Optional[str] = None) -> Volume:
    """Engine :class:`Volume` (a copy of the voxels, ``[k, j, i]``) with the node's exact IJK->RAS geometry."""
    _check_volume_node(volume_node)
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    size = volume_node.GetImageData().GetDimensions()
    return Volume(array, Geometry.from_ijk_to_ras(ijk_to_ras(volume_node), size), name or volume_node.GetName())


def node_from_volume(scene, volume: Volume, name: str = "", label: bool = False, node=None):
    """A scalar (or label map) volume node holding a copy of ``volume`` with its geometry."""
    cls = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(cls, name or volume.label)
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.geometry.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array))
    return node


def sequence_of(name: str) -> Optional[str]:
    """The sequence (``flair``, ``t1c``, ``t1``, ``t2``) a node name suggests, or ``None``."""
    text = re.sub(r"[^a-z0-9+]+", " ", name.lower())
    for sequence, pattern in SEQUENCE_PATTERNS.items():
        if re.search(pattern, text):
            return sequence
    return None


def guess_sequences(volume_nodes: Iterable, overrides: Optional[Mapping[str, object]] = None) -> dict:
    """``{sequence: node}`` guessed from node names (first match per sequence), then ``overrides`` applied
    (a value of ``None`` removes that sequence)."""
    guessed: dict = {}
    for node in volume_nodes:
        if node is None or node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        sequence = sequence_of(node.GetName() or "")
        if sequence is not None and sequence not in guessed:
            guessed[sequence] = node
    for sequence, node in (overrides or {}).items():
        if node is None:
            guessed.pop(sequence, None)
        else:
            guessed[sequence] = node
    return guessed


def scalar_volume_nodes(scene) -> list:
    """Scalar (non-label) volume nodes of the scene, in scene order."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    out = [nodes.GetItemAsObject(n) for n in range(nodes.GetNumberOfItems())]
    return [n for n in out if not n.IsA("vtkMRMLLabelMapVolumeNode")]


# --------------------------------------------------------------------------------------------------- ROIs
def roi_extent(roi_node, volume_node) -> Extent:
    """Inclusive IJK extent ``(i0, i1, j0, j1, k0, k1)`` of the voxels inside a ROI (Slicer's rule).

    Along an axis where the ROI is thinner than one voxel (e.g. a flat box drawn on one slice), it gets the
    slice nearest to its centre. The extent is clipped to the volume;
    a ROI outside the volume raises :class:`InputError`.
    """
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError("expected a Markups ROI node")
    _check_volume_node(volume_node)
    extent = [0] * 6
    if not slicer.vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent(roi_node, volume_node, extent, False):
        raise InputError(f"ROI {roi_node.GetName()!r}: cannot compute its voxels in {volume_node.GetName()!r}")
    size = volume_node.GetImageData().GetDimensions()
    centre = _roi_centre_ijk(roi_node, volume_node)
    for axis in range(3):
        lo, hi = extent[2 * axis], extent[2 * axis + 1]
        if hi < lo:  # no voxel centre inside along this axis: the nearest slice
            lo = hi = int(np.floor(centre[axis] + 0.5))
        lo, hi = max(lo, 0), min(hi, size[axis] - 1)
        if hi < lo:
            raise InputError(f"ROI {roi_node.GetName()!r} lies outside volume {volume_node.GetName()!r}")
        extent[2 * axis], extent[2 * axis + 1] = lo, hi
    return tuple(int(e) for e in extent)


def _roi_centre_ijk(roi_node, volume_node) -> np.ndarray:
    """Continuous IJK of the ROI centre (world -> volume node coordinates -> IJK)."""
    centre = np.zeros(3)
    roi_node.GetCenterWorld(centre)
    world_to_node = np.eye(4)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        matrix = vtkMatrix4x4()
        parent.GetMatrixTransformFromWorld(matrix)
        world_to_node = matrix_to_numpy(matrix)
    ras = world_to_node @ np.r_[centre, 1.0]
    return (np.linalg.inv(ijk_to_ras(volume_node)) @ ras)[:3]


def prompt_from_rois(volume_node, roi_nodes: Sequence, object_id: int, strategy: str = "A",
                     z_range: Optional[tuple[int, int]] = None, name: str = "") -> ObjectPrompt:
    """One object's prompt from one or more ROIs on ``volume_node``.

    The ROIs' voxel extents become a prompt by the service's rule
    (:func:`mrisegassist.service.prompt_from_extents`: a thick ROI gives boxes on the slices of
    ``prompt.strategies.box_slices`` A/B, its slices as z-range and its rectangle as bounds; a flat ROI one box
    and no z-range; several ROIs one box each), except:

    * One ROI carrying a prompt stored by :func:`store_prompt` (atlas boxes) for this volume and ``strategy``,
      not moved or resized since: that prompt's boxes and z-range.
    An explicit ``z_range`` (inclusive slice indices) overrides the one derived from the ROIs.
    """
    if not roi_nodes:
        raise InputError(f"object {object_id}: no ROI given")
    extents = [roi_extent(roi, volume_node) for roi in roi_nodes]
    name = name or (roi_nodes[0].GetName() if len(roi_nodes) == 1 else f"Object {object_id}")
    shape = volume_shape(volume_node)
    stored = _stored_prompt(roi_nodes[0], volume_node, extents[0], strategy) if len(roi_nodes) == 1 else None
    if stored is None:
        return prompt_from_extents(extents, object_id, shape, strategy, z_range, name)
    # e.g. atlas boxes: per-slice rectangles tighter than the ROI's 3D bounding box, the ROI's bounds
    boxes, derived = stored
    i0, i1, j0, j1, k0, k1 = extents[0]
    bounds = (i0, j0, i1, j1) if k1 > k0 else None
    zr = tuple(int(z) for z in z_range) if z_range is not None else derived
    return ObjectPrompt(object_id, boxes, zr, name, bounds).validate(shape)


def store_prompt(roi_node, volume_node, prompt: ObjectPrompt, strategy: str) -> None:
    """Record ``prompt`` (boxes in ``volume_node``'s IJK) on ``roi_node``, valid while the ROI keeps its voxels."""
    roi_node.SetAttribute(ROI_PROMPT, json.dumps({
        "volume": volume_node.GetID(), "strategy": strategy, "extent": list(roi_extent(roi_node, volume_node)),
        "boxes": [[b.k, b.i0, b.j0, b.i1, b.j1] for b in prompt.boxes],
        "z_range": list(prompt.z_range) if prompt.z_range is not None else None}))


def _stored_prompt(roi_node, volume_node, extent: Extent, strategy: str):
    """``(boxes, z_range)`` stored on the ROI if it still applies (same volume, strategy and voxels), else None."""
    text = roi_node.GetAttribute(ROI_PROMPT)
    if not text:
        return None
    try:
        d = json.loads(text)
        if d["volume"] != volume_node.GetID() or d["strategy"] != strategy or tuple(d["extent"]) != tuple(extent):
            return None
        boxes = [Box2D(*(int(v) for v in b)) for b in d["boxes"]]
        return boxes, (tuple(int(z) for z in d["z_range"]) if d["z_range"] is not None else None)
    except (ValueError, KeyError, TypeError):
        return None


def volume_shape(volume_node) -> tuple[int, int, int]:
    """``(k, j, i)`` array shape of a volume node."""
    i, j, k = volume_node.GetImageData().GetDimensions()
    return (k, j, i)


def roi_from_extent(scene, volume_node, extent: Extent, name: str = "ROI", roi_node=None):
    """A Markups ROI aligned with the volume's axes covering exactly the voxels of ``extent`` (inclusive).

    The ROI's faces lie on voxel edges, so :func:`roi_extent` of the result gives ``extent`` back.
    """
    i0, i1, j0, j1, k0, k1 = (int(e) for e in extent)
    if i1 < i0 or j1 < j0 or k1 < k0:
        raise InputError(f"empty extent {extent}")
    m = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = m[:3, :3] / spacing
    object_to_node[:3, 3] = (m @ np.array([(i0 + i1) / 2, (j0 + j1) / 2, (k0 + k1) / 2, 1.0]))[:3]
    if roi_node is None:
        roi_node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi_node.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(object_to_node))
    roi_node.SetSize(*(spacing * np.array([i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1])))
    roi_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return roi_node


# ------------------------------------------------------------------------------------------ segmentations
def new_segmentation_node(scene, volume_node, name: str = ""):
    """An empty segmentation node whose reference geometry (and parent transform) is ``volume_node``'s."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volume_node.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


def _oriented_mask(mask: np.ndarray, volume_node):
    """``vtkOrientedImageData`` (uint8 0/1) of a ``[k, j, i]`` mask on the volume's grid."""
    image = slicer.vtkOrientedImageData()
    nk, nj, ni = mask.shape
    image.SetDimensions(ni, nj, nk)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, dtype=np.uint8).ravel(), deep=True,
                                         array_type=VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras(volume_node)))
    return image


def write_segments(segmentation_node, volume_node, labels: np.ndarray, infos: Sequence[LabelInfo]) -> list[str]:
    """Write each label of a ``[k, j, i]`` label array on ``volume_node``'s grid into its own segment.

    The segment named ``info.name`` is replaced if it exists, otherwise added; its colour and (when given)
    standard terminology come from the :class:`LabelInfo`. Labels absent from ``labels`` give empty segments.
    Returns the segment IDs in the order of ``infos``.
    """
    if tuple(labels.shape) != volume_shape(volume_node):
        raise InputError(f"label array shape {labels.shape} does not match volume {volume_node.GetName()!r} "
                         f"{volume_shape(volume_node)}")
    segmentation = segmentation_node.GetSegmentation()
    ids = []
    was_modified = segmentation_node.StartModify()
    try:
        for info in infos:
            segment_id = segmentation.GetSegmentIdBySegmentName(info.name)
            if not segment_id:
                segment_id = segmentation.AddEmptySegment("", info.name, list(info.color))
            segment = segmentation.GetSegment(segment_id)
            segment.SetColor(*[float(c) for c in info.color])
            if info.terminology:
                segment.SetTerminology(info.terminology)
            image = _oriented_mask(labels == info.value, volume_node)
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                    image, segmentation_node, segment_id,
                    slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
                raise RuntimeError(f"could not write segment {info.name!r}")
            ids.append(segment_id)
    finally:
        segmentation_node.EndModify(was_modified)
    return ids


def read_segments(segmentation_node, volume_node, segment_ids: Sequence[str]) -> np.ndarray:
    """``[k, j, i]`` uint16 label array on ``volume_node``'s grid: segment ``segment_ids[n]`` -> ``n + 1``.

    Uses ``ExportSegmentsToLabelmapNode`` (Slicer's export) through a temporary label map node.
    """
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__mrisegassist_export__")
    try:
        ids = vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError("segment export failed")
        return np.array(slicer.util.arrayFromVolume(labelmap), dtype=np.uint16, copy=True)
    finally:
        scene.RemoveNode(labelmap)
