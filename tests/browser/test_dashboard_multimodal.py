"""The dashboard's image views in real headless Chromium, on a real capture of a tiny Stable Diffusion pipeline.

The results folder ``sd/`` holds a 2-step capture of ``tiny_sd_pipeline()`` (``capture.safetensors``), the image
that run generated (``image.png``) and the DAAM table of ``daam_maps(tiny_sd_pipeline(), ["a red cat"], ["red",
"cat"], num_inference_steps=2)`` (``daam.parquet``). In the page: the head grid shows a note for the DAAM table,
the pattern panel's "map" mode draws the image with the heat map of the chosen head and text token over it, and
the Maps card draws the chosen word's DAAM map. The values plotly drew (``gd.calcdata``) are compared with an
independent computation from the saved files (the trace's attention column; the table pivoted with pandas).
"""

import threading

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
SITE = ("unet.down.0", 0, "cross")  # the default site of the trace (first tower|kind in sorted order)
GRID = (8, 8)

DRAWN = """
const gd = document.querySelector(arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.calcdata || !gd._fullLayout) return null;
const title = gd._fullLayout.title.text || '';
if (!title.includes(arguments[1])) return null;
const i = gd.data.findIndex(t => t.type === 'heatmap');
if (i < 0 || !gd.calcdata[i]) return null;
const image = gd.data.find(t => t.type === 'image');
return {title: title, z: gd.calcdata[i][0].z.map(r => Array.from(r)), types: gd.data.map(t => t.type),
        source: image && image.source ? image.source.slice(0, 22) : null,
        painted: !!document.querySelector(arguments[0] + ' .imagelayer image, ' + arguments[0] + ' .hm image')};
"""


def _results(folder):
    """sd/: a real 2-step capture, the image that run generated, and the DAAM table of the same prompt."""
    import attnscope
    from attnscope.circuits.daam import daam_maps
    from attnscope.probes.adapters.diffusers_pipeline import PipelineAdapter, tiny_sd_pipeline

    run = folder / "sd"
    run.mkdir(parents=True)
    adapter = PipelineAdapter(tiny_sd_pipeline())
    inputs = {"prompt": "a red cat", "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)}
    trace = attnscope.capture(adapter, inputs)
    trace.output.images[0].save(run / "image.png")
    trace.save(run / "capture.safetensors")
    daam_maps(tiny_sd_pipeline(), ["a red cat"], ["red", "cat"], num_inference_steps=2).to_table().save(
        run / "daam.parquet")
    return folder


@pytest.fixture(scope="module")
def mm_server(tmp_path_factory):
    """The dashboard (no model) over the sd/ results folder, on a free port."""
    from werkzeug.serving import make_server

    from attnscope.dashboards import create_app

    root = _results(tmp_path_factory.mktemp("mm_results"))
    srv = make_server("127.0.0.1", 0, create_app(root).server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", root
    srv.shutdown()
    thread.join(timeout=10)


def _wait(browser, script, *args, timeout=60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script, *args))


def _pick(browser, dropdown, value):
    """Open a dash Dropdown and click the option whose value is ``value``."""
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});",
                           browser.find_element("css selector", f"#{dropdown}"))
    browser.find_element("css selector", f"#{dropdown}").click()
    option = _wait(browser, "const i = document.querySelector(`[role=option] input[value='${arguments[0]}']`);"
                            "return i && i.closest('[role=option]');", str(value))
    option.click()


def _column(root, head, key, step=0):
    """Independent: the saved trace's attention column of ``key`` for ``head``, on the latent grid."""
    from attnscope.probes.site import Site
    from attnscope.probes.trace import AttentionTrace

    trace = AttentionTrace.load(root / "sd" / "capture.safetensors")
    probs = trace.get(Site(*SITE), step).probs[0, head].double()  # [64 latent queries, 16 text keys]
    key = int(probs.mean(0).argmax()) if key is None else key
    return probs[:, key].reshape(GRID).numpy(), key, trace.tokens.strings[0]


def test_map_mode_draws_the_image_and_the_heads_token_column(browser, mm_server, snap):
    from selenium.webdriver.common.keys import Keys

    url, root = mm_server
    browser.get(url + "/?table=sd/daam.parquet&trace=sd/capture.safetensors")
    note = _wait(browser, "const a = document.querySelector('#head-grid .annotation-text');"
                          "return a && a.textContent;")
    assert "heat maps" in note and "Maps card" in note  # the grid does not try to draw layer = head = -1
    field = browser.find_element("css selector", "#heads")
    field.send_keys("L0H1", Keys.ENTER)
    _wait(browser, "const t = document.querySelector('#pattern .gtitle');"
                   "return t && t.textContent.includes('unet.down.0 L0 H1');")
    radio = _wait(browser, "return document.querySelector(\"#mode input[value='map']\");")
    radio.find_element("xpath", "ancestor::label").click()
    drawn = _wait(browser, DRAWN, "#pattern", "latent →")
    expected, key, strings = _column(root, head=1, key=None)
    assert drawn["types"] == ["image", "heatmap"] and drawn["source"] == "data:image/png;base64,"
    assert drawn["painted"] and f"'{strings[key]}'" in drawn["title"] and "over image.png" in drawn["title"]
    np.testing.assert_allclose(np.array(drawn["z"]), expected, atol=1e-6)
    snap("10_map_mode_default_token")
    _pick(browser, "map-token", 7)  # 't</w>', the last piece of "cat"
    drawn = _wait(browser, DRAWN, "#pattern", f"'{strings[7]}'")
    np.testing.assert_allclose(np.array(drawn["z"]), _column(root, head=1, key=7)[0], atol=1e-6)
    _pick(browser, "map-step", 1)
    drawn = _wait(browser, DRAWN, "#pattern", "step 1")
    np.testing.assert_allclose(np.array(drawn["z"]), _column(root, head=1, key=7, step=1)[0], atol=1e-6)
    assert not np.allclose(_column(root, 1, 7, 0)[0], _column(root, 1, 7, 1)[0])  # the step really changed it
    browser.execute_script("document.querySelector('#pattern').scrollIntoView({block: 'center'});")
    snap("11_map_mode_token_t_step1")


def test_maps_card_shows_the_chosen_words_daam_map(browser, mm_server, snap):
    import pandas as pd

    url, root = mm_server
    browser.get(url + "/?table=sd/daam.parquet&trace=sd/capture.safetensors")
    _wait(browser, DRAWN, "#maps-fig", "'red'")  # the first word by default
    _pick(browser, "maps-word", "cat")
    drawn = _wait(browser, DRAWN, "#maps-fig", "'cat'")
    df = pd.read_parquet(root / "sd" / "daam.parquet")
    expected = df[(df["word"] == "cat") & (df["batch"] == 0)].pivot(index="y", columns="x", values="value")
    assert drawn["types"] == ["image", "heatmap"] and "over image.png" in drawn["title"]
    np.testing.assert_allclose(np.array(drawn["z"]), expected.to_numpy(), rtol=1e-6, atol=1e-7)
    assert drawn["painted"]
    browser.execute_script("document.querySelector('#maps-card').scrollIntoView({block: 'center'});")
    snap("12_maps_card_cat")
