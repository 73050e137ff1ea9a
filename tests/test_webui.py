"""The web page at `/` of `swapmoe serve`: its files and keys over HTTP, its state and knob routes,
and the page itself in a real browser (headless Chromium from Debian's `chromium` and
`chromium-driver`, driven by selenium; `.ci/browser-deps` installs them).

The browser test FAILS under CI (env CI set) when the browser is missing and skips otherwise, saying
why. With SWAPMOE_WEBUI_SCREENSHOT=path it saves a screenshot of the page there (docs/webui.png).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import Serving, http

KEY = "webui-k3y"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def keyed(tiny_gguf):
    s = Serving(tiny_gguf, "--api-key", KEY, "--experts-per-layer", "3", "--memory-budget", "95%")
    yield s
    s.stop()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_page_files_need_no_key_the_api_does(keyed):
    u = keyed.url
    for path, ctype in (("/", "text/html"), ("/index.html", "text/html"), ("/webui.js", "text/javascript"),
                        ("/webui.css", "text/css"), ("/sw.js", "application/javascript"),
                        ("/manifest.webmanifest", "application/manifest+json"), ("/_app/version.json", "application/json")):
        r = http("GET", u + path)
        assert r.status == 200, (path, r.status, r.text)
        assert r.headers["content-type"].startswith(ctype), (path, r.headers["content-type"])
    page = http("GET", u + "/").text
    assert page.lower().startswith("<!doctype html>")  # what llama-server's test_no_ui looks for
    assert 'src="webui.js"' in page and 'href="webui.css"' in page
    for path in ("/", "/webui.js", "/webui.css"):  # nothing fetched from elsewhere
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", http("GET", u + path).text, re.I), path
    for path in ("/swapmoe/state", "/props", "/v1/models"):
        assert http("GET", u + path).status == 401, path
        assert http("GET", u + path, headers=_auth()).status == 200, path


def test_state_describes_residency(keyed):
    st = http("GET", keyed.url + "/swapmoe/state", headers=_auth()).json()
    assert st["n_expert"] == 8 and st["experts_per_layer"] == 3 and st["policy"] == "swapmoe"
    assert st["layers"] == [0, 1, 2, 3]
    assert all(len(r) == 3 and len(set(r)) == 3 for r in st["resident"])
    for res, hot, loading in zip(st["resident"], st["hot"], st["loading"]):
        assert not set(hot) & set(res) and set(loading) <= set(hot)
    assert st["budget_bytes"] > 0 and 0 < st["rss_bytes"]
    assert st["max_dropped_mass"] == 1.0 and st["tau_live"] is False
    # a reply moves the counters and fills the scheduler's scores
    r = http("POST", keyed.url + "/v1/chat/completions", headers=_auth(), timeout=60,
             json={"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 24, "temperature": 0})
    assert r.status == 200, r.text
    st2 = http("GET", keyed.url + "/swapmoe/state", headers=_auth()).json()
    assert st2["tokens"] > st["tokens"] and st2["requests"] == st["requests"] + 1 and st2["decode_tokens"] > 0
    assert len(st2["scores"]) == 4 and all(len(s) == 8 and max(s) == 1.0 for s in st2["scores"])


def test_budget_knob_refusals_keep_the_budget(keyed):
    u = keyed.url

    def state() -> dict:
        return http("GET", u + "/swapmoe/state", headers=_auth()).json()

    before = state()
    for body, words in (({"experts_per_layer": 99}, "between top-k"), ({"memory_budget": "1MiB"}, "below the minimum"),
                        ({"max_dropped_mass": 0.3}, "started with one"), ({"max_dropped_mass": 2}, "between 0 and 1")):
        r = http("POST", u + "/swapmoe/budget", json=body, headers=_auth(), timeout=60)
        assert r.status == 400, (body, r.text)
        msg = r.json()["error"]["message"]
        assert words in msg and "\n" not in msg, msg
        now = state()
        assert (now["experts_per_layer"], now["budget_bytes"]) == (before["experts_per_layer"], before["budget_bytes"])
    r = http("POST", u + "/swapmoe/budget", json={"experts_per_layer": 2}, headers=_auth(), timeout=60)
    assert r.status == 200, r.text
    b = r.json()
    assert (b["previous_experts_per_layer"], b["experts_per_layer"], b["rebuilt"]) == (3, 2, True)
    assert b["cost"].startswith("S 3 -> 2: model rebuilt in ") and b["seconds"] > 0
    after = state()
    assert after["experts_per_layer"] == 2 and all(len(r) == 2 for r in after["resident"])
    r = http("POST", u + "/swapmoe/budget", json={"experts_per_layer": 2}, headers=_auth(), timeout=60)
    assert r.json()["cost"].startswith("S stays 2: nothing rebuilt")
    http("POST", u + "/swapmoe/budget", json={"experts_per_layer": 3}, headers=_auth(), timeout=60)


def test_quality_floor_changes_live(tiny_gguf):
    s = Serving(tiny_gguf, "--experts-per-layer", "3", "--max-dropped-mass", "0.5")
    try:
        st = http("GET", s.url + "/swapmoe/state").json()
        assert st["tau_live"] is True and st["max_dropped_mass"] == 0.5
        r = http("POST", s.url + "/swapmoe/budget", json={"max_dropped_mass": 0.2}, timeout=60)
        assert r.status == 200 and r.json()["rebuilt"] is False and "τ 0.5 -> 0.2" in r.json()["cost"], r.text
        assert http("GET", s.url + "/swapmoe/state").json()["max_dropped_mass"] == 0.2
        # a budget change builds a new policy: the τ set live holds over it
        r = http("POST", s.url + "/swapmoe/budget", json={"experts_per_layer": 4}, timeout=60)
        assert r.status == 200 and r.json()["max_dropped_mass"] == 0.2, r.text
        r = http("POST", s.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 8}, timeout=60)
        assert r.status == 200, r.text
        st = http("GET", s.url + "/swapmoe/state").json()
        assert st["max_dropped_mass"] == 0.2 and st["experts_per_layer"] == 4 and st["floor_acted"] is not None
    finally:
        s.stop()


def test_state_does_not_wake_a_sleeping_model(tiny_gguf):
    """The page polls /swapmoe/state: that must not keep the model loaded (--sleep-idle-seconds)."""
    s = Serving(tiny_gguf, "--experts-per-layer", "3", "--sleep-idle-seconds", "1")
    try:
        awake = http("GET", s.url + "/swapmoe/state").json()
        assert awake["sleeping"] is False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not http("GET", s.url + "/swapmoe/state").json()["sleeping"]:
            time.sleep(0.1)  # polled all along, as the page does
        st = http("GET", s.url + "/swapmoe/state").json()
        assert st["sleeping"] is True and st["resident"] == awake["resident"] and st["scores"] is None
        assert http("GET", s.url + "/props").json()["is_sleeping"]
    finally:
        s.stop()


def test_no_ui_turns_the_page_off(tiny_gguf):
    s = Serving(tiny_gguf, "--experts-per-layer", "3", "--no-ui")
    try:
        for path in ("/", "/index.html", "/webui.js"):
            assert http("GET", s.url + path).status == 404, path
        assert http("GET", s.url + "/sw.js").status == 200  # removes llama-server's old service worker
    finally:
        s.stop()


# --------------------------------------------------------------------------------- browser ---
def _browser():  # type: ignore[no-untyped-def]
    """A headless Chromium through selenium; fails under CI, skips elsewhere, when it cannot be had."""
    why = None
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        why = f"{' and '.join(missing)} missing (apt-get install -y chromium chromium-driver, or bash .ci/browser-deps)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            why = "selenium is not installed (pip install -e '.[test]')"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test cannot run under CI: {why}")
        pytest.skip(f"no browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,960",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI: /nonexistent/chromium missing"):
        _browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no browser: /nonexistent/chromium missing"):
        _browser()


def _wait(driver, cond, timeout: float = 60, what: str = ""):  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))
    except Exception:
        status = driver.find_element("id", "status").text
        raise AssertionError(f"timed out waiting for {what} (status line: {status!r})") from None


def _js(driver, script: str, *args):  # type: ignore[no-untyped-def]
    return driver.execute_script(script, *args)


def _ask(driver, text: str) -> str:
    """Send one message; returns the reply once done, having seen it grow while it streamed."""
    _js(driver, """
        window.__lens = [];
        const box = document.getElementById('messages');
        window.__obs && window.__obs.disconnect();
        window.__obs = new MutationObserver(() => {
          const b = [...box.querySelectorAll('.msg.assistant .body')].pop();
          if (b) window.__lens.push(b.textContent.length);
        });
        window.__obs.observe(box, {subtree: true, childList: true, characterData: true});""")
    box = driver.find_element("id", "input")
    box.clear()
    _js(driver, "document.getElementById('input').value = arguments[0];", text)
    driver.find_element("id", "send").click()
    n = len(driver.find_elements("css selector", ".msg.assistant"))
    _wait(driver, lambda d: len(d.find_elements("css selector", ".msg.assistant .meta")) >= n, 120, "the reply")
    # shown while it came: a part of it on the page before the whole (chunks may share a read)
    lens = [x for x in _js(driver, "return window.__lens;") if x > 0]
    assert len(set(lens)) >= 2 and lens == sorted(lens), f"the reply did not stream: lengths seen {lens}"
    return driver.find_elements("css selector", ".msg.assistant .body")[-1].text


def _resident(driver) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return json.loads(_js(driver, "return document.getElementById('heatmap').dataset.resident || '[]';"))


def _settled(driver) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The heatmap's resident sets once a poll after the reply has landed."""
    t = time.time()
    _wait(driver, lambda d: _js(d, "return ui.state && ui.state.time;") > t + 0.01, 10, "a state poll")
    return _resident(driver)


def test_browser_chat_heatmap_and_budget():
    from swapmoe_gguf.converters.default_model import default_model

    driver = _browser()
    # built here (once, cached): the server then starts within Serving's minute
    model = str(default_model())
    s = Serving(model, "--api-key", KEY, "--memory-budget", "95%", "--experts-per-layer", "8", ctx=2048)
    try:
        driver.get(s.url + "/")
        # the page asks for the key once
        _wait(driver, lambda d: d.find_element("id", "key-form").is_displayed(), 20, "the API key form")
        driver.find_element("id", "key").send_keys(KEY)
        driver.find_element("css selector", "#key-form button").click()
        _wait(driver, lambda d: d.find_element("id", "s-value").text == "8", 20, "S = 8 on the page")
        assert not driver.find_element("id", "key-form").is_displayed()
        _js(driver, "document.getElementById('max_tokens').value = 96;"
                    "document.getElementById('temperature').value = 0;")
        r0 = _resident(driver)
        assert len(r0) == 6 and all(len(x) == 8 for x in r0)  # 6 MoE layers, 8 of 32 experts each
        reply = _ask(driver, "ROMEO.\nBut soft, what light through yonder window breaks? It is the east, "
                             "and Juliet is the sun.\nJULIET.\nO Romeo, Romeo, wherefore art thou Romeo?\n")
        assert reply.strip()
        r1 = _settled(driver)
        swaps1 = int(_js(driver, "return ui.state.swaps;"))
        reply = _ask(driver, "def read_config(path):\n    \"\"\"Read a JSON configuration file.\"\"\"\n"
                             "    import json\n    with open(path) as f:\n        return json.load(f)\n\n"
                             "class Parser:\n    def __init__(self, text):\n")
        assert reply.strip()
        r2 = _settled(driver)
        assert r2 != r1, "the heatmap did not change after the topic switch"
        assert int(_js(driver, "return ui.state.swaps;")) > swaps1
        # the budget knob: S 8 -> 12, and a budget the model cannot take is refused, S stays
        slots = driver.find_element("id", "slots")
        slots.clear()
        slots.send_keys("12")
        driver.find_element("id", "apply").click()
        _wait(driver, lambda d: d.find_element("id", "s-value").text == "12", 60, "S = 12 after the knob")
        assert "S 8 -> 12: model rebuilt" in driver.find_element("id", "knob-result").text
        _wait(driver, lambda d: all(len(x) == 12 for x in _resident(d)), 10, "12 resident experts per layer")
        driver.find_element("id", "new-chat").click()
        assert not driver.find_elements("css selector", ".msg")
        reply = _ask(driver, "HAMLET.\nTo be, or not to be, that is the question:\n")
        shot = os.environ.get("SWAPMOE_WEBUI_SCREENSHOT")
        if shot:
            _settled(driver)
            time.sleep(0.5)
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(shot)
        driver.find_element("id", "budget").send_keys("1MiB")
        driver.find_element("id", "apply").click()
        _wait(driver, lambda d: d.find_element("id", "knob-result").text.startswith("refused: "), 30, "the refusal")
        assert "below the minimum" in driver.find_element("id", "knob-result").text
        assert driver.find_element("id", "s-value").text == "12"
        # the server goes away: one line says so, the message typed stays
        s.stop()
        box = driver.find_element("id", "input")
        box.send_keys("Is anyone there?")
        driver.find_element("id", "send").click()
        _wait(driver, lambda d: "not answering" in d.find_element("id", "status").text, 20, "the error line")
        assert driver.find_element("id", "input").get_attribute("value") == "Is anyone there?"
        assert "\n" not in driver.find_element("id", "status").text
    finally:
        driver.quit()
        if s.proc.poll() is None:
            s.stop()
