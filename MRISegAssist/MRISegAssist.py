"""MRISegAssist: brain-MRI segmentation in 3D Slicer (U-Net auto-segmentation, box prompts, atlas boxes).

Thin scripted module: the panel (``Resources/UI/MRISegAssist.ui``) calls :class:`MRISegAssistLogic`
(``MRISegAssistLib/logic.py``), which reads MRML nodes into requests for the segmentation service and writes
the results as segments. The service runs in a local worker process (default) or on a remote server; the
panel polls the job from a Qt timer, so no computation runs in Slicer's process.
"""
from __future__ import annotations

import logging
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MRISegAssistLib import deps
from MRISegAssistLib.logic import MRISegAssistLogic  # noqa: F401  (the module's Logic class)
from MRISegAssistLib.tasks import BackgroundRunner

SEQUENCES = ("flair", "t1", "t1c", "t2")
#: (mode, label) of the "Compute on" choices; the logic's modes.
COMPUTE_MODES = (("local", "Local worker (this computer)"), ("remote", "Remote server"),
                 ("in-process", "In Slicer's process (debugging)"))


class MRISegAssist(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MRISegAssist"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["MRISegAssist contributors"]
        self.parent.helpText = (
            "Brain-MRI segmentation: U-Net auto-segmentation of tumours and MS lesions, box-prompted 3D "
            "segmentation (weights-free engine, SAM, SAM 2.1, MedSAM2) and registration-atlas boxes. Results are "
            "segments you can edit in the Segment Editor. Research use only: NOT FOR CLINICAL USE.")
        self.parent.acknowledgementText = (
            "Uses MONAI, SimpleITK, segment-anything and sam2. Shipped models were trained on public data sets "
            "(BraTS, MS lesion data of Lesjak et al.); see each model card for its licence.")


class MRISegAssistWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. It holds no computation: every action calls the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.runner = None
        self._objects: list[list[str]] = []  # ROI node IDs per object
        self._atlas_rois: list[str] = []
        self._updating = False
        self._weights_missing = False

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/MRISegAssist.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = MRISegAssistLogic()
        self.logic.use_local_worker()  # started on the first run, stopped by Release models and at exit
        slicer.app.connect("aboutToQuit()", self.logic.close)
        self.runner = BackgroundRunner(schedule=lambda ms, fn: qt.QTimer.singleShot(ms, fn))
        self.selectors = {"flair": self.ui.flairSelector, "t1": self.ui.t1Selector, "t1c": self.ui.t1cSelector,
                          "t2": self.ui.t2Selector}

        self._fill_models()
        self._fill_engines()
        self._fill_devices()
        self._fill_atlas()
        for sequence in SEQUENCES:
            self.ui.promptSequenceComboBox.addItem(sequence)
        for mode, label in COMPUTE_MODES:
            self.ui.computeModeComboBox.addItem(label, mode)

        self.ui.guessInputsButton.connect("clicked(bool)", self.onGuessInputsClicked)
        for selector in self.selectors.values():
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.autoSegmentButton.connect("clicked(bool)", self.onAutoSegment)
        self.ui.promptSequenceComboBox.connect("currentIndexChanged(int)", self.onInputChanged)
        self.ui.engineComboBox.connect("currentIndexChanged(int)", self.onEngineChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.placeBoxButton.connect("clicked(bool)", self.onPlaceBox)
        self.ui.addObjectButton.connect("clicked(bool)", self.onAddObject)
        self.ui.removeObjectButton.connect("clicked(bool)", self.onRemoveObject)
        self.ui.zRangeCheckBox.connect("toggled(bool)", self.updateButtons)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.atlasBoxesButton.connect("clicked(bool)", self.onAtlasBoxes)
        self.ui.atlasSegmentButton.connect("clicked(bool)", self.onAtlasSegment)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.computeModeComboBox.connect("currentIndexChanged(int)", self.onComputeModeChanged)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverUrlLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.releaseModelsButton.connect("clicked(bool)", self.onReleaseModels)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditor)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.onGuessInputs()
        self.onModelChanged()
        self.onEngineChanged()
        self.updateButtons()

    def cleanup(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
        if self.logic is not None:
            self.logic.close()  # the local worker stops with the module
        self.removeObservers()

    def _fill_models(self, choices=None) -> None:
        """``choices``: ``[(name, title)]`` (a server's models), default: the models installed here."""
        self.ui.modelComboBox.clear()
        for name, title in choices or [(c["name"], c["title"]) for c in self.logic.model_choices()]:
            self.ui.modelComboBox.addItem(title, name)
        default = self.logic.default_model()
        if default is not None:
            self.ui.modelComboBox.setCurrentIndex(max(self.ui.modelComboBox.findData(default), 0))

    def _fill_engines(self) -> None:
        self.ui.engineComboBox.clear()
        for engine in self.logic.list_engines():
            self.ui.engineComboBox.addItem(engine["name"], engine["name"])
            self.ui.engineComboBox.setItemData(self.ui.engineComboBox.count - 1, engine["description"],
                                               qt.Qt.ToolTipRole)

    def _fill_devices(self) -> None:
        self._updating = True
        self.ui.deviceComboBox.clear()
        for device in self.logic.available_devices():
            self.ui.deviceComboBox.addItem(device)
        self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findText(self.logic.device), 0))
        self._updating = False

    def _fill_atlas(self) -> None:
        ok, reason = self.logic.atlas_available()
        self.ui.atlasReferenceComboBox.clear()
        for name in self.logic.list_atlas_references():
            self.ui.atlasReferenceComboBox.addItem(name)
        self.ui.atlasStatusLabel.setText("" if ok else reason)

    # --------------------------------------------------------------------------------------------- state
    def inputs(self) -> dict:
        return {s: sel.currentNode() for s, sel in self.selectors.items() if sel.currentNode() is not None}

    def prompt_volume(self):
        return self.selectors[self.ui.promptSequenceComboBox.currentText].currentNode()

    def updateButtons(self, *_args) -> None:
        busy = self.runner is not None and self.runner.busy
        has_inputs = bool(self.inputs())
        has_prompt_volume = self.prompt_volume() is not None
        atlas_ok = self.logic.atlas_available()[0]
        self.ui.autoSegmentButton.enabled = not busy and has_inputs and self.ui.modelComboBox.count > 0
        self.ui.propagateButton.enabled = not busy and has_prompt_volume and any(self._objects)
        self.ui.placeBoxButton.enabled = has_prompt_volume
        self.ui.removeObjectButton.enabled = self.ui.objectsListWidget.currentRow >= 0
        self.ui.atlasBoxesButton.enabled = not busy and atlas_ok and has_inputs
        self.ui.atlasSegmentButton.enabled = not busy and bool(self._atlas_rois) and has_prompt_volume
        self.ui.downloadWeightsButton.enabled = not busy and self._weights_missing
        self.ui.zMinSpinBox.enabled = self.ui.zMaxSpinBox.enabled = self.ui.zRangeCheckBox.checked
        self.ui.undoButton.enabled = not busy and self.logic.can_undo
        self.ui.segmentEditorButton.enabled = self.ui.outputSegmentationSelector.currentNode() is not None
        self.ui.cancelButton.enabled = busy
        self.ui.releaseModelsButton.enabled = not busy
        remote = self.ui.computeModeComboBox.currentData == "remote"
        self.ui.serverUrlLineEdit.enabled = self.ui.serverTokenLineEdit.enabled = remote and not busy
        self.ui.connectButton.enabled = remote and not busy and bool(self.ui.serverUrlLineEdit.text.strip())
        self.ui.deviceComboBox.enabled = self.logic.mode != "remote"  # a server uses its own device
        self.ui.workerStatusLabel.setText(self.logic.service_status())

    def onGuessInputs(self, force: bool = False) -> None:
        """Fill the sequence selectors from node names (only empty ones unless ``force``)."""
        for sequence, node in self.logic.guess_inputs().items():
            if force or self.selectors[sequence].currentNode() is None:
                self.selectors[sequence].setCurrentNode(node)
        self.onInputChanged()

    def onGuessInputsClicked(self, *_args) -> None:
        self.onGuessInputs(force=True)

    def onNodeAdded(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self.onGuessInputs)  # the node's name is set after NodeAddedEvent

    def onSceneClosed(self, caller, event) -> None:
        self.logic.forget_scene()
        self._objects, self._atlas_rois = [], []
        self.ui.objectsListWidget.clear()
        self.updateButtons()

    def onInputChanged(self, *_args) -> None:
        volume = self.prompt_volume()
        if volume is not None and volume.GetImageData() is not None:
            slices = volume.GetImageData().GetDimensions()[2]
            for spin in (self.ui.zMinSpinBox, self.ui.zMaxSpinBox):
                spin.setMaximum(slices - 1)
            if not self.ui.zRangeCheckBox.checked:
                self.ui.zMaxSpinBox.setValue(slices - 1)
        self.updateButtons()

    def onModelChanged(self, *_args) -> None:
        name = self.ui.modelComboBox.currentData
        choice = next((c for c in self.logic.model_choices() if c["name"] == name), None)
        self.ui.modelInfoLabel.setText(
            "" if choice is None else f"Needs: {', '.join(choice['inputs'])}. Labels: {', '.join(choice['labels'])}. "
                                      f"Licence: {choice['licence']}")
        self.updateButtons()

    def onEngineChanged(self, *_args) -> None:
        engine = self.ui.engineComboBox.currentData
        if not engine:
            return
        try:
            status = self.logic.weights_status(engine)
        except Exception as exc:  # the worker or server cannot be reached: say so, keep the panel usable
            self.ui.weightsStatusLabel.setText(f"unknown ({exc})")
            return
        self.ui.weightsStatusLabel.setText(status.message if not status.available else
                                           ("installed" if status.needs_weights else "no weights needed"))
        self.ui.weightsStatusLabel.toolTip = status.path or status.details or status.message
        self.ui.licenceLabel.setText(status.licence)
        self._weights_missing = status.needs_weights and not status.available
        self.updateButtons()

    def onDeviceChanged(self, *_args) -> None:
        if not self._updating:
            self.logic.device = self.ui.deviceComboBox.currentText

    def onComputeModeChanged(self, *_args) -> None:
        """Local worker or in-process now; a remote server once Connect succeeds."""
        mode = self.ui.computeModeComboBox.currentData
        if mode == "local":
            self.logic.use_local_worker()
        elif mode == "in-process":
            self.logic.use_in_process()
        self.updateButtons()

    def onConnect(self, *_args) -> None:
        url, token = self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip() or None
        try:
            self.logic.use_server(url, token)
            info = self.logic.client.info()
        except Exception as exc:  # unreachable, wrong token, other version: explain, keep the previous choice
            self.ui.statusLabel.setText(f"Cannot use the server: {exc}")
            self.updateButtons()
            return
        self._fill_models([(m.name, m.title) for m in info.models])
        self.ui.statusLabel.setText(f"Connected to {url} (MRISegAssist {info.version}, device {info.device})")
        self.onEngineChanged()

    # ---------------------------------------------------------------------------------------- objects
    def _refresh_objects(self) -> None:
        row = self.ui.objectsListWidget.currentRow
        self.ui.objectsListWidget.clear()
        for n, ids in enumerate(self._objects, start=1):
            names = [slicer.mrmlScene.GetNodeByID(i).GetName() for i in ids if slicer.mrmlScene.GetNodeByID(i)]
            self.ui.objectsListWidget.addItem(f"Object {n}: {', '.join(names) or 'no box yet'}")
        self.ui.objectsListWidget.setCurrentRow(min(max(row, 0), len(self._objects) - 1))
        self.updateButtons()

    def onAddObject(self, *_args) -> None:
        self._objects.append([])
        self._refresh_objects()
        self.ui.objectsListWidget.setCurrentRow(len(self._objects) - 1)

    def onRemoveObject(self, *_args) -> None:
        row = self.ui.objectsListWidget.currentRow
        if 0 <= row < len(self._objects):
            for node_id in self._objects.pop(row):
                node = slicer.mrmlScene.GetNodeByID(node_id)
                if node is not None:
                    slicer.mrmlScene.RemoveNode(node)
            self._refresh_objects()

    def onPlaceBox(self, *_args) -> None:
        """Start placing a Markups ROI in the slice views; it becomes a box of the selected object."""
        if not self._objects:
            self.onAddObject()
        row = max(self.ui.objectsListWidget.currentRow, 0)
        name = slicer.mrmlScene.GenerateUniqueName(f"Object {row + 1} box")
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        roi.CreateDefaultDisplayNodes()
        self._objects[row].append(roi.GetID())
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsROINode")
        selection.SetActivePlaceNodeID(roi.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetCurrentInteractionMode(interaction.Place)
        self._refresh_objects()
        self.ui.statusLabel.setText("Draw the box in a slice view (two corners)")

    # --------------------------------------------------------------------------------------- workflows
    def _segmentation(self):
        return self.ui.outputSegmentationSelector.currentNode()

    def _start(self, make_job, on_done, extras=()) -> None:
        """Check dependencies, build the job (MRML read now), run its compute in the background."""
        if not deps.ensure_dependencies(extras):
            self.ui.statusLabel.setText("Dependencies missing: nothing was run")
            return
        self._fill_devices()
        message = deps.torch_gpu_message()
        try:
            job = make_job()
        except Exception as exc:  # bad input: explain, change nothing
            self.ui.statusLabel.setText(f"Error: {exc}")
            logging.warning(str(exc))
            return
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.setText(f"{job.description}...")
        if message:
            self.ui.statusLabel.setText(f"{job.description}... ({message})")
        self.runner.start(job, on_done=lambda result: self._done(on_done, result), on_error=self._failed,
                          on_progress=self._progress)
        self.updateButtons()

    def _progress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        if message:
            self.ui.statusLabel.setText(message)

    def _done(self, on_done, result) -> None:
        self.ui.progressBar.setValue(100)
        on_done(result)
        self.updateButtons()

    def _failed(self, exc: BaseException) -> None:
        from mrisegassist.errors import Cancelled, MRISegAssistError

        self.ui.progressBar.setValue(0)
        if isinstance(exc, Cancelled):
            self.ui.statusLabel.setText("Cancelled: nothing was written")
        elif isinstance(exc, MRISegAssistError):
            self.ui.statusLabel.setText(f"Error: {exc}")
        else:
            self.ui.statusLabel.setText(f"Failed: {exc}")
            logging.error("MRISegAssist failed", exc_info=exc)
        self.updateButtons()

    def _show_result(self, segmentation) -> None:
        self.ui.outputSegmentationSelector.setCurrentNode(segmentation)
        result = self.logic.last_result
        text = ", ".join(f"{o.name}: {o.volume_ml:.2f} ml" for o in result.objects)
        self.ui.statusLabel.setText(f"Done in {self.runner.compute_seconds:.1f} s ({self.logic.service_status()}). "
                                    f"{text}")

    def onAutoSegment(self, *_args) -> None:
        model = self.ui.modelComboBox.currentData
        self._start(lambda: self.logic.auto_segment_job(self.inputs(), model=model,
                                                        segmentation_node=self._segmentation()),
                    self._show_result)

    def _strategy(self) -> str:
        return "A" if self.ui.oneBoxRadioButton.checked else "B"

    def _prompt_job(self, rois, cascade=None):
        z_range = ((self.ui.zMinSpinBox.value, self.ui.zMaxSpinBox.value)
                   if self.ui.zRangeCheckBox.checked else None)
        return self.logic.segment_from_rois_job(self.prompt_volume(), rois, engine=self.ui.engineComboBox.currentData,
                                                segmentation_node=self._segmentation(), strategy=self._strategy(),
                                                z_range=z_range, cascade=cascade, extra_nodes=self.inputs())

    def onPropagate(self, *_args) -> None:
        rois = [[slicer.mrmlScene.GetNodeByID(i) for i in ids if slicer.mrmlScene.GetNodeByID(i)]
                for ids in self._objects]
        rois = [group for group in rois if group]
        engine = self.ui.engineComboBox.currentData
        self._start(lambda: self._prompt_job(rois), self._show_result, deps.extras_for_engine(engine))

    def onAtlasBoxes(self, *_args) -> None:
        """Register the reference set onto the T1 (else the prompted sequence) and place one ROI per structure."""
        target = self.inputs().get("t1") or self.prompt_volume()

        def done(rois):
            self._atlas_rois = [r.GetID() for r in rois]
            missing = self.logic.last_result.not_found
            text = f"{len(rois)} boxes placed: review them, then press Segment boxes."
            if missing:
                text += " Not found: " + "; ".join(f"{m.name} ({m.reason})" for m in missing)
            self.ui.statusLabel.setText(text)

        self._start(lambda: self.logic.atlas_boxes_job(target, self.ui.atlasReferenceComboBox.currentText,
                                                       strategy=self._strategy()), done, ("atlas",))

    def onAtlasSegment(self, *_args) -> None:
        rois = [slicer.mrmlScene.GetNodeByID(i) for i in self._atlas_rois if slicer.mrmlScene.GetNodeByID(i)]
        engine = self.ui.engineComboBox.currentData
        cascade = "D" if self.ui.cascadeCheckBox.checked else None
        self._start(lambda: self._prompt_job(rois, cascade), self._show_result, deps.extras_for_engine(engine))

    def onDownloadWeights(self, *_args) -> None:
        engine = self.ui.engineComboBox.currentData
        self._start(lambda: self.logic.download_weights_job(engine), lambda path: self.onEngineChanged())

    def onCancel(self, *_args) -> None:
        self.runner.cancel()
        self.ui.statusLabel.setText("Cancelling...")

    def onUndo(self, *_args) -> None:
        description = self.logic.undo_last()
        self.ui.statusLabel.setText(f"Undone: {description}" if description else "Nothing to undo")
        self.updateButtons()

    def onReleaseModels(self, *_args) -> None:
        self.logic.release_models()
        self.ui.statusLabel.setText("Models released" + (" (the local worker stopped)" if self.logic.mode == "local"
                                                         else ""))
        self.updateButtons()

    def onSegmentEditor(self, *_args) -> None:
        segmentation = self._segmentation()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        volume = self.prompt_volume() or next(iter(self.inputs().values()), None)
        if volume is not None:
            set_source = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
            set_source(volume)


class MRISegAssistTest(ScriptedLoadableModuleTest):
    """Self-test on real MRI: set MRISEGASSIST_TEST_DATA to a folder laid out like the project's shared data.

    Runs the same workflows as the headless CI tests (``MRISegAssistLib.selftest``) and checks Dice against
    the committed expectations (expert labels).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_workflows_on_real_data()
        self.setUp()
        self.test_undo_and_input_unchanged()

    def _data(self):
        from MRISegAssistLib import selftest

        data = selftest.data_folder()
        if data is None:
            self.delayDisplay(f"Skipped: set MRISEGASSIST_TEST_DATA to a data folder (now "
                              f"{os.environ.get('MRISEGASSIST_TEST_DATA')!r})")
        return data

    @staticmethod
    def _load(path, name, label):
        return slicer.util.loadVolume(str(path), {"name": name, "labelmap": label, "show": False})

    def test_workflows_on_real_data(self) -> None:
        from MRISegAssistLib import selftest

        data = self._data()
        if data is None:
            return
        self.assertTrue(deps.ensure_dependencies(ask=False), "dependencies could not be installed")
        logic = MRISegAssistLogic()
        results = selftest.run_all(logic, self._load, data)
        for name, dice in results.items():
            self.delayDisplay(f"{name}: Dice {dice:.3f}")
        self.assertEqual(selftest.compare(results, selftest.load_expected()), [])

    def test_undo_and_input_unchanged(self) -> None:
        import numpy as np

        from MRISegAssistLib import selftest

        data = self._data()
        if data is None:
            return
        logic = MRISegAssistLogic()
        case = selftest.ROI_CASES[0]
        out = selftest.run_roi_case(logic, self._load, data, case)
        volume = out["volume_node"]
        original = np.array(slicer.util.arrayFromVolume(self._load(data / case.image, "original", False)))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), original))
        self.assertIsNotNone(logic.undo_last())
        self.assertIsNone(slicer.mrmlScene.GetNodeByID(out["segmentation"].GetID()))
        self.delayDisplay("Undo and input checks passed")
