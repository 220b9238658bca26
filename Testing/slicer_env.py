"""Headless MRML scene for tests of the MRML logic (real Slicer C++ classes from slicer-core, no Qt).

Skips the importing test module when slicer-core is absent. Nodes are always made with
``scene.AddNewNodeByClass`` (a VTK reference-count mistake would segfault the test process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) is needed for MRML tests")

from MRISegAssistLib.headless import HeadlessScene  # noqa: E402
from MRISegAssistLib.nodes import ijk_to_ras, numpy_to_matrix  # noqa: E402,F401


class SlicerEnv(HeadlessScene):
    """A headless scene with test helpers."""

    def load_with_storage_node(self, path: Path, name: str):
        """Load with an explicit ``vtkMRMLVolumeArchetypeStorageNode.ReadData`` (the other loading path)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node), f"ReadData failed for {path}"
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    def add_roi(self, center_ras, size_mm, name: str = "ROI", object_to_node: Optional[np.ndarray] = None):
        """A Markups ROI with the given RAS centre and size (mm); ``object_to_node`` (4x4) rotates it
        (its translation is replaced by ``center_ras``)."""
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        matrix = np.eye(4) if object_to_node is None else np.array(object_to_node, dtype=float)
        matrix[:3, 3] = center_ras
        roi.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(matrix))
        roi.SetSize(*[float(s) for s in size_mm])
        return roi


def array_of(node) -> np.ndarray:
    """A copy of a volume node's voxels, ``[k, j, i]``."""
    return np.array(slicer.util.arrayFromVolume(node), copy=True)
