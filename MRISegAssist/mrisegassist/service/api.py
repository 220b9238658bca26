"""Typed requests and results of the segmentation service (in-process and over HTTP alike).

Arrays are ``[k, j, i]``; every volume travels as a :class:`~mrisegassist.volume.Volume` (array + geometry:
ITK/LPS conventions), every label map as a :class:`~mrisegassist.labels.LabelMap` on the prompted (or
reference) volume's grid. Boxes are inclusive voxel rectangles on slices (:class:`Box2D`) and points voxels
(:class:`Point2D`), both in the IJK of the view each object was drawn in (``ObjectPrompt.view``, see
:mod:`.views`; without a view: the volume's own ``k`` slices).

Requests: :class:`AutoSegmentRequest` (U-Net), :class:`PromptRequest` (box prompts -> engine -> cascade ->
fusion), :class:`AtlasBoxesRequest` (registration-atlas boxes), :class:`AutoRequest` (atlas boxes / a mask / a
U-Net's output -> engine -> cascade), :class:`DownloadWeightsRequest`. Results: :class:`SegmentationResult`,
:class:`AtlasBoxesResult`, :class:`WeightsStatus`; :class:`ServiceInfo` describes a service.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..labels import LabelMap
from ..prompt.base import Box2D, ObjectPrompt, Point2D
from ..volume import Volume

#: ``AutoRequest.engine`` meaning "no promptable engine: the atlas score maps are the segmentation"
ATLAS_ENGINE = "atlas"


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class AutoSegmentRequest:
    """U-Net auto-segmentation. ``inputs``: ``{sequence: Volume}`` on any co-registered grids; the label map is
    on the grid of ``reference`` (default: the model's first input). ``model``: a registered model name (a
    model folder path only in-process or on a worker started with ``--allow-local-files``). ``download``: fetch a
    catalog model's official weights into the cache when missing. ``trust_code``: let a MONAI bundle folder's
    config run its own Python (refused by a confined, shared server)."""

    inputs: dict[str, Volume]
    model: str
    reference: Optional[str] = None
    min_component_mm3: Optional[float] = None
    device: Optional[str] = None
    download: bool = False
    trust_code: bool = False


@dataclass
class PromptRequest:
    """Box-prompted 3D segmentation of ``objects`` on ``volume``, optionally cascaded, fused into one label map.

    ``extra``: other co-registered sequences (``{name: Volume}``, any grid); they are resampled onto
    ``volume``'s grid and given to engines with ``accepts_channels`` as channels 1.. (channel 0 = ``volume``).
    ``objects``: boxes and positive/negative points per object, each object in the view it was drawn in
    (``ObjectPrompt.view``; the service reorients the volume so the engine propagates across that view's slices and
    maps the result back onto ``volume``'s grid).
    ``labels``: name/colour/terminology per object id (default: the prompt's name and a default colour).
    ``cascade`` ``"C"``/``"D"``: second pass from the first pass's masks (boxes by ``strategy``), skipping the
    object ids in ``no_cascade``. ``keep_all_components``: do not reduce each object to its largest component.
    """

    volume: Volume
    objects: list[ObjectPrompt]
    engine: str = "classical"
    cascade: Optional[str] = None
    strategy: str = "A"
    no_cascade: list[int] = field(default_factory=list)
    labels: list = field(default_factory=list)  # LabelInfo per object id
    extra: dict[str, Volume] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    download: bool = False
    keep_all_components: bool = False
    device: Optional[str] = None


@dataclass
class AtlasBoxesRequest:
    """Register a reference set onto ``volume`` and box every structure (strategy A or B).

    ``reference``: ``builtin:NAME`` (default: the first built-in set), or a folder / CSV / JSON manifest (files
    only in-process or with ``--allow-local-files``). ``deformable`` / ``resolution_mm`` change the registration
    settings, ``augment`` adds N deformed copies of the references, ``thresholds`` per structure name.
    ``use_cache``: reuse the references' registrations cached on disk and this volume's registration kept by
    the service from an earlier request (off: register everything again)."""

    volume: Volume
    reference: Optional[str] = None
    structures: Optional[list[str]] = None
    strategy: str = "A"
    thresholds: dict[str, float] = field(default_factory=dict)
    deformable: Optional[str] = None
    resolution_mm: Optional[float] = None
    augment: Optional[int] = None
    workers: Optional[int] = None
    use_cache: bool = True


@dataclass
class AutoRequest:
    """Automatic prompts -> engine -> cascade -> label map on ``volume``'s grid. Exactly one prompt source:

    * ``atlas``: atlas boxes (an :class:`AtlasBoxesRequest` on the same volume); ``engine="atlas"`` skips the
      engine (the thresholded score maps are the label map);
    * ``boxes``: atlas boxes computed before (``AtlasBoxes``, e.g. read from ``mrisegassist atlas`` JSON);
    * ``mask``: one object per 26-connected component of a mask / label map (any grid);
    * ``unet``: one object per component of a U-Net's output (an :class:`AutoSegmentRequest`).

    ``extra``: other co-registered sequences for the engine, as in :class:`PromptRequest`. ``refine`` (atlas
    only): each structure's label follows the rule learnt on the references (fusion, engine or both; see
    ``Service.auto``); ``False`` keeps the engine's label map (or fusion at the defined thresholds).
    """

    volume: Volume
    engine: str = "classical"
    cascade: Optional[str] = None
    strategy: str = "A"
    atlas: Optional[AtlasBoxesRequest] = None
    boxes: object = None  # AtlasBoxes
    mask: Optional[Volume] = None
    unet: Optional[AutoSegmentRequest] = None
    min_voxels: int = 3
    extra: dict[str, Volume] = field(default_factory=dict)
    device: Optional[str] = None
    refine: bool = True


@dataclass
class DownloadWeightsRequest:
    """Download (resumable, verified) the official checkpoint of ``engine`` into the service's cache."""

    engine: str


# ----------------------------------------------------------------------------------------------- results
@dataclass
class ObjectSummary:
    """One label of a result. For prompted objects: its boxes (given or found around positive points), z-range,
    the slices the engine segmented, the mean engine score, the first-pass volume, whether the cascade re-prompted
    it, its points, the view it was drawn in and the volume axis its slices were taken along (``slice_axis``:
    ``"i"``, ``"j"``, ``"k"``, or ``"oblique"`` for a resampled view). Boxes, points, z-range and slices are in the
    IJK of that view (:mod:`.views`). For atlas structures ``rule``: what the label came from (``fusion``,
    ``engine``, ``engine AND fusion``, ``engine OR fusion``, ``combined``; empty without rules). For a U-Net label
    only ``label``, ``name``, ``voxels`` and ``volume_ml`` are filled."""

    label: int
    name: str
    voxels: int
    volume_ml: float
    boxes: list[Box2D] = field(default_factory=list)
    z_range: Optional[tuple[int, int]] = None
    slices: list[int] = field(default_factory=list)
    mean_score: Optional[float] = None
    first_pass_ml: Optional[float] = None
    cascaded: bool = False
    points: list[Point2D] = field(default_factory=list)
    view: Optional[tuple[float, float, float]] = None
    slice_axis: str = "k"
    rule: str = ""


@dataclass
class NotFound:
    """A structure the atlas did not find, with the reason."""

    name: str
    reason: str


@dataclass
class SegmentationResult:
    """A label map (``labels.volume`` on the input's grid, ``labels.labels`` = names, colours, terminology) with
    a summary per label. ``workflow``: ``"auto-segment"``, ``"prompt"`` or ``"auto"``; ``timings`` in
    seconds; ``boxes``: the atlas boxes an ``auto`` run used (without score maps); ``rules``: where the atlas
    rules came from (shipped, cached or learnt, with their evidence), empty without."""

    workflow: str
    labels: LabelMap
    objects: list[ObjectSummary]
    engine: str = ""
    model: str = ""
    cascade: Optional[str] = None
    not_found: list[NotFound] = field(default_factory=list)
    boxes: object = None  # AtlasBoxes
    timings: dict[str, float] = field(default_factory=dict)
    rules: str = ""

    @property
    def array(self) -> np.ndarray:
        """The label array ``[k, j, i]`` (uint16 for prompts, the model's values for a U-Net)."""
        return self.labels.volume.array

    def object(self, name: str) -> ObjectSummary:
        return next(o for o in self.objects if o.name == name)


@dataclass
class AtlasBoxesResult:
    """Atlas boxes of every structure (``boxes.found()`` / ``boxes.not_found()``; no score maps)."""

    boxes: object  # AtlasBoxes
    reference: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def not_found(self) -> list[NotFound]:
        return [NotFound(s.name, s.reason) for s in self.boxes.not_found()]


@dataclass
class WeightsStatus:
    """Weights of a promptable engine where the service runs. ``details``: the full reason when missing."""

    engine: str
    needs_weights: bool
    available: bool
    licence: str
    message: str
    path: Optional[str] = None
    url: Optional[str] = None
    size_mb: Optional[float] = None
    details: str = ""


@dataclass
class ModelInfo:
    """An installed U-Net model."""

    name: str
    title: str
    inputs: list[str]
    labels: list[str]
    licence: str


@dataclass
class EngineInfo:
    """A registered promptable engine and its weights where the service runs."""

    name: str
    description: str
    needs_weights: bool
    licence: str
    available: bool
    message: str


@dataclass
class ServiceInfo:
    """What a service offers: its version, device(s), models, engines and atlas reference sets."""

    version: str
    device: str
    devices: list[str]
    models: list[ModelInfo]
    engines: list[EngineInfo]
    atlas_references: list[str]
    atlas_reason: str = ""
    where: str = "in-process"
