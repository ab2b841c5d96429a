"""The playground in a real headless Chromium, against the app's HTTP functions served on loopback
by the test host adapter (function keys checked, empty-body 401) with a tiny model in Azurite.

The browser and its driver come from PATH (Debian's ``chromium`` and ``chromium-driver``, installed
by ``.ci/run``) or ``CHROMEWEBDRIVER`` (GitHub's runners); nothing is downloaded. Without them the
test skips, except under ``CI=true`` where it fails. Screenshots go to ``bench/out/`` (ignored).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared.engine.question_answering import QAItem
from shared.engine.torch_model import engine_from_dir
from shared.refresh.isolation import LocalDirSource, isolate
from shared.serving.holder import ModelHolder
from shared.serving.openapi import CONTENT_SECURITY_POLICY
from shared.settings import Settings
from shared.store.model_store import ModelStore
from tests.conftest import ROOT, registered_functions
from tests.fixtures.functions_host import FunctionsHost, serve

pytestmark = [pytest.mark.integration, pytest.mark.browser]

KEY = "playground-test-key"
# Two characters outside the BMP before the answer (each is 1 code point, 2 UTF-16 units), and
# markup that would run script if the page ever rendered the context as HTML.
CONTEXT = (
    "🏈🎉 Super Bowl 50 was played in 2016 in San Francisco. "
    '<img src=x onerror="window.__pwned = 1"> The Denver Broncos won the game against Carolina.'
)
QUESTION = "Who won the game?"
TOP_K = 3
OUT = ROOT / "bench" / "out"
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; .ci/run installs Debian's chromium and chromium-driver")
    pytest.skip(reason)


def find_browser() -> tuple[str, str]:
    """(browser binary, chromedriver) from ``CHROMEWEBDRIVER`` or ``PATH``; never downloaded."""
    driver_dir = os.environ.get("CHROMEWEBDRIVER")
    driver = shutil.which("chromedriver", path=driver_dir) if driver_dir else None
    driver = driver or shutil.which("chromedriver")
    browser = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
            if (found := shutil.which(name))
        ),
        None,
    )
    if not driver or not browser:
        _missing(f"no Chromium and chromedriver found (browser={browser}, driver={driver})")
    assert driver and browser
    return browser, driver


@pytest.fixture
def served(azurite: str, container_name: str, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FunctionsHost]:
    """The app's HTTP functions on 127.0.0.1, serving a tiny model published into Azurite."""
    env = {"MODEL_STORAGE": azurite, "MODEL_CONTAINER": container_name, "MODEL_ID": "tests/tiny-bert", "QA_DEADLINE_SECONDS": "30"}
    store = ModelStore.from_settings(Settings.from_env(env))
    store.ensure_container()
    isolate(store, LocalDirSource(tiny_bert_dir, block_size=store.block_size), explicit=True, keep_versions=3)
    holder = ModelHolder(lambda: Settings.from_env(env), backoff_seconds=0.2)
    monkeypatch.setattr(function_app, "holder", holder)
    try:
        with serve(registered_functions(), keys={KEY}) as host:
            yield host
    finally:
        holder.close()
        store.container.delete_container()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    browser_path, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        # record CSP violations from the first script on: markup from the context must never even try to run
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "window.__violations = []; document.addEventListener('securitypolicyviolation', "
                "(e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            },
        )
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    # the bound only stops a broken test from hanging CI
    return WebDriverWait(driver, 120, poll_frequency=0.1).until(condition, message=f"gave up waiting for {what}")


def _tab_to(driver: Any, element_id: str) -> None:
    """Move the focus with the Tab key only until ``element_id`` has it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(20):
        if driver.execute_script("return document.activeElement && document.activeElement.id") == element_id:
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    raise AssertionError(f"Tab never reached #{element_id}")


def _type(driver: Any, text: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(text).perform()


def _insert_text(driver: Any, text: str) -> None:
    """Text as an emoji keyboard or IME enters it (chromedriver's key events stop at the BMP)."""
    driver.execute_cdp_cmd("Input.insertText", {"text": text})


def _press_enter(driver: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).send_keys(Keys.ENTER).perform()


def _text(driver: Any, element_id: str) -> str:
    return str(driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id))


def _requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _screenshot(driver: Any, width: int, path: Path) -> dict[str, int]:
    """Lay the page out ``width`` CSS pixels wide, save a full-page PNG, return the page's widths."""
    import base64

    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}
    )
    sizes: dict[str, int] = driver.execute_script(
        "const d = document.documentElement; "
        "return {scroll: d.scrollWidth, client: d.clientWidth, body: document.body.scrollWidth, viewport: window.innerWidth};"
    )
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return sizes


def _score_text(score: float) -> str:
    """The page's formatting of a score (playground.js formatScore)."""
    return f"{score:.2f}" if score >= 0.01 or score == 0 else _exponential(score)


def _exponential(score: float) -> str:
    mantissa, exponent = f"{score:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"  # JavaScript's toExponential(1): 4.2e-3


def test_playground_in_headless_chromium(served: FunctionsHost, browser: Any, tiny_bert_dir: Path) -> None:
    driver = browser
    origin = served.origin
    _requested_urls(driver)  # drain what the browser's start page requested: only the playground's requests count
    driver.get(f"{origin}/api/playground")
    assert driver.title == "Question answering playground"

    # the health line, then "Warm up" from the keyboard until the model is loaded
    _wait(driver, lambda d: "State: empty" in _text(d, "health"), "the health state")
    _tab_to(driver, "warm")
    _press_enter(driver)
    _wait(driver, lambda d: "State: ready" in _text(d, "health"), "the warm-up to finish")

    # no key yet: the host's empty-body 401 is shown as an error, not swallowed
    _tab_to(driver, "context")
    _insert_text(driver, CONTEXT)
    _tab_to(driver, "question")
    _type(driver, QUESTION)
    _press_enter(driver)
    _wait(driver, lambda d: d.execute_script("return !document.getElementById('error').hidden"), "the 401 error")
    error = _text(driver, "error")
    assert error.startswith("HTTP 401") and "function key" in error, error
    assert driver.execute_script("return document.getElementById('result').hidden") is True

    # with the key (typed into its field), submitted with Enter again
    _tab_to(driver, "key")
    _type(driver, KEY)
    _tab_to(driver, "question")
    _press_enter(driver)
    _wait(driver, lambda d: d.execute_script("return !document.getElementById('result').hidden"), "the answer")
    assert driver.execute_script("return document.getElementById('error').hidden") is True

    # the answers are the model's: the same engine on the same files, offsets in code points
    expected = engine_from_dir(tiny_bert_dir).answer([QAItem(QUESTION, CONTEXT, top_k=TOP_K)])[0]
    best = expected[0]
    assert best.start >= 2, "the tiny model must answer after the emoji for this test to mean anything"
    marks = driver.execute_script("return Array.from(document.querySelectorAll('#highlight mark')).map((m) => m.textContent)")
    assert marks == [CONTEXT[best.start : best.end]]
    assert _text(driver, "highlight") == CONTEXT  # the whole context, as text
    before = driver.execute_script("return document.getElementById('highlight').firstChild.textContent")
    assert before == CONTEXT[: best.start]  # a UTF-16 reading of the offsets would cut two units short
    items = driver.execute_script(
        "return Array.from(document.querySelectorAll('#answers li')).map((li) => "
        "({text: li.querySelector('.text').textContent, score: li.querySelector('.score').textContent, "
        "bar: li.querySelector('.bar > span').style.width}))"
    )
    assert [item["text"] for item in items] == [a.answer or "(no answer)" for a in expected]
    assert len(items) == len(expected) <= TOP_K
    best_score = max(answer.score for answer in expected)
    for item, answer in zip(items, expected, strict=True):
        assert item["score"] == f"score {_score_text(answer.score)}"  # the number itself, never a percentage
        # the bar's length is the score relative to the best answer's
        assert float(item["bar"].removesuffix("%")) == pytest.approx(answer.score / best_score * 100, abs=0.051)
    meta = _text(driver, "meta")
    assert "tests/tiny-bert" in meta and "ms (model)" in meta

    # the context's markup never became an element and no script ran from it
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.execute_script("return window.__violations") == []
    assert "<img src=x onerror=" in _text(driver, "highlight")

    # the key: in this tab's sessionStorage only, sent as a header, never in a URL
    assert driver.execute_script("return sessionStorage.getItem('qa-playground-function-key')") == KEY
    assert driver.execute_script("return localStorage.length") == 0 and driver.execute_script("return document.cookie") == ""

    # only same-origin requests, per the DevTools network log
    urls = _requested_urls(driver)
    assert f"{origin}/api/playground" in urls and f"{origin}/api/ask" in urls and f"{origin}/api/playground/playground.js" in urls
    assert [url for url in urls if not url.startswith(origin + "/")] == []
    assert not any(KEY in url for url in urls)
    assert ("GET", "/api/playground", 200) in served.requests and ("POST", "/api/ask", 401) in served.requests

    # the CSP the page was served with is the exact documented one
    assert driver.execute_script("return document.querySelectorAll('script:not([src])').length") == 0

    # axe-core (npm): no serious or critical violation, with the answer on the page
    if not AXE.exists():
        _missing("node_modules/axe-core is missing (npm ci)")
    driver.execute_script(AXE.read_text(encoding="utf-8"))
    driver.set_script_timeout(120)
    report = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then((r) => done(r.violations.map((v) => "
        "({id: v.id, impact: v.impact, nodes: v.nodes.map((n) => n.target.join(' '))}))))"
        ".catch((e) => done([{id: 'axe-error', impact: 'critical', nodes: [String(e)]}]));"
    )
    assert [v for v in report if v["impact"] in ("serious", "critical")] == []

    # both widths: no horizontal overflow on a phone, screenshots for a human (and docs/playground.png)
    narrow = _screenshot(driver, 375, OUT / "playground-375.png")
    assert narrow["viewport"] == 375 and narrow["scroll"] <= narrow["client"] and narrow["body"] <= narrow["client"], narrow
    wide = _screenshot(driver, 1280, OUT / "playground-1280.png")
    assert wide["viewport"] == 1280 and wide["scroll"] <= wide["client"], wide
    assert (OUT / "playground-375.png").stat().st_size > 0 and (OUT / "playground-1280.png").stat().st_size > 0
    assert CONTENT_SECURITY_POLICY  # served on the page: see tests/integration/test_openapi.py


def _ask_requests(host: FunctionsHost) -> int:
    return sum(1 for method, path, _ in host.requests if method == "POST" and path.startswith("/api/ask"))


def test_playground_edges(served: FunctionsHost, browser: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The playground's edges: the trailing-slash URL, top_k checked in the page as the API checks it, the answer
    brought into view on a 375 px phone, and scores above 1 shown as what they are."""
    import time

    from selenium.webdriver.common.by import By

    from shared.engine.question_answering import Answer

    driver = browser
    origin = served.origin

    # /api/playground/ (trailing slash) gives the working page: every asset and route resolves
    driver.get(f"{origin}/api/playground/")
    _wait(driver, lambda d: "State: empty" in _text(d, "health"), "the health state (from the trailing-slash URL)")
    assert driver.execute_script("return getComputedStyle(document.body).margin") == "0px"  # the style sheet loaded
    _wait(driver, lambda d: "up to" in _text(d, "context-hint"), "the limits from openapi.json")
    assert [request for request in served.requests if request[2] == 404] == []

    # a phone's width, from here on
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 375, "height": 667, "deviceScaleFactor": 1, "mobile": True})
    driver.find_element(By.ID, "key").send_keys(KEY)
    driver.find_element(By.ID, "context").send_keys(CONTEXT.replace("🏈🎉 ", ""))  # chromedriver types the BMP only
    driver.find_element(By.ID, "question").send_keys(QUESTION)

    # top_k out of the API's range or not whole: refused in the page with the API's words, nothing sent
    sent = _ask_requests(served)
    for value, message in (
        ("0", "'top_k' must be between 1 and 20, got 0"),
        ("-2", "'top_k' must be between 1 and 20, got -2"),
        ("25", "'top_k' must be between 1 and 20, got 25"),
        ("2.5", "'top_k' must be a whole number"),
    ):
        driver.execute_script("document.getElementById('top-k').value = arguments[0]", value)
        driver.find_element(By.ID, "submit").click()
        _wait(driver, lambda d, m=message: _text(d, "error") == m, f"the page's refusal of top_k={value}")
        assert driver.execute_script("return document.getElementById('top-k').getAttribute('aria-invalid')") == "true"
        assert driver.execute_script("return document.activeElement.id") == "top-k"
    assert _ask_requests(served) == sent

    # a valid top_k: the answer is scrolled into view and has the focus, on a 375 px screen
    driver.execute_script("window.scrollTo(0, 0); document.getElementById('top-k').value = '2'")
    driver.find_element(By.ID, "submit").click()
    _wait(driver, lambda d: d.execute_script("return !document.getElementById('result').hidden"), "the answer")
    assert _ask_requests(served) == sent + 1
    assert driver.execute_script("return document.getElementById('top-k').hasAttribute('aria-invalid')") is False
    assert driver.execute_script("return document.activeElement.id") == "result-title"
    top = driver.execute_script("return document.getElementById('result-title').getBoundingClientRect().top")
    assert 0 <= top < driver.execute_script("return window.innerHeight"), top
    assert driver.execute_script("return window.scrollY") > 0
    assert 1 <= len(driver.find_elements(By.CSS_SELECTOR, "#answers li")) <= 2

    # scores as the 4.57.6 pipeline sums them over overlapping windows: above 1 is shown as is
    with function_app.holder.model(time.monotonic() + 30) as loaded:
        engine = loaded.engine
    start = CONTEXT.replace("🏈🎉 ", "").index("Denver Broncos")
    canned = [[Answer("Denver Broncos", 1.78, start, start + 14), Answer("Carolina", 0.31, start + 40, start + 48)]]
    monkeypatch.setattr(engine, "answer", lambda items, **_: canned)
    driver.find_element(By.ID, "submit").click()
    _wait(driver, lambda d: "1.78" in _text(d, "answers"), "the canned answers")
    items = driver.execute_script(
        "return Array.from(document.querySelectorAll('#answers li')).map((li) => "
        "({score: li.querySelector('.score').textContent, bar: li.querySelector('.bar > span').style.width}))"
    )
    assert items == [{"score": "score 1.78", "bar": "100%"}, {"score": "score 0.31", "bar": "17.4%"}]
    assert "%" not in _text(driver, "answers")
