"""Take the README's screenshot: the app on the built-in demo, in Debian's chromium.

    python -m inspector.screenshot [--out assets/screenshot.png] [--tab mapping]
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "screenshot.png"))
    parser.add_argument("--tab", default="Mapping", help="tab to show (Mapping, Layers, Spectra, ...)")
    parser.add_argument("--height", type=int, default=2400, help="at most this many pixels of the page")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from .cli import start

    with tempfile.TemporaryDirectory() as root, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        blocks = start(["--root", root, "--port", str(port)], prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
                page.set_default_timeout(90_000)
                page.goto(blocks.local_url)
                page.get_by_text("patch_embedding.weight").first.wait_for()
                # the seeds' layout shows mapped, concatenated and skipped entries side by side
                page.get_by_role("tab", name="Sources").click()
                page.get_by_role("button", name="Demo: Wan (diffusers, 3 shards) → seeds' layout").click()
                page.get_by_text("Loaded in").wait_for()
                page.get_by_role("tab", name=args.tab).click()
                if args.tab == "Mapping":
                    page.get_by_text("blocks.0.attn.in_proj_weight").first.wait_for()
                    page.locator("#search textarea").press_sequentially("blocks.0.", delay=20)  # one block: all colours
                    page.wait_for_function("() => document.querySelector('#mapping-table [data-testid=\"cell-0-0\"]')"
                                           "?.innerText.startsWith('blocks.0.')")
                    page.locator("#entry-key input").fill("blocks.0.attn.in_proj_weight")
                    page.locator("#entry-key input").press("Enter")
                    page.wait_for_function("() => document.querySelector('#index-plot .js-plotly-plot')")
                time.sleep(2)  # let plotly finish its transitions
                height = min(args.height, page.evaluate("() => document.documentElement.scrollHeight"))
                page.screenshot(path=args.out, clip={"x": 0, "y": 0, "width": 1600, "height": height}, full_page=True)
                browser.close()
        finally:
            blocks.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
