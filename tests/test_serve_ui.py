"""The scoring web page (GET /) driven in headless Debian chromium through Playwright."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(300)

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is not used
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", "--disable-sync"]


def write_pngs(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        rng = np.random.default_rng(300 + i)
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(64 + 8 * i, 72, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def shown(page) -> list[tuple[str, float]]:
    return [(li.get_attribute("data-name"), float(li.get_attribute("data-score")))
            for li in page.locator("#results .result").all()]


def test_page_scores_sorts_and_filters(serve_app, tmp_path):
    from playwright.sync_api import sync_playwright

    import rayapp

    if not Path(CHROMIUM).exists():
        message = "install Debian's chromium (apt-get install -y chromium; scripts/setup.sh does it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it, so its absence there is a setup bug
        pytest.skip(message)
    paths = write_pngs(tmp_path, 5)
    prompt = "a big red circle"
    expected = rayapp.load(serve_app.model_dir, device="cpu").score(prompt, paths)
    by_score = sorted(zip([p.name for p in paths], expected), key=lambda row: -row[1])

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{serve_app.url}/")
            page.set_input_files("#files", [str(p) for p in paths])
            page.fill("#prompt", prompt)
            page.click("#score")
            page.wait_for_function("document.querySelectorAll('#results .result').length === 5")

            rows = shown(page)
            assert [name for name, _ in rows] == [name for name, _ in by_score]
            np.testing.assert_allclose([s for _, s in rows], [s for _, s in by_score], rtol=1e-4, atol=1e-5)
            assert "Scored 5 image(s)" in page.text_content("#status")

            # Lower-limit filter: only images scoring at least the limit stay, still sorted.
            limit = (by_score[1][1] + by_score[2][1]) / 2
            page.check("#filter-enabled")
            page.fill("#lower-limit", f"{limit:.6f}")
            assert [name for name, _ in shown(page)] == [name for name, _ in by_score[:2]]
            assert page.is_hidden("#empty")

            # Everything filtered out: an explanation instead of a crash (reference WebUI issue #23).
            page.fill("#lower-limit", f"{by_score[0][1] + 1:.6f}")
            assert shown(page) == []
            assert page.is_visible("#empty")

            # Filter off again: all five are back.
            page.uncheck("#filter-enabled")
            assert len(shown(page)) == 5
        finally:
            browser.close()
