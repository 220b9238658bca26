"""``mrisegassist bench prompt-accuracy``: Dice of a box-prompted engine (default: the weights-free
``classical`` engine) on real lesions with **expert** labels, boxes derived from the expert masks.

Data (``../shared/data``, see its README; all labels are expert annotations):

* ``ms07``, ``ms26``: ms-lesjak patient07 / patient26, FLAIR (+ T2, T1, post-contrast T1), expert consensus MS
  lesion masks (1 mm MNI grid);
* ``brats1..4-wt``: brats2013-deepmedic pat0001..0004, whole tumour (labels 1-4) on FLAIR (+ T1c);
  ``brats1..4-tc``: tumour core (1, 3, 4) on T1c (+ FLAIR); ``brats1..4-et``: enhancing tumour (4) on T1c
  (+ FLAIR);
* ``radiomics1``, ``radiomics2``: radiomics-brain brain1 / brain2, thick-slice (6.5 mm) post-contrast T1, lesion
  (one sequence only).

Objects are the 26-connected components of the expert mask with at least ``--min-voxels`` voxels (one box
per lesion); strategy A = one box on the middle slice of each lesion's z-range, B = three boxes at 1/4, 1/2,
3/4 (each box = the lesion's bounding rectangle on that slice, ``--box-margin`` 0). No z-range is given: the
engine propagates until the lesion vanishes. ``--sequences single`` gives the engine the prompted sequence
only, ``multi`` every co-registered sequence of the case (prompted one first; engines with ``accepts_channels``
only); a case with one sequence counts in the multi-sequence mean with its single-sequence figure. Printed per
case, sequence set and strategy: Dice of the fused label map against the expert mask of the prompted lesions,
per-lesion Dice (median, mean, fraction >= 0.5) and time; then the means and whether B >= A on average.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from . import add_data_flag

MODES = ("single", "multi")


@dataclass(frozen=True)
class AccuracyCase:
    """One benchmark case: image and expert label files (relative to the data folder), label values, and the
    other co-registered sequences of the case (``others``: ``(name, file)``, same grid as ``image``)."""

    name: str
    image: str
    labels: str
    values: Optional[tuple[int, ...]]  # None: every non-zero voxel
    description: str
    sequence: str = ""
    others: tuple[tuple[str, str], ...] = ()

    def sequences(self, mode: str) -> list[str]:
        """Sequence names given to the engine in ``mode`` (``single`` / ``multi``), prompted one first."""
        return [self.sequence] + ([n for n, _ in self.others] if mode == "multi" else [])


def _brats(n: int) -> list[AccuracyCase]:
    d = f"brats2013-deepmedic/pat{n:04d}"
    flair, t1c = (("flair", f"{d}/flair.nii.gz"),), (("t1c", f"{d}/t1c.nii.gz"),)
    return [AccuracyCase(f"brats{n}-wt", f"{d}/flair.nii.gz", f"{d}/labels.nii.gz", (1, 2, 3, 4),
                         f"BraTS 2013 pat{n:04d} whole tumour, FLAIR", "flair", t1c),
            AccuracyCase(f"brats{n}-tc", f"{d}/t1c.nii.gz", f"{d}/labels.nii.gz", (1, 3, 4),
                         f"BraTS 2013 pat{n:04d} tumour core, T1c", "t1c", flair),
            AccuracyCase(f"brats{n}-et", f"{d}/t1c.nii.gz", f"{d}/labels.nii.gz", (4,),
                         f"BraTS 2013 pat{n:04d} enhancing tumour, T1c", "t1c", flair)]


def _ms(patient: str) -> AccuracyCase:
    d = f"ms-lesjak/{patient}"
    return AccuracyCase(f"ms{patient[-2:]}", f"{d}/flair.nii.gz", f"{d}/lesions.nii.gz", None,
                        f"MS lesions (Lesjak 2018) {patient}, FLAIR", "flair",
                        tuple((s, f"{d}/{s}.nii.gz") for s in ("t2", "t1", "t1post")))


CASES: dict[str, AccuracyCase] = {c.name: c for c in [
    _ms("patient07"), _ms("patient26"),
    *[c for n in range(1, 5) for c in _brats(n)],
    AccuracyCase("radiomics1", "radiomics-brain/brain1_image.nrrd", "radiomics-brain/brain1_label.nrrd", None,
                 "pyradiomics brain1 lesion, post-contrast T1, 6.5 mm slices", "t1c"),
    AccuracyCase("radiomics2", "radiomics-brain/brain2_image.nrrd", "radiomics-brain/brain2_label.nrrd", None,
                 "pyradiomics brain2 lesion, post-contrast T1, 6.5 mm slices", "t1c"),
]}
DEFAULT_CASES = ("ms07", "ms26", "brats1-wt", "brats2-wt", "brats3-wt", "brats4-wt", "brats1-tc", "brats2-tc",
                 "brats1-et", "radiomics1", "radiomics2")


@dataclass
class StrategyResult:
    """One strategy on one case: Dice of the fused labels against the prompted lesions (and all lesions), each
    lesion's Dice (its own object's mask), boxes given, seconds (segment + fuse), slices segmented."""

    dice: float
    dice_all_lesions: float
    lesion_dice: list[float]
    boxes: int
    seconds: float
    slices_segmented: int
    overlay: Optional[str] = None

    @property
    def lesion_dice_median(self) -> float:
        return float(np.median(self.lesion_dice))

    @property
    def lesion_dice_mean(self) -> float:
        return float(np.mean(self.lesion_dice))

    @property
    def lesions_dice_ge_half(self) -> float:
        """Fraction of lesions with Dice >= 0.5."""
        return float(np.mean(np.asarray(self.lesion_dice) >= 0.5))

    def as_dict(self) -> dict:
        return {**asdict(self), "lesion_dice": [round(d, 4) for d in self.lesion_dice],
                "lesion_dice_median": self.lesion_dice_median, "lesion_dice_mean": self.lesion_dice_mean,
                "lesions_dice_ge_0.5": self.lesions_dice_ge_half}


@dataclass
class CaseResult:
    """One case with one sequence set (``mode``); ``strategies[s]`` per strategy; ``reused``: a case with one
    sequence, its multi-sequence figures are its single-sequence ones."""

    case: str
    description: str
    image: str
    mode: str
    sequences: list[str]
    lesions: int
    lesion_voxels: int
    prepare_s: float
    strategies: dict[str, StrategyResult] = field(default_factory=dict)
    labels: str = "expert"
    reused: bool = False

    def as_dict(self) -> dict:
        out = asdict(self)
        out["strategies"] = {s: r.as_dict() for s, r in self.strategies.items()}
        return out


@dataclass
class Summary:
    """Means over the cases of one sequence set and strategy."""

    mean_dice: float
    mean_lesion_dice: float
    lesions: int
    mean_seconds: float


@dataclass
class AccuracyResult:
    """The whole benchmark: ``cases`` (one per case and sequence set), ``summary[mode][strategy]``."""

    engine: str
    data: str
    min_voxels: int
    box_margin: int
    cases: list[CaseResult]
    summary: dict[str, dict[str, Summary]]
    labels: str = "expert"
    plot: Optional[str] = None

    def b_ge_a(self, mode: str) -> Optional[bool]:
        """Whether strategy B's mean case Dice is at least A's (``None`` unless both ran)."""
        s = self.summary.get(mode, {})
        return None if "A" not in s or "B" not in s else s["B"].mean_dice >= s["A"].mean_dice

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cases"] = [c.as_dict() for c in self.cases]
        out["b_ge_a"] = {m: self.b_ge_a(m) for m in self.summary}
        return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def load_case(case: AccuracyCase, data: Path, mode: str = "single"):
    """``(volume of the prompted sequence, engine input, expert mask)``: the engine input is ``[k, j, i]``
    (``single``) or ``[c, k, j, i]`` of every sequence of the case (``multi``; :class:`InputError` if one is
    missing or on another grid)."""
    from ..volume import read_volume

    files = [case.image] + ([f for _, f in case.others] if mode == "multi" else [])
    for path in [data / f for f in files] + [data / case.labels]:
        if not path.exists():
            raise InputError(f"{path}: benchmark case {case.name} missing (pass --data to the shared data folder)")
    volume = read_volume(data / case.image)
    labels = read_volume(data / case.labels, kind="label").array
    expert = np.isin(labels, case.values) if case.values else labels > 0
    if mode == "single" or not case.others:
        return volume, volume.array, expert
    stack = [volume.array]
    for f in files[1:]:
        other = read_volume(data / f)
        if other.array.shape != volume.array.shape or not other.geometry.same_as(volume.geometry, atol=1e-3):
            raise InputError(f"{data / f}: not on the grid of {data / case.image}; cannot stack the sequences")
        stack.append(other.array)
    return volume, np.stack(stack), expert


def run_case(case: AccuracyCase, data: Path, engine, strategies: Sequence[str] = ("A", "B"),
             min_voxels: int = 10, box_margin: int = 0, overlay_dir: Optional[Path] = None,
             mode: str = "single") -> CaseResult:
    """Segment every lesion of ``case`` with ``engine`` for each strategy, given the sequences of ``mode``."""
    from ..prompt.fusion import fuse
    from ..prompt.strategies import objects_from_mask, prompts_from_mask

    if mode == "multi" and case.others and not getattr(engine, "accepts_channels", False):
        raise InputError(f"engine {engine.name!r} takes one sequence; run it with --sequences single")
    volume, array, expert = load_case(case, data, mode)
    objects = dict(objects_from_mask(expert, mode="components", min_voxels=min_voxels))
    if not objects:
        raise InputError(f"{case.name}: no lesion of at least {min_voxels} voxels in the expert mask")
    prompted = np.zeros(expert.shape, dtype=bool)
    for m in objects.values():
        prompted |= m
    t0 = time.perf_counter()
    prepared = engine.prepare(array)
    out = CaseResult(case.name, case.description, case.image, mode, case.sequences(mode), len(objects),
                     int(prompted.sum()), time.perf_counter() - t0)
    for strategy in strategies:
        prompts = prompts_from_mask(expert, strategy, mode="components", min_voxels=min_voxels, margin=box_margin)
        t0 = time.perf_counter()
        results = engine.segment(prepared, prompts)
        fused = fuse(results)
        seconds = time.perf_counter() - t0
        r = out.strategies[strategy] = StrategyResult(
            _dice(fused > 0, prompted), _dice(fused > 0, expert), [_dice(x.mask, objects[x.object_id]) for x in results],
            sum(len(p.boxes) for p in prompts), seconds, sum(len(x.slices) for x in results))
        if overlay_dir is not None:
            from ..viz import overlay_png

            suffix = "" if mode == "single" else "_multi"
            path = overlay_dir / f"prompt_accuracy_{case.name}{suffix}_{strategy}.png"
            overlay_png(volume, (fused > 0).astype(np.uint8), path, reference=prompted.astype(np.uint8),
                        title=f"{case.description} ({'+'.join(out.sequences)}): {engine.name} strategy {strategy}, "
                              f"Dice {r.dice:.3f} vs expert")
            r.overlay = str(path)
    return out


def run(case_names: Sequence[str], data: Path, engine_name: str = "classical", strategies=("A", "B"),
        min_voxels: int = 10, box_margin: int = 0, out_dir: Optional[Path] = None, device: str = "cpu",
        checkpoint: Optional[str] = None, progress=None, modes: Optional[Sequence[str]] = None) -> AccuracyResult:
    """Run the benchmark on the named cases for each sequence set in ``modes`` (default: both when the engine
    accepts several sequences, else ``single``)."""
    from ..prompt import get_engine

    unknown = [c for c in case_names if c not in CASES]
    if unknown:
        raise InputError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    bad = [s for s in strategies if s not in ("A", "B")]
    if bad:
        raise InputError(f"unknown strategy {bad[0]!r}; use A and/or B")
    engine = get_engine(engine_name, device=device, checkpoint=checkpoint)
    if modes is None:
        modes = MODES if getattr(engine, "accepts_channels", False) else ("single",)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise InputError(f"unknown sequence set {bad[0] if bad else ''!r}; use single and/or multi")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    cases: list[CaseResult] = []
    steps = [(name, mode) for name in case_names for mode in modes]
    done: dict[str, CaseResult] = {}
    for n, (name, mode) in enumerate(steps):
        if progress is not None:
            progress(n / len(steps), f"{name} ({mode})")
        case = CASES[name]
        if mode == "multi" and not case.others and name in done:
            reused = CaseResult(**{**done[name].__dict__, "mode": "multi", "reused": True})
            cases.append(reused)
            continue
        cases.append(run_case(case, data, engine, strategies, min_voxels, box_margin, out_dir, mode))
        done.setdefault(name, cases[-1])
    summary = {}
    for mode in modes:
        of_mode = [c for c in cases if c.mode == mode]
        summary[mode] = {s: Summary(float(np.mean([c.strategies[s].dice for c in of_mode])),
                                    float(np.mean([d for c in of_mode for d in c.strategies[s].lesion_dice])),
                                    int(sum(c.lesions for c in of_mode)),
                                    float(np.mean([c.strategies[s].seconds for c in of_mode if not c.reused])))
                         for s in strategies}
    result = AccuracyResult(engine_name, str(data), min_voxels, box_margin, cases, summary)
    if out_dir is not None:
        from ..viz import plot_bars

        result.plot = str(plot_bars(
            {f"{c.case}{'' if c.mode == 'single' else ' multi'}": {f"strategy {s}": c.strategies[s].dice
                                                                 for s in strategies} for c in cases},
            out_dir / "prompt_accuracy_dice.png",
            title=f"{engine_name}: Dice vs expert labels, one box (A) / three (B) per lesion", ylabel="Dice"))
    return result


def format_text(result: AccuracyResult) -> str:
    strategies = list(next(iter(result.summary.values())))
    lines = [f"prompt accuracy of '{result.engine}' against EXPERT labels ({result.data}); one object per lesion "
             f"(26-connected, >= {result.min_voxels} voxels), boxes = lesion rectangles (+{result.box_margin})",
             f"{'case':12s} {'sequences':24s} {'lesions':>7s}  " + "  ".join(
                 f"{s}: Dice  lesion med/mean  >=0.5   time" for s in strategies)]
    for c in result.cases:
        cells = []
        for s in strategies:
            r = c.strategies[s]
            time_cell = "  same" if c.reused else f"{r.seconds:5.1f}s"
            cells.append(f"   {r.dice:.3f}       {r.lesion_dice_median:.2f}/{r.lesion_dice_mean:.2f}  "
                         f"{100 * r.lesions_dice_ge_half:4.0f}%  {time_cell}")
        seqs = "+".join(c.sequences) + (" (only one)" if c.reused else "")
        lines.append(f"{c.case:12s} {seqs:24s} {c.lesions:7d}  " + "  ".join(cells) + f"   ({c.description})")
    for mode, per in result.summary.items():
        for s, m in per.items():
            lines.append(f"{mode}-sequence strategy {s}: mean case Dice {m.mean_dice:.3f}, mean lesion Dice "
                         f"{m.mean_lesion_dice:.3f} over {m.lesions} lesions, mean time per case {m.mean_seconds:.1f} s")
        verdict = result.b_ge_a(mode)
        if verdict is not None:
            lines.append(f"{mode}-sequence: B >= A on average: {'yes' if verdict else 'NO'}")
    if result.plot:
        lines.append(f"plot: {result.plot}")
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
        result = run(names, Path(args.data), args.engine, tuple(args.strategies.split(",")), args.min_voxels,
                     args.box_margin, Path(args.out) if args.out else None, args.device, args.checkpoint, bar,
                     tuple(m.strip() for m in args.sequences.split(",") if m.strip()) if args.sequences else None)
    finally:
        close()
    emit(args, result.as_dict(), lambda _: format_text(result))
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
    p.add_argument("--sequences",
                   help="single (the prompted sequence), multi (every co-registered sequence of the case) or "
                        "single,multi (default for engines that take several sequences; others: single)")
    p.add_argument("--engine", default="classical")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-voxels", type=int, default=10, help="ignore lesions smaller than this")
    p.add_argument("--box-margin", type=int, default=0, help="enlarge every box by this many voxels")
    p.add_argument("--out", help="folder for the PNG overlays and the Dice plot")
    add_json_flag(p)
    p.set_defaults(func=_run)
