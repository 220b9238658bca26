"""Workflows on real, expert-labelled MRI with expected Dice: shared by the Slicer self-test
(``MRISegAssistTest``), the headless CI tests, and this module's command that writes the expectations.

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
from typing import Callable, Optional

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
#: The glioma model's held-out validation case (expert BraTS labels).
GLIOMA_CASE = {"flair": "brats2013-deepmedic/pat0001/flair.nii.gz", "t1c": "brats2013-deepmedic/pat0001/t1c.nii.gz",
               "reference": "brats2013-deepmedic/pat0001/labels.nii.gz"}


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


def run_glioma_case(logic, load: Loader, data: Path, model: Optional[str] = None) -> dict:
    """Auto-segment the held-out BraTS case with the glioma model; Dice per BraTS region (expert labels)."""
    inputs = {s: load(data / GLIOMA_CASE[s], f"glioma {s}", False) for s in ("flair", "t1c")}
    reference_node = load(data / GLIOMA_CASE["reference"], "glioma reference", True)
    reference = np.asarray(slicer.util.arrayFromVolume(reference_node)).astype(np.int32)
    segmentation = logic.auto_segment(inputs, model=model)
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


def compare(results: dict[str, float], expected: dict) -> list[str]:
    """Failure messages: a Dice below its expectation minus the tolerance (a regression; better results pass).
    Results absent from the expectations, or expectations absent from the results, are ignored."""
    failures = []
    default_tol = float(expected.get("tolerance", TOLERANCE))
    for name, exp in expected.get("dice", {}).items():
        if name not in results:
            continue
        value, tol = (exp["value"], exp.get("tolerance", default_tol)) if isinstance(exp, dict) else (exp, default_tol)
        if results[name] < value - tol:
            failures.append(f"{name}: Dice {results[name]:.4f}, expected at least {value:.4f} - {tol}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_folder(), help="shared data folder")
    parser.add_argument("--write", action="store_true", help=f"write the expectations to {EXPECTED_PATH.name}")
    args = parser.parse_args(argv)
    if args.data is None or not args.data.is_dir():
        parser.error("give --data or set MRISEGASSIST_TEST_DATA")
    from .headless import HeadlessScene
    from .logic import MRISegAssistLogic

    env = HeadlessScene()
    logic = MRISegAssistLogic(env.scene, device="cpu")
    results = run_all(logic, lambda path, name, label: env.load_volume(path, name, label), args.data)
    for name, dice in results.items():
        print(f"{name:40s} Dice {dice:.4f}")
    if args.write:
        document = {"about": "Expected Dice of MRISegAssist's self-test vs expert labels (CPU, headless "
                              "slicer-core); written by python -m MRISegAssistLib.selftest --write",
                    "tolerance": TOLERANCE,
                    "dice": {name: {"value": round(dice, 4)} for name, dice in results.items()}}
        EXPECTED_PATH.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {EXPECTED_PATH}")
    failures = compare(results, load_expected()) if EXPECTED_PATH.exists() and not args.write else []
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
