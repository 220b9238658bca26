"""Train or fine-tune a U-Net on labelled cases; writes a ready-to-use model folder.

Output folder ``out``: ``last.pt`` (model + optimizer + scheduler + history, for ``resume``), ``model.pt``
(best weights by validation score, state dict; the last epoch's when there is no validation case) and ``model.json`` (a :class:`ModelEntry` with sha256 and the
best epoch's validation Dice), so ``UNetSegmenter(out)`` works directly.

Loss: ``monai.losses.DiceCELoss``. Sampling: class-balanced crops (``RandCropByLabelClassesd``), 2D axial
slices or 3D patches. Validation: full-case inference on the held-out cases (same code as ``segment``), Dice
per label (and per BraTS region) on the model grid.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import CheckpointError, InputError, WriteError
from ..labels import LABEL_SETS, default_color
from ..outputs import atomic_write
from ..progress import CancelToken, ProgressFn, check, report
from .distributed import DistributedRun, is_main_process, launch
from .data import (CaseFiles, SyntheticSet, TrainingCase, class_indices, discover_cases, load_training_case,
                   make_transforms, pad_case, read_manifest, synthetic_cases)
from .entries import ModelEntry, sha256_file
from .inference import predict_classes, resolve_device
from .networks import build_network, default_spec, load_state, size_divisor
from .postprocess import BRATS_REGIONS

PRESET_ALIASES = {"brats2013": "brats"}


def parse_labels(spec: str) -> list[dict]:
    """A label set of :data:`mrisegassist.labels.LABEL_SETS` (``brats``/``brats2013``, ``ms``, ...) or
    ``"1=necrosis,2=oedema"`` -> label dicts (value, name, color, terminology)."""
    name = PRESET_ALIASES.get(spec, spec)
    if name in LABEL_SETS:
        return [lab.to_json() for lab in LABEL_SETS[name]]
    out = []
    for part in (p for p in spec.split(",") if p.strip()):
        value, _, name = part.partition("=")
        if not value.strip().isdigit() or not name.strip() or int(value) == 0:
            raise InputError(f"bad --labels item {part!r}: expected VALUE=NAME with VALUE >= 1, or a preset "
                             f"({', '.join(LABEL_SETS)})")
        out.append({"value": int(value), "name": name.strip(), "color": list(default_color(int(value)))})
    if not out:
        raise InputError("no labels given")
    return out


@dataclass
class TrainConfig:
    """Training options (the CLI's flags; a recipe's JSON holds the same keys)."""

    out: str = ""
    cases: Optional[str] = None
    manifest: Optional[str] = None
    inputs: list[str] = field(default_factory=lambda: ["flair", "t1c"])
    labels: str = "brats2013"
    remap: dict = field(default_factory=dict)  # source label value -> label value, applied before training
    dims: str = "2d"
    epochs: int = 20
    steps_per_epoch: int = 100
    batch_size: int = 16
    patch: int = 0  # 0: 160 (2D) / 96 (3D)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_cases: list[str] = field(default_factory=list)
    val_fraction: float = 0.25
    val_every: int = 1
    exclude_cases: list[str] = field(default_factory=list)
    spacing: Optional[list] = None  # default [1, 1, null] (2D) / [1, 1, 1] (3D)
    channels: Optional[list[int]] = None
    synthetic: int = 0
    synthetic_kind: str = "glioma"
    synthetic_options: dict = field(default_factory=dict)  # keyword arguments of mrisegassist.synth.make_case
    # further synthetic sets: [{"kind": "lgg", "count": 4, "options": {...}}, ...] (after the one above)
    synthetic_sets: list = field(default_factory=list)
    synthetic_fraction: float = 0.0  # share of samples drawn from synthetic cases (0: uniform over all cases)
    context: int = 0  # 2.5D: neighbouring slices on each side given as extra channels (2D models only)
    augment: str = "standard"  # "standard" | "strong" (see mrisegassist.unet.data.make_transforms)
    tta_flips: list = field(default_factory=list)  # written to model.json: test-time flips, e.g. [[1]] (L-R)
    class_ratios: Optional[list[float]] = None
    regions: Optional[str] = None  # "brats"
    min_component_mm3: float = 0.0
    name: str = ""
    title: str = ""
    description: str = ""
    licence: str = ""
    seed: int = 0
    device: str = "cpu"
    threads: int = 0
    max_minutes: float = 0.0
    resume: bool = False
    nproc: int = 0  # processes (torch.distributed, see .distributed); 0 or 1: this process only

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Options from a JSON object (``comment`` ignored) with ``overrides``; :class:`InputError` naming the file
        when it cannot be read, is not JSON, is not an object or names unknown options."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the training configuration ({exc})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: the training configuration must be a JSON object of options, not a "
                             f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"comment"})
        if unknown:
            raise InputError(f"{path}: unknown training option(s): {', '.join(unknown)}")
        data = {k: v for k, v in data.items() if k in known}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def resolved_patch(self) -> int:
        return self.patch or (160 if self.dims == "2d" else 96)

    def resolved_spacing(self) -> list:
        return self.spacing or ([1.0, 1.0, None] if self.dims == "2d" else [1.0, 1.0, 1.0])

    def synthetic_set_list(self) -> list[SyntheticSet]:
        """The synthetic sets: ``synthetic``/``synthetic_kind``/``synthetic_options`` first, then ``synthetic_sets``."""
        sets = [SyntheticSet.from_dict({"kind": self.synthetic_kind, "count": self.synthetic,
                                        "options": self.synthetic_options})] if self.synthetic else []
        return sets + [SyntheticSet.from_dict(d) for d in self.synthetic_sets]


# ------------------------------------------------------------------------------------------ metrics
def dice_scores(pred: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> dict[int, Optional[float]]:
    """Dice per value (None when the value is absent from both)."""
    out: dict[int, Optional[float]] = {}
    for v in values:
        p, r = pred == v, ref == v
        denom = int(p.sum()) + int(r.sum())
        out[v] = None if denom == 0 else 2.0 * int((p & r).sum()) / denom
    return out


def _mean(values) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else 0.0


def validate(network: torch.nn.Module, cases: Sequence[TrainingCase], labels: list[dict], dims: str,
             device: torch.device, roi: Sequence[int], divisor: int, regions: Optional[str],
             context: int = 0) -> dict:
    """Dice per label (and per BraTS region) of each validation case, on the model grid."""
    network.eval()
    per_case = {}
    values = [int(lab["value"]) for lab in labels]
    for case in cases:
        classes, _ = predict_classes(network, case.image, case.fg, dims, device, roi, divisor, context=context)
        lut = np.array([0] + values)
        pred, ref = lut[classes], lut[case.label]
        scores = {lab["name"]: d for lab, d in zip(labels, dice_scores(pred, ref, values).values())}
        result = {"dice": scores}
        if regions == "brats":
            result["regions"] = {name: dice_scores(np.isin(pred, vals), np.isin(ref, vals), [True])[True]
                                 for name, vals in BRATS_REGIONS.items()}
        per_case[case.name] = result
    score = _mean(_mean((r.get("regions") or r["dice"]).values()) for r in per_case.values())
    network.train()
    return {"score": score, "cases": per_case}


# ------------------------------------------------------------------------------------------ training
def _split(cases: list[CaseFiles], cfg: TrainConfig) -> tuple[list[CaseFiles], list[CaseFiles]]:
    cases = [c for c in cases if c.name not in set(cfg.exclude_cases)]
    if cfg.val_cases:
        unknown = sorted(set(cfg.val_cases) - {c.name for c in cases})
        if unknown:
            raise InputError(f"validation case(s) {', '.join(unknown)} not found among "
                             f"{', '.join(c.name for c in cases)}")
        val = [c for c in cases if c.name in cfg.val_cases]
    else:
        n_val = int(round(len(cases) * cfg.val_fraction)) if len(cases) > 1 else 0
        val = random.Random(cfg.seed).sample(cases, n_val) if n_val else []
    train = [c for c in cases if c not in val]
    if not train:
        raise InputError("no training cases left after the validation split")
    return train, val


#: Keys of the training checkpoint ``last.pt`` (what ``resume`` reads).
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "best", "history", "spec")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``), or the state dict of a
    weights file; :class:`CheckpointError` naming ``path`` when it cannot be loaded that way (truncated, not a
    checkpoint, pickled objects)."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, zip errors, EOFError, unsupported globals
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint ({type(exc).__name__}: "
                              f"{first[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(data).__name__}, not a dict)")
    return data


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write ``payload`` (a state dict, or a dict whose ``"model"`` is one) with ``torch.save`` atomically: the
    temporary file is loaded back (weights only) and its tensors compared before it replaces ``path``; a failed or
    incomplete write raises :class:`WriteError` and keeps the previous file."""
    model = payload.get("model", payload)
    expected = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}

    def verify(tmp: Path) -> None:
        try:
            back = load_checkpoint(tmp)
        except CheckpointError as exc:
            raise WriteError(str(exc)) from None
        got = back.get("model", back) if "model" in payload else back
        if not isinstance(got, dict) or not _same_tensors(expected, {k: v for k, v in got.items()
                                                                     if isinstance(v, torch.Tensor)}):
            raise WriteError(f"{path.name}: the weights read back differ from those written")
        if set(payload) - set(back):
            raise WriteError(f"{path.name}: read back without {', '.join(sorted(set(payload) - set(back)))}")

    return atomic_write(path, lambda tmp: torch.save(payload, tmp), verify)


def _checkpoint(path: Path, payload: dict) -> None:
    if not is_main_process():
        return
    save_checkpoint(path, payload)


def _resume_state(path: Path, spec: dict) -> dict:
    """The training checkpoint ``path`` to resume from, checked: loadable, complete, same architecture."""
    if not path.is_file():
        raise InputError(f"--resume: no checkpoint {path} to resume from")
    state = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint to resume from (no {', '.join(missing)})")
    if state.get("spec") != spec:
        raise CheckpointError(f"{path}: checkpoint architecture {state.get('spec')} differs from the "
                              f"requested one {spec} (inputs/labels/dims must match to resume)")
    return state


def train(cfg: TrainConfig, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
          log: Callable[[str], None] = print) -> dict:
    """Train per ``cfg``; returns a summary (epochs run, best score, output paths, validation figures)."""
    run = DistributedRun.from_env()  # torchrun / launch(); see .distributed
    if cfg.nproc > 1 and not run.active:
        return launch(cfg, show_progress=progress is not None, verbose=log is print)
    if not cfg.out:
        raise InputError("no output folder given (--out)")
    if cfg.dims not in ("2d", "3d"):
        raise InputError(f"--model-dim must be 2d or 3d, got {cfg.dims!r}")
    if cfg.epochs < 1 or cfg.steps_per_epoch < 1 or cfg.batch_size < 1:
        raise InputError("epochs, steps per epoch and batch size must be >= 1")
    if not 0.0 <= cfg.synthetic_fraction <= 1.0:
        raise InputError(f"synthetic_fraction must be in [0, 1], got {cfg.synthetic_fraction}")
    labels = parse_labels(cfg.labels)
    values = [int(lab["value"]) for lab in labels]
    n_classes = len(labels) + 1
    remap = {int(k): int(v) for k, v in cfg.remap.items()}
    if cfg.manifest:
        files = read_manifest(Path(cfg.manifest))
    elif cfg.cases:
        files = discover_cases(Path(cfg.cases))
    else:
        raise InputError("give --cases DIR or --manifest CSV")
    train_files, val_files = _split(files, cfg)
    out = Path(cfg.out)
    if cfg.context and cfg.dims != "2d":
        raise InputError("context (neighbouring slices, 2.5D) needs a 2D model")
    spec = default_spec(cfg.dims, len(cfg.inputs) * (2 * cfg.context + 1), n_classes)
    if cfg.channels:
        spec["channels"], spec["strides"] = list(cfg.channels), [2] * (len(cfg.channels) - 1)
    last_path = out / "last.pt"
    resumed = _resume_state(last_path, spec) if cfg.resume else None  # checked before any work
    out.mkdir(parents=True, exist_ok=True)
    device = run.setup(resolve_device(cfg.device))
    progress, log = (progress, log) if run.is_main else (None, lambda message: None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    spacing = cfg.resolved_spacing()
    norm = {n: "zscore" for n in cfg.inputs}

    def load(group: list[CaseFiles], start: float, stop: float) -> list[TrainingCase]:
        loaded = []
        for n, f in enumerate(group):
            check(cancel)
            report(progress, start + (stop - start) * n / max(len(group), 1), f"loading {f.name}")
            loaded.append(load_training_case(f, cfg.inputs, spacing, norm, values, remap))
        return loaded

    train_cases = load(train_files, 0.0, 0.02)
    synthetic: list[TrainingCase] = []
    for n_set, synth_set in enumerate(cfg.synthetic_set_list()):  # distinct seeds per set
        check(cancel)
        report(progress, 0.02, f"synthetic {synth_set.kind} cases")
        synthetic += synthetic_cases(synth_set.kind, synth_set.count, 1000 + cfg.seed + 200 * n_set, cfg.inputs,
                                     spacing, norm, values, dict(synth_set.options))
    n_real = len(train_cases)
    train_cases += synthetic
    val_cases = load(val_files, 0.02, 0.04)
    train_cases = [pad_case(c, cfg.resolved_patch(), cfg.dims) for c in train_cases]
    for case in train_cases:
        case.indices = class_indices(case, n_classes)
    log(f"training on {len(train_cases)} case(s): {', '.join(c.name for c in train_cases)}; validating on "
        f"{', '.join(c.name for c in val_cases) or 'none'}")

    torch.manual_seed(cfg.seed)  # reproducible initial weights
    network = build_network(spec).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model = run.wrap(network)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    history: list[dict] = []
    best_score, start_epoch, minutes_before = -1.0, 0, 0.0
    if resumed is not None:
        state = resumed
        load_state(network, state["model"], str(last_path))
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{last_path}: optimizer state does not fit ({exc})") from None
        history, best_score, start_epoch = list(state["history"]), float(state["best"]), int(state["epoch"])
        minutes_before = float(history[-1]["minutes"]) if history else 0.0
        log(f"resumed from {last_path} after epoch {start_epoch} (best score {best_score:.3f})")

    transforms = make_transforms(cfg.dims, cfg.resolved_patch(), n_classes, cfg.class_ratios, cfg.context,
                                 cfg.augment, len(cfg.inputs))
    transforms.set_random_state(seed=cfg.seed + start_epoch)
    rng = random.Random(cfg.seed + start_epoch)
    torch.manual_seed(cfg.seed + start_epoch)
    roi = [cfg.resolved_patch()] * 3
    divisor = size_divisor(spec)
    t_start = time.perf_counter()

    def minutes() -> float:
        return run.same(minutes_before + (time.perf_counter() - t_start) / 60)

    def out_of_time() -> bool:
        return bool(cfg.max_minutes) and minutes() > cfg.max_minutes

    def pick() -> TrainingCase:
        """A training case: synthetic with probability ``synthetic_fraction`` (when set), else uniform."""
        if 0 < cfg.synthetic_fraction and 0 < n_real < len(train_cases):
            synth = rng.random() < cfg.synthetic_fraction
            return rng.choice(train_cases[n_real:] if synth else train_cases[:n_real])
        return rng.choice(train_cases)

    network.train()
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        losses = []
        for step in range(cfg.steps_per_epoch):
            check(cancel)
            # cosine decay over the steps or over the time budget, whichever runs out first
            fraction = (epoch - 1) * cfg.steps_per_epoch + step
            fraction = max(fraction / total_steps, minutes() / cfg.max_minutes if cfg.max_minutes else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))
            done = (epoch - 1 - start_epoch) * cfg.steps_per_epoch + step
            report(progress, 0.05 + 0.95 * done / max((cfg.epochs - start_epoch) * cfg.steps_per_epoch, 1),
                   f"epoch {epoch}/{cfg.epochs} loss {np.mean(losses[-20:]) if losses else float('nan'):.3f}")
            samples = [transforms({"image": c.image, "label": c.label[None], "indices": c.indices})[0]
                       for c in (pick() for _ in range(cfg.batch_size))]
            x = torch.stack([s["image"] for s in samples]).float().to(device)
            y = torch.stack([s["label"] for s in samples]).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = run.loss(loss_fn, model, x, y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if out_of_time():
                break
        record: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "steps": len(losses),
                                  "lr": optimizer.param_groups[0]["lr"], "minutes": minutes()}
        last = epoch == cfg.epochs or out_of_time()
        if val_cases and (epoch % max(cfg.val_every, 1) == 0 or last):
            record["validation"] = validate(network, val_cases, labels, cfg.dims, device, roi, divisor, cfg.regions,
                                            cfg.context)
            score = record["validation"]["score"]
        else:
            score = None
        history.append(record)
        log(f"epoch {epoch}: loss {record['loss']:.4f}, {record['minutes']:.1f} min" +
            (f", validation score {score:.3f}" if score is not None else ""))
        if (score is not None and score > best_score) or not val_cases:  # no validation case: the last epoch
            best_score = score if score is not None else best_score
            _write_model(out, network, spec, cfg, labels, train_cases, val_cases, record, spacing, norm)
        _checkpoint(last_path, {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                                "epoch": epoch, "best": best_score,
                                "history": history, "spec": spec, "config": _json_safe(asdict(cfg))})
        if out_of_time():
            log(f"stopping after epoch {epoch}: time limit of {cfg.max_minutes} min reached")
            break
    report(progress, 1.0, "done")
    return {"out": str(out), "epochs": epoch, "best_score": best_score, "history": history,
            "model": str(out / "model.json"), "checkpoint": str(last_path)}


def _json_safe(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _write_model(out: Path, network: torch.nn.Module, spec: dict, cfg: TrainConfig, labels: list[dict],
                 train_cases: Sequence[TrainingCase], val_cases: Sequence[TrainingCase], record: dict,
                 spacing: list, norm: dict) -> None:
    if not is_main_process():
        return
    weights = out / "model.pt"
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    save_checkpoint(weights, state)
    entry = ModelEntry(
        name=cfg.name or out.name, title=cfg.title or cfg.name or out.name, kind="checkpoint", inputs=list(cfg.inputs),
        labels=labels, label_mapping={str(c): int(lab["value"]) for c, lab in enumerate(labels, start=1)},
        spacing=spacing, normalization=norm, dims=cfg.dims, roi_size=[cfg.resolved_patch()] * 3,
        licence=cfg.licence, sha256=sha256_file(weights), weights="model.pt", description=cfg.description,
        regions=cfg.regions, min_component_mm3=cfg.min_component_mm3, network=spec, context=cfg.context,
        tta_flips=[list(f) for f in cfg.tta_flips],
        training={"cases": [c.name for c in train_cases], "validation_cases": [c.name for c in val_cases],
                  "epoch": record["epoch"], "loss": record["loss"], "minutes": round(record["minutes"], 2),
                  "steps_per_epoch": cfg.steps_per_epoch, "batch_size": cfg.batch_size,
                  "patch": cfg.resolved_patch(), "lr": cfg.lr, "seed": cfg.seed, "synthetic": cfg.synthetic,
                  "synthetic_kind": cfg.synthetic_kind, "synthetic_options": dict(cfg.synthetic_options),
                  "synthetic_sets": [dict(kind=s.kind, count=s.count, options=dict(s.options))
                                     for s in cfg.synthetic_set_list()],
                  "synthetic_fraction": cfg.synthetic_fraction, "augment": cfg.augment, "context": cfg.context,
                  "epochs": cfg.epochs},
        validation=record.get("validation", {}), folder=out)
    entry.write(out)
