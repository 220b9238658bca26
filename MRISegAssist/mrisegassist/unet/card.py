"""Install a cross-validated recipe as a shipped model: the ensemble of its leave-one-case-out fold models, with a
generated ``MODEL_CARD.md``.

Run by ``recipes/train_default_models.sh`` after :mod:`mrisegassist.unet.crossval`::

    python -m mrisegassist.unet.card build/cv/glioma-2d --install MRISegAssist/mrisegassist/models/glioma-2d \\
        --recipe glioma-2d.json --before build/cv/glioma-2d-before --check-synthetic lgg:3,glioma:2 \\
        --aurora ../shared/data/brats-met-aurora

Each fold model (trained on every real case but one) becomes an ensemble member ``fold-<case>.pt``; the member's
held-out case and its scores there (expert labels) are recorded in ``model.json`` (``validation
["cross_validation"]``), so the shipped files reproduce every cross-validated figure. Whether the ensemble helps
is checked on cases no member was trained on: seeded synthetic cases with exact labels and, for gliomas, the
``brats-met-aurora`` case against the AURORA model's output (NOT expert labels). Every figure in the card comes
from these evaluations; nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, WriteError
from ..outputs import atomic_write, write_text
from ..volume import load_case, read_volume, resample_to
from .crossval import CrossValidation, load_results, score_case
from .data import find_case_files
from .entries import ModelEntry, get_model, sha256_file
from .inference import UNetSegmenter

# Secondary check: agreement with another model's output (AURORA, NOT expert labels) on a raw int16 case.
AURORA_REGIONS = {"whole tumour": ((1, 2, 3, 4), (1, 2)), "tumour core": ((1, 3, 4), (1,))}
CHECK_SEED = 5000  # synthetic check cases use seeds from here on; training sets use 1000 + seed + 200 * set

# Provenance and terms of the anatomy inside synthetic training cases (mrisegassist.synth).
TEMPLATE_NOTICE = (
    "Synthetic cases are simulated by `mrisegassist.synth` from the MNI ICBM152 2009a symmetric template (T1 and "
    "grey/white-matter maps) that ships inside the nilearn wheel (nilearn is BSD-3-Clause; its description of the "
    "template lists the licence as \"unknown\"). The template's own terms (COPYING of the ICBM 2009 release): "
    "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, "
    "McGill University; permission to use, copy, modify and distribute for any purpose and without fee, provided "
    "that this copyright notice appears in all copies; provided \"as is\" without warranty. Cite Fonov et al. "
    "2009/2011 and Collins et al. 1999. No template voxels are stored in the weights.")


def member_entry(entry: ModelEntry, member: dict) -> ModelEntry:
    """The single fold model ``member`` (one of ``entry.members``, or the first) of an installed ensemble."""
    single = entry.member(member["weights"])
    if single is None:
        raise InputError(f"{entry.folder}: {member['weights']} is not a member of model {entry.name!r}")
    return single


def fold_members(entry: ModelEntry) -> list[dict]:
    """``[{"weights", "sha256", "held_out"}]`` for every member of an installed ensemble (first = ``weights``)."""
    first = {"weights": entry.weights, "sha256": entry.sha256,
             "held_out": entry.training.get("first_member_held_out", "")}
    return [first] + [dict(m) for m in entry.members]


def held_out_member(entry: ModelEntry, case: str) -> Optional[ModelEntry]:
    """The member of an installed fold ensemble that was not trained on ``case`` (its fold model), or None: the
    model to use when a check must run on a case the model has not seen (the ensemble has seen every case)."""
    for member in fold_members(entry):
        if member.get("held_out") == case:
            return member_entry(entry, member)
    return None


# ------------------------------------------------------------------------------------------ checks
def _dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    denom = float(a.sum() + b.sum())
    return None if denom == 0 else round(2.0 * float((a & b).sum()) / denom, 4)


def synthetic_check(entries: dict[str, ModelEntry], kinds: dict[str, int]) -> dict:
    """Scores of each entry (members and the ensemble) on seeded synthetic cases none was trained on (exact
    labels): ``{case: {entry name: scores}}``."""
    from ..synth import make_case

    out: dict = {}
    segmenters = {name: UNetSegmenter(e) for name, e in entries.items()}
    for kind, count in kinds.items():
        for seed in range(CHECK_SEED, CHECK_SEED + count):
            case = make_case(kind, seed)
            name = f"synthetic-{kind}-{seed}"
            out[name] = {}
            for label, seg in segmenters.items():
                images = {n: case.images[n] for n in seg.inputs}
                labelmap = seg.segment(load_case(images, seg.inputs[0]))
                out[name][label] = score_case(seg.entry, labelmap, case.labels)
    return out


def aurora_agreement(entries: dict[str, ModelEntry], folder: Path) -> dict:
    """Dice of whole tumour / tumour core against ``brats-met-aurora``'s AURORA model output (not expert)."""
    files = find_case_files(folder)
    ref_path = folder / "model_output_labels.nii.gz"
    if files is None or not ref_path.is_file():
        raise InputError(f"{folder}: not the brats-met-aurora folder (no model_output_labels.nii.gz)")
    out = {}
    for label, entry in entries.items():
        seg = UNetSegmenter(entry)
        case = load_case({n: files.images[n] for n in seg.inputs}, seg.inputs[0])
        pred = seg.segment(case).volume.array
        ref = resample_to(read_volume(ref_path, kind="label"), case.geometry, "nearest").array
        out[label] = {f"Dice {name}": _dice(np.isin(pred, ours), np.isin(ref, theirs))
                      for name, (ours, theirs) in AURORA_REGIONS.items()}
    return out


# ------------------------------------------------------------------------------------------ install
def build_ensemble(cv_dir: Path, target: Path, recipe: str) -> ModelEntry:
    """Copy the fold models of ``cv_dir`` into ``target`` as ``fold-<case>.pt`` and return the ensemble entry
    (not yet written). Every fold must be finished and the folds must share inputs, labels and network."""
    cv = load_results(cv_dir)
    folds = {f.held_out: f for f in cv.folds}
    entries = [get_model(cv_dir / f"fold-{name}") for name in sorted(folds)]
    if not entries:
        raise InputError(f"{cv_dir}: no finished folds")
    first = entries[0]
    for e in entries[1:]:
        if (e.network, e.inputs, e.labels, e.context) != (first.network, first.inputs, first.labels, first.context):
            raise InputError(f"{cv_dir}: fold models differ in network, inputs, labels or context")
    target.mkdir(parents=True, exist_ok=True)
    members = []
    for name, e in zip(sorted(folds), entries):
        e.verify()
        dst = f"fold-{name}.pt"
        copy_verified(e.weights_path, target / dst, e.sha256 or sha256_file(e.weights_path))
        members.append({"weights": dst, "sha256": sha256_file(target / dst), "held_out": name})
    state = torch.load(str(target / members[0]["weights"]), map_location="cpu", weights_only=True)
    training = dict(first.training)
    training.update(recipe=recipe, cross_validation_dir=str(cv_dir), parameters=int(sum(v.numel() for v in state.values())),
                    first_member_held_out=members[0]["held_out"],
                    members={m["held_out"]: {"cases": [c for c in e.training.get("cases", [])],
                                             "minutes": e.training.get("minutes")}
                             for m, e in zip(members, entries)},
                    minutes_total=round(sum(float(e.training.get("minutes") or 0) for e in entries), 1))
    training.pop("cases", None)
    training.pop("validation_cases", None)
    training.pop("minutes", None)
    return replace(first, weights=members[0]["weights"], sha256=members[0]["sha256"], members=members[1:],
                   training=training, validation={"cross_validation": cv.to_dict()}, folder=target)


def copy_verified(source: Path, target: Path, sha256: str) -> Path:
    """Copy ``source`` to ``target`` atomically; the copy's sha256 must be ``sha256`` before it replaces ``target``."""
    def verify(tmp: Path) -> None:
        if sha256_file(tmp) != sha256:
            raise WriteError(f"{target.name}: the copy's sha256 differs from {source.name}'s")

    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), verify)


def install(cv_dir: Path, target: Path, recipe: str, before: Optional[Path] = None,
            synthetic: Optional[dict[str, int]] = None, aurora: Optional[Path] = None,
            previous: Optional[Path] = None) -> ModelEntry:
    """Build the ensemble (:func:`build_ensemble`), run the checks (also on the ``previous`` shipped model, for
    comparison), write ``model.json`` and ``MODEL_CARD.md``."""
    entry = build_ensemble(cv_dir, target, recipe)
    if before is not None:
        entry.validation["before"] = load_results(before).to_dict()
    singles = {f"member held out {m['held_out']}": member_entry(entry, m) for m in fold_members(entry)}
    checks = dict(singles, ensemble=entry)
    if previous is not None:
        checks["previous shipped model"] = get_model(previous)
    if synthetic:
        entry.validation["synthetic_check"] = synthetic_check(checks, synthetic)
    if aurora is not None:
        entry.validation["aurora_check"] = aurora_agreement(checks, aurora)
    entry.write(target)
    write_text(target / "MODEL_CARD.md", render_card(entry))
    keep = {m["weights"] for m in fold_members(entry)}
    for stale in target.glob("*.pt"):  # weights of a model installed here before
        if stale.name not in keep:
            stale.unlink()
    return entry


# --------------------------------------------------------------------------------------------- card
def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cv_from(data: dict) -> CrossValidation:
    from .crossval import FoldResult

    return CrossValidation(data["recipe"], data["cases"], [FoldResult.from_dict(f) for f in data["folds"]])


def _check_table(check: dict, title: str) -> list[str]:
    """Per case: each member's scores, the ensemble's (and the previous model's)."""
    lines = [title, ""]
    for case, by_model in check.items():
        names = list(next(iter(by_model.values())))
        lines += [f"| {case} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for model, scores in by_model.items():
            lines.append(f"| {model} | " + " | ".join(_fmt(scores.get(n)) for n in names) + " |")
        lines.append("")
    return lines


def ensemble_gain(check: dict) -> dict[str, float]:
    """Mean over check cases of (ensemble score - mean member score), per Dice score."""
    gains: dict[str, list[float]] = {}
    for by_model in check.values():
        members = [s for m, s in by_model.items() if m.startswith("member")]
        for name, value in by_model["ensemble"].items():
            vals = [s[name] for s in members if s.get(name) is not None]
            if name.startswith("Dice") and value is not None and vals:
                gains.setdefault(name, []).append(value - float(np.mean(vals)))
    return {k: round(float(np.mean(v)), 4) for k, v in gains.items()}


def render_card(entry: ModelEntry) -> str:
    """Markdown model card from ``model.json`` (figures from the cross-validation and the checks)."""
    t, spec, v = entry.training, entry.network, entry.validation
    members = fold_members(entry)
    cv = _cv_from(v["cross_validation"])
    depth = 2 * entry.context + 1
    synth = [f"{s['count']} `{s['kind']}`" + (f" ({', '.join(f'{k}={x}' for k, x in s['options'].items())})"
                                              if s.get("options") else "") for s in t.get("synthetic_sets", [])]
    lines = [f"# {entry.title_or_name}", "",
             "**NOT FOR CLINICAL USE.** Research and demonstration model trained on very few real cases; it will "
             "miss or invent lesions on scans unlike its training data.", "", entry.description, "", "## Model", "",
             f"- Name: `{entry.name}`; an ensemble of {len(members)} fold models "
             + ", ".join(f"`{m['weights']}` (sha256 `{m['sha256'][:16]}...`)" for m in members),
             f"- Architecture (each member): MONAI `UNet`, 2D slice-wise, channels {spec.get('channels')}, strides "
             f"{spec.get('strides')}, {spec.get('num_res_units')} residual units, {spec.get('norm')} norm, "
             f"{t.get('parameters', 0) / 1e6:.2f} M parameters",
             f"- Inputs (channel order): {', '.join(entry.inputs)}, each with its {entry.context} neighbouring "
             f"slice(s) below and above ({len(entry.inputs) * depth} channels, 2.5D); each sequence z-scored inside "
             f"its own foreground (non-background voxels), background 0, clipped to [-8, 8]",
             f"- Model grid: axis-aligned LPS at {entry.spacing} mm (null = native slice spacing); outputs "
             f"resampled back to the reference sequence's grid",
             "- Labels: " + ", ".join(f"{lab['value']} {lab['name']}" for lab in entry.labels),
             f"- Inference: mean softmax of the {len(members)} members"
             + (f" and of test-time flips {entry.tta_flips} (in-plane axes; [1] = left-right)" if entry.tta_flips else ""),
             f"- Post-processing: connected components smaller than {entry.min_component_mm3:g} mm³ removed",
             f"- Licence: {entry.licence}", "", "## Training", "",
             f"- Recipe: `recipes/{t.get('recipe')}` via `recipes/train_default_models.sh` (leave-one-case-out "
             f"`python -m mrisegassist.unet.crossval`, then this ensemble), seed {t.get('seed')}"]
    for m in members:
        info = t.get("members", {}).get(m["held_out"], {})
        real = [c for c in info.get("cases", []) if not c.startswith("synthetic-")]
        lines.append(f"- `{m['weights']}`: trained on {', '.join(real)} (expert labels), not on {m['held_out']}; "
                     f"{info.get('minutes')} min")
    if synth:
        lines.append(f"- Plus seeded synthetic cases (exact labels, `mrisegassist.synth.make_case`): {', '.join(synth)}"
                     f"; {t.get('synthetic_fraction', 0):.0%} of the training samples")
        lines.append(f"- {TEMPLATE_NOTICE}")
    lines += [f"- {t.get('epochs')} epochs of {t.get('steps_per_epoch')} steps, batch {t.get('batch_size')}, "
              f"{t.get('patch')}² patches, AdamW lr {t.get('lr')} with cosine decay, DiceCE loss; no validation "
              f"case (the last epoch is kept); {t.get('minutes_total')} min in all on 2 shared CPU cores",
              "- Augmentation (`strong`): class-balanced crops; per sequence, alike on its neighbouring slices: gamma, "
              "histogram shift, bias field, intensity scale and shift; then Gaussian noise, in-plane blur, "
              "left-right and anterior-posterior flips, rotation and scaling (MONAI transforms)", "",
              "## Cross-validated accuracy (each member on the real case it was not trained on; expert labels)", "",
              cv.table(f"recipes/{t.get('recipe')}"), "",
              f"Printed by `python -m mrisegassist.unet.crossval --out {t.get('cross_validation_dir')} --report` "
              f"after `recipes/train_default_models.sh`."]
    if v.get("before"):
        lines += ["", "### Previous recipe (the model shipped before this one)", "",
                  _cv_from(v["before"]).table("previous recipe"), ""]
    if v.get("synthetic_check"):
        gain = ensemble_gain(v["synthetic_check"])
        lines += ["", "## Does the ensemble help? (cases no member was trained on; NOT expert data)", "",
                  "Synthetic cases with held-out seeds (exact labels). Mean gain of the ensemble over the mean of its "
                  "members: " + ", ".join(f"{k} {g:+.3f}" for k, g in gain.items()) + "."
                  + (" The previously shipped model is shown for comparison." if any(
                      "previous shipped model" in c for c in v["synthetic_check"].values()) else ""), ""]
        lines += _check_table(v["synthetic_check"], "Dice per held-out synthetic case:")
    if v.get("aurora_check"):
        lines += ["Raw int16 BraTS-METS case (`brats-met-aurora`), Dice against the AURORA model's output, which is "
                  "NOT expert ground truth (a metastasis, unlike the glioma training data):", "",
                  "| model | " + " | ".join(AURORA_REGIONS) + " |", "|---|" + "---|" * len(AURORA_REGIONS)]
        for model, scores in v["aurora_check"].items():
            lines.append(f"| {model} | " + " | ".join(_fmt(scores.get(f'Dice {n}')) for n in AURORA_REGIONS) + " |")
        lines.append("")
    lines += ["", "## Limitations", "",
              "- Trained on very few real cases from one dataset; expect lower accuracy on other scanners, protocols, "
              "resolutions and pathologies. The cross-validated figures come from one held-out case per fold.",
              "- 2.5D slice-wise: only one neighbouring slice of through-plane context on each side; thick-slice "
              "scans are segmented on their native slices.",
              "- Needs co-registered, skull-stripped inputs (BraTS-style preprocessing).",
              "- NOT FOR CLINICAL USE.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cv", help="cross-validation folder (python -m mrisegassist.unet.crossval --out ...)")
    parser.add_argument("--install", required=True, help="target folder, e.g. MRISegAssist/mrisegassist/models/X")
    parser.add_argument("--recipe", default="", help="recipe config file name recorded in the card")
    parser.add_argument("--before", help="cross-validation folder of the previous recipe (shown for comparison)")
    parser.add_argument("--check-synthetic", default="", metavar="KIND:N,...",
                        help="ensemble check on N held-out synthetic cases of each kind, e.g. lgg:3,glioma:2")
    parser.add_argument("--aurora", help="brats-met-aurora folder for the secondary (non-expert) check")
    parser.add_argument("--previous", help="the previously shipped model folder, run through the same checks")
    args = parser.parse_args(argv)
    kinds = {k: int(n) for k, n in (p.split(":") for p in args.check_synthetic.split(",") if p)}
    entry = install(Path(args.cv), Path(args.install), args.recipe, Path(args.before) if args.before else None,
                    kinds, Path(args.aurora) if args.aurora else None,
                    Path(args.previous) if args.previous else None)
    print(json.dumps({k: v for k, v in entry.validation.items() if k != "cross_validation"}, indent=2))
    print(render_card(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
