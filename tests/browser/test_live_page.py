"""The live page in real headless Chromium: type a sentence, capture, and every view draws (model view, pattern,
head view, QK embedding, attribution, long-sequence view); hovering a head-view token brings out its lines;
clicking a thumbnail selects its head; clicking a QK point outlines its row; ablating a head shows the change;
saving writes the capture into the results folder; bad input shows one error line. (16k tokens: test_live_long.)

What the page drew is read back from plotly (``gd.data`` / ``gd.calcdata``) and compared with an independent
computation in the test (``attnscope.capture`` of the same input, numpy pooling). Timings are measured in the
browser: ``performance.now()`` at the mousedown on Capture, and in the animation frame after every view shows the
new capture (``layout.meta.capture``). Target: capture -> all views < 2 s (MiniLM, 64 tokens). The asserted bound
is generous (2 shared cores); the numbers are the report (``-s``). Screenshots: /tmp/attnscope_live_shots/.
"""

import numpy as np
import pytest
from live_helpers import TO_PIXELS, capture, figure, open_live, pointer, scroll, set_text, shot, wait

pytestmark = pytest.mark.slow
TEXT = ("The cat sat on the mat because it was warm, and the dog watched it from the door while the children played "
        "in the garden. Later that evening the old man told a story about the sea, the storm and the ship that never "
        "came home to the small harbour town where they all lived in those years.")  # 64 MiniLM tokens


@pytest.fixture(scope="module")
def reference(minilm):
    """The attention of TEXT from an independent capture in the test: [layer, head, query, key]."""
    import attnscope

    trace = attnscope.capture(minilm, TEXT)
    return trace.stack()[:, 0].numpy(), trace.tokens.strings[0]


def test_capture_draws_every_view(browser, live_server, snap, timings, reference):
    attn, tokens = reference
    assert len(tokens) == 64
    open_live(browser, live_server)
    set_text(browser, TEXT)
    ms = [capture(browser)[0] for _ in range(3)]
    timings["live: capture -> all 6 views drawn, MiniLM 64 tokens (ms, first)"] = ms[0]
    timings["live: capture -> all 6 views drawn, MiniLM 64 tokens (ms, median of 3)"] = sorted(ms)[1]
    drawn = browser.execute_script("""
        const gd = document.querySelector('#live-pattern .js-plotly-plot');
        return gd.calcdata[0][0].z.map(r => Array.from(r));""")
    np.testing.assert_allclose(np.asarray(drawn), attn[0, 0], atol=1e-5)  # default head L0 H0, every cell
    title = figure(browser, "live-model-view")["title"]
    assert "6 layers × 12 heads · 64 tokens" in title
    mosaic = np.asarray(browser.execute_script("""
        const gd = document.querySelector('#live-model-view .js-plotly-plot');
        return gd.calcdata[0][0].z.map(r => Array.from(r, v => v === null || isNaN(v) ? -1 : v));"""))
    thumb = mosaic[3 * 33:3 * 33 + 32, 7 * 33:7 * 33 + 32]  # L3 H7, max-pooled 2x2 (64 tokens -> 32 cells)
    np.testing.assert_allclose(thumb, attn[3, 7].reshape(32, 2, 32, 2).max(axis=(1, 3)), atol=1e-5)
    assert "rollout" in figure(browser, "live-attribution")["title"]
    shot(snap, "live_01_captured_top")
    scroll(browser, "#live-head-view")
    shot(snap, "live_02_head_view_and_qk")
    assert sorted(ms)[1] < 10_000


def test_hover_token_highlights_its_lines(browser, live_server, snap, reference):
    from attnscope.dashboards.live_views import HEAD_VIEW_LINES

    attn, tokens = reference
    open_live(browser, live_server)
    set_text(browser, TEXT)
    capture(browser)
    scroll(browser, "#live-head-view")
    i = 14  # 'dog'
    x, y = browser.execute_script(TO_PIXELS, "live-head-view", 0.0, i)
    pointer(browser, x, y)
    title = wait(browser, """const t = document.querySelector('#live-head-view .gtitle');
                              return t && t.textContent.includes('what it attends to') && t.textContent;""", 30)
    assert "'dog'" in title
    lines = browser.execute_script("""
        const gd = document.querySelector('#live-head-view .js-plotly-plot');
        return gd.data.filter(t => /^H\\d+$/.test(t.name)).map(t => [t.name, Array.from(t.y || [])]);""")
    drawn: dict[int, set] = {}
    for name, ys in lines:
        for q, k in zip(ys[0::3], ys[1::3]):
            assert q == i  # only the hovered query's lines are coloured
            drawn.setdefault(int(name[1:]), set()).add(int(k))
    threshold, top_k = HEAD_VIEW_LINES["layer"]
    for head in range(12):  # each head: its top-k keys of weight >= threshold, from the independent capture
        row = attn[0, head, i]
        want = {int(k) for k in np.argsort(-row, kind="stable")[:top_k] if row[k] >= threshold}
        assert drawn.get(head, set()) == want, head
    shot(snap, "live_03_head_view_hover_query_dog")
    x, y = browser.execute_script(TO_PIXELS, "live-head-view", 1.0, 2)
    pointer(browser, x, y)
    wait(browser, """const t = document.querySelector('#live-head-view .gtitle');
                      return t && t.textContent.includes("'cat': what attends to it");""", 30)
    shot(snap, "live_04_head_view_hover_key_cat")


def test_thumbnail_click_selects_head_and_qk_click_outlines_row(browser, live_server, snap, reference):
    open_live(browser, live_server)
    set_text(browser, TEXT)
    capture(browser)
    scroll(browser, "#live-model-view")
    for attempt in range(3):  # plotly clicks what it hovers: a click it missed is retried from a fresh move
        x, y = browser.execute_script(TO_PIXELS, "live-model-view", 7.0, 3.0)
        pointer(browser, x, y + attempt, click=True)
        try:
            wait(browser, "const t = document.querySelector('#live-pattern .gtitle');"
                           "return t && t.textContent.includes('L3 H7');", 20)
            break
        except Exception:  # noqa: BLE001 - retried
            if attempt == 2:
                raise
    assert browser.find_element("css selector", "#live-head-input").get_attribute("value") == "L3H7"
    assert browser.find_element("css selector", "#live-abl-heads").get_attribute("value") == "L3H7"
    wait(browser, "const t = document.querySelector('#live-qk .gtitle'); return t && t.textContent.includes('L3 H7');")
    assert figure(browser, "live-model-view")["shapes"] == 1  # the selected thumbnail is outlined
    shot(snap, "live_05_thumbnail_L3H7_selected")
    scroll(browser, "#live-qk")
    i = 6  # 'mat' as a query
    for attempt in range(3):
        x, y = browser.execute_script("""
            const gd = document.querySelector('#live-qk .js-plotly-plot');
            const t = gd._fullData[0], fl = gd._fullLayout, box = gd.getBoundingClientRect();  // x, y decoded
            return [box.left + fl.xaxis._offset + fl.xaxis.l2p(t.x[arguments[0]]),
                    box.top + fl.yaxis._offset + fl.yaxis.l2p(t.y[arguments[0]])];""", i)
        pointer(browser, x, y, click=True)
        try:
            text = wait(browser, "const t = document.querySelector('#live-pattern .gtitle');"
                                  "return t && t.textContent.includes('row: what it attends to') && t.textContent;", 20)
            break
        except Exception:  # noqa: BLE001 - a neighbouring point may be closer: retried below
            if attempt == 2:
                raise
    index = int(text.split("query ")[1].split()[0])
    assert figure(browser, "live-pattern")["shapes"] == 1
    box = browser.execute_script("""
        const s = document.querySelector('#live-pattern .js-plotly-plot').layout.shapes[0];
        return [s.y0, s.y1];""")
    assert box == [index - 0.5, index + 0.5]  # the outlined row is the clicked token's
    browser.execute_script("document.querySelector('#live-pattern').scrollIntoView({block: 'center'});")
    shot(snap, "live_06_qk_click_outlines_row")


def test_ablate_head_shows_the_change(browser, live_server, snap, timings):
    from selenium.webdriver.common.keys import Keys

    open_live(browser, live_server)
    set_text(browser, TEXT)
    capture(browser)
    field = browser.find_element("css selector", "#live-abl-heads")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
    field.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    field.send_keys("L2H3")
    browser.execute_script("window.__a0 = performance.now();")
    browser.find_element("css selector", "#live-ablate").click()
    text = wait(browser, "const r = document.querySelector('#live-abl-summary');"
                          "return r && r.textContent.includes('ablated') && r.textContent;", 60)
    z = wait(browser, """const gd = document.querySelector('#live-abl-grid .js-plotly-plot');
        return gd && gd.calcdata && gd.calcdata[0] && gd.layout.meta && gd.calcdata[0][0].z
               && gd.calcdata[0][0].z.map(r => Array.from(r));""", 60)
    timings["live: ablate L2H3 -> change drawn (ms)"] = float(browser.execute_script(
        "return performance.now() - window.__a0"))
    z = np.asarray(z)
    assert "ablated L2H3 (zero)" in text and "cosine to clean" in text
    assert np.all(z[:3] == 0) and np.all(z[3:] > 0)  # an ablation only reaches later layers
    scroll(browser, "#live-abl-summary")
    shot(snap, "live_07_ablation_L2H3")


def test_save_writes_the_capture(browser, live_server, live_results, reference):
    import attnscope

    open_live(browser, live_server)
    set_text(browser, TEXT)
    capture(browser)
    button = browser.find_element("css selector", "#live-save")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    text = wait(browser, "const r = document.querySelector('#live-saved');"
                          "return r && r.textContent.startsWith('saved') && r.textContent;", 60)
    saved = [p.strip() for p in text.removeprefix("saved: ").split(" (")[0].split(",")]
    trace = attnscope.AttentionTrace.load(live_results / saved[0])
    np.testing.assert_allclose(trace.stack()[:, 0].numpy(), reference[0], atol=1e-6)
    assert any(p.endswith("_rollout.parquet") for p in saved)


def test_bad_input_shows_one_error_line(browser, live_server, snap):
    open_live(browser, live_server)
    set_text(browser, "101 2023 banana 102", mode="ids")
    browser.find_element("css selector", "#live-capture").click()
    text = wait(browser, "const e = document.querySelector('#live-error'); return e && e.textContent;", 30)
    assert text.startswith("error: token ids must be non-negative integers") and "banana" in text
    shot(snap, "live_08_error_line")


