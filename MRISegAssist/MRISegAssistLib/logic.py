"""MRML logic of MRISegAssist: MRML nodes in, segmentation service calls, segments out. No Qt; usable headless.

The same class serves the Slicer panel, the Python console and the browser front end::

    logic = MRISegAssistLogic()                                   # in Slicer: slicer.mrmlScene
    logic.use_local_worker()                                      # or use_server(url, token); default: in-process
    inputs = logic.guess_inputs()                                 # {"flair": node, "t1c": node, ...}
    seg = logic.auto_segment(inputs, model="glioma-...")          # U-Net -> segmentation node
    seg = logic.segment_from_rois(inputs["flair"], [roi1, roi2])  # boxes -> 3D masks (classical engine)
    logic.last_result                                             # the typed result (SegmentationResult, ...)
    logic.undo_last()                                             # previous segment state, exactly

Every workflow exists as a :class:`~MRISegAssistLib.tasks.Job` (``*_job`` methods): MRML inputs are read
into a typed service request when the job is made, the service (``logic.client``: a local worker process, a
remote server, or this process) computes, and ``apply`` writes MRML on the main thread. The plain methods run
both synchronously. Input volumes are only ever read (their voxels are copied into the request).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from mrisegassist.errors import InputError
from mrisegassist.labels import LabelInfo
from mrisegassist.service import (AtlasBoxesRequest, AutoSegmentRequest, DownloadWeightsRequest, HttpClient,
                                  InProcessClient, LocalWorker, PromptRequest, SegmentationClient, WeightsStatus,
                                  available_devices)

from . import nodes
from .params import Parameters
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
#: Where the logic computes: ``local`` (a worker process it starts), ``remote`` (a server), ``in-process``.
MODES = ("local", "remote", "in-process")

RoiGroup = Union[object, Sequence[object]]


@dataclass
class UndoEntry:
    """State of one segmentation node before a run: ``snapshot`` (a deep copy of its ``vtkSegmentation``)
    or ``None`` when the run created the node; ``created`` = IDs of nodes the run added."""

    description: str
    segmentation_id: Optional[str]
    snapshot: object = None
    created: list[str] = field(default_factory=list)


class MRISegAssistLogic:
    """Segmentation workflows on an MRML scene (``slicer.mrmlScene`` by default).

    ``client``: where the service runs (default: this process, for scripts and tests; the Slicer panel calls
    :meth:`use_local_worker`). ``device``: the torch device requests ask for (local worker / in-process).
    """

    def __init__(self, scene=None, device: Optional[str] = None, max_undo: int = 10,
                 client: Optional[SegmentationClient] = None) -> None:
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.device = device or available_devices()[0]
        self.max_undo = max_undo
        self.client: SegmentationClient = client or InProcessClient()
        #: the typed result of the last run (``SegmentationResult`` or ``AtlasBoxesResult``)
        self.last_result = None
        self._undo: list[UndoEntry] = []

    # ------------------------------------------------------------------------------------- where it runs
    @property
    def mode(self) -> str:
        """``local``, ``remote`` or ``in-process``."""
        if isinstance(self.client, LocalWorker):
            return "local"
        return "remote" if isinstance(self.client, HttpClient) else "in-process"

    def _use(self, client: SegmentationClient) -> SegmentationClient:
        old, self.client = self.client, client
        if old is not client:
            old.close()
        return client

    def use_local_worker(self, python: Optional[str] = None) -> LocalWorker:
        """Compute in one worker process on this machine (started on first use with Slicer's own Python, reused
        for every workflow, stopped by :meth:`release_models` or when Slicer exits)."""
        if isinstance(self.client, LocalWorker) and python in (None, self.client.python):
            return self.client
        return self._use(LocalWorker(python))

    def use_server(self, url: str, token: Optional[str] = None) -> HttpClient:
        """Compute on a segmentation server (``mrisegassist server``), e.g. a GPU machine on the network.
        Checks the connection and the version now (:class:`~mrisegassist.service.VersionMismatch` naming both)."""
        client = HttpClient(url, token)
        client.connect()
        return self._use(client)

    def use_in_process(self) -> InProcessClient:
        """Compute in this process (scripts, tests); in Slicer's panel this runs in a thread of Slicer."""
        if isinstance(self.client, InProcessClient):
            return self.client
        return self._use(InProcessClient())

    def service_status(self) -> str:
        """One line for the panel: where computations run and the state of the worker or server."""
        if isinstance(self.client, LocalWorker):
            return f"local worker: {self.client.status()}"
        if isinstance(self.client, HttpClient):
            return f"server {self.client.url}"
        return "in this process"

    def _request_device(self) -> Optional[str]:
        return None if isinstance(self.client, HttpClient) else self.device

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
                 "labels": [lab["name"] for lab in e.get("labels", [])], "licence": e.get("licence", ""),
                 "catalog": e.get("weights_catalog", "")}
                for e in entries]

    @classmethod
    def default_model(cls) -> Optional[str]:
        """The model every front end selects first: the shipped glioma model, else the first model whose weights
        ship with it (a catalog model's weights are a download), else the first model; ``None`` when none is
        installed."""
        choices = cls.model_choices()
        ready = [m["name"] for m in choices if not m["catalog"]]
        return next((n for n in ready if n.startswith("glioma")),
                    ready[0] if ready else (choices[0]["name"] if choices else None))

    @staticmethod
    def list_engines() -> list[dict]:
        """Promptable engines: ``[{"name", "description", "needs_weights", "licence"}, ...]``."""
        from mrisegassist.prompt import list_engines

        return list_engines()

    def weights_status(self, engine: str) -> WeightsStatus:
        """Weights of an engine where the service runs, without downloading (``available``, ``message``,
        ``details``: the full reason when missing, ``path``, ``licence``, ``url``, ``size_mb``)."""
        return self.client.weights_status(engine)

    def download_weights_job(self, engine: str) -> Job:
        """Download (resumable, verified) the checkpoint of ``engine`` where the service runs; ``apply``
        returns its :class:`WeightsStatus`."""
        return Job(f"download {engine} weights", DownloadWeightsRequest(engine), lambda status: status, self.client)

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
                     progress=None, cancel=None):
        """Segment with a U-Net model; returns the segmentation node (created if ``None``).

        ``input_nodes`` maps sequence names (``flair``, ``t1c``, ...) to scalar volume nodes; the model's
        inputs must be present. The output is on the grid of ``reference`` (default: the model's first
        input); segments get the model's label names, colours and terminology, replacing same-named ones.
        """
        return self.auto_segment_job(input_nodes, model, segmentation_node, reference, device).run(progress, cancel)

    def _model_inputs(self, model: str) -> tuple[str, list[str]]:
        """``(name, inputs)`` of a registered model (no torch needed) or a model folder / file."""
        choice = next((c for c in self.model_choices() if c["name"] == model), None)
        if choice is not None:
            return choice["name"], choice["inputs"]
        from mrisegassist.unet.entries import get_model

        entry = get_model(model)
        return entry.name, list(entry.inputs)

    def auto_segment_job(self, input_nodes: Mapping[str, object], model: Optional[str] = None,
                         segmentation_node=None, reference: Optional[str] = None,
                         device: Optional[str] = None) -> Job:
        model = model or self.default_model()
        if model is None:
            raise InputError("no U-Net model is installed")
        name, inputs = self._model_inputs(model)
        missing = [s for s in inputs if input_nodes.get(s) is None]
        if missing:
            raise InputError(f"model {name!r} needs sequence(s) {', '.join(inputs)}; select "
                             f"{', '.join(missing)} in Inputs")
        reference = reference or inputs[0]
        if reference not in inputs:
            raise InputError(f"reference {reference!r} is not an input of model {name!r} ({', '.join(inputs)})")
        reference_node = input_nodes[reference]
        request = AutoSegmentRequest({s: nodes.volume_from_node(input_nodes[s], s) for s in inputs}, model,
                                     reference, device=device or self._request_device())

        def apply(result):
            self.last_result = result
            return self._write(f"auto-segmentation ({result.model})", reference_node, segmentation_node,
                               result.array, result.labels.labels)

        return Job(f"auto-segmentation with {name}", request, apply, self.client)

    # ---------------------------------------------------------------------------------- module state
    def parameters(self) -> Parameters:
        """The module's parameter node in this scene (created on first use; saved with the scene)."""
        return Parameters.of_scene(self.scene)

    def slice_planes(self) -> list:
        """``[(normal_ras, point_ras)]`` of the scene's slice views (none headless)."""
        planes = []
        found = self.scene.GetNodesByClass("vtkMRMLSliceNode")
        for n in range(found.GetNumberOfItems()):
            matrix = nodes.matrix_to_numpy(found.GetItemAsObject(n).GetSliceToRAS())
            planes.append((matrix[:3, 2], matrix[:3, 3]))
        return planes

    def new_box(self, name: str = "Box"):
        """A Markups ROI to place in a slice view (``finish_placement`` once the user is done)."""
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", self.scene.GenerateUniqueName(name))
        roi.CreateDefaultDisplayNodes()
        return roi

    def new_point_list(self, positive: bool = True, name: str = ""):
        """A Markups point list of positive (green) or negative (red) point prompts."""
        name = name or ("Positive points" if positive else "Negative points")
        points = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", self.scene.GenerateUniqueName(name))
        points.CreateDefaultDisplayNodes()
        points.SetAttribute(nodes.POINT_POLARITY, "positive" if positive else "negative")
        display = points.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*((0.2, 0.85, 0.2) if positive else (0.9, 0.15, 0.15)))
        return points

    def finish_placement(self, prompt_node, slice_planes=None) -> bool:
        """Call when placing a box or points ends (placed or cancelled). A node with nothing placed is removed
        from the scene and from the module's objects (a cancelled placement leaves nothing behind); a placed
        one gets the view it was drawn in recorded (:func:`nodes.record_placement`, :func:`nodes.point_view`).
        ``slice_planes``: the slice views' planes (default: :meth:`slice_planes`). True when it was placed."""
        if prompt_node is None or prompt_node.GetScene() is not self.scene:
            return False
        if not nodes.is_placed(prompt_node):
            self.parameters().forget_node(prompt_node)
            self.scene.RemoveNode(prompt_node)
            return False
        planes = self.slice_planes() if slice_planes is None else slice_planes
        if prompt_node.IsA("vtkMRMLMarkupsROINode"):
            if not prompt_node.GetAttribute(nodes.ROI_VIEW):
                normal = nodes.placement_view(prompt_node, planes)
                if normal is not None:
                    nodes.record_placement(prompt_node, normal)
        else:
            normal = nodes.point_view(prompt_node, planes)
            if normal is not None:
                prompt_node.SetAttribute(nodes.ROI_VIEW, ",".join(f"{v:.6f}" for v in normal))
        return True

    # ---------------------------------------------------------------------------------- box prompts
    def segment_from_rois(self, volume_node, rois: Sequence[RoiGroup], engine: str = DEFAULT_ENGINE,
                          segmentation_node=None, strategy: str = "A", z_range: Optional[tuple[int, int]] = None,
                          names: Optional[Sequence[str]] = None, cascade: Optional[str] = None,
                          checkpoint: Optional[str] = None, device: Optional[str] = None,
                          extra_nodes: Optional[Mapping[str, object]] = None, progress=None, cancel=None):
        """Segment objects in 3D from Markups ROIs and point lists on ``volume_node``; returns the segmentation
        node.

        ``rois``: one entry per object, either a node or a list of nodes: ROIs (boxes on one or several slices of
        the object) and point lists (positive or negative points, ``nodes.POINT_POLARITY``). Each object is
        propagated across the slices of the view it was drawn in (axial, coronal or sagittal, whatever the
        volume's storage order; ``nodes.roi_view``). A flat ROI (a box drawn with two clicks and not thickened
        since, or thinner than a voxel) prompts its slice and the engine propagates until the object vanishes; a
        ROI spanning several slices also bounds the object (its slices and its rectangle on each slice), with
        ``strategy`` ``"A"`` prompting its middle slice, ``"B"`` its quartile slices (the rule of
        ``mrisegassist.prompt.strategies.box_slices``). ``z_range`` (inclusive slice indices along the view's
        normal, the volume's own numbering of that axis) overrides the slice bounds of every object. Segments are named after the ROIs (or ``names``) and replaced on re-run; ROIs from
        :meth:`atlas_boxes` give their structure's colour. ``cascade`` (``"C"`` or ``"D"``) adds a second pass
        prompted from each first-pass mask (``D``: boxes enlarged 10 % in area, slices 20 %), skipping atlas
        structures marked as not cascading. ``extra_nodes``: other co-registered sequences
        (``{name: volume node}``) for engines that use several sequences.
        """
        return self.segment_from_rois_job(volume_node, rois, engine, segmentation_node, strategy, z_range, names,
                                          cascade, checkpoint, device, extra_nodes).run(progress, cancel)

    def segment_from_rois_job(self, volume_node, rois: Sequence[RoiGroup], engine: str = DEFAULT_ENGINE,
                              segmentation_node=None, strategy: str = "A",
                              z_range: Optional[tuple[int, int]] = None, names: Optional[Sequence[str]] = None,
                              cascade: Optional[str] = None, checkpoint: Optional[str] = None,
                              device: Optional[str] = None,
                              extra_nodes: Optional[Mapping[str, object]] = None) -> Job:
        from mrisegassist.prompt import engine_spec

        engine_spec(engine)  # unknown names fail here, before any work
        if not rois:
            raise InputError("no ROI given: place a box (Markups ROI) on the lesion first")
        if names is not None and len(names) != len(rois):
            raise InputError(f"{len(names)} names given for {len(rois)} objects")
        if cascade is not None and cascade not in ("C", "D"):
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
        extra = {name: nodes.volume_from_node(node, name) for name, node in (extra_nodes or {}).items()
                 if node is not None and node is not volume_node}
        request = PromptRequest(nodes.volume_from_node(volume_node), prompts, engine, cascade, strategy, no_cascade,
                                infos, extra, checkpoint, device=device or self._request_device())

        def apply(result):
            self.last_result = result
            return self._write(f"box prompts ({engine})", volume_node, segmentation_node, result.array,
                               result.labels.labels)

        return Job(f"prompted segmentation with {engine}", request, apply, self.client)

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
                    strategy: str = "A", progress=None, cancel=None) -> list:
        """Register an atlas reference set onto ``volume_node`` (usually the T1) and place one Markups ROI per
        structure found (named after it, in its colour), for review before :meth:`segment_from_rois`.

        ``reference``: ``builtin:NAME`` (default: the first built-in) or a reference folder / manifest;
        ``structures`` restricts it by name. Structures not found are listed with their reason in
        ``last_result.not_found`` (never given a silent empty box). Undo removes the ROIs."""
        return self.atlas_boxes_job(volume_node, reference, structures, strategy).run(progress, cancel)

    def atlas_boxes_job(self, volume_node, reference: Optional[str] = None,
                        structures: Optional[Sequence[str]] = None, strategy: str = "A") -> Job:
        if self._atlas() is None:
            raise InputError(ATLAS_UNAVAILABLE)
        reference = reference or (self.list_atlas_references() or [None])[0]
        request = AtlasBoxesRequest(nodes.volume_from_node(volume_node), reference,
                                    list(structures) if structures else None, strategy)

        def apply(result):
            if volume_node.GetScene() is not self.scene:
                raise InputError(f"volume {volume_node.GetName()!r} was removed from the scene during the run")
            rois = []
            for found in result.boxes.found():
                i0, j0, k0, i1, j1, k1 = found.bbox
                roi = nodes.roi_from_extent(self.scene, volume_node, (i0, i1, j0, j1, k0, k1), found.name)
                roi.CreateDefaultDisplayNodes()
                roi.GetDisplayNode().SetSelectedColor(*found.color)
                roi.SetAttribute(ROI_COLOR, ",".join(f"{c:.4f}" for c in found.color))
                roi.SetAttribute(ROI_CASCADE, "1" if found.cascade else "0")
                nodes.store_prompt(roi, volume_node, found.prompt(), strategy)
                rois.append(roi)
            self._undo.append(UndoEntry(f"atlas boxes ({result.boxes.reference_set})", None, None,
                                        [r.GetID() for r in rois]))
            del self._undo[:-self.max_undo]
            self.last_result = result
            return rois

        return Job(f"atlas boxes ({reference}) on {volume_node.GetName()}", request, apply, self.client)

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
        self.client.forget_volumes()
        self._undo.clear()

    def release_models(self) -> None:
        """Free every loaded model and engine cache (and GPU memory): a local worker stops (the next run starts a
        new one); a remote server frees what it holds."""
        self.client.release()

    def close(self) -> None:
        """Let go of the service (a local worker stops). Call when the module or application closes."""
        self.client.close()
