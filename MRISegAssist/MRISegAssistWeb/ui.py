"""The page: an app bar, the MRISegAssist panel (trame vuetify 3) on the left, Slicer views on the right.

Element ids (``#load-study``, ``#auto-run``, ``#box-draw``, ``#box-propagate``, ``#atlas-run``, ``#undo``,
``#save``, ``#status``, ``#error``, ``#segments``, ``#metrics``, ...) are stable: the Playwright tests and the
``bench web`` benchmark use them. Each view holds a marker ``#view-<tag>`` (``Red`` axial, ``Yellow``
sagittal, ``Green`` coronal, ``ThreeD``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

if TYPE_CHECKING:
    from .app import MRISegAssistWebApp

IDLE = "busy || !study_loaded"


def _marker(view) -> None:
    html.Div(id=f"view-{view.get_singleton_tag()}", classes="mrisegassist-view-marker",
             style="position:absolute; width:0; height:0;")


def slice_view_gutter(server, view_id, view) -> None:
    """trame-slicer's slice-view gutter (reset, slider) plus a marker naming the view."""
    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

    create_vertical_slice_view_gutter_ui(server, view_id, view)
    _marker(view)


def threed_view_gutter(server, view_id, view) -> None:
    from trame_slicer.app.ui import create_vertical_view_gutter_ui

    create_vertical_view_gutter_ui(server, view_id, view)
    _marker(view)


def _section(title: str) -> None:
    html.Div(title, classes="text-subtitle-2 font-weight-bold mt-4 mb-1")


def _study_section(app: "MRISegAssistWebApp") -> None:
    _section("Study")
    with html.Div(v_if="has_data_dir", classes="d-flex align-center"):
        v3.VCombobox(v_model=("study_path",), items=("studies",), label="Study folder (in the data folder)",
                     id="study-input", density="compact", hide_details=True, clearable=True,
                     disabled=("busy",))
        v3.VBtn("Load", id="load-study", click=app.load_study, classes="ml-2", color="primary",
                disabled=("busy || !study_path",))
    upload = app.server.trigger_name(app.upload_chunk)
    refused = app.server.trigger_name(app.upload_refused)
    # Inline statements (not an arrow function: Vue would take a leading "(() =>" for the handler itself).
    check_then_upload = (
        "const files = $event.target.files || []; let total = 0; for (const f of files) { total += f.size; } "
        "if (total > max_upload_bytes) { "
        f"trigger('{refused}', [`upload of ${{(total / 1048576).toFixed(1)}} MB exceeds the server's limit of "
        "${(max_upload_bytes / 1048576).toFixed(1)} MB`]); "
        f"}} else if (files.length) {{ window.load_files_by_chunks(files, {{ trigger_name: '{upload}' }}); }}"
    )
    with html.Div(classes="d-flex"):
        v3.VFileInput(label="Upload files", multiple=True, density="compact", hide_details=True,
                      prepend_icon="mdi-file-upload", id="upload-files", change=check_then_upload,
                      disabled=("busy",))
        v3.VFileInput(label="Upload folder", density="compact", hide_details=True, raw_attrs=["webkitdirectory"],
                      prepend_icon="mdi-folder-upload", id="upload-folder", change=check_then_upload,
                      disabled=("busy",), classes="ml-2")
    html.Div("{{ study_label }}: {{ study_files.join(', ') }}", v_if="study_loaded", id="study-label",
             classes="text-caption")
    with html.Div(v_if="study_loaded"):
        v3.VSelect(v_model=("base_volume",), items=("volumes",), label="Volume shown (boxes are drawn on it)",
                   density="compact", hide_details=True, id="base-volume", classes="mt-2",
                   update_modelValue=(app.show_base_volume, "[$event]"))
        with html.Div(classes="d-flex flex-wrap"):
            for seq in ("flair", "t1c", "t1", "t2"):
                v3.VSelect(v_model=(f"input_{seq}",), items=("volumes",), label=seq, clearable=True,
                           density="compact", hide_details=True, style="width: 50%;", id=f"input-{seq}")
        v3.VSelect(v_model=("reference_file",), items=("reference_files",), label="Reference mask (for metrics)",
                   clearable=True, density="compact", hide_details=True, id="reference-select", classes="mt-2")


def _auto_section(app: "MRISegAssistWebApp") -> None:
    _section("Auto-segmentation (U-Net)")
    html.Div("No U-Net model is installed.", v_if="!models.length", classes="text-caption")
    with html.Div(v_else=True, classes="d-flex align-center"):
        v3.VSelect(v_model=("model",), items=("models",), label="Model", density="compact", hide_details=True,
                   id="model-select")
        v3.VBtn("Auto-segment", id="auto-run", click=app.auto_segment, color="primary", classes="ml-2",
                disabled=(IDLE,))


def _box_section(app: "MRISegAssistWebApp") -> None:
    _section("Box prompts")
    v3.VSelect(v_model=("engine",), items=("engines",), label="Engine", density="compact", hide_details=True,
               id="engine-select")
    html.Div("{{ engine_note }}", v_if="engine_note", classes="text-caption text-warning")
    with html.Div(classes="d-flex align-center flex-wrap"):
        v3.VBtn("Draw box", id="box-draw", click=app.start_box, prepend_icon="mdi-vector-square",
                disabled=(IDLE + " || placing",), classes="mr-2 mt-1")
        v3.VBtn("Stop", v_if="placing", id="box-stop", click=app.cancel_box, classes="mr-2 mt-1")
        v3.VBtn("Propagate", id="box-propagate", click=app.propagate, color="primary", classes="mr-2 mt-1",
                disabled=(IDLE + " || placing || !boxes.length",))
        v3.VBtn("Clear", id="box-clear", click=app.clear_boxes, variant="text", classes="mt-1",
                disabled=("busy || !boxes.length",))
    with html.Div(classes="d-flex align-center"):
        v3.VCheckbox(v_model=("box_flat",), label="Box on its slice only (propagate until the object ends)",
                     density="compact", hide_details=True, id="box-flat")
    with v3.VBtnToggle(v_model=("strategy",), density="compact", mandatory=True, classes="mb-1"):
        v3.VBtn("1 box (A)", value="A", size="small")
        v3.VBtn("3 boxes (B)", value="B", size="small")
    with v3.VList(density="compact", id="boxes", v_if="boxes.length"):
        with v3.VListItem(v_for="box in boxes", key="box.id", title=("box.name",), subtitle=("box.extent",),
                          click=(app.goto_box, "[box.id]")):
            with v3.Template(v_slot_append=True):
                v3.VBtn(icon="mdi-close", size="x-small", variant="text", click_stop=(app.remove_box, "[box.id]"),
                        disabled=("busy",))


def _atlas_section(app: "MRISegAssistWebApp") -> None:
    _section("Atlas prompts")
    html.Div("{{ atlas_reason }}", v_if="!atlas_ok", classes="text-caption", id="atlas-unavailable")
    with html.Div(v_else=True):
        v3.VSelect(v_model=("atlas_ref",), items=("atlas_refs",), label="Reference set", density="compact",
                   hide_details=True, id="atlas-select")
        with html.Div(classes="d-flex align-center"):
            v3.VCheckbox(v_model=("cascade",), label="Cascade refinement (on Propagate)", density="compact",
                         hide_details=True, id="cascade")
            v3.VBtn("Atlas boxes", id="atlas-run", click=app.atlas_boxes, disabled=(IDLE,), classes="ml-2")


def _result_section(app: "MRISegAssistWebApp") -> None:
    _section("Result")
    with html.Div(classes="d-flex align-center"):
        v3.VBtn("Undo", id="undo", click=app.undo, prepend_icon="mdi-undo", disabled=("busy || !can_undo",))
        v3.VSwitch(v_model=("show_3d",), label="3D", density="compact", hide_details=True, classes="ml-4")
        v3.VSwitch(v_model=("show_reference",), label="Reference", density="compact", hide_details=True,
                   classes="ml-2", disabled=("!reference_file",))
    with html.Div(id="segments", v_if="segments.length"):
        with html.Div(v_for="seg in segments", key="seg.name", classes="d-flex align-center text-body-2"):
            html.Span(style=("{ background: seg.color, width: '12px', height: '12px', display: 'inline-block' }",),
                      classes="mr-2")
            html.Span("{{ seg.name }}: {{ seg.ml }} ml", classes="segment-row")
    html.Div("{{ metrics_note }}", v_if="metrics_note", classes="text-caption")
    with v3.VTable(density="compact", v_if="metrics.length", id="metrics"):
        with html.Thead():
            with html.Tr():
                for head in ("segment", "vs", "Dice", "HD95 mm", "ml", "ref ml"):
                    html.Th(head)
        with html.Tbody():
            with html.Tr(v_for="row in metrics", key="row.name", classes="metric-row"):
                for key in ("name", "reference", "dice", "hd95", "pred_ml", "ref_ml"):
                    html.Td(f"{{{{ row.{key} }}}}", classes=f"metric-{key}")


def _save_section(app: "MRISegAssistWebApp") -> None:
    _section("Save")
    with html.Div(classes="d-flex align-center"):
        v3.VTextField(v_model=("save_name",), label="File name", density="compact", hide_details=True,
                      id="save-name")
        v3.VSelect(v_model=("save_format",), items=("save_formats",), density="compact", hide_details=True,
                   style="max-width: 130px;", classes="ml-2", id="save-format")
    download = app.server.trigger_name(app.download)
    with html.Div(classes="d-flex align-center mt-1"):
        v3.VBtn("Save", id="save", click=app.save, prepend_icon="mdi-content-save",
                disabled=("busy || !segments.length",))
        v3.VBtn("Download", id="download", prepend_icon="mdi-download", classes="ml-2",
                disabled=("busy || !segments.length",),
                click=f"utils.download(`${{save_name}}.${{save_format}}`, trigger('{download}'), "
                      "'application/octet-stream')")
    html.Div("saved: {{ saved_path }}", v_if="saved_path", id="saved-path", classes="text-caption")
    html.Div("output folder: {{ output_dir }}", classes="text-caption text-medium-emphasis")


def build_ui(app: "MRISegAssistWebApp") -> VAppLayout:
    with VAppLayout(app.server, full_height=True) as layout:
        with v3.VAppBar(density="compact"):
            v3.VAppBarTitle("MRISegAssist")
            html.Div("{{ study_label }}", classes="text-body-2 mr-4")
            v3.VSelect(v_model=("layout_id",), items=("layout_ids",), density="compact", hide_details=True,
                       style="max-width: 180px;", id="layout-select")
            v3.VSelect(v_model=("device",), items=("devices",), density="compact", hide_details=True,
                       style="max-width: 100px;", classes="ml-2", id="device-select", disabled=("busy",))
        with v3.VNavigationDrawer(permanent=True, width=440):
            with html.Div(classes="pa-3"):
                v3.VAlert(v_if="error", text=("error",), type="error", density="compact", closable=True,
                          id="error", click_close="error = ''")
                html.Div("{{ info }}", v_if="info && !busy", id="status", classes="text-body-2 text-info")
                with html.Div(v_if="busy", id="progress"):
                    html.Div("{{ job_name }}: {{ progress_msg }}", classes="text-body-2")
                    with html.Div(classes="d-flex align-center"):
                        v3.VProgressLinear(model_value=("progress",), height=8, color="primary", rounded=True)
                        v3.VBtn("Cancel", id="cancel", click=app.cancel, size="small", classes="ml-2")
                _study_section(app)
                _auto_section(app)
                _box_section(app)
                _atlas_section(app)
                _result_section(app)
                _save_section(app)
                with html.Div(classes="mt-4"):
                    v3.VBtn("Release models", click=app.release_models, size="x-small", variant="text",
                            disabled=("busy",))
                html.Div("Research use only. Not for clinical use.", classes="text-caption mt-2")
        with v3.VMain():
            with html.Div(style="height: 100%; display: flex;"):
                app.layout_manager.initialize_layout_grid(layout)
    return layout
