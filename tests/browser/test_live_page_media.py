"""The live page with image and diffusion input, in real headless Chromium, on the zoo's trained shapes organisms.

VLM: pick ``zoo:shapes-vlm``, pick an example image, type a question, capture: every view draws, and the map over
the image grid (rollout, then the selected head's last-token row) read back from plotly equals an independent
``attnscope.capture`` of the same image + question (numpy rollout; the row's image columns on the 4x4 grid).
Diffusion: pick ``zoo:shapes-diffusion``, type a prompt, 3 steps, seed 5, capture, change the step and the word:
the DAAM map plotly drew equals ``daam_maps`` of the same prompt, seed and step. Screenshots:
/tmp/attnscope_live_shots/ (and results/screenshots/ with ATTNSCOPE_SCREENSHOTS=1).
"""

import numpy as np
import pytest
from live_helpers import VIEWS, capture, open_live, scroll, serve, set_text, shot, wait

pytestmark = pytest.mark.slow
MEDIA_VIEWS = VIEWS + ("live-media-image", "live-media-map", "live-media-heads")
QUESTION = "what shape is left ?"
PROMPT = "green triangle left red square right"
STEPS, SEED = 3, 5

HEATMAP = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!gd || !gd.calcdata || !gd._fullLayout) return null;
const title = gd._fullLayout.title.text || '';
if (!title.includes(arguments[1])) return null;
const maps = gd.data.map((t, i) => t.type === 'heatmap' ? gd.calcdata[i][0].z.map(r => Array.from(r)) : null)
                    .filter(z => z !== null);
return {title: title, z: maps, types: gd.data.map(t => t.type)};
"""


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    from attnscope.dashboards import create_app

    srv, thread, url = serve(create_app(tmp_path_factory.mktemp("media_results")))  # no --model: zoo offered
    yield url
    srv.shutdown()
    thread.join(timeout=10)


def _pick(browser, dropdown, value):
    """Open a dash Dropdown and click the option whose value is ``value``."""
    element = wait(browser, "return document.querySelector('#' + arguments[0]);", 60.0, dropdown)  # async chunk
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()
    option = wait(browser, "const i = document.querySelector(`[role=option] input[value='${arguments[0]}']`);"
                           "return i && i.closest('[role=option]');", 30.0, str(value))
    option.click()


def _shown(browser, element_id):
    return wait(browser, "const e = document.querySelector('#' + arguments[0]);"
                         "return e && e.offsetParent !== null;", 60.0, element_id)


def _type(browser, element_id, text):
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element("css selector", f"#{element_id}")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(text), Keys.TAB)


def _vlm_reference():
    import attnscope
    from attnscope.dashboards.live_media import EXAMPLE_SEED
    from attnscope.datasets.shapes import make_scene

    trace = attnscope.capture(attnscope.load("zoo:shapes-vlm"), (QUESTION, make_scene(EXAMPLE_SEED, 2).image))
    attn = trace.stack("text")[:, 0].double().numpy()  # [layer, head, query, key]
    image = trace.tokens.positions("image")
    joint = np.eye(attn.shape[-1])
    for layer in attn:  # numpy rollout: A_hat = rownorm(mean_h A + I), chained
        a_hat = layer.mean(0) + np.eye(attn.shape[-1])
        joint = (a_hat / a_hat.sum(-1, keepdims=True)) @ joint
    return attn, image, joint[-1, image].reshape(4, 4)


def test_vlm_image_and_question(browser, media_server, snap, timings):
    from selenium.webdriver.common.keys import Keys

    attn, image, rollout = _vlm_reference()
    open_live(browser, media_server)
    _pick(browser, "live-model", "zoo:shapes-vlm")
    _shown(browser, "live-vlm-inputs")
    assert not browser.find_element("css selector", "#live-diff-inputs").is_displayed()
    _pick(browser, "live-image", "example:2")
    set_text(browser, QUESTION)
    ms, key = capture(browser, MEDIA_VIEWS)
    timings["live media: capture -> every view, shapes-vlm (ms, first, model load included)"] = ms
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "rollout")
    assert drawn["types"] == ["image", "heatmap"]
    np.testing.assert_allclose(np.array(drawn["z"][0]), rollout, atol=1e-5)
    status = browser.find_element("css selector", "#live-status").text
    assert f"capture {key} · zoo:shapes-vlm · 21 tokens" in status  # 16 image tokens + 5 words
    pattern = browser.execute_script("return document.querySelector('#live-pattern .gtitle').textContent")
    assert "image span" in pattern
    shot(snap, "live_media_01_vlm_rollout")
    browser.find_element("css selector", "#live-media-map-kind input[value='head']").click()
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "L0 H0")
    np.testing.assert_allclose(np.array(drawn["z"][0]), attn[0, 0, -1, image].reshape(4, 4), atol=1e-6)
    field = browser.find_element("css selector", "#live-head-input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("L1H2", Keys.ENTER)
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "L1 H2")
    np.testing.assert_allclose(np.array(drawn["z"][0]), attn[1, 2, -1, image].reshape(4, 4), atol=1e-6)
    heads = wait(browser, HEATMAP, 30.0, "live-media-heads", "every head of layer 1")
    np.testing.assert_allclose(np.array(heads["z"]), attn[1, :, -1][:, image].reshape(4, 4, 4), atol=1e-6)
    assert not np.allclose(attn[1, 2, -1, image], attn[0, 0, -1, image])  # the head really changed the map
    scroll(browser, "#live-media-card")
    shot(snap, "live_media_02_vlm_head_L1H2")
    scroll(browser, "#live-head-view")
    shot(snap, "live_media_03_vlm_head_view")


def _daam(word, step):
    import attnscope
    from attnscope.circuits.daam import daam_maps
    from attnscope.dashboards.live_media import GUIDANCE

    steps = None if step == "all" else [step]
    return daam_maps(attnscope.load("zoo:shapes-diffusion"), [PROMPT], [word], seed=SEED, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, steps=steps, size="image").maps[0, 0].numpy()


def test_diffusion_prompt_steps_and_word(browser, media_server, snap, timings):
    open_live(browser, media_server)
    _pick(browser, "live-model", "zoo:shapes-diffusion")
    _shown(browser, "live-diff-inputs")
    assert not browser.find_element("css selector", "#live-vlm-inputs").is_displayed()
    set_text(browser, PROMPT)
    _type(browser, "live-steps", STEPS)
    _type(browser, "live-seed", SEED)
    ms, _ = capture(browser, MEDIA_VIEWS)
    timings["live media: capture -> every view, shapes-diffusion 3 steps (ms, first, model load included)"] = ms
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "'green' · all 3 steps")
    np.testing.assert_allclose(np.array(drawn["z"][0]), _daam("green", "all"), rtol=1e-5, atol=1e-7)
    notes = browser.execute_script("return document.querySelector('#live-head-view .annotation-text').textContent")
    assert "no lines between text tokens" in notes
    shot(snap, "live_media_04_diffusion_all_steps")
    _pick(browser, "live-media-step", 1)
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "'green' · step 1")
    np.testing.assert_allclose(np.array(drawn["z"][0]), _daam("green", 1), rtol=1e-5, atol=1e-7)
    _pick(browser, "live-media-word", "square")
    drawn = wait(browser, HEATMAP, 30.0, "live-media-map", "'square' · step 1")
    expected = _daam("square", 1)
    np.testing.assert_allclose(np.array(drawn["z"][0]), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected, _daam("green", 1))  # the word really changed the map
    heads = wait(browser, HEATMAP, 30.0, "live-media-heads", "'square' · step 1")
    assert len(heads["z"]) == 4
    scroll(browser, "#live-media-card")
    shot(snap, "live_media_05_diffusion_square_step1")
    image = browser.execute_script("return document.querySelector('#live-media-image .gtitle').textContent")
    assert "generated image" in image and f"{STEPS} steps, seed {SEED}" in image
