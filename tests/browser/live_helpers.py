"""Helpers of the live-page browser tests: serving an app, typing, capturing with an in-browser timer, reading back
what plotly drew, moving the pointer. Imported by ``test_live_page`` and ``test_live_long``."""

import shutil
import threading
from pathlib import Path


SHOTS = Path("/tmp/attnscope_live_shots")
VIEWS = ("live-model-view", "live-pattern", "live-head-view", "live-qk", "live-attribution", "live-long")

WATCH = """
window.__t0 = null; window.__t1 = null; window.__key = null;
const before = arguments[0], views = arguments[1];
document.querySelector('#live-capture').addEventListener('mousedown',
    () => { if (window.__t0 === null) window.__t0 = performance.now(); }, {capture: true, once: true});
const poll = () => {
  const m = (document.querySelector('#live-status').textContent || '').match(/capture (c\\d+)/);
  const key = m && m[1] !== before ? m[1] : null;
  const done = key && views.every(id => {
    const gd = document.querySelector('#' + id + ' .js-plotly-plot');
    return gd && gd._fullLayout && gd.layout.meta && gd.layout.meta.capture === key;
  });
  if (done) { requestAnimationFrame(() => { window.__key = key; window.__t1 = performance.now(); }); }
  else { requestAnimationFrame(poll); }
};
requestAnimationFrame(poll);
"""

SHOWN = """return [document.querySelector('#live-status').textContent,
                   document.querySelector('#live-error').textContent,
                   document.querySelector('#live-long-msg').textContent].concat(arguments[0].map(id => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  return id + ': ' + (gd && gd.layout ? JSON.stringify(gd.layout.meta) : 'not drawn'); }));"""

TO_PIXELS = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
const fl = gd._fullLayout, box = gd.getBoundingClientRect();
const xa = fl[arguments[3] || 'xaxis'], ya = fl[arguments[4] || 'yaxis'];
return [box.left + xa._offset + xa.l2p(arguments[1]), box.top + ya._offset + ya.l2p(arguments[2])];
"""


def serve(app):
    """(server, thread, url) of ``app`` on 127.0.0.1 (a free port), served in a thread."""
    from werkzeug.serving import make_server

    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread, f"http://127.0.0.1:{srv.server_port}"


def wait(browser, script, timeout=60.0, *args):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script, *args))


def shot(snap, name):
    """A screenshot via the ``snap`` fixture, also copied to /tmp/attnscope_live_shots/ for a person to look at."""
    path = snap(name)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    return path


def set_text(browser, text, mode="text"):
    """Put ``text`` in the textarea as a paste would (React's value setter + an input event), pick the mode."""
    browser.execute_script("""
        const area = document.querySelector('#live-text');
        Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(area, arguments[0]);
        area.dispatchEvent(new Event('input', {bubbles: true}));""", text)
    browser.find_element("css selector", f"#live-mode input[value='{mode}']").click()


def capture(browser, views=VIEWS, timeout=120.0):
    """Click Capture; (ms from mousedown to every view drawn with the new capture, the capture key)."""
    status = browser.find_element("css selector", "#live-status").text
    before = status.split()[1] if status.startswith("capture ") else ""
    browser.execute_script(WATCH, before, list(views))
    button = browser.find_element("css selector", "#live-capture")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    try:
        wait(browser, "return window.__t1", timeout)
    except Exception as exc:  # noqa: BLE001 - say which view did not show the capture
        raise AssertionError(f"not every view drew the capture: {browser.execute_script(SHOWN, list(views))}") \
            from exc
    return float(browser.execute_script("return window.__t1 - window.__t0")), browser.execute_script(
        "return window.__key")


def open_live(browser, url):
    browser.get(url + "/?tab=live")
    wait(browser, "return document.querySelector('#live-capture')")


def figure(browser, view):
    return browser.execute_script("""
        const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
        return {title: gd._fullLayout.title.text || '', names: gd.data.map(t => t.name || ''),
                shapes: (gd.layout.shapes || []).length};""", view)


def pointer(browser, x, y, click=False):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    builder = ActionBuilder(browser)
    builder.pointer_action.move_to_location(5, 5).pause(0.1).move_to_location(int(x), int(y)).pause(0.4)
    if click:
        builder.pointer_action.click()
    builder.perform()


def scroll(browser, selector):
    browser.execute_script("document.querySelector(arguments[0]).scrollIntoView({block: 'start'});", selector)


