"""The chat page (rlhf_fast/serving/static/index.html) in real headless Chromium against a real
`rlhf-fast serve --model tiny`: a typed message streams a reply that equals, greedily, what the non-streaming
endpoint returns for the same conversation; the conversation carries over to the next turn; a server error
shows in the page with its status and message; reset clears everything.

Skips only when selenium, Chromium or chromedriver is missing (Debian: apt-get install chromium
chromium-driver); anything else going wrong with the page or the server fails.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAX_TOKENS = 16  # tiny has n_positions 128: two turns of byte tokens stay well inside it
WAIT_S = 20


def _find(names, fallback=None):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return fallback if fallback and os.access(fallback, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, timeout=30):
    """(status, parsed JSON body) of a GET (body None) or JSON POST; HTTP errors return their status too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of `rlhf-fast serve --model tiny` on a free loopback port; its log goes to a file."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "rlhf_fast.cli", "serve", "--model", "tiny", "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # torch + model start-up on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"rlhf-fast serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _request(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rlhf-fast serve: no /health within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    driver_path = _find(["chromedriver"], "/usr/bin/chromedriver")
    browser_path = _find(BROWSERS)
    if driver_path is None or browser_path is None:
        pytest.skip("Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver); "
                    f"found browser={browser_path}, chromedriver={driver_path}")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = browser_path
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _set(driver, element_id, value):
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def _send_and_wait(driver, text, n_assistant):
    """Type `text`, click send, wait until the n-th assistant message is done (or the page shows an error)."""
    _set(driver, "input", text)
    driver.find_element(By.ID, "send").click()

    def finished(d):
        if d.find_element(By.ID, "status").text == "error":
            return True
        done = d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='true']")
        return len(done) >= n_assistant and d.find_element(By.ID, "status").text == "idle"

    WebDriverWait(driver, WAIT_S).until(finished)
    status = driver.find_element(By.ID, "status").text
    assert status == "idle", f"the page shows an error: {driver.find_element(By.ID, 'error').text!r}"


def _greedy_reply(server, model, messages):
    status, body = _request(server + "/v1/chat/completions",
                            dict(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS))
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_page_streams_greedy_replies_equal_to_non_streaming(server, browser):
    status, models = _request(server + "/v1/models")
    assert status == 200
    model = models["data"][0]["id"]
    browser.get(server + "/")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text not in ("", "…"))
    assert browser.find_element(By.ID, "model").text == model
    assert browser.find_element(By.ID, "error").text == ""
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", str(MAX_TOKENS))

    history = []
    for turn, text in enumerate(["Hi there", "And then?"], start=1):
        _send_and_wait(browser, text, turn)
        messages = browser.execute_script("return window.chat.messages")
        assert [m["role"] for m in messages] == ["user", "assistant"] * turn
        assert messages[:-1] == history + [{"role": "user", "content": text}]  # earlier turns sent along
        reply = messages[-1]["content"]
        assert reply, "empty streamed reply"
        assert reply == _greedy_reply(server, model, messages[:-1]), f"turn {turn}: streamed != non-streaming"
        shown = browser.execute_script(
            "const a = document.querySelectorAll('.message.assistant'); return a[a.length - 1].textContent")
        assert shown == reply
        history = messages
    assert browser.find_element(By.ID, "input").get_attribute("value") == ""

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .message") == []
    assert browser.execute_script("return window.chat.messages") == []
    assert browser.find_element(By.ID, "status").text == "idle"


def test_page_shows_server_errors(server, browser):
    browser.get(server + "/")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "model").text not in ("", "…"))
    _set(browser, "temperature", "-1")  # outside OpenAI's [0, 2]: the server answers 4xx with a message
    _set(browser, "input", "Hello")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text == "error")
    error = browser.find_element(By.ID, "error").text
    assert error.startswith(("HTTP 400: ", "HTTP 422: ")) and "temperature" in error, error
    assert browser.execute_script("return window.chat.messages") == []  # the failed turn is not kept
    assert browser.find_element(By.ID, "input").get_attribute("value") == "Hello"  # back in the box to retry
