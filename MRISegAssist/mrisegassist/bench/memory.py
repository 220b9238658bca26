"""``mrisegassist bench memory``: peak resident memory of prompted segmentation against the number of objects.

One real 240x240x155 volume (the shared data's BraTS 2013 ``pat0001`` FLAIR by default), N small objects
(``--counts``, default 1, 50 and 200): boxes of 5 to 10 mm on slices spread over the brain (a fixed grid of
places inside its brain mask, the same for every N), each with a z-range of its own size, segmented by the
weights-free engine through the whole service pipeline (engine, fusion, label map, summaries). Each N runs in a
fresh subprocess, so peaks do not mix; its peak is the process's ``VmHWM`` (Linux peak resident set size).

Printed: peak RSS per N, the increase above the 1-object run (the first count) and the goal check (the largest N
< ``--goal-mb`` above it; the issue's goal: 200 objects under 1 GB). ``--old-counts`` (default 1 and 20) run
the same objects with per-object results kept on the whole volume (the behaviour before cropping, emulated by
switching the crop off), whose per-object slope is extrapolated to the largest N (said so: the old behaviour
needs about 45 MB per object on this volume, too much to run at 200 on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import status_kb

CASE = ("brats2013-deepmedic", "pat0001")
#: Box sides (mm) cycled over the objects.
SIDES_MM = (5.0, 6.0, 7.0, 8.0, 9.0, 10.0)


def register(sub) -> None:
    from ..cli import add_json_flag
    from . import add_data_flag

    p = sub.add_parser("memory", help="peak RSS for 1, 50, 200 small objects on one volume (fresh process each)")
    add_data_flag(p)
    p.add_argument("--case", default="/".join(CASE), help="case folder under --data holding flair.nii.gz and "
                                                          "brainmask.nii.gz (default brats2013-deepmedic/pat0001)")
    p.add_argument("--counts", default="1,50,200", help="object counts, the first is the baseline (default 1,50,200)")
    p.add_argument("--old-counts", default="1,20",
                   help="counts run with full-volume per-object results (before cropping); '' to skip (default 1,20)")
    p.add_argument("--goal-mb", type=float, default=1024.0, help="goal: the largest count's increase (default 1024)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per subprocess (default 1800)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one count, in this process
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # with full-volume results
    add_json_flag(p)
    p.set_defaults(func=run)


def small_objects(brain, spacing, count: int) -> list:
    """``count`` :class:`ObjectPrompt` s: boxes of :data:`SIDES_MM` (cycled) on a fixed grid of places inside the
    bool ``[k, j, i]`` brain mask (the first ``count`` of a deterministic, well-spread order), each with the
    z-range of its own size and the box as its in-plane bounds. ``spacing``: ``(i, j, k)`` mm."""
    import numpy as np

    from ..errors import InputError
    from ..prompt.base import Box2D, ObjectPrompt

    nk, nj, ni = brain.shape
    step = 14  # voxels between grid places (more than the largest box, so objects rarely touch)
    places = [(k, j, i) for k in range(8, nk - 8, 10) for j in range(step, nj - step, step)
              for i in range(step, ni - step, step) if brain[k, j, i]]
    if len(places) < count:
        raise InputError(f"bench memory: only {len(places)} places inside the brain mask for {count} objects")
    order = np.random.default_rng(0).permutation(len(places))  # spread over the whole brain for any count
    prompts = []
    for n in range(count):
        k, j, i = places[int(order[n])]
        side = SIDES_MM[n % len(SIDES_MM)]
        hi, hj, hk = (max(1, int(round(side / 2 / s))) for s in spacing)
        box = Box2D(k, i - hi, j - hj, i + hi, j + hj)
        prompts.append(ObjectPrompt(n + 1, [box], (k - hk, k + hk), f"object-{n + 1}",
                                    (box.i0, box.j0, box.i1, box.j1)))
    return prompts


def child(args) -> int:
    """One count in this process: segment, then print one JSON line with the process's peak RSS."""
    import numpy as np

    from ..prompt import base
    from ..service import PromptRequest, Service
    from ..volume import read_volume

    if args.full:  # the behaviour before cropping: every per-object result keeps the whole volume
        def whole(logits, mask, origin, shape, margin=base.CROP_MARGIN):
            return tuple(int(o) for o in origin), tuple(slice(0, n) for n in logits.shape)

        base.ObjectResult._crop_box = staticmethod(whole)
    folder = Path(args.data) / args.case
    volume = read_volume(folder / "flair.nii.gz")
    brain = read_volume(folder / "brainmask.nii.gz", kind="label").array > 0
    prompts = small_objects(brain, volume.geometry.spacing, args.child)
    before_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    result = Service(device="cpu").prompt(PromptRequest(volume, prompts, engine="classical"))
    seconds = time.perf_counter() - t0
    found = sum(1 for o in result.objects if o.voxels > 0)
    print(json.dumps({"objects": args.child, "full": bool(args.full), "peak_rss_mb": status_kb("VmHWM") / 1024,
                      "rss_before_mb": before_kb / 1024, "seconds": seconds, "segmented": found,
                      "labelled_voxels": int(np.count_nonzero(result.array)),
                      "shape": list(volume.array.shape)}), flush=True)
    return 0


def _spawn(args, count: int, full: bool) -> dict:
    from ..errors import InputError
    from .processes import PACKAGE_ROOT

    cmd = [sys.executable, "-m", "mrisegassist", "bench", "memory", "--data", str(args.data), "--case", args.case,
           "--child", str(count)] + (["--full"] if full else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))
                                                        if p)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        raise InputError(f"bench memory: {count} object(s){' (full volume)' if full else ''} failed "
                         f"(exit {done.returncode}):\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t0
    return row


def run(args) -> int:
    from ..cli import emit
    from ..errors import InputError

    if args.child is not None:
        return child(args)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    old = [int(c) for c in args.old_counts.split(",") if c.strip()]
    if not counts or min(counts + old + [1]) < 1:
        raise InputError("--counts: give object counts >= 1, e.g. 1,50,200")
    if not (Path(args.data) / args.case / "flair.nii.gz").is_file():
        raise InputError(f"bench memory needs the shared data: {Path(args.data) / args.case / 'flair.nii.gz'} is "
                         f"missing (--data, --case)")
    rows = []
    for full, group in ((False, counts), (True, old)):
        for count in group:
            if not args.json:
                print(f"{count} object(s){' (full-volume results)' if full else ''} ...", file=sys.stderr, flush=True)
            rows.append(_spawn(args, count, full))
    doc = summarise(rows, args.goal_mb)
    doc.update(data=str(Path(args.data) / args.case / "flair.nii.gz"), engine="classical")
    emit(args, doc, _text)
    return 0 if doc["goal_met"] else 1


def summarise(rows: list, goal_mb: float) -> dict:
    """Increases above each mode's first run, the goal check and the old behaviour's per-object slope."""
    cropped = [r for r in rows if not r["full"]]
    old = [r for r in rows if r["full"]]
    for group in (cropped, old):
        for r in group:
            r["above_first_mb"] = r["peak_rss_mb"] - group[0]["peak_rss_mb"]
    last = cropped[-1]
    doc = {"rows": rows, "goal_mb": goal_mb, "largest": last["objects"], "largest_above_first_mb":
           last["above_first_mb"], "goal_met": last["above_first_mb"] < goal_mb}
    if len(old) > 1 and old[-1]["objects"] > old[0]["objects"]:
        slope = old[-1]["above_first_mb"] / (old[-1]["objects"] - old[0]["objects"])
        doc["old_mb_per_object"] = slope
        doc["old_extrapolated_above_first_mb"] = slope * (last["objects"] - cropped[0]["objects"])
        doc["ratio_old_to_new"] = doc["old_extrapolated_above_first_mb"] / max(last["above_first_mb"], 1e-6)
    return doc


def _text(doc: dict) -> str:
    lines = [f"bench memory: {doc['data']} ({'x'.join(str(n) for n in doc['rows'][0]['shape'])} [k,j,i]), "
             f"engine {doc['engine']}, one fresh process per row",
             f"{'objects':>8} {'results':>12} {'segmented':>9} {'peak RSS MB':>12} {'above first MB':>15} "
             f"{'seconds':>8}"]
    for r in doc["rows"]:
        lines.append(f"{r['objects']:>8} {'full volume' if r['full'] else 'cropped':>12} {r['segmented']:>9} "
                     f"{r['peak_rss_mb']:>12.0f} {r['above_first_mb']:>15.0f} {r['seconds']:>8.1f}")
    lines.append(f"goal: {doc['largest']} objects < {doc['goal_mb']:.0f} MB above the first run: "
                 f"{doc['largest_above_first_mb']:.0f} MB -> {'met' if doc['goal_met'] else 'NOT met'}")
    if "old_mb_per_object" in doc:
        lines.append(f"full-volume results (before cropping): {doc['old_mb_per_object']:.1f} MB per object, "
                     f"extrapolated {doc['old_extrapolated_above_first_mb']:.0f} MB above the first run at "
                     f"{doc['largest']} objects ({doc['ratio_old_to_new']:.0f}x the cropped increase)")
    return "\n".join(lines)
