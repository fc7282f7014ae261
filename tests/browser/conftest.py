"""Browser tests: the real app in a subprocess on a free port (its own LYCOTRAIN_HOME and runs folder in a tmp
dir), driven by Playwright through Debian's Chromium. Never `playwright install`: no browser download."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); browser tests skipped",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


# ---- page helpers shared by the browser test files ------------------------------------------------------------
def settle(page) -> None:
    """Let the page draw two frames, so the effects of components that were just mounted have run."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def fill(page, elem_id: str, value) -> None:
    """Type ``value`` into a field; typed again if it did not stick: Gradio mounts the children of a tab or an
    accordion on their first showing, and a component still mounting resets what was just typed into it."""
    field = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    for _ in range(3):
        field.fill(str(value))
        field.press("Tab")
        settle(page)
        if field.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} does not keep {value!r}; it shows {field.input_value()!r}")


def open_tab(page, name: str, ready: str) -> None:
    """Select a tab and wait until ``ready`` (a selector inside it) shows."""
    page.get_by_role("tab", name=name, exact=True).click()
    page.locator(ready).wait_for()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def open_accordion(page, title: str) -> None:
    page.get_by_role("button", name=title).first.click()


def message(page, prefix: str) -> str:
    return page.locator(f"#{prefix}-message").inner_text()


def wait_for_message(page, prefix: str, pattern: str, timeout_s: float = 30) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = message(page, prefix)
        if re.search(pattern, text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"no message matching {pattern!r}; the page shows {message(page, prefix)!r}")


def progress(page, prefix: str) -> dict:
    """The progress bar's step, state and text, read in one go (the timer re-renders it every second)."""
    return page.evaluate("""(selector) => {
        const root = document.querySelector(selector), bar = root && root.querySelector('.lt-progress');
        return bar ? {step: Number(bar.dataset.step), state: bar.dataset.state, text: bar.innerText}
                   : {step: 0, state: null, text: root ? root.innerText : ''};
    }""", f"#{prefix}-progress")


def wait_progress(page, prefix: str, condition, timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = progress(page, prefix)
        if condition(state):
            return state
        if state["state"] == "failed":
            raise AssertionError(f"the run failed: {page.locator(f'#{prefix}-run-messages').inner_text()}")
        time.sleep(0.3)
    raise AssertionError(f"progress never satisfied the condition; last: {progress(page, prefix)}")


def use_demo_model(page, prefix: str) -> None:
    page.locator(f"#{prefix}-use-demo-model").click()
    page.wait_for_function(f"document.querySelector('#{prefix}-model-path textarea').value.startsWith('builtin:')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, url: str, runs: Path, home: Path) -> None:
        self.url, self.runs, self.home = url, runs, home

    def train(self, config) -> None:
        """Train ``config`` in this process (the library, not the page), with the app's LYCOTRAIN_HOME so that
        ``builtin:tiny-*`` is the very model the app uses."""
        from lycotrain.engine.loop import train

        with self.builtin_models():
            result = train(config)
        assert result["status"] == "finished", f"setup run {config.run_dir} failed: {result['message']}"

    @contextlib.contextmanager
    def builtin_models(self) -> Iterator[None]:
        """``builtin:tiny-*`` resolves to the app's built-in models (its LYCOTRAIN_HOME) inside this block."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LYCOTRAIN_HOME", str(self.home))
            yield

    def jobs(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in self.runs.glob("*/job.json")]

    def wait_idle(self, timeout_s: float = 300) -> None:
        """Wait until no job is queued or running (tests that start runs leave the queue empty)."""
        deadline = time.time() + timeout_s
        while any(j["state"] in ("queued", "running") for j in self.jobs()):
            if time.time() > deadline:
                raise AssertionError(f"jobs still live after {timeout_s} s: {self.jobs()}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    base = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = {**os.environ, "LYCOTRAIN_HOME": str(base / "home"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(base / "app.log", "wb")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs",
                                str(base / "runs")], cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    started = time.time()
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() - started > 90:
                process.kill()
                raise RuntimeError(f"the app did not come up: {(base / 'app.log').read_text()[-3000:]}")
            time.sleep(0.3)
    server = AppServer(url, base / "runs", base / "home")
    server.startup_s = time.time() - started
    yield server
    for job in server.jobs():  # the app's jobs run in their own sessions: end them by their pids
        if job["state"] == "running" and job.get("pid"):
            try:
                os.killpg(job["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_server: AppServer):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_server.url)
    page.locator("#image-start").wait_for()
    yield page
    context.close()
