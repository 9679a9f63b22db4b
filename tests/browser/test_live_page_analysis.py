"""The live page's Analysis card and mean ablation in real headless Chromium: type a sentence, capture, score
(head-stats), click a grid cell to select its head, attribute (flow), mean-ablate a head, save; on the trained
induction organism (``zoo:induction-2l``, in the page's model list) patch the heads from a corrupted input (exact);
on an encoder the patch control says it needs a causal LM.

What the page drew is read back from plotly (``gd.calcdata``) and compared with an independent computation in the
test: numpy on an ``attnscope.capture`` of the same input, ``attention_flow`` on it, a mean ablation done with plain
torch hooks, ``activation_patching`` on a pair built in the test. Screenshots: /tmp/attnscope_live_shots/.
"""

import numpy as np
import pytest
import torch
from live_helpers import TO_PIXELS, capture, open_live, pointer, scroll, set_text, shot, wait

pytestmark = pytest.mark.slow
TEXT = "The cat sat on the mat because it was warm, and the dog watched it from the door."
CLEAN = [5, 9, 17, 3, 44, 60, 5, 9, 17, 3]
CORRUPT = [5, 9, 17, 3, 44, 60, 6, 10, 18, 4]
VIEWS = ("live-model-view", "live-pattern", "live-attribution")

Z = """const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
       return gd && gd.calcdata && gd.calcdata[0] && gd.layout.meta && gd.layout.meta.capture === arguments[1]
              && (gd.layout.title.text || '').includes(arguments[2])
              && gd.calcdata[0][0].z.map(r => Array.from(r, v => v === null || isNaN(v) ? null : v));"""


def _pick(browser, dropdown, value):
    """Open a dash Dropdown and click the option whose value is ``value``."""
    element = wait(browser, "return document.querySelector('#' + arguments[0]);", 30, dropdown)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()
    option = wait(browser, "const i = document.querySelector(`[role=option] input[value='${arguments[0]}']`);"
                           "return i && i.closest('[role=option]');", 20, str(value))
    option.click()


def _settle(browser, quiet_ms=600, timeout=20):
    """Wait until no Dash callback has been pending for ``quiet_ms`` (the renderer marks pending ones with
    ``data-dash-is-loading``) so a reply to an earlier event cannot overwrite what the test types next."""
    browser.execute_script("window.__quiet = performance.now();")
    wait(browser, """if (document.querySelector('[data-dash-is-loading="true"]')) window.__quiet = performance.now();
                     return performance.now() - window.__quiet > arguments[0];""", timeout, quiet_ms)


def _click(browser, selector):
    button = browser.find_element("css selector", selector)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()


def _type(browser, selector, text):
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element("css selector", selector)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
    field.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    field.send_keys(text)


def _line(browser, selector, start, timeout=120):
    return wait(browser, f"const e = document.querySelector('{selector}');"
                         f"return e && e.textContent.startsWith({start!r}) && e.textContent;", timeout)


def _mean_ablated_attention(minilm, layer, head):
    """Independent mean ablation: the head's mean output over the CLI's reference inputs (the sentences suite,
    seed 1, 64 items) from plain forward hooks, written into the clean run by a plain pre-hook; the attention of
    that run by ``attnscope.capture``."""
    from attnscope.datasets import sentences

    module = minilm.module
    dense = module.encoder.layer[layer].attention.output.dense
    d = module.config.hidden_size // module.config.num_attention_heads
    outs = []
    hook = dense.register_forward_hook(lambda m, a, o: outs.append(a[0][0, :, head * d:(head + 1) * d].double()))
    with torch.no_grad():
        for item in sentences(64, seed=1).items:
            module(input_ids=torch.tensor([minilm.tokenizer(item.text)["input_ids"]]))
    hook.remove()
    mean = torch.cat(outs).mean(0)

    def replace(m, args):
        z = args[0].clone()
        z[..., head * d:(head + 1) * d] = mean.to(z.dtype)
        return (z,)
    hook = dense.register_forward_pre_hook(replace)
    try:
        return _attn(minilm, TEXT)
    finally:
        hook.remove()


def _attn(model, inputs):
    import attnscope

    return attnscope.capture(model, inputs).stack()[:, 0].double().numpy()


def test_score_select_attribute_mean_ablate_and_save(browser, live_server, live_results, minilm, snap, timings):
    import attnscope
    from attnscope.circuits.flow import attention_flow

    attn = _attn(minilm, TEXT)
    open_live(browser, live_server)
    set_text(browser, TEXT)
    _, key = capture(browser, VIEWS)
    browser.execute_script("window.__s0 = performance.now();")
    _click(browser, "#live-an-score")  # head-stats (the default); the grid shows its first metric, entropy
    z = wait(browser, Z, 120, "live-an-grid", key, "head-stats: entropy")
    timings["live analysis: score head-stats -> grid drawn, MiniLM 22 tokens (ms)"] = float(
        browser.execute_script("return performance.now() - window.__s0"))
    entropy = -(attn * np.log(np.clip(attn, 1e-30, None))).sum(-1).mean(-1)
    np.testing.assert_allclose(np.asarray(z, dtype=float), entropy, atol=1e-4)
    scroll(browser, "#live-an-grid")
    for attempt in range(3):  # L2H5: the pattern view follows the selected head
        x, y = browser.execute_script(TO_PIXELS, "live-an-grid", 5.0, 2.0)
        pointer(browser, x, y + attempt, click=True)
        try:
            wait(browser, "const t = document.querySelector('#live-pattern .gtitle');"
                          "return t && t.textContent.includes('L2 H5');", 20)
            break
        except Exception:  # noqa: BLE001 - plotly clicks what it hovers: retried from a fresh move
            if attempt == 2:
                raise
    assert browser.find_element("css selector", "#live-head-input").get_attribute("value") == "L2H5"
    shot(snap, "live_an_01_score_head_stats_L2H5_selected")

    _click(browser, "#live-an-attribute")  # flow (the default method)
    drawn = wait(browser, Z, 120, "live-an-attr", key, "attention flow")
    flow = np.asarray(attention_flow(attnscope.capture(minilm, TEXT)))[-1, 0].mean(0)
    values = np.asarray([v for row in drawn for v in row], dtype=float)[:len(flow)]
    shown = ~np.isnan(values)  # [CLS] and [SEP] are left grey
    assert shown.sum() == len(flow) - 2
    np.testing.assert_allclose(values[shown], flow[shown], atol=1e-5)
    scroll(browser, "#live-an-attr-box")
    shot(snap, "live_an_02_attribute_flow")

    _type(browser, "#live-abl-heads", "L2H3")
    _pick(browser, "live-abl-mode", "mean")
    _click(browser, "#live-ablate")
    text = _line(browser, "#live-abl-summary", "ablated L2H3 (mean)")
    change = wait(browser, """const gd = document.querySelector('#live-abl-grid .js-plotly-plot');
        return gd && gd.calcdata && gd.calcdata[0] && (gd.layout.title.text || '').includes('mean')
               && gd.calcdata[0][0].z.map(r => Array.from(r));""", 120)
    after = _mean_ablated_attention(minilm, 2, 3)
    expected = 0.5 * np.abs(attn - after).sum(-1).mean(-1)  # mean total variation per head
    np.testing.assert_allclose(np.asarray(change), expected, atol=2e-5)
    assert not np.asarray(change)[:3].any() and "64 inputs of the sentences suite" in text
    scroll(browser, "#live-abl-summary")
    shot(snap, "live_an_03_mean_ablation_L2H3")

    _click(browser, "#live-an-save")
    saved = _line(browser, "#live-an-saved", "saved")
    paths = [p.strip() for p in saved.removeprefix("saved: ").split(" (")[0].split(",")]
    assert len(paths) == 2 and all(p.startswith("live/") for p in paths)
    tables = {attnscope.ResultTable.load(live_results / p).provenance["live_analysis"]: live_results / p
              for p in paths}
    score = attnscope.ResultTable.load(tables["score"]).df
    grid = score[score.metric == "entropy"].pivot(index="layer", columns="head", values="value").to_numpy()
    np.testing.assert_allclose(grid, entropy, atol=1e-4)
    attributed = attnscope.ResultTable.load(tables["attribute"]).df
    np.testing.assert_allclose(attributed.sort_values("token_index")["value"].to_numpy(), flow, atol=1e-6)


def test_patch_exact_on_the_induction_organism(browser, live_server, snap, timings):
    import attnscope
    from attnscope.circuits.patch_pairs import PatchPairs
    from attnscope.circuits.patching import activation_patching
    from attnscope.viz.heads import head_values

    model = attnscope.load("zoo:induction-2l")
    with torch.no_grad():
        answer = int(model.module(input_ids=torch.tensor([CLEAN])).logits[0, -1].argmax())
        foil = int(model.module(input_ids=torch.tensor([CORRUPT])).logits[0, -1].argmax())
    pairs = PatchPairs.from_ids([CLEAN], [CORRUPT], answers=[[answer]], wrong=[[foil]])
    expected = head_values(activation_patching(model, pairs, "logit_diff"), "logit_diff").to_numpy()
    open_live(browser, live_server)
    _pick(browser, "live-model", "zoo:induction-2l")
    _settle(browser)  # picking a model may refill the text box with an example: type after that
    set_text(browser, " ".join(map(str, CLEAN)), mode="ids")
    _, key = capture(browser, VIEWS)
    field = browser.find_element("css selector", "#live-an-corrupt")
    browser.execute_script("""
        Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(arguments[0], arguments[1]);
        arguments[0].dispatchEvent(new Event('input', {bubbles: true}));""", field, " ".join(map(str, CORRUPT)))
    browser.execute_script("window.__p0 = performance.now();")
    _click(browser, "#live-an-patch")  # exact (the default), answer and foil left to their defaults
    z = wait(browser, Z, 120, "live-an-patch-grid", key, "exact")
    timings["live analysis: patch exact -> grid drawn, induction-2l 10 tokens (ms)"] = float(
        browser.execute_script("return performance.now() - window.__p0"))
    np.testing.assert_allclose(np.asarray(z, dtype=float), expected, atol=1e-4)
    assert np.asarray(z)[1, 2] < -5  # the induction head
    summary = browser.find_element("css selector", "#live-an-summary").text
    assert f"answer #{answer} vs foil #{foil}" in summary
    scroll(browser, "#live-an-summary")
    shot(snap, "live_an_04_patch_exact_induction")
    browser.execute_script("""
        Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(arguments[0], arguments[1]);
        arguments[0].dispatchEvent(new Event('input', {bubbles: true}));""", field, "5 9 17")
    _click(browser, "#live-an-patch")
    error = _line(browser, "#live-an-error", "error:")
    assert "as many tokens as the captured one" in error and "\n" not in error


def test_encoder_patch_says_it_needs_a_causal_lm(browser, live_server, snap):
    open_live(browser, live_server)
    set_text(browser, TEXT)
    capture(browser, VIEWS)
    note = _line(browser, "#live-an-patch-note", "patching needs a causal LM", 30)
    assert "minilm is an encoder" in note
    _click(browser, "#live-an-patch")
    error = _line(browser, "#live-an-error", "error:")
    assert error.startswith("error: patching needs a causal LM") and "Traceback" not in error
    scroll(browser, "#live-an-patch-note")
    shot(snap, "live_an_05_encoder_patch_note")
