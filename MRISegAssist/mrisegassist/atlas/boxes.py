"""Score maps, thresholds and box prompts from warped reference labels, with their JSON form.

* :func:`score_maps`: per structure, the voxelwise fraction of references labelling a voxel as that structure
  (0..1, float32, stored cropped to the structure's bounding box on the target grid ``[k, j, i]``);
* :func:`boxes_from_scores`: per structure, the score map thresholded at the structure's threshold, its z-range
  (``Zmin..Zmax``, inclusive axial slice indices) and boxes by strategy A or B (``prompt.strategies``);
  an empty thresholded map gives an explicit "not found" entry (never an empty box);
* :class:`AtlasBoxes` JSON: per structure name, output label, IJK boxes, z-range, RAS boxes (centre, size,
  orientation: ready for Slicer Markups ROIs) and scores; :meth:`AtlasBoxes.from_json` reads it back.

RAS boxes: a 2D box on slice ``k`` is a slab one voxel thick; ``center`` and ``size`` are in RAS mm and
``orientation`` is the 3x3 row-major matrix whose columns are the box axes (the volume's i, j, k axes) in RAS,
so oblique volumes give oblique ROIs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..prompt.base import Box2D, ObjectPrompt
from ..prompt.strategies import STRATEGIES, boxes_for_object, z_extent
from ..outputs import write_text
from ..volume import Geometry
from .references import Structure

FORMAT = "mrisegassist-atlas-boxes"


@dataclass
class ScoreMap:
    """Score map of one structure: ``array`` (float32 in 0..1) covers ``box`` (k, j, i slices) of a volume of
    ``shape``; outside it the score is 0."""

    structure: Structure
    value: int
    array: np.ndarray
    box: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    n_references: int

    def full(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out[self.box] = self.array
        return out

    def mask(self, threshold: Optional[float] = None) -> np.ndarray:
        """Bool ``[k, j, i]``: score >= threshold (default: the structure's)."""
        t = self.structure.threshold if threshold is None else threshold
        out = np.zeros(self.shape, bool)
        out[self.box] = self.array >= t - 1e-6
        return out

    @property
    def max(self) -> float:
        return float(self.array.max()) if self.array.size else 0.0


def _layers(structures: Sequence[Structure]) -> list[list[int]]:
    """Group structure indices so no two in a group share a label value (merged + separate definitions)."""
    layers: list[tuple[set, list[int]]] = []
    for n, s in enumerate(structures):
        for used, members in layers:
            if not used.intersection(s.labels):
                used.update(s.labels)
                members.append(n)
                break
        else:
            layers.append((set(s.labels), [n]))
    return [members for _, members in layers]


def score_maps(labels: Sequence[np.ndarray], structures: Sequence[Structure]) -> list[ScoreMap]:
    """Per-structure score maps from reference label maps on one grid (each ``[k, j, i]`` integer).

    Output values are the structures' 1-based positions. Memory: one ``uint8`` index map per reference and
    per layer of non-overlapping structures, plus each structure's cropped float map.
    """
    if not labels:
        raise InputError("no reference label map to score")
    if not structures:
        raise InputError("no structure to score")
    shape = labels[0].shape
    if any(lab.shape != shape for lab in labels):
        raise InputError("warped reference label maps differ in shape")
    if len(structures) > 254:
        raise InputError("at most 254 structures per call")
    top = max(int(max(int(lab.max()) for lab in labels)), max(max(s.labels) for s in structures))
    out: list[Optional[ScoreMap]] = [None] * len(structures)
    n = len(labels)
    for members in _layers(structures):
        lut = np.zeros(top + 1, np.uint8)
        for local, s_index in enumerate(members, 1):
            lut[list(structures[s_index].labels)] = local
        index_maps = [lut[lab] for lab in labels]
        boxes: list[Optional[list[int]]] = [None] * len(members)
        for idx in index_maps:
            for local, sl in enumerate(ndimage.find_objects(idx, max_label=len(members))):
                if sl is None:
                    continue
                b = [sl[0].start, sl[0].stop, sl[1].start, sl[1].stop, sl[2].start, sl[2].stop]
                prev = boxes[local]
                boxes[local] = b if prev is None else [min(prev[0], b[0]), max(prev[1], b[1]), min(prev[2], b[2]),
                                                       max(prev[3], b[3]), min(prev[4], b[4]), max(prev[5], b[5])]
        for local, s_index in enumerate(members, 1):
            b = boxes[local - 1]
            box = (slice(0, 0),) * 3 if b is None else (slice(b[0], b[1]), slice(b[2], b[3]), slice(b[4], b[5]))
            counts = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
            if b is not None:
                for idx in index_maps:
                    counts += idx[box] == local
            out[s_index] = ScoreMap(structures[s_index], s_index + 1, counts / n, box, shape, n)
    return [m for m in out if m is not None]


# ------------------------------------------------------------------------------------------------ boxes
def _axes_ras(geometry: Geometry) -> np.ndarray:
    """Unit IJK axes in RAS as columns, with k flipped if needed so the matrix is a rotation (det +1)."""
    m = geometry.ijk_to_ras[:3, :3] / np.asarray(geometry.spacing)[None, :]
    if np.linalg.det(m) < 0:
        m = m.copy()
        m[:, 2] *= -1
    return m


def ras_box(geometry: Geometry, i0: float, j0: float, k0: float, i1: float, j1: float, k1: float) -> dict:
    """RAS ROI of the inclusive voxel block ``i0..i1 x j0..j1 x k0..k1``: ``{"center", "size", "orientation"}``."""
    centre = geometry.ijk_to_ras @ np.array([(i0 + i1) / 2, (j0 + j1) / 2, (k0 + k1) / 2, 1.0])
    size = np.array([i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1], float) * np.asarray(geometry.spacing)
    return {"center": [round(float(c), 4) for c in centre[:3]], "size": [round(float(s), 4) for s in size],
            "orientation": [round(float(v), 6) for v in _axes_ras(geometry).ravel()]}


@dataclass
class StructureBoxes:
    """Boxes of one structure (``found=False`` with a ``reason`` when its thresholded score map is empty)."""

    name: str
    value: int
    found: bool
    threshold: float
    score_max: float
    score_mean: float = 0.0
    z_range: Optional[tuple[int, int]] = None
    boxes: list[Box2D] = field(default_factory=list)
    bbox: Optional[tuple[int, int, int, int, int, int]] = None  # i0, j0, k0, i1, j1, k1
    volume_ml: float = 0.0
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)
    cascade: bool = True
    reason: str = ""

    def prompt(self) -> ObjectPrompt:
        if not self.found:
            raise InputError(f"structure {self.name!r} was not found: {self.reason}")
        i0, j0, _, i1, j1, _ = self.bbox
        return ObjectPrompt(self.value, list(self.boxes), self.z_range, self.name, (i0, j0, i1, j1))

    def to_json(self, geometry: Geometry) -> dict:
        d = {"name": self.name, "label": self.value, "found": self.found, "threshold": self.threshold,
             "score_max": round(self.score_max, 4), "color": list(self.color), "cascade": self.cascade}
        if not self.found:
            d["reason"] = self.reason
            return d
        d.update({
            "score": round(self.score_mean, 4), "z_range": list(self.z_range), "volume_ml": round(self.volume_ml, 4),
            "bbox_ijk": list(self.bbox),
            "roi_ras": ras_box(geometry, *self.bbox),
            "boxes_ijk": [{"k": b.k, "i0": b.i0, "j0": b.j0, "i1": b.i1, "j1": b.j1} for b in self.boxes],
            "boxes_ras": [ras_box(geometry, b.i0, b.j0, b.k, b.i1, b.j1, b.k) for b in self.boxes],
        })
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StructureBoxes":
        try:
            found = bool(d["found"])
            return cls(str(d["name"]), int(d["label"]), found, float(d["threshold"]), float(d["score_max"]),
                       float(d.get("score", 0.0)), tuple(d["z_range"]) if found else None,
                       [Box2D(int(b["k"]), int(b["i0"]), int(b["j0"]), int(b["i1"]), int(b["j1"]))
                        for b in d.get("boxes_ijk", [])],
                       tuple(int(v) for v in d["bbox_ijk"]) if found else None, float(d.get("volume_ml", 0.0)),
                       tuple(float(c) for c in d.get("color", (1, 0, 0))), bool(d.get("cascade", True)),
                       str(d.get("reason", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad structure entry in boxes JSON: {exc}") from None


def structure_boxes(score: ScoreMap, geometry: Geometry, strategy: str = "A", threshold: Optional[float] = None,
                    margin: int = 0) -> StructureBoxes:
    """Threshold one score map and box it (see module docstring)."""
    s = score.structure
    t = s.threshold if threshold is None else float(threshold)
    common = dict(name=s.name, value=score.value, threshold=t, score_max=score.max, color=s.color,
                  cascade=s.cascade)
    mask = score.mask(t)
    if not mask.any():
        why = ("no reference label lands on the target" if score.max == 0
               else f"score map below threshold {t:g} everywhere (max {score.max:.2f})")
        return StructureBoxes(found=False, reason=f"structure not found: {why}", **common)
    z0, z1 = z_extent(mask)
    nz = [np.flatnonzero(mask.any(axis=a)) for a in ((0, 1), (0, 2))]
    bbox = (int(nz[0][0]), int(nz[1][0]), z0, int(nz[0][-1]), int(nz[1][-1]), z1)
    inside = score.full()[mask]
    return StructureBoxes(found=True, score_mean=float(inside.mean()), z_range=(z0, z1),
                          boxes=boxes_for_object(mask, strategy, margin), bbox=bbox,
                          volume_ml=float(mask.sum()) * geometry.voxel_volume_ml, **common)


@dataclass
class AtlasBoxes:
    """Boxes of every structure for one target (the output of ``mrisegassist atlas``)."""

    geometry: Geometry
    strategy: str
    structures: list[StructureBoxes]
    reference_set: str = ""
    n_references: int = 0
    label_kind: str = ""
    target: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    #: the score maps the boxes came from (in memory only; not part of the JSON)
    scores: Optional[list[ScoreMap]] = field(default=None, repr=False, compare=False)

    def score_map(self, name: str) -> ScoreMap:
        for s in self.scores or []:
            if s.structure.name == name:
                return s
        raise InputError(f"no score map for {name!r} (boxes read from JSON carry none)")

    def found(self) -> list[StructureBoxes]:
        return [s for s in self.structures if s.found]

    def not_found(self) -> list[StructureBoxes]:
        return [s for s in self.structures if not s.found]

    def prompts(self) -> list[ObjectPrompt]:
        """One :class:`ObjectPrompt` per found structure (object id = output label value)."""
        return [s.prompt() for s in self.found()]

    def get(self, name: str) -> StructureBoxes:
        for s in self.structures:
            if s.name == name:
                return s
        raise InputError(f"no structure {name!r} in the boxes")

    def to_json(self) -> dict:
        g = self.geometry
        return {"format": FORMAT, "version": 1, "target": self.target, "strategy": self.strategy,
                "reference_set": self.reference_set, "n_references": self.n_references,
                "label_kind": self.label_kind,
                "geometry": {"size": list(g.size), "spacing": list(g.spacing), "origin_lps": list(g.origin),
                             "direction_lps": list(g.direction),
                             "ijk_to_ras": [[round(float(v), 6) for v in row] for row in g.ijk_to_ras]},
                "structures": [s.to_json(g) for s in self.structures],
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "AtlasBoxes":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not an atlas boxes document (expected format {FORMAT!r})")
        try:
            g = data["geometry"]
            geometry = Geometry(tuple(int(v) for v in g["size"]), tuple(float(v) for v in g["spacing"]),
                                tuple(float(v) for v in g["origin_lps"]), tuple(float(v) for v in g["direction_lps"]))
            return cls(geometry, str(data["strategy"]), [StructureBoxes.from_json(s) for s in data["structures"]],
                       str(data.get("reference_set", "")), int(data.get("n_references", 0)),
                       str(data.get("label_kind", "")), str(data.get("target", "")),
                       {k: float(v) for k, v in data.get("timings_s", {}).items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"bad atlas boxes document: {exc}") from None

    def write(self, path: Union[str, Path]) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def read(cls, path: Union[str, Path]) -> "AtlasBoxes":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise InputError(f"{path}: no such boxes file") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None


def fuse_scores(scores: Sequence[ScoreMap]) -> np.ndarray:
    """Multi-atlas label fusion without an engine: ``uint16 [k, j, i]`` where each voxel gets the structure
    with the highest score among those at or above their threshold (0 elsewhere)."""
    if not scores:
        raise InputError("no score map to fuse")
    shape = scores[0].shape
    out = np.zeros(shape, np.uint16)
    best = np.zeros(shape, np.float32)
    for m in scores:
        if m.array.size == 0:
            continue
        sub = m.array
        win = (sub >= m.structure.threshold - 1e-6) & (sub > best[m.box])
        best[m.box][win] = sub[win]
        out[m.box][win] = m.value
    return out


def boxes_from_scores(scores: Sequence[ScoreMap], geometry: Geometry, strategy: str = "A",
                      thresholds: Optional[dict[str, float]] = None, margin: int = 0, **info) -> AtlasBoxes:
    """Boxes of every structure (``thresholds`` overrides per structure name)."""
    if strategy not in STRATEGIES:
        raise InputError(f"unknown box strategy {strategy!r}; use A (one box) or B (three boxes)")
    thresholds = thresholds or {}
    unknown = sorted(set(thresholds) - {s.structure.name for s in scores})
    if unknown:
        raise InputError(f"thresholds given for unknown structure(s): {', '.join(unknown)}")
    return AtlasBoxes(geometry, strategy, [structure_boxes(s, geometry, strategy, thresholds.get(s.structure.name),
                                                           margin) for s in scores], scores=list(scores), **info)
