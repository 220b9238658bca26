"""Per-structure thresholds and engine/fusion combination, learnt on the references (never on the target).

For one structure with atlas score map ``s`` (fraction of references labelling the voxel, 0..1) and the
engine's mask ``e`` (its part of the engine's fused label map), the refined mask is

    ``(s >= t_in) & e  |  (s >= t_out) & ~e``

so one rule covers label fusion at threshold ``t`` (``t_in = t_out = t``: the engine ignored), the engine
alone (``t_in = 0``, ``t_out = NEVER``), engine AND fusion (``t_in = t``, ``t_out = NEVER``), engine OR fusion
(``t_in = 0``, ``t_out = t``) and the graded cases between (``combined``; never learnt). Overlaps between
structures go to the highest score (as :func:`.boxes.fuse_scores`).

**Learning** (:func:`learn_refinement`): leave-one-source-out over the reference set. References are grouped
by the subject they show (:attr:`.references.Reference.source`: deformed copies share their original's). With
two or more sources, each fold holds out one source's first reference: the other sources' references are
registered onto it exactly as onto a patient (:class:`.space.CommonSpace`), its score maps are computed, the
engine is run on its image with the atlas boxes, and every threshold pair of :data:`GRID` is scored against
its own labels. With a single source, up to ``max_folds`` deformed copies are held out in turn (weaker
evidence: the original stays among the references). Per structure, the fusion threshold with the best mean
Dice over the folds is kept, then the best of engine alone, engine AND fusion and engine OR fusion at that
threshold (three candidates only: with two folds, every threshold pair would fit the folds' noise); a candidate
replaces the defined threshold, or plain fusion, only when its mean Dice gains at least :data:`MIN_GAIN` and
it is worse on no fold (ties keep the atlas). Without any fold (one reference), every structure keeps plain
fusion at its defined threshold.

The engine's first pass is what rules are learnt on (no cascade). Results are cached on disk
(``cache_dir()/refine``), keyed by :func:`made_for` (the references, structures, registration settings, engine,
strategy and :data:`VERSION`); learning never reads a target's labels.

**Shipped rules** (:func:`shipped_rules`): for the built-in reference sets, the engines that need no download
(label fusion alone and ``classical``) and both strategies, the rules are learnt once by
``scripts/learn_atlas_rules.py`` and ship in ``builtin/rules/`` stamped with :func:`made_for`; a file whose stamp
differs from what the installed references, current settings and engine code give is stale and not used (the
rules are then learnt on first use and cached, as for any other reference set). :func:`find_rules` looks for
rules that need no learning run. A user's ``--threshold`` for a structure replaces its rule
(:meth:`Refinement.with_thresholds`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressFn, check, report
from ..volume import Volume, atomic_write
from .boxes import AtlasBoxes, ScoreMap, boxes_from_scores
from .references import Reference, ReferenceSet, Structure, cache_dir
from .registration import FAST, RegistrationSettings

#: threshold levels tried (fractions of references); ``NEVER`` (above 1) selects no voxel
NEVER = 2.0
GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, NEVER)
#: a learnt rule replaces plain fusion at the structure's threshold only above this mean Dice gain
MIN_GAIN = 0.01
#: bump when the learning procedure or the score maps change, so cached and shipped rules are redone
#: (2: score maps resampled from the common space, :meth:`.space.CommonSpace.target_scores`; 3: three named
#: engine combinations instead of every threshold pair, none worse than fusion on any fold)
VERSION = 3


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

    def with_thresholds(self, thresholds: Optional[dict[str, float]]) -> "Refinement":
        """A copy in which every structure named in ``thresholds`` (a user's override, name -> level) keeps no
        learnt rule: label fusion at that level, and with an engine the engine's mask alone."""
        if not thresholds:
            return self
        rules = dict(self.rules)
        for name, level in thresholds.items():
            rules[name] = StructureRule(name, float(level), 0.0, NEVER)
        return replace(self, rules=rules, evidence=self.evidence + f"; thresholds given for {', '.join(thresholds)}")

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
    thresholds. A voxel claimed by several structures goes to the highest score (then the first structure);
    structures not found on the target (no box) stay unlabelled."""
    if boxes.scores is None:
        raise InputError("refinement needs the atlas score maps (boxes read from JSON carry none)")
    shape = boxes.scores[0].shape if boxes.scores else None
    if engine_labels is not None and engine_labels.shape != shape:
        raise InputError(f"engine label map shape {engine_labels.shape} differs from the score maps' {shape}")
    out = np.zeros(shape, np.uint16)
    best = np.full(shape, -1.0, np.float32)
    found = {s.name for s in boxes.found()}
    for score in boxes.scores:
        if score.structure.name not in found:
            continue
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


def engine_label(engine) -> str:
    """The name rules are learnt and stored under: ``""`` for label fusion alone (no engine, ``--engine atlas``)."""
    if engine is None or engine == "atlas":
        return ""
    return engine if isinstance(engine, str) else (engine.name or "engine")


#: modules of the prompt package every registered engine's output depends on (besides its own module)
ENGINE_COMMON_MODULES = ("base", "propagation", "fusion", "strategies")


def engine_code(engine_name: str) -> str:
    """sha256 (16 hex digits) of the source of a registered engine's module and :data:`ENGINE_COMMON_MODULES`, so
    rules learnt with an engine become stale when its code changes; ``""`` for label fusion alone and for engines
    not in the registry."""
    from ..prompt import ENGINES

    spec = ENGINES.get(engine_name)
    if spec is None:
        return ""
    folder = Path(__file__).resolve().parent.parent / "prompt"
    h = hashlib.sha256()
    for module in (spec.module, *ENGINE_COMMON_MODULES):
        path = folder / f"{module}.py"
        h.update(module.encode())
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]


def made_for(refset: ReferenceSet, engine_name: str, settings: RegistrationSettings, strategy: str,
             max_folds: int = 2) -> dict:
    """Everything rules depend on: this procedure's :data:`VERSION`, the references' content keys, the
    structures' definitions, the registration settings, the engine and its code (:func:`engine_code`), the box
    strategy and the grid of levels."""
    structures = json.dumps([s.to_json() for s in refset.structures], sort_keys=True)
    return {"version": VERSION, "references": [r.key for r in refset.references],
            "structures": hashlib.sha256(structures.encode()).hexdigest()[:16], "settings": settings.key(),
            "engine": engine_name, "engine_code": engine_code(engine_name),
            "strategy": strategy if engine_name else "", "max_folds": max_folds, "grid": list(GRID),
            "min_gain": MIN_GAIN}


def _key(refset: ReferenceSet, engine: str, settings: RegistrationSettings, strategy: str, max_folds: int) -> str:
    doc = made_for(refset, engine, settings, strategy, max_folds)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _counts(score: ScoreMap, engine: Optional[np.ndarray], truth: np.ndarray) -> dict:
    """Per threshold of :data:`GRID`: voxels and true positives of ``s >= t`` inside / outside the engine mask.

    Counted over the bounding box of the score map, the engine mask and the truth; outside it the score is 0,
    so only ``t <= 0`` selects voxels there (all outside the engine mask, none true)."""
    boxes = [[(b.start, b.stop) for b in score.box]] if score.array.size else []
    for m in (engine, truth):
        if m is not None and m.any():
            boxes.append([(int(i.min()), int(i.max()) + 1) for i in np.nonzero(m)])
    if boxes:
        region = tuple(slice(min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(3))
    else:
        region = (slice(0, 0),) * 3
    full = np.zeros(tuple(r.stop - r.start for r in region), np.float32)
    if score.array.size:  # the region holds the score map's box
        full[tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(score.box, region))] = score.array
    t_sub = truth[region]
    e = np.zeros(t_sub.shape, bool) if engine is None else engine[region]
    outside = int(np.prod(truth.shape)) - int(full.size)
    out = {"truth": int(truth.sum()), "in_n": [], "in_tp": [], "out_n": [], "out_tp": []}
    for t in GRID:
        sel = full >= t - 1e-6
        for part, region_mask in (("in", e), ("out", ~e)):
            m = sel & region_mask
            extra = outside if part == "out" and t <= 1e-6 else 0
            out[f"{part}_n"].append(int(m.sum()) + extra)
            out[f"{part}_tp"].append(int((m & t_sub).sum()))
    return out


def _dice_table(c: dict) -> np.ndarray:
    """``[t_in, t_out]`` Dice of every threshold pair from :func:`_counts`."""
    n = np.asarray(c["in_n"])[:, None] + np.asarray(c["out_n"])[None, :]
    tp = np.asarray(c["in_tp"])[:, None] + np.asarray(c["out_tp"])[None, :]
    denom = n + c["truth"]
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)


def choose_rule(structure: Structure, tables: Sequence[np.ndarray], with_engine: bool) -> StructureRule:
    """The rule chosen on the folds' ``[t_in, t_out]`` tables (see the module docstring): the fusion level with
    the best mean Dice, then engine alone, engine AND fusion or engine OR fusion at that level. A candidate
    replaces the structure's defined threshold (then plain fusion) only when its mean Dice gains at least
    :data:`MIN_GAIN` and it is worse on no fold."""
    folds_ = np.stack(tables)
    mean = folds_.mean(axis=0)
    grid = np.asarray(GRID)
    diag = np.diag(mean).copy()
    diag[grid > 1] = -1  # fusion with no voxel is no rule
    own = int(np.argmin(np.abs(grid - structure.threshold)))
    f = int(np.argmax(diag))
    if diag[f] < diag[own] + MIN_GAIN or (folds_[:, f, f] < folds_[:, own, own]).any():
        f = own
    t_f = float(grid[f])
    never = len(grid) - 1
    dice_engine = float(mean[0, never]) if with_engine else None
    t_in = t_out = t_f
    refined = float(diag[f])
    if with_engine:
        best = diag[f] + MIN_GAIN
        for i, o in ((0, never), (f, never), (0, f)):  # engine, engine AND fusion, engine OR fusion
            if mean[i, o] >= best and (folds_[:, i, o] >= folds_[:, f, f]).all():
                best, t_in, t_out, refined = mean[i, o], float(grid[i]), float(grid[o]), float(mean[i, o])
    return StructureRule(structure.name, t_f, t_in, t_out, round(float(diag[own]), 4), round(float(diag[f]), 4),
                         None if dice_engine is None else round(dice_engine, 4), round(refined, 4))


def _fold_scores(train: ReferenceSet, held: Reference, target: Volume, structures: Sequence[Structure],
                 settings: RegistrationSettings, workers: Optional[int], cache, progress: Optional[ProgressFn],
                 cancel: Optional[CancelToken]) -> list[ScoreMap]:
    """Score maps of ``train`` on the held-out reference (as on a patient), cached on disk: they do not depend
    on the engine or the strategy, so learning rules for another engine does not register again."""
    from .space import COMMON_VERSION, CommonSpace, load_score_maps, save_score_maps

    doc = {"v": COMMON_VERSION, "settings": settings.key(), "train": [r.key for r in train.references],
           "held": held.key, "structures": [[s.name, list(s.labels)] for s in structures]}
    key = hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:20]
    path = None if cache is False else cache_dir() / "refine" / "folds" / f"{key}.npz"
    loaded = load_score_maps(path, structures) if path is not None and path.is_file() else None
    if loaded is not None:
        return loaded[0]
    space = CommonSpace(train, settings, workers, None if cache is None else cache)
    scores = space.target_scores(target, structures, progress, cancel).scores
    if path is not None:
        save_score_maps(path, scores, target.geometry)
    return scores


def cached_rules(refset: ReferenceSet, engine=None, *, settings: RegistrationSettings = FAST,
                 strategy: str = "A", max_folds: int = 2, cache=None) -> Optional[Refinement]:
    """Rules that need no learning run: fusion only when ``refset`` allows no fold, else those learnt before
    and cached (``None`` when none are, or ``cache`` is ``False``)."""
    name = engine_label(engine)
    if not folds(refset, max_folds):
        return Refinement.fusion_only(refset.structures, name,
                                      "no evidence: a single reference (fusion at the defined thresholds)")
    path = _cache_path(refset, name, settings, strategy, max_folds, cache)
    if path is not None and path.is_file():
        try:
            return Refinement.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, InputError):
            return None  # damaged cache entry: learnt again and replaced
    return None


def _cache_path(refset: ReferenceSet, engine_name: str, settings: RegistrationSettings, strategy: str,
                max_folds: int, cache) -> Optional[Path]:
    if cache is False:
        return None
    return cache_dir() / "refine" / f"{_key(refset, engine_name, settings, strategy, max_folds)}.json"


def fold_tables(refset: ReferenceSet, engine=None, *, settings: RegistrationSettings = FAST, strategy: str = "A",
                max_folds: int = 2, workers: Optional[int] = None, cache=None, device: str = "cpu",
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None
                ) -> tuple[dict[str, list[np.ndarray]], list[str]]:
    """Per structure, one ``[t_in, t_out]`` Dice table (:func:`_dice_table`) per fold of :func:`folds`, and the
    held-out references' names: the other references' score maps on the held-out image (cached), the engine
    with the atlas boxes on it (``engine=None``: fusion only), compared with its own labels."""
    from ..prompt import get_engine
    from ..prompt.fusion import fuse

    plan = folds(refset, max_folds)
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
        scores = _fold_scores(train, ref, target, refset.structures, settings, workers, cache,
                              None if sub is None else (lambda f, m: sub(0.8 * f, m)), cancel)
        engine_labels = None
        if eng is not None:
            boxes = boxes_from_scores(scores, target.geometry, strategy)
            if boxes.found():
                report(sub, 0.8, f"fold {n + 1}/{len(plan)}: engine on {ref.name}")
                prepared = eng.prepare(target.array, cancel=cancel)
                segment_progress = None if sub is None else (lambda f, m: sub(0.8 + 0.2 * f, m))
                engine_labels = fuse(eng.segment(prepared, boxes.prompts(), progress=segment_progress,
                                                 cancel=cancel))
        for score in scores:
            truth = np.isin(ref.labels.array, score.structure.labels)
            engine_mask = None if engine_labels is None else engine_labels == score.value
            tables[score.structure.name].append(_dice_table(_counts(score, engine_mask, truth)))
    return tables, names


def learn_refinement(refset: ReferenceSet, engine=None, *, settings: RegistrationSettings = FAST,
                     strategy: str = "A", max_folds: int = 2, workers: Optional[int] = None, cache=None,
                     device: str = "cpu", progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None) -> Refinement:
    """Learn every structure's rule on ``refset`` alone (leave-one-source-out; see the module docstring), or
    return them from the cache (:func:`cached_rules`).

    ``engine``: a name or a :class:`~..prompt.base.PromptableEngine`, or ``None`` (or ``"atlas"``) to learn
    fusion thresholds only. ``cache``: folder of registrations (as :class:`.space.CommonSpace`; ``False``: no
    caching of registrations nor of the result). Returns a fusion-only :class:`Refinement` when no fold
    exists. Progress: one share per fold; ``cancel`` is checked between steps and inside registrations."""
    engine_name = engine_label(engine)
    engine = None if engine_name == "" else engine
    known = cached_rules(refset, engine, settings=settings, strategy=strategy, max_folds=max_folds, cache=cache)
    if known is not None:
        return known
    path = _cache_path(refset, engine_name, settings, strategy, max_folds, cache)
    t0 = time.perf_counter()
    tables, names = fold_tables(refset, engine, settings=settings, strategy=strategy, max_folds=max_folds,
                                workers=workers, cache=cache, device=device, progress=progress, cancel=cancel)
    rules = {s.name: choose_rule(s, tables[s.name], engine is not None) for s in refset.structures}
    how = ("leave-one-source-out" if len(_sources(refset)) >= 2 else "held-out deformed copies (one source)")
    result = Refinement(engine_name, rules, names, f"{how}: {len(names)} fold(s), held out {', '.join(names)}",
                        time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result.to_json(), indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    report(progress, 1.0, "refinement learnt")
    return result


# ---------------------------------------------------------------------------------------------- shipped
#: rules learnt for the built-in reference sets, shipped with the package (``scripts/learn_atlas_rules.py``)
SHIPPED_DIR = Path(__file__).with_name("builtin") / "rules"
#: what ships: built-in sets (``augment`` = references in all, ``None`` = the set itself), engines (``""`` =
#: label fusion alone, ``--engine atlas``; engines with downloaded weights learn on first use) and strategies
SHIPPED_SETS = (("brain", None), ("colin27", None), ("mni152", None))
SHIPPED_ENGINES = ("", "classical")
SHIPPED_STRATEGIES = ("A", "B")


def shipped_path(set_name: str, engine_name: str, strategy: str, augment: Optional[int] = None) -> Path:
    """``builtin/rules/<set>[-xN].<engine>.<strategy>.json``, or ``<set>[-xN].atlas.json`` for label fusion alone
    (no engine, so no box strategy either)."""
    stem = set_name + (f"-x{int(augment)}" if augment else "")
    engine_name = engine_label(engine_name)
    return SHIPPED_DIR / (f"{stem}.{engine_name}.{strategy}.json" if engine_name else f"{stem}.atlas.json")


def _builtin_structures(set_name: str) -> list[Structure]:
    from .references import builtin_definition, structures_from

    return structures_from(builtin_definition(set_name), f"builtin:{set_name}")


def shipped_rules(set_name: str, refset: ReferenceSet, engine=None, *, augment: Optional[int] = None,
                  settings: RegistrationSettings = FAST, strategy: str = "A",
                  max_folds: int = 2) -> tuple[Optional[Refinement], str]:
    """The shipped rules of ``builtin:<set_name>`` (``refset``: that set as loaded here, possibly restricted to
    some of its structures, with ``augment`` references) for ``engine`` and ``strategy``, and how they were
    found. ``(None, why)`` when none ship, the file is damaged, or it is stale: learnt for other references
    (the installed template files differ), other registration settings, structure definitions, engine code, box
    strategy or learning procedure (:data:`VERSION`) than what :func:`made_for` gives now."""
    name = engine_label(engine)
    path = shipped_path(set_name, name, strategy, augment)
    if not path.is_file():
        return None, f"no rules ship for builtin:{set_name}" + (f" with {augment} references" if augment else "") \
            + f", engine {name or 'atlas'}, strategy {strategy}"
    try:
        doc = json.loads(path.read_text())
        rules = Refinement.from_json(doc)
        stamp = dict(doc["made_for"])
    except (json.JSONDecodeError, InputError, KeyError, TypeError, ValueError) as exc:
        return None, f"{path.name} is damaged ({exc})"
    full = _builtin_structures(set_name)
    defined = {s.name: s for s in full}
    if any(defined.get(s.name) != s for s in refset.structures):
        return None, f"the structures differ from builtin:{set_name}'s definition"
    now = made_for(refset.with_structures(full), name, settings, strategy, max_folds)
    stale = [k for k in now if now[k] != stamp.get(k)]
    if stale:
        return None, f"{path.name} is stale: learnt for other {', '.join(stale)}"
    keep = {s.name for s in refset.structures}
    rules.rules = {k: r for k, r in rules.rules.items() if k in keep}
    return rules, f"shipped ({path.name})"


def write_shipped_rules(set_name: str, refset: ReferenceSet, engine=None, *, augment: Optional[int] = None,
                        settings: RegistrationSettings = FAST, strategy: str = "A", max_folds: int = 2,
                        workers: Optional[int] = None, device: str = "cpu", progress: Optional[ProgressFn] = None,
                        cancel: Optional[CancelToken] = None) -> Path:
    """Learn (or take from the cache) the rules of the whole built-in set ``refset`` and write its shipped file,
    stamped with :func:`made_for` so a stale file is recognised."""
    if [s.name for s in refset.structures] != [s.name for s in _builtin_structures(set_name)]:
        raise InputError(f"shipped rules are learnt on every structure of builtin:{set_name}")
    rules = learn_refinement(refset, engine, settings=settings, strategy=strategy, max_folds=max_folds,
                             workers=workers, device=device, progress=progress, cancel=cancel)
    name = engine_label(engine)
    doc = {**rules.to_json(), "engine": name, "reference_set": f"builtin:{set_name}", "augment": augment,
           "made_for": made_for(refset, name, settings, strategy, max_folds)}
    path = shipped_path(set_name, name, strategy, augment)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def find_rules(refset: ReferenceSet, engine=None, *, builtin: Optional[str] = None, augment: Optional[int] = None,
               settings: RegistrationSettings = FAST, strategy: str = "A", max_folds: int = 2,
               cache=None) -> tuple[Optional[Refinement], str]:
    """Rules available without a learning run: shipped ones for a built-in set (``builtin`` = its name), else
    fusion only (no fold) or cached ones (:func:`cached_rules`). ``(None, why)`` when they must be learnt."""
    why = ""
    if builtin is not None:
        rules, why = shipped_rules(builtin, refset, engine, augment=augment, settings=settings, strategy=strategy,
                                   max_folds=max_folds)
        if rules is not None:
            return rules, why
    rules = cached_rules(refset, engine, settings=settings, strategy=strategy, max_folds=max_folds, cache=cache)
    if rules is not None:
        return rules, "cached" if rules.folds else rules.evidence
    return None, (why + "; " if why else "") + "not learnt yet for these references"
