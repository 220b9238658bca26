"""``mrisegassist bench prompt``: speed and memory of our SAM 2 / MedSAM2 path against the official
``SAM2VideoPredictor`` used the way existing Slicer plugins use it, plus SAM ViT-B per-slice encoding.

Case: a real BraTS FLAIR (default ``brats2013-deepmedic/pat0001``) with one box on the slice where the expert
tumour label is largest (``--frames N`` keeps N slices around it). Models at seeded random initialisation
(no weights can be downloaded here): masks are not anatomical, Dice measures agreement of the code paths.

* **reference**: every slice windowed and written as a JPEG folder (quality 100), ``init_state`` on it, the box
  added, ``propagate_in_video`` forward and backward over all frames, fp32; re-prompt = ``reset_state`` + moved
  box + propagation again (the predictor keeps one frame's features, so everything is re-encoded).
  ``--reference-bf16`` adds the same under bf16 autocast; ``--vos`` adds sam2's ``SAM2VideoPredictorVOS``
  (``torch.compile`` of its modules; its first, compiling, run is reported apart).
* **ours**: :class:`~mrisegassist.prompt.sam2_engine.Sam2Engine` on the array (no JPEG round trip), once per
  ``--variants`` entry (:class:`~mrisegassist.prompt.accel.AccelOptions`, e.g. ``precision=fp32,graphs=off``):
  (1) the object's z-range = the expert tumour extent (+/- ``--margin``), as a Slicer ROI around it gives it;
  (2) re-prompt = a moved box on that prepared volume (cached image features); (3) an object of
  ``--object-slices`` slices (default 100) from a fresh prepared volume: the end-to-end time from a loaded model
  and a volume in memory, and its re-prompt. ``--full`` adds ours over all frames.

Goals (issue 12), per variant: per propagated slice at most 0.5x the reference's; a 100-slice object under 1 s
and its re-prompt under 0.3 s (times scaled to 100 slices when the volume has fewer); masks Dice >= 0.99
against the fp32 reference for an fp32 variant, >= 0.98 for a bf16 one; re-prompt without re-encoding.

Time: wall seconds and CPU seconds (this process, all threads) of one run each, in this process, same volume
and box, after an untimed warm-up of the model, and of each variant, on 9 slices (one-off costs: allocator
growth, kernel selection, CUDA-graph capture, compilation; a variant's is reported as ``warmup_s``). Order: the
reference, then per variant its z-range run, object runs and z-range re-prompt, then the reference's re-prompt
(so each pair compared is timed close together on a shared machine). Per propagated slice = time / slices
segmented. Memory: peak resident memory during the step minus before it (Linux ``VmHWM``); on CUDA the peak
allocated GPU memory. ``encoded`` counts the slices the image encoder ran on (a forward hook, batch sizes
summed).
"""
from __future__ import annotations

import datetime
import platform
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import add_data_flag

CASE = "brats2013-deepmedic/pat0001"
GOAL_PER_SLICE_RATIO = 0.5
GOAL_OBJECT_S = 1.0
GOAL_REPROMPT_S = 0.3
GOAL_DICE_FP32 = 0.99
GOAL_DICE_BF16 = 0.98


def register(sub) -> None:
    from ..cli import add_json_flag

    p = sub.add_parser("prompt", help="SAM 2 / MedSAM2 propagation and SAM per-slice speed vs the official "
                                      "predictors (seeded random weights, real FLAIR)")
    add_data_flag(p)
    p.add_argument("--case", default=CASE, help="case folder inside --data with flair.nii.gz and labels.nii.gz")
    p.add_argument("--frames", type=int, default=0, help="keep N slices around the tumour (0: all)")
    p.add_argument("--size", type=int, default=512,
                   help="SAM 2 input size: 512 = MedSAM2 configuration (default), 1024 = SAM 2.1 hiera-tiny "
                        "(others: the MedSAM2 configuration at that size); 0 skips SAM 2")
    p.add_argument("--margin", type=int, default=0,
                   help="slices added on each side of the tumour extent for our z-range (default 0: a ROI drawn "
                        "around the tumour)")
    p.add_argument("--object-slices", type=int, default=100, help="slices of the end-to-end object (default 100)")
    p.add_argument("--variants", default="auto",
                   help="';'-separated engine options to time, each 'key=value,...' of AccelOptions or 'auto' "
                        "(default: auto = the device's defaults)")
    p.add_argument("--reference-bf16", action="store_true", help="also run the official predictor in bf16")
    p.add_argument("--vos", action="store_true",
                   help="also run sam2's SAM2VideoPredictorVOS (torch.compile max-autotune; long first run)")
    p.add_argument("--full", action="store_true", help="also run ours over all frames (per-slice parity)")
    p.add_argument("--sam-slices", type=int, default=1, help="slices timed for SAM ViT-B (0: skip)")
    p.add_argument("--sam-variants", default="auto",
                   help="';'-separated engine options for SAM ViT-B batched encoding (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- results
@dataclass
class Run:
    """One timed run. ``dice_*``: masks against the fp32 reference (in our z-range / whole volume) and the
    bf16 reference (z-range) where run."""

    label: str
    seconds: float
    cpu_seconds: float
    slices: int
    encoded: int
    peak_extra_mb: Optional[float] = None
    peak_gpu_mb: Optional[float] = None
    dice_in_z_range: Optional[float] = None
    dice_whole_volume: Optional[float] = None
    dice_vs_bf16_reference: Optional[float] = None

    @property
    def per_slice_s(self) -> float:
        return self.seconds / max(self.slices, 1)

    @property
    def per_slice_cpu_s(self) -> float:
        return self.cpu_seconds / max(self.slices, 1)

    def as_dict(self) -> dict:
        return dict(asdict(self), per_slice_s=self.per_slice_s, per_slice_cpu_s=self.per_slice_cpu_s)


@dataclass
class Goal:
    name: str
    value: Optional[float]
    target: str
    met: bool


@dataclass
class Variant:
    """Our engine with one set of options: its runs, ratios against the fp32 reference and the goals."""

    spec: str
    description: str
    precision: str
    warmup_s: float
    runs: list[Run] = field(default_factory=list)
    slices_ratio: float = 0.0
    time_ratio: float = 0.0
    cpu_time_ratio: float = 0.0
    per_slice_ratio: float = 0.0
    per_slice_cpu_ratio: float = 0.0
    reprompt_time_ratio: float = 0.0
    object_per_100_s: float = 0.0
    reprompt_per_100_s: float = 0.0
    goals: list[Goal] = field(default_factory=list)

    def run(self, label: str) -> Run:
        return next(r for r in self.runs if r.label == label)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["runs"] = [r.as_dict() for r in self.runs]
        return out


@dataclass
class SamRow:
    """SAM ViT-B: seconds per slice to encode (image encoder) and to decode one box, Dice of the box masks
    against ``SamPredictor`` one slice at a time (``None`` for the reference itself)."""

    label: str
    slices: int
    encode_s: float
    decode_s: float
    encoded: int
    dice_vs_reference: Optional[float] = None


@dataclass
class Summary:
    case: str
    model: str
    device: str
    device_name: str
    torch: str
    date: str
    threads: int
    references: list[Run]
    variants: list[Variant]
    reference_note: str = ""
    failed: list[str] = field(default_factory=list)
    sam_vit_b: list[SamRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["references"] = [r.as_dict() for r in self.references]
        out["variants"] = [v.as_dict() for v in self.variants]
        return out


def _dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _timed(label: str, device: str, fn) -> tuple[Run, object]:
    from . import measure

    row: dict = {}
    with measure(row, device):
        value, slices, encoded = fn()
    return Run(label, row["seconds"], row["cpu_seconds"], slices, encoded, row.get("peak_extra_mb"),
               row.get("peak_gpu_mb")), value


def device_info(device: str) -> tuple[str, str]:
    """``(device name, torch version string)`` for the report."""
    import torch

    version = f"torch {torch.__version__}"
    if str(device).startswith("cuda"):
        version += f", CUDA {torch.version.cuda}"
        return torch.cuda.get_device_name(torch.device(device)), version
    return f"{platform.processor() or platform.machine()} CPU", version


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


def object_range(n: int, kc: int, slices: int) -> tuple[int, int]:
    """An inclusive window of ``min(slices, n)`` slices containing ``kc``, centred on it where possible."""
    m = min(slices, n)
    lo = max(0, min(kc - m // 2, n - m))
    return lo, lo + m - 1


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


def _options(spec: str):
    from ..prompt.accel import AccelOptions

    return AccelOptions() if spec.strip() in ("", "auto") else AccelOptions.parse(spec)


def _warm_up(predictor, variant_name: str, volume: np.ndarray, box) -> None:
    """Untimed: the model on the box's slice and the 8 above it (the memory bank fills up), so that one-off
    costs of the process (allocator growth, kernel selection) are charged to no timed run."""
    from ..prompt.base import ObjectPrompt
    from ..prompt.sam2_engine import Sam2Engine

    engine = Sam2Engine.from_model(predictor, variant_name)
    engine.segment(engine.prepare(volume), [ObjectPrompt(1, [box], z_range=(box.k, min(box.k + 8,
                                                                                      volume.shape[0] - 1)))])


def _variant(args, predictor, variant_name: str, spec: str, volume, box, moved, z_range, calls) -> tuple:
    """Warm-up and the timed runs of our engine with one option set; returns (Variant, {label: masks})."""
    import torch

    from ..prompt.base import Box2D, ObjectPrompt
    from ..prompt.sam2_engine import Sam2Engine

    options = _options(spec)
    engine = Sam2Engine.from_model(predictor, variant_name, options=options)
    n, kc = volume.shape[0], box.k
    t0 = time.perf_counter()
    warm = engine.prepare(volume)  # warm-up: the box's slice and the 8 above it (the memory bank fills up)
    engine.segment(warm, [ObjectPrompt(1, [box], z_range=(kc, min(kc + 8, n - 1)))])
    if str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    del warm
    dtype = options.dtype(str(engine.device))
    out = Variant(spec, engine.options.describe(str(engine.device)), "bf16" if dtype is not None else "fp32",
                  warmup)
    masks: dict[str, np.ndarray] = {}
    prepared_for: dict[str, object] = {}

    def ours(label: str, prompt_box: Box2D, zr, reuse: Optional[str] = None):
        def go():
            calls.clear()
            prepared = prepared_for[reuse] if reuse else engine.prepare(volume)
            (result,) = engine.segment(prepared, [ObjectPrompt(1, [prompt_box], z_range=zr)])
            prepared_for[label] = prepared
            return result.mask, len(result.slices), sum(calls)

        run, mask = _timed(label, args.device, go)
        out.runs.append(run)
        masks[label] = mask

    # the z-range run first (next to the reference's first run) and its re-prompt last (next to the reference's)
    obj = object_range(n, kc, args.object_slices)
    ours("z-range", box, z_range)
    ours("object", box, obj)
    ours("object re-prompt", moved, obj, reuse="object")
    if args.full:
        ours("all frames", box, (0, n - 1))
    ours("re-prompt", moved, z_range, reuse="z-range")
    out.runs.sort(key=lambda r: ["z-range", "re-prompt", "object", "object re-prompt", "all frames"].index(r.label))
    prepared_for.clear()
    out.description += f"; encoder batch used {engine.encode_batch_size}"
    if engine.tracker is not None and engine.tracker.notes:
        out.description += "; " + "; ".join(dict.fromkeys(engine.tracker.notes))
    if engine.lean_unsupported and options.loop == "lean":
        out.description += f"; official loop used: {engine.lean_unsupported}"
    if engine.tracker is not None:
        engine.tracker.clear()  # its banks and CUDA graphs (the predictor is shared with the next variant)
    return out, masks


def _score(variant: Variant, masks: dict, references: dict[str, Run], ref_masks: dict, z_range, obj_range,
           object_slices: int) -> None:
    """Dice against the references and the issue's goals."""
    z0, z1 = z_range
    o0, o1 = obj_range
    windows = {"z-range": (z0, z1), "re-prompt": (z0, z1), "object": (o0, o1), "object re-prompt": (o0, o1),
               "all frames": (0, None)}
    for run in variant.runs:
        a, b = windows[run.label]
        ref = ref_masks["reference re-prompt" if "re-prompt" in run.label else "reference"]
        sl = slice(a, None if b is None else b + 1)
        run.dice_in_z_range = _dice(masks[run.label][sl], ref[sl])
        run.dice_whole_volume = _dice(masks[run.label], ref)
        if "reference bf16" in ref_masks and "re-prompt" not in run.label:
            run.dice_vs_bf16_reference = _dice(masks[run.label][sl], ref_masks["reference bf16"][sl])
    zr, rp, ob, obr = (variant.run(x) for x in ("z-range", "re-prompt", "object", "object re-prompt"))
    ref, ref_rp = references["reference"], references["reference re-prompt"]
    variant.slices_ratio = zr.slices / ref.slices
    variant.time_ratio = zr.seconds / ref.seconds
    variant.cpu_time_ratio = zr.cpu_seconds / ref.cpu_seconds
    variant.per_slice_ratio = zr.per_slice_s / ref.per_slice_s
    variant.per_slice_cpu_ratio = zr.per_slice_cpu_s / ref.per_slice_cpu_s
    variant.reprompt_time_ratio = rp.seconds / ref_rp.seconds
    variant.object_per_100_s = ob.seconds * 100.0 / max(ob.slices, 1)
    variant.reprompt_per_100_s = obr.seconds * 100.0 / max(obr.slices, 1)
    dice_goal = GOAL_DICE_FP32 if variant.precision == "fp32" else GOAL_DICE_BF16
    dice = zr.dice_in_z_range
    variant.goals = [
        Goal("per-slice time / reference", variant.per_slice_ratio, f"<= {GOAL_PER_SLICE_RATIO}",
             variant.per_slice_ratio <= GOAL_PER_SLICE_RATIO),
        Goal(f"{object_slices}-slice object end to end (s per 100 slices)", variant.object_per_100_s,
             f"< {GOAL_OBJECT_S}", variant.object_per_100_s < GOAL_OBJECT_S),
        Goal("re-prompt (s per 100 slices)", variant.reprompt_per_100_s, f"< {GOAL_REPROMPT_S}",
             variant.reprompt_per_100_s < GOAL_REPROMPT_S),
        Goal(f"Dice vs fp32 reference ({variant.precision})", dice, f">= {dice_goal}",
             dice is not None and dice >= dice_goal),
        Goal("re-prompt re-encodes no slice", float(rp.encoded + obr.encoded), "== 0",
             rp.encoded + obr.encoded == 0),
    ]


class _Reference:
    """The official predictor from a JPEG folder (written in the first timed run): :meth:`first` = fp32 with the
    box; :meth:`rest` = its re-prompt, then optionally bf16 and sam2's VOS predictor. Our variants run between the
    two, so that each of our runs is timed next to the reference run it is compared with."""

    def __init__(self, args, predictor, volume: np.ndarray, box, moved, calls: list, variant_name: str,
                 folder: str) -> None:
        from ..prompt.windowing import FrameSource

        self.args, self.predictor, self.volume, self.box, self.moved = args, predictor, volume, box, moved
        self.calls, self.variant_name, self.folder = calls, variant_name, folder
        self.frames = FrameSource(volume)
        self.runs: list[Run] = []
        self.masks: dict[str, np.ndarray] = {}
        self.note = ""
        self._state: list = []

    def _official(self, label: str, model, prompt_box, dtype=None, reuse: bool = False, write: bool = False):
        from PIL import Image

        from ..prompt.accel import autocast

        n = self.volume.shape[0]

        def go():
            self.calls.clear()
            if write:
                for k in range(n):
                    Image.fromarray(self.frames.rgb_uint8(k)).save(Path(self.folder) / f"{k:05d}.jpg", quality=100)
            with autocast(self.args.device, dtype):
                mask, state = _reference_run(model, self.folder, prompt_box.xyxy, self.box.k,
                                             self._state[0] if reuse else None)
            self._state[:] = [state]
            return mask, n, sum(self.calls)

        run, mask = _timed(label, self.args.device, go)
        self.runs.append(run)
        self.masks[label] = mask

    def first(self) -> None:
        self._official("reference", self.predictor, self.box, write=True)

    def rest(self) -> None:
        import torch

        from ..prompt.sam2_engine import build_sam2_predictor

        args = self.args
        self._official("reference re-prompt", self.predictor, self.moved, reuse=True)
        self._state.clear()
        if args.reference_bf16:
            self._official("reference bf16", self.predictor, self.box, dtype=torch.bfloat16)
            self._state.clear()
        if args.vos:
            self.note = "VOS = sam2's SAM2VideoPredictorVOS (torch.compile max-autotune), fp32"
            try:
                vos = build_sam2_predictor(self.variant_name, args.device, image_size=args.size, vos_optimized=True)
                vos.load_state_dict(self.predictor.state_dict())
                vos.image_encoder.register_forward_hook(
                    lambda _m, inputs, _o: self.calls.append(int(inputs[0].shape[0])))
                self._official("reference VOS first run (compiles)", vos, self.box)
                self._official("reference VOS", vos, self.box)
                del vos
            except Exception as exc:  # noqa: BLE001 - the official route's failure is a result, reported
                self.note += f"; failed: {type(exc).__name__}: {str(exc)[:400]}"
            self._state.clear()


def _sam_rows(args, volume: np.ndarray, kc: int, box) -> list[SamRow]:
    """SAM ViT-B: ``SamPredictor`` one slice at a time (reference), then our engine per ``--sam-variants``
    (batched encoding of the same slices, then one box per slice)."""
    import torch
    from segment_anything import SamPredictor

    from ..prompt.sam import SamEngine, build_sam_model
    from ..prompt.windowing import FrameSource

    torch.manual_seed(args.seed)
    model = build_sam_model("vit_b").to(args.device)
    n = args.sam_slices
    ks = [min(max(kc + i - n // 2, 0), volume.shape[0] - 1) for i in range(n)]
    ks = list(dict.fromkeys(ks))
    xyxy = np.array(box, np.float32)
    frames = FrameSource(volume)
    reference = SamPredictor(model)
    ref_masks, enc, dec = {}, [], []
    reference.set_image(frames.rgb_uint8(ks[0]))  # warm-up
    for k in ks:
        t0 = time.perf_counter()
        reference.set_image(frames.rgb_uint8(k))
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        m, _, _ = reference.predict(box=xyxy, multimask_output=False, return_logits=True)
        t2 = time.perf_counter()
        ref_masks[k] = m[0] > 0
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    rows = [SamRow("SamPredictor, one slice at a time", len(ks), float(np.median(enc)), float(np.median(dec)),
                   len(ks))]
    for spec in filter(None, (s.strip() for s in args.sam_variants.split(";"))):
        engine = SamEngine.from_model(model, "sam-vit-b", options=_options(spec))
        engine.encode(engine.prepare(volume), ks[:1])  # warm-up (and the CUDA batch-size probe)
        prepared = engine.prepare(volume)
        t0 = time.perf_counter()
        engine.encode(prepared, ks)
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        dice, dec = [], []
        for k in ks:
            t2 = time.perf_counter()
            logits, _ = engine.predict_slice(prepared, k, xyxy)
            dec.append(time.perf_counter() - t2)
            dice.append(_dice(logits > 0, ref_masks[k]))
        valid = [d for d in dice if d is not None]
        label = f"ours: {engine.options.describe_encoder(engine.device, engine.encode_batch_size)}"
        rows.append(SamRow(label, len(ks), (t1 - t0) / len(ks), float(np.median(dec)), prepared.encoder_calls,
                           float(np.mean(valid)) if valid else None))
        engine.release()
    return rows


def run(args) -> int:
    import torch

    from ..cli import emit
    from ..errors import MRISegAssistError
    from ..prompt.accel import DeviceMemoryError, resolve_device
    from ..prompt.base import Box2D
    from ..prompt.sam2_engine import build_sam2_predictor

    args.device = resolve_device(args.device)
    volume, kc, (i0, j0, i1, j1), z_range = _case(args)
    box = Box2D(kc, i0, j0, i1, j1)
    moved = Box2D(kc, i0 + 2, j0 + 2, i1 + 2, j1 + 2)
    name, version = device_info(args.device)
    variant_name = "sam2.1-hiera-tiny" if args.size == 1024 else "medsam2"
    references: list[Run] = []
    variants: list[Variant] = []
    failed: list[str] = []
    note = ""
    if args.size > 0:
        torch.manual_seed(args.seed)
        predictor = build_sam2_predictor(variant_name, args.device, image_size=args.size)
        calls: list = []
        predictor.image_encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(int(inputs[0].shape[0])))
        _warm_up(predictor, variant_name, volume, box)
        ours_masks = []
        with tempfile.TemporaryDirectory(prefix="mrisegassist-bench-") as folder:
            reference = _Reference(args, predictor, volume, box, moved, calls, variant_name, folder)
            reference.first()
            for spec in filter(None, (s.strip() for s in args.variants.split(";"))):
                try:
                    variant, masks = _variant(args, predictor, variant_name, spec, volume, box, moved, z_range,
                                              calls)
                except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others' figures
                    if not isinstance(exc, MRISegAssistError) or isinstance(exc, DeviceMemoryError):
                        traceback.print_exc()
                    failed.append(f"[{spec}] failed: {type(exc).__name__}: {str(exc)[:400]}")
                    continue
                variants.append(variant)
                ours_masks.append(masks)
            reference.rest()
        references, ref_masks, note = reference.runs, reference.masks, reference.note
        ref_runs = {r.label: r for r in references}
        z = slice(z_range[0], z_range[1] + 1)
        for r in references:  # bf16 and VOS references against the fp32 one
            if r.label != "reference" and "re-prompt" not in r.label:
                r.dice_in_z_range = _dice(ref_masks[r.label][z], ref_masks["reference"][z])
                r.dice_whole_volume = _dice(ref_masks[r.label], ref_masks["reference"])
        for variant, masks in zip(variants, ours_masks):
            _score(variant, masks, ref_runs, ref_masks, z_range, object_range(volume.shape[0], kc,
                                                                              args.object_slices),
                   args.object_slices)
    summary = Summary(
        case=f"{args.case} FLAIR, {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}, box on slice {kc} "
             f"from the expert tumour label, our z-range {z_range[0]}..{z_range[1]}",
        model=f"{variant_name} at {args.size} px, seeded random weights (seed {args.seed})" if args.size else "-",
        device=args.device, device_name=name, torch=version,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        threads=torch.get_num_threads(), references=references, variants=variants, reference_note=note,
        failed=failed)
    if args.sam_slices > 0:
        summary.sam_vit_b = _sam_rows(args, volume, kc, (i0, j0, i1, j1))
    emit(args, summary.as_dict(), lambda _d: format_table(summary))
    return 0


def format_table(summary: Summary) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = (f"{'run':<38}{'seconds':>9}{'CPU s':>9}{'slices':>8}{'s/slice':>9}{'encoded':>9}{'peak MB':>9}"
            f"{'Dice z':>9}{'Dice vol':>10}{'Dice bf16':>10}")

    def line(label: str, row: Run) -> str:
        peak = row.peak_gpu_mb if row.peak_gpu_mb is not None else row.peak_extra_mb
        return (f"{label:<38}{row.seconds:>9.3f}{row.cpu_seconds:>9.1f}{row.slices:>8d}{row.per_slice_s:>9.4f}"
                f"{row.encoded:>9d}{fmt(peak, '.0f'):>9}{fmt(row.dice_in_z_range, '.4f'):>9}"
                f"{fmt(row.dice_whole_volume, '.4f'):>10}{fmt(row.dice_vs_bf16_reference, '.4f'):>10}")

    lines = [f"case:   {summary.case}", f"model:  {summary.model}",
             f"device: {summary.device} = {summary.device_name}; {summary.torch}; {summary.threads} CPU threads; "
             f"{summary.date}"]
    if summary.references:
        lines += ["", head] + [line(r.label, r) for r in summary.references]
        if summary.reference_note:
            lines.append(summary.reference_note)
    for v in summary.variants:
        lines += ["", f"ours [{v.spec}]: {v.description}; warm-up {v.warmup_s:.2f} s", head]
        lines += [line(r.label, r) for r in v.runs]
        lines += [f"time ours / reference: {v.time_ratio:.3f} wall, {v.cpu_time_ratio:.3f} CPU = slices ratio "
                  f"{v.slices_ratio:.3f} x per-slice ratio {v.per_slice_ratio:.3f} wall "
                  f"({v.per_slice_cpu_ratio:.3f} CPU); re-prompt {v.reprompt_time_ratio:.3f}"]
        for g in v.goals:
            lines.append(f"  goal {g.name}: {fmt(g.value, '.4f')} (target {g.target}) "
                         f"{'met' if g.met else 'NOT met'}")
    lines += [f"variant {f}" for f in summary.failed]
    if summary.sam_vit_b:
        lines += ["", f"{'SAM ViT-B':<60}{'slices':>7}{'encode s':>10}{'decode s':>10}{'encoded':>9}{'Dice':>8}"]
        for s in summary.sam_vit_b:
            lines.append(f"{s.label:<60}{s.slices:>7d}{s.encode_s:>10.4f}{s.decode_s:>10.4f}{s.encoded:>9d}"
                         f"{fmt(s.dice_vs_reference, '.4f'):>8}")
    return "\n".join(lines)
