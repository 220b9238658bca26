"""``mrisegassist bench prompt-accuracy``: Dice of a box-prompted engine (default: the weights-free
``classical`` engine) on real lesions with **expert** labels, boxes derived from the expert masks.

Data (``../shared/data``, see its README; all labels are expert annotations):

* ``ms07``, ``ms26``: ms-lesjak patient07 / patient26, FLAIR, expert consensus MS lesion masks (1 mm MNI grid);
* ``brats1..4-wt``: brats2013-deepmedic pat0001..0004, whole tumour (labels 1-4) on FLAIR;
  ``brats1..4-tc``: tumour core (1, 3, 4) on T1c; ``brats1..4-et``: enhancing tumour (4) on T1c;
* ``radiomics1``, ``radiomics2``: radiomics-brain brain1 / brain2, thick-slice (6.5 mm) post-contrast T1, lesion.

Objects are the 26-connected components of the expert mask with at least ``--min-voxels`` voxels (one box
per lesion); strategy A = one box on the middle slice of each lesion's z-range, B = three boxes at 1/4, 1/2,
3/4 (each box = the lesion's bounding rectangle on that slice, ``--box-margin`` 0). No z-range is given: the
engine propagates until the lesion vanishes. Printed per case and strategy: Dice of the fused label map
against the expert mask of the prompted lesions, per-lesion Dice (median, mean, fraction >= 0.5) and time.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from . import add_data_flag


@dataclass(frozen=True)
class AccuracyCase:
    """One benchmark case: image and expert label files (relative to the data folder), label values."""

    name: str
    image: str
    labels: str
    values: Optional[tuple[int, ...]]  # None: every non-zero voxel
    description: str


def _brats(n: int) -> list[AccuracyCase]:
    d = f"brats2013-deepmedic/pat{n:04d}"
    return [AccuracyCase(f"brats{n}-wt", f"{d}/flair.nii.gz", f"{d}/labels.nii.gz", (1, 2, 3, 4),
                         f"BraTS 2013 pat{n:04d} whole tumour, FLAIR"),
            AccuracyCase(f"brats{n}-tc", f"{d}/t1c.nii.gz", f"{d}/labels.nii.gz", (1, 3, 4),
                         f"BraTS 2013 pat{n:04d} tumour core, T1c"),
            AccuracyCase(f"brats{n}-et", f"{d}/t1c.nii.gz", f"{d}/labels.nii.gz", (4,),
                         f"BraTS 2013 pat{n:04d} enhancing tumour, T1c")]


CASES: dict[str, AccuracyCase] = {c.name: c for c in [
    AccuracyCase("ms07", "ms-lesjak/patient07/flair.nii.gz", "ms-lesjak/patient07/lesions.nii.gz", None,
                 "MS lesions (Lesjak 2018) patient07, FLAIR"),
    AccuracyCase("ms26", "ms-lesjak/patient26/flair.nii.gz", "ms-lesjak/patient26/lesions.nii.gz", None,
                 "MS lesions (Lesjak 2018) patient26, FLAIR"),
    *[c for n in range(1, 5) for c in _brats(n)],
    AccuracyCase("radiomics1", "radiomics-brain/brain1_image.nrrd", "radiomics-brain/brain1_label.nrrd", None,
                 "pyradiomics brain1 lesion, post-contrast T1, 6.5 mm slices"),
    AccuracyCase("radiomics2", "radiomics-brain/brain2_image.nrrd", "radiomics-brain/brain2_label.nrrd", None,
                 "pyradiomics brain2 lesion, post-contrast T1, 6.5 mm slices"),
]}
DEFAULT_CASES = ("ms07", "ms26", "brats1-wt", "brats2-wt", "brats3-wt", "brats4-wt", "brats1-tc", "brats2-tc",
                 "brats1-et", "radiomics1", "radiomics2")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def run_case(case: AccuracyCase, data: Path, engine, strategies: Sequence[str] = ("A", "B"),
             min_voxels: int = 10, box_margin: int = 0, overlay_dir: Optional[Path] = None) -> dict:
    """Segment every lesion of ``case`` with ``engine`` for each strategy; returns the figures (see module)."""
    from ..prompt.fusion import fuse
    from ..prompt.strategies import objects_from_mask, prompts_from_mask
    from ..volume import read_volume

    image_path, label_path = data / case.image, data / case.labels
    for path in (image_path, label_path):
        if not path.exists():
            raise InputError(f"{path}: benchmark case {case.name} missing (pass --data to the shared data folder)")
    volume = read_volume(image_path)
    labels = read_volume(label_path, kind="label").array
    expert = np.isin(labels, case.values) if case.values else labels > 0
    objects = dict(objects_from_mask(expert, mode="components", min_voxels=min_voxels))
    if not objects:
        raise InputError(f"{case.name}: no lesion of at least {min_voxels} voxels in the expert mask")
    prompted = np.zeros(expert.shape, dtype=bool)
    for m in objects.values():
        prompted |= m
    t0 = time.perf_counter()
    prepared = engine.prepare(volume.array)
    prepare_s = time.perf_counter() - t0
    out = {"case": case.name, "description": case.description, "labels": "expert",
           "image": case.image, "lesions": len(objects),
           "lesion_voxels": int(prompted.sum()), "prepare_s": prepare_s, "strategies": {}}
    for strategy in strategies:
        prompts = prompts_from_mask(expert, strategy, mode="components", min_voxels=min_voxels, margin=box_margin)
        t0 = time.perf_counter()
        results = engine.segment(prepared, prompts)
        fused = fuse(results)
        seconds = time.perf_counter() - t0
        per_lesion = [_dice(r.mask, objects[r.object_id]) for r in results]
        out["strategies"][strategy] = {
            "dice": _dice(fused > 0, prompted), "dice_all_lesions": _dice(fused > 0, expert),
            "lesion_dice_median": float(np.median(per_lesion)), "lesion_dice_mean": float(np.mean(per_lesion)),
            "lesions_dice_ge_0.5": float(np.mean(np.asarray(per_lesion) >= 0.5)),
            "lesion_dice": [round(d, 4) for d in per_lesion],
            "boxes": sum(len(p.boxes) for p in prompts), "seconds": seconds,
            "slices_segmented": sum(len(r.slices) for r in results)}
        if overlay_dir is not None:
            from ..viz import overlay_png

            path = overlay_dir / f"prompt_accuracy_{case.name}_{strategy}.png"
            overlay_png(volume, (fused > 0).astype(np.uint8), path, reference=prompted.astype(np.uint8),
                        title=f"{case.description}: {engine.name} strategy {strategy}, "
                              f"Dice {out['strategies'][strategy]['dice']:.3f} vs expert")
            out["strategies"][strategy]["overlay"] = str(path)
    return out


def run(case_names: Sequence[str], data: Path, engine_name: str = "classical", strategies=("A", "B"),
        min_voxels: int = 10, box_margin: int = 0, out_dir: Optional[Path] = None, device: str = "cpu",
        checkpoint: Optional[str] = None, progress=None) -> dict:
    """Run the benchmark on the named cases; returns ``{"cases": [...], "summary": {...}}``."""
    from ..prompt import get_engine

    unknown = [c for c in case_names if c not in CASES]
    if unknown:
        raise InputError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    bad = [s for s in strategies if s not in ("A", "B")]
    if bad:
        raise InputError(f"unknown strategy {bad[0]!r}; use A and/or B")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    engine = get_engine(engine_name, device=device, checkpoint=checkpoint)
    cases = []
    for n, name in enumerate(case_names):
        if progress is not None:
            progress(n / len(case_names), name)
        cases.append(run_case(CASES[name], data, engine, strategies, min_voxels, box_margin, out_dir))
    summary = {s: {"mean_dice": float(np.mean([c["strategies"][s]["dice"] for c in cases])),
                   "mean_lesion_dice": float(np.mean([d for c in cases for d in c["strategies"][s]["lesion_dice"]])),
                   "lesions": int(sum(c["lesions"] for c in cases))} for s in strategies}
    doc = {"engine": engine_name, "labels": "expert", "data": str(data), "min_voxels": min_voxels,
           "box_margin": box_margin, "cases": cases, "summary": summary}
    if out_dir is not None:
        from ..viz import plot_bars

        doc["plot"] = str(plot_bars({c["case"]: {f"strategy {s}": c["strategies"][s]["dice"] for s in strategies}
                                     for c in cases}, out_dir / "prompt_accuracy_dice.png",
                                    title=f"{engine_name}: Dice vs expert labels, one box (A) / three (B) per lesion",
                                    ylabel="Dice"))
    return doc


def format_text(doc: dict) -> str:
    strategies = list(doc["summary"])
    lines = [f"prompt accuracy of '{doc['engine']}' against EXPERT labels ({doc['data']}); one object per lesion "
             f"(26-connected, >= {doc['min_voxels']} voxels), boxes = lesion rectangles (+{doc['box_margin']})",
             f"{'case':12s} {'lesions':>7s}  " + "  ".join(
                 f"{s}: Dice  lesion med/mean  >=0.5   time" for s in strategies)]
    for c in doc["cases"]:
        cells = []
        for s in strategies:
            r = c["strategies"][s]
            cells.append(f"   {r['dice']:.3f}       {r['lesion_dice_median']:.2f}/{r['lesion_dice_mean']:.2f}  "
                         f"{100 * r['lesions_dice_ge_0.5']:4.0f}%  {r['seconds']:5.1f}s")
        lines.append(f"{c['case']:12s} {c['lesions']:7d}  " + "  ".join(cells) + f"   ({c['description']})")
    for s in strategies:
        m = doc["summary"][s]
        lines.append(f"strategy {s}: mean case Dice {m['mean_dice']:.3f}, mean lesion Dice {m['mean_lesion_dice']:.3f} "
                     f"over {m['lesions']} lesions")
    if doc.get("plot"):
        lines.append(f"plot: {doc['plot']}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from ..cli import emit
    from ..outputs import guard_output_folder
    from ..progress import tqdm_progress

    if args.out:  # the output policy, before any work
        guard_output_folder(Path(args.out), inputs=[args.data], option="--out")
    names = list(DEFAULT_CASES) if args.cases == "default" else list(CASES) if args.cases == "all" \
        else [c.strip() for c in args.cases.split(",") if c.strip()]
    bar, close = tqdm_progress("prompt-accuracy", disable=args.json)
    try:
        doc = run(names, Path(args.data), args.engine, tuple(args.strategies.split(",")), args.min_voxels,
                  args.box_margin, Path(args.out) if args.out else None, args.device, args.checkpoint, bar)
    finally:
        close()
    emit(args, doc, format_text)
    return 0


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("prompt-accuracy", help="Dice of a box-prompted engine on real expert-labelled lesions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flag(p)
    p.add_argument("--cases", default="default",
                   help=f"comma-separated case names, 'default' ({','.join(DEFAULT_CASES)}) or 'all' "
                        f"({','.join(CASES)})")
    p.add_argument("--strategies", default="A,B", help="A, B or A,B")
    p.add_argument("--engine", default="classical")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-voxels", type=int, default=10, help="ignore lesions smaller than this")
    p.add_argument("--box-margin", type=int, default=0, help="enlarge every box by this many voxels")
    p.add_argument("--out", help="folder for the PNG overlays and the Dice plot")
    add_json_flag(p)
    p.set_defaults(func=_run)
