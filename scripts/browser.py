"""Open a page in headless Chromium as a user would and report what it showed: every console error and
uncaught exception, every image's loaded size and place, and a full-page screenshot.

Drives Chromium over the DevTools protocol (websocket-client); used by tests/test_report_page.py and to
make the screenshot in docs/report.md:

    python scripts/browser.py runs/toy_world/report.html docs/figures/report/page.png
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

WIDTH = 1300


def chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )


class Page:
    """One headless Chromium with one page; ``call`` sends a DevTools command and returns its result,
    keeping every event that arrives meanwhile in ``events``."""

    def __init__(self, binary: str):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="sdft-chromium-")
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = self.proc.stderr.readline()  # type: ignore[union-attr]
            if m := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = int(m.group(1))
        if port is None:
            self.close()
            raise RuntimeError("Chromium did not start its DevTools endpoint")
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.events: list[dict] = []
        self._id = 0

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.time() > deadline:
                raise TimeoutError(event)
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


IMAGES_JS = """JSON.stringify([...document.images].map(i => {
  const r = i.getBoundingClientRect();
  return {id: (i.closest('figure') || {}).id || '', w: i.naturalWidth, h: i.naturalHeight,
          complete: i.complete, x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height};
}))"""


def visit(html: Path, screenshot: Path | None = None) -> dict:
    """Load ``html`` (a file) and return {errors, images, screenshot (PNG bytes)}."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("no Chromium on PATH (make browser)")
    page = Page(binary)
    try:
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False
        )
        page.call("Page.navigate", url=Path(html).resolve().as_uri())
        page.wait_for("Page.loadEventFired")
        images = json.loads(page.call("Runtime.evaluate", expression=IMAGES_JS)["result"]["value"])
        height = page.call("Page.getLayoutMetrics")["cssContentSize"]["height"]
        page.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        import base64

        png = base64.b64decode(
            page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        )
        errors = []
        for e in page.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(
                    " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                )
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text", ""))
    finally:
        page.close()
    if screenshot is not None:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(png)
    return {"errors": errors, "images": images, "screenshot": png, "height": height}


def blank_images(result: dict, min_ink: float = 0.02) -> list[str]:
    """The images whose region of the screenshot is (nearly) blank: less than ``min_ink`` of its pixels
    differ from white, or fewer than 8 colours."""
    import io

    from PIL import Image

    shot = Image.open(io.BytesIO(result["screenshot"])).convert("RGB")
    blank = []
    for img in result["images"]:
        box = (int(img["x"]), int(img["y"]), int(img["x"] + img["width"]), int(img["y"] + img["height"]))
        region = shot.crop(box)
        pixels = list(region.get_flattened_data())
        ink = sum(1 for p in pixels if min(p) < 235) / max(len(pixels), 1)
        if not img["complete"] or img["w"] == 0 or ink < min_ink or len(set(pixels)) < 8:
            blank.append(img["id"] or "?")
    return blank


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: browser.py PAGE.html SCREENSHOT.png")
    out = visit(Path(sys.argv[1]), Path(sys.argv[2]))
    blank, errors = blank_images(out) or "none", out["errors"] or "none"
    print(f"{len(out['images'])} images, blank: {blank}; console errors: {errors}")
