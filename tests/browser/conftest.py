"""Fixtures of the browser tests: a results directory, the dashboard served in a thread, headless Chromium.

Screenshots go to the test's tmp dir, and also to ``results/screenshots/`` when ATTNSCOPE_SCREENSHOTS is set.
Timings measured in the browser are collected by the ``timings`` fixture and written next to the screenshots.
"""

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

SHOT_DIR = Path(__file__).resolve().parents[2] / "results" / "screenshots"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
LONG = 4096


def _long_run(folder: Path) -> None:
    """A 12 x 12 head table and causal patterns of LONG tokens (layers 0, 1; head 5 only) with a sink."""
    import attnscope
    from attnscope.probes.tokens import TokenInfo
    from attnscope.probes.trace import AttentionTrace, SiteRecord

    rng = np.random.default_rng(0)
    records = [{"analysis": "synthetic", "layer": l, "head": h, "metric": "score",
                "value": float(np.sin(l / 2) + 0.5 * np.cos(h / 2) + 0.1 * rng.random())}
               for l in range(12) for h in range(12)]
    attnscope.ResultTable.from_records(records).save(folder / "heads12.parquet")
    records = []
    for layer in (0, 1):  # float16 as a half-precision capture saves it: 32 MiB per layer
        logits = torch.randn(1, 1, LONG, LONG, generator=torch.Generator().manual_seed(layer)) * 2
        logits[..., layer * 7] += 4.0
        logits.masked_fill_(~torch.ones(LONG, LONG, dtype=torch.bool).tril(), float("-inf"))
        records.append(SiteRecord(site=attnscope.Site("text", layer), probs=torch.softmax(logits, -1).half(),
                                  n_query=LONG, n_key=LONG, head_index=torch.tensor([5])))
    tokens = TokenInfo(strings=[[f"w{i}" for i in range(LONG)]])
    AttentionTrace(records, tokens, {"model": "synthetic"}).save(folder / "trace_long.safetensors")


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory):
    """demo/ (the real demo on MiniLM), demo_b/ (its table with layer 2 halved), long/ (12x12 table, 4096-token
    trace), plus things that must stay hidden:
    a symlink to /etc, a .json symlink to /etc/passwd, and a non-result file."""
    import attnscope
    from attnscope.tasks.demo import run_demo

    root = tmp_path_factory.mktemp("results")
    run_demo(root / "demo", quiet=True)
    other = attnscope.ResultTable.load(root / "demo" / "special_token_mass.parquet")
    other.df.loc[other.df["layer"] == 2, "value"] *= 0.5  # a second run to compare with: layer 2 halved
    other.save(root / "demo_b" / "special_token_mass.parquet")
    (root / "long").mkdir()
    _long_run(root / "long")
    (root / "notes.txt").write_text("not a result file")
    (root / "etc_link").symlink_to("/etc")
    (root / "passwd.json").symlink_to("/etc/passwd")
    return root


@pytest.fixture(scope="session")
def server(results_dir, minilm):
    """The dashboard on 127.0.0.1 (a free port) with the real MiniLM for the ablation panel."""
    from werkzeug.serving import make_server

    from attnscope.dashboards import create_app

    app = create_app(results_dir, minilm)
    srv = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def browser():
    from selenium import webdriver

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium / chromedriver not installed: run `make test` (its browsers step installs them)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="attnscope-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1300", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def snap(browser, tmp_path):
    """``snap(name)`` saves a screenshot under tmp_path (and results/screenshots/ with ATTNSCOPE_SCREENSHOTS)."""
    def take(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        browser.save_screenshot(str(path))
        if os.environ.get("ATTNSCOPE_SCREENSHOTS"):
            SHOT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, SHOT_DIR / path.name)
        return path
    return take


@pytest.fixture(scope="session")
def timings():
    """Measured browser timings (ms) by name; printed (``-s``) and saved next to the screenshots at the end."""
    measured: dict[str, float] = {}
    yield measured
    if not measured:
        return
    text = json.dumps({k: round(v, 1) for k, v in measured.items()}, indent=1)
    print(f"\nbrowser timings (ms): {text}")
    if os.environ.get("ATTNSCOPE_SCREENSHOTS"):
        SHOT_DIR.mkdir(parents=True, exist_ok=True)
        (SHOT_DIR / "timings.json").write_text(text)


@pytest.fixture(scope="module")
def live_results(tmp_path_factory):
    """The results folder of one test module's live-page app (Save writes here)."""
    return tmp_path_factory.mktemp("live_results")


@pytest.fixture(scope="module")
def live_server(live_results, minilm):
    """The app on MiniLM served in a thread for one test module (its live page is ``?tab=live``)."""
    from live_helpers import serve

    from attnscope.dashboards import create_app

    srv, thread, url = serve(create_app(live_results, minilm))
    yield url
    srv.shutdown()
    thread.join(timeout=10)
