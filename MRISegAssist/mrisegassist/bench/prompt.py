"""``mrisegassist bench prompt``: speed and memory of our SAM 2 / MedSAM2 path against the official
``SAM2VideoPredictor`` used the way existing Slicer plugins use it, plus SAM ViT-B per-slice times.

Case: a real BraTS FLAIR (default ``brats2013-deepmedic/pat0001``) with one box on the slice where the expert
tumour label is largest (``--frames N`` keeps N slices around it). Models at seeded random initialisation
(no weights can be downloaded here): masks are not anatomical, Dice measures agreement of the two code paths.

* **reference**: every slice windowed and written as a JPEG folder (quality 100), ``init_state`` on it, the box
  added, ``propagate_in_video`` forward and backward over all frames; re-prompt = ``reset_state`` + moved box +
  propagation again (the predictor keeps one frame's features, so everything is re-encoded).
* **ours**: :class:`~mrisegassist.prompt.sam2_engine.Sam2Engine` on the array (no JPEG round trip), with the
  object's z-range = the expert tumour extent (+/- ``--margin`` slices), as a Slicer ROI around it gives it;
  re-prompt = a moved box on the prepared volume (cached image features). ``--full`` adds ours over all frames.

Time: wall seconds and CPU seconds (this process, all threads: steadier than wall time when other jobs share
the machine) of one run each, in this process, same volume and box, after an untimed warm-up of the model on
9 slices (one-off first-call costs are charged to neither side); per propagated slice = time / slices
segmented. Memory: peak resident memory during the step minus the resident memory before it (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``; freed heap returned with ``malloc_trim`` between steps); on
CUDA the peak allocated GPU memory. Encoder calls are counted with a forward hook on the image encoder.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import add_data_flag

CASE = "brats2013-deepmedic/pat0001"


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("prompt", help="SAM 2 / MedSAM2 propagation and SAM per-slice speed vs the official "
                                      "predictors (seeded random weights, real FLAIR)")
    add_data_flag(p)
    p.add_argument("--case", default=CASE, help="case folder inside --data with flair.nii.gz and labels.nii.gz")
    p.add_argument("--frames", type=int, default=0, help="keep N slices around the tumour (0: all)")
    p.add_argument("--size", type=int, default=512,
                   help="SAM 2 input size: 512 = MedSAM2 configuration (default), 1024 = SAM 2.1 hiera-tiny")
    p.add_argument("--margin", type=int, default=0,
                   help="slices added on each side of the tumour extent for our z-range (default 0: a ROI drawn "
                        "around the tumour)")
    p.add_argument("--full", action="store_true", help="also run ours over all frames (per-slice parity)")
    p.add_argument("--sam-slices", type=int, default=1, help="slices timed for SAM ViT-B (0: skip)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=run)


def _dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


# ---------------------------------------------------------------------------------------------- steps
def _case(args):
    from ..errors import InputError
    from ..volume import read_volume

    folder = Path(args.data) / args.case
    if not (folder / "flair.nii.gz").is_file() or not (folder / "labels.nii.gz").is_file():
        raise InputError(f"{folder}: needs flair.nii.gz and labels.nii.gz (pass --data / --case)")
    flair = read_volume(folder / "flair.nii.gz").array
    tumour = read_volume(folder / "labels.nii.gz", kind="label").array > 0
    kc = int(np.argmax(tumour.sum(axis=(1, 2))))
    if args.frames > 0:
        lo = max(0, min(kc - args.frames // 2, flair.shape[0] - args.frames))
        flair, tumour, kc = flair[lo:lo + args.frames], tumour[lo:lo + args.frames], kc - lo
    jj, ii = np.nonzero(tumour[kc])
    ks = np.nonzero(tumour.any(axis=(1, 2)))[0]
    z_range = (max(int(ks.min()) - args.margin, 0), min(int(ks.max()) + args.margin, flair.shape[0] - 1))
    return np.ascontiguousarray(flair), kc, (int(ii.min()), int(jj.min()), int(ii.max()), int(jj.max())), z_range


def _reference_run(predictor, folder: str, box: np.ndarray, kc: int, state=None):
    """Official usage: init_state on the JPEG folder (unless a state is given: reset it), box, both directions."""
    if state is None:
        state = predictor.init_state(folder)
    else:
        predictor.reset_state(state)
    predictor.add_new_points_or_box(state, frame_idx=kc, obj_id=1, box=box)
    n = state["num_frames"]
    masks = np.zeros((n, state["video_height"], state["video_width"]), bool)
    for reverse in (False, True):
        for f, _, m in predictor.propagate_in_video(state, reverse=reverse):
            masks[f] = (m[0, 0] > 0).cpu().numpy()
    return masks, state


def _sam_times(args, volume: np.ndarray, kc: int, box) -> dict:
    import torch

    from ..prompt.sam import SamEngine, build_sam_model

    torch.manual_seed(args.seed)
    engine = SamEngine.from_model(build_sam_model("vit_b"), "sam-vit-b", device=args.device)
    prepared = engine.prepare(volume)
    encode_decode, decode = [], []
    for n in range(args.sam_slices):
        k = min(max(kc + n - args.sam_slices // 2, 0), volume.shape[0] - 1)
        t0 = time.perf_counter()
        engine.predict_slice(prepared, k, np.array(box, np.float32))
        t1 = time.perf_counter()
        engine.predict_slice(prepared, k, np.array(box, np.float32) + 2)
        t2 = time.perf_counter()
        encode_decode.append(t1 - t0)
        decode.append(t2 - t1)
    dec = float(np.median(decode))
    return {"slices": args.sam_slices, "encode_s": float(np.median(encode_decode)) - dec, "decode_s": dec,
            "encoder_calls": prepared.encoder_calls}


def run(args) -> int:
    import torch
    from PIL import Image

    from ..cli import emit
    from . import measure
    from ..prompt.base import Box2D, ObjectPrompt
    from ..prompt.sam2_engine import Sam2Engine, build_sam2_predictor
    from ..prompt.windowing import FrameSource

    volume, kc, (i0, j0, i1, j1), z_range = _case(args)
    box = Box2D(kc, i0, j0, i1, j1)
    moved = Box2D(kc, i0 + 2, j0 + 2, i1 + 2, j1 + 2)
    variant = "medsam2" if args.size == 512 else "sam2.1-hiera-tiny"
    torch.manual_seed(args.seed)
    predictor = build_sam2_predictor(variant, args.device, image_size=args.size)
    calls: list = []
    predictor.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    rows: dict[str, dict] = {}
    masks: dict[str, np.ndarray] = {}

    def ours(label: str, engine, prepared, prompt_box: Box2D, zr):
        calls.clear()
        row = rows.setdefault(label, {})
        with measure(row, args.device):
            if prepared is None:
                prepared = engine.prepare(volume)
            (result,) = engine.segment(prepared, [ObjectPrompt(1, [prompt_box], z_range=zr)])
        row.update(slices=len(result.slices), encoder_calls=len(calls))
        masks[label] = result.mask
        return prepared

    # untimed warm-up over the box's slice and the 8 above it (the memory bank fills up: 7 frames): the first
    # passes of a process pay one-off costs (allocator growth, oneDNN/cuDNN kernel selection) that would
    # otherwise be charged to whichever run is first
    warm = Sam2Engine.from_model(predictor, variant)
    warm.segment(warm.prepare(volume), [ObjectPrompt(1, [box], z_range=(kc, min(kc + 8, len(volume) - 1)))])
    del warm
    engine = Sam2Engine.from_model(predictor, variant)
    prepared = ours("ours (z-range)", engine, None, box, z_range)
    ours("ours re-prompt", engine, prepared, moved, z_range)
    del prepared
    if args.full:
        ours("ours (all frames)", Sam2Engine.from_model(predictor, variant), None, box, (0, volume.shape[0] - 1))

    frames = FrameSource(volume)
    with tempfile.TemporaryDirectory(prefix="mrisegassist-bench-") as folder:
        calls.clear()
        row = rows.setdefault("reference", {})
        with measure(row, args.device):
            for k in range(volume.shape[0]):
                Image.fromarray(frames.rgb_uint8(k)).save(Path(folder) / f"{k:05d}.jpg", quality=100)
            masks["reference"], state = _reference_run(predictor, folder, box.xyxy, kc)
        row.update(slices=volume.shape[0], encoder_calls=len(calls))
        calls.clear()
        row = rows.setdefault("reference re-prompt", {})
        with measure(row, args.device):
            masks["reference re-prompt"], _ = _reference_run(predictor, folder, moved.xyxy, kc, state)
        row.update(slices=volume.shape[0], encoder_calls=len(calls))
        del state

    z0, z1 = z_range
    for label, row in rows.items():
        row["per_slice_s"] = row["seconds"] / max(row["slices"], 1)
        row["per_slice_cpu_s"] = row["cpu_seconds"] / max(row["slices"], 1)
        ref = masks["reference re-prompt" if "re-prompt" in label else "reference"]
        if label.startswith("ours"):
            row["dice_in_z_range"] = _dice(masks[label][z0:z1 + 1], ref[z0:z1 + 1])
            row["dice_whole_volume"] = _dice(masks[label], ref)
    ours_row, ref_row = rows["ours (z-range)"], rows["reference"]
    ratio = {"slices_ours_vs_reference": ours_row["slices"] / ref_row["slices"],
             "time_ours_vs_reference": ours_row["seconds"] / ref_row["seconds"],
             "cpu_time_ours_vs_reference": ours_row["cpu_seconds"] / ref_row["cpu_seconds"],
             "per_slice_ours_vs_reference": ours_row["per_slice_s"] / ref_row["per_slice_s"],
             "per_slice_cpu_ours_vs_reference": ours_row["per_slice_cpu_s"] / ref_row["per_slice_cpu_s"],
             "reprompt_time_ours_vs_reference": rows["ours re-prompt"]["seconds"]
             / rows["reference re-prompt"]["seconds"],
             "reprompt_cpu_time_ours_vs_reference": rows["ours re-prompt"]["cpu_seconds"]
             / rows["reference re-prompt"]["cpu_seconds"]}
    ratio["goal_time_le_0.5_met"] = ratio["time_ours_vs_reference"] <= 0.5
    ratio["goal_dice_ge_0.99_met"] = (rows["ours (z-range)"]["dice_in_z_range"] or 0.0) >= 0.99
    ratio["goal_reprompt_no_reencoding_met"] = rows["ours re-prompt"]["encoder_calls"] == 0
    summary = {"case": f"{args.case} FLAIR, {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}, box "
                       f"on slice {kc} from the expert tumour label, our z-range {z0}..{z1}",
               "model": f"{variant} at {args.size} px, seeded random weights (seed {args.seed})",
               "device": args.device, "threads": torch.get_num_threads(), "rows": rows, "ratios": ratio}
    if args.sam_slices > 0:
        summary["sam_vit_b"] = _sam_times(args, volume, kc, (i0, j0, i1, j1))
    emit(args, summary, format_table)
    return 0


def format_table(summary: dict) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"case:   {summary['case']}", f"model:  {summary['model']}",
             f"device: {summary['device']} ({summary['threads']} threads)", "",
             f"{'run':<22}{'seconds':>9}{'CPU s':>9}{'slices':>8}{'s/slice':>9}{'encodes':>9}{'peak MB':>9}"
             f"{'Dice z-rng':>11}{'Dice vol':>10}"]
    for label, row in summary["rows"].items():
        peak = row.get("peak_gpu_mb", row.get("peak_extra_mb"))
        lines.append(f"{label:<22}{row['seconds']:>9.2f}{row['cpu_seconds']:>9.1f}{row['slices']:>8d}"
                     f"{row['per_slice_s']:>9.3f}{row['encoder_calls']:>9d}{fmt(peak, '.0f'):>9}"
                     f"{fmt(row.get('dice_in_z_range'), '.4f'):>11}{fmt(row.get('dice_whole_volume'), '.4f'):>10}")
    r = summary["ratios"]
    lines += ["", f"ours / reference time: {r['time_ours_vs_reference']:.3f} wall, "
                  f"{r['cpu_time_ours_vs_reference']:.3f} CPU (goal <= 0.5: "
                  f"{'met' if r['goal_time_le_0.5_met'] else 'NOT met'}); per slice "
                  f"{r['per_slice_ours_vs_reference']:.3f} wall, {r['per_slice_cpu_ours_vs_reference']:.3f} CPU",
              f"(time ratio = slices ratio {r['slices_ours_vs_reference']:.3f} x per-slice ratio: the saving is "
              f"the slices outside the object's z-range)",
              f"re-prompt ours / reference: {r['reprompt_time_ours_vs_reference']:.3f} wall, "
              f"{r['reprompt_cpu_time_ours_vs_reference']:.3f} CPU; re-encoding avoided: "
              f"{'yes' if r['goal_reprompt_no_reencoding_met'] else 'NO'}",
              f"Dice ours vs reference in the z-range >= 0.99: {'met' if r['goal_dice_ge_0.99_met'] else 'NOT met'}"]
    sam = summary.get("sam_vit_b")
    if sam:
        lines.append(f"SAM ViT-B per slice: encode {sam['encode_s']:.2f} s, decode {sam['decode_s']:.3f} s "
                     f"(median of {sam['slices']} slice(s))")
    return "\n".join(lines)

