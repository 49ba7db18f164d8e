"""The chat page against a server started with an API key, in real headless Chromium: the key from the URL
fragment (`/#api_key=KEY`, then gone from the address bar) or typed into #api-key is sent as
`Authorization: Bearer KEY`, and replies stream; without it the page shows the 401. (Without a key on an open
server: test_web_page.py.) Skips only when selenium, Chromium or chromedriver is missing."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
uvicorn = pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serving_testing import running, tiny_model  # noqa: E402

from rlhf_fast.data import ByteTokenizer  # noqa: E402
from rlhf_fast.serving.batcher import BatchConfig  # noqa: E402
from rlhf_fast.serving.guard import ServerLimits  # noqa: E402
from rlhf_fast.serving.server import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tiny-page"
KEY = "sk-page-key"
WAIT_S = 20


@pytest.fixture(scope="module")
def base():
    app = create_app(tiny_model(), ByteTokenizer(), NAME, BatchConfig(batch_window_ms=0), ServerLimits(api_key=KEY))
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    driver_path = shutil.which("chromedriver")
    browser_path = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if driver_path is None or browser_path is None:
        pytest.skip(f"Chromium and chromedriver are needed; found browser={browser_path}, chromedriver={driver_path}")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = browser_path
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def text_of(driver, element_id) -> str:
    return driver.find_element(By.ID, element_id).text


def wait_for_model(driver) -> str:
    WebDriverWait(driver, WAIT_S).until(lambda d: text_of(d, "model") not in ("…", ""))
    return text_of(driver, "model")


def chat_once(driver):
    driver.find_element(By.ID, "max-tokens").send_keys("4")
    driver.find_element(By.ID, "input").send_keys("Hi there")
    driver.find_element(By.ID, "send").click()

    def finished(d):
        status = text_of(d, "status")
        done = d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done]")
        return status == "error" or (status == "idle" and bool(done))

    WebDriverWait(driver, WAIT_S).until(finished)
    assert text_of(driver, "status") == "idle", text_of(driver, "error")


def test_key_from_the_url_fragment(base, browser):
    browser.get(f"{base}/#api_key={KEY}")
    assert wait_for_model(browser) == NAME, text_of(browser, "error")
    assert "api_key" not in browser.current_url  # taken out of the address bar
    chat_once(browser)


def test_without_the_key_the_page_shows_401_and_a_typed_key_works(base, browser):
    browser.get(base + "/")
    assert wait_for_model(browser) == "(unknown)"
    assert "HTTP 401" in text_of(browser, "error") and "API key" in text_of(browser, "error")
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)  # change event: the models are fetched again
    assert WebDriverWait(browser, WAIT_S).until(lambda d: text_of(d, "model") == NAME)
    assert text_of(browser, "error") == ""
    chat_once(browser)
