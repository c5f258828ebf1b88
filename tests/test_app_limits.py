"""The app's long work stops when nobody waits for it, and its uploads are bounded (issue 18), against the real
app.py in its own process on 127.0.0.1: a Measure whose client's event stream closes, whose tab's heartbeat ends,
or that runs when the app gets SIGTERM stops within seconds (the server's CPU time goes flat); 50 distinct 1 MB
uploads from one client are held 16 at a time and removed after the time limit or when the client's session
closes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from projection.demo.folder import write_demo

ROOT = Path(__file__).resolve().parents[1]
TABLE = [["exact", "mapped", "concatenated", "skipped"], "", "student order"]
LOAD = ["demo/teacher-wan", "single model", "file", "demo/student-wanlite.yaml", None, "wanlite", 64, 4, 2, 256, *TABLE,
        None]
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


class App:
    def __init__(self, tmp: Path, *args: str):
        self.root, self.temp = tmp / "root", tmp / "temp"
        self.root.mkdir()
        self.temp.mkdir()
        write_demo(self.root / "demo")
        g = torch.Generator().manual_seed(0)  # within every bound; minutes of work on the demo teacher
        save_file({"latents": torch.randn(4, 4, 128, 128, generator=g).half(),
                   "context": torch.randn(4, 16, 64, generator=g).half()}, str(self.root / "slow.safetensors"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
               "GRADIO_TEMP_DIR": str(self.temp), "TMPDIR": str(self.temp), "PROJECTION_CACHE": str(tmp / "cache"),
               "GRADIO_HEARTBEAT_INTERVAL": "0.5"}  # a closed client is noticed at its next heartbeat
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        self.log = tmp / "app.log"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--root", str(self.root), "--port",
                                      str(self.port), *args], cwd=self.root, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError("app.py did not start")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def busy(self, seconds: float = 1.0) -> float:
        """CPU seconds per second the server spends over the next `seconds`."""
        before = self.cpu()
        time.sleep(seconds)
        return (self.cpu() - before) / seconds

    def wait_busy(self) -> None:
        deadline = time.monotonic() + 60
        while self.busy(0.5) < 0.5:
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]

    def wait_idle(self, within: float) -> float:
        """Seconds until the server's CPU goes flat (under 0.15 cores over half a second)."""
        started = time.monotonic()
        while self.busy(0.5) > 0.15:
            assert time.monotonic() - started < within, self.log.read_text()[-3000:]
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def uploads(self) -> list[Path]:
        return [p for p in self.temp.rglob("*.yaml") if p.is_file()]


LIMIT = 6.0  # seconds an upload is kept in these tests (--upload-minutes 0.1)


@pytest.fixture
def app(tmp_path) -> Iterator[App]:
    app = App(tmp_path, "--upload-minutes", str(LIMIT / 60))
    yield app
    app.stop()


def fn_index(app: App, api_name: str) -> int:
    config = httpx.get(app.url + "config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def events(stream: httpx.Response) -> Iterator[dict]:
    for line in stream.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_a_measurement_stops_when_its_client_goes_away_and_on_sigterm(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False, download_files=False)
    client.predict(*LOAD, api_name="/load")
    measure = {"data": [None, "file", "slow.safetensors", 4, None], "fn_index": fn_index(app, "function"),
               "session_hash": client.session_hash, "event_data": None, "trigger_id": None}

    # 1. The event stream closes (a closed tab, a client gone), the session's heartbeat still beating: the
    # queue marks the event not alive and the running measurement stops.
    with httpx.Client(timeout=60) as http:
        assert http.post(app.url + "gradio_api/queue/join", json=measure).status_code == 200
        with http.stream("GET", app.url + "gradio_api/queue/data", params={"session_hash": client.session_hash}) as s:
            for event in events(s):
                if event.get("msg") == "progress":  # the teacher runs
                    break
            app.wait_busy()
    assert app.wait_idle(within=10) < 10
    assert "stopped: its client went away" in app.log.read_text()

    # 2. The session's heartbeat ends (the client closed): its session closes, and its work first.
    job = client.submit("file", "slow.safetensors", 4, api_name="/function")
    app.wait_busy()
    started = time.monotonic()
    client.close()
    assert app.wait_idle(within=15) < 15, time.monotonic() - started
    assert "stopped: its browser tab or client closed" in app.log.read_text()
    del job

    # 3. SIGTERM while a measurement runs: it stops, the app exits at once and leaves no temporary folder.
    other = Client(app.url, verbose=False, download_files=False)
    other.predict(*LOAD, api_name="/load")
    other.submit("file", "slow.safetensors", 4, api_name="/function")
    app.wait_busy()
    started = time.monotonic()
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 5  # (before: the server waited 5 s for open connections)
    assert "stopped: the app is stopping (SIGTERM)" in app.log.read_text()
    assert not [p for p in app.temp.iterdir() if p.name.startswith("inspector-")]
    other.close()


def test_uploads_are_bounded_per_client_and_removed(app):
    from gradio_client import Client

    upload = app.url + "gradio_api/upload"
    with httpx.Client(timeout=60) as http:
        # 50 distinct 1 MB uploads from one client with no session: 16 held at a time, the rest refused in one line
        started = time.monotonic()
        answers = [http.post(upload, files={"files": (f"f{i}.yaml", os.urandom(1_000_000))}) for i in range(50)]
        assert time.monotonic() - started < LIMIT  # (else the first ones could have been removed meanwhile)
        assert [r.status_code for r in answers] == [200] * 16 + [429] * 34
        assert {r.text for r in answers[16:]} == {
            f"upload refused: this client holds 16 uploaded files (at most 16 at once); each is removed {LIMIT:g} s "
            "after it arrived, or when the client's session closes"}
        assert len(app.uploads()) == 16
        time.sleep(LIMIT + 2)  # the time limit, and a sweep
        assert app.uploads() == []
        assert http.post(upload, files={"files": ("again.yaml", b"seed: 1\n")}).status_code == 200  # room again

        # with a session: the client's uploads go when its session closes, long before the time limit
        client = Client(app.url, verbose=False, download_files=False)
        client.predict(*LOAD, api_name="/load")
        for i in range(3):
            assert http.post(upload, files={"files": (f"s{i}.yaml", f"seed: {i}\n".encode())}).status_code == 200
        fresh = [p for p in app.uploads() if p.name.startswith("s")]
        assert len(fresh) == 3
        started = time.monotonic()
        client.close()
        while any(p.exists() for p in fresh):
            assert time.monotonic() - started < LIMIT / 2, "not removed when the session closed"
            time.sleep(0.1)


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_closing_the_browser_tab_stops_its_measurement(app):
    """The user's own case: Measure in a real browser, then close the tab: the server stops computing."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(app.url)
            page.get_by_text("patch_embedding.weight").first.wait_for()  # loaded: a session
            page.get_by_role("tab", name="Function").click()
            page.locator("#function-source").get_by_text("file", exact=True).click()
            page.locator("#function-path textarea, #function-path input").first.fill("slow.safetensors")
            page.locator("#function-count input").first.fill("4")
            page.locator("#function-measure").click()
            app.wait_busy()
            page.close()
            assert app.wait_idle(within=10) < 10
        finally:
            browser.close()
    assert "stopped: its" in app.log.read_text()  # its client went away, or its tab closed: whichever came first


def test_a_users_mistake_is_one_log_line(app):
    """Bad input is not a bug: the server logs one line naming it, no traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app.url, verbose=False, download_files=False)
    bad = [LOAD[0].replace("teacher-wan", "does-not-exist"), *LOAD[1:]]
    with pytest.raises(AppError, match="does-not-exist"):
        client.predict(*bad, api_name="/load")
    deadline = time.monotonic() + 10
    while "does-not-exist" not in app.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [ln for ln in app.log.read_text().splitlines() if "does-not-exist" in ln]
    assert len(lines) == 1 and lines[0].startswith("Cannot load: ") and "no such file or folder" in lines[0]
    assert "Traceback" not in app.log.read_text()
