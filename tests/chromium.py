"""A small headless-Chromium driver for the browser test: the DevTools protocol over a pipe.

``--remote-debugging-pipe`` speaks JSON messages ending in NUL on file descriptors 3 (to the
browser) and 4 (from it): no websocket library, no port to pick, and the browser dies with the
pipe. Only what the test needs: open a page, evaluate JavaScript, wait for a condition, take a
screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_SWITCH = "AUTOSPARSE_INSTALL_CHROMIUM"


def find_chromium() -> str | None:
    """``$AUTOSPARSE_CHROMIUM`` if set, else Debian's ``chromium`` (or a Chrome) on PATH."""
    explicit = os.environ.get("AUTOSPARSE_CHROMIUM", "").strip()
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(fd: int) -> int:
    """The same pipe end on the lowest free descriptor from 10 up."""
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless browser with one page (a fresh profile, deleted on close)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 900):
        self._profile = tempfile.mkdtemp(prefix="autosparse-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # above 4, so that moving them onto 3 and 4 in the child clobbers neither
        to_browser_r, from_browser_w = (_high(to_browser_r), _high(from_browser_w))

        def fds() -> None:  # in the child, before exec: our pipe ends become fds 3 and 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        args = [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(args, preexec_fn=fds, pass_fds=(3, 4),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._frames: dict[str, str] = {}  # iframe target id -> session id
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                  flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                  height=height, deviceScaleFactor=1, mobile=False)

    # ---- protocol --------------------------------------------------------------------------

    def call(self, method: str, session: bool | str = False, timeout: float = 30.0, **params):
        """One protocol command: to the browser, the page (``session=True``) or another
        attached target (its session id)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session if session is True else session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    # ---- what the test uses ----------------------------------------------------------------

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, poll: float = 0.05):
        """Poll until ``expression`` is truthy; return (its value, seconds waited)."""
        start = time.monotonic()
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value, time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"not true after {timeout:.0f} s: {expression}")
            time.sleep(poll)

    def evaluate_in_frame(self, url_prefix: str, expression: str):
        """``expression`` in the first iframe whose URL starts with ``url_prefix``; None while
        there is none. A sandboxed iframe (opaque origin) runs in its own renderer, so it is a
        target of its own, attached to here, not a frame of the page."""
        for target in self.call("Target.getTargets")["targetInfos"]:
            if target["type"] == "iframe" and target["url"].startswith(url_prefix):
                session = self._frames.get(target["targetId"])
                if session is None:
                    session = self.call("Target.attachToTarget", targetId=target["targetId"],
                                        flatten=True)["sessionId"]
                    self._frames[target["targetId"]] = session
                result = self.call("Runtime.evaluate", session=session, expression=expression,
                                   returnByValue=True)
                return result.get("result", {}).get("value")
        return None

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
