"""``mrisegassist bench web``: click-to-overlay time of the browser front end, measured in Chromium.

The real server (``mrisegassist serve``, started here unless ``--url`` names a running one) and headless
Chromium (Playwright, Debian's /usr/bin/chromium) on a real case (default ``brats2013-deepmedic/pat0001``, which
the shipped glioma model was not trained on): the study is loaded through the page and the slice views moved to
the tumour, then

* **auto-segment**: click *Auto-segment* (the shipped U-Net, ``--model``);
* **box propagate**: after *Undo*, one box drawn with the mouse on the axial view around the expert tumour
  on its largest slice (3 voxels margin), then a click on *Propagate* (``--engine``, default the
  weights-free ``classical``).

For each click, in the browser's clock: until the segment list shows the result, until the axial view's image
differs from the one before the click in at least 200 pixels (the overlay is drawn), and the later of both
(*click to overlay*). Breakdown from the server: the logic's compute phase (engine), its MRML writes
(apply), the page's result update (segment volumes, metrics against the reference) and the server step
from the job's start to the page update; the rest (*other*) is making the job (reading the input volumes),
transport, polling, rendering and image encoding. The first auto-segmentation includes loading the model.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

CASE = "brats2013-deepmedic/pat0001"


def register(sub) -> None:
    from ..cli import add_json_flag
    from . import add_data_flag

    p = sub.add_parser("web", help="browser click-to-overlay time of auto-segmentation and a propagated box "
                                   "(real server, headless Chromium, real case)")
    add_data_flag(p)
    p.add_argument("--case", default=CASE, help="study folder inside --data with flair and labels.nii.gz")
    p.add_argument("--model", default="glioma-2d", help="U-Net model for auto-segmentation")
    p.add_argument("--engine", default="classical", help="prompt engine for the box")
    p.add_argument("--url", help="use this running server (its printed address; its --data must hold --case)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _step(page, harness, button: str, segment: str) -> dict:
    seen = harness.click_to_overlay(page, button, "Red", segment)
    timing = harness.state(page, "timing") or {}
    metrics = harness.state(page, "metrics") or []
    return {"click_to_overlay_s": seen["visible_ms"] / 1000, "segment_list_s": seen["segment_ms"] / 1000,
            "view_image_s": seen["overlay_ms"] / 1000, "engine_s": timing.get("engine_s"),
            "apply_s": timing.get("apply_s"), "results_s": timing.get("results_s"),
            "server_step_s": timing.get("step_s"),
            "other_s": seen["visible_ms"] / 1000 - (timing.get("step_s") or 0.0),
            "pixels_changed": seen["changed"], "page_dice": metrics[0]["dice"] if metrics else None}


def run(args) -> int:
    from ..cli import emit
    from ..errors import InputError

    import importlib.util

    from . import browser as harness

    if importlib.util.find_spec("trame_slicer") is None:
        raise InputError("the browser front end is not installed: pip install 'mrisegassist[web]'")
    reason = harness.chromium_missing_reason()
    if reason:
        raise InputError(f"bench web needs Chromium and Playwright: {reason}")
    folder = Path(args.data) / args.case
    labels = folder / "labels.nii.gz"
    if not labels.is_file():
        raise InputError(f"{folder}: needs labels.nii.gz (the box is drawn around it); pass --data / --case")
    prompt = harness.lesion_prompt(labels)

    with tempfile.TemporaryDirectory(prefix="mrisegassist-bench-web-") as out:
        server = None if args.url else harness.ServerProcess("--data", str(args.data), "--output", out)
        try:
            with harness.browser_page(args.url or server.url) as page:
                t0 = time.perf_counter()
                harness.load_study(page, args.case)
                load_s = time.perf_counter() - t0
                model = next((m for m in harness.state(page, "models") if m["value"] == args.model), None)
                if model is None:
                    raise InputError(f"model {args.model!r} is not installed on the server")
                if harness.state(page, "model") != args.model:
                    harness.choose(page, "model-select", model["title"], "model")
                if harness.state(page, "engine") != args.engine:
                    harness.choose(page, "engine-select", args.engine, "engine")
                harness.goto_ras(page, prompt["centre"])
                rows = {"auto-segment": _step(page, harness, "auto-run", "")}
                error = harness.run_step(page, "undo")
                if error:
                    raise InputError(f"undo failed in the page: {error}")
                extent = harness.draw_box(page, "Red", *prompt["corners"])
                rows["box propagate"] = _step(page, harness, "box-propagate", "Box 1")
        finally:
            if server is not None:
                server.stop()
    shape = prompt["mask"].shape
    summary = {"case": f"{args.case} (FLAIR {shape[2]}x{shape[1]}x{shape[0]})", "model": args.model,
               "engine": args.engine, "box": extent, "load_study_s": load_s, "rows": rows}
    emit(args, summary, format_table)
    return 0


def format_table(summary: dict) -> str:
    def fmt(value, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"case: {summary['case']}; model {summary['model']}; box engine {summary['engine']} "
             f"(box {summary['box']}); study loaded in {summary['load_study_s']:.1f} s",
             "seconds from the click in Chromium; engine / apply / server step as reported by the server",
             f"{'step':<15}{'click->overlay':>15}{'segment list':>13}{'view image':>11}{'engine':>8}{'apply':>7}"
             f"{'results':>8}{'server step':>12}{'other':>7}{'Dice(page)':>11}"]
    for name, r in summary["rows"].items():
        lines.append(f"{name:<15}{r['click_to_overlay_s']:>15.2f}{r['segment_list_s']:>13.2f}"
                     f"{r['view_image_s']:>11.2f}{fmt(r['engine_s']):>8}{fmt(r['apply_s']):>7}{fmt(r['results_s']):>8}"
                     f"{fmt(r['server_step_s']):>12}{r['other_s']:>7.2f}{fmt(r['page_dice'], '.3f'):>11}")
    return "\n".join(lines)
