"""The chat page at / in a real headless browser (Debian's chromium + chromedriver, driven by selenium): the
model name shows, a question streams an answer (the greedy answer the API gives), Stop cancels mid-answer and
frees the slot, and the Markdown renderer never lets model text become HTML.

LLMRUN_SCREENSHOT=docs/chat-page.png also saves a screenshot of the page after the first answer.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest
from selenium import webdriver  # dev dependency; a missing one must fail, not skip
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from helpers.server import ServerProcess
from llmrun.api import Llama

QUESTION = "What is the capital of France?"


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise FileNotFoundError("chromium and chromedriver are needed (make test installs Debian's chromium and "
                                "chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def server(default_model):
    with ServerProcess(default_model, "--parallel", "2", "--ctx", "1024", "--alias", "smol") as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    binary, driver_path = chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,800"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    drv.set_script_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def wait(drv, cond, seconds=120):
    return WebDriverWait(drv, seconds, poll_frequency=0.05).until(lambda d: cond(d))


def open_page(drv, server, temperature="0", max_tokens=""):
    drv.get(server.url + "/")
    wait(drv, lambda d: d.find_element(By.ID, "model-name").text.startswith("smol"))
    drv.find_element(By.ID, "toggle-settings").click()
    for field, value in (("temperature", temperature), ("max-tokens", max_tokens)):
        el = drv.find_element(By.ID, field)
        el.clear()
        if value:
            el.send_keys(value)
    drv.find_element(By.ID, "toggle-settings").click()


def test_question_streams_the_greedy_answer(server, browser, default_model):
    want = Llama(default_model, n_ctx=1024, n_threads=2).create_chat_completion(
        [{"role": "user", "content": QUESTION}], temperature=0, max_tokens=120)["choices"][0]["message"]["content"]
    open_page(browser, server, max_tokens="120")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys(QUESTION)
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.text == QUESTION
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    shown = answer.find_element(By.TAG_NAME, "p").text
    assert " ".join(shown.split()) == " ".join(want.split())
    if os.environ.get("LLMRUN_SCREENSHOT"):   # a second turn with code in it, for the README's picture
        box.send_keys("Write a Python function that adds two numbers.")
        box.send_keys(Keys.ENTER)
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
        browser.save_screenshot(os.environ["LLMRUN_SCREENSHOT"])


def test_stop_cancels_mid_answer(server, browser):
    open_page(browser, server, temperature="1", max_tokens="1000")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("Write a very long story about a dragon and a knight.")
    box.send_keys(Keys.ENTER)
    bubble = wait(browser, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, ".msg.assistant.streaming")
                                      if len(b.text) > 20])[0]
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_displayed()
    stop.click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"), 30)
    assert bubble.find_element(By.CLASS_NAME, "note").text == "stopped"
    server.wait_idle(30)                       # the server cancelled the request and freed its slot
    text = bubble.text
    time.sleep(0.5)
    assert bubble.text == text and browser.find_element(By.ID, "send").is_displayed()


def test_markdown_renderer_escapes_model_text(server, browser):
    browser.get(server.url + "/")
    evil = ("<img src=x onerror=alert(1)> **bold** `<b>code</b>` [x](javascript:alert(1)) [ok](https://a.example)\n"
            "```html\n<script>alert(2)</script>\n```\n- item <i>one</i>")
    html = browser.execute_script("return renderMarkdown(arguments[0]);", evil)
    probe = browser.execute_script(
        "const d = document.createElement('div'); d.innerHTML = arguments[0];"
        "return [...d.querySelectorAll('*')].map(e => e.tagName.toLowerCase() + (e.getAttribute('href') ? "
        "'=' + e.getAttribute('href') : ''));", html)
    assert sorted(set(probe)) == sorted({"p", "strong", "code", "a=https://a.example", "pre", "ul", "li"}), probe
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;script&gt;" in html
