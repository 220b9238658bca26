"""MRML logic of MRISegAssist: MRML nodes in, engine calls, segments out. No Qt; usable headless.

The same class serves the Slicer panel, the Python console and the browser front end::

    logic = MRISegAssistLogic()                                   # in Slicer: slicer.mrmlScene
    inputs = logic.guess_inputs()                                 # {"flair": node, "t1c": node, ...}
    seg = logic.auto_segment(inputs, model="glioma-...")          # U-Net -> segmentation node
    seg = logic.segment_from_rois(inputs["flair"], [roi1, roi2])  # boxes -> 3D masks (classical engine)
    logic.undo_last()                                             # previous segment state, exactly

Every workflow exists as a :class:`~MRISegAssistLib.tasks.Job` (``*_job`` methods): MRML inputs are read
when the job is made, engine work happens in ``compute`` (safe in a worker thread), MRML writes in ``apply``
(main thread). The plain methods run both phases synchronously. Input volumes are only ever read (their
voxels are copied before engine work). Models and engines stay loaded across calls until
:meth:`MRISegAssistLogic.release_models`.
"""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo
from mrisegassist.progress import CancelToken, ProgressFn, check, report
from mrisegassist.volume import load_case

from . import nodes
from .tasks import Job

DEFAULT_ENGINE = "classical"
ATLAS_UNAVAILABLE = ("registration-atlas boxes are not available in this version of the engine "
                     "(mrisegassist.atlas has no atlas_boxes)")
#: ROI node attributes set by :meth:`MRISegAssistLogic.atlas_boxes`: segment colour ("r,g,b") and whether the
#: structure takes part in the cascade ("1" / "0").
ROI_COLOR = "MRISegAssist.Color"
ROI_CASCADE = "MRISegAssist.Cascade"
#: Colours of prompted objects (object n gets entry (n - 1) % len).
OBJECT_COLORS = [(0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.95, 0.75, 0.10), (0.20, 0.75, 0.30),
                 (0.70, 0.30, 0.85), (0.95, 0.45, 0.10), (0.10, 0.80, 0.80), (0.85, 0.40, 0.60)]

RoiGroup = Union[object, Sequence[object]]


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
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


@dataclass
class UndoEntry:
    """State of one segmentation node before a run: ``snapshot`` (a deep copy of its ``vtkSegmentation``)
    or ``None`` when the run created the node; ``created`` = IDs of nodes the run added."""

    description: str
    segmentation_id: Optional[str]
    snapshot: object = None
    created: list[str] = field(default_factory=list)


class MRISegAssistLogic:
    """Segmentation workflows on an MRML scene (``slicer.mrmlScene`` by default)."""

    def __init__(self, scene=None, device: Optional[str] = None, max_undo: int = 10) -> None:
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.device = device or available_devices()[0]
        self.max_undo = max_undo
        self.last_summary: dict = {}
        self._undo: list[UndoEntry] = []
        self._segmenters: dict[tuple[str, str], object] = {}
        self._prepared: OrderedDict = OrderedDict()  # (engine, device, checkpoint, fingerprint) -> handle
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- discovery
    @staticmethod
    def available_devices() -> list[str]:
        return available_devices()

    @staticmethod
    def list_models() -> list:
        """Installed U-Net models (``ModelEntry``: ``.name``, ``.title``, ``.inputs``, ``.labels``, ``.licence``)."""
        from mrisegassist.unet.entries import list_models

        return list_models()

    @classmethod
    def model_choices(cls) -> list[dict]:
        """``[{"name", "title", "inputs", "labels", "licence"}]`` of the installed models. Before PyTorch is
        installed (first start in Slicer) the shipped models' ``model.json`` files are read directly."""
        try:
            entries = [e.to_dict() for e in cls.list_models()]
        except ImportError:
            import json
            from pathlib import Path

            import mrisegassist

            folder = Path(mrisegassist.__file__).parent / "models"
            entries = [json.loads(p.read_text()) for p in sorted(folder.glob("*/model.json"))]
        return [{"name": e["name"], "title": e.get("title") or e["name"], "inputs": list(e.get("inputs", [])),
                 "labels": [lab["name"] for lab in e.get("labels", [])], "licence": e.get("licence", "")}
                for e in entries]

    @classmethod
    def default_model(cls) -> Optional[str]:
        """The shipped glioma model's name (else the first model), or ``None`` when none is installed."""
        names = [m["name"] for m in cls.model_choices()]
        return next((n for n in names if n.startswith("glioma")), names[0] if names else None)

    @staticmethod
    def list_engines() -> list[dict]:
        """Promptable engines: ``[{"name", "description", "needs_weights", "licence"}, ...]``."""
        from mrisegassist.prompt import list_engines

        return list_engines()

    @staticmethod
    def weights_status(engine: str) -> dict:
        """Weights of an engine, without downloading: ``{"engine", "needs_weights", "available", "path",
        "licence", "url", "size_mb", "message", "details"}`` (``details``: the full reason when missing)."""
        from mrisegassist.errors import CheckpointError
        from mrisegassist.prompt import engine_spec

        spec = engine_spec(engine)
        status = {"engine": engine, "needs_weights": spec.needs_weights, "available": not spec.needs_weights,
                  "path": None, "licence": spec.licence, "url": None, "size_mb": None,
                  "message": "no weights needed", "details": ""}
        if not spec.needs_weights:
            return status
        try:
            from mrisegassist.prompt import weights

            entry = weights.catalog_entry(engine)
        except (ImportError, InputError) as exc:
            status.update(message="no checkpoint catalog for this engine", details=str(exc))
            return status
        size_mb = entry.as_dict()["approx_mb"]
        status.update(licence=f"{spec.licence}; checkpoint: {entry.licence}", url=entry.url, size_mb=size_mb)
        try:
            status["path"] = str(weights.resolve_checkpoint(engine, download=False))
            status.update(available=True, message="weights installed")
        except CheckpointError as exc:
            status.update(message=f"not installed ({size_mb} MB download)" if size_mb else "not installed",
                          details=str(exc))
        return status

    def download_weights_job(self, engine: str) -> Job:
        """Download (resumable, verified) the checkpoint of ``engine``; ``apply`` returns its path."""
        from mrisegassist.prompt import weights

        def compute(progress, cancel):
            return str(weights.resolve_checkpoint(engine, download=True, progress=progress, cancel=cancel))

        return Job(f"download {engine} weights", compute, lambda path: path)

    def guess_inputs(self, volume_nodes=None, overrides: Optional[Mapping[str, object]] = None) -> dict:
        """``{sequence: volume node}`` guessed from the names of ``volume_nodes`` (default: the scene's scalar
        volumes): ``flair`` (FLAIR, t2f), ``t1c`` (t1c, t1ce, post, gad), ``t1`` (t1, t1n, t1w), ``t2`` (t2, t2w).
        ``overrides`` replaces guesses (``None`` removes one)."""
        if volume_nodes is None:
            volume_nodes = nodes.scalar_volume_nodes(self.scene)
        return nodes.guess_sequences(volume_nodes, overrides)

    # --------------------------------------------------------------------------------- auto-segmentation
    def auto_segment(self, input_nodes: Mapping[str, object], model: Optional[str] = None,
                     segmentation_node=None, reference: Optional[str] = None, device: Optional[str] = None,
                     progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
        """Segment with a U-Net model; returns the segmentation node (created if ``None``).

        ``input_nodes`` maps sequence names (``flair``, ``t1c``, ...) to scalar volume nodes; the model's
        inputs must be present. The output is on the grid of ``reference`` (default: the model's first
        input); segments get the model's label names, colours and terminology, replacing same-named ones.
        """
        return self.auto_segment_job(input_nodes, model, segmentation_node, reference, device).run(progress, cancel)

    def auto_segment_job(self, input_nodes: Mapping[str, object], model: Optional[str] = None,
                         segmentation_node=None, reference: Optional[str] = None,
                         device: Optional[str] = None) -> Job:
        from mrisegassist.unet.entries import get_model

        model = model or self.default_model()
        if model is None:
            raise InputError("no U-Net model is installed")
        entry = get_model(model)
        missing = [s for s in entry.inputs if input_nodes.get(s) is None]
        if missing:
            raise InputError(f"model {entry.name!r} needs sequence(s) {', '.join(entry.inputs)}; select "
                             f"{', '.join(missing)} in Inputs")
        reference = reference or entry.inputs[0]
        if reference not in entry.inputs:
            raise InputError(f"reference {reference!r} is not an input of model {entry.name!r} "
                             f"({', '.join(entry.inputs)})")
        reference_node = input_nodes[reference]
        volumes = {s: nodes.volume_from_node(input_nodes[s], s) for s in entry.inputs}
        device = device or self.device

        def compute(progress, cancel):
            check(cancel)
            report(progress, 0.0, "reading inputs")
            case = load_case({reference: volumes[reference],
                              **{s: v for s, v in volumes.items() if s != reference}}, reference)
            segmenter = self._segmenter(entry, device)
            return segmenter.segment(case, progress=sub_progress(progress, 0.05, 1.0), cancel=cancel)

        def apply(labelmap):
            labels = np.asarray(labelmap.volume.array)
            counts = {info.name: int(np.count_nonzero(labels == info.value)) for info in labelmap.labels}
            self.last_summary = {"workflow": "auto", "model": entry.name, "voxels": counts}
            return self._write(f"auto-segmentation ({entry.name})", reference_node, segmentation_node,
                               labels, labelmap.labels)

        return Job(f"auto-segmentation with {entry.name}", compute, apply)

    def _segmenter(self, entry, device: str):
        from mrisegassist.unet.inference import UNetSegmenter

        key = (entry.name, device)
        with self._lock:
            segmenter = self._segmenters.get(key)
            if segmenter is None:
                segmenter = self._segmenters[key] = UNetSegmenter(entry, device)
        return segmenter

    # ---------------------------------------------------------------------------------- box prompts
    def segment_from_rois(self, volume_node, rois: Sequence[RoiGroup], engine: str = DEFAULT_ENGINE,
                          segmentation_node=None, strategy: str = "A", z_range: Optional[tuple[int, int]] = None,
                          names: Optional[Sequence[str]] = None, cascade: Optional[str] = None,
                          checkpoint: Optional[str] = None, device: Optional[str] = None,
                          progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None):
        """Segment objects in 3D from Markups ROIs on ``volume_node``; returns the segmentation node.

        ``rois``: one entry per object, either a ROI node or a list of ROI nodes (boxes on several slices of
        one object). A ROI spanning several slices also bounds the object (its slices and its rectangle on each
        slice); ``strategy`` ``"A"`` prompts its middle slice, ``"B"`` its quartile slices; a flat ROI prompts
        its slice and the engine propagates until the object vanishes. ``z_range`` (inclusive slice indices
        ``k``) overrides the slice bounds of every object. Segments are named after the ROIs (or ``names``) and
        replaced on re-run; ROIs from :meth:`atlas_boxes` give their structure's colour. ``cascade`` (``"C"`` or
        ``"D"``, needs the atlas package) adds a second pass prompted from each first-pass mask (``D``: boxes
        enlarged 10 % in area, slices 20 %), skipping atlas structures marked as not cascading.
        """
        return self.segment_from_rois_job(volume_node, rois, engine, segmentation_node, strategy, z_range, names,
                                          cascade, checkpoint, device).run(progress, cancel)

    def segment_from_rois_job(self, volume_node, rois: Sequence[RoiGroup], engine: str = DEFAULT_ENGINE,
                              segmentation_node=None, strategy: str = "A",
                              z_range: Optional[tuple[int, int]] = None, names: Optional[Sequence[str]] = None,
                              cascade: Optional[str] = None, checkpoint: Optional[str] = None,
                              device: Optional[str] = None) -> Job:
        from mrisegassist.prompt import engine_spec

        engine_spec(engine)  # unknown names fail here, before any work
        if not rois:
            raise InputError("no ROI given: place a box (Markups ROI) on the lesion first")
        if names is not None and len(names) != len(rois):
            raise InputError(f"{len(names)} names given for {len(rois)} objects")
        atlas = None
        if cascade is not None:
            atlas = self._atlas()
            if atlas is None:
                raise InputError(f"cascade needs the atlas package: {ATLAS_UNAVAILABLE}")
            if cascade not in ("C", "D"):
                raise InputError(f"unknown cascade {cascade!r}; use 'C' or 'D'")
        prompts, infos, no_cascade = [], [], []
        for n, group in enumerate(rois, start=1):
            group = list(group) if isinstance(group, (list, tuple)) else [group]
            prompt = nodes.prompt_from_rois(volume_node, group, n, strategy, z_range, names[n - 1] if names else "")
            prompts.append(prompt)
            color = group[0].GetAttribute(ROI_COLOR)
            color = tuple(float(c) for c in color.split(",")) if color else OBJECT_COLORS[(n - 1) % len(OBJECT_COLORS)]
            infos.append(LabelInfo(n, prompt.name, color))
            if group[0].GetAttribute(ROI_CASCADE) == "0":
                no_cascade.append(n)
        volume = nodes.volume_from_node(volume_node)
        device = device or self.device
        key = (engine, device, checkpoint, volume_node.GetID(), volume_node.GetImageData().GetMTime(),
               volume.array.shape)

        def compute(progress, cancel):
            from mrisegassist.prompt import get_engine
            from mrisegassist.prompt.fusion import fuse

            model = get_engine(engine, device=device, checkpoint=checkpoint)
            handle = self._prepared_handle(key, model, volume.array, sub_progress(progress, 0.0, 0.3), cancel)
            stop = 0.95 if atlas is None else 0.6
            results = model.segment(handle, prompts, progress=sub_progress(progress, 0.3, stop), cancel=cancel)
            if atlas is not None:
                report(progress, stop, f"cascade {cascade}")
                results = atlas.run_cascade(model, handle, results, cascade, strategy, no_cascade,
                                            progress=sub_progress(progress, stop, 0.95), cancel=cancel)
            check(cancel)
            report(progress, 0.95, "fusing objects")
            return results, fuse(results)

        def apply(outcome):
            results, labels = outcome
            self.last_summary = {"workflow": "prompt", "engine": engine, "cascade": cascade, "objects": [
                {"name": p.name, "boxes": [b.as_tuple() for b in p.boxes], "z_range": p.z_range,
                 "slices": sorted(r.slices), "voxels": int(np.count_nonzero(labels == p.object_id))}
                for p, r in zip(prompts, results)]}
            return self._write(f"box prompts ({engine})", volume_node, segmentation_node, labels, infos)

        return Job(f"box-prompted segmentation with {engine}", compute, apply)

    def _prepared_handle(self, key, model, array: np.ndarray, progress, cancel):
        """The engine's prepared volume, reused while the same volume node is unchanged (no re-encoding)."""
        with self._lock:
            handle = self._prepared.get(key)
            if handle is not None:
                self._prepared.move_to_end(key)
                return handle
        handle = model.prepare(array, progress=progress, cancel=cancel)
        with self._lock:
            self._prepared[key] = handle
            while len(self._prepared) > 2:
                self._prepared.popitem(last=False)
        return handle

    # ------------------------------------------------------------------------------------------- atlas
    @staticmethod
    def _atlas():
        """The engine's atlas package if it offers reference sets and boxes, else ``None``."""
        try:
            import mrisegassist.atlas as atlas
        except ImportError:
            return None
        needed = ("atlas_boxes", "load_reference_set", "builtin_names", "run_cascade")
        return atlas if all(callable(getattr(atlas, name, None)) for name in needed) else None

    @classmethod
    def atlas_available(cls) -> tuple[bool, str]:
        """``(True, "")`` when the engine has registration-atlas boxes, else ``(False, reason)``."""
        return (True, "") if cls._atlas() is not None else (False, ATLAS_UNAVAILABLE)

    @classmethod
    def list_atlas_references(cls) -> list[str]:
        """Built-in reference sets (``builtin:NAME``); a folder or manifest path is accepted too. Empty when the
        atlas is unavailable."""
        atlas = cls._atlas()
        return [] if atlas is None else [f"builtin:{name}" for name in atlas.builtin_names()]

    def atlas_boxes(self, volume_node, reference: Optional[str] = None, structures: Optional[Sequence[str]] = None,
                    strategy: str = "A", progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelToken] = None) -> list:
        """Register an atlas reference set onto ``volume_node`` (usually the T1) and place one Markups ROI per
        structure found (named after it, in its colour), for review before :meth:`segment_from_rois`.

        ``reference``: ``builtin:NAME`` (default: the first built-in) or a reference folder / manifest;
        ``structures`` restricts it by name. Structures not found are listed with their reason in
        ``last_summary["not_found"]`` (never given a silent empty box). Undo removes the ROIs."""
        return self.atlas_boxes_job(volume_node, reference, structures, strategy).run(progress, cancel)

    def atlas_boxes_job(self, volume_node, reference: Optional[str] = None,
                        structures: Optional[Sequence[str]] = None, strategy: str = "A") -> Job:
        atlas = self._atlas()
        if atlas is None:
            raise InputError(ATLAS_UNAVAILABLE)
        reference = reference or (self.list_atlas_references() or [None])[0]
        volume = nodes.volume_from_node(volume_node)

        def compute(progress, cancel):
            refset = atlas.load_reference_set(reference, structures, progress=sub_progress(progress, 0.0, 0.2),
                                              cancel=cancel)
            return atlas.atlas_boxes(volume, refset, strategy, progress=sub_progress(progress, 0.2, 1.0),
                                     cancel=cancel)

        def apply(boxes):
            if volume_node.GetScene() is not self.scene:
                raise InputError(f"volume {volume_node.GetName()!r} was removed from the scene during the run")
            rois = []
            for found in boxes.found():
                i0, j0, k0, i1, j1, k1 = found.bbox
                roi = nodes.roi_from_extent(self.scene, volume_node, (i0, i1, j0, j1, k0, k1), found.name)
                roi.CreateDefaultDisplayNodes()
                roi.GetDisplayNode().SetSelectedColor(*found.color)
                roi.SetAttribute(ROI_COLOR, ",".join(f"{c:.4f}" for c in found.color))
                roi.SetAttribute(ROI_CASCADE, "1" if found.cascade else "0")
                nodes.store_prompt(roi, volume_node, found.prompt(), strategy)
                rois.append(roi)
            self._undo.append(UndoEntry(f"atlas boxes ({boxes.reference_set})", None, None,
                                        [r.GetID() for r in rois]))
            del self._undo[:-self.max_undo]
            self.last_summary = {"workflow": "atlas", "reference": reference, "strategy": strategy,
                                 "found": [f.name for f in boxes.found()],
                                 "not_found": [{"name": f.name, "reason": f.reason} for f in boxes.not_found()]}
            return rois

        return Job(f"atlas boxes ({reference}) on {volume_node.GetName()}", compute, apply)

    # -------------------------------------------------------------------------------------- undo, memory
    def _write(self, description: str, volume_node, segmentation_node, labels: np.ndarray,
               infos: Sequence[LabelInfo]):
        """Write segments (main thread), recording the previous state for :meth:`undo_last`."""
        import slicer

        if volume_node.GetScene() is not self.scene:
            raise InputError(f"volume {volume_node.GetName()!r} was removed from the scene during the run")
        if segmentation_node is not None and segmentation_node.GetScene() is not self.scene:
            raise InputError(f"segmentation {segmentation_node.GetName()!r} is not in the scene (removed during "
                             f"the run?)")
        entry = UndoEntry(description, "")
        if segmentation_node is None:
            segmentation_node = nodes.new_segmentation_node(self.scene, volume_node)
            entry.created.append(segmentation_node.GetID())
        else:
            entry.snapshot = slicer.vtkSegmentation()
            entry.snapshot.DeepCopy(segmentation_node.GetSegmentation())
            if not segmentation_node.GetNodeReference(
                    slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()):
                segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        entry.segmentation_id = segmentation_node.GetID()
        nodes.write_segments(segmentation_node, volume_node, labels, infos)
        self._undo.append(entry)
        del self._undo[:-self.max_undo]
        return segmentation_node

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def undo_last(self) -> Optional[str]:
        """Restore the segmentation changed by the last run exactly as it was, and remove the nodes the run
        created (a new segmentation, atlas ROIs). Returns the run's description, or ``None`` when there is
        nothing to undo."""
        if not self._undo:
            return None
        entry = self._undo.pop()
        for node_id in entry.created:
            node = self.scene.GetNodeByID(node_id)
            if node is not None:
                self.scene.RemoveNode(node)
        node = self.scene.GetNodeByID(entry.segmentation_id) if entry.segmentation_id else None
        if entry.snapshot is not None and node is not None:
            was_modified = node.StartModify()
            node.GetSegmentation().DeepCopy(entry.snapshot)
            node.EndModify(was_modified)
        return entry.description

    def forget_scene(self) -> None:
        """Drop undo states and prepared volumes (call when the scene is closed); models stay loaded."""
        with self._lock:
            self._prepared.clear()
        self._undo.clear()

    def release_models(self) -> None:
        """Free every loaded model and engine cache (and GPU memory)."""
        with self._lock:
            segmenters = list(self._segmenters.values())
            self._segmenters.clear()
            self._prepared.clear()
        for segmenter in segmenters:
            release = getattr(segmenter, "release", None)
            if release is not None:
                release()
        try:
            from mrisegassist.prompt import release_engines

            release_engines()
        except ImportError:
            pass
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
