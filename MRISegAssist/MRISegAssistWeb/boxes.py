"""Box prompts of the browser page: Markups ROIs placed with two clicks in a slice view (trame-slicer's
markups place mode), added from an IJK extent, or made by the logic's atlas boxes; listed in the panel
(state ``boxes``). A mixin of :class:`~MRISegAssistWeb.app.MRISegAssistWebApp`.
"""
from __future__ import annotations

import numpy as np

from mrisegassist.errors import InputError

from MRISegAssistLib import nodes
from MRISegAssistLib.logic import OBJECT_COLORS, ROI_COLOR

from .jobs import page_action


class BoxPrompts:
    """ROI placement and the box list; expects the app's ``state``, ``scene``, ``slicer_app``, ``jobs``,
    ``rois``, ``volume_nodes``, ``base_volume_node()``, ``goto_ras()`` and ``_slice_views()``."""

    @page_action
    def start_box(self) -> None:
        """Enter ROI placement: the next two clicks in a slice view are the box's opposite corners."""
        self.base_volume_node()
        if self.state.placing:
            return
        n = len(self.rois) + 1
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"Box {n}")
        self._track_roi(roi)
        self.slicer_app.markups_logic.place_node(roi, False)
        self.state.placing = True
        self.state.info = "click two opposite corners of the box on a slice view"

    def _track_roi(self, roi) -> None:
        from slicer import vtkMRMLMarkupsNode

        roi.CreateDefaultDisplayNodes()
        color = OBJECT_COLORS[len(self.rois) % len(OBJECT_COLORS)]
        display = roi.GetDisplayNode()
        if display is not None:
            display.SetFillOpacity(0.15)  # the segment drawn inside the box stays visible
            if not roi.GetAttribute(ROI_COLOR):  # atlas boxes keep their structure's colour
                display.SetSelectedColor(*color)
                display.SetColor(*color)
        self.rois.append(roi)
        self._roi_observers[roi.GetID()] = roi.AddObserver(vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                                            self._on_roi_point)
        self._refresh_boxes()

    def _on_roi_point(self, roi, _event) -> None:
        """Placement ends at the second corner (the ROI then has a size; Slicer gives it a depth equal to its
        width): flatten the box to the slice it was drawn on (option) and leave place mode."""
        if not self.state.placing or not self.rois or roi is not self.rois[-1]:
            return
        if max(roi.GetSize()) <= 0:  # first corner
            self._first_corner = np.array(roi.GetNthControlPointPositionWorld(0))
            return
        if self.jobs.loop is not None and self.jobs.loop.is_running():
            self.jobs.loop.call_soon(self._finish_placement, roi)  # after the markups widget is done
        else:
            self._finish_placement(roi)

    def _finish_placement(self, roi) -> None:
        with self.state:
            if roi.GetScene() is None:
                return
            if self.state.box_flat:
                size = list(roi.GetSize())
                size[self._depth_axis(roi)] = 0.0
                roi.SetSize(*size)
            self.slicer_app.markups_logic.disable_place_mode()
            self.state.placing = False
            self.state.info = f"{roi.GetName()} placed; add more boxes or propagate"
            self._refresh_boxes()

    def _depth_axis(self, roi) -> int:
        """The ROI axis across the slice view it was drawn in: that view's plane holds both the first corner
        and the centre."""
        centre = np.zeros(3)
        roi.GetCenterWorld(centre)
        corner = self._first_corner if self._first_corner is not None else centre
        best, best_score = None, np.inf
        for view in self._slice_views():
            slice_to_ras = view.get_view_node().GetSliceToRAS()
            normal = np.array([slice_to_ras.GetElement(r, 2) for r in range(3)])
            origin = np.array([slice_to_ras.GetElement(r, 3) for r in range(3)])
            score = abs(float(np.dot(centre - corner, normal))) + abs(float(np.dot(centre - origin, normal)))
            if score < best_score:
                best, best_score = normal, score
        object_to_world = roi.GetObjectToWorldMatrix()
        axes = np.array([[object_to_world.GetElement(r, c) for r in range(3)] for c in range(3)])
        return int(np.argmax(np.abs(axes @ best)))

    @page_action
    def cancel_box(self) -> None:
        if self.state.placing:
            self.slicer_app.markups_logic.disable_place_mode()
            self.state.placing = False
            if self.rois and self.rois[-1].GetNumberOfDefinedControlPoints() < 2:
                self._forget_roi(self.rois[-1])
            self._refresh_boxes()

    def add_box_from_extent(self, extent, name: str = "") -> object:
        """A box ROI covering IJK ``extent`` ``(i0, i1, j0, j1, k0, k1)`` of the base volume (the logic's
        ``roi_from_extent``); as if drawn in the page."""
        roi = nodes.roi_from_extent(self.scene, self.base_volume_node(), extent, name or f"Box {len(self.rois) + 1}")
        self._track_roi(roi)
        return roi

    def _forget_roi(self, roi) -> None:
        tag = self._roi_observers.pop(roi.GetID(), None) if roi.GetID() else None
        if tag is not None:
            roi.RemoveObserver(tag)
        if roi in self.rois:
            self.rois.remove(roi)
        if roi.GetScene() is not None:
            self.scene.RemoveNode(roi)

    @page_action
    def remove_box(self, roi_id: str) -> None:
        roi = next((r for r in self.rois if r.GetID() == roi_id), None)
        if roi is not None:
            self._forget_roi(roi)
        self._refresh_boxes()

    @page_action
    def clear_boxes(self) -> None:
        self.cancel_box()
        for roi in list(self.rois):
            self._forget_roi(roi)
        self._refresh_boxes()

    @page_action
    def goto_box(self, roi_id: str) -> None:
        roi = next((r for r in self.rois if r.GetID() == roi_id), None)
        if roi is not None:
            centre = [0.0, 0.0, 0.0]
            roi.GetCenterWorld(centre)
            self.goto_ras(centre)

    def _placed_rois(self) -> list:
        return [r for r in self.rois if r.GetScene() is not None and r.GetNumberOfControlPoints() >= 1
                and not (self.state.placing and r is self.rois[-1])]

    def _refresh_boxes(self) -> None:
        rows = []
        volume = self.volume_nodes.get(self.state.base_volume)
        for roi in self.rois:
            if roi.GetScene() is None:
                continue
            row = {"id": roi.GetID(), "name": roi.GetName(), "extent": "placing..."}
            if volume is not None and roi.GetNumberOfControlPoints() >= 1 and roi in self._placed_rois():
                try:
                    i0, i1, j0, j1, k0, k1 = nodes.roi_extent(roi, volume)
                    slices = f"slice {k0}" if k0 == k1 else f"slices {k0}-{k1}"
                    row["extent"] = f"i {i0}-{i1}, j {j0}-{j1}, {slices}"
                except InputError as exc:
                    row["extent"] = str(exc)
            rows.append(row)
        self.state.boxes = rows
