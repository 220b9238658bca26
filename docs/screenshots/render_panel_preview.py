"""Render docs/screenshots/panel_layout_preview.png: the module panel (Resources/UI/MRISegAssist.ui) laid out by
Qt's own .ui loader, with plain Qt stand-ins for the CTK/MRML widgets (group boxes for ctkCollapsibleButton,
combo boxes for qMRMLNodeComboBox). A layout preview, not a Slicer screenshot: combos are empty because no
scene is attached. Needs PyQt5, which is not a project dependency (use a separate virtual environment):

    python3 -m venv /tmp/qt && /tmp/qt/bin/pip install PyQt5
    QT_QPA_PLATFORM=offscreen /tmp/qt/bin/python docs/screenshots/render_panel_preview.py
"""
import io
import re
import sys
import tempfile
import types
from pathlib import Path

from PyQt5 import QtCore, QtWidgets, uic

HERE = Path(__file__).resolve().parent
UI = HERE.parents[1] / "MRISegAssist" / "Resources" / "UI" / "MRISegAssist.ui"

app = QtWidgets.QApplication(["preview", "-platform", "offscreen"])


class qMRMLWidget(QtWidgets.QWidget):
    pass


class ctkCollapsibleButton(QtWidgets.QGroupBox):
    def setText(self, text):
        self.setTitle(text)

    def setCollapsed(self, collapsed):
        pass


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    pass


for prop in ("nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "renameEnabled",
             "noneDisplay", "baseName"):
    setattr(qMRMLNodeComboBox, "set" + prop[0].upper() + prop[1:], lambda self, value: None)
for name, cls in (("qMRMLWidget", qMRMLWidget), ("ctkCollapsibleButton", ctkCollapsibleButton),
                  ("qMRMLNodeComboBox", qMRMLNodeComboBox)):
    module = types.ModuleType(name)
    setattr(module, name, cls)
    sys.modules[name] = module

source = UI.read_text()
uic.compileUi(io.StringIO(source), io.StringIO())  # the .ui compiles with Qt's uic
# The setMRMLScene connections need Slicer's signal types: drop them for the preview.
with tempfile.NamedTemporaryFile("w", suffix=".ui", delete=False) as tmp:
    tmp.write(re.sub(r"<connections>.*</connections>", "<connections/>", source, flags=re.S))
panel = uic.loadUi(tmp.name, package="")
panel.resize(380, 1000)
panel.show()
app.processEvents()
out = HERE / "panel_layout_preview.png"
panel.grab().save(str(out))
print(f"{len(panel.findChildren(QtWidgets.QWidget))} widgets; wrote {out}")
