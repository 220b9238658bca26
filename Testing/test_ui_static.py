"""Static checks of the Slicer module (no Slicer needed): the panel's .ui XML and the widget code agree, the
CMake module lists the package files, and the in-Slicer dependency pins equal pyproject.toml's."""
from __future__ import annotations

import ast
import re
import tomllib
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO

MODULE = REPO / "MRISegAssist" / "MRISegAssist.py"
UI = REPO / "MRISegAssist" / "Resources" / "UI" / "MRISegAssist.ui"
LIB = REPO / "MRISegAssist" / "MRISegAssistLib"
CMAKE = REPO / "MRISegAssist" / "CMakeLists.txt"

# A subset of the Qt / CTK / MRML widget APIs (PythonQt exposes Qt properties as attributes): enough to tell
# a combo box from a spin box. Each class: (base class, attributes, signals).
QT_API: dict[str, tuple[str | None, set[str], set[str]]] = {
    "QWidget": (None, {"enabled", "visible", "toolTip", "setEnabled", "setVisible", "setToolTip", "show", "hide",
                       "connect", "disconnect", "setMRMLScene", "blockSignals"}, set()),
    "qMRMLWidget": ("QWidget", {"mrmlScene", "setMRMLScene"}, {"mrmlSceneChanged(vtkMRMLScene*)"}),
    "QAbstractButton": ("QWidget", {"text", "setText", "checked", "setChecked", "checkable", "click"},
                        {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()"}),
    "QPushButton": ("QAbstractButton", set(), set()),
    "QToolButton": ("QAbstractButton", set(), set()),
    "QCheckBox": ("QAbstractButton", {"checkState", "setCheckState"}, {"stateChanged(int)"}),
    "QRadioButton": ("QAbstractButton", set(), set()),
    "ctkCollapsibleButton": ("QAbstractButton", {"collapsed", "setCollapsed"}, {"contentsCollapsed(bool)"}),
    "QLabel": ("QWidget", {"text", "setText", "wordWrap", "setWordWrap"}, set()),
    "QLineEdit": ("QWidget", {"text", "setText", "placeholderText", "setPlaceholderText", "echoMode", "clear"},
                  {"textChanged(QString)", "editingFinished()", "returnPressed()"}),
    "QComboBox": ("QWidget", {"addItem", "addItems", "clear", "count", "currentIndex", "setCurrentIndex",
                              "currentText", "setCurrentText", "currentData", "itemData", "setItemData", "findData",
                              "findText", "itemText", "insertItem", "removeItem", "model"},
                  {"currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)"}),
    "QSpinBox": ("QWidget", {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum", "setRange"},
                 {"valueChanged(int)"}),
    "QProgressBar": ("QWidget", {"value", "setValue", "minimum", "maximum", "setMinimum", "setMaximum",
                                 "setRange", "reset", "textVisible"}, {"valueChanged(int)"}),
    "QListWidget": ("QWidget", {"addItem", "addItems", "clear", "count", "currentRow", "setCurrentRow", "item",
                                "takeItem", "currentItem", "selectedItems"},
                    {"currentRowChanged(int)", "itemSelectionChanged()", "itemClicked(QListWidgetItem*)"}),
    "qMRMLNodeComboBox": ("QWidget", {"currentNode", "setCurrentNode", "currentNodeID", "setCurrentNodeID",
                                      "mrmlScene", "nodeTypes", "noneEnabled", "addEnabled"},
                          {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
                           "nodeAdded(vtkMRMLNode*)"}),
}
#: Controls that do nothing unless the code reads or drives them.
INTERACTIVE = {"QComboBox", "QSpinBox", "QCheckBox", "QRadioButton", "qMRMLNodeComboBox", "QListWidget",
               "QProgressBar", "QPushButton", "QToolButton", "QLineEdit"}


def api(cls: str) -> tuple[set[str], set[str]]:
    attrs, signals = set(), set()
    while cls is not None:
        base, a, s = QT_API[cls]
        attrs |= a
        signals |= s
        cls = base
    return attrs, signals


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.find("class").text == "MRISegAssist"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MRISegAssist"
    widgets = [(w.get("name"), w.get("class")) for w in root.iter("widget")]
    names = [n for n, _ in widgets]
    assert len(names) == len(set(names)), "duplicate widget names in the .ui"
    return dict(widgets)


@pytest.fixture(scope="module")
def code() -> str:
    return MODULE.read_text()


def test_ui_is_valid_designer_xml(ui_widgets):
    root = ET.parse(UI).getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    for name, cls in ui_widgets.items():
        assert cls in QT_API, f"{name}: class {cls} unknown to this check"
        if not cls.startswith("Q"):
            assert cls in declared, f"{cls} used by {name} but not declared in <customwidgets>"
    for conn in root.iter("connection"):
        assert conn.find("sender").text in ui_widgets and conn.find("receiver").text in ui_widgets
        sender_signals = api(ui_widgets[conn.find("sender").text])[1]
        assert conn.find("signal").text in sender_signals
    for layout in root.iter("layout"):  # every grid/form item has a valid cell
        for item in layout.findall("item"):
            if layout.get("class") in ("QFormLayout", "QGridLayout"):
                assert item.get("row") is not None and item.get("column") is not None


def test_code_uses_only_widgets_of_the_ui(ui_widgets, code):
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    assert used, "the widget code does not use self.ui"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"self.ui names missing from the .ui: {missing}"
    for name, attr in re.findall(r"self\.ui\.(\w+)\.(\w+)", code):
        attrs, _ = api(ui_widgets[name])
        assert attr in attrs, f"self.ui.{name}.{attr}: {ui_widgets[name]} has no {attr!r}"
    for name, signal in re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"([^\"]+)\"", code):
        _, signals = api(ui_widgets[name])
        assert signal in signals, f"self.ui.{name} ({ui_widgets[name]}) has no signal {signal}"
    # Widgets reached through a mapping (the sequence selectors) are connected there.
    for signal in re.findall(r"selector\.connect\(\s*\"([^\"]+)\"", code):
        assert signal in api("qMRMLNodeComboBox")[1]


def test_every_button_is_connected_and_every_control_used(ui_widgets, code):
    connected = set(re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"clicked\((?:bool)?\)\"", code))
    buttons = {n for n, c in ui_widgets.items() if c in ("QPushButton", "QToolButton")}
    assert buttons, "no buttons in the .ui"
    assert not sorted(buttons - connected), f"buttons never connected: {sorted(buttons - connected)}"
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    # Radio buttons sharing a parent form one choice: reading one of them reads the choice.
    parents = {c.get("name"): p.get("name") for p in ET.parse(UI).getroot().iter("widget") for c in p.iter("widget")
               if c is not p and c.get("class") == "QRadioButton"}
    used |= {n for n, parent in parents.items() if any(parents.get(u) == parent for u in used)}
    idle = sorted(n for n, c in ui_widgets.items() if c in INTERACTIVE and n not in used)
    assert not idle, f"controls the code never reads or drives: {idle}"


def test_connected_slots_exist(code):
    tree = ast.parse(code)
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MRISegAssistWidget")
    methods = {f.name for f in widget.body if isinstance(f, ast.FunctionDef)}
    slots = set(re.findall(r"\.connect\(\s*\"[^\"]+\",\s*self\.(\w+)\)", code))
    assert slots and not sorted(slots - methods), f"connected to missing methods: {sorted(slots - methods)}"
    # The module file is thin: no numpy computation and no engine imports beyond the logic package.
    assert "import numpy" not in code.split("class MRISegAssistTest")[0]
    assert not re.search(r"^from mrisegassist|^import mrisegassist", code, re.M)


def test_module_follows_slicer_template(code):
    tree = ast.parse(code)
    classes = {n.name: [b.id if isinstance(b, ast.Name) else b.attr for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MRISegAssist"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MRISegAssistWidget"]
    assert classes["MRISegAssistTest"] == ["ScriptedLoadableModuleTest"]
    assert "from MRISegAssistLib.logic import MRISegAssistLogic" in code
    assert 'self.parent.categories = ["Segmentation"]' in code
    assert (REPO / "MRISegAssist" / "Resources" / "Icons" / "MRISegAssist.png").stat().st_size > 1000


def test_cmake_lists_the_package(code):
    cmake = CMAKE.read_text()
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", cmake))
    present = {p.name for p in LIB.glob("*.py")}
    assert listed == present, f"MRISegAssistLib files not in CMakeLists: {present - listed}; stale: {listed - present}"
    assert (LIB / "selftest_expected.json").exists() and "selftest_expected.json" in cmake
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake
    assert "mrisegassist/*.py" in cmake  # the engine ships inside the extension
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} \"[^\"]+\"\)", top), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(MRISegAssist)" in top
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top


def test_dependency_pins_match_pyproject():
    from MRISegAssistLib import deps

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert deps.REQUIREMENTS == project["dependencies"]
    for group, requirements in deps.OPTIONAL.items():
        assert requirements == project["optional-dependencies"][group], group
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for pin in deps.NO_DEPS:
        assert re.search(rf"--no-deps\s+\"?{re.escape(pin)}", setup), f"{pin} differs from scripts/setup.sh"


def test_dependency_plan_per_workflow():
    """Each workflow asks only for what it needs: the weights-free engine numpy, scipy, scikit-image and SimpleITK
    (no torch, monai or matplotlib); the worker aiohttp; sam2 is refused with a reason on Python 3.9."""
    from MRISegAssistLib import deps

    assert deps.extras_for_engine("classical") == ()
    assert deps.extras_for_engine("sam-vit-b") == ("sam",)
    assert deps.extras_for_engine("medsam2") == ("sam", "sam2")
    names = lambda workflows: {deps._requirement(r).name.lower() for r in deps.workflow_requirements(workflows)}  # noqa
    assert names(["classical"]) == {"numpy", "scipy", "scikit-image", "simpleitk"}
    assert names(["worker"]) == {"aiohttp"}
    assert not names(["classical", "worker", "atlas"]) & {"torch", "monai", "matplotlib", "torchvision"}
    assert {"torch", "monai", "einops"} <= names(["unet"])  # einops: MONAI's SwinUNETR (brats21-swinunetr)
    assert "einops" not in names(["classical", "worker", "atlas"])
    assert deps.workflows_for("prompt", "classical", "local") == ("classical", "worker")
    assert deps.workflows_for("prompt", "medsam2", "in-process") == ("sam2",)
    assert deps.workflows_for("auto-segment", mode="remote") == ()  # the server has its own packages
    assert deps.missing_requirements(["numpy>=1", "pytest>=1"]) == []
    assert deps.missing_requirements(["numpy<1", "no-such-package-mrisegassist==1.0"]) == [
        "numpy<1", "no-such-package-mrisegassist==1.0"]
    every = tuple(deps.WORKFLOWS)
    assert deps.plan(every) == {"torch": [], "pip": [], "no_deps": [], "skipped": [], "unavailable": []}
    reason = deps.unavailable_reason("sam2", (3, 9))
    assert reason and "3.10" in reason and "3.9" in reason
    assert deps.engine_unavailable_reason("medsam2", (3, 9)) == reason
    assert deps.engine_unavailable_reason("classical", (3, 9)) is None
    assert deps.engine_unavailable_reason("sam2.1-hiera-tiny", (3, 12)) is None
    with pytest.raises(ValueError, match="unknown workflow"):
        deps.workflow_requirements(["nope"])


def test_ensure_dependencies_asks_then_installs(monkeypatch):
    """The in-Slicer install flow with Slicer's dialogs and pip replaced by recorders: nothing happens without
    consent; PyTorch goes through PyTorchUtils with the pinned range, the rest through pip; sam2 without build
    isolation or CUDA build, after its runtime dependencies; every failure raises DependencyError."""
    import os
    import sys
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core provides slicer.util")
    from MRISegAssistLib import deps

    calls = []
    monkeypatch.setattr(deps, "REQUIREMENTS", ["numpy>=1", "torch>=99", "no-such-package-mrisegassist==1.0"])
    monkeypatch.setattr(deps, "OPTIONAL", {"sam2": ["no-such-sam2-dependency==2.0"]})
    monkeypatch.setattr(deps, "WORKFLOWS", {"test": ("numpy", "torch", "no-such-package-mrisegassist"),
                                            "sam2": ("no-such-sam2-dependency",)})
    monkeypatch.setattr(deps, "NO_DEPS", ["no-such-sam2-mrisegassist==1.1.0"])
    monkeypatch.setattr(deps, "MIN_PYTHON", {})

    def pip_install(reqs):
        if "fail-here" in reqs:
            raise RuntimeError("pip exited with 1")
        calls.append(("pip", list(reqs), os.environ.get("SAM2_BUILD_CUDA")))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    answer = {"ok": False}
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, *a, **k: calls.append(("ask", text)) or answer["ok"], raising=False)
    assert deps.plan(["test"]) == {"torch": ["torch>=99"], "pip": ["no-such-package-mrisegassist==1.0"],
                                   "no_deps": [], "skipped": [], "unavailable": []}
    with pytest.raises(deps.DependencyError, match="declined"):
        deps.ensure_dependencies(["test"])
    assert [c[0] for c in calls] == ["ask"] and "torch>=99" in calls[0][1] and "no-such-package" in calls[0][1]

    calls.clear()
    answer["ok"] = True
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(deps.DependencyError, match="PyTorch"):
        deps.ensure_dependencies(["test"])
    assert [c[0] for c in calls] == ["ask"]

    calls.clear()

    class FakeTorchLogic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    with pytest.raises(deps.DependencyError, match="still missing"):  # the recorders installed nothing
        deps.ensure_dependencies(["test"])
    assert calls[1:] == [("torch", False, ">=99"), ("pip", ["no-such-package-mrisegassist==1.0"], None)]

    calls.clear()
    with pytest.raises(deps.DependencyError, match="still missing"):
        deps.ensure_dependencies(["sam2"], ask=False)
    assert calls == [("pip", ["no-such-sam2-dependency==2.0"], None),
                     ("pip", ["--no-deps", "--no-build-isolation", "no-such-sam2-mrisegassist==1.1.0"], "0")]
    assert os.environ.get("SAM2_BUILD_CUDA") != "0"  # set for that pip call only

    monkeypatch.setattr(deps, "NO_DEPS", ["fail-here"])
    monkeypatch.setattr(deps, "missing_requirements", lambda reqs: list(reqs))
    with pytest.raises(deps.DependencyError, match="pip could not install"):
        deps.ensure_dependencies(["sam2"], ask=False)
    monkeypatch.undo()
    monkeypatch.setattr(deps, "MIN_PYTHON", {"sam2": (99, 0)})
    with pytest.raises(deps.DependencyError, match="needs Python 99.0 or later"):
        deps.ensure_dependencies(["sam2"], ask=False)


def test_extension_metadata_for_the_extensions_index():
    """The Extensions Index entry (JSON, schema v1.0.2) agrees with CMakeLists.txt; contributors are "Name
    (Affiliation)"; the help text links the documentation."""
    import json

    entry = json.loads((REPO / "MRISegAssist.json").read_text())
    schema_keys = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                   "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= schema_keys and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    top = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in top
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', top).group(1).split()
    assert entry["build_dependencies"] == depends
    repo_name = entry["scm_url"].rstrip("/").split("/")[-1]
    assert repo_name == "SlicerMRISegAssist" and entry["scm_url"].startswith("https://github.com/")
    assert repo_name in re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', top).group(1)
    person = r"[^,()]+ \([^()]+\)"
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', top).group(1)
    assert re.fullmatch(rf"{person}(, {person})*", contributors)
    code = MODULE.read_text()
    module_contributors = re.search(r"self\.parent\.contributors = \[([^\]]+)\]", code).group(1)
    for name in re.findall(r'"([^"]+)"', module_contributors):
        assert re.fullmatch(person, name), name
    assert re.search(r'href="\{DOCUMENTATION\}"', code) and f"{repo_name}#" in code


def test_module_registers_sample_data_and_self_test_checks(code):
    """The module adds its synthetic case to Sample Data at startup, and its self-test compares every required
    result with the stored expectations (a missing workflow fails)."""
    tree = ast.parse(code)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"registerSampleData", "loadSyntheticCase"} <= functions
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in code
    assert "registerCustomSampleDataSource(" in code and "customDownloader=loadSyntheticCase" in code
    test = code.split("class MRISegAssistTest")[1]
    assert "selftest.run_synthetic(" in test and "selftest.compare(results, selftest.load_expected(), required)" in test
    assert "self.assertEqual(failures, []" in test and "return" not in test.split("def test_workflows")[1].split(
        "selftest.run_synthetic(")[0]  # nothing returns before the workflows run
    # observers of new nodes only while the module is shown
    widget = code.split("class MRISegAssistWidget")[1].split("class MRISegAssistTest")[0]
    setup = widget.split("def setup(self)")[1].split("def cleanup(self)")[0]
    assert "NodeAddedEvent" not in setup
    assert "NodeAddedEvent, self.onNodeAdded" in widget.split("def enter(self)")[1].split("def exit(self)")[0]
    assert "removeObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent" in widget.split("def exit(self)")[1]
