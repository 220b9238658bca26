"""Render docs/screenshots/segmentation_overlay.png: real Slicer slice views (slicer-core through trame-slicer,
offscreen EGL) of a box-prompted result made by MRISegAssistLogic.

Data: BraTS 2013 pat0002 FLAIR with its expert labels (../shared/data/brats2013-deepmedic, CC BY-NC-SA 3.0);
the box is the bounding box of the expert whole-tumour mask, as a user would draw it.

    .venv/bin/python docs/screenshots/render_slice_views.py [DATA_DIR]
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import slicer  # noqa: E402
from trame_slicer.core import SlicerApp  # noqa: E402
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition  # noqa: E402
from vtkmodules.util.numpy_support import vtk_to_numpy  # noqa: E402
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter  # noqa: E402

from MRISegAssistLib import nodes, selftest  # noqa: E402
from MRISegAssistLib.logic import MRISegAssistLogic  # noqa: E402
from mrisegassist.metrics import overlap_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
data = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data") / "brats2013-deepmedic"

app = SlicerApp()
app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
volume = app.volumes_logic.AddArchetypeVolume(str(data / "pat0002" / "flair.nii.gz"), "pat0002 flair", 0)
labels = app.volumes_logic.AddArchetypeVolume(str(data / "pat0002" / "labels.nii.gz"), "expert labels", 1)
logic = MRISegAssistLogic(app.scene, device="cpu")
tumour = selftest.largest_component(np.asarray(slicer.util.arrayFromVolume(labels)) > 0)
extent = selftest.lesion_extent(tumour, flat=False)
roi = nodes.roi_from_extent(app.scene, volume, extent, "tumour box")
roi.CreateDefaultDisplayNodes()
segmentation = logic.segment_from_rois(volume, [roi], strategy="B")
segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("tumour box")
mask = nodes.read_segments(segmentation, volume, [segment_id]) > 0
dice = overlap_metrics(mask, tumour, distances=False)["dice"]

centre = nodes.ijk_to_ras(volume) @ np.array([(extent[0] + extent[1]) / 2, (extent[2] + extent[3]) / 2,
                                              (extent[4] + extent[5]) // 2, 1.0])
shots = []
for label, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
    view = app.view_manager.create_view(ViewLayoutDefinition.slice_view(orientation, label=label))
    view.render_window().SetSize(420, 420)
    view.set_background_volume_id(volume.GetID())
    view.fit_view_to_content()
    app.scene.GetNodeByID(view.get_view_node_id()).JumpSliceByOffsetting(*centre[:3])
    view.render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    shots.append(vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3])

fig, axes = plt.subplots(1, 3, figsize=(12.6, 4.7), dpi=100)
for ax, shot, title in zip(axes, shots, ("axial", "sagittal", "coronal")):
    ax.imshow(shot)
    ax.set_title(title)
    ax.axis("off")
fig.suptitle("Slicer slice views (slicer-core, offscreen). BraTS 2013 pat0002 FLAIR; box (Markups ROI) around the "
             f"expert whole tumour;\nclassical engine, 3 boxes (strategy B): Dice {dice:.2f} vs the expert mask",
             fontsize=10)
fig.tight_layout()
out = HERE / "segmentation_overlay.png"
fig.savefig(out)
print(f"Dice {dice:.3f}; wrote {out}")
