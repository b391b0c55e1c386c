"""`lowrank web` in headless Chromium: type a message, watch the answer stream in, screenshot.
Skips with the reason when Streamlit, Selenium, Chromium or its driver is missing."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from . import tiny
from .conftest import ROOT
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained, model_dir):
    out, _ = trained
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowrank", "web", str(model_dir), "--adapter",
                             str(out / f"epoch_{EPOCHS}"), "--port", str(port), "--title", "tiny ship"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"lowrank web did not come up:\n{proc.stdout.read().decode()[-3000:]}")
            time.sleep(0.5)
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


def _contents(driver) -> list[str]:
    """The text of each chat message, without its avatar."""
    from selenium.webdriver.common.by import By

    return [m.text.strip() for m in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessageContent']")]


def _ask(driver, message: str, n_before: int, timeout: float = 60) -> tuple[str, list[str]]:
    """Send `message`; return the finished answer and every distinct text the answer showed."""
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, "[data-testid='stChatInputTextArea']")
    box.send_keys(message, Keys.ENTER)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            texts = _contents(driver)
        except StaleElementReferenceException:  # re-rendered between find and read
            continue
        if len(texts) >= n_before + 2:
            text = texts[n_before + 1]
            if not seen or seen[-1] != text:
                seen.append(text)
            if text and not text.endswith("▌") and not driver.find_elements(By.CSS_SELECTOR, RUNNING):
                return text, seen
        time.sleep(0.05)
    raise AssertionError(f"no finished answer to {message!r} within {timeout} s; saw {seen}")


def test_web_chat_streams_the_trained_answers(server, browser, artifacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 90)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "[data-testid='stChatInputTextArea']")))
    assert "tiny ship" in browser.find_element(By.TAG_NAME, "h1").text
    system = browser.find_element(By.CSS_SELECTOR, "[data-testid='stSidebar'] textarea")
    system.send_keys(tiny.SYSTEM)
    browser.find_element(By.TAG_NAME, "h1").click()  # leaving the box commits its value
    time.sleep(1)

    answer, seen = _ask(browser, "Where are we?", 0)
    assert answer == "Orbit of Titan, deck seven."
    answer, seen2 = _ask(browser, "How long until dawn?", 2)  # answered with the history
    assert answer == "Forty minutes."
    browser.save_screenshot(str(artifacts / "web_chat.png"))
    texts = _contents(browser)
    assert texts == ["Where are we?", "Orbit of Titan, deck seven.", "How long until dawn?", "Forty minutes."]
    # streamed: the page showed a partial answer (with the cursor) before the finished one
    assert any(text.endswith("▌") for text in seen + seen2), seen + seen2
