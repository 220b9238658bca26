"""Driving the browser front end for its tests and benchmark (``mrisegassist bench web``): a real server in a
subprocess (:class:`~.processes.ServerProcess`, ``python -m MRISegAssistWeb``: the web app is never imported
here), Chromium through Playwright (Debian's /usr/bin/chromium, no browser download), page actions by element
id."""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .processes import ServerProcess, free_port  # noqa: F401

CHROMIUM = os.environ.get("MRISEGASSIST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_missing_reason() -> Optional[str]:
    """Why browser tests cannot run here, or ``None``."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"chromium not installed ({CHROMIUM}; apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install playwright)"
    return None


@contextmanager
def browser_page(url: str, width: int = 1600, height: int = 1300) -> Iterator:
    """A Playwright page of ``url`` in headless Chromium, with the panel ready and :data:`WATCH_JS` installed
    (the default height shows the whole panel, for screenshots)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.set_default_timeout(120_000)
            page.add_init_script(WATCH_JS)
            page.goto(url)
            page.wait_for_selector("#load-study, #upload-files", state="attached")
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout_s: float = 600.0) -> None:
    """Wait until no step runs (state ``busy`` false and the progress block gone)."""
    page.wait_for_function("!window.trame.state.get('busy') && !document.querySelector('#progress')",
                           timeout=timeout_s * 1000)


def wait_text(page, selector: str, text: str, timeout_s: float = 300.0) -> str:
    """Wait until ``selector``'s text contains ``text``; returns the text."""
    page.wait_for_function(
        "([sel, txt]) => { const e = document.querySelector(sel); return e && e.innerText.includes(txt); }",
        arg=[selector, text], timeout=timeout_s * 1000)
    return page.inner_text(selector)


def page_error(page) -> str:
    el = page.query_selector("#error")
    return el.inner_text() if el else ""


def trigger(page, name: str, *args):
    """Call a server trigger from the page (``trame.trigger``) and return its result."""
    return page.evaluate("([n, a]) => window.trame.trigger(n, a)", [name, list(args)])


def view_image(page, tag: str):
    """The rendered image element of view ``tag`` (``Red``, ``Green``, ``Yellow``, ``ThreeD``)."""
    return page.locator(".layout-grid-item", has=page.locator(f"#view-{tag}")).locator("img").first


def click_ras(page, tag: str, ras) -> tuple[float, float]:
    """Click where RAS point ``ras`` appears in slice view ``tag``; returns the page coordinates."""
    fx, fy = trigger(page, "mrisegassist_view_xy", tag, [float(c) for c in ras])
    box = view_image(page, tag).bounding_box()
    x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
    page.mouse.move(x, y)
    time.sleep(0.3)
    page.mouse.down()
    time.sleep(0.1)
    page.mouse.up()
    return x, y


# ------------------------------------------------------------------------------- workflow steps
def state(page, name: str):
    """A page state variable as the browser holds it."""
    return page.evaluate("(n) => window.trame.state.get(n)", name)


def synced(page, *names: str, timeout_s: float = 30.0) -> None:
    """Wait until the server holds the page's values of state ``names`` (a click sent right after typing
    can overtake the typed value otherwise)."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while trigger(page, "mrisegassist_state", name) != state(page, name):
            if time.monotonic() > deadline:
                raise AssertionError(f"state {name!r} did not reach the server")
            time.sleep(0.05)


def choose(page, select_id: str, option: str, name: str) -> None:
    """Pick ``option`` (its shown text) in the Vuetify select ``#select_id`` bound to state ``name``, as a
    user does."""
    page.locator(f".v-field:has(#{select_id})").click()
    items = page.locator(".v-overlay-container .v-list-item")
    items.get_by_text(option, exact=True).first.click()
    items.first.wait_for(state="hidden")
    synced(page, name)


def fill(page, field_id: str, text: str, name: str) -> None:
    """Type ``text`` into the text field ``#field_id`` bound to state ``name``."""
    page.fill(f"#{field_id}", text)
    synced(page, name)


def load_study(page, path: str, timeout_s: float = 300.0) -> str:
    """Type ``path`` into the study field and press Load; returns the study line (``#study-label``), or
    raises with the page's error."""
    fill(page, "study-input", path, "study_path")
    error = run_step(page, "load-study", timeout_s)
    if error:
        raise AssertionError(f"loading {path} failed in the page: {error}")
    return wait_text(page, "#study-label", f"{path}:")


def run_step(page, button_id: str, timeout_s: float = 600.0) -> str:
    """Click ``#button_id``, wait until the server handled it (state ``actions`` counts handled page actions)
    and any step it started has finished; returns the page's error text (empty when none)."""
    count = state(page, "actions")
    page.click(f"#{button_id}")
    page.wait_for_function("(n) => window.trame.state.get('actions') > n", arg=count, timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)
    return page_error(page)


def goto_ras(page, ras) -> None:
    """Move every slice view through RAS point ``ras`` (the app's ``mrisegassist_goto`` trigger)."""
    trigger(page, "mrisegassist_goto", [float(c) for c in ras])


def draw_box(page, tag: str, corner1, corner2, timeout_s: float = 60.0) -> str:
    """Press *Draw box* and click two opposite corners (RAS points) in slice view ``tag``; returns the box's
    extent as the box list shows it."""
    count = len(state(page, "boxes") or [])
    page.click("#box-draw")
    page.wait_for_function("() => window.trame.state.get('placing')")
    click_ras(page, tag, corner1)
    time.sleep(0.3)
    click_ras(page, tag, corner2)
    page.wait_for_function(
        "(n) => !window.trame.state.get('placing') && (window.trame.state.get('boxes') || []).length > n",
        arg=count, timeout=timeout_s * 1000)
    return state(page, "boxes")[-1]["extent"]


def lesion_prompt(labels_path, margin: int = 3) -> dict:
    """Where to draw a box around a reference mask (all non-zero labels): on the axial slice where it is
    largest, ``margin`` voxels around it. ``extent`` ``(i0, i1, j0, j1, k, k)``; ``corners``: two RAS points
    half a voxel outside the extent (Slicer keeps voxels whose centres are inside); ``centre``: RAS of the
    box centre (for :func:`goto_ras`); ``mask`` the reference mask, ``[k, j, i]``."""
    import numpy as np

    from mrisegassist.volume import read_volume

    labels = read_volume(labels_path, kind="label")
    mask = labels.array > 0
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    jj, ii = np.nonzero(mask[k])
    i0, i1 = max(int(ii.min()) - margin, 0), min(int(ii.max()) + margin, mask.shape[2] - 1)
    j0, j1 = max(int(jj.min()) - margin, 0), min(int(jj.max()) + margin, mask.shape[1] - 1)
    ras = lambda i, j: [float(c) for c in (labels.geometry.ijk_to_ras @ [i, j, k, 1.0])[:3]]  # noqa: E731
    return {"extent": (i0, i1, j0, j1, k, k), "corners": (ras(i0 - 0.5, j0 - 0.5), ras(i1 + 0.5, j1 + 0.5)),
            "centre": ras((i0 + i1) / 2, (j0 + j1) / 2), "mask": mask}


def screenshot(page, folder: Path, name: str) -> Path:
    """``folder/name.png`` of the whole page (views and panel), once the views are drawn."""
    wait_settled(page)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# ---------------------------------------------------------------------------- overlay timing
#: Installed in every page: records each view image as it arrives: its time, its number of coloured pixels
#: (the MRI is grey, so coloured pixels are overlays, boxes and outlines) and, after ``__msa.arm(tag)``, how
#: many pixels differ from the image view ``tag`` showed then; and each click's time and element id.
WATCH_JS = """
window.__msa = { frames: [], clicks: [], last: {}, base: {},
                 arm(tag) { this.base[tag] = this.last[tag]; } };
(() => {
  const canvas = document.createElement('canvas');
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const tagOf = (img) => {
    const item = img.closest('.layout-grid-item');
    const marker = item && item.querySelector('.mrisegassist-view-marker');
    return marker ? marker.id.slice(5) : null;
  };
  document.addEventListener('load', (e) => {
    const img = e.target, msa = window.__msa;
    if (!(img instanceof HTMLImageElement) || !img.naturalWidth) return;
    const tag = tagOf(img);
    if (!tag) return;
    const t = performance.now();
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const base = msa.base[tag];
    const same = base && base.length === d.length;
    let colored = 0, changed = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) colored++;
      if (same && Math.max(Math.abs(d[i] - base[i]), Math.abs(d[i + 1] - base[i + 1]),
                           Math.abs(d[i + 2] - base[i + 2])) > 40) changed++;
    }
    msa.last[tag] = d;
    msa.frames.push({ tag, t, colored, changed: same ? changed : null });
  }, true);
  document.addEventListener('click', (e) => {
    const el = e.target.closest && e.target.closest('[id]');
    if (el) window.__msa.clicks.push({ id: el.id, t: e.timeStamp });
  }, true);
})();
"""


def colored_pixels(page, tag: str) -> int:
    """Coloured pixels of the last image view ``tag`` received (0 before any)."""
    return page.evaluate("(tag) => { const f = window.__msa.frames.filter(x => x.tag === tag); "
                         "return f.length ? f[f.length - 1].colored : 0; }", tag)


def wait_colored(page, tag: str, n: int, timeout_s: float = 60.0) -> int:
    """Wait until the last image of view ``tag`` has more than ``n`` coloured pixels; returns their number."""
    return page.wait_for_function(
        "([tag, n]) => { const f = window.__msa.frames.filter(x => x.tag === tag); "
        "return f.length && f[f.length - 1].colored > n && f[f.length - 1].colored; }",
        arg=[tag, n], timeout=timeout_s * 1000).json_value()


def wait_settled(page, quiet_s: float = 1.5, timeout_s: float = 60.0) -> None:
    """Wait until no view image arrived for ``quiet_s`` seconds."""
    page.wait_for_function(
        "(q) => { const f = window.__msa.frames; return !f.length || performance.now() - f[f.length - 1].t > q; }",
        arg=quiet_s * 1000, timeout=timeout_s * 1000)


def click_to_overlay(page, button_id: str, tag: str, segment: str = "", min_changed: int = 200,
                     timeout_s: float = 600.0) -> dict:
    """Click ``#button_id`` and time what the user sees, in the browser's clock (ms from the click):
    ``segment_ms`` until the segment list shows ``segment`` (any segment when empty; clear the list before),
    ``overlay_ms`` until an image of view ``tag``
    differs from the one before the click in ``min_changed`` pixels, ``visible_ms`` the later of both,
    ``idle_ms`` until the progress block is gone; ``changed`` pixels and ``colored`` pixels before / after."""
    wait_settled(page)
    page.evaluate("(tag) => { window.__msa.arm(tag); window.__msa.clicks = []; }", tag)
    before = colored_pixels(page, tag)
    page.click(f"#{button_id}")
    t_click = page.evaluate("(id) => (window.__msa.clicks.find(c => c.id === id) || {}).t", button_id)
    if t_click is None:
        raise AssertionError(f"the click on #{button_id} was not seen by the page")
    segment_t = page.wait_for_function(
        "(name) => document.querySelector('#error') ? -1 : [...document.querySelectorAll('#segments .segment-row')]"
        ".some(e => e.innerText.startsWith(name ? name + ':' : '')) && performance.now()",
        arg=segment, timeout=timeout_s * 1000).json_value()
    if segment_t < 0:
        raise AssertionError(f"#{button_id} failed in the page: {page_error(page)}")
    idle_t = page.wait_for_function("() => !document.querySelector('#progress') && performance.now()",
                                    timeout=timeout_s * 1000).json_value()
    frame = page.wait_for_function(
        "([tag, t0, n]) => window.__msa.frames.find(f => f.tag === tag && f.t > t0 && f.changed >= n)",
        arg=[tag, t_click, min_changed], timeout=60_000).json_value()
    return {"segment_ms": segment_t - t_click, "overlay_ms": frame["t"] - t_click,
            "visible_ms": max(segment_t, frame["t"]) - t_click, "idle_ms": idle_t - t_click,
            "changed": frame["changed"], "colored_before": before, "colored_after": frame["colored"]}
