"""`lowrank web` in headless Chromium: type a message, watch the answer stream in, screenshot.
Skips with the reason when Streamlit, Selenium, Chromium or its driver is missing."""

import importlib.util
import os
import shutil
import signal
import time

import pytest

from . import tiny, web_server
from .test_e2e import EPOCHS


def _missing() -> str | None:
    for module, package in (("streamlit", "streamlit"), ("selenium", "selenium")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install {package})"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (Debian: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (Debian: apt-get install chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def server(trained, model_dir):
    out, _ = trained
    proc, url = web_server.start(model_dir, "--adapter", out / f"epoch_{EPOCHS}", "--title", "tiny ship")
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the streamlit process it started
        proc.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


RUNNING = "[data-testid='stStatusWidget']"  # shown while the script (the generation) runs
CONTENT = "[data-testid='stChatMessageContent']"
# Records every text the last chat message shows, as the page renders it (no polling gaps).
WATCH = """
window.lowrankStates = [];
new MutationObserver(() => {
  const all = document.querySelectorAll("%s");
  if (!all.length) return;
  const text = all[all.length - 1].innerText.trim();
  const states = window.lowrankStates;
  if (states[states.length - 1] !== text) states.push(text);
}).observe(document.body, {subtree: true, childList: true, characterData: true});
""" % CONTENT


def _contents(driver) -> list[str]:
    """The text of each chat message, without its avatar."""
    from selenium.webdriver.common.by import By

    return [m.text.strip() for m in driver.find_elements(By.CSS_SELECTOR, CONTENT)]


def _ask(driver, message: str, timeout: float = 90) -> tuple[str, list[str]]:
    """Send `message`; return the finished answer and every text the answer showed on the way."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    n_before = len(_contents(driver))
    driver.execute_script(WATCH)
    # the page reruns after each answer: wait for its chat input to be back (a busy machine is slow)
    box = WebDriverWait(driver, 60).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid='stChatInputTextArea']")))
    box.send_keys(message, Keys.ENTER)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            texts = _contents(driver)
        except StaleElementReferenceException:  # re-rendered between find and read
            continue
        if len(texts) == n_before + 2 and texts[-1] and not texts[-1].endswith("▌") \
                and not driver.find_elements(By.CSS_SELECTOR, RUNNING):
            states = driver.execute_script("return window.lowrankStates;")
            return texts[-1], states[states.index(message) + 1:] if message in states else states
    raise AssertionError(f"no finished answer to {message!r} within {timeout} s; page shows {_contents(driver)}")


def test_web_chat_streams_the_trained_answers(server, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, 90).until(EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stChatInputTextArea']")))
    assert "tiny ship" in browser.find_element(By.TAG_NAME, "h1").text

    # a long answer, generated token by token: the page shows it growing, cursor last
    answer, states = _ask(browser, "Read the cargo manifest.")
    assert answer == tiny.MANIFEST
    partial = [t for t in states if t.endswith("▌")]
    print(f"{len(partial)} partial renders of {len(tiny.MANIFEST)} characters")
    # streamed: partial renders (cursor last) before the finished answer. At least one, not more:
    # Streamlit's server keeps only the newest delta of an element that is still queued, so when the
    # tokens come faster than the page drains them (a busy machine: CI once saw 1 of ~40) the
    # intermediate texts merge; a page that waited for the whole answer shows none.
    assert len(partial) >= 1, states
    assert all(tiny.MANIFEST.startswith(t[:-1].rstrip()) for t in partial), partial
    browser.save_screenshot(str(artifacts / "web_chat_streamed.png"))

    # clear the history, set a system prompt, then two turns that need the history
    browser.find_element(By.XPATH, "//button[.//p[text()='Clear history']]").click()
    WebDriverWait(browser, 30).until(lambda d: not _contents(d))
    browser.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] textarea").send_keys(tiny.SYSTEM)
    browser.find_element(By.TAG_NAME, "h1").click()  # leaving the box commits its value
    time.sleep(1)
    assert _ask(browser, "Where are we?")[0] == "Orbit of Titan, deck seven."
    assert _ask(browser, "How long until dawn?")[0] == "Forty minutes."
    browser.save_screenshot(str(artifacts / "web_chat.png"))
    assert _contents(browser) == ["Where are we?", "Orbit of Titan, deck seven.", "How long until dawn?", "Forty minutes."]
