"""Headless Chromium driven through its DevTools protocol over a pipe: open a page, run JavaScript in it, take a
screenshot (the demo page's test and its screenshot; docs/DESIGN.md, "The demo page").

`--remote-debugging-pipe` makes Chromium read protocol commands from file descriptor 3 and write replies and events
to descriptor 4, as JSON messages ended by a NUL byte: no WebSocket client, no driver binary, nothing to install
beyond Debian's `chromium`.
"""
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

BINARIES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "--mute-audio",
         "--disable-dev-shm-usage")


def find_chromium():
    """The path of a Chromium binary on PATH, or None."""
    return next((path for path in map(shutil.which, BINARIES) if path), None)


def _above(fd: int, lowest: int) -> int:
    """`fd` moved to a descriptor number >= `lowest`."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


class BrowserError(RuntimeError):
    """Chromium exited, timed out, or the page raised an exception."""


class Chromium:
    """One headless Chromium process with one page. Use as a context manager; every call waits at most `timeout`
    seconds."""

    def __init__(self, binary: str = None, width: int = 1000, height: int = 800, timeout: float = 60.0):
        self.timeout, self.next_id, self.buffer, self.events = timeout, 0, b"", []
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # bash moves the pipe ends to descriptors 3 and 4, where Chromium expects them, from 10 and up, so that
        # neither redirection overwrites the other's source (dash takes no descriptor above 9)
        commands_read, replies_write = (_above(fd, 10) for fd in (commands_read, replies_write))
        argv = [binary or find_chromium(), *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(["bash", "-c", f'exec 3<&{commands_read} 4>&{replies_write}; exec "$@"', "bash",
                                         *argv], pass_fds=(commands_read, replies_write),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the protocol

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium within {self.timeout:g} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (code {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict = None, session: bool = True) -> dict:
        """Send one command (to the page's session unless `session` is False) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        try:
            os.write(self.commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError as exc:
            raise BrowserError(f"Chromium exited (code {self.process.poll()})") from exc
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    # ------------------------------------------------------------ the page

    def open(self, url: str):
        """Open `url` in a new page and wait for its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited); a thrown error raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def screenshot(self, path: str, width: int = None):
        """A PNG of the whole page (as tall as its content), `width` CSS pixels wide."""
        size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width or size[0], "height": size[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self):
        if self.process.poll() is None:
            try:
                self.send("Browser.close", session=False)
                self.process.wait(timeout=10)
            except (BrowserError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for fd in (self.commands, self.replies):
            with contextlib.suppress(OSError):  # closed already
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)
