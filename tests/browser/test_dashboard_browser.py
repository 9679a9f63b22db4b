"""The dashboard in real headless Chromium: it starts on a results directory, the head grid renders, a head click
updates the pattern view, a 4096-token pattern renders, the ablation panel returns a result on the real MiniLM, and
paths outside the results directory are refused (in the page and over raw HTTP).

Timings are measured in the browser (``performance.now()`` from a mousedown listener to the animation frame after
the DOM shows the new view) and reported at the end of the session (``-s``). Targets: first paint of a 12 x 12
grid < 2 s, 4096-token pattern < 2 s, head click < 300 ms. The asserted bounds are generous (the suite shares
2 loaded cores); the numbers are the report.
"""

import http.client
import time
from urllib.parse import urlsplit

import pytest


pytestmark = pytest.mark.slow
LONG = 4096  # tokens of the long trace the results_dir fixture writes
RETRIES: list[tuple[int, int]] = []  # clicks plotly did not register (reported with the timings)

WATCH_GRID = """
window.__gridPaint = null;
const watch = () => {
  const title = document.querySelector('#head-grid .gtitle');
  if (window.__gridPaint === null && title && title.textContent.includes(%r)
      && document.querySelector('#head-grid .hm image')) {
    requestAnimationFrame(() => { window.__gridPaint = performance.now(); });
  }
};
new MutationObserver(watch).observe(document, {subtree: true, childList: true, characterData: true});
"""

WATCH_PATTERN = """
window.__t0 = null; window.__t1 = null;
document.addEventListener('mousedown', () => { if (window.__t0 === null) window.__t0 = performance.now(); },
                          {capture: true, once: true});
const want = arguments[0], needPlot = arguments[1];
const obs = new MutationObserver(() => {
  const box = document.querySelector('#pattern');
  if (box.textContent.includes(want) && (!needPlot || box.querySelector('.hm image, canvas.gl-canvas-context'))) {
    obs.disconnect();
    requestAnimationFrame(() => { window.__t1 = performance.now(); });
  }
});
obs.observe(document.querySelector('#pattern'), {subtree: true, childList: true, characterData: true});
"""

CELL = """
const gd = document.querySelector('#head-grid .js-plotly-plot');
const fl = gd._fullLayout, box = gd.getBoundingClientRect();
return [box.left + fl._size.l + fl.xaxis.l2p(arguments[1]), box.top + fl._size.t + fl.yaxis.l2p(arguments[0])];
"""


def _wait(browser, script, timeout=60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def _open(browser, url, grid_title):
    """Load the page with the grid watcher installed before any script runs; returns the first-paint time (ms)."""
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_GRID % grid_title})
    try:
        browser.get(url)
        return float(_wait(browser, "return window.__gridPaint"))
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]})


def _click_head(browser, layer, head, expect, plot=True):
    """Click cell (layer, head) of the grid; ms from mousedown to the pattern showing ``expect``.

    The pointer first rests on the cell (plotly clicks what it hovers; hover is throttled on a loaded machine), and
    a click that plotly did not register is retried (at most twice) from a fresh pointer move.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    for attempt in range(3):
        browser.execute_script(WATCH_PATTERN, expect, plot)
        x, y = browser.execute_script(CELL, layer, head)
        builder = ActionBuilder(browser)
        builder.pointer_action.move_to_location(5, 5).pause(0.1).move_to_location(int(x), int(y) + attempt)
        builder.pointer_action.pause(0.5).click()
        builder.perform()
        try:
            _wait(browser, "return window.__t1", timeout=30.0 if attempt < 2 else 60.0)
        except TimeoutException:
            if attempt == 2:
                raise
            RETRIES.append((layer, head))
            continue
        return float(browser.execute_script("return window.__t1 - window.__t0"))
    raise AssertionError("unreachable")


def test_head_grid_renders_and_click_updates_pattern(browser, server, snap, timings):
    paint = _open(browser, server + "/", "special_token_mass")
    timings["first paint, demo grid 6x12 (ms)"] = paint
    snap("01_demo_loaded")
    assert browser.find_element("css selector", "#run").text.strip().startswith("demo")
    clicks = []
    for layer, head in ((2, 7), (4, 5), (1, 11)):
        clicks.append(_click_head(browser, layer, head, f"L{layer} H{head}"))
    timings["head click -> pattern updated, demo (ms, median of 3)"] = sorted(clicks)[1]
    timings["head click -> pattern updated, demo (ms, slowest of 3)"] = max(clicks)
    assert browser.find_element("css selector", "#heads").get_attribute("value") == "L1H11"
    assert "[CLS]" in browser.find_element("css selector", "#top-table").text
    snap("02_demo_clicked_L1H11")
    assert sorted(clicks)[1] < 3000


def test_compare_two_runs_shows_difference_grid(browser, server, snap):
    _open(browser, server + "/", "special_token_mass")
    browser.find_element("css selector", "#compare").click()
    option = _wait(browser, "const i = document.querySelector(\"[role=option] input[value='demo_b/special_token_mass"
                            ".parquet']\"); return i && i.closest('[role=option]');")
    option.click()
    _wait(browser, "const t = document.querySelector('#diff-grid .gtitle'); "
                   "return t && t.textContent.includes('demo_b');")
    z = browser.execute_script("""
        const gd = document.querySelector('#diff-grid .js-plotly-plot');
        const row = r => Array.from(gd.calcdata[0][0].z[r]);  // the values plotly drew
        return [row(1), row(2)];""")
    assert all(abs(v) < 1e-6 for v in z[0]) and all(v < 0 for v in z[1])  # only layer 2 changed, downwards
    browser.execute_script("document.querySelector('#diff-box').scrollIntoView({block: 'center'});")
    snap("08_compare_difference_grid")


def test_12x12_grid_first_paint_and_4096_pattern(browser, server, snap, timings):
    url = server + "/?table=long/heads12.parquet&trace=long/trace_long.safetensors"
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.clearBrowserCache", {})  # cold: plotly.js (4.8 MB) fetched and compiled
    cold_paint = _open(browser, url, "heads12")
    timings["first paint, 12x12 grid, cold browser cache (ms from navigation start)"] = cold_paint
    paint = _open(browser, url, "heads12")
    timings["first paint, 12x12 grid, warm browser cache (ms from navigation start)"] = paint
    _wait(browser, "const t = document.querySelector('#pattern .gtitle'); return t && t.textContent.includes('L0');")
    snap("03_long_loaded")
    cold = _click_head(browser, 1, 5, f"L1 H5 · item 0 · {LONG}×{LONG}")
    timings[f"{LONG}-token pattern, click -> rendered, cold file read (ms)"] = cold
    title = browser.find_element("css selector", "#pattern .gtitle").text
    assert "max-pooled 16×16 blocks → 256×256" in browser.find_element("css selector", "#pattern").text, title
    snap("04_long_pattern_L1H5")
    warm = _click_head(browser, 0, 5, f"L0 H5 · item 0 · {LONG}×{LONG}")
    timings[f"{LONG}-token pattern, click -> rendered, cached (ms)"] = warm
    browser.execute_script(WATCH_PATTERN, "top-8 keys per query", True)
    browser.execute_script("window.__t0 = performance.now();")
    browser.find_element("css selector", "#mode input[value='topk']").find_element("xpath", "ancestor::label").click()
    try:
        _wait(browser, "return window.__t1", 20)
    finally:
        snap("04b_long_pattern_topk")
    timings[f"{LONG}-token pattern, switch to top-k (scattergl, {8 * LONG} points) (ms)"] = float(
        browser.execute_script("return window.__t1 - window.__t0"))
    error = _click_head(browser, 3, 2, "layer not in this trace", plot=False)  # the error shows as a message figure
    assert error < 60_000
    assert paint < 20_000 and cold_paint < 30_000 and cold < 20_000 and warm < 10_000


def test_ablation_panel_runs_on_minilm(browser, server, snap, timings):
    from selenium.webdriver.common.keys import Keys

    _open(browser, server + "/", "special_token_mass")
    _click_head(browser, 2, 7, "L2 H7")
    field = browser.find_element("css selector", "#abl-heads")
    assert field.get_attribute("value") == "L2H7"
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys("L2H*,L3H*")
    button = browser.find_element("css selector", "#abl-run")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    start = time.perf_counter()
    button.click()
    text = _wait(browser, "const r = document.querySelector('#abl-result'); return r && r.textContent;", 120)
    timings["ablation run, MiniLM, 24 heads (ms, click -> result shown)"] = (time.perf_counter() - start) * 1000
    assert "embedding cosine to clean: 1.0000 →" in text and "most changed tokens" in text
    assert "interventions.apply_plan" in text
    snap("05_ablation_result")
    timings["clicks plotly did not register (retried)"] = float(len(RETRIES))
    print("retried clicks:", RETRIES)


def test_paths_outside_results_are_refused(browser, server, snap):
    browser.get(server + "/?table=../../etc/passwd&trace=/etc/hostname")
    text = _wait(browser, "const a = document.querySelector('#refused'); return a && a.textContent;")
    assert "path refused" in text and "table:" in text and "trace:" in text
    snap("06_refused_deep_link")
    browser.get(server + "/files/..%2F..%2Fetc%2Fpasswd")
    body = browser.find_element("css selector", "body").text
    assert body.startswith("refused: path refused") and "root:" not in body
    snap("07_refused_download")
    listed = browser.execute_script("return Array.from(document.querySelectorAll('#files a')).map(a => a.href)")
    assert listed == []  # the refused page is plain text
    host = urlsplit(server)
    for raw in ("/files/../../etc/passwd", "/files/passwd.json", "/files/etc_link/passwd", "/files/notes.txt",
                "/files/%2e%2e/%2e%2e/etc/passwd"):
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.request("GET", raw)  # http.client sends the path as is: no client-side normalisation
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        conn.close()
        assert response.status == 403 and "root:" not in body, (raw, response.status, body[:200])


def test_download_of_a_listed_file_works(browser, server):
    browser.get(server + "/")
    _wait(browser, "return document.querySelectorAll('#files a').length > 0")
    hrefs = browser.execute_script("return Array.from(document.querySelectorAll('#files a')).map(a => a.href)")
    assert any(h.endswith("demo/special_token_mass.parquet") for h in hrefs)
    host = urlsplit(server)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
    conn.request("GET", "/files/demo/special_token_mass.parquet")
    response = conn.getresponse()
    assert response.status == 200 and response.read()[:4] == b"PAR1"
    conn.close()


def test_attribution_table_shows_tokens_not_an_error(browser, server, results_dir, snap):
    """Issue #21: a token attribution table (as ``attnscope attribute`` writes) is drawn as coloured tokens with a
    layer picker, not the clipped "no per-head rows" error. Its run sorts last, so the other tests' first run stays
    demo/."""
    import numpy as np

    from attnscope.circuits.token_attribution import attribution_table

    values = np.linspace(0.1, 0.9, 3 * 5).reshape(3, 5)
    attribution_table(values, tokens=["[CLS]", "the", "cat", "sat", "[SEP]"], method="rollout").save(
        results_dir / "zz_attr" / "attr.parquet")
    browser.get(server + "/?table=zz_attr/attr.parquet")
    title = _wait(browser, "const t = document.querySelector('#head-grid .gtitle'); "
                           "return t && t.textContent.includes('rollout') && t.textContent;", 30)
    assert "layer 2" in title
    assert browser.find_element("css selector", "#grid-msg").text == ""
    shown = browser.execute_script("""
        const gd = document.querySelector('#head-grid .js-plotly-plot');
        return [Array.from(gd.calcdata[0][0].z[0]), document.querySelector('#attr-layer-box').style.display];""")
    assert np.allclose(shown[0][:5], values[2], atol=1e-6) and shown[1] != "none"  # the last layer's values drawn
    snap("09_attribution_table")
