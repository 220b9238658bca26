"""``mrisegassist bench atlas`` (speed/memory of atlas boxes) and ``mrisegassist bench atlas-eval`` (accuracy
table of automatic prompts per structure).

**atlas**: N references (the built-in Colin27 + MNI152 atlases and smooth random deformations of them) ->
boxes for one real target (default ``ms-lesjak/patient07/t1.nii.gz``; ``--quick``: the ITK-SNAP T1 crop and 3
references). Three runs in this process, same target and references:

* ``ours, cold``: empty cache: references registered into the common space (in parallel), their labels warped
  into it and the score maps computed there; target registered once, score maps resampled onto it, boxes;
* ``ours, warm``: the same with the common-space score maps and the anchor's working images read from the
  cache (the usual case: that work does not depend on the patient): one target registration, the score maps
  resampled, boxes;
* ``baseline``: serial, full resolution: each reference registered directly onto the target at its native
  spacing (rigid, affine, B-spline; 3 levels; the optimisation on all CPU threads, not single-threaded for
  repeatability as ours), warped, score maps, boxes. ``--baseline-references N`` runs it on the first N
  references only (time extrapolated per reference); ``0`` skips it (the warm/cold ratio is still printed).

Time: wall seconds and CPU seconds of the process (all threads); the 20 s goal is printed for both, since on a
shared machine the wall time also counts other jobs (the load average before the runs is printed). Memory: peak
resident memory during the run minus the resident memory before it (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``). Box agreement: per structure, IoU of our strategy-A box
rectangle with the baseline's and the difference of z-ranges.

**atlas-eval**: see :mod:`mrisegassist.atlas.evaluation`: Dice per structure of the direct affine + B-spline warp
of each atlas (baseline, same run), the label fusion and the prompted pipeline (atlas boxes -> engine ->
refinement learnt on the references), with the goals "fusion >= direct warp" and "prompted >= fusion" printed
as met / NOT met; also reference-mask boxes, automatic boxes, cascades C and D and box quality. Printed as a
table, ``--json`` and ``--png``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import add_data_flag, measure

TARGET = "ms-lesjak/patient07/t1.nii.gz"
QUICK_TARGET = "itksnap-mricrop/t1.gipl.gz"


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("atlas", help="atlas boxes: N references -> boxes for one target, wall time and peak "
                                     "memory vs a serial full-resolution baseline")
    add_data_flag(p)
    p.add_argument("--target", help=f"target image inside --data (default {TARGET}; --quick: {QUICK_TARGET})")
    p.add_argument("--references", type=int, help="number of references (default 15; --quick: 3)")
    p.add_argument("--baseline-references", type=int,
                   help="references for the baseline (default: all; fewer: its time extrapolated per reference; "
                        "0: no baseline run, only the cold/warm ratio)")
    p.add_argument("--workers", type=int, help="thread pool size (default: CPU count)")
    p.add_argument("--quick", action="store_true", help="small target, 3 references (CI)")
    add_json_flag(p)
    p.set_defaults(func=run_speed)

    p = sub.add_parser("atlas-eval", help="accuracy per structure: direct affine + B-spline warp vs label fusion vs "
                                          "prompted pipeline (goals met / NOT met), engine conditions, box quality")
    add_data_flag(p)
    p.add_argument("--dataset", default="itksnap,colin27-loo,mni152-loo",
                   help="comma-separated: itksnap, colin27-loo, mni152-loo")
    p.add_argument("--references", type=int, default=6, help="references per dataset (default 6)")
    p.add_argument("--engine", default="classical")
    p.add_argument("--strategy", choices=["A", "B"], default="A")
    p.add_argument("--png", help="bar chart of the Dice columns")
    p.add_argument("--quick", action="store_true", help="itksnap only, 3 references")
    add_json_flag(p)
    p.set_defaults(func=run_eval)


def _progress(args, desc):
    from ..progress import tqdm_progress

    return tqdm_progress(desc, disable=getattr(args, "json", False))


def baseline_boxes(target, refset, settings, strategy: str = "A", progress=None, cancel=None):
    """The seed's way: every reference registered directly onto the target (serially), then score maps/boxes."""
    from ..atlas.boxes import boxes_from_scores, score_maps
    from ..atlas.registration import register as reg, warp_labels

    labels = []
    n = len(refset.references)
    for m, ref in enumerate(refset.references):
        sub = None if progress is None else (lambda f, msg, m=m: progress((m + f) / n, msg))
        t = reg(target, ref.image, settings, progress=sub, cancel=cancel, names=(target.label, ref.name))
        labels.append(warp_labels(ref.labels, target.geometry, t))
    return boxes_from_scores(score_maps(labels, refset.structures), target.geometry, strategy,
                             reference_set=refset.name, n_references=n, target=target.label)


def _agreement(a, b) -> dict:
    from ..atlas.evaluation import _iou_2d

    ious, dz = [], []
    for s in a.structures:
        t = b.get(s.name)
        if s.found and t.found:
            ious.append(_iou_2d(s.boxes[0], t.boxes[0]))
            dz.append(abs(s.z_range[0] - t.z_range[0]) + abs(s.z_range[1] - t.z_range[1]))
    return {"structures_both_found": len(ious), "found_ours": len(a.found()), "found_baseline": len(b.found()),
            "mean_box_iou": round(float(np.mean(ious)), 3) if ious else None,
            "mean_z_range_diff_slices": round(float(np.mean(dz)), 2) if dz else None}


def run_speed(args) -> int:
    from ..atlas.augment import augment
    from ..atlas.auto import atlas_boxes
    from ..atlas.builtin import builtin_reference_set
    from ..atlas.registration import FAST, FULL
    from ..atlas.space import CommonSpace, cpu_count
    from ..cli import emit
    from ..errors import InputError
    from ..volume import read_volume

    n_refs = args.references or (3 if args.quick else 15)
    path = Path(args.data) / (args.target or (QUICK_TARGET if args.quick else TARGET))
    if not path.is_file():
        raise InputError(f"{path}: benchmark target not found (pass --data / --target)")
    target = read_volume(path, name=str(Path(args.target or (QUICK_TARGET if args.quick else TARGET))))
    progress, close = _progress(args, "preparing references")
    try:
        refset = augment(builtin_reference_set("brain", progress=progress), n_refs, progress=progress)
    finally:
        close()
    result = {"target": target.label, "target_size": list(target.geometry.size), "references": n_refs,
              "load_average": [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
              "reference_names": [r.name for r in refset.references], "cpus": cpu_count(),
              "settings_ours": {"resolution_mm": FAST.resolution_mm, "levels": list(FAST.levels),
                                "deformable": FAST.deformable, "sampling": FAST.sampling, "refine": FAST.refine,
                                "refine_resolution_mm": FAST.refine_resolution_mm},
              "settings_baseline": {"resolution_mm": "native", "levels": list(FULL.levels),
                                    "deformable": FULL.deformable, "sampling": FULL.sampling,
                                    "refine": FULL.refine}}
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mrisegassist-bench-atlas-") as cache:
        for name in ("ours_cold", "ours_warm"):
            runs[name] = {}
            space = CommonSpace(refset, FAST, args.workers, cache)
            progress, close = _progress(args, name)
            try:
                with measure(runs[name]):
                    boxes = atlas_boxes(target, refset, "A", space=space, progress=progress)
            finally:
                close()
            runs[name]["seconds"] = round(runs[name]["seconds"], 2)
            runs[name]["cpu_seconds"] = round(runs[name]["cpu_seconds"], 2)
            runs[name]["phases_s"] = {k: round(v, 2) for k, v in boxes.timings.items()}
            runs[name]["found"] = len(boxes.found())
            result[f"_{name}"] = boxes
    result["runs"] = runs
    result["warm_vs_cold"] = round(runs["ours_cold"]["seconds"] / runs["ours_warm"]["seconds"], 2)
    for name in ("cold", "warm"):
        result[f"goal_20s_{name}_met"] = runs[f"ours_{name}"]["seconds"] <= 20.0
        result[f"goal_20s_{name}_met_cpu"] = runs[f"ours_{name}"]["cpu_seconds"] <= 20.0
    warm = result.pop("_ours_warm")
    result.pop("_ours_cold")
    nb = n_refs if args.baseline_references is None else args.baseline_references
    if nb > 0:  # 0: no baseline (its serial full-resolution registrations take long on a loaded machine)
        _run_baseline(args, target, refset, nb, warm, result)
    emit(args, result, _speed_text)
    return 0


def _run_baseline(args, target, refset, nb: int, warm, result: dict) -> None:
    """The serial full-resolution baseline on ``nb`` references (time extrapolated to all when fewer), the
    speed-ups of the cold and warm runs against it and the warm boxes' agreement with its boxes."""
    from ..atlas.registration import FULL
    from ..atlas.space import cpu_count

    n_refs = len(refset.references)
    runs = result["runs"]
    base_set = refset if nb == n_refs else refset.__class__(refset.name, refset.references[:nb], refset.structures)
    runs["baseline"] = {"references": nb}
    progress, close = _progress(args, "baseline (serial, full resolution)")
    try:
        with measure(runs["baseline"]):
            settings = replace(FULL, threads=cpu_count(), deterministic=False)
            base = baseline_boxes(target, base_set, settings, progress=progress)
    finally:
        close()
    runs["baseline"]["seconds"] = round(runs["baseline"]["seconds"], 2)
    runs["baseline"]["found"] = len(base.found())
    # the baseline registers each reference independently and serially: its time scales with the count, so a
    # baseline on fewer references is extrapolated per reference (and labelled so)
    base_s = runs["baseline"]["seconds"] * n_refs / nb
    if nb != n_refs:
        runs["baseline"]["seconds_extrapolated_to_all"] = round(base_s, 1)
    for name in ("cold", "warm"):
        result[f"speedup_{name}"] = round(base_s / runs[f"ours_{name}"]["seconds"], 2)
    result["speedup_basis"] = "measured" if nb == n_refs else f"baseline extrapolated from {nb} of {n_refs} references"
    result["agreement_warm_vs_baseline"] = _agreement(warm, base)


def _speed_text(r: dict) -> str:
    lines = [f"atlas boxes: {r['references']} references -> {r['target']} {tuple(r['target_size'])}, "
             f"{r['cpus']} CPU(s)", f"{'run':28s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>8s} {'found':>6s}"]
    labels = {"ours_cold": "ours, cold cache", "ours_warm": "ours, warm cache",
              "baseline": f"baseline serial full-res ({r['runs'].get('baseline', {}).get('references')} refs)"}
    for k, v in r["runs"].items():
        peak = "n/a" if v.get("peak_extra_mb") is None else f"{v['peak_extra_mb']:.0f}"
        cpu = v.get("cpu_seconds", 0.0)
        lines.append(f"{labels[k]:28s} {v['seconds']:8.1f} {cpu:8.1f} {peak:>8s} {v['found']:6d}")
    lines.append(f"warm cache vs cold cache: {r['warm_vs_cold']}x faster")
    if "baseline" in r["runs"]:
        extra = r["runs"]["baseline"].get("seconds_extrapolated_to_all")
        if extra is not None:
            lines.append(f"baseline extrapolated to {r['references']} references: {extra:.1f} s")
        lines.append(f"speed-up vs baseline ({r['speedup_basis']}): cold {r['speedup_cold']}x, "
                     f"warm {r['speedup_warm']}x")
    met = (lambda key: "met" if r[key] else "NOT met")  # noqa: E731
    lines.append(f"goal <= 20 s for the boxes: wall time cold cache {met('goal_20s_cold_met')}, warm cache "
                 f"{met('goal_20s_warm_met')}; CPU time cold cache {met('goal_20s_cold_met_cpu')}, warm cache "
                 f"{met('goal_20s_warm_met_cpu')}" + (f" (load average {r['load_average'][0]} before the runs)"
                                                      if r.get("load_average") else ""))
    a = r.get("agreement_warm_vs_baseline")
    if a is not None:
        lines.append(f"boxes (warm) vs baseline: mean box IoU {a['mean_box_iou']}, mean z-range difference "
                     f"{a['mean_z_range_diff_slices']} slices over {a['structures_both_found']} structures")
    lines.append("phases (warm): " + ", ".join(f"{k} {v}" for k, v in r["runs"]["ours_warm"]["phases_s"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- evaluation
COLUMNS = [("ref_ml", "ref ml", "{:.2f}"), ("dice_direct", "direct", "{:.3f}"), ("dice_fusion", "fusion", "{:.3f}"),
           ("dice_prompted", "prompted", "{:.3f}"), ("dice_ref_boxes", "ref box", "{:.3f}"),
           ("dice_auto_boxes", "auto box", "{:.3f}"), ("dice_cascade_C", "casc C", "{:.3f}"),
           ("dice_cascade_D", "casc D", "{:.3f}"), ("dice_atlas_only", "atlas .5", "{:.3f}"),
           ("fusion_threshold", "fus t", "{:.1f}"), ("box_iou", "box IoU", "{:.2f}"),
           ("bbox_iou_3d", "bbox3D", "{:.2f}")]
RULE_WIDTH = 18


def format_table(result: dict) -> str:
    lines = [f"{result['dataset']}: target {result['target']} | labels: {result['labels']} | "
             f"{result['references']} references | engine {result['engine']} | strategy {result['strategy']}",
             f"  {result['note']}",
             f"  {'structure':26s}" + "".join(f"{h:>9s}" for _, h, _ in COLUMNS) + f"  {'prompted rule':{RULE_WIDTH}s}"]
    for row in result["rows"]:
        cells = []
        for key, _, fmt in COLUMNS:
            v = row.get(key)
            cells.append(f"{'-' if v is None else fmt.format(v):>9s}")
        flag = "" if row["found"] else "  (not found)"
        lines.append(f"  {row['structure']:26s}" + "".join(cells) + f"  {row.get('rule', ''):{RULE_WIDTH}s}" + flag)
    mean = result["mean"]
    lines.append(f"  {'mean':26s}" + "".join(f"{'' if k not in mean else fmt.format(mean[k]):>9s}"
                                              for k, _, fmt in COLUMNS))
    direct = result.get("direct")
    if direct:
        per_atlas = ", ".join(f"{k} {v['mean']:.3f} ({v['seconds']:.0f} s)" for k, v in direct["atlases"].items())
        lines.append(f"  direct warp ({direct['settings']}): {per_atlas}; column 'direct' = {direct['best']}")
    lines.append(f"  fusion/prompted rules learnt on the references only: {result['refinement']['evidence']}")
    goals = result["goals"]
    if "fusion_ge_direct" in goals:
        lines.append(f"  goal fusion >= direct warp: {'met' if goals['fusion_ge_direct'] else 'NOT met'} "
                     f"({mean['dice_fusion']:.3f} vs {mean['dice_direct']:.3f})")
    lines.append(f"  goal prompted >= fusion: {'met' if goals['prompted_ge_fusion'] else 'NOT met'} "
                 f"({mean['dice_prompted']:.3f} vs {mean['dice_fusion']:.3f})")
    t = result["timings_s"]
    lines.append(f"  time: direct warps {t.get('direct', 0)} s, learning {t.get('learn', 0)} s, boxes {t['boxes']} s, "
                 f"total {t['total']} s")
    return "\n".join(lines)


def write_png(results: list[dict], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    keys = [("dice_direct", "direct warp"), ("dice_fusion", "label fusion"), ("dice_prompted", "prompted"),
            ("dice_ref_boxes", "reference-mask boxes"), ("dice_auto_boxes", "atlas boxes -> engine"),
            ("dice_cascade_C", "cascade C"), ("dice_cascade_D", "cascade D")]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = res["rows"]
        x = np.arange(len(rows))
        w = 0.8 / len(keys)
        for n, (k, label) in enumerate(keys):
            ax.bar(x + (n - len(keys) / 2 + 0.5) * w, [r.get(k) or 0 for r in rows], w, label=label)
        ax.set_xticks(x, [r["structure"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.set_title(f"{res['dataset']} ({res['labels']}; {res['references']} refs, {res['engine']})", fontsize=9)
        ax.legend(fontsize=7, ncol=len(keys))
    fig.tight_layout()
    return save_figure(fig, path, 90)


def run_eval(args) -> int:
    from ..atlas.evaluation import dataset, evaluate
    from ..cli import emit

    if args.png:  # the output policy, before any work
        from ..outputs import Output, guard_outputs

        guard_outputs([Output(Path(args.png), "png", "--png")], [args.data])
    names = ["itksnap"] if args.quick else [d.strip() for d in args.dataset.split(",") if d.strip()]
    n_refs = 3 if args.quick else args.references
    results = []
    for name in names:
        progress, close = _progress(args, name)
        try:
            case = dataset(name, args.data, n_refs, progress=progress)
            results.append(evaluate(case, args.engine, args.strategy, progress=progress))
        finally:
            close()
    doc = {"results": results}
    if args.png:
        doc["png"] = str(write_png(results, args.png))
    emit(args, doc, lambda d: "\n\n".join(format_table(r) for r in d["results"])
         + (f"\nwrote {d['png']}" if "png" in d else ""))
    return 0
