"""The inspector in a real browser: Debian's chromium driven by Playwright against the launched app."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STATUSES = ["exact", "mapped", "concatenated", "skipped"]
TIMEOUT = 60_000  # ms; a busy 2-core machine starts the first projection slowly

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # inside gradio
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


def rgb(hex_color: str) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch

    from inspector.cli import start
    from projection.demo import write_demo

    root = tmp_path_factory.mktemp("browser-root")
    write_demo(root / "demo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    blocks = start(["--root", str(root), "--port", str(port)], prevent_thread_lock=True, quiet=True)
    yield blocks, root
    blocks.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    blocks, _ = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(TIMEOUT)
        page.goto(blocks.local_url)
        page.get_by_text("patch_embedding.weight").first.wait_for()
        yield page
        browser.close()


def status_cells(page):
    return page.locator('#mapping-table [role="gridcell"][data-col="1"]')


def show_only(page, status: str | None) -> None:
    """Tick one status in the filter (None: all of them) and wait for the table to follow."""
    for s in STATUSES:
        box = page.locator("#status-filter").get_by_label(s, exact=True)
        if box.is_checked() != (status is None or s == status):
            box.click()
    if status is not None:
        page.wait_for_function(
            """s => { const cells = [...document.querySelectorAll('#mapping-table [role="gridcell"][data-col="1"]')];
                      return cells.length > 0 && cells.every(c => c.innerText.trim() === s); }""", arg=status)


def plot_data(page, elem_id: str) -> list:
    return page.evaluate(f"() => document.querySelector('#{elem_id} .js-plotly-plot').data")


def test_statuses_are_shown_in_their_colours(page):
    from inspector.palette import STATUS_COLORS

    for s in STATUSES:  # the legend uses the same palette as the table
        swatch = page.locator(f'.legend-chip[data-status="{s}"] .swatch')
        assert swatch.evaluate("e => getComputedStyle(e).backgroundColor") == rgb(STATUS_COLORS[s])

    def check(status: str) -> None:
        show_only(page, status)
        cell = status_cells(page).first
        assert cell.inner_text().strip() == status
        assert cell.evaluate("e => getComputedStyle(e).backgroundColor") == rgb(STATUS_COLORS[status])

    check("exact")  # the reference student: exact and mapped
    check("mapped")
    show_only(page, None)
    page.get_by_role("tab", name="Sources").click()
    page.get_by_role("button", name="Demo: Wan (diffusers, 3 shards) → seeds' layout").click()
    page.get_by_text("Loaded in").wait_for()
    page.get_by_role("tab", name="Mapping").click()
    page.get_by_text("blocks.0.attn.in_proj_weight").first.wait_for()
    check("concatenated")  # the seeds' layout: stacked q/k/v and skipped norms
    check("skipped")
    reason = page.locator('#mapping-table [role="gridcell"][data-col="8"]').first.inner_text()
    assert reason == "time-embedding hidden: the student has 256, more than the teacher's 128"  # time_embed.0
    show_only(page, None)


def test_slider_moves_the_block_map_and_the_energy_chart(page):
    page.get_by_role("tab", name="Layers").click()
    page.locator("#layer-map .js-plotly-plot").wait_for()
    before_edges = plot_data(page, "layer-map")[0]["x"]
    before_bars = plot_data(page, "layer-energy")[0]
    assert before_edges[3] != 3
    box = page.get_by_label("number input for S1 ← T")
    box.fill("3")
    box.press("Tab")  # leaving the box releases the slider, which refreshes
    page.wait_for_function("() => document.querySelector('#layer-map .js-plotly-plot').data[0].x[3] === 3")
    page.wait_for_function(
        "() => document.querySelector('#layer-energy .js-plotly-plot').data[0].x.includes('S1 ← T3')")
    after_bars = plot_data(page, "layer-energy")[0]
    assert after_bars["y"] != before_bars["y"]
    assert page.locator("#layer-method input:checked").evaluate("e => e.value") == "custom"


def test_export_and_download_the_report(page, app, tmp_path):
    _, root = app
    page.get_by_role("tab", name="Layers").click()
    layers = plot_data(page, "layer-map")[0]["x"][0::3]  # each edge runs from its teacher block
    page.get_by_role("tab", name="Export").click()
    page.locator("#out-dir textarea, #out-dir input").first.fill("out/browser-export")
    page.locator("#export-button").click()
    page.get_by_text("Wrote out/browser-export").wait_for()
    link = page.locator("#export-files tr.file").filter(has_text="projection_report").locator("a").first
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "report.json"
    download.value.save_as(saved)
    report = json.loads(saved.read_text())
    assert report["layers"] == layers
    assert report == json.loads((root / "out" / "browser-export" / "projection_report.json").read_text())
