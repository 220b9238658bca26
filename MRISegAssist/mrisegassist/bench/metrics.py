"""``mrisegassist bench metrics``: speed of the evaluation metrics on real 240x240x155 label maps.

Masks: expert labels (BraTS 2013 ``brats2013-deepmedic`` whole tumour; ``ms-lesjak`` lesion masks, whose
scattered lesions make the union bounding box nearly the whole brain) against a perturbed copy (eroded by one
voxel, shifted by 3 voxels). For each pair: our :func:`~mrisegassist.metrics.overlap_metrics` (Dice, IoU,
precision, sensitivity, specificity, HD95, HD, ASSD, volumes) against MONAI's ``compute_hausdorff_distance(
percentile=95)`` alone (the baseline) and SimpleITK's ``HausdorffDistanceImageFilter`` (maximum only), all in
this process; median wall seconds of ``--repeats`` runs, and the HD95 difference to MONAI.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import add_data_flag

PAIRS = (("brats2013-deepmedic", "pat0001", "labels.nii.gz"), ("brats2013-deepmedic", "pat0003", "labels.nii.gz"),
         ("ms-lesjak", "patient07", "lesions.nii.gz"), ("ms-lesjak", "patient26", "lesions.nii.gz"))


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("metrics", help="metric speed (HD95 etc.) vs MONAI and SimpleITK on real label maps")
    add_data_flag(p)
    p.add_argument("--repeats", type=int, default=3)
    add_json_flag(p)
    p.set_defaults(func=run)


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _perturb(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.roll(ndimage.binary_erosion(mask, iterations=1), 3, axis=2)


def run(args) -> int:
    import warnings

    import SimpleITK as sitk
    import torch
    from monai.metrics import compute_hausdorff_distance

    from ..cli import emit
    from ..errors import InputError
    from ..metrics import overlap_metrics
    from ..volume import read_volume

    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # MONAI's own deprecations
    data = Path(args.data)
    rows = []
    for parts in PAIRS:
        path = data.joinpath(*parts)
        if not path.exists():
            raise InputError(f"benchmark data missing: {path} (set --data or MRISEGASSIST_DATA)")
        vol = read_volume(path, kind="label")
        ref = vol.array > 0
        pred = _perturb(ref)
        sp = vol.geometry.spacing
        t_ours, ours = _median_time(lambda: overlap_metrics(pred, ref, sp), args.repeats)
        yp, yt = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (pred, ref))
        t_monai, hd95 = _median_time(
            lambda: float(compute_hausdorff_distance(yp, yt, percentile=95, spacing=list(sp)[::-1])), args.repeats)
        images = []
        for m in (pred, ref):
            img = sitk.GetImageFromArray(m.astype(np.uint8))
            img.SetSpacing(sp)
            images.append(img)

        def sitk_hd():
            f = sitk.HausdorffDistanceImageFilter()
            f.Execute(*images)
            return f.GetHausdorffDistance()

        t_sitk, _ = _median_time(sitk_hd, args.repeats)
        rows.append({"case": "/".join(parts[:2]), "shape": list(ref.shape), "ref_ml": ours["volume_ref_ml"],
                     "ours_s": t_ours, "monai_hd95_s": t_monai, "sitk_hd_s": t_sitk,
                     "ratio_vs_monai": t_ours / t_monai, "hd95_ours": ours["hd95_mm"], "hd95_monai": hd95,
                     "hd95_abs_diff": abs(ours["hd95_mm"] - hd95)})
    result = {"data": "expert labels vs eroded+shifted copy", "repeats": args.repeats, "rows": rows}

    def table(r: dict) -> str:
        lines = [f"metric speed on {r['data']} (median of {r['repeats']}, seconds; ours = all overlap "
                 f"metrics incl. HD95/HD/ASSD; MONAI = HD95 only; SimpleITK = HD max only)",
                 f"{'case':<30} {'ours':>7} {'MONAI':>7} {'SITK':>7} {'ours/MONAI':>10} {'HD95 mm':>8} {'|diff|':>8}"]
        for x in r["rows"]:
            lines.append(f"{x['case']:<30} {x['ours_s']:7.3f} {x['monai_hd95_s']:7.3f} {x['sitk_hd_s']:7.3f} "
                         f"{x['ratio_vs_monai']:10.2f} {x['hd95_ours']:8.3f} {x['hd95_abs_diff']:8.1e}")
        return "\n".join(lines)

    emit(args, result, table)
    return 0
