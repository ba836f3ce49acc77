"""The web playground in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``, driven by
Selenium) loads the page from a server on 127.0.0.1, runs a generation, an infill and a side-by-side comparison,
sees intermediate states before the final text, gets the library's texts, and takes a screenshot
(``docs/playground.png`` with ``make screenshot``)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is not installed: pip install selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no Chromium here: apt-get install -y chromium "
                                                                  "chromium-driver (.ci/run does)")
# the README's screenshot is rewritten only on request (`make screenshot`), so a test run leaves the tree clean
SHOT = os.environ.get("DIFFLM_PLAYGROUND_SHOT")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve import tiny

    from difflm.serve.app import Limits, create_app

    d = tmp_path_factory.mktemp("play")
    models = {"mdlm": tiny(d / "mdlm", {"type": "masked"}, {"mode": "lines"}, 0),
              "ar": tiny(d / "ar", {"type": "autoregressive"}, {"mode": "lines"}, 1)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(models, Limits(), bf16=False), host="127.0.0.1", port=port,
                                       log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", models
    srv.should_exit = True
    t.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


def wait(drv, script: str, timeout: float = 60):
    end = time.time() + timeout
    while time.time() < end:
        v = drv.execute_script("return " + script)
        if v:
            return v
        time.sleep(0.05)
    page = drv.execute_script("return document.body.innerText")
    raise AssertionError(f"timed out waiting for {script}; the page shows: {page[-800:]}")


def masked(st: dict) -> bool:
    """Whether the page showed a state with masked positions left (each step's rows, as text)."""
    return any("[MASK]" in row for step in st["intermediate"][0] for row in step)


def press(drv, **fields) -> dict:
    from selenium.webdriver.support.ui import Select

    for name, value in fields.items():
        el = drv.find_element("id", name)
        if el.tag_name == "select":
            Select(el).select_by_value(value)
        elif el.get_attribute("type") == "checkbox":
            if el.is_selected() != value:
                el.click()
        else:
            el.clear()
            el.send_keys(str(value))
    drv.find_element("id", "go").click()
    wait(drv, "window.difflm.done[0] && window.difflm.done[1]")
    return drv.execute_script("return window.difflm")


def test_the_playground_generates_infills_and_compares_live(server, browser, tmp_path):
    url, models = server
    browser.get(url)
    wait(browser, "document.querySelectorAll('#model option').length == 2")
    st = press(browser, model="mdlm", task="generate", steps=8, seed=3, text="ab")
    assert st["steps"][0] >= 2 and masked(st), st  # watched it resolve
    assert st["texts"][0] == models["mdlm"].generate(1, steps=8, seed=3, prompt="ab", bf16=False).texts
    st = press(browser, task="infill", text="ab [MASK] cd ___")
    assert st["steps"][0] >= 1 and masked(st)
    assert st["texts"][0] == models["mdlm"].infill("ab [MASK] cd ___", steps=8, seed=3, bf16=False)
    st = press(browser, candidates=3)  # the same template, three fills, the likeliest kept
    assert len(st["intermediate"][0][0]) == 3, st  # every candidate is watched resolving
    assert st["texts"][0] == models["mdlm"].infill("ab [MASK] cd ___", steps=8, seed=3, candidates=3, bf16=False)
    press(browser, candidates=1)
    st = press(browser, task="generate", text="", compare=True, model2="ar")
    assert st["texts"][0] == models["mdlm"].generate(1, steps=8, seed=3, bf16=False).texts
    assert st["texts"][1] == models["ar"].generate(1, steps=8, seed=3, bf16=False).texts
    assert "tokens/s" in browser.find_element("id", "stats0").text
    shot = Path(SHOT) if SHOT else tmp_path / "playground.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
