"""Helpers for the browser front end's tests and benchmark: a real server in a subprocess, Chromium through
Playwright (Debian's /usr/bin/chromium, no browser download), and page actions by element id."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

CHROMIUM = os.environ.get("MRISEGASSIST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
READY_PREFIX = "MRISegAssist serving at "
REPO = Path(__file__).resolve().parents[1]


def chromium_missing_reason() -> Optional[str]:
    """Why browser tests cannot run here, or ``None``."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"chromium not installed ({CHROMIUM}; apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (pip install playwright)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m MRISegAssistWeb`` (= ``mrisegassist serve``) in a subprocess; output kept in ``log``."""

    def __init__(self, *args: str, timeout: float = 300.0, env: Optional[dict] = None) -> None:
        self.args = ["--port", str(free_port()), *args]
        cmd = [sys.executable, "-X", "faulthandler", "-m", "MRISegAssistWeb", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=REPO, env={**os.environ, **(env or {})}, bufsize=1)
        self.lines: list[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{self.log[-4000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX):].strip()
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(line for line in self.lines if "WindowResizeEvent" not in line and "ConfigureEvent" not in line)

    @property
    def base(self) -> str:
        """``http://host:port`` without path or token."""
        return self.url.split("/?")[0].rstrip("/")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def browser_page(url: str, width: int = 1600, height: int = 1000) -> Iterator:
    """A Playwright page of ``url`` in headless Chromium, with the panel ready."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#load-study, #upload-files", state="attached")
            yield page
        finally:
            browser.close()


def wait_idle(page, timeout_s: float = 600.0) -> None:
    """Wait until no step runs (the progress block is gone)."""
    page.wait_for_function("!document.querySelector('#progress')", timeout=timeout_s * 1000)


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
