"""The browser front end: Slicer views (trame-slicer) and a panel that drives :class:`MRISegAssistLogic`.

Every workflow step calls the same MRML logic class as the Slicer module (auto-segmentation, box prompts from
Markups ROIs (placed in :mod:`.boxes`), atlas boxes, undo); this module only wires page state, views and files
to it. Engine work runs in a worker thread (:mod:`.jobs`); MRML writes and page updates happen on the server's
event loop.

In-process use (tests, scripts)::

    app = MRISegAssistWebApp(server=get_server("t"), data_dir="/data", output_dir="/tmp/out")
    app.load_study("ms-lesjak/patient07")
    app.add_box_from_extent((i0, i1, j0, j1, k, k))   # or draw one in a slice view in the page
    app.propagate(); app.jobs.wait()
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen; skip the X attempt
try:  # triton (torch's compiler, pulled in by torchvision/torch._dynamo) bundles LLVM; loaded after Mesa's
    import triton  # noqa: F401,E402  llvmpipe has rendered, it segfaults. Loading it first is safe.
except ImportError:
    pass

import numpy as np  # noqa: E402
from trame.app import TrameApp  # noqa: E402

from mrisegassist.errors import InputError, MRISegAssistError  # noqa: E402
from mrisegassist.outputs import Output, guard_outputs  # noqa: E402

from MRISegAssistLib import nodes  # noqa: E402
from MRISegAssistLib.logic import MRISegAssistLogic  # noqa: E402

from . import results, security  # noqa: E402
from .boxes import BoxPrompts  # noqa: E402
from .jobs import PageJobs, describe_error, page_action  # noqa: E402
from .study import StudyFiles, UploadArea, list_studies, scan_study, stem  # noqa: E402

log = logging.getLogger(__name__)

SEQUENCES = ("flair", "t1c", "t1", "t2")
DEFAULT_LAYOUT = "Axial Primary"
REFERENCE_COLOR = (1.0, 0.9, 0.1)
#: Suffixes slicer-core's archetype reader handles (NIfTI, NRRD, MetaImage); others go through SimpleITK.
SLICER_READS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class MRISegAssistWebApp(BoxPrompts, TrameApp):
    """trame-slicer application serving MRISegAssist's panel and Slicer views.

    ``data_dir``: the only folder studies are read from (paths typed in the page are confined to it);
    ``output_dir``: where *Save* writes (default ``./mrisegassist-output``); ``token``: access token required
    on every request (see :mod:`.security`); ``loopback_only``: refuse requests whose Host is not loopback
    (set when bound to 127.0.0.1); ``max_upload_mb``: total size of one upload; ``compute_server`` (+
    ``compute_token``): a segmentation server (``mrisegassist server``) that computes instead of this process.
    """

    def __init__(self, server=None, *, data_dir=None, output_dir=None, token: Optional[str] = None,
                 loopback_only: bool = True, max_upload_mb: float = security.DEFAULT_MAX_UPLOAD_MB,
                 device: Optional[str] = None, layout: str = DEFAULT_LAYOUT, compute_server: Optional[str] = None,
                 compute_token: Optional[str] = None) -> None:
        super().__init__(server)
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from .ui import build_ui, slice_view_gutter, threed_view_gutter

        self.data_dir = Path(data_dir).resolve(strict=True) if data_dir else None
        self.output_dir = Path(output_dir or Path.cwd() / "mrisegassist-output").resolve()
        self.token = token
        self.loopback_only = loopback_only
        self.uploads = UploadArea(int(max_upload_mb * 2 ** 20))
        self._receiving = False  # between the first chunk of an upload and its end (an empty chunk)

        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=slice_view_gutter,
                               three_d_view_ui_f=threed_view_gutter)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.logic = MRISegAssistLogic(self.scene, device=device)
        if compute_server:
            self.logic.use_server(compute_server, compute_token)
        self.jobs = PageJobs(self.state)

        self.study: Optional[StudyFiles] = None
        self.volume_nodes: dict[str, object] = {}  # node ID -> volume node of the loaded study
        self.segmentation_node = None
        self.reference = None  # engine Volume of the reference mask on the base volume's grid
        self.reference_node = None
        self.rois: list = []
        self._first_corner = None
        self._roi_observers: dict[str, int] = {}
        self._reference_values: dict[str, int] = {}

        self._init_state(layout, max_upload_mb)
        self.ui = build_ui(self)
        self.layout_manager.set_layout(layout)
        self.state.change("layout_id")(self._on_layout)
        self.state.change("show_3d")(self._on_show_3d)
        self.state.change("show_reference")(self._on_show_reference)
        self.state.change("reference_file")(self._on_reference_file)
        self.state.change("device")(self._on_device)
        self.state.change("engine")(self._on_engine)
        self.ctrl.on_server_ready.add(self._on_server_ready)
        self.ctrl.on_server_bind.add(self._on_server_bind)
        self.ctrl.trigger("mrisegassist_goto")(self.goto_ras)
        self.ctrl.trigger("mrisegassist_view_xy")(self.view_xy)
        self.ctrl.trigger("mrisegassist_state")(self.server_value)

    # ------------------------------------------------------------------------------------- setup
    def _init_state(self, layout: str, max_upload_mb: float) -> None:
        models = self._model_items()
        engines = self._engine_items()
        atlas_ok, atlas_reason = self.logic.atlas_available()
        self.state.update({
            "trame__title": "MRISegAssist",
            "busy": False, "job_name": "", "progress": 0.0, "progress_msg": "", "error": "", "info": "",
            "has_data_dir": self.data_dir is not None,
            "studies": list_studies(self.data_dir) if self.data_dir else [], "study_path": None,
            "study_loaded": False, "study_label": "", "study_files": [],
            "volumes": [], "base_volume": None, **{f"input_{s}": None for s in SEQUENCES},
            "reference_files": [], "reference_file": None, "show_reference": False,
            "models": models, "model": self._default_model(models),
            "engines": engines, "engine": "classical", "engine_note": "",
            "devices": self.logic.available_devices(), "device": self.logic.device,
            "placing": False, "box_flat": True, "strategy": "A", "boxes": [],
            "atlas_ok": atlas_ok, "atlas_reason": atlas_reason,
            "atlas_refs": self.logic.list_atlas_references() if atlas_ok else [], "atlas_ref": None,
            "cascade": False,
            "segments": [], "metrics": [], "metrics_note": "", "can_undo": False, "show_3d": True,
            "save_format": "seg.nrrd", "save_formats": list(results.SAVE_FORMATS), "save_name": "segmentation",
            "saved_path": "", "output_dir": str(self.output_dir),
            "max_upload_bytes": int(max_upload_mb * 2 ** 20),
            "layout_ids": self.layout_manager.get_layout_ids(), "layout_id": layout,
            "result_rev": 0, "timing": {}, "actions": 0,
        })
        if self.state.atlas_refs:
            self.state.atlas_ref = self.state.atlas_refs[0]

    def _model_items(self) -> list[dict]:
        try:
            models = self.logic.list_models()
        except Exception as exc:  # noqa: BLE001 - a broken model folder must not stop the page
            log.warning("cannot list U-Net models: %s", exc)
            return []
        return [{"title": f"{getattr(m, 'title', '') or m.name} (needs {', '.join(m.inputs)})", "value": m.name}
                for m in models]

    def _default_model(self, items: list[dict]) -> Optional[str]:
        """The logic's default model (a shipped, ready one) when the list offers it, else the first listed."""
        names = [m["value"] for m in items]
        default = self.logic.default_model()
        return default if default in names else (names[0] if names else None)

    def _engine_items(self) -> list[dict]:
        items = []
        for spec in self.logic.list_engines():
            status = self.logic.weights_status(spec["name"])
            items.append({"title": spec["name"], "value": spec["name"], "subtitle": spec["description"],
                          "props": {"disabled": not status.available, "subtitle": status.message}})
        return items

    def _on_server_ready(self, **_) -> None:
        self.jobs.loop = asyncio.get_running_loop()

    def _on_server_bind(self, wslink_server) -> None:
        """Guard every HTTP request and the websocket (token, Origin, loopback Host)."""
        wslink_server.app.middlewares.append(security.aiohttp_middleware(self.token, self.loopback_only))

    # ------------------------------------------------------------------------------------- views
    def _on_layout(self, layout_id, **_) -> None:
        if layout_id:
            self.layout_manager.set_layout(layout_id)

    def _slice_views(self):
        return self.slicer_app.view_manager.get_slice_views()

    def _view(self, name: str):
        for view in self.slicer_app.view_manager.get_views():
            if view.get_singleton_tag() == name:
                return view
        raise InputError(f"no view named {name!r}")

    def goto_ras(self, ras) -> None:
        """Move every slice view so it passes through RAS point ``ras`` (mm)."""
        for view in self._slice_views():
            view.get_view_node().JumpSliceByOffsetting(*[float(c) for c in ras])

    def view_xy(self, name: str, ras) -> list[float]:
        """Where RAS point ``ras`` appears in slice view ``name`` (``Red`` axial, ``Yellow`` sagittal,
        ``Green`` coronal), as fractions ``[x, y]`` of the view's width and height from its top-left corner
        (for automation: place clicks on a voxel)."""
        from vtkmodules.vtkCommonMath import vtkMatrix4x4

        slice_node = self._view(name).get_view_node()
        xy_to_ras = vtkMatrix4x4()
        xy_to_ras.DeepCopy(slice_node.GetXYToRAS())
        xy_to_ras.Invert()
        x, y, _, _ = xy_to_ras.MultiplyPoint([float(c) for c in ras] + [1.0])
        width, height, _ = slice_node.GetDimensions()
        return [x / width, 1.0 - y / height]

    def server_value(self, name: str):
        """The server's value of page state ``name`` (for automation: wait until a typed value arrived)."""
        return self.state[name] if self.state.has(name) else None

    def _show_volume(self, node) -> None:
        manager = self.slicer_app.display_manager
        manager.show_volume_in_slice_background(node)
        manager.show_volume_in_slice_foreground(None)
        for view in self._slice_views():
            view.set_visible_in_3d(True)
        manager.reset_views()

    def _on_show_3d(self, show_3d, **_) -> None:
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is not None:
            if show_3d:
                self.segmentation_node.CreateClosedSurfaceRepresentation()
            display = self.segmentation_node.GetDisplayNode()
            if display is not None:
                display.SetVisibility3D(bool(show_3d))

    # ------------------------------------------------------------------------------------- studies
    @page_action
    def load_study(self, path: Optional[str] = None) -> None:
        """Load a study folder of the data folder (``path`` relative to it; default: the page's choice)."""
        path = path if path is not None else self.state.study_path
        if self.data_dir is None:
            raise InputError("this server has no data folder (start it with --data DIR); upload files instead")
        if not path:
            raise InputError("choose a study folder first")
        folder = security.confine_path(self.data_dir, path, kind="dir")
        self._load_folder(folder, security.relative_to_root(self.data_dir, folder))

    @page_action
    def upload_chunk(self, files: list) -> None:
        """Receive uploaded files in chunks (empty list = end of upload, then load them as one study)."""
        if files:
            if not self._receiving:  # a new upload: the previous one (loaded or refused) is dropped
                self.uploads.begin()
                self._receiving = True
            try:
                self.uploads.add(files)  # a refusal discards what this upload received
            except Exception:
                self._receiving = False
                raise
            return
        receiving, self._receiving = self._receiving, False
        if not receiving or self.uploads.folder is None:
            raise InputError("no file was uploaded")
        try:
            self._load_folder(self.uploads.folder, "uploaded files")
        except Exception:
            self.uploads.discard()  # a refused study is not mixed into the next upload
            raise

    def upload_refused(self, message: str) -> None:
        """The page refused an upload before sending it (over the size limit)."""
        self._receiving = False
        self.uploads.discard()
        self.state.error = message

    def _load_folder(self, folder: Path, label: str) -> None:
        if self.jobs.busy:
            raise InputError("wait for the running step to finish (or cancel it) before loading a study")
        try:
            self._read_study(folder, label)
        except MRISegAssistError as exc:  # an upload's messages never show the server's temporary folder
            exc.args = (self.uploads.redact(str(exc)),)
            raise

    def _read_study(self, folder: Path, label: str) -> None:
        uploaded = self.uploads.folder is not None and folder == self.uploads.folder
        # files (and symbolic links) must resolve inside the data folder, uploads inside their own folder
        study = scan_study(folder, root=None if uploaded else self.data_dir)
        self._reset_study()
        loaded = {}
        for path in study.images:
            node = self._read_volume_node(path)
            loaded[node.GetID()] = node
        self.study, self.volume_nodes = study, loaded
        guessed = self.logic.guess_inputs(list(loaded.values()))
        base = guessed.get("flair") or next(iter(loaded.values()))
        self._show_volume(base)
        self.state.update({
            "study_loaded": True, "study_label": label,
            "study_files": [p.name for p in study.images],
            "volumes": [{"title": n.GetName(), "value": i} for i, n in loaded.items()],
            "base_volume": base.GetID(),
            **{f"input_{s}": (guessed[s].GetID() if s in guessed else None) for s in SEQUENCES},
            "reference_files": [p.name for p in study.references],
            "save_name": security.safe_file_name(f"{label.replace('/', '_')}_segmentation", "segmentation"),
            "info": f"loaded {label}: {', '.join(n.GetName() for n in loaded.values())}",
        })
        default = study.default_reference
        self.state.reference_file = default.name if default else None
        self._on_reference_file(self.state.reference_file)

    def _read_volume_node(self, path: Path):
        """Slicer's reader (``AddArchetypeVolume``); formats it lacks (e.g. GIPL) through the engine's reader
        and the logic's ``node_from_volume``."""
        from mrisegassist.volume import read_volume

        if path.name.lower().endswith(SLICER_READS):
            node = self.slicer_app.volumes_logic.AddArchetypeVolume(str(path), stem(path), 0)
            if node is not None:
                return node

        return nodes.node_from_volume(self.scene, read_volume(path, name=stem(path)), stem(path))

    def _reset_study(self) -> None:
        for roi in list(self.rois):
            self._forget_roi(roi)
        self.scene.Clear(0)
        self.logic = MRISegAssistLogic(self.scene, device=self.logic.device,  # undo history is per study
                                       client=self.logic.client)
        self.volume_nodes, self.segmentation_node, self.reference, self.reference_node = {}, None, None, None
        self._reference_values = {}
        self.state.update({"study_loaded": False, "boxes": [], "segments": [], "metrics": [], "metrics_note": "",
                           "can_undo": False, "saved_path": "", "placing": False})

    @page_action
    def show_base_volume(self, node_id: str) -> None:
        """Show another loaded volume; boxes and metrics then refer to its grid."""
        node = self.volume_nodes.get(node_id)
        if node is None:
            raise InputError("unknown volume")
        self.state.base_volume = node_id
        self._show_volume(node)
        self._on_reference_file(self.state.reference_file)
        self._refresh_boxes()

    def base_volume_node(self):
        node = self.volume_nodes.get(self.state.base_volume)
        if node is None:
            raise InputError("load a study first")
        return node

    def input_nodes(self) -> dict:
        return {s: self.volume_nodes[self.state[f"input_{s}"]] for s in SEQUENCES
                if self.state[f"input_{s}"] in self.volume_nodes}

    # ------------------------------------------------------------------------------------ reference
    def _on_reference_file(self, reference_file, **_) -> None:
        try:
            self.state.error = ""
            self._set_reference(reference_file)
        except Exception as exc:  # noqa: BLE001
            self.reference = None
            self.state.error = self.uploads.redact(describe_error(exc))
        self._refresh_results()

    def _set_reference(self, reference_file: Optional[str]) -> None:
        if self.reference_node is not None and self.reference_node.GetScene() is not None:
            self.scene.RemoveNode(self.reference_node)
        self.reference, self.reference_node = None, None
        if not reference_file or self.study is None:
            return
        path = next((p for p in self.study.references + self.study.images if p.name == reference_file), None)
        if path is None:
            raise InputError(f"{reference_file}: not a file of the loaded study")
        base = self.base_volume_node()
        self.reference = results.read_reference(path, results.volume_geometry(base))
        values = [int(v) for v in np.unique(self.reference.array) if v != 0]
        from mrisegassist.labels import LabelInfo

        node = nodes.new_segmentation_node(self.scene, base, f"Reference ({path.name})")
        nodes.write_segments(node, base, self.reference.array,
                             [LabelInfo(v, f"reference {v}", REFERENCE_COLOR) for v in values])
        display = node.GetDisplayNode()
        display.SetVisibility2DFill(False)
        display.SetVisibility3D(False)
        display.SetVisibility(bool(self.state.show_reference))
        self.reference_node = node

    def _on_show_reference(self, show_reference, **_) -> None:
        if self.reference_node is not None and self.reference_node.GetDisplayNode() is not None:
            self.reference_node.GetDisplayNode().SetVisibility(bool(show_reference))

    # --------------------------------------------------------------------------------- workflows
    def _on_device(self, device, **_) -> None:
        if device:
            self.logic.device = device

    def _on_engine(self, engine, **_) -> None:
        if engine:
            status = self.logic.weights_status(engine)
            self.state.engine_note = "" if status.available else status.message

    @page_action
    def auto_segment(self) -> None:
        """Auto-segment the study with the chosen U-Net model (logic: ``auto_segment_job``)."""
        if not self.state.model:
            raise InputError("no U-Net model is installed")
        job = self.logic.auto_segment_job(self.input_nodes(), model=self.state.model,
                                          segmentation_node=self._live_segmentation())
        from mrisegassist.unet.entries import get_model

        labels = {info.name: info.value for info in get_model(self.state.model).label_infos()}
        self.jobs.start(job, lambda node: self._segmentation_done(node, labels))

    @page_action
    def propagate(self) -> None:
        """Segment one object per box with the chosen engine, refined by cascade D when *Cascade* is ticked
        (logic: ``segment_from_rois_job``)."""
        rois = self._placed_rois()
        if not rois:
            raise InputError("no box yet: press 'Draw box' and click two corners on a slice view")
        job = self.logic.segment_from_rois_job(self.base_volume_node(), rois, engine=self.state.engine,
                                               segmentation_node=self._live_segmentation(),
                                               strategy=self.state.strategy,
                                               cascade="D" if self.state.cascade else None,
                                               extra_nodes=self.input_nodes())
        self.jobs.start(job, lambda node: self._segmentation_done(node, None))

    @page_action
    def atlas_boxes(self) -> None:
        """Register the atlas reference set onto the study's T1 (else the volume shown) and add one box per
        structure found, for review before *Propagate* (logic: ``atlas_boxes_job``)."""
        ok, reason = self.logic.atlas_available()
        if not ok:
            raise InputError(reason)
        target = self.input_nodes().get("t1") or self.base_volume_node()
        job = self.logic.atlas_boxes_job(target, reference=self.state.atlas_ref, strategy=self.state.strategy)

        def done(rois) -> str:
            for roi in rois:
                self._track_roi(roi)
            missing = self.logic.last_result.not_found
            text = f"{len(rois)} atlas box(es) added: review them, then propagate"
            return text + ("; not found: " + "; ".join(m.name for m in missing) if missing else "")

        self.jobs.start(job, done)

    def _live_segmentation(self):
        node = self.segmentation_node
        return node if node is not None and node.GetScene() is not None else None

    def _segmentation_done(self, node, reference_values: Optional[dict]) -> str:
        self.segmentation_node = node
        if reference_values is not None:
            self._reference_values = reference_values
        display = node.GetDisplayNode()
        if display is not None:
            display.SetOpacity2DFill(0.4)
        self._on_show_3d(self.state.show_3d)
        self._refresh_results()
        result = self.logic.last_result
        took = f"{self.jobs.last_duration:.1f} s (engine {self.jobs.runner.compute_seconds:.1f} s)"
        if result.workflow == "auto-segment":
            return f"auto-segmentation with {result.model} finished in {took}"
        engine = result.engine + (f" + cascade {result.cascade}" if result.cascade else "")
        return f"{len(result.objects)} object(s) segmented with {engine} in {took}"

    @page_action
    def undo(self) -> None:
        description = self.logic.undo_last()
        if description is None:
            raise InputError("nothing to undo")
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is None:
            self.segmentation_node = None
        for roi in [r for r in self.rois if r.GetScene() is None]:  # atlas boxes removed by the undo
            self._forget_roi(roi)
        self._refresh_boxes()
        self._refresh_results()
        self.state.info = f"undone: {description}"

    def cancel(self) -> None:
        self.jobs.cancel()

    @page_action
    def release_models(self) -> None:
        self.logic.release_models()
        self.state.info = "models released"

    # -------------------------------------------------------------------------------- results
    def current_labelmap(self):
        """The segmentation as an engine LabelMap on the base volume's grid (``None`` when there is none)."""
        node = self._live_segmentation()
        if node is None or node.GetSegmentation().GetNumberOfSegments() == 0:
            return None
        return results.export_labelmap(node, self.base_volume_node())

    def _refresh_results(self) -> None:
        self.state.can_undo = self.logic.can_undo
        self.state.result_rev += 1
        labelmap = self.current_labelmap() if self.volume_nodes else None
        if labelmap is None:
            self.state.update({"segments": [], "metrics": [], "metrics_note": ""})
            return
        counts = np.bincount(labelmap.volume.array.ravel(), minlength=len(labelmap.labels) + 1)
        voxel_ml = labelmap.geometry.voxel_volume_ml
        self.state.segments = [{"name": info.name, "color": "#%02x%02x%02x" % tuple(int(255 * c) for c in info.color),
                                "ml": round(float(counts[info.value]) * voxel_ml, 2)} for info in labelmap.labels]
        if self.reference is None:
            self.state.update({"metrics": [], "metrics_note": "choose a reference mask to see metrics"})
            return
        rows = results.compare(labelmap, self.reference, self._reference_values)
        self.state.metrics = results.metrics_table(rows)
        self.state.metrics_note = (f"against {self.state.reference_file}; "
                                   f"{results.lesion_summary(labelmap, self.reference)}")

    @page_action
    def save(self) -> Optional[str]:
        """Write the segmentation into the output folder (format and name from the page)."""
        labelmap = self.current_labelmap()
        if labelmap is None:
            raise InputError("there is no segmentation to save yet")
        name = security.safe_file_name(self.state.save_name or "segmentation", "segmentation")
        fmt = self.state.save_format
        if fmt not in results.SAVE_FORMATS:
            raise InputError(f"unknown format {fmt!r}; use one of {', '.join(results.SAVE_FORMATS)}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        study = self.study
        # the output policy: never over a file of the loaded study, nor inside its folder
        guard_outputs([Output(self.output_dir / f"{name}{results.SAVE_FORMATS[fmt]}", "labelmap", "Save")],
                      (study.images + study.references) if study else (), [study.folder if study else None])
        path = results.save_labelmap(labelmap, self.output_dir, name, fmt)
        self.state.saved_path = str(path)
        self.state.info = f"saved {path.name} in {self.output_dir}"
        return str(path)

    async def download(self):
        """The segmentation file's bytes for the browser's download (same format as *Save*)."""
        labelmap = self.current_labelmap()
        if labelmap is None:
            self.state.error = "there is no segmentation to download yet"
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = results.save_labelmap(labelmap, Path(tmp), "segmentation", self.state.save_format)
            return self.server.protocol.addAttachment(path.read_bytes())

    def close(self) -> None:
        self.uploads.close()


def create_app(server=None, **kwargs) -> MRISegAssistWebApp:
    """Build the application on ``server`` (a trame server or its name); see :class:`MRISegAssistWebApp`."""
    return MRISegAssistWebApp(server, **kwargs)
