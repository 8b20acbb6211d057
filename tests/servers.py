"""Real servers for integration tests, started on free loopback ports."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port(highest: int = 65535) -> int:
    """A loopback port nobody listens on; at most ``highest`` (kedro-viz refuses ports above 49151)."""
    for _ in range(1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 0 if highest == 65535 else random.randint(20000, highest)))
            except OSError:  # taken: draw again
                continue
            return s.getsockname()[1]
    raise AssertionError("no free loopback port")


@contextmanager
def background_server(
    command: Sequence[str], ready_url: str, *, timeout_s: float = 60, env: dict | None = None, log: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Runs ``command`` until the block ends; yields once ``ready_url`` answers (any status below 500)."""
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in finally
    environment = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        list(command), stdout=output, stderr=subprocess.STDOUT, env=environment, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(ready_url, timeout=5).status_code < 500:
                    break
            except requests.RequestException:  # not listening yet, or still starting up
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log else ""
                raise RuntimeError(f"{command[0]} did not become ready at {ready_url}\n{tail}")
            time.sleep(0.3)
        yield process
    finally:
        _stop_group(process)
        if log:
            output.close()


def _stop_group(process: subprocess.Popen) -> None:
    """Stops the server and every worker it started (its process group)."""
    for signal_number, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break  # the group is gone already
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots: kept for people, git-ignored
# headless, and quiet: no network of its own beyond the page's loopback server
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@contextmanager
def headless_chromium():
    """A page of Debian's Chromium under Playwright, 1400x900, closed with the block; screenshots go to ARTIFACTS."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Chromium is missing: `make test` installs Debian's chromium package"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()
