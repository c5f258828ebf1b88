"""The inspector in a real browser: Debian's chromium driven by Playwright against the launched app."""
from __future__ import annotations

import json
import os
import socket
import time
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
    from projection.demo.folder import write_demo

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
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def open_app(browser, app, width: int, height: int):
    """A new browser tab (so a new session) on the app, once the demo's mapping is shown."""
    blocks, _ = app
    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT)
    page.goto(blocks.local_url)
    page.get_by_text("patch_embedding.weight").first.wait_for()
    return page


@pytest.fixture(scope="module")
def page(app, browser):
    page = open_app(browser, app, 1600, 1000)
    yield page
    page.close()


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


# ------------------------------------------------------------------ every way of moving a slider


def shown_layers(page) -> list[int]:
    """The teacher block of each student block, as the block map draws it (each edge starts at its teacher block)."""
    return plot_data(page, "layer-map")[0]["x"][0::3]


def wait_for_block(page, student: int, teacher: int) -> None:
    """Wait until the projection (block map and energy chart) uses teacher block `teacher` for `student`."""
    page.wait_for_function(
        """([s, t]) => { const map = document.querySelector('#layer-map .js-plotly-plot')?.data;
                         const bars = document.querySelector('#layer-energy .js-plotly-plot')?.data;
                         return map && bars && map[0].x[3 * s] === t && bars[0].x.includes(`S${s} ← T${t}`); }""",
        arg=[student, teacher])


def test_sliders_follow_arrow_keys_and_the_number_box(page):
    page.get_by_role("tab", name="Layers").click()
    page.locator("#layer-method").get_by_label("uniform", exact=True).click()
    wait_for_block(page, 1, 2)  # 4 of 8 blocks: 0, 2, 5, 7
    assert shown_layers(page) == [0, 2, 5, 7]
    track = page.get_by_label("range slider for S1 ← T")
    box = page.get_by_label("number input for S1 ← T")

    track.focus()
    track.press("ArrowRight")  # the keyboard on the slider itself
    wait_for_block(page, 1, 3)
    assert page.locator("#layer-method input:checked").evaluate("e => e.value") == "custom"
    track.press("ArrowLeft")
    track.press("ArrowLeft")
    wait_for_block(page, 1, 1)

    box.click()
    box.press("ArrowUp")  # the number box's own arrows
    wait_for_block(page, 1, 2)
    box.select_text()
    box.press_sequentially("4")  # typed, still focused: no need to leave the box
    wait_for_block(page, 1, 4)
    assert box.input_value() == "4" and track.input_value() == "4"
    assert shown_layers(page) == [0, 4, 5, 7]

    # out of range: answered beside the slider, which goes back to the block in use
    box.fill("12")
    slider = page.locator(".block-slider").filter(has=box)
    slider.get_by_text("no teacher block 12 (0–7): still T4").wait_for()
    page.wait_for_function("() => document.querySelector('[aria-label=\"number input for S1 ← T\"]').value === '4'")
    assert "invalid" in slider.get_attribute("class")
    box.press("Tab")  # leaving the box must not clamp it to 7 behind the projection's back
    page.wait_for_timeout(1000)
    assert box.input_value() == "4" and shown_layers(page) == [0, 4, 5, 7]
    assert page.get_by_text("Error", exact=True).count() == 0  # no error badges on the outputs
    assert page.locator(".toast-body").count() == 0

    box.fill("6")  # a good value clears the message
    wait_for_block(page, 1, 6)
    expect_hidden = slider.get_by_text("no teacher block 12")
    expect_hidden.wait_for(state="detached")
    assert "invalid" not in slider.get_attribute("class")

    # An emptied box, left, while a refresh is still in flight: Gradio defers the box's input event until that
    # refresh ends and reads the box only then, after leaving the box clamped it to its minimum (block 0). The box
    # must show the block in use again, and the projection keep it. Each request is held back 1 s here, so the
    # race happens every time, not only on a loaded machine.
    def held(route):
        time.sleep(1)
        route.continue_()

    page.route("**/queue/join*", held)
    box.fill("5")
    box.fill("")
    box.press("Tab")
    page.wait_for_timeout(4000)  # the three requests (input 5, release, the deferred input) have gone out
    page.unroute("**/queue/join*")
    wait_for_block(page, 1, 5)
    page.wait_for_timeout(1000)
    assert box.input_value() == "5" and shown_layers(page) == [0, 5, 5, 7]


def test_spectra_follow_the_layer_picked(page):
    page.get_by_role("tab", name="Layers").click()
    teacher = shown_layers(page)[1]
    page.get_by_role("tab", name="Spectra").click()
    title = "() => document.querySelector('#sv-plot .js-plotly-plot')?.layout.title.text || ''"
    page.wait_for_function(f"() => ({title})().includes('student blocks.0.')")
    page.locator("#spec-layer input").click()
    page.get_by_role("option", name="student block 1", exact=True).click()
    page.wait_for_function(f"() => ({title})().includes('student blocks.1.')")  # redrawn, not the old chart
    text = page.evaluate(title)
    assert f"(teacher block {teacher})" in text
    matrix = page.locator("#spec-matrix input").input_value()
    assert matrix and matrix in page.locator("#spec-matrix").inner_text() + matrix


def test_command_snippet_line_numbers_line_up(page):
    page.get_by_role("tab", name="Layers").click()
    page.locator("#layer-method").get_by_label("first", exact=True).click()  # redraws the hidden command
    wait_for_block(page, 3, 3)
    page.set_viewport_size({"width": 1600, "height": 400})  # the command below the fold, as on a small screen
    page.get_by_role("tab", name="Export").click()
    page.locator("#cli .cm-line").filter(has_text="layers: first").wait_for(state="attached")
    page.wait_for_timeout(500)
    tops = page.evaluate("""() => {
        const numbers = [...document.querySelectorAll('#cli .cm-lineNumbers .cm-gutterElement')]
            .filter(e => e.style.visibility !== 'hidden');
        const lines = [...document.querySelectorAll('#cli .cm-line')];
        return lines.map((l, i) => [numbers[i]?.innerText, Math.round(l.getBoundingClientRect().top),
                                    Math.round(numbers[i]?.getBoundingClientRect().top)]); }""")
    assert len(tops) > 10
    assert [n for n, _, _ in tops] == [str(i + 1) for i in range(len(tops))]
    assert all(abs(line - number) <= 1 for _, line, number in tops), tops
    page.set_viewport_size({"width": 1600, "height": 1000})
    text = page.locator("#cli .cm-content").inner_text()
    assert "cat > strategy.yaml" not in text and 'cat > "$inputs/strategy.yaml"' in text


# ------------------------------------------------------------------ a projector's screen


CHART_TEXT = """id => {
    const plot = document.querySelector(`#${id} .js-plotly-plot`);
    const frame = plot.getBoundingClientRect();
    const texts = [...plot.querySelectorAll('.gtitle, .legendtext, .xtitle, .ytitle, .annotation-text, .bartext, '
                                            + '.textpoint text, .xtick text, .ytick text')]
        .map(t => [t.textContent, t.getBoundingClientRect()]).filter(([_, r]) => r.width > 0);
    const outside = texts.filter(([_, r]) => r.left < frame.left - 1 || r.right > frame.right + 1
                                           || r.top < frame.top - 1 || r.bottom > frame.bottom + 1).map(([t]) => t);
    const overlaps = [];
    texts.forEach(([a, r], i) => texts.slice(i + 1).forEach(([b, q]) => {
        if (r.left < q.right - 1 && q.left < r.right - 1 && r.top < q.bottom - 1 && q.top < r.bottom - 1)
            overlaps.push([a, b]); }));
    return {outside, overlaps, count: texts.length};
}"""


def check_chart_text(page, elem_id: str) -> None:
    """Every title, label and legend of a chart lies inside it, and none covers another."""
    page.locator(f"#{elem_id} .js-plotly-plot .gtitle").wait_for()
    found = page.evaluate(CHART_TEXT, elem_id)
    assert found["count"] > 3 and not found["outside"] and not found["overlaps"], (elem_id, found)


def in_view(page, locator, height: int) -> None:
    box = locator.bounding_box()
    assert box and box["y"] >= 0 and box["y"] + box["height"] <= height, (locator, box, height)


@pytest.mark.parametrize("width, height", [(1280, 720), (1600, 1000)])
def test_each_tab_starts_on_the_first_screen(browser, app, tmp_path, width, height):
    page = open_app(browser, app, width, height)
    try:
        page.screenshot(path=tmp_path / f"mapping-{width}x{height}.png")
        cells = page.locator('#mapping-table [role="gridcell"][data-col="0"]')
        for i in range(3):  # the first mapping rows, without scrolling
            in_view(page, cells.nth(i), height)
        # table headers and cells never break inside a word; a cell too long for one line is cut with an
        # ellipsis and is whole in its tooltip
        wrapping = page.evaluate("""() => [...document.querySelectorAll(
                '#mapping-table [role="gridcell"], #mapping-table [role="columnheader"], #mapping-table th')]
            .flatMap(c => [c, ...c.querySelectorAll('*')])
            .filter(e => { const s = getComputedStyle(e);
                           // a text cut on purpose ends in an ellipsis and is whole in a tooltip
                           const whole = s.textOverflow === 'ellipsis'
                                         && (e.closest('th[title]') || e.querySelector('[title]'));
                           return !['normal', 'keep-all'].includes(s.wordBreak) || s.overflowWrap !== 'normal'
                                  || e.scrollWidth > e.clientWidth + 1 && s.overflow !== 'visible' && !whole; })
            .map(e => e.innerText.slice(0, 40))""")
        assert not wrapping, wrapping[:5]
        # every header is whole (it wraps between its words rather than being cut)
        cut = page.evaluate("""() => [...document.querySelectorAll('#mapping-table th')]
            .flatMap(c => [c, ...c.querySelectorAll('*')])
            .filter(e => e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1)
            .map(e => e.innerText.slice(0, 40))""")
        assert not cut, cut
        # the cards: nothing runs over its card, and a source path keeps its end (the file name) in view
        over = page.evaluate("""() => [...document.querySelectorAll('.card')]
            .filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.innerText.slice(0, 40))""")
        assert not over
        ends = page.evaluate("""() => [...document.querySelectorAll('.card-source')].map(e => {
            const text = e.querySelector('bdi')?.firstChild ?? e.firstChild, range = document.createRange();
            range.setStart(text, text.length - 1); range.setEnd(text, text.length);
            const last = range.getBoundingClientRect(), box = e.getBoundingClientRect();
            return last.right <= box.right + 1 && last.left >= box.left - 1; })""")
        assert ends == [True, True]

        page.get_by_role("tab", name="Layers").click()
        page.locator("#layer-energy .js-plotly-plot").wait_for()
        page.wait_for_timeout(500)  # plotly's own layout pass
        page.screenshot(path=tmp_path / f"layers-{width}x{height}.png")
        sliders = page.locator(".block-slider").filter(has=page.locator("input[type=range]"))
        assert sliders.count() == 4
        for i in range(4):  # every slider and both charts it drives, together on screen
            in_view(page, sliders.nth(i), height)
        in_view(page, page.locator("#layer-map .js-plotly-plot"), height)
        in_view(page, page.locator("#layer-energy .js-plotly-plot"), height)
        check_chart_text(page, "layer-map")
        check_chart_text(page, "layer-energy")

        page.get_by_role("tab", name="Spectra").click()
        page.locator("#sv-plot .js-plotly-plot .gtitle").wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=tmp_path / f"spectra-{width}x{height}.png")
        check_chart_text(page, "sv-plot")
        check_chart_text(page, "cum-plot")
    finally:
        page.close()


def test_ab_comparison_leads_with_what_the_students_compute(browser, app, tmp_path):
    """At 1280x720: Compare A and B draws the velocity error per noise level and per student block (A, B and
    random init) first; the retained-weight-energy chart, a weight statistic, comes below it."""
    page = open_app(browser, app, 1280, 720)
    try:
        page.get_by_role("tab", name="Strategy").click()
        page.get_by_role("button", name="Compare A and B").click()
        page.wait_for_function("() => document.querySelector('#compare-energy-plot .js-plotly-plot')?.data?.length",
                               timeout=4 * TIMEOUT)
        lead = plot_data(page, "compare-plot")
        assert [t["name"] for t in lead if t.get("xaxis") != "x2"] == ["strategy A", "strategy B", "random init"]
        assert any(t.get("xaxis") == "x2" for t in lead)  # per student block
        title = page.evaluate("() => document.querySelector('#compare-energy-plot .js-plotly-plot').layout.title.text")
        assert title.startswith("Weight statistic")
        first, second = (page.locator(f"#{i}").bounding_box() for i in ("compare-plot", "compare-energy-plot"))
        assert second["y"] >= first["y"] + first["height"] - 1  # the weight statistic below
        assert "velocity error vs teacher" in page.locator("#compare-table").inner_text()
        page.screenshot(path=tmp_path / "ab.png", full_page=True)
    finally:
        page.close()


def test_gallery_draws_every_row_with_its_prompt_accuracy(page, tmp_path):
    """The stakeholder's view: the teacher, both strategies' students and a random student, one picture each,
    the prompt accuracy in each row's caption and in the table beside them."""
    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery-draw").click()
    table = page.locator("#gallery-table")
    table.get_by_text("Random init, same shape").wait_for(timeout=4 * TIMEOUT)
    for name, title in (("teacher", "Teacher"), ("a", "Student, strategy A"), ("b", "Student, strategy B"),
                        ("random", "Random init, same shape")):
        row = page.locator(f"#gallery-{name}")
        row.locator("img").wait_for()
        caption = row.get_by_text(title).first.inner_text()
        assert "% of 100" in caption
        assert ("velocity error" in caption) == (name != "teacher")
        width = row.locator("img").evaluate("img => img.naturalWidth")
        assert width > 100  # a strip of ten digits, not an empty placeholder
    teacher = page.locator("#gallery-teacher").get_by_text("Teacher: prompt accuracy").inner_text()
    assert float(teacher.split("accuracy ")[1].split("%")[0]) >= 90
    page.screenshot(path=tmp_path / "gallery.png", full_page=True)


def test_function_tab_measures_and_the_layers_map_shows_influence(page, tmp_path):
    """Measure on the demo's held-out set: the velocity error per noise level leads, the student beside both
    references; then the Layers tab's block map carries the teacher blocks' influence."""
    page.get_by_role("tab", name="Function").click()
    page.locator("#function-measure").click()
    levels = page.locator("#function-levels")
    levels.get_by_text("all levels").wait_for(timeout=4 * TIMEOUT)
    assert "Measured on" in page.locator("#function-msg").inner_text()
    headers = levels.locator('[role="columnheader"], th').all_inner_texts()
    assert any("random init: error" in h for h in headers) and any("svd-per-matrix: error" in h for h in headers)
    assert page.locator("#function-teacher").get_by_text("none").count() >= 1  # blocks no student block reads
    page.screenshot(path=tmp_path / "function.png", full_page=True)
    page.get_by_role("tab", name="Layers").click()
    page.wait_for_function("""() => [...(document.querySelector('#layer-map .js-plotly-plot')?.data ?? [])]
                              .some(d => d.name === 'influence')""")
    bars = next(d for d in plot_data(page, "layer-map") if d["name"] == "influence")
    assert len(bars["customdata"]) == 8 and max(bars["customdata"]) > 0
    check_chart_text(page, "layer-map")


def test_function_tab_lists_the_sets_found_and_a_choice_fills_the_path(page, app, tmp_path):
    """Opening the Function tab lists the sets beside the teacher (the demo's held-out set); choosing one fills the
    file path and selects 'file'. An uploaded set selects 'upload' and is measured under its uploaded name."""
    page.get_by_role("tab", name="Function").click()
    page.locator("#function-found input").click()
    option = page.get_by_role("option").filter(has_text="calibration.safetensors").first
    option.wait_for(timeout=TIMEOUT)
    assert "269 latents of 4x8x8" in option.inner_text()
    option.click()
    page.wait_for_function("""() => document.querySelector('#function-path textarea, #function-path input')
                              ?.value === 'demo/calibration.safetensors'""", timeout=TIMEOUT)
    assert page.locator("#function-source input[value='file']").is_checked()
    page.screenshot(path=tmp_path / "function-sets.png", full_page=True)
    _, root = app
    page.locator("#function-upload input[type=file]").set_input_files(str(root / "demo" / "calibration.safetensors"))
    page.wait_for_function("() => document.querySelector(\"#function-source input[value='upload']\")?.checked",
                           timeout=TIMEOUT)
    page.locator("#function-count input").fill("8")
    page.locator("#function-measure").click()
    page.locator("#function-msg").get_by_text("(uploaded calibration.safetensors): 8 latents").wait_for(
        timeout=4 * TIMEOUT)


UNDER = """box => [...document.querySelectorAll(
        'button, input, textarea, select, a[href], [role="tab"], [role="button"], [role="option"], [role="gridcell"]')]
    .filter(e => !e.closest('.toast-wrap, [data-testid="status-tracker"]') && e.checkVisibility())
    .map(e => [e, e.getBoundingClientRect()])
    .filter(([_, r]) => r.width > 0 && r.left < box.x + box.width - 1 && box.x < r.right - 1
                        && r.top < box.y + box.height - 1 && box.y < r.bottom - 1)
    .map(([e]) => e.outerHTML.slice(0, 80))"""  # the controls under a box (x, y, width, height) on the page


def test_a_failed_load_says_why_in_a_toast_that_covers_nothing(browser, app):
    from inspector.bridge import ERROR_SECONDS

    page = open_app(browser, app, 1280, 720)
    try:
        page.get_by_role("tab", name="Sources").click()
        page.get_by_text("Loaded in").wait_for()  # the page's own load
        page.locator("#teacher-path textarea, #teacher-path input").first.fill("demo/does-not-exist")
        page.locator("#load-button").click()
        toast = page.locator(".toast-body").filter(has_text="no such file or folder")
        toast.wait_for()
        assert "demo/does-not-exist" in toast.inner_text() and "hub" in toast.inner_text()
        assert page.get_by_text("Loaded in").count() == 0  # the previous success is not left beside the error
        box = toast.bounding_box()
        cards = page.locator("#cards").bounding_box()
        assert box["y"] + box["height"] <= cards["y"] or box["y"] >= cards["y"] + cards["height"]  # cards readable
        assert page.evaluate(UNDER, box) == []  # and every control usable
        started = time.monotonic()
        toast.wait_for(state="detached", timeout=(ERROR_SECONDS + 10) * 1000)  # it closes on its own
        assert time.monotonic() - started <= ERROR_SECONDS + 10
    finally:
        page.close()


# ------------------------------------------------------------------ readable at 1280x720 (issue 22)


SMALL = (1280, 720)


def rows_in_view(page, elem_id: str) -> list[dict]:
    """The table's body rows wholly inside the viewport, with their heights."""
    return page.evaluate("""id => [...document.querySelectorAll(`#${id} [role="row"]`)]
        .filter(r => r.querySelector('[role="gridcell"]'))
        .map(r => r.getBoundingClientRect())
        .filter(b => b.height > 0 && b.top >= 0 && b.bottom <= innerHeight)
        .map(b => ({top: b.top, height: b.height}))""", elem_id)


def test_mapping_shows_8_one_line_rows_on_the_first_screen(browser, app, tmp_path):
    """At 1280x720 the first screen shows at least 8 rows, each one line: a skipped row's reason is cut with an
    ellipsis and is whole in its tooltip; the legend takes one line."""
    page = open_app(browser, app, *SMALL)
    try:
        def check(name: str) -> None:
            page.screenshot(path=tmp_path / f"{name}.png")
            rows = rows_in_view(page, "mapping-table")
            assert len(rows) >= 8, (name, rows)
            assert max(r["height"] for r in rows) < 40, (name, rows)  # one line of text each
            chips = page.locator(".legend-chip").evaluate_all("cs => cs.map(c => c.getBoundingClientRect().top)")
            assert max(chips) - min(chips) < 5, chips

        check("reference")
        page.get_by_role("tab", name="Sources").click()
        page.get_by_role("button", name="Demo: Wan (diffusers, 3 shards) → seeds' layout").click()
        page.get_by_text("Loaded in").wait_for()
        page.get_by_role("tab", name="Mapping").click()
        page.get_by_text("blocks.0.attn.in_proj_weight").first.wait_for()
        check("seeds-layout")  # skipped rows with long reasons near the top
        reason = page.locator('#mapping-table [role="gridcell"][data-col="8"]').filter(
            has_text="time-embedding").first
        whole = "time-embedding hidden: the student has 256, more than the teacher's 128"
        assert reason.locator("[title]").get_attribute("title") == whole
        clipped = reason.locator("span").first.evaluate(
            "e => [e.scrollWidth > e.clientWidth, getComputedStyle(e).textOverflow]")
        assert clipped == [True, "ellipsis"]
        reason.click()  # a click opens the row's details and shows the cell whole, wrapped, in place
        page.wait_for_function("() => document.querySelector('#entry-key input')?.value === 'time_embed.0.weight'")
        opened = reason.locator("span").first.evaluate(
            "e => [e.innerText, e.scrollWidth <= e.clientWidth + 1, e.getBoundingClientRect().height]")
        assert opened[0] == whole and opened[1] and opened[2] > 2 * max(r["height"] for r in rows_in_view(
            page, "mapping-table")[:1]), opened
    finally:
        page.close()


def test_ab_table_shows_a_b_and_the_difference_without_scrolling_sideways(browser, app, tmp_path):
    page = open_app(browser, app, *SMALL)
    try:
        page.get_by_role("tab", name="Strategy").click()
        page.get_by_role("button", name="Compare A and B").click()
        table = page.locator("#compare-table")
        table.locator('[role="gridcell"]').first.wait_for(timeout=4 * TIMEOUT)
        table.scroll_into_view_if_needed()
        page.wait_for_timeout(500)
        page.screenshot(path=tmp_path / "compare.png")
        found = table.evaluate("""t => {
            const view = t.querySelector('.virtual-table-viewport'), frame = t.getBoundingClientRect();
            const inside = r => r.left >= frame.left - 1 && r.right <= frame.right + 1 && r.right <= innerWidth;
            const heads = [...t.querySelectorAll('th')]
                .map(h => [h.innerText.trim(), inside(h.getBoundingClientRect())]);
            const first = [...t.querySelectorAll('[role="gridcell"][data-row="0"]')]
                .map(c => [c.innerText.trim(), inside(c.getBoundingClientRect())]);
            return {scroll: view.scrollWidth, width: view.clientWidth, heads, first}; }""")
        assert found["scroll"] <= found["width"] + 1, found  # nothing hides to the right
        assert found["heads"] == [["measure", True], ["A", True], ["B", True], ["B − A", True]], found
        assert all(shown and text for text, shown in found["first"]), found  # A, B and B − A values in view
        float(found["first"][1][0])  # the values themselves, not placeholders
    finally:
        page.close()


TRACKERS = """() => [...document.querySelectorAll('[data-testid="status-tracker"]:not(.hide)')].map(t => ({
    where: t.parentElement.id,
    texts: [...t.querySelectorAll('*')].filter(e => !e.children.length && e.innerText?.trim())  // not svg
        .map(e => { const r = e.getBoundingClientRect();
                    return {text: e.innerText.trim(), x: r.x, y: r.y, width: r.width, height: r.height}; })}))
    .filter(t => t.texts.length)"""  # the progress shown now: where, its texts and their boxes


def progress_beside(page, button: str, message: str) -> None:
    """Press `button` and catch its progress while the work runs (however briefly: every change of the page is
    looked at): shown in `message` only (the element beside or under the button), level with or just below the
    button, over no control."""
    page.evaluate(f"""() => {{ window.seen = [];
        new MutationObserver(() => {{ const shown = ({TRACKERS})();
                                     if (shown.length && window.seen.length < 20) window.seen.push(shown); }})
            .observe(document.body, {{subtree: true, childList: true, attributes: true, characterData: true}}); }}""")
    page.locator(f"#{button}").click()
    page.wait_for_function("() => window.seen.length > 0", timeout=TIMEOUT)
    page.wait_for_timeout(500)  # a few of its updates
    pressed = page.locator(f"#{button}").bounding_box()
    for shown in page.evaluate("() => window.seen"):
        assert {t["where"] for t in shown} == {message}, shown
        for text in shown[0]["texts"]:
            assert page.evaluate(UNDER, text) == [], text
            assert pressed["y"] - 10 <= text["y"] <= pressed["y"] + pressed["height"] + 80, (text, pressed)


def test_gallery_progress_beside_the_button_and_digits_96_px_tall(browser, app, tmp_path):
    page = open_app(browser, app, *SMALL)
    try:
        page.get_by_role("tab", name="Gallery").click()
        before = page.locator("#gallery-table").inner_text()
        assert "Draw samples" in before and "velocity error" in before  # says what will appear
        progress_beside(page, "gallery-draw", "gallery-msg")
        page.screenshot(path=tmp_path / "gallery-progress.png")
        page.wait_for_function("""() => ['teacher', 'a', 'b', 'random'].every(
            n => document.querySelector(`#gallery-${n} img`)?.complete
                 && document.querySelector(`#gallery-${n} img`).naturalWidth > 0)""", timeout=4 * TIMEOUT)
        page.locator("#gallery-teacher").scroll_into_view_if_needed()
        page.screenshot(path=tmp_path / "gallery.png")
        for name in ("teacher", "a", "b", "random"):
            found = page.locator(f"#gallery-{name}").evaluate("""b => {
                const img = b.querySelector('img'), r = img.getBoundingClientRect();
                // the picture drawn inside the img box (object-fit: contain keeps its aspect)
                const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
                const h = img.naturalHeight * scale, w = img.naturalWidth * scale;
                const pic = {top: r.top + (r.height - h) / 2, bottom: r.top + (r.height + h) / 2,
                             left: r.left + (r.width - w) / 2, right: r.left + (r.width + w) / 2};
                const c = b.querySelector('[data-testid="block-label"]').getBoundingClientRect();
                const covers = c.left < pic.right && pic.left < c.right && c.top < pic.bottom && pic.top < c.bottom;
                return {height: h, covers}; }""")
            # one strip of samples (one digit high): its height is each digit's
            assert found["height"] >= 96 and not found["covers"], (name, found)
    finally:
        page.close()


def test_function_tables_say_what_fills_them_and_progress_is_beside_measure(browser, app, tmp_path):
    page = open_app(browser, app, *SMALL)
    try:
        page.get_by_role("tab", name="Function").click()
        for elem_id, column in (("function-levels", "student: error"), ("function-blocks", "from teacher block"),
                                ("function-teacher", "influence"), ("function-agreement", "by chance")):
            table = page.locator(f"#{elem_id}")
            heads = table.locator("th").all_inner_texts()
            assert not {h.strip() for h in heads} & {"1", "2", "3"}, (elem_id, heads)  # not Gradio's empty headers
            assert any(column in h for h in heads), (elem_id, heads)
            assert "press Measure" in table.locator('[role="gridcell"]').first.inner_text()
        page.locator("#function-measure").scroll_into_view_if_needed()
        progress_beside(page, "function-measure", "function-msg")
        page.screenshot(path=tmp_path / "function-progress.png")
        page.locator("#function-levels").get_by_text("all levels").wait_for(timeout=4 * TIMEOUT)
    finally:
        page.close()


def test_probe_recoverability_ranks_the_starts_with_progress_beside_its_button(browser, app, tmp_path):
    """The Function tab's probe at 1280x720: the table says what will appear, the run's progress shows beside its
    button, then every start is ranked (random init and the default with A and B) and its curve drawn."""
    page = open_app(browser, app, *SMALL)
    try:
        page.get_by_role("tab", name="Function").click()
        table = page.locator("#probe-table")
        assert "press Probe" in table.locator('[role="gridcell"]').first.inner_text()
        page.locator("#function-count input").fill("12")
        page.locator("#probe-steps input").fill("3")
        page.locator("#probe-run").scroll_into_view_if_needed()
        progress_beside(page, "probe-run", "probe-msg")
        page.screenshot(path=tmp_path / "probe-progress.png")
        table.get_by_text("strategy B").wait_for(timeout=4 * TIMEOUT)
        text = table.inner_text()
        assert all(name in text for name in ("random init", "default", "strategy A", "error after 3 steps"))
        assert "Probed on" in page.locator("#probe-msg").inner_text()
        page.wait_for_function("() => document.querySelector('#probe-chart .js-plotly-plot')?.data?.length === 4")
        assert {d["name"] for d in plot_data(page, "probe-chart")} == {"random init", "default", "strategy A",
                                                                      "strategy B"}
        page.screenshot(path=tmp_path / "probe.png", full_page=True)
    finally:
        page.close()


def test_a_clamped_layer_value_is_explained_whole(browser, app, tmp_path):
    page = open_app(browser, app, *SMALL)
    try:
        page.get_by_role("tab", name="Layers").click()
        box = page.get_by_label("number input for S1 ← T")
        box.fill("12")
        slider = page.locator(".block-slider").filter(has=box)
        note = slider.locator(".info-text")
        note.get_by_text("no teacher block 12").wait_for()
        page.screenshot(path=tmp_path / "layers-note.png")
        found = note.evaluate("""n => {
            const range = document.createRange(); range.selectNodeContents(n);
            const lines = [...range.getClientRects()];
            const block = n.closest('.block-slider').getBoundingClientRect();
            const clipped = [];  // the note or a box around it cut short
            for (let e = n; e && !e.matches('#sliders'); e = e.parentElement)
                if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible')
                    clipped.push(e.className);
            return {text: n.innerText, clipped, outside: lines.filter(r => r.right > block.right + 1
                                                                       || r.left < block.left - 1).length}; }""")
        assert "still T" in found["text"] and not found["clipped"] and not found["outside"], found
    finally:
        page.close()
