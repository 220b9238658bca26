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

    def _register(self, logic, name: str, share: Optional[Path] = None):
        if share is not None and share.exists() and hasattr(logic, "SetModuleShareDirectory"):
            logic.SetModuleShareDirectory(share.as_posix())
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def load_volume(self, path, name: str = "", label: bool = False):
        """Load a volume file with Slicer's reader (``vtkSlicerVolumesLogic.AddArchetypeVolume``)."""
        path = Path(path)
        node = self.volumes_logic.AddArchetypeVolume(str(path), name or path.name, 1 if label else 0)
        if node is None:
            raise InputError(f"{path}: Slicer cannot read this file as a volume")
        return node
