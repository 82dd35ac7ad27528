"""The app in a real browser: `streamlit run` in a subprocess, driven by Selenium in headless Chromium
(Debian's `chromium` + `chromium-driver`; browsers cannot be downloaded here). Opens the app cold (a note says
it is loading before anything else shows), waits for the overlay, checks its markers against its legend and
the palette, clicks a patch, checks its details appear, hides a category from the legend, and saves
screenshots in the test's output folder."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from apps.palette import CATEGORY_COLOURS, OUTLINE

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APP = Path(__file__).resolve().parents[1] / "apps" / "workbench_app.py"
START_TIMEOUT = 120  # s until the server answers
OVERLAY_TIMEOUT = 300  # s until the first overlay: a cold model load, a tokens run for the rule, a trace

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # the app in headless Chromium on the default model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def server(tmp_path):
    """The app served on a free port; yields its URL and stops it afterwards."""
    port = _free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WB_RUNS_DIR": str(tmp_path / "runs")}
    argv = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none"]
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, START_TIMEOUT)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1500,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _first_seen(browser, texts: dict[str, str], until: str, timeout: float) -> dict[str, float]:
    """Seconds until each of `texts` first shows in the page, polled until `texts[until]` shows."""
    from selenium.webdriver.common.by import By

    started, seen = time.time(), {}
    while until not in seen:
        assert time.time() - started < timeout, f"{texts[until]!r} did not show within {timeout} s"
        body = browser.find_element(By.TAG_NAME, "body").text
        seen |= {name: time.time() - started for name, text in texts.items() if name not in seen and text in body}
        time.sleep(0.1)
    return seen


_MARKER_STYLES = """
const figure = document.querySelectorAll('.js-plotly-plot')[0];
const style = element => { const s = getComputedStyle(element); return [s.fill, s.fillOpacity, s.stroke]; };
return {traces: [...figure.querySelectorAll('.scatterlayer .trace')].map(
            trace => [...trace.querySelectorAll('.point')].map(style)),
        legend: [...figure.querySelectorAll('.legend .traces')].map(
            entry => [entry.textContent, style(entry.querySelector('.legendpoints path'))])};
"""


def _rgb(colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(colour[i:i + 2], 16) for i in (1, 3, 5)))


def test_load_a_sample_click_a_patch_and_see_its_details(browser, server, tmp_path):  # no server without a browser
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.time()
    browser.get(server)
    seen = _first_seen(browser, {"loading note": "loading", "navigation": "Layers", "answer": "Answer:"},
                       until="answer", timeout=OVERLAY_TIMEOUT)
    assert seen.get("loading note", float("inf")) <= seen["navigation"], f"a cold start says it is loading: {seen}"
    WebDriverWait(browser, 60).until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace .point")))
    first_overlay_s = time.time() - started
    time.sleep(1)  # let plotly finish wiring its event handlers
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "sink" in body and "dead" in body and "alive" in body
    assert "labels by the shipped probe-scene rule" in body
    browser.save_screenshot(str(tmp_path / "overlay.png"))
    figure = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]  # the overlay comes first on the page
    points = figure.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace .point")
    assert len(points) == 256, f"one marker per patch, got {len(points)}"

    # Markers as drawn (after the theme had its say) match their legend entry and the palette, outline included.
    styles = browser.execute_script(_MARKER_STYLES)
    assert [name.split(" ")[0] for name, _ in styles["legend"]] == list(CATEGORY_COLOURS)
    for (name, legend_style), trace, colour in zip(styles["legend"], styles["traces"], CATEGORY_COLOURS.values()):
        assert legend_style == [_rgb(colour), "0.45", _rgb(OUTLINE)], f"legend {name}: {legend_style}"
        assert all(style == legend_style for style in trace), f"markers of {name} differ from their legend"

    # Click the patch at row 3, column 5: the plot area is the drag layer over the 16x16 grid. Pointer
    # actions do not scroll, so bring the figure into view first; one more click if the first came too early.
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", figure)
    plot_area = figure.find_element(By.CSS_SELECTOR, ".draglayer .nsewdrag")
    width, height = float(plot_area.get_attribute("width")), float(plot_area.get_attribute("height"))
    row, col = 3, 5
    expected = f"Token {row * 16 + col} · row {row}, col {col}"
    for attempt in range(2):
        ActionChains(browser).move_to_element_with_offset(
            plot_area, (col + 0.5) * width / 16 - width / 2, (row + 0.5) * height / 16 - height / 2
        ).pause(0.3).click().perform()
        try:
            WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), expected))
            break
        except TimeoutException:
            if attempt:
                raise
            plot_area = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0].find_element(
                By.CSS_SELECTOR, ".draglayer .nsewdrag")
    body = browser.find_element(By.TAG_NAME, "body").text  # tables are canvases: check the text around them
    assert "Logit lens after layer" in body and re.search(r"anchor|robust SDs|massive activation|cosine", body), "the rule's reason is shown"
    browser.save_screenshot(str(tmp_path / "selected.png"))
    shots = os.environ.get("WB_APP_SHOTS")  # keep the screenshots somewhere a person can look at them
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        for name in ("overlay.png", "selected.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)
    print(f"first overlay after {first_overlay_s:.1f} s; screenshots in {tmp_path}")
    frame = browser.execute_script(
        "const shape = document.querySelectorAll('.js-plotly-plot')[0]._fullLayout.shapes[0];"
        "return [shape.x0, shape.y0];")
    assert frame == [col - 0.5, row - 0.5], "the overlay frames the clicked patch"

    # A click on a category's legend entry hides its markers (the per-category toggle).
    figure = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]
    counts = [len(trace) for trace in browser.execute_script(_MARKER_STYLES)["traces"]]
    biggest = counts.index(max(counts))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", figure)
    entry = figure.find_elements(By.CSS_SELECTOR, ".legend .traces .legendtoggle")[biggest]
    ActionChains(browser).move_to_element(entry).pause(0.3).click().perform()
    WebDriverWait(browser, 10).until(lambda _: sum(
        len(trace) for trace in browser.execute_script(_MARKER_STYLES)["traces"]) == 256 - counts[biggest])
