"""The segmentation service in-process: the one pipeline behind the CLI, the Slicer logic, the browser front end,
the worker process and the batch runner.

:class:`Service` owns the loaded U-Net models and promptable engines (kept between calls until
:meth:`Service.release`) and the prepared-volume cache (:class:`PreparedCache`: re-prompting the same voxels
never re-encodes them, asking for atlas boxes again on them never registers them again). Its methods take a
typed request (:mod:`.api`) and return a typed result::

    service = Service(device="cpu")
    result = service.prompt(PromptRequest(volume, [ObjectPrompt(1, [Box2D(80, 100, 90, 140, 130)])]))
    result.labels                      # LabelMap on volume's grid; result.objects: per-object summaries

Prompted segmentation: prepare (cached) -> ``engine.segment`` -> optional cascade (``atlas.cascade``) ->
``prompt.fusion.fuse`` -> label map. The A/B box-slice rule is :func:`~mrisegassist.prompt.strategies.box_slices`
(also used by :func:`prompt_from_extents`, which turns ROI voxel extents into prompts for the front ends).
A ``confined`` service (a shared server) accepts no file paths in requests (model folders, checkpoints,
reference manifests) and downloads no weights: only what is installed where it runs is reachable.
"""
from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import __version__
from ..errors import InputError
from ..labels import LabelInfo, LabelMap, default_color
from ..progress import CancelToken, ProgressFn, check, report
from ..prompt.base import Box2D, ObjectPrompt, Point2D
from ..prompt.fusion import label_counts
from ..volume import Volume, fingerprint, resample_to
from .checks import check_request, unused_sequences
from .views import ViewGrid, unit, view_grid
from .api import (ATLAS_ENGINE, AtlasBoxesRequest, AtlasBoxesResult, AutoRequest, AutoSegmentRequest,
                  DownloadWeightsRequest, EngineInfo, ModelInfo, NotFound, ObjectSummary, PromptRequest,
                  SegmentationResult, ServiceInfo, WeightsStatus)

Extent = tuple[int, int, int, int, int, int]


def sub_progress(progress: Optional[ProgressFn], start: float, stop: float) -> Optional[ProgressFn]:
    """Map a step's 0..1 progress into ``[start, stop]`` of the whole job."""
    if progress is None:
        return None
    return lambda fraction, message: report(progress, start + (stop - start) * fraction, message)


def available_devices() -> list[str]:
    """Torch devices usable here, best first: ``cuda`` (NVIDIA), ``mps`` (Apple), ``cpu``."""
    try:
        import torch
    except ImportError:
        return ["cpu"]
    devices = ["cuda"] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def _on_source_grid(result, grid: ViewGrid):
    """An engine's :class:`ObjectResult` on a view grid, on the volume's grid, cropped to its object (an exact view
    grid transposes the box; a resampled one maps the logits back linearly, one volume at a time; slices and
    scores stay the view's)."""
    if grid.order == (0, 1, 2):
        return result.compact()
    if grid.exact:
        return result.compact().transposed(grid.back_axes)
    from ..prompt.base import OUTSIDE_LOGIT, ObjectResult

    logits = grid.from_view(result.full_logits(), "linear", OUTSIDE_LOGIT)
    return ObjectResult(result.object_id, logits, logits > 0, result.slices, result.scores, result.name)


# ------------------------------------------------------------------------------------------ ROI -> prompt
def prompt_from_extents(extents: Sequence[Extent], object_id: int, shape: Sequence[int], strategy: str = "A",
                        z_range: Optional[tuple[int, int]] = None, name: str = "",
                        points: Sequence[Point2D] = (), view: Optional[Sequence[float]] = None) -> ObjectPrompt:
    """One object's prompt from the inclusive IJK extents ``(i0, i1, j0, j1, k0, k1)`` of its ROIs and its points.

    * One extent spanning several slices: its rectangle on the slices :func:`box_slices` picks (A: middle, B:
      quartiles), its slices as the z-range and its rectangle as the object's in-plane bounds;
    * one flat extent (``k0 == k1``): one box on its slice, no z-range (the engine propagates until the object
      vanishes);
    * several extents (boxes drawn on several slices): one box each on its middle slice (rule A); z-range and
      bounds = the union of the thick ones' (none if all are flat);
    * no extent: the points alone (at least one positive).
    An explicit ``z_range`` overrides the derived one. ``shape`` is the ``(k, j, i)`` of the grid the extents and
    points are in: the volume's, or with ``view`` (the RAS normal of the view they were drawn in) the view grid's
    (:func:`mrisegassist.service.views.view_grid`).
    """
    from ..prompt.strategies import box_slices

    if not extents and not points:
        raise InputError(f"object {object_id}: no box given")
    thick = [e for e in extents if e[5] > e[4]]
    if len(extents) == 1:
        i0, i1, j0, j1, k0, k1 = extents[0]
        boxes = [Box2D(k, i0, j0, i1, j1) for k in box_slices((k0, k1), strategy)]
    else:
        box_slices((0, 0), strategy)  # an unknown strategy fails the same way with several boxes
        boxes = [Box2D(box_slices((k0, k1), "A")[0], i0, j0, i1, j1) for i0, i1, j0, j1, k0, k1 in extents]
    bounds = (min(e[0] for e in thick), min(e[2] for e in thick), max(e[1] for e in thick),
              max(e[3] for e in thick)) if thick else None
    derived = (min(e[4] for e in thick), max(e[5] for e in thick)) if thick else None
    zr = tuple(int(z) for z in z_range) if z_range is not None else derived
    view = tuple(float(v) for v in view) if view is not None else None
    return ObjectPrompt(object_id, boxes, zr, name, bounds, list(points), view).validate(shape)


def weights_status(engine: str) -> WeightsStatus:
    """Whether ``engine``'s weights are installed on this machine (never downloads)."""
    from ..errors import CheckpointError
    from ..prompt import engine_spec

    spec = engine_spec(engine)
    status = WeightsStatus(engine, spec.needs_weights, not spec.needs_weights, spec.licence, "no weights needed")
    if not spec.needs_weights:
        return status
    try:
        from ..prompt import weights

        entry = weights.catalog_entry(engine)
    except (ImportError, InputError) as exc:
        return dataclasses.replace(status, message="no checkpoint catalog for this engine", details=str(exc))
    size_mb = entry.as_dict()["approx_mb"]
    status = dataclasses.replace(status, licence=f"{spec.licence}; checkpoint: {entry.licence}", url=entry.url,
                                 size_mb=size_mb)
    try:
        path = str(weights.resolve_checkpoint(engine, download=False))
        return dataclasses.replace(status, path=path, available=True, message="weights installed")
    except CheckpointError as exc:
        message = f"not installed ({size_mb} MB download)" if size_mb else "not installed"
        return dataclasses.replace(status, message=message, details=str(exc))


# ----------------------------------------------------------------------------------------------- caches
class PreparedCache:
    """Engines' prepared volumes, keyed by ``(engine, device, checkpoint, voxel fingerprint)``, and targets'
    atlas registrations (:meth:`mrisegassist.atlas.space.CommonSpace.register_target`); the least recently used
    beyond ``size`` are dropped. Thread-safe; ``prepared`` counts actual preparations."""

    def __init__(self, size: int = 2) -> None:
        self.size = int(size)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.prepared = 0

    def get(self, key: tuple, make: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        handle = make()
        with self._lock:
            self.prepared += 1
            self._items[key] = handle
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return handle

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------------------------- service
class Service:
    """Models, engines and prepared volumes held between calls; one method per request type (see module doc).

    ``device``: torch device for models and engines (default: the best available); a request's ``device``
    overrides it. ``confined``: refuse file paths and downloads in requests (a shared server). Thread-safe:
    several requests may run at once (each with its own ``cache`` if given, e.g. one per client session).
    """

    def __init__(self, device: Optional[str] = None, *, confined: bool = False, prepared_cache_size: int = 2) -> None:
        self.device = device or available_devices()[0]
        self.confined = confined
        self.cache = PreparedCache(prepared_cache_size)
        self._segmenters: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def _cache(self, cache: Optional[PreparedCache]) -> PreparedCache:
        """``cache`` (a client session's, even while empty), else the service's own."""
        return self.cache if cache is None else cache

    # ------------------------------------------------------------------------------------ dispatch
    def run(self, request, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
            cache: Optional[PreparedCache] = None):
        """Run any request (see :mod:`.api`); ``cache`` replaces the service's prepared-volume cache."""
        check_request(request)
        if isinstance(request, AutoSegmentRequest):
            return self.auto_segment(request, progress, cancel)
        if isinstance(request, PromptRequest):
            return self.prompt(request, progress, cancel, cache)
        if isinstance(request, AtlasBoxesRequest):
            return self.atlas_boxes(request, progress, cancel, cache)
        if isinstance(request, AutoRequest):
            return self.auto(request, progress, cancel, cache)
        if isinstance(request, DownloadWeightsRequest):
            return self.download_weights(request, progress, cancel)
        raise InputError(f"not a service request: {type(request).__name__}")

    # ---------------------------------------------------------------------------------- discovery
    def info(self) -> ServiceInfo:
        """Version, devices, installed models, engines (with their weights here) and atlas reference sets."""
        from ..prompt import list_engines

        models = []
        try:
            from ..unet.entries import list_models

            models = [ModelInfo(e.name, e.title_or_name, list(e.inputs), [lab["name"] for lab in e.labels],
                                e.licence) for e in list_models()]
        except ImportError:  # no torch here: nothing can run a model anyway
            pass
        engines = []
        for spec in list_engines():
            status = self.weights_status(spec["name"])
            engines.append(EngineInfo(spec["name"], spec["description"], spec["needs_weights"], status.licence,
                                      status.available, status.message))
        refs, reason = [], ""
        try:
            from ..atlas.references import builtin_names

            refs = [f"builtin:{name}" for name in builtin_names()]
        except ImportError as exc:
            reason = f"registration-atlas boxes are not available here ({exc})"
        return ServiceInfo(__version__, self.device, available_devices(), models, engines, refs, reason)

    def weights_status(self, engine: str) -> WeightsStatus:
        """Whether ``engine``'s weights are installed here (never downloads)."""
        return weights_status(engine)

    def download_weights(self, request: DownloadWeightsRequest, progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelToken] = None) -> WeightsStatus:
        if self.confined:
            raise InputError("this server downloads no weights on request: install them on the server "
                             "(mrisegassist prompt ... --download, or into $MRISEGASSIST_WEIGHTS)")
        from ..prompt import weights

        weights.resolve_checkpoint(request.engine, download=True, progress=progress, cancel=cancel)
        return self.weights_status(request.engine)

    # ------------------------------------------------------------------------------------- checks
    def _local(self, value: Optional[str], what: str) -> None:
        """Refuse a path-like value on a confined service."""
        if self.confined and value is not None:
            text = str(value)
            if "/" in text or "\\" in text or text.startswith(".") or Path(text).suffix:
                raise InputError(f"{what} {text!r}: this server accepts no file paths, only the names of what is "
                                 f"installed on it")

    # ---------------------------------------------------------------------------------- U-Net
    def _segmenter(self, model: str, device: str, download: bool = False, trust_code: bool = False,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
        from ..unet.entries import get_model
        from ..unet.inference import UNetSegmenter

        entry = get_model(model, trust_code=trust_code)
        weights = (entry.weights, *(m["weights"] for m in entry.members))  # a member's file alone is another model
        key = (str(entry.folder or entry.name), weights, device, trust_code)
        with self._lock:
            segmenter = self._segmenters.get(key)
        if segmenter is None:  # loading (and a download) runs outside the lock: it reports progress, can cancel
            segmenter = UNetSegmenter(entry, device, download=download, trust_code=trust_code, progress=progress,
                                      cancel=cancel)
            with self._lock:
                segmenter = self._segmenters.setdefault(key, segmenter)
        return segmenter

    def auto_segment(self, request: AutoSegmentRequest, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """U-Net label map on the reference sequence's grid, with the model's label names/colours/terminology."""
        from ..unet.inference import UNetSegmenter
        from ..volume import load_case

        self._local(request.model, "model")
        if request.trust_code and self.confined:
            raise InputError("this server never runs code from model folders (trust_code is refused)")
        t0 = time.perf_counter()
        check(cancel)
        report(progress, 0.0, "loading the model")
        segmenter = self._segmenter(request.model, request.device or self.device, request.download,
                                    request.trust_code, sub_progress(progress, 0.0, 0.05), cancel)
        if request.min_component_mm3 is not None:  # a variant sharing the loaded network
            segmenter = UNetSegmenter(segmenter.entry, segmenter.device, segmenter.batch_size, segmenter.overlap,
                                      request.min_component_mm3, network=segmenter.network)
        entry = segmenter.entry
        unused_sequences(request.inputs, entry.inputs, f"model {entry.name!r}")
        missing = [s for s in entry.inputs if s not in request.inputs]
        if missing:
            raise InputError(f"model {entry.name!r} needs sequence(s) {', '.join(entry.inputs)}; "
                             f"given {', '.join(request.inputs) or 'none'}")
        reference = request.reference or entry.inputs[0]
        if reference not in request.inputs:
            raise InputError(f"reference sequence {reference!r} is not among the inputs "
                             f"({', '.join(request.inputs)})")
        report(progress, 0.02, "reading inputs")
        case = load_case({reference: request.inputs[reference],
                          **{s: request.inputs[s] for s in entry.inputs if s != reference}}, reference)
        labelmap = segmenter.segment(case, progress=sub_progress(progress, 0.05, 1.0), cancel=cancel)
        ml = labelmap.geometry.voxel_volume_ml
        counts = label_counts(labelmap.volume.array, max([i.value for i in labelmap.labels], default=0) + 1)
        objects = [ObjectSummary(i.value, i.name, int(counts[i.value]), float(counts[i.value]) * ml)
                   for i in labelmap.labels]
        return SegmentationResult("auto-segment", labelmap, objects, model=entry.name,
                                  timings={**segmenter.timings, "total_s": time.perf_counter() - t0})

    # -------------------------------------------------------------------------------- prompts
    def _engine_input(self, volume: Volume, extra: dict, engine) -> np.ndarray:
        """``[k, j, i]``, or ``[c, k, j, i]`` float32 (channel 0 = ``volume``) for engines with channels."""
        if not extra or not getattr(engine, "accepts_channels", False):
            return volume.array
        channels = [volume.array.astype(np.float32, copy=False)]
        for name, other in extra.items():
            if not isinstance(other, Volume):
                raise InputError(f"extra sequence {name!r}: expected a volume with its geometry")
            channels.append(resample_to(other, volume.geometry, "linear").array.astype(np.float32, copy=False))
        return np.stack(channels)

    def _segment(self, volume: Volume, prompts: Sequence[ObjectPrompt], engine_name: str, *,
                 cascade: Optional[str] = None, strategy: str = "A", no_cascade: Sequence[int] = (),
                 labels: Sequence[LabelInfo] = (), extra: Optional[dict] = None, checkpoint: Optional[str] = None,
                 download: bool = False, keep_all_components: bool = False, device: Optional[str] = None,
                 cache: Optional[PreparedCache] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """THE prompted pipeline: per view (:mod:`.views`: the volume reoriented so the view's slices are ``k``)
        prepare (cached) -> segment (points: the rules of :mod:`.points`, with the engine's own seeds where it
        reads them) -> cascade;
        results mapped back onto ``volume``'s grid -> fuse -> named label map."""
        from ..atlas.cascade import CASCADES, run_cascade
        from ..prompt import engine_spec, get_engine
        from ..prompt.fusion import fuse
        from ..prompt.propagation import validate_prompts
        from ..prompt.strategies import box_slices
        from . import points as point_rules

        engine_spec(engine_name)  # unknown names fail before any work
        if cascade is not None and cascade not in CASCADES:
            raise InputError(f"unknown cascade {cascade!r}; use C or D")
        box_slices((0, 0), strategy)
        if not prompts:
            raise InputError("no object to segment (no box, no structure found, no mask component)")
        self._local(checkpoint, "checkpoint")
        if download and self.confined:
            raise InputError("this server downloads no weights on request: install them on the server")
        ids = [p.object_id for p in prompts]
        if len(set(ids)) != len(ids):
            raise InputError(f"object id(s) {sorted({i for i in ids if ids.count(i) > 1})} given more than once")
        groups: OrderedDict = OrderedDict()
        for p in prompts:
            key = tuple(float(v) for v in unit(p.view)) if p.view is not None else None
            groups.setdefault(key, []).append(p)
        grids = {key: view_grid(volume.geometry, key) for key in groups}
        checked = {key: validate_prompts(group, grids[key].geometry.shape) for key, group in groups.items()}
        device = device or self.device
        t0 = time.perf_counter()
        check(cancel)
        report(progress, 0.0, f"loading {engine_name}")
        engine = get_engine(engine_name, device=device, checkpoint=checkpoint, download=download)
        used, first, final, grid_of = {}, {}, {}, {}
        timing = {"prepare_s": 0.0, "segment_s": 0.0, "cascade_s": 0.0}
        share = 0.95 / len(groups)
        for n, (key, group) in enumerate(checked.items()):
            grid = grids[key]
            base = n * share
            image = volume.array if grid.order == (0, 1, 2) else grid.to_view(volume.array)
            array = self._engine_input(Volume(image, grid.geometry, volume.name), dict(extra or {}), engine)
            ta = time.perf_counter()
            prepared = self._cache(cache).get(
                (engine_name, str(device), checkpoint, fingerprint(array)),
                lambda: engine.prepare(array, progress=sub_progress(progress, base, base + 0.3 * share),
                                       cancel=cancel))
            tb = time.perf_counter()
            stop = base + (0.6 if cascade else 0.95) * share
            seg_progress = sub_progress(progress, base + 0.3 * share, stop)
            if point_rules.has_points(group):
                results, group = point_rules.segment_with_points(engine, prepared, group, grid.geometry.shape,
                                                                 grid.geometry.spacing, seg_progress, cancel)
            else:
                results = engine.segment(prepared, group, progress=seg_progress, cancel=cancel)
            results = [r.compact() for r in results]  # an engine may hand back full-grid results (SAM 2)
            tc = time.perf_counter()
            second = results
            if cascade:
                report(progress, stop, f"cascade {cascade}")
                second = run_cascade(engine, prepared, results, cascade, strategy, no_cascade,
                                     progress=sub_progress(progress, stop, base + 0.95 * share), cancel=cancel)
            timing["prepare_s"] += tb - ta
            timing["segment_s"] += tc - tb
            timing["cascade_s"] += time.perf_counter() - tc
            for p, a, b in zip(group, results, second):
                used[p.object_id], grid_of[p.object_id] = p, grid
                first[p.object_id] = _on_source_grid(a, grid)
                final[p.object_id] = _on_source_grid(b, grid)
        check(cancel)
        report(progress, 0.95, "fusing objects")
        t3 = time.perf_counter()
        ordered = [final[i] for i in ids]
        keep = {i: [grid_of[i].source_index(q) for q in used[i].positive_points] for i in ids}
        if keep_all_components or not any(keep.values()):
            fused = fuse(ordered, keep_largest_component=not keep_all_components)
        else:  # the largest component of each object, and every component one of its positive points is on
            fused = point_rules.keep_components(fuse(ordered, keep_largest_component=False), keep)
        given = {info.value: info for info in labels}
        infos = [given.get(i) or LabelInfo(i, used[i].name or f"object-{i}", default_color(i)) for i in ids]
        labelmap = LabelMap(volume.with_array(fused, f"{volume.label} labels"), infos)
        ml = volume.geometry.voxel_volume_ml
        counts = label_counts(fused, max(ids) + 1)
        skipped = set(int(v) for v in no_cascade)
        objects = []
        for i, info in zip(ids, infos):
            p, a, b = used[i], first[i], final[i]
            objects.append(ObjectSummary(
                i, info.name, int(counts[i]), float(counts[i]) * ml, list(p.boxes), p.z_range,
                [int(k) for k in b.slices], float(np.mean(list(b.scores.values()))) if b.scores else None,
                float(a.mask.sum()) * ml, bool(cascade) and i not in skipped and bool(a.mask.any()),
                list(p.points), p.view, grid_of[i].slice_axis))
        report(progress, 1.0, "done")
        return SegmentationResult("prompt", labelmap, objects, engine=engine_name, cascade=cascade, timings={
            **timing, "fuse_s": time.perf_counter() - t3, "total_s": time.perf_counter() - t0})

    def prompt(self, request: PromptRequest, progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelToken] = None, cache: Optional[PreparedCache] = None) -> SegmentationResult:
        """Box prompts -> engine -> (cascade) -> fused label map on ``request.volume``'s grid."""
        return self._segment(request.volume, request.objects, request.engine, cascade=request.cascade,
                             strategy=request.strategy, no_cascade=request.no_cascade, labels=request.labels,
                             extra=request.extra, checkpoint=request.checkpoint, download=request.download,
                             keep_all_components=request.keep_all_components, device=request.device, cache=cache,
                             progress=progress, cancel=cancel)

    # ---------------------------------------------------------------------------------- atlas
    def _reference_set(self, request: AtlasBoxesRequest, progress, cancel):
        from ..atlas.references import builtin_names, load_reference_set

        reference = request.reference or f"builtin:{builtin_names()[0]}"
        if not str(reference).startswith("builtin:"):
            self._local(reference, "reference set")
        refset = load_reference_set(reference, request.structures, progress=progress, cancel=cancel)
        if request.augment:
            from ..atlas.augment import augment

            refset = augment(refset, request.augment, progress=progress, cancel=cancel)
        return reference, refset

    def _atlas_setup(self, request: AtlasBoxesRequest, progress, cancel):
        """``(reference, reference set, registration settings)`` of an atlas request."""
        from ..atlas.registration import FAST

        changes = {}
        if request.deformable:
            changes["deformable"] = request.deformable
        if request.resolution_mm is not None:
            changes["resolution_mm"] = request.resolution_mm
        settings = dataclasses.replace(FAST, **changes) if changes else FAST
        reference, refset = self._reference_set(request, progress, cancel)
        return reference, refset, settings

    def _atlas(self, request: AtlasBoxesRequest, progress, cancel, setup=None, cache=None):
        """``(reference, AtlasBoxes with score maps)``; ``setup``: :meth:`_atlas_setup`'s result if made. The
        target's registration is kept in ``cache`` (default: the service's) with the prepared volumes unless
        ``request.use_cache`` is off: asking again on the same volume (other structures, thresholds or
        strategy) does not register it again."""
        from ..atlas.auto import atlas_boxes

        start = 0.0 if setup is not None else 0.2
        reference, refset, settings = setup or self._atlas_setup(request, sub_progress(progress, 0.0, 0.2), cancel)
        boxes = atlas_boxes(request.volume, refset, request.strategy, settings=settings,
                            thresholds=dict(request.thresholds) or None, workers=request.workers,
                            cache=None if request.use_cache else False, progress=sub_progress(progress, start, 1.0),
                            cancel=cancel, memo=self._cache(cache).get if request.use_cache else None)
        return reference, boxes

    def _atlas_rules(self, request: AtlasBoxesRequest, setup, engine: str, device: Optional[str],
                     progress: Optional[ProgressFn], cancel: Optional[CancelToken]):
        """``(rules, how, learnt)``: the per-structure rules of ``engine`` on the request's references
        (:mod:`mrisegassist.atlas.refine`): shipped with the package for the built-in sets, else cached, else
        learnt now on the references (progress, cancel; cached for the next time). The request's thresholds
        replace the rules of their structures."""
        from ..atlas.refine import find_rules, learn_refinement
        from .checks import warn

        reference, refset, settings = setup
        builtin = reference.split(":", 1)[1] if reference.startswith("builtin:") else None
        cache = None if request.use_cache else False
        engine = None if engine == ATLAS_ENGINE else engine
        rules, how = find_rules(refset, engine, builtin=builtin, augment=request.augment, settings=settings,
                                strategy=request.strategy, cache=cache)
        learnt = rules is None
        if learnt:
            if builtin is not None:
                warn(f"atlas rules for {reference}: {how}; learning them on the references now (cached)")
            report(progress, 0.0, f"learning the atlas rules on {len(refset.references)} references")
            rules = learn_refinement(refset, engine, settings=settings, strategy=request.strategy,
                                     workers=request.workers, cache=cache, device=device or self.device,
                                     progress=progress, cancel=cancel)
            how = f"learnt: {rules.evidence}"
        elif how != rules.evidence:
            how = f"{how}: {rules.evidence}"
        return rules.with_thresholds(dict(request.thresholds)), how, learnt

    @staticmethod
    def _apply_rules(result: SegmentationResult, boxes, rules, how: str) -> SegmentationResult:
        """``result`` (the engine's, or the atlas's own with ``result.engine == "atlas"``) with its label map
        replaced by the rules' (:func:`mrisegassist.atlas.refine.refine_labels`) and its objects recounted."""
        from ..atlas.refine import refine_labels

        engine = result.engine != ATLAS_ENGINE
        refined = refine_labels(boxes, result.array if engine else None, rules)
        volume = result.labels.volume
        counts = label_counts(refined, max([o.label for o in result.objects], default=0) + 1)
        ml = volume.geometry.voxel_volume_ml
        structures = {score.structure.name: score.structure for score in boxes.scores}
        objects = [dataclasses.replace(o, voxels=int(counts[o.label]), volume_ml=float(counts[o.label]) * ml,
                                       rule=rules.rule(structures[o.name]).kind if engine else "fusion")
                   for o in result.objects]
        labels = LabelMap(volume.with_array(refined, volume.name), result.labels.labels)
        return dataclasses.replace(result, labels=labels, objects=objects, rules=how)

    def atlas_boxes(self, request: AtlasBoxesRequest, progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelToken] = None, cache: Optional[PreparedCache] = None) -> AtlasBoxesResult:
        """Atlas boxes of every structure (those not found carry their reason)."""
        t0 = time.perf_counter()
        reference, boxes = self._atlas(request, progress, cancel, cache=cache)
        return AtlasBoxesResult(dataclasses.replace(boxes, scores=None), reference,
                                {**boxes.timings, "total_s": time.perf_counter() - t0})

    # ----------------------------------------------------------------------------- auto pipeline
    def auto(self, request: AutoRequest, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
             cache: Optional[PreparedCache] = None) -> SegmentationResult:
        """Automatic prompts (atlas boxes, given boxes, a mask or a U-Net's output) -> engine -> label map.

        With atlas references and ``request.refine`` (the default), each structure's label then follows the rule
        learnt on the references (:mod:`mrisegassist.atlas.refine`: label fusion at a learnt threshold, the
        engine's mask, or a combination; with ``engine="atlas"`` fusion at the learnt thresholds), shipped for the
        built-in sets, else learnt once and cached; ``ObjectSummary.rule`` and ``SegmentationResult.rules`` say
        which and where from. A structure given a threshold in the request keeps no rule (fusion at that level,
        the engine's mask with an engine)."""
        from ..atlas.auto import atlas_result, mask_prompts

        sources = [s for s in ("atlas", "boxes", "mask", "unet") if getattr(request, s) is not None]
        if len(sources) != 1:
            raise InputError(f"give exactly one prompt source (atlas, boxes, mask or unet), got "
                             f"{', '.join(sources) or 'none'}")
        if request.engine == ATLAS_ENGINE and request.atlas is None:
            raise InputError("engine 'atlas' labels from the atlas score maps: it needs atlas boxes computed now "
                             "(--references), not boxes read from a file")
        if request.engine != ATLAS_ENGINE:
            from ..prompt import engine_spec

            engine_spec(request.engine)  # an unknown engine fails before any registration or learning
        target = request.volume
        t0 = time.perf_counter()
        boxes, prompts, split, rules = None, None, 0.5, None
        if request.atlas is not None:
            atlas = dataclasses.replace(request.atlas, volume=target, strategy=request.strategy)
            setup = self._atlas_setup(atlas, sub_progress(progress, 0.0, 0.05), cancel)
            start = 0.05
            if request.refine:
                learn = sub_progress(progress, 0.05, 0.5)
                rules, how, learnt = self._atlas_rules(atlas, setup, request.engine, request.device, learn, cancel)
                start = 0.5 if learnt else start  # a learning run took the first half
            split = (start + 1.0) / 2  # boxes, then the engine
            stop = 0.95 if request.engine == ATLAS_ENGINE else split
            _, boxes = self._atlas(atlas, sub_progress(progress, start, stop), cancel, setup, cache)
            if request.engine == ATLAS_ENGINE:
                labelmap = atlas_result(target, boxes)
                counts = label_counts(labelmap.volume.array, len(boxes.structures) + 1)
                ml = target.geometry.voxel_volume_ml
                objects = [ObjectSummary(s.value, s.name, int(counts[s.value]), float(counts[s.value]) * ml,
                                         list(s.boxes), s.z_range, first_pass_ml=s.volume_ml)
                           for s in boxes.found()]
                result = SegmentationResult("auto", labelmap, objects, engine=ATLAS_ENGINE,
                                            not_found=[NotFound(s.name, s.reason) for s in boxes.not_found()],
                                            boxes=dataclasses.replace(boxes, scores=None),
                                            timings={**{f"atlas_{k}": v for k, v in boxes.timings.items()},
                                                     "total_s": time.perf_counter() - t0})
                return result if rules is None else self._apply_rules(result, boxes, rules, how)
        elif request.boxes is not None:
            boxes = request.boxes
            if not boxes.geometry.same_as(target.geometry, atol=1e-3):
                raise InputError(f"the boxes were made for another grid than {target.label}")
            split = 0.0
        elif request.mask is not None:
            prompts = mask_prompts(request.mask, target, request.strategy, request.min_voxels)
            split = 0.0
        else:
            labels = self.auto_segment(request.unet, sub_progress(progress, 0.0, split), cancel).labels
            fg = labels.volume.with_array((labels.volume.array > 0).astype(np.uint8), "U-Net foreground")
            prompts = mask_prompts(fg, target, request.strategy, request.min_voxels)
        infos, no_cascade = [], []
        if boxes is not None:
            found = boxes.found()
            if not found:
                raise InputError("no structure was found on the target: " +
                                 "; ".join(f"{s.name}: {s.reason}" for s in boxes.structures))
            prompts = boxes.prompts()
            infos = [LabelInfo(s.value, s.name, tuple(s.color)) for s in found]
            no_cascade = [s.value for s in found if not s.cascade]
        result = self._segment(target, prompts, request.engine, cascade=request.cascade, strategy=request.strategy,
                               no_cascade=no_cascade, labels=infos, extra=request.extra, device=request.device,
                               cache=cache,
                               progress=sub_progress(progress, split, 1.0), cancel=cancel)
        result.workflow = "auto"
        if rules is not None:
            result = self._apply_rules(result, boxes, rules, how)
        if boxes is not None:
            result.boxes = dataclasses.replace(boxes, scores=None)
            result.not_found = [NotFound(s.name, s.reason) for s in boxes.not_found()]
            result.timings.update({f"atlas_{k}": v for k, v in boxes.timings.items()})
        result.timings["total_s"] = time.perf_counter() - t0
        return result

    # ---------------------------------------------------------------------------------- memory
    def release(self) -> None:
        """Free every loaded model, engine and prepared volume (and GPU memory)."""
        with self._lock:
            segmenters = list(self._segmenters.values())
            self._segmenters.clear()
        self.cache.clear()
        for segmenter in segmenters:
            release = getattr(segmenter, "release", None)
            if release is not None:
                release()
        from ..prompt import release_engines

        release_engines()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
