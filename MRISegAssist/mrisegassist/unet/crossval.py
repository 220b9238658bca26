"""Leave-one-case-out cross-validation of a training recipe on labelled real cases.

For every real labelled case ``h`` of the recipe's cases folder, the recipe is trained on all the other cases
(plus its synthetic cases), with no validation case and no model selection (the last epoch is kept, so the
held-out case influences nothing), then the fold model segments ``h`` from its files through the same pipeline
as ``mrisegassist segment`` and is scored against ``h``'s expert labels. Each fold is written to
``OUT/fold-<h>/`` (the model, ``last.pt`` and ``fold.json``); a finished fold is not trained again, so a run
can be stopped and restarted, and folds can run as separate processes (``--folds``).

Usage (run by ``recipes/train_default_models.sh``)::

    python -m mrisegassist.unet.crossval --config recipes/glioma-2d.json --cases ../shared/data/brats2013-deepmedic \\
        --out build/cv/glioma-2d                       # train + evaluate every fold
    python -m mrisegassist.unet.crossval --out build/cv/glioma-2d --report   # print the table again
    python -m mrisegassist.unet.crossval --out build/cv/glioma-2d --report --ensemble   # + nested ensemble rows

Scores: BraTS-region Dice (whole tumour, tumour core, enhancing tumour) and the predicted enhancing-tumour
volume for ``regions == "brats"`` models; otherwise Dice of each label, lesion-wise F1 and volumes.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..metrics import evaluate_labels
from ..outputs import write_json
from ..volume import Volume, read_volume, resample_to
from .data import CaseFiles, discover_cases, read_manifest
from .entries import ModelEntry, get_model
from .postprocess import BRATS_REGIONS

FOLD_FILE = "fold.json"


@dataclass
class FoldResult:
    """One fold: the held-out case, what was trained on, and the held-out scores (expert labels)."""

    held_out: str
    training_cases: list[str]
    minutes: float
    epochs: int
    scores: dict[str, Optional[float]]  # metric name -> value (Dice, lesion F1, volumes in ml)
    labels: str = "expert"
    note: str = ""  # e.g. a fold filled by an existing model rather than trained here

    @classmethod
    def from_dict(cls, data: dict) -> "FoldResult":
        return cls(**data)


@dataclass
class CrossValidation:
    """All folds of one recipe; :meth:`summary` gives mean and sample standard deviation per score."""

    recipe: str
    cases: str
    folds: list[FoldResult] = field(default_factory=list)

    def summary(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name in self.score_names():
            values = [f.scores[name] for f in self.folds if f.scores.get(name) is not None]
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[name] = (float(np.mean(values)), sd)
        return out

    def score_names(self) -> list[str]:
        names: list[str] = []
        for f in self.folds:
            names += [n for n in f.scores if n not in names]
        return names

    def table(self, title: str = "") -> str:
        """Markdown table: one row per fold, then mean ± sd."""
        names = self.score_names()
        head = [f"**{title or self.recipe}** (leave-one-case-out on {self.cases}; expert labels; "
                f"{len(self.folds)} folds)", "",
                "| held-out case | " + " | ".join(names) + " | train min |",
                "|---|" + "---|" * (len(names) + 1)]
        rows = [f"| {f.held_out}{' *' if f.note else ''} | " + " | ".join(_fmt(f.scores.get(n)) for n in names)
                + f" | {f.minutes:.0f} |" for f in self.folds]
        summary = self.summary()
        rows.append("| **mean ± sd** | " + " | ".join(
            f"{summary[n][0]:.3f} ± {summary[n][1]:.3f}" if n in summary else "n/a" for n in names) + " | "
            f"{sum(f.minutes for f in self.folds):.0f} total |")
        notes = [f"\n\\* {f.held_out}: {f.note}" for f in self.folds if f.note]
        return "\n".join(head + rows + notes)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "cases": self.cases, "folds": [asdict(f) for f in self.folds],
                "summary": {k: {"mean": m, "sd": s} for k, (m, s) in self.summary().items()}}


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def score_case(entry: ModelEntry, labelmap, reference: Union[Path, Volume]) -> dict[str, Optional[float]]:
    """Held-out scores of one predicted label map against a reference label map (a file or a Volume),
    resampled onto the prediction's grid when needed."""
    ref = reference if isinstance(reference, Volume) else read_volume(reference, kind="label")
    geometry = labelmap.volume.geometry
    if not ref.geometry.same_as(geometry):
        ref = resample_to(ref, geometry, "nearest")
    brats = entry.regions == "brats"
    m = evaluate_labels(labelmap.volume.array, ref.array, geometry.spacing, labels=labelmap.labels,
                        regions=BRATS_REGIONS if brats else None, lesionwise=not brats, distances=False)
    if brats:
        scores = {f"Dice {name}": m["regions"][name]["dice"] for name in BRATS_REGIONS}
        et = m["regions"]["enhancing tumour"]
        scores["ET ml predicted"] = et["volume_pred_ml"]
        scores["ET ml reference"] = et["volume_ref_ml"]
        return scores
    scores = {}
    for name, v in m["labels"].items():
        scores[f"Dice {name}"] = v["dice"]
        scores["lesion F1"] = v["lesions"]["lesion_f1"]
        scores["ml predicted"] = v["volume_pred_ml"]
        scores["ml reference"] = v["volume_ref_ml"]
    return scores


def segment_case(entry: ModelEntry, files: CaseFiles, device: str = "cpu", network=None):
    """Label map of one case from its files (the ``segment`` pipeline)."""
    from .inference import UNetSegmenter, load_model_case

    segmenter = UNetSegmenter(entry, device, network=network)
    return segmenter.segment(load_model_case(segmenter, files.images))


def _labelled(cfg) -> list[CaseFiles]:
    files = read_manifest(Path(cfg.manifest)) if cfg.manifest else discover_cases(Path(cfg.cases))
    return [f for f in files if f.labels is not None and f.name not in set(cfg.exclude_cases)]


def run_fold(cfg, held_out: CaseFiles, out: Path, log: Callable[[str], None] = print) -> FoldResult:
    """Train ``cfg`` without ``held_out`` into ``out`` (resuming an interrupted run), then score ``held_out``."""
    from .train import train

    done = out / FOLD_FILE
    if done.is_file():
        return FoldResult.from_dict(json.loads(done.read_text()))
    fold_cfg = replace(cfg, out=str(out), val_cases=[], val_fraction=0.0,
                       exclude_cases=list(cfg.exclude_cases) + [held_out.name],
                       resume=(out / "last.pt").is_file())
    t0 = time.perf_counter()
    result = train(fold_cfg, log=lambda m: log(f"[{held_out.name}] {m}"))
    entry = get_model(out)
    labelmap = segment_case(entry, held_out, cfg.device)
    fold = FoldResult(held_out.name, list(entry.training.get("cases", [])),
                      round(float(result["history"][-1]["minutes"]) if result["history"] else
                            (time.perf_counter() - t0) / 60, 1),
                      int(result["epochs"]), score_case(entry, labelmap, held_out.labels))
    write_json(done, asdict(fold))
    return fold


def existing_fold(entry: ModelEntry, held_out: CaseFiles, out: Path, note: str) -> FoldResult:
    """A fold filled by an already trained model (e.g. a shipped one) that was not trained on ``held_out``."""
    if held_out.name in entry.training.get("cases", []):
        raise InputError(f"model {entry.name!r} was trained on {held_out.name}: it cannot be its held-out fold")
    labelmap = segment_case(entry, held_out)
    fold = FoldResult(held_out.name, list(entry.training.get("cases", [])), float(entry.training.get("minutes", 0)),
                      int(entry.training.get("epoch", 0)), score_case(entry, labelmap, held_out.labels), note=note)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / FOLD_FILE, asdict(fold))
    return fold


def cross_validate(cfg, out: Path, folds: Optional[Sequence[str]] = None, recipe: str = "",
                   log: Callable[[str], None] = print) -> CrossValidation:
    """Leave-one-case-out over the labelled real cases of ``cfg`` (a :class:`~mrisegassist.unet.train.TrainConfig`);
    ``folds``: only these held-out cases (default all). Returns every fold found in ``out`` afterwards."""
    cases = _labelled(cfg)
    if len(cases) < 2:
        raise InputError(f"cross-validation needs at least 2 labelled cases, found {len(cases)}")
    names = [c.name for c in cases]
    unknown = sorted(set(folds or []) - set(names))
    if unknown:
        raise InputError(f"fold(s) {', '.join(unknown)} are not among the labelled cases {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "recipe.json", {"recipe": recipe, "cases": str(cfg.manifest or cfg.cases),
                                     "config": json.loads(json.dumps(asdict(cfg), default=str))})
    for files in cases:
        if folds and files.name not in folds:
            continue
        fold = run_fold(cfg, files, out / f"fold-{files.name}", log)
        log(f"fold {fold.held_out}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in fold.scores.items()))
    return load_results(out)


def load_results(out: Path) -> CrossValidation:
    """The folds finished so far in ``out`` (written by :func:`cross_validate`)."""
    out = Path(out)
    meta_path = out / "recipe.json"
    if not meta_path.is_file():
        raise InputError(f"{out}: not a cross-validation folder (no recipe.json)")
    meta = json.loads(meta_path.read_text())
    folds = [FoldResult.from_dict(json.loads(p.read_text())) for p in sorted(out.glob(f"fold-*/{FOLD_FILE}"))]
    return CrossValidation(meta.get("recipe", ""), Path(meta.get("cases", "")).name, folds)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="training recipe (JSON, as `mrisegassist train --config`)")
    parser.add_argument("--cases", help="cases folder (overrides the recipe's)")
    parser.add_argument("--out", required=True, help="cross-validation folder (one fold-<case>/ per fold)")
    parser.add_argument("--folds", help="comma-separated held-out cases to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe's)")
    parser.add_argument("--existing", help="fill the --folds case(s) with this already trained model folder "
                                           "instead of training (it must not have seen them); needs --note")
    parser.add_argument("--note", default="", help="note printed under the table for --existing folds")
    parser.add_argument("--report", action="store_true", help="print the table of the finished folds and exit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.existing:
        if not (args.config and args.folds and args.note):
            parser.error("--existing needs --config (for the cases), --folds and --note")
        cfg = TrainConfig.from_json(args.config, cases=args.cases)
        entry = get_model(args.existing)
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "recipe.json").is_file():
            write_json(out / "recipe.json", {"recipe": Path(args.config).name, "cases": str(cfg.manifest or cfg.cases)})
        for files in _labelled(cfg):
            if files.name in args.folds.split(","):
                existing_fold(entry, files, out / f"fold-{files.name}", args.note)
    elif not args.report:
        if not args.config:
            parser.error("--config is required unless --report")
        cfg = TrainConfig.from_json(args.config, cases=args.cases, threads=args.threads, out=str(out))
        folds = [s.strip() for s in args.folds.split(",")] if args.folds else None
        cross_validate(cfg, out, folds, recipe=Path(args.config).name)
    result = load_results(out)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
