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
from mrisegassist.prompt.base import Box2D, ObjectPrompt, Point2D
from mrisegassist.service.core import prompt_from_extents
from mrisegassist.service.views import ViewGrid, view_grid
from mrisegassist.volume import Geometry, Volume

Extent = tuple[int, int, int, int, int, int]
#: ROI attribute holding the engine's own prompt for that ROI (atlas boxes): used while the ROI is unchanged.
ROI_PROMPT = "MRISegAssist.Prompt"
#: ROI / point-list attribute: world RAS normal ``"x,y,z"`` of the slice view it was drawn in.
ROI_VIEW = "MRISegAssist.View"
#: ROI attribute: its thickness (mm) along that normal when it was placed (Slicer's padding of a two-click box).
ROI_PLACED_THICKNESS = "MRISegAssist.PlacedThickness"
#: Point-list attribute: ``positive`` (default) or ``negative``.
POINT_POLARITY = "MRISegAssist.Polarity"

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
def world_to_node(volume_node) -> np.ndarray:
    """4x4 matrix from world RAS to the volume node's own frame (its parent transform inverted; linear only)."""
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"volume {volume_node.GetName()!r} is under a non-linear transform: harden it first")
    matrix = vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(matrix)
    return matrix_to_numpy(matrix)


def _roi_frame(roi_node, volume_node) -> tuple[np.ndarray, np.ndarray]:
    """``(object_to_node, size)``: the ROI's box frame (4x4, columns = its axes and centre) in the volume node's
    frame, and its size (mm) along its own axes."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError("expected a Markups ROI node")
    return world_to_node(volume_node) @ matrix_to_numpy(roi_node.GetObjectToWorldMatrix()), np.array(
        roi_node.GetSize(), dtype=float)


def roi_corners(roi_node, volume_node) -> np.ndarray:
    """``(8, 3)`` RAS corners of a ROI in the volume node's frame."""
    object_to_node, size = _roi_frame(roi_node, volume_node)
    corners = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)]) * size
    return (object_to_node @ np.c_[corners, np.ones(8)].T).T[:, :3]


def roi_extent(roi_node, volume_node) -> Extent:
    """Inclusive IJK extent ``(i0, i1, j0, j1, k0, k1)`` of the voxels inside a ROI: Slicer's crop rule
    (``vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent``, as :func:`mrisegassist.service.views.voxel_extent`
    states it). Along an axis where the ROI is thinner than one voxel it gets the slice nearest to its centre.
    Clipped to the volume; a ROI outside the volume raises :class:`InputError`."""
    _check_volume_node(volume_node)
    return _grid(volume_node).extent(roi_corners(roi_node, volume_node),
                                     f"ROI {roi_node.GetName()!r} in volume {volume_node.GetName()!r}")


def _grid(volume_node, normal=None) -> ViewGrid:
    size = volume_node.GetImageData().GetDimensions()
    return view_grid(Geometry.from_ijk_to_ras(ijk_to_ras(volume_node), size), normal)


def _unit(vector) -> Optional[np.ndarray]:
    v = np.asarray(vector, dtype=float)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and np.isfinite(n) else None


def _normal_in_node(normal_world, volume_node) -> np.ndarray:
    """A direction given in world RAS, in the volume node's frame (unit)."""
    return _unit(world_to_node(volume_node)[:3, :3] @ np.asarray(normal_world, dtype=float))


def _vector_attribute(node, name: str) -> Optional[np.ndarray]:
    text = node.GetAttribute(name)
    if not text:
        return None
    try:
        return _unit([float(v) for v in text.split(",")])
    except ValueError:
        return None


def padded_axes(roi_node) -> list[int]:
    """The ROI axes that may be the one Slicer padded when the ROI was placed with two clicks in a slice view
    (``vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints`` gives the zero-thickness side the shortest other
    side): the axes whose size is the smallest (within 1e-6 mm). For a non-square box these are two, the padded
    one and the box's shorter side: the geometry alone cannot tell them apart; :func:`placement_view` can."""
    size = np.array(roi_node.GetSize(), dtype=float)
    return [a for a in range(3) if size[a] <= size.min() + 1e-6]


def placement_view(roi_node, slice_planes: Sequence = ()) -> Optional[np.ndarray]:
    """World RAS normal of the slice view a ROI was just drawn in with two clicks: of its axes that Slicer may
    have padded (:func:`padded_axes`), the one normal to a slice view (``slice_planes``: ``[(normal_ras,
    point_ras)]``) whose plane passes through the ROI's centre (0.5 mm): both clicks, hence the centre, lie on the
    drawing view's plane. ``None`` when no axis or more than one fits."""
    axes = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())[:3, :3]
    centre = np.zeros(3)
    roi_node.GetCenterWorld(centre)
    found = []
    for a in padded_axes(roi_node):
        axis = _unit(axes[:, a])
        for normal, point in slice_planes:
            n = _unit(normal)
            if n is not None and abs(abs(float(axis @ n)) - 1.0) < 1e-3 \
                    and abs(float(n @ (centre - np.asarray(point, dtype=float)))) <= 0.5:
                found.append(a)
                break
    return _unit(axes[:, found[0]]) if len(found) == 1 else None


def point_view(point_node, slice_planes: Sequence = ()) -> Optional[np.ndarray]:
    """World RAS normal of the slice view whose plane holds the last placed point of a point list (0.5 mm), or
    ``None``."""
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    for n in reversed(range(point_node.GetNumberOfControlPoints())):
        if point_node.GetNthControlPointPositionStatus(n) != defined:
            continue
        pos = np.zeros(3)
        point_node.GetNthControlPointPositionWorld(n, pos)
        for normal, point in slice_planes:
            unit = _unit(normal)
            if unit is not None and abs(float(unit @ (pos - np.asarray(point, dtype=float)))) <= 0.5:
                return unit
        return None
    return None


def record_placement(roi_node, normal_world) -> None:
    """Record on a ROI placed with two clicks the view it was drawn in (world RAS ``normal_world``) and its
    thickness along that normal now (Slicer's padding): while that thickness is unchanged the ROI is a flat box
    on the slice it was drawn on (:func:`roi_view`)."""
    n = _unit(normal_world)
    axes = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())[:3, :3]
    a = int(np.argmax(np.abs(axes.T @ n) / np.linalg.norm(axes, axis=0)))
    roi_node.SetAttribute(ROI_VIEW, ",".join(f"{v:.6f}" for v in n))
    roi_node.SetAttribute(ROI_PLACED_THICKNESS, f"{float(roi_node.GetSize()[a]):.6f}")


def roi_view(roi_node, volume_node) -> tuple[Optional[np.ndarray], bool]:
    """``(normal, flat)``: the RAS normal (volume node frame) of the view a ROI was drawn in, and whether it is a
    flat box on one slice of that view (propagated until the object ends) rather than a box bounding the object.

    * A ROI whose placement was recorded (:func:`record_placement`; the panel records every box drawn with its
      *Place box* button or added with *Add to object* right after drawing, from the slice view whose plane holds
      it): its view; flat while its thickness along that view's normal is the one Slicer gave it when it was
      placed (within 0.01 mm); a ROI thickened or thinned since bounds the object.
    * A ROI with exactly one side of zero size (e.g. the browser front end's boxes): flat, in the view normal to
      that side.
    * Otherwise it bounds the object, with no view (the volume's own slices): e.g. ROIs made by scripts.
    A ROI thinner than one voxel along the view's normal is flat in any case (the crop rule gives one slice).
    """
    axes = matrix_to_numpy(roi_node.GetObjectToWorldMatrix())[:3, :3]
    size = np.array(roi_node.GetSize(), dtype=float)
    recorded = _vector_attribute(roi_node, ROI_VIEW)
    if recorded is None:
        zero = [a for a in range(3) if size[a] <= 1e-6]
        if len(zero) == 1:
            return _normal_in_node(axes[:, zero[0]], volume_node), True
        return None, False
    a = int(np.argmax(np.abs(axes.T @ recorded) / np.linalg.norm(axes, axis=0)))
    try:
        placed = float(roi_node.GetAttribute(ROI_PLACED_THICKNESS))
    except (TypeError, ValueError):
        placed = None
    return _normal_in_node(recorded, volume_node), placed is not None and abs(size[a] - placed) <= 0.01


def is_placed(prompt_node) -> bool:
    """Whether a ROI has been drawn (a non-zero size) or a point list has a placed point."""
    if _is_point_list(prompt_node):
        return prompt_node.GetNumberOfDefinedControlPoints() > 0
    return any(float(v) > 0 for v in prompt_node.GetSize())


def _is_point_list(node) -> bool:
    return node is not None and node.IsA("vtkMRMLMarkupsFiducialNode")


def point_polarity(point_node) -> bool:
    """True for a list of positive points (the default), False for negative ones (``MRISegAssist.Polarity``)."""
    return (point_node.GetAttribute(POINT_POLARITY) or "positive").lower() != "negative"


def points_ras(point_node, volume_node) -> np.ndarray:
    """``(N, 3)`` RAS positions (volume node frame) of the placed control points of a point list."""
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    out = []
    for n in range(point_node.GetNumberOfControlPoints()):
        if point_node.GetNthControlPointPositionStatus(n) != defined:
            continue
        pos = np.zeros(3)
        point_node.GetNthControlPointPositionWorld(n, pos)
        out.append((world_to_node(volume_node) @ np.r_[pos, 1.0])[:3])
    return np.array(out, dtype=float).reshape(-1, 3)


def object_view(prompt_nodes: Sequence, volume_node) -> Optional[np.ndarray]:
    """The view of an object: that of its first ROI with one (:func:`roi_view`), else the one recorded on its
    first point list that has one, else ``None`` (the volume's own slices)."""
    for node in prompt_nodes:
        if not _is_point_list(node):
            normal, _ = roi_view(node, volume_node)
            if normal is not None:
                return normal
    for node in prompt_nodes:
        if _is_point_list(node):
            recorded = _vector_attribute(node, ROI_VIEW)
            if recorded is not None:
                return _normal_in_node(recorded, volume_node)
    return None


def prompt_from_rois(volume_node, roi_nodes: Sequence, object_id: int, strategy: str = "A",
                     z_range: Optional[tuple[int, int]] = None, name: str = "") -> ObjectPrompt:
    """One object's prompt from its Markups ROIs and point lists on ``volume_node``.

    The object's view (:func:`object_view`) gives the grid the prompt is in (the service's
    :func:`mrisegassist.service.views.view_grid`: the volume seen from that view). Each ROI's voxels by Slicer's
    crop rule in that grid (:func:`roi_extent`); a flat ROI (:func:`roi_view`) keeps only the slice through its
    centre. Extents and points become the prompt by the service's rule
    (:func:`mrisegassist.service.prompt_from_extents`: a thick ROI gives boxes on the slices of
    ``prompt.strategies.box_slices`` A/B, its slices as z-range and its rectangle as bounds; a flat ROI one box
    and no z-range; several ROIs one box each; points as positive or negative by their list's polarity), except:

    * One ROI carrying a prompt stored by :func:`store_prompt` (atlas boxes) for this volume and ``strategy``,
      not moved or resized since, and no view: that prompt's boxes and z-range.
    An explicit ``z_range`` (inclusive slice indices along the view's normal) overrides the derived one.
    """
    if not roi_nodes:
        raise InputError(f"object {object_id}: no ROI or point given")
    _check_volume_node(volume_node)
    rois = [n for n in roi_nodes if not _is_point_list(n)]
    lists = [n for n in roi_nodes if _is_point_list(n)]
    normal = object_view(roi_nodes, volume_node)
    grid = _grid(volume_node, normal)
    name = name or (roi_nodes[0].GetName() if len(roi_nodes) == 1 else f"Object {object_id}")
    extents = []
    for roi in rois:
        if not is_placed(roi):
            raise InputError(f"ROI {roi.GetName()!r} has not been drawn yet (no box placed): draw it or remove it")
        extent = list(grid.extent(roi_corners(roi, volume_node),
                                  f"ROI {roi.GetName()!r} in volume {volume_node.GetName()!r}"))
        _, flat = roi_view(roi, volume_node)
        if flat:
            centre = np.zeros(3)
            roi.GetCenterWorld(centre)
            k = grid.voxel((world_to_node(volume_node) @ np.r_[centre, 1.0])[:3])[2]
            extent[4] = extent[5] = min(max(k, 0), grid.geometry.size[2] - 1)
        extents.append(tuple(extent))
    points = []
    for node in lists:
        positive = point_polarity(node)
        for ras in points_ras(node, volume_node):
            i, j, k = grid.voxel(ras)
            points.append(Point2D(k, i, j, positive))
    if not extents and not points:
        raise InputError(f"object {object_id} ({name}): its point lists have no placed point")
    shape = grid.geometry.shape
    stored = (_stored_prompt(rois[0], volume_node, extents[0], strategy)
              if len(rois) == 1 and not lists and normal is None else None)
    if stored is None:
        return prompt_from_extents(extents, object_id, shape, strategy, z_range, name, points,
                                   tuple(normal) if normal is not None else None)
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
#: ``vtkSegment.SetTerminology`` / ``GetTerminology`` exist from Slicer 5.10; 5.8 keeps the terminology in the
#: segment's ``TerminologyEntry`` tag (``SetTag(vtkSegment.GetTerminologyEntryTagName(), ...)``), which 5.10+
#: still reads. The one version switch of the logic.
SEGMENT_TERMINOLOGY_API = hasattr(slicer.vtkSegment, "SetTerminology")


def set_segment_terminology(segment, terminology: str) -> None:
    """Set a segment's standard terminology (serialized entry) on Slicer 5.8 and 5.10+ alike."""
    if SEGMENT_TERMINOLOGY_API:
        segment.SetTerminology(terminology)
    else:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)


def segment_terminology(segment) -> str:
    """A segment's serialized terminology entry (``""`` if none), on Slicer 5.8 and 5.10+ alike."""
    if SEGMENT_TERMINOLOGY_API:
        return segment.GetTerminology() or ""
    import vtk

    value = vtk.reference("")
    found = segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value)
    return str(value) if found else ""


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
                set_segment_terminology(segment, info.terminology)
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
