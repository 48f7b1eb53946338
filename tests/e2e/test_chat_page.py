"""The chat page (GET /ui) in a real browser: Debian's Chromium, headless, driven
by Selenium through Debian's chromedriver, against real servers over the default
model. Send a message and see the answer stream in with its speed; stop a long
answer (the engine frees it); reload and see the conversation; a server error
shown to the user; the API key asked for and used; the Markdown renderer's
output for code, links and markup in model text. Screenshots go to
.test-artifacts/ui/ (or $MISTRALRS_SERVE_TEST_ARTIFACTS/ui)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, start_server, stop_server
from mistralrs_serve.config import ServerConfig

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (ci/test.sh installs them)",
)
ARTIFACTS = Path(
    os.environ.get("MISTRALRS_SERVE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".test-artifacts")
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    )
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait_for(check: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def screenshot(browser: Any, name: str) -> None:
    folder = ARTIFACTS / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(folder / f"{name}.png"))


def by_id(browser: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def messages(browser: Any) -> list[tuple[str, str]]:
    """(class, text) of each message, read in one script (the page redraws them as they stream)."""
    script = "return Array.from(document.querySelectorAll('#log .msg'), (e) => [e.className, e.innerText]);"
    return [tuple(m) for m in browser.execute_script(script)]


def open_page(browser: Any, server: LiveServer) -> None:
    browser.get(server.base_url + "/ui")
    browser.execute_script("localStorage.clear()")
    browser.get(server.base_url + "/ui")


def send(browser: Any, text: str) -> None:
    prompt = by_id(browser, "prompt")
    prompt.clear()
    prompt.send_keys(text)
    by_id(browser, "send").click()


def test_send_stream_reload(browser: Any, live_server: LiveServer) -> None:
    open_page(browser, live_server)
    wait_for(lambda: by_id(browser, "model").get_attribute("value") == "default", what="the model list")
    assert not by_id(browser, "key-form").is_displayed()  # this server asks for no key
    send(browser, "Say hello in one short sentence.")
    wait_for(lambda: len(messages(browser)) == 2, what="the answer bubble")
    wait_for(lambda: not by_id(browser, "stop").is_displayed(), timeout_s=120, what="the answer to finish")
    answer = messages(browser)[1][1]
    assert answer.strip() and "tok/s" in answer
    screenshot(browser, "answered")
    browser.refresh()
    wait_for(lambda: len(messages(browser)) == 2, what="the kept conversation")
    assert "Say hello" in messages(browser)[0][1]
    assert messages(browser)[1][1] == answer
    screenshot(browser, "reloaded")


def test_stop_a_long_answer(browser: Any, live_server: LiveServer) -> None:
    open_page(browser, live_server)
    wait_for(lambda: by_id(browser, "model").get_attribute("value") == "default", what="the model list")
    send(browser, "Write a very long story about a dragon who learns to bake bread, in many chapters.")
    wait_for(lambda: len(messages(browser)) == 2 and messages(browser)[1][1].strip(), what="the first tokens")
    by_id(browser, "stop").click()
    wait_for(lambda: "stopped" in messages(browser)[1][1], what="the stopped answer")
    live_server.wait_idle(timeout_s=15)  # the engine aborted the request and freed its blocks
    screenshot(browser, "stopped")


def test_markdown_rendering(browser: Any, live_server: LiveServer) -> None:
    browser.get(live_server.base_url + "/ui")
    source = (
        "# Title\n\nSome **bold** and *italic* text with `code` and a [link](https://example.com).\n\n"
        "```python\ndef f(x):\n    return 'hi'  # note\n```\n\n- one\n- two\n\n<script>alert(1)</script>"
        " [bad](javascript:alert(1))"
    )
    html = browser.execute_async_script(
        "const [src, done] = arguments; import('/ui/markdown.js').then((m) => done(m.renderMarkdown(src)));",
        source,
    )
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>italic</em>" in html
    assert '<pre><code class="language-python"><span class="tok-kw">def</span>' in html
    assert (
        '<span class="tok-str">&#39;hi&#39;</span>' in html and '<span class="tok-com"># note</span>' in html
    )
    assert '<a href="https://example.com" target="_blank" rel="noopener noreferrer">link</a>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and 'href="javascript' not in html


@pytest.fixture(scope="module")
def guarded_server(default_runner: Any) -> Iterator[LiveServer]:
    """An API key, and a body limit a long message passes."""
    live = start_server(ServerConfig(api_key="sekrit", max_body_bytes=2048), lambda: default_runner.client)
    yield live
    stop_server(live)


def test_api_key_prompt_and_a_server_error(browser: Any, guarded_server: LiveServer) -> None:
    open_page(browser, guarded_server)
    wait_for(lambda: by_id(browser, "key-form").is_displayed(), what="the API key prompt")
    by_id(browser, "key-input").send_keys("sekrit")
    by_id(browser, "key-form").submit()
    wait_for(lambda: by_id(browser, "model").get_attribute("value") == "default", what="models with the key")
    send(browser, "word " * 600)  # over the server's body limit
    wait_for(lambda: len(messages(browser)) == 2 and "error" in messages(browser)[1][0], what="the error")
    assert "limit" in messages(browser)[1][1]
    screenshot(browser, "server-error")


def test_the_page_and_its_policy(live_server: LiveServer, default_runner: Any) -> None:
    with live_server.http() as http:
        page = http.get("/ui")
        assets = [http.get(f"/ui/{name}") for name in ("app.js", "markdown.js", "style.css")]
        missing = http.get("/ui/../config.py")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert all(a.status_code == 200 for a in assets)
    assert missing.status_code == 404
    off = start_server(ServerConfig(ui=False), lambda: default_runner.client)
    try:
        assert httpx.get(off.base_url + "/ui").status_code == 404
    finally:
        stop_server(off)
