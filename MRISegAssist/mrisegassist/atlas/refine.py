"""Per-structure thresholds and engine/fusion combination, learnt on the references (never on the target).

For one structure with atlas score map ``s`` (fraction of references labelling the voxel, 0..1) and the
engine's mask ``e`` (its part of the engine's fused label map), the refined mask is

    ``(s >= t_in) & e  |  (s >= t_out) & ~e``

so one rule covers label fusion at threshold ``t`` (``t_in = t_out = t``: the engine ignored), the engine
alone (``t_in = 0``, ``t_out = NEVER``), engine AND fusion (``t_in = t``, ``t_out = NEVER``), engine OR fusion
(``t_in = 0``, ``t_out = t``) and the graded cases between. Overlaps between structures go to the highest score
(as :func:`.boxes.fuse_scores`).

**Learning** (:func:`learn_refinement`): leave-one-source-out over the reference set. References are grouped
by the subject they show (:attr:`.references.Reference.source`: deformed copies share their original's). With
two or more sources, each fold holds out one source's first reference: the other sources' references are
registered onto it exactly as onto a patient (:class:`.space.CommonSpace`), its score maps are computed, the
engine is run on its image with the atlas boxes, and every threshold pair of :data:`GRID` is scored against
its own labels. With a single source, up to ``max_folds`` deformed copies are held out in turn (weaker
evidence: the original stays among the references). Per structure, the fusion threshold and the
``(t_in, t_out)`` pair with the best mean Dice over the folds are kept; a candidate replaces plain fusion at the
structure's own threshold only when it gains more than :data:`MIN_GAIN` (ties keep the atlas). Without any
fold (one reference), every structure keeps plain fusion at its defined threshold.

Results are cached on disk (``cache_dir()/refine``), keyed by the references, structures, registration
settings, engine and strategy; learning never reads a target's labels.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Volume, atomic_write
from .boxes import AtlasBoxes, ScoreMap, boxes_from_scores, score_maps
from .references import ReferenceSet, Structure, cache_dir
from .registration import FAST, RegistrationSettings

#: threshold levels tried (fractions of references); ``NEVER`` (above 1) selects no voxel
NEVER = 2.0
GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, NEVER)
#: a learnt rule replaces plain fusion at the structure's threshold only above this mean Dice gain
MIN_GAIN = 0.01
#: bump when the learning procedure changes, so cached results are redone
VERSION = 1


@dataclass(frozen=True)
class StructureRule:
    """The learnt rule of one structure and its leave-one-out evidence (mean Dice over the folds).

    ``fusion_threshold``: score-map level for label fusion alone; ``t_in`` / ``t_out``: levels inside / outside
    the engine's mask (see the module docstring). ``dice_*``: ``atlas`` = fusion at the structure's defined
    threshold, ``fusion`` = at ``fusion_threshold``, ``engine`` = the engine alone, ``refined`` = the rule."""

    name: str
    fusion_threshold: float
    t_in: float
    t_out: float
    dice_atlas: Optional[float] = None
    dice_fusion: Optional[float] = None
    dice_engine: Optional[float] = None
    dice_refined: Optional[float] = None

    @property
    def kind(self) -> str:
        """``fusion``, ``engine``, ``engine AND fusion``, ``engine OR fusion`` or ``combined``."""
        if self.t_in == self.t_out:
            return "fusion"
        if self.t_out >= NEVER:
            return "engine" if self.t_in <= 0 else "engine AND fusion"
        return "engine OR fusion" if self.t_in <= 0 else "combined"

    def mask(self, score: ScoreMap, engine: Optional[np.ndarray]) -> np.ndarray:
        """Bool ``[k, j, i]`` refined mask of this structure; ``engine=None``: fusion at ``fusion_threshold``."""
        if engine is None:
            return score.mask(self.fusion_threshold)
        full = score.full()
        out = engine & (full >= self.t_in - 1e-6)
        out |= ~engine & (full >= self.t_out - 1e-6)
        return out


@dataclass
class Refinement:
    """Rules of every structure (``rules[name]``) for one reference set and engine, with how they were learnt."""

    engine: str
    rules: dict[str, StructureRule]
    folds: list[str] = field(default_factory=list)
    evidence: str = ""
    seconds: float = 0.0

    def rule(self, structure: Structure) -> StructureRule:
        """The learnt rule, or plain fusion at the structure's own threshold when none was learnt."""
        r = self.rules.get(structure.name)
        if r is None:
            t = structure.threshold
            return StructureRule(structure.name, t, t, t)
        return r

    def to_json(self) -> dict:
        return {"version": VERSION, "engine": self.engine, "folds": self.folds, "evidence": self.evidence,
                "seconds": round(self.seconds, 2), "rules": [asdict(r) for r in self.rules.values()]}

    @classmethod
    def from_json(cls, data: dict) -> "Refinement":
        try:
            rules = {str(r["name"]): StructureRule(**r) for r in data["rules"]}
            return cls(str(data["engine"]), rules, [str(f) for f in data.get("folds", [])],
                       str(data.get("evidence", "")), float(data.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad refinement document: {exc}") from None

    @classmethod
    def fusion_only(cls, structures: Sequence[Structure], engine: str = "", why: str = "") -> "Refinement":
        return cls(engine, {s.name: StructureRule(s.name, s.threshold, s.threshold, s.threshold)
                            for s in structures}, [], why)


# ---------------------------------------------------------------------------------------------- applying
def refine_labels(boxes: AtlasBoxes, engine_labels: Optional[np.ndarray], refinement: Refinement) -> np.ndarray:
    """The refined label map ``uint16 [k, j, i]`` (values = the structures' output values).

    ``boxes``: the target's atlas boxes with their score maps; ``engine_labels``: the engine's fused label map on
    the same grid (values = the same structure values), or ``None`` for label fusion alone at the learnt
    thresholds. A voxel claimed by several structures goes to the highest score (then the first structure)."""
    if boxes.scores is None:
        raise InputError("refinement needs the atlas score maps (boxes read from JSON carry none)")
    shape = boxes.scores[0].shape if boxes.scores else None
    if engine_labels is not None and engine_labels.shape != shape:
        raise InputError(f"engine label map shape {engine_labels.shape} differs from the score maps' {shape}")
    out = np.zeros(shape, np.uint16)
    best = np.full(shape, -1.0, np.float32)
    for score in boxes.scores:
        rule = refinement.rule(score.structure)
        engine = None if engine_labels is None else engine_labels == score.value
        mask = rule.mask(score, engine)
        if not mask.any():
            continue
        level = score.full()
        win = mask & (level > best)
        best[win] = level[win]
        out[win] = score.value
    return out


# ---------------------------------------------------------------------------------------------- learning
def _sources(refset: ReferenceSet) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for n, ref in enumerate(refset.references):
        groups.setdefault(ref.source, []).append(n)
    return groups


def folds(refset: ReferenceSet, max_folds: int = 2) -> list[tuple[int, list[int]]]:
    """``(held-out reference index, reference indices used)`` per fold (see the module docstring)."""
    groups = _sources(refset)
    n = len(refset.references)
    if len(groups) >= 2:
        return [(members[0], [m for m in range(n) if m not in members]) for members in groups.values()]
    copies = [m for m in range(1, n)]  # the first reference (the original) always stays
    return [(m, [x for x in range(n) if x != m]) for m in copies[:max_folds]]


def _key(refset: ReferenceSet, engine: str, settings: RegistrationSettings, strategy: str, max_folds: int) -> str:
    doc = {"v": VERSION, "refs": refset.key, "structures": [s.to_json() for s in refset.structures],
           "engine": engine, "settings": settings.key(), "strategy": strategy, "max_folds": max_folds,
           "grid": GRID, "gain": MIN_GAIN}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _counts(score: ScoreMap, engine: Optional[np.ndarray], truth: np.ndarray) -> dict:
    """Per threshold of :data:`GRID`: voxels and true positives of ``s >= t`` inside / outside the engine mask."""
    full = score.full()
    e = np.zeros(truth.shape, bool) if engine is None else engine
    out = {"truth": int(truth.sum()), "in_n": [], "in_tp": [], "out_n": [], "out_tp": []}
    for t in GRID:
        sel = full >= t - 1e-6
        for part, region in (("in", e), ("out", ~e)):
            m = sel & region
            out[f"{part}_n"].append(int(m.sum()))
            out[f"{part}_tp"].append(int((m & truth).sum()))
    return out


def _dice_table(c: dict) -> np.ndarray:
    """``[t_in, t_out]`` Dice of every threshold pair from :func:`_counts`."""
    n = np.asarray(c["in_n"])[:, None] + np.asarray(c["out_n"])[None, :]
    tp = np.asarray(c["in_tp"])[:, None] + np.asarray(c["out_tp"])[None, :]
    denom = n + c["truth"]
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def choose_rule(structure: Structure, tables: Sequence[np.ndarray], with_engine: bool) -> StructureRule:
    """The rule with the best mean Dice over the folds' ``[t_in, t_out]`` tables (see the module docstring)."""
    mean = np.mean(np.stack(tables), axis=0)
    grid = np.asarray(GRID)
    diag = np.diag(mean).copy()
    diag[grid > 1] = -1  # fusion with no voxel is no rule
    own = int(np.argmin(np.abs(grid - structure.threshold)))
    f = int(np.argmax(diag))
    if diag[f] < diag[own] + MIN_GAIN:
        f = own
    t_f = float(grid[f])
    dice_engine = float(mean[0, -1]) if with_engine else None
    t_in = t_out = t_f
    refined = float(diag[f])
    if with_engine:
        masked = mean.copy()
        masked[:, 0] = -1  # t_out = 0 would take the whole volume
        i, o = np.unravel_index(int(np.argmax(masked)), masked.shape)
        if masked[i, o] >= diag[f] + MIN_GAIN:
            t_in, t_out, refined = float(grid[i]), float(grid[o]), float(masked[i, o])
    return StructureRule(structure.name, t_f, t_in, t_out, round(float(diag[own]), 4), round(float(diag[f]), 4),
                         None if dice_engine is None else round(dice_engine, 4), round(refined, 4))


def learn_refinement(refset: ReferenceSet, engine=None, *, settings: RegistrationSettings = FAST,
                     strategy: str = "A", max_folds: int = 2, workers: Optional[int] = None, cache=None,
                     device: str = "cpu", progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None) -> Refinement:
    """Learn every structure's rule on ``refset`` alone (leave-one-source-out; see the module docstring).

    ``engine``: a name or a :class:`~..prompt.base.PromptableEngine`, or ``None`` to learn fusion thresholds
    only. ``cache``: folder of registrations (as :class:`.space.CommonSpace`; ``False``: no caching of
    registrations nor of the result). Returns a fusion-only :class:`Refinement` when no fold exists."""
    from ..prompt import get_engine
    from ..prompt.fusion import fuse
    from .space import CommonSpace

    engine_name = "" if engine is None else (engine if isinstance(engine, str) else (engine.name or "engine"))
    plan = folds(refset, max_folds)
    if not plan:
        return Refinement.fusion_only(refset.structures, engine_name,
                                      "no evidence: a single reference (fusion at the defined thresholds)")
    key = _key(refset, engine_name, settings, strategy, max_folds)
    path: Optional[Path] = None if cache is False else cache_dir() / "refine" / f"{key}.json"
    if path is not None and path.is_file():
        try:
            return Refinement.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, InputError):
            pass  # damaged cache entry: learn again and replace it
    t0 = time.perf_counter()
    eng = None if engine is None else (get_engine(engine, device) if isinstance(engine, str) else engine)
    tables: dict[str, list[np.ndarray]] = {s.name: [] for s in refset.structures}
    names = []
    for n, (held, used) in enumerate(plan):
        check(cancel)
        sub = None if progress is None else (lambda f, m, n=n: progress((n + f) / len(plan), m))
        ref = refset.references[held]
        names.append(ref.name)
        train = ReferenceSet(f"{refset.name}-without-{ref.name}", [refset.references[m] for m in used],
                             refset.structures, refset.label_kind)
        report(sub, 0.0, f"fold {n + 1}/{len(plan)}: references onto {ref.name}")
        target = Volume(ref.image.array, ref.image.geometry, ref.name)
        space = CommonSpace(train, settings, workers, None if cache is None else cache)
        warped = space.warp(target, None if sub is None else (lambda f, m: sub(0.8 * f, m)), cancel)
        scores = score_maps(warped.labels, refset.structures)
        engine_labels = None
        if eng is not None:
            boxes = boxes_from_scores(scores, target.geometry, strategy)
            if boxes.found():
                report(sub, 0.8, f"fold {n + 1}/{len(plan)}: engine on {ref.name}")
                prepared = eng.prepare(target.array, cancel=cancel)
                engine_labels = fuse(eng.segment(prepared, boxes.prompts(), cancel=cancel))
        for score in scores:
            truth = np.isin(ref.labels.array, score.structure.labels)
            engine_mask = None if engine_labels is None else engine_labels == score.value
            tables[score.structure.name].append(_dice_table(_counts(score, engine_mask, truth)))
    rules = {s.name: choose_rule(s, tables[s.name], eng is not None) for s in refset.structures}
    how = ("leave-one-source-out" if len(_sources(refset)) >= 2 else "held-out deformed copies (one source)")
    result = Refinement(engine_name, rules, names, f"{how}: {len(plan)} fold(s), held out {', '.join(names)}",
                        time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result.to_json(), indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    report(progress, 1.0, "refinement learnt")
    return result



def refine_result(result, refinement: Refinement):
    """``result`` (an :class:`.auto.AutoResult` with atlas boxes and score maps) with its label map replaced by
    :func:`refine_labels`: the engine's label map combined with the score maps per structure (an engine-less
    result, i.e. ``engine="atlas"``, gets label fusion at the learnt thresholds). Each object entry gains
    ``rule`` (what the structure's label came from) and its ``final_ml`` is updated; the input is not modified."""
    from dataclasses import replace

    from ..labels import LabelMap

    if result.boxes is None or result.boxes.scores is None:
        raise InputError("refinement needs the atlas boxes with their score maps")
    volume = result.labels.volume
    engine_labels = volume.array if result.final else None
    refined = refine_labels(result.boxes, engine_labels, refinement)
    refined[~np.isin(refined, [info.value for info in result.labels.labels])] = 0  # structures not found
    ml = volume.geometry.voxel_volume_ml
    by_name = {s.structure.name: s.structure for s in result.boxes.scores}
    objects = []
    for o in result.objects:
        o = dict(o)
        structure = by_name.get(o["name"])
        if structure is not None:
            rule = refinement.rule(structure)
            o["rule"] = "fusion" if engine_labels is None else rule.kind
            o["final_ml"] = round(float((refined == o["label"]).sum()) * ml, 4)
        objects.append(o)
    labels = LabelMap(volume.with_array(refined, volume.name), result.labels.labels)
    return replace(result, labels=labels, objects=objects)
