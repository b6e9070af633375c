"""`rolevec monitor`'s page in a real browser: headless Chromium draws every token with its colour.

Uses Debian's ``chromium`` and ``chromium-driver`` (scripts/test.sh installs them where it can) through
selenium, pointed at those two binaries so that nothing is downloaded. Without them the test is skipped,
except with ``CI=true``, where it fails and says how to install them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rolevec.analysis import monitor_page
from rolevec.analysis.monitor import Trace, monitor, reference_stats
from rolevec.model.testing import make_adapter
from rolevec.steering.interventions import Steering
from test_rank import PROMPTS, random_vectors

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
)
INSTALL = (
    "install Debian's browser and driver: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install "
    "-y --no-install-recommends chromium chromium-driver (scripts/test.sh does this as root), and selenium "
    "(pip install -c requirements/constraints.txt -e '.[dev]')"
)
#: Per channel: the browser draws whole sRGB triples as given; allow for rounding in its compositor.
TOLERANCE = 2

#: Everything a token row holds, per span: its index, computed background, box, and whether it is drawn.
SPANS_JS = """
return Array.from(document.querySelectorAll('.role-row')).map(row => ({
  role: row.dataset.role,
  spans: Array.from(row.querySelectorAll('span.tok')).map(s => {
    const r = s.getBoundingClientRect(), st = getComputedStyle(s);
    return {t: Number(s.dataset.t), bg: st.backgroundColor, x: r.left + window.scrollX,
            y: r.top + window.scrollY, w: r.width, h: r.height,
            shown: st.display !== 'none' && st.visibility === 'visible' && Number(st.opacity) > 0};
  }),
}));
"""


def _browser_or_skip() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"the browser test needs {', '.join(missing)}: {INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1200,900")
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def traces(zscore: bool) -> list[Trace]:
    """Two prompts on a tiny llama: one with whitespace and markup in it, one steered generation."""
    adapter = make_adapter("llama")
    vectors = random_vectors(adapter)
    dirs = {r: vectors.vector(r, 2, -1) for r in vectors.roles}
    stats = reference_stats(adapter, PROMPTS, dirs, 2, progress=False) if zscore else None
    steering = Steering.addition(vectors.vector("lawyer", 1, -1), layer=1, alpha=0.5)
    return [
        monitor(adapter, "Line one <b>bold</b> & more\n\tindented line two", dirs, 2, stats=stats),
        monitor(
            adapter, PROMPTS[0], dirs, 2, stats=stats, steering=steering, generate=True, max_new_tokens=6
        ),
    ]


def _rgb(css: str) -> tuple[int, int, int]:
    inside = css[css.index("(") + 1 : css.index(")")]
    r, g, b = (int(float(x)) for x in inside.split(",")[:3])
    return r, g, b


@pytest.mark.parametrize("zscore", [False, True], ids=["by-value", "by-z"])
def test_every_token_is_drawn_with_its_colour(driver: Any, tmp_path: Path, zscore: bool) -> None:
    from PIL import Image

    shown = traces(zscore)
    figures = [monitor_page.figure_png(t) for t in shown]
    page = tmp_path / "monitor.html"
    page.write_text(
        monitor_page.render_html(shown, {"model": "tiny llama"}, figures=figures), encoding="utf-8"
    )
    driver.get(page.as_uri())
    width = int(driver.execute_script("return document.documentElement.scrollWidth"))
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    # The whole page in one viewport, so one screenshot holds every span.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    rows = driver.execute_script(SPANS_JS)
    ratio = float(driver.execute_script("return window.devicePixelRatio"))
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    scales = monitor_page.scales(shown)
    expected_rows = [(t, role) for t in shown for role in t.roles]
    assert [r["role"] for r in rows] == [role for _, role in expected_rows]
    checked = 0
    for row, (trace, role) in zip(rows, expected_rows, strict=True):
        i = trace.roles.index(role)
        spans = row["spans"]
        assert len(spans) == len(trace.tokens), role  # every token drawn, once
        assert [s["t"] for s in spans] == list(range(len(trace.tokens)))
        values = monitor_page.coloured_by(trace)[i]
        for s in spans:
            want = monitor_page.colour(float(values[s["t"]]), scales[role])
            where = f"{role} token {s['t']} {trace.tokens[s['t']]!r}"
            assert s["shown"] and s["w"] > 0 and s["h"] > 0, where
            assert _rgb(s["bg"]) == want, where
            # The span's top-left padding: background only, no glyph stroke or underline there.
            px = shot.getpixel((int((s["x"] + 1) * ratio), int((s["y"] + 1) * ratio)))
            assert isinstance(px, tuple)
            assert all(abs(int(a) - b) <= TOLERANCE for a, b in zip(px[:3], want, strict=True)), (where, px)
            checked += 1
    assert checked == sum(len(t.tokens) * len(t.roles) for t in shown)
    # The colours really vary (a page drawn in one colour would pass the checks above only by accident).
    assert len({_rgb(s["bg"]) for r in rows for s in r["spans"]}) > 10
    assert torch.is_tensor(shown[1].values) and "generated" in shown[1].segments
