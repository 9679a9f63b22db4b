"""The live page with a vision encoder (``attnscope dash --model VIT``), in real headless Chromium: the image picker
shows without a question, Capture draws every view and the Image card, the map of the selected head read back from
plotly equals the model's own eager attention row of [CLS], and Ablate L0H1 reports the pooled image embedding.
Screenshots: /tmp/attnscope_live_shots/ (and results/screenshots/ with ATTNSCOPE_SCREENSHOTS=1).
"""

import numpy as np
import pytest
import torch
from live_helpers import VIEWS, capture, open_live, scroll, serve, set_text, shot, wait

pytestmark = pytest.mark.slow
MEDIA_VIEWS = VIEWS + ("live-media-image", "live-media-map", "live-media-heads")
HEATMAP = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.calcdata || !gd._fullLayout) return null;
const title = gd._fullLayout.title.text || '';
if (!title.includes(arguments[1])) return null;
return gd.data.filter(t => t.type === 'heatmap').map((t, i) => gd.calcdata[gd.data.indexOf(t)][0].z.map(r => Array.from(r)));
"""


@pytest.fixture(scope="module")
def vit_server(tmp_path_factory):
    import attnscope
    from attnscope.dashboards import create_app
    from attnscope.probes.coverage import ARCHITECTURES

    model = ARCHITECTURES["vit"].builder()
    srv, thread, url = serve(create_app(tmp_path_factory.mktemp("vit_results"), attnscope.load(model)))
    yield url, model
    srv.shutdown()
    thread.join(timeout=10)


def test_vision_encoder_capture_map_and_ablation(browser, vit_server, snap):
    from selenium.webdriver.common.keys import Keys

    from attnscope.dashboards.live_media import EXAMPLE_SEED, make_scene

    url, model = vit_server
    open_live(browser, url)
    wait(browser, "const e = document.querySelector('#live-vlm-inputs'); return e && e.offsetParent !== null;")
    set_text(browser, "")  # a vision encoder reads no text
    ms, key = capture(browser, MEDIA_VIEWS)
    pixels = torch.tensor(make_scene(EXAMPLE_SEED, 0).image, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = np.stack([a[0].numpy() for a in model(pixel_values=pixels, output_attentions=True).attentions])
    finally:
        model.set_attn_implementation("sdpa")
    browser.find_element("css selector", "#live-media-map-kind input[value='head']").click()
    field = browser.find_element("css selector", "#live-head-input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("L1H2", Keys.ENTER)
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "L1 H2")
    np.testing.assert_allclose(np.array(drawn[0]), attn[1, 2, 0, 1:].reshape(4, 4), atol=1e-6)
    scroll(browser, "#live-media-card")
    shot(snap, "live_vision_01_image_card_L1H2")
    heads = browser.find_element("css selector", "#live-abl-heads")
    heads.send_keys(Keys.CONTROL, "a")
    heads.send_keys("L0H1")
    browser.find_element("css selector", "#live-ablate").click()
    summary = wait(browser, "const s = document.querySelector('#live-abl-summary').textContent;"
                            "return s.includes('pooled image embedding') && s;", 60.0)
    assert f"on capture {key}" in summary and "Traceback" not in summary
    wait(browser, "const gd = document.querySelector('#live-abl-grid .js-plotly-plot');"
                  "return gd && gd.data && gd.data.length > 0;", 30.0)
    scroll(browser, "#live-abl-summary")
    shot(snap, "live_vision_02_ablation")
