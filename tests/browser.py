"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): what a person saves.

No websocket library is needed: with that flag Chromium reads commands from
its descriptor 3 and writes answers and events to descriptor 4, one JSON
message each, ended by a NUL byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium")

# A quiet headless Chromium: no GPU, no QUIC, nothing fetched behind the test's back.
HEADLESS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLAGS = [*HEADLESS, "--ignore-certificate-errors", "--remote-debugging-pipe"]  # the test's own CA; DevTools


@contextlib.contextmanager
def chromium_tmpdir() -> Iterator[dict[str, str]]:
    """The environment for one Chromium run: its own short ``TMPDIR``, removed afterwards.

    Chromium puts its singleton socket in a fresh ``$TMPDIR/org.chromium.Chromium.*``
    directory and leaves it behind when killed: one for every run, under /tmp, forever.
    The directory must be short: a Unix socket's path holds at most 107 bytes, and under
    pytest's temporary directory Chromium aborted (SIGABRT) for want of its socket.
    """
    directory = tempfile.mkdtemp(prefix="chromium-")
    try:
        yield {**os.environ, "TMPDIR": directory}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class DevTools:
    """One headless Chromium and its DevTools pipe."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        commands_read, self._commands = os.pipe()
        self._events, events_write = os.pipe()

        def wire() -> None:  # in the child: the pipe ends at descriptors 3 and 4
            os.dup2(commands_read, 3)
            os.dup2(events_write, 4)

        self._stack = contextlib.ExitStack()
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire,
            pass_fds=(3, 4),  # kept open in the child: close_fds runs after preexec_fn
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._stack.enter_context(chromium_tmpdir()),
        )
        os.close(commands_read)
        os.close(events_write)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, **params: Any) -> int:
        self._next_id += 1
        message = json.dumps({"id": self._next_id, "method": method, "params": params}).encode() + b"\0"
        os.write(self._commands, message)
        return self._next_id

    def wait_for(self, wanted: str | int, timeout: float = 30) -> dict[str, Any]:
        """The next message that is the event ``wanted`` (a method name) or the answer to command ``wanted``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message: dict[str, Any] = json.loads(raw)
                if message.get("method") == wanted or message.get("id") == wanted:
                    return message
            data = os.read(self._events, 65536)
            if not data:
                break
            self._buffer += data
        raise TimeoutError(f"Chromium sent no {wanted!r}")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self._commands)
        os.close(self._events)
        self._stack.close()


def saved_download(url: str, directory: Path, profile: Path) -> tuple[str, Path]:
    """Download ``url`` as a person would: the file name Chromium suggests, and the file it saved."""
    browser = DevTools(profile)
    try:
        browser.wait_for(
            browser.send(
                "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(directory), eventsEnabled=True
            )
        )
        browser.send("Target.createTarget", url=url)
        begun = browser.wait_for("Browser.downloadWillBegin")["params"]
        while True:
            progress = browser.wait_for("Browser.downloadProgress")["params"]
            if progress["state"] != "inProgress":
                break
        assert progress["state"] == "completed", progress
        return begun["suggestedFilename"], directory / begun["suggestedFilename"]
    finally:
        browser.close()
