"""A Slicer scene without the Slicer application (slicer-core from PyPI, or inside Slicer for scripting).

:class:`HeadlessScene` wires a ``vtkMRMLScene`` to a ``vtkSlicerApplicationLogic`` with the colours,
volumes, terminologies and segmentations logics registered, as Slicer's application (and trame-slicer's
``SlicerApp``) do, and loads files with Slicer's own readers. Used by the tests, the self-test
expectation script and scripts that run MRISegAssist's logic outside Slicer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import slicer

from mrisegassist.errors import InputError

#: Formats slicer-core cannot read (no ITK GIPL reader in its build): read with SimpleITK instead.
ENGINE_READ_SUFFIXES = (".gipl", ".gipl.gz")


def _share_directory() -> Optional[Path]:
    """trame-slicer ships Slicer's terminology JSON files; use them as the share folder when installed."""
    try:
        from trame_slicer.resources import resources_path
    except ImportError:
        return None
    return Path(resources_path())


class HeadlessScene:
    """``scene`` plus the module logics a Slicer application registers (``volumes_logic``, ...)."""

    def __init__(self) -> None:
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())
        share = _share_directory()
        self.color_logic = self._register(slicer.vtkMRMLColorLogic(), "Colors")
        self.volumes_logic = self._register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        self.terminologies_logic = self._register(
            slicer.vtkSlicerTerminologiesModuleLogic(), "Terminologies",
            share / "terminologies" if share is not None else None)
        self.segmentations_logic = self._register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        # Markups: its storage nodes (ROIs and point lists saved with a scene) are registered by its logic
        self.markups_logic = self._register(slicer.vtkSlicerMarkupsLogic(), "Markups")

    def save_scene(self, folder) -> Path:
        """Save the scene and every node's data into ``folder`` as Slicer's *Save* does: nodes without a storage
        node get their default one, then ``SaveSceneToSlicerDataBundleDirectory``. Returns the ``.mrml`` path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        nodes = self.scene.GetNodesByClass("vtkMRMLStorableNode")
        for n in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(n)
            if node.GetHideFromEditors() or not node.GetSaveWithScene():
                continue
            if node.GetStorageNode() is None:
                node.AddDefaultStorageNode()
        if not self.app_logic.SaveSceneToSlicerDataBundleDirectory(str(folder), None):
            raise InputError(f"could not save the scene into {folder}")
        return next(folder.glob("*.mrml"))

    def load_scene(self, mrml) -> None:
        """Add the nodes of a saved scene (``.mrml`` and its data files) to this scene."""
        self.scene.SetURL(str(mrml))
        if not self.scene.Import():
            raise InputError(f"{mrml}: Slicer cannot load this scene")

    def _register(self, logic, name: str, share: Optional[Path] = None):
        if share is not None and share.exists() and hasattr(logic, "SetModuleShareDirectory"):
            logic.SetModuleShareDirectory(share.as_posix())
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def load_volume(self, path, name: str = "", label: bool = False):
        """Load a volume file with Slicer's reader (``vtkSlicerVolumesLogic.AddArchetypeVolume``). GIPL, which
        slicer-core's readers lack, is read by the engine (SimpleITK) into a node with the same geometry."""
        path = Path(path)
        name = name or path.name
        if path.name.lower().endswith(ENGINE_READ_SUFFIXES):
            from mrisegassist.volume import read_volume

            from .nodes import node_from_volume

            node = node_from_volume(self.scene, read_volume(path, "label" if label else "image", name), name, label)
            node.CreateDefaultDisplayNodes()
            return node
        node = self.volumes_logic.AddArchetypeVolume(str(path), name, 1 if label else 0)
        if node is None:
            raise InputError(f"{path}: Slicer cannot read this file as a volume")
        return node
