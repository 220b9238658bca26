"""The module's state in the scene: one ``vtkMRMLScriptedModuleNode`` (the parameter node), saved and restored
with the scene. No Qt; usable headless (slicer-core) and inside Slicer.

:data:`FIELDS` is the one list of the panel's settings. :class:`Parameters` reads and writes them with the storage
conventions of Slicer's ``parameterNodeWrapper`` serializers (``str``: the text; ``int``: ``str(value)``;
``bool``: ``"True"``/``"False"``; a node: an empty parameter plus a node reference of the same name), so the
panel's ``parameterNodeWrapper`` class, built from :data:`FIELDS` (:func:`wrapper_annotations`), and this class
read and write the same node. The prompted objects (lists of Markups ROI and point-list nodes) and the atlas
boxes, which the wrapper does not describe, are node references with roles :data:`OBJECT_ROLE` ``N`` (one role
per object, several references each) and :data:`ATLAS_ROLE`; the number of objects is the parameter
``objectCount``. Node references follow the nodes when a scene is saved and loaded again (IDs are remapped).

The server token is not a field: it is never written to the scene (a saved scene would carry it in clear);
the panel keeps it for the session only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

MODULE = "MRISegAssist"
OBJECT_ROLE = "MRISegAssist.object"
ATLAS_ROLE = "MRISegAssist.atlasBox"
OBJECT_COUNT = "objectCount"
#: Node classes an object may hold: boxes and point lists.
PROMPT_CLASSES = ("vtkMRMLMarkupsROINode", "vtkMRMLMarkupsFiducialNode")


@dataclass(frozen=True)
class Field:
    """One setting: ``kind`` is ``str``, ``int``, ``bool`` or a MRML node class name (``node_class``)."""

    name: str
    kind: Any
    default: Any = None
    node_class: str = ""


FIELDS: tuple[Field, ...] = (
    Field("flair", "node", None, "vtkMRMLScalarVolumeNode"),
    Field("t1", "node", None, "vtkMRMLScalarVolumeNode"),
    Field("t1c", "node", None, "vtkMRMLScalarVolumeNode"),
    Field("t2", "node", None, "vtkMRMLScalarVolumeNode"),
    Field("promptSequence", str, "flair"),
    Field("model", str, ""),
    Field("engine", str, "classical"),
    Field("strategy", str, "A"),
    Field("zRangeEnabled", bool, False),
    Field("zMin", int, 0),
    Field("zMax", int, 0),
    Field("cascade", bool, True),
    Field("atlasReference", str, ""),
    Field("computeMode", str, "local"),
    Field("serverUrl", str, ""),
    Field("device", str, ""),
    Field("outputSegmentation", "node", None, "vtkMRMLSegmentationNode"),
)
FIELD = {f.name: f for f in FIELDS}
SEQUENCES = ("flair", "t1", "t1c", "t2")


def wrapper_annotations(slicer_module) -> tuple[dict, dict]:
    """``(annotations, defaults)`` for a ``parameterNodeWrapper`` class equal to :data:`FIELDS` (node fields are
    ``slicer.<class>`` types, defaulting to ``None``)."""
    annotations, defaults = {}, {}
    for f in FIELDS:
        if f.kind == "node":
            annotations[f.name] = getattr(slicer_module, f.node_class)
        else:
            annotations[f.name] = f.kind
            defaults[f.name] = f.default
    return annotations, defaults


def parameter_node(scene, create: bool = True):
    """The module's singleton parameter node of ``scene`` (made as ``ScriptedLoadableModuleLogic`` makes it when
    ``create``), or ``None``."""
    node = scene.GetSingletonNode(MODULE, "vtkMRMLScriptedModuleNode")
    if node is None and create:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(MODULE)
        node.SetName(scene.GenerateUniqueName(MODULE))
        node.SetAttribute("ModuleName", MODULE)
        node = scene.AddNode(node)
    return node


class Parameters:
    """Typed access to the parameter node: ``params.engine``, ``params.flair = node``, ``params.objects``...
    Unset fields read as their defaults."""

    def __init__(self, node) -> None:
        object.__setattr__(self, "node", node)

    @classmethod
    def of_scene(cls, scene) -> "Parameters":
        return cls(parameter_node(scene))

    # ------------------------------------------------------------------------------------------- fields
    def __getattr__(self, name: str):
        f = FIELD.get(name)
        if f is None:
            raise AttributeError(name)
        node = self.node
        if f.kind == "node":
            return node.GetNodeReference(name)
        if not node.HasParameter(name):
            return f.default
        text = node.GetParameter(name)
        if f.kind is bool:
            return text == "True"
        if f.kind is int:
            try:
                return int(text)
            except ValueError:
                return f.default
        return text

    def __setattr__(self, name: str, value) -> None:
        f = FIELD.get(name)
        if f is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        node = self.node
        if f.kind == "node":
            if value is not None and not value.IsA(f.node_class):
                raise TypeError(f"{name}: expected a {f.node_class}, got a {value.GetClassName()}")
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        elif f.kind is bool:
            node.SetParameter(name, "True" if value else "False")
        else:
            node.SetParameter(name, str(f.kind(value)))

    def inputs(self) -> dict:
        """``{sequence: volume node}`` of the selected inputs."""
        return {s: getattr(self, s) for s in SEQUENCES if getattr(self, s) is not None}

    def z_range(self) -> Optional[tuple[int, int]]:
        return (self.zMin, self.zMax) if self.zRangeEnabled else None

    # ------------------------------------------------------------------------------------------ objects
    @property
    def objects(self) -> list[list]:
        """The prompted objects: per object, its ROI and point-list nodes (nodes removed from the scene are
        skipped; an object may be empty while its first box is being placed)."""
        count = self._count()
        return [[self.node.GetNthNodeReference(f"{OBJECT_ROLE}{n}", m)
                 for m in range(self.node.GetNumberOfNodeReferences(f"{OBJECT_ROLE}{n}"))
                 if self.node.GetNthNodeReference(f"{OBJECT_ROLE}{n}", m) is not None]
                for n in range(1, count + 1)]

    def _count(self) -> int:
        try:
            return max(int(self.node.GetParameter(OBJECT_COUNT) or 0), 0)
        except ValueError:
            return 0

    def set_objects(self, objects: Sequence[Sequence]) -> None:
        """Replace every object (lists of ROI / point-list nodes)."""
        node = self.node
        was = node.StartModify()
        try:
            for n in range(1, self._count() + 1):
                node.RemoveNodeReferenceIDs(f"{OBJECT_ROLE}{n}")
            for n, group in enumerate(objects, start=1):
                for prompt_node in group:
                    _check_prompt_node(prompt_node)
                    node.AddNodeReferenceID(f"{OBJECT_ROLE}{n}", prompt_node.GetID())
            node.SetParameter(OBJECT_COUNT, str(len(objects)))
        finally:
            node.EndModify(was)

    def add_object(self) -> int:
        """A new empty object; returns its index (0-based)."""
        objects = self.objects
        self.set_objects(objects + [[]])
        return len(objects)

    def add_to_object(self, index: int, prompt_node) -> None:
        """Add a ROI or point list to object ``index`` (a new object when ``index`` is past the last)."""
        objects = self.objects
        while index >= len(objects):
            objects.append([])
        if prompt_node not in objects[index]:
            objects[index].append(prompt_node)
        self.set_objects(objects)

    def remove_object(self, index: int, scene=None) -> list:
        """Remove object ``index``; with ``scene``, its nodes are removed from the scene too. Returns them."""
        objects = self.objects
        if not 0 <= index < len(objects):
            return []
        removed = objects.pop(index)
        self.set_objects(objects)
        if scene is not None:
            for prompt_node in removed:
                if prompt_node.GetScene() is scene:
                    scene.RemoveNode(prompt_node)
        return removed

    def forget_node(self, prompt_node) -> None:
        """Drop a node from every object and from the atlas boxes (e.g. a cancelled placement)."""
        self.set_objects([[n for n in group if n is not prompt_node] for group in self.objects])
        self.set_atlas_boxes([n for n in self.atlas_boxes if n is not prompt_node])

    # -------------------------------------------------------------------------------------- atlas boxes
    @property
    def atlas_boxes(self) -> list:
        node = self.node
        return [node.GetNthNodeReference(ATLAS_ROLE, m) for m in range(node.GetNumberOfNodeReferences(ATLAS_ROLE))
                if node.GetNthNodeReference(ATLAS_ROLE, m) is not None]

    def set_atlas_boxes(self, rois: Sequence) -> None:
        node = self.node
        was = node.StartModify()
        try:
            node.RemoveNodeReferenceIDs(ATLAS_ROLE)
            for roi in rois:
                node.AddNodeReferenceID(ATLAS_ROLE, roi.GetID())
        finally:
            node.EndModify(was)


def _check_prompt_node(node) -> None:
    if node is None or not any(node.IsA(c) for c in PROMPT_CLASSES):
        raise TypeError(f"an object holds Markups ROI and point-list nodes, not "
                        f"{node.GetClassName() if node is not None else None}")
