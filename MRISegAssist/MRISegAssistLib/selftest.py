"""Workflows with expected Dice: shared by the Slicer self-test (``MRISegAssistTest``), the headless CI tests, and
this module's command that writes the expectations.

The self-test's case is one it builds itself (:func:`synthetic_case`: ``mrisegassist.synth``, a glioma on MNI152
anatomy with exact labels; needs the nilearn package), so it runs anywhere, Slicer's Sample Data reachable or
not: :func:`run_synthetic` checks auto-segmentation, boxes in the axial and coronal views, positive and negative
points, atlas boxes and undo against ``selftest_expected.json``. :func:`compare` fails on a Dice below its
expectation and on an expectation with no result (a workflow that did not run): the self-test never passes
without checking. When Slicer's Sample Data can be downloaded, the Slicer self-test also checks invariants that
need no stored mask on MRBrainTumor1 (:func:`run_invariants`).

The real-data cases below (expert labels) are run by the headless tests on the project's shared data.

Data: a folder laid out as the project's shared data (``$MRISEGASSIST_TEST_DATA``, e.g. ``../shared/data``):
``radiomics-brain`` (thick-slice post-contrast T1 NRRD, expert lesion masks), ``ms-lesjak`` (FLAIR, expert
MS-lesion masks), ``brats2013-deepmedic`` (FLAIR + T1c, expert BraTS labels). Reference masks are expert
labels; the ROI of each case is the bounding box of the reference's largest lesion (a stand-in for the
box a user draws).

Write the expectations (headless, slicer-core)::

    python -m MRISegAssistLib.selftest --data ../shared/data --write
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import slicer
from scipy import ndimage

from mrisegassist.metrics import BRATS_REGIONS, overlap_metrics

from . import nodes

EXPECTED_PATH = Path(__file__).with_name("selftest_expected.json")
#: Default tolerance on Dice (absolute) when the JSON names none.
TOLERANCE = 0.05

#: ``load(path, name, label) -> volume node`` (Slicer: ``slicer.util.loadVolume``; headless: HeadlessScene).
Loader = Callable[[Path, str, bool], object]


@dataclass(frozen=True)
class RoiCase:
    """Box-prompted case: ``image`` and expert ``reference`` mask (paths below the data folder);
    ``roi``: ``"box"`` = the lesion's 3D bounding box (spans its slices) or ``"flat"`` = its rectangle on
    its middle slice only."""

    name: str
    image: str
    reference: str
    roi: str = "box"
    strategy: str = "A"


ROI_CASES = [
    RoiCase("radiomics-brain1-box-A", "radiomics-brain/brain1_image.nrrd", "radiomics-brain/brain1_label.nrrd"),
    RoiCase("radiomics-brain1-box-B", "radiomics-brain/brain1_image.nrrd", "radiomics-brain/brain1_label.nrrd",
            strategy="B"),
    RoiCase("ms-lesjak-patient26-flat", "ms-lesjak/patient26/flair.nii.gz", "ms-lesjak/patient26/lesions.nii.gz",
            roi="flat"),
]
#: A BraTS case (expert labels) the glioma model is checked on; a fold ensemble (whose other members were trained on
#: it) is checked through its member that held it out (:func:`glioma_model_for_case`).
GLIOMA_CASE_NAME = "pat0001"
GLIOMA_CASE = {"flair": f"brats2013-deepmedic/{GLIOMA_CASE_NAME}/flair.nii.gz",
               "t1c": f"brats2013-deepmedic/{GLIOMA_CASE_NAME}/t1c.nii.gz",
               "reference": f"brats2013-deepmedic/{GLIOMA_CASE_NAME}/labels.nii.gz"}


def data_folder() -> Optional[Path]:
    """``$MRISEGASSIST_TEST_DATA`` (or ``$MRISEGASSIST_DATA``) if it names an existing folder."""
    for var in ("MRISEGASSIST_TEST_DATA", "MRISEGASSIST_DATA"):
        value = os.environ.get(var)
        if value and Path(value).is_dir():
            return Path(value)
    return None


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        raise ValueError("reference mask is empty")
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def lesion_extent(mask: np.ndarray, flat: bool) -> tuple[int, int, int, int, int, int]:
    """Inclusive ``(i0, i1, j0, j1, k0, k1)`` box of a ``[k, j, i]`` mask; ``flat``: its middle slice only."""
    kk, _, _ = np.nonzero(mask)
    if flat:
        k = (int(kk.min()) + int(kk.max())) // 2
        jj, ii = np.nonzero(mask[k])
        return int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k
    kk, jj, ii = np.nonzero(mask)
    return int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), int(kk.min()), int(kk.max())


def run_roi_case(logic, load: Loader, data: Path, case: RoiCase, engine: str = "classical") -> dict:
    """Load the case, place the ROI, segment it with ``engine``; Dice against the expert lesion."""
    volume_node = load(data / case.image, f"{case.name} image", False)
    reference_node = load(data / case.reference, f"{case.name} reference", True)
    reference = largest_component(np.asarray(slicer.util.arrayFromVolume(reference_node)) > 0)
    extent = lesion_extent(reference, case.roi == "flat")
    roi = nodes.roi_from_extent(logic.scene, volume_node, extent, "lesion")
    segmentation = logic.segment_from_rois(volume_node, [roi], engine=engine, strategy=case.strategy)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("lesion")
    mask = nodes.read_segments(segmentation, volume_node, [segment_id]) > 0
    spacing = nodes.volume_from_node(volume_node).geometry.spacing
    dice = overlap_metrics(mask, reference, spacing, distances=False)["dice"]
    return {"dice": float(dice), "volume_node": volume_node, "segmentation": segmentation, "roi": roi,
            "mask": mask, "reference": reference}


def glioma_model_for_case(model: str) -> tuple[str, list[str]]:
    """``(model to run, its training cases)`` for :data:`GLIOMA_CASE`: for a cross-validated fold ensemble the
    weights file of the member that held the case out (every other member was trained on it), else ``model``.
    Raises ``ValueError`` when the model to run was trained on the case (its Dice would not be a held-out one)."""
    from mrisegassist.unet.card import held_out_member
    from mrisegassist.unet.entries import get_model

    entry = get_model(model)
    training = entry.training
    if entry.members:
        member = held_out_member(entry, GLIOMA_CASE_NAME)
        if member is None:
            raise ValueError(f"model {entry.name!r}: no ensemble member held out {GLIOMA_CASE_NAME}")
        cases = list(training.get("members", {}).get(GLIOMA_CASE_NAME, {}).get("cases", []))
        model = str(member.weights_path)
    else:
        cases = list(training.get("cases", []))
    if not cases or GLIOMA_CASE_NAME in cases:
        raise ValueError(f"model {entry.name!r} does not record {GLIOMA_CASE_NAME} as held out from its training")
    return model, cases


def run_glioma_case(logic, load: Loader, data: Path, model: Optional[str] = None) -> dict:
    """Auto-segment :data:`GLIOMA_CASE` with the glioma model (a fold ensemble: its member that held the case out,
    :func:`glioma_model_for_case`); Dice per BraTS region (expert labels)."""
    inputs = {s: load(data / GLIOMA_CASE[s], f"glioma {s}", False) for s in ("flair", "t1c")}
    reference_node = load(data / GLIOMA_CASE["reference"], "glioma reference", True)
    reference = np.asarray(slicer.util.arrayFromVolume(reference_node)).astype(np.int32)
    held_out, _ = glioma_model_for_case(model or logic.default_model())
    segmentation = logic.auto_segment(inputs, model=held_out)
    from mrisegassist.unet.entries import get_model

    entry = get_model(logic.last_result.model)
    infos = entry.label_infos()
    ids = [segmentation.GetSegmentation().GetSegmentIdBySegmentName(i.name) for i in infos]
    exported = nodes.read_segments(segmentation, inputs[entry.inputs[0]], ids)
    labels = np.zeros_like(exported, dtype=np.int32)
    for n, info in enumerate(infos, start=1):
        labels[exported == n] = info.value
    spacing = nodes.volume_from_node(inputs["flair"]).geometry.spacing
    dice = {region: float(overlap_metrics(np.isin(labels, values), np.isin(reference, values), spacing,
                                          distances=False)["dice"])
            for region, values in BRATS_REGIONS.items()}
    return {"dice": dice, "segmentation": segmentation, "inputs": inputs, "labels": labels}


def run_all(logic, load: Loader, data: Path, glioma: bool = True) -> dict[str, float]:
    """``{result name: Dice}`` for every ROI case and (if ``glioma`` and a glioma model is installed) the
    glioma regions (``glioma/<region>``)."""
    results = {case.name: run_roi_case(logic, load, data, case)["dice"] for case in ROI_CASES}
    model = logic.default_model() if glioma else None
    if model is not None and model.startswith("glioma"):
        for region, dice in run_glioma_case(logic, load, data, model)["dice"].items():
            results[f"glioma/{region}"] = dice
    return results


def load_expected(path: Path = EXPECTED_PATH) -> dict:
    return json.loads(Path(path).read_text())


def compare(results: dict[str, float], expected: dict, required: Optional[Sequence[str]] = None) -> list[str]:
    """Failure messages: a Dice below its expectation minus the tolerance (a regression; better results pass),
    and every expectation named in ``required`` (default: none; the self-test passes all of its own) that has
    no result (a workflow that did not run). No result at all is a failure."""
    failures = []
    if not results:
        failures.append("no workflow ran: nothing was checked")
    default_tol = float(expected.get("tolerance", TOLERANCE))
    for name in required or ():
        if name not in results:
            failures.append(f"{name}: not run (expected Dice {expected.get('dice', {}).get(name)})")
    for name, exp in expected.get("dice", {}).items():
        if name not in results:
            continue
        value, tol = (exp["value"], exp.get("tolerance", default_tol)) if isinstance(exp, dict) else (exp, default_tol)
        if results[name] < value - tol:
            failures.append(f"{name}: Dice {results[name]:.4f}, expected at least {value:.4f} - {tol}")
    return failures


# ------------------------------------------------------------------------------------------ synthetic case
#: The synthetic glioma the self-test builds (``mrisegassist synth --kind glioma --seed 3``).
SYNTH_SEED = 3
#: Expectations of :func:`run_synthetic` (names in ``selftest_expected.json``); all must have a result.
SYNTH_RESULTS = ("synth/box axial", "synth/box coronal", "synth/point positive", "synth/point negative",
                 "synth/atlas lateral-ventricle-left box", "synth/undo", "synth/auto-segment whole tumour")
ATLAS_STRUCTURE = "lateral-ventricle-left"


def synthetic_case(folder: Path) -> dict[str, Path]:
    """Build (once; reused when present) the self-test's synthetic glioma case in ``folder``:
    ``{"flair", "t1", "t1c", "t2", "labels", "brainmask": path}``."""
    from mrisegassist.synth import make_case, write_case

    folder = Path(folder)
    names = {"flair": "flair", "t1": "t1", "t1c": "t1c", "t2": "t2", "labels": "labels", "brainmask": "brainmask"}
    paths = {k: folder / f"{v}.nii.gz" for k, v in names.items()}
    if not all(p.exists() for p in paths.values()):
        written = write_case(make_case("glioma", SYNTH_SEED, grid="brats"), folder)
        paths = {k: Path(v) for k, v in written.items()}
    return paths


def two_click_box(scene, volume_node, mask: np.ndarray, view: str, name: str = "box", record: bool = True):
    """A Markups ROI as Slicer makes it from two clicks in the ``view`` (axial/coronal/sagittal) slice view on the
    middle slice of ``mask`` (``[k, j, i]`` on ``volume_node``): two corner control points of the lesion's
    rectangle on that slice, to which Slicer itself gives its padded thickness. ``record``: record the placement
    as the panel does when the drawing ends (:func:`nodes.record_placement`)."""
    from mrisegassist.prompt.strategies import box_slices
    from mrisegassist.service.views import VIEWS

    normal = np.array(VIEWS[view])
    volume = nodes.volume_from_node(volume_node)
    grid = nodes.view_grid(volume.geometry, normal)
    on_view = grid.to_view(mask.astype(np.uint8)) > 0
    ks = np.nonzero(on_view.any(axis=(1, 2)))[0]
    k = box_slices((int(ks[0]), int(ks[-1])), "A")[0]
    jj, ii = np.nonzero(on_view[k])
    lo_ras = (grid.geometry.ijk_to_ras @ np.array([ii.min() - 0.5, jj.min() - 0.5, k, 1.0]))[:3]
    hi_ras = (grid.geometry.ijk_to_ras @ np.array([ii.max() + 0.5, jj.max() + 0.5, k, 1.0]))[:3]
    to_world = np.linalg.inv(nodes.world_to_node(volume_node))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    for point in (lo_ras, hi_ras):
        roi.AddControlPointWorld(*((to_world @ np.r_[point, 1.0])[:3]))
    # as Slicer's placement widget leaves a box: its one control point at its centre (a control point left at the
    # first click would move the box there when the scene is saved and loaded again)
    centre = list(roi.GetCenter())
    roi.SetCenter(centre[0] + 1.0, centre[1], centre[2])
    roi.SetCenter(*centre)
    if record:
        nodes.record_placement(roi, normal)
    return roi


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def _segment_mask(logic, volume_node, prompt_nodes, name: str) -> np.ndarray:
    segmentation = logic.segment_from_rois(volume_node, [prompt_nodes], names=[name])
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
    return nodes.read_segments(segmentation, volume_node, [segment_id]) > 0


def run_synthetic(logic, load: Loader, folder: Path, glioma: bool = True, atlas: bool = True) -> dict[str, float]:
    """Every workflow on the synthetic case (built in ``folder`` if needed); ``{result name: value}`` where
    values are Dice against the case's exact labels, and ``synth/point negative`` / ``synth/undo`` are 1.0 when
    that check holds, else 0.0. ``glioma`` / ``atlas``: run auto-segmentation (when a glioma model is
    installed) and atlas boxes (when the atlas is available)."""
    paths = synthetic_case(folder)
    flair = load(paths["flair"], "synth flair", False)
    volumes = {"flair": flair, **{s: load(paths[s], f"synth {s}", False) for s in ("t1", "t1c")}}
    labels = np.asarray(slicer.util.arrayFromVolume(load(paths["labels"], "synth labels", True)))
    before = {s: np.array(slicer.util.arrayFromVolume(n), copy=True) for s, n in volumes.items()}
    tumour = largest_component(labels > 0)
    results: dict[str, float] = {}
    segmentations = logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    undo_depth = len(logic._undo)
    for view in ("axial", "coronal"):
        roi = two_click_box(logic.scene, flair, tumour, view, f"tumour {view}")
        results[f"synth/box {view}"] = _dice(_segment_mask(logic, flair, [roi], f"box {view}"), tumour)
    k, j, i = _deepest(tumour & (labels == 2))  # a click on the bright (FLAIR) oedema, not the dark necrosis
    points = logic.new_point_list(True, "tumour point")
    points.AddControlPointWorld(*_world(flair, (i, j, k)))
    results["synth/point positive"] = _dice(_segment_mask(logic, flair, [points], "point"), tumour)
    roi = two_click_box(logic.scene, flair, tumour, "axial", "tumour box")
    first = _segment_mask(logic, flair, [roi], "negative")
    ks = np.nonzero(first.any(axis=(1, 2)))[0]
    far = first.copy()
    far[:ks[-1] - 3] = False  # the object's last slices, away from the box
    nk, nj, ni = _deepest(far)
    negative = logic.new_point_list(False, "not tumour")
    negative.AddControlPointWorld(*_world(flair, (ni, nj, nk)))
    cut = _segment_mask(logic, flair, [roi, negative], "negative")
    box_slice = nodes.prompt_from_rois(flair, [roi], 1).boxes[0].k
    results["synth/point negative"] = float(not cut[nk, nj, ni] and cut.sum() < first.sum()
                                            and np.array_equal(cut[box_slice], first[box_slice]))
    if atlas and logic.atlas_available()[0]:
        rois = logic.atlas_boxes(volumes["t1"], "builtin:mni152", structures=[ATLAS_STRUCTURE])
        if rois:
            brainmask = load(paths["brainmask"], "synth brain mask", True)
            results[f"synth/atlas {ATLAS_STRUCTURE} box"] = _box_dice_with_csf(
                volumes["t1"], brainmask, nodes.roi_extent(rois[0], volumes["t1"]))
    model = logic.default_model() if glioma else None
    if model is not None and model.startswith("glioma"):
        segmentation = logic.auto_segment({"flair": flair, "t1c": volumes["t1c"]}, model=model)
        ids = [segmentation.GetSegmentation().GetNthSegmentID(n)
               for n in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        predicted = nodes.read_segments(segmentation, flair, ids) > 0
        results["synth/auto-segment whole tumour"] = _dice(predicted, labels > 0)
    while len(logic._undo) > undo_depth:
        logic.undo_last()
    unchanged = all(np.array_equal(slicer.util.arrayFromVolume(n), before[s]) for s, n in volumes.items())
    results["synth/undo"] = float(unchanged and
                                  logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations)
    return results


def _deepest(mask: np.ndarray) -> tuple[int, int, int]:
    """``(k, j, i)`` of the voxel farthest inside ``mask``."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))


def _world(volume_node, ijk) -> np.ndarray:
    """World RAS of voxel ``(i, j, k)`` of a volume node."""
    ras = nodes.ijk_to_ras(volume_node) @ np.r_[np.asarray(ijk, dtype=float), 1.0]
    return (np.linalg.inv(nodes.world_to_node(volume_node)) @ ras)[:3]


def _box_dice_with_csf(t1_node, brainmask_node, extent) -> float:
    """Dice between an atlas box (voxels of ``extent``) and the bounding box of the synthetic case's CSF component
    (brain voxels darker than half the brain's median T1) that overlaps it most: how well the atlas placed the
    box on the ventricle (a derived reference, not an expert label)."""
    t1 = np.asarray(slicer.util.arrayFromVolume(t1_node), dtype=float)
    brain = np.asarray(slicer.util.arrayFromVolume(brainmask_node)) > 0
    i0, i1, j0, j1, k0, k1 = extent
    box = np.zeros(t1.shape, bool)
    box[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = True
    parts, n = ndimage.label(brain & (t1 < 0.5 * float(np.median(t1[brain]))), structure=np.ones((3, 3, 3)))
    if n == 0:
        return 0.0
    overlap = np.bincount(parts[box], minlength=n + 1)
    overlap[0] = 0
    (kk, jj, ii) = np.nonzero(parts == int(np.argmax(overlap)))
    csf_box = np.zeros(t1.shape, bool)
    csf_box[kk.min():kk.max() + 1, jj.min():jj.max() + 1, ii.min():ii.max() + 1] = True
    return _dice(box, csf_box)


#: Axis order of the copy :func:`run_invariants` makes (``SimpleITK.PermuteAxes``: new axis n = old axis order[n]):
#: a volume stored axially becomes stored sagittally.
PERMUTED = (1, 2, 0)


def _permuted(array: np.ndarray, order: Sequence[int] = PERMUTED, inverse: bool = False) -> np.ndarray:
    """A ``[k, j, i]`` array in the axis order of ``PermuteAxes(order)`` (``inverse``: back)."""
    axes = (2 - order[2], 2 - order[1], 2 - order[0])
    return np.transpose(array, tuple(int(a) for a in np.argsort(axes)) if inverse else axes)


def run_invariants(logic, volume_node) -> dict[str, float]:
    """Checks that need no stored mask, for any volume (Slicer's MRBrainTumor1 in the self-test): a 40 mm two-click
    box in the axial view at the volume's centre gives the same mask on the volume and on a copy stored in another
    axis order, and undo removes what the runs made (each 1.0 when it holds, else 0.0)."""
    import SimpleITK as sitk

    from mrisegassist.volume import Volume

    volume = nodes.volume_from_node(volume_node)
    centre = np.zeros(volume.array.shape, bool)
    k, j, i = (s // 2 for s in volume.array.shape)
    hi, hj = (max(int(round(20 / s)), 2) for s in volume.geometry.spacing[:2])
    centre[k, j - hj:j + hj + 1, i - hi:i + hi + 1] = True
    depth = len(logic._undo)
    roi = two_click_box(logic.scene, volume_node, centre, "axial", "centre box")
    first = _segment_mask(logic, volume_node, [roi], "centre")
    permute = sitk.PermuteAxesImageFilter()
    permute.SetOrder(list(PERMUTED))
    copy = Volume.from_sitk(permute.Execute(volume.to_sitk()), "permuted")
    copy_node = nodes.node_from_volume(logic.scene, copy, f"{volume_node.GetName()} (another axis order)")
    copy_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    roi2 = two_click_box(logic.scene, copy_node, _permuted(centre), "axial", "centre box (copy)")
    second = _segment_mask(logic, copy_node, [roi2], "centre")
    same = bool(first.any()) and np.array_equal(_permuted(second, inverse=True), first)
    count = logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    undone = 0
    while len(logic._undo) > depth and logic.undo_last() is not None:
        undone += 1
    for node in (roi, roi2, copy_node):
        logic.scene.RemoveNode(node)
    left = logic.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    return {"sample/storage order": float(same), "sample/undo": float(undone == 2 and left == count - 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_folder(), help="shared data folder (real-data cases)")
    parser.add_argument("--synthetic", type=Path, help="folder for the synthetic case (built if missing)")
    parser.add_argument("--write", action="store_true", help=f"write the expectations to {EXPECTED_PATH.name}")
    args = parser.parse_args(argv)
    if args.data is None and args.synthetic is None:
        parser.error("give --data (or set MRISEGASSIST_TEST_DATA) and/or --synthetic")
    from .headless import HeadlessScene
    from .logic import MRISegAssistLogic

    env = HeadlessScene()
    logic = MRISegAssistLogic(env.scene, device="cpu")
    load = lambda path, name, label: env.load_volume(path, name, label)  # noqa: E731
    results: dict[str, float] = {}
    if args.data is not None:
        results.update(run_all(logic, load, args.data))
    if args.synthetic is not None:  # its own logic, as in Slicer's self-test: its undo check sees only its runs
        results.update(run_synthetic(MRISegAssistLogic(env.scene, device="cpu"), load, args.synthetic))
    for name, dice in results.items():
        print(f"{name:40s} {dice:.4f}")
    if args.write:
        old = load_expected() if EXPECTED_PATH.exists() else {"dice": {}}
        document = {"about": old.get("about", "Expected Dice of MRISegAssist's self-test: real cases vs expert "
                                              "labels, synth/* vs the synthetic case's exact labels (CPU, headless "
                                              "slicer-core); written by python -m MRISegAssistLib.selftest --write"),
                    "tolerance": TOLERANCE,
                    "dice": {**old.get("dice", {}), **{name: {"value": round(dice, 4)} for name, dice in results.items()}}}
        EXPECTED_PATH.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {EXPECTED_PATH}")
    failures = compare(results, load_expected()) if EXPECTED_PATH.exists() and not args.write else []
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
