"""The browser playground at GET /: served as static package files (or not, with
--no-playground), and driven in a real browser (Debian's chromium + chromium-driver through
selenium) against FakeEngine, whose answers are known in advance: a streamed chat answer,
the conversation carried over, completion mode, Stop aborting the request on the server, and
a screenshot that shows the page rendered.

Without chromium the browser tests skip outside CI and fail in CI (CI installs it: .ci/run).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time

import httpx
import pytest

from kiln.runtime.config import EngineConfig
from kiln.server.app import create_app
from kiln.server.config import ServerConfig
from kiln.server.playground import STATIC_DIR

from .fake_engine import FakeEngine, expected_text
from .helpers import ThreadServer

KEY = "sk-playground"


def _server(engine: FakeEngine, **options) -> ThreadServer:
    config = ServerConfig(engine=EngineConfig(engine_dir="fake"), served_model_name="fake-model", **options)
    return ThreadServer(create_app(engine, config))


def test_page_and_assets_are_served_and_no_playground_turns_them_off():
    with _server(FakeEngine()) as server:
        page = httpx.get(server.base_url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
        assert sorted(assets) == ["/playground/playground.css", "/playground/playground.js"]
        for path in assets:
            assert httpx.get(server.base_url + path).text == (STATIC_DIR / path.rsplit("/", 1)[1]).read_text()
        assert httpx.get(server.base_url + "/playground/defaults.json").json() == {}
    with _server(FakeEngine(), playground=False) as server:
        for path in ("/", "/playground/playground.js", "/playground/defaults.json"):
            assert httpx.get(server.base_url + path).status_code == 404
        assert httpx.get(server.base_url + "/health").status_code == 200


def test_static_files_load_nothing_from_elsewhere():
    for f in STATIC_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", f.read_text()), f"{f.name} links outside"


# ---------------------------------------------------------------- in a real browser


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        message = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message + "; CI installs them and runs these tests")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(chromedriver), options=options)  # fails if it cannot start


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(max_model_len=4096, step_delay=0.02)
    with _server(engine, api_key=KEY) as server:
        yield engine, server.base_url


@pytest.fixture(scope="module")
def page(served):
    driver = _chrome()
    driver.get(served[1] + "/")
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _answers(page):
    from selenium.webdriver.common.by import By

    return page.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def _ask(page, text: str, max_tokens: int):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = page.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(max_tokens))
    before = len(_answers(page))
    page.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    return _wait(lambda: len(_answers(page)) > before and _answers(page)[-1], what="an answer box")


def _finish(answer, timeout: float = 30.0) -> tuple[str, str, str]:
    """(state, text, stats) of an answer once done; the text read through the DOM."""
    state = _wait(lambda: answer.get_attribute("data-done"), timeout, "the answer to finish")
    text = answer.find_element("css selector", ".text").get_attribute("textContent")
    return state, text, answer.find_element("css selector", ".stats").text


def test_api_key_then_a_streamed_chat_answer(page):
    from selenium.webdriver.common.by import By

    model = page.find_element(By.ID, "model")
    _wait(lambda: model.text == "API key required", what="the API key prompt")  # /v1/models said 401
    assert page.find_element(By.ID, "api-key-row").is_displayed()
    assert page.find_element(By.ID, "send").get_attribute("disabled") is not None
    assert page.find_element(By.ID, "temperature").get_attribute("value") == "0"  # no model defaults
    page.find_element(By.ID, "api-key").send_keys(KEY)
    _wait(lambda: model.text == "fake-model", what="the model name")

    answer = _ask(page, "hello", 40)
    seen = set()  # the answer's text while it streams: it must grow in steps, not appear at once
    while not answer.get_attribute("data-done"):
        seen.add(answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent"))
    state, text, stats = _finish(answer)
    expected = expected_text(list(b"<user>hello<assistant>"), 40)
    assert (state, text) == ("finished", expected)
    assert len({s for s in seen if s and s != expected}) >= 3 and all(expected.startswith(s) for s in seen)
    assert re.search(r"^40 tokens · [\d.]+ tok/s · TTFT \d+ ms · stopped at max tokens$", stats), stats

    # The next question carries the conversation (the chat template of FakeEngine's tokenizer).
    state, text, _ = _finish(_ask(page, "more", 5))
    history = f"<user>hello<assistant>{expected}<user>more<assistant>"
    assert (state, text) == ("finished", expected_text(list(history.encode()), 5))


def test_stop_aborts_the_request_on_the_server(page, served):
    from selenium.webdriver.common.by import By

    engine, _ = served
    aborted_before = len(engine.aborted)
    answer = _ask(page, "go on", 3000)  # 3000 steps of 20 ms: far longer than the test waits
    text_el = answer.find_element(By.CSS_SELECTOR, ".text")
    _wait(lambda: len(text_el.get_attribute("textContent")) >= 5, what="a few tokens")
    page.find_element(By.ID, "stop").click()
    state, text, stats = _finish(answer)
    assert state == "stopped" and stats.endswith("· stopped")
    _wait(lambda: len(engine.aborted) == aborted_before + 1 and not engine.running, 10, "the server-side abort")
    prompt = list(b"<user>go on<assistant>")
    assert 5 <= len(text) < 3000 and expected_text(prompt, len(text)) == text


def test_completion_mode(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "mode-completion").click()
    assert _answers(page) == []  # switching modes starts afresh
    state, text, stats = _finish(_ask(page, "abc", 7))
    assert (state, text) == ("finished", expected_text(list(b"abc"), 7)) and stats.startswith("7 tokens")


def test_screenshot_shows_the_rendered_page(page, tmp_path):
    from PIL import Image

    png = page.get_screenshot_as_png()
    (tmp_path / "playground.png").write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    assert (width, height) == tuple(page.execute_script("return [window.innerWidth, window.innerHeight]"))
    colors = image.getcolors(maxcolors=1 << 20)
    most_common = max(count for count, _ in colors)
    assert len(colors) > 200 and most_common < 0.8 * width * height  # text and panels, not a blank page
    header = image.getpixel((width // 2, 8))
    assert max(header) < 80, header  # the dark header bar (stylesheet applied)
