"""The page serve.py serves at GET /, driven in a real browser (headless Chromium
through Selenium): a chat with the tiny chat model of conftest.py and with the
official SmolLM2-135M-Instruct weights, a completion that streams and stops, and the
server's error messages shown in the page.
Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)."""
import os
import re
import shutil
import subprocess

import httpx
import pytest

from conftest import Server, command, missing
from smolkit.common import ROOT

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """One headless Chromium for the module: starting it is most of these tests' time."""
    if webdriver is None:
        missing("the page tests need selenium: pip install selenium")
    if not (CHROMIUM and CHROMEDRIVER):
        missing("the page tests need chromium and chromedriver on PATH (Debian: apt-get install chromium "
                "chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1100,800",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def base_server(tmp_path_factory):
    """serve.py serving an untrained base model: completion view by default, and its
    end of text (<|endoftext|>) is one token in 49,152, so it writes on and on."""
    root = tmp_path_factory.mktemp("base")
    args = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--n_kv_head", "2", "--intermediate_size", "128",
            "--block_size", "64", "--batch_size", "2", "--max_iters", "1", "--eval_interval", "1", "--eval_iters", "1",
            "--sample_tokens", "1", "--data", os.path.join(ROOT, "input.txt"), "--out_dir", str(root / "out"),
            "--device", "cpu"]
    proc = subprocess.run([*command("train.py"), *args], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    server = Server("--out_dir", root / "out")
    yield server
    server.stop()


def element(driver, id):
    return driver.find_element(By.ID, id)


def set_value(driver, id, value):
    driver.execute_script("arguments[0].value = arguments[1]", element(driver, id), str(value))


def text_length(driver, id):
    return driver.execute_script("return document.getElementById(arguments[0]).textContent.length", id)


def health(server):
    return httpx.get(server.url + "/health").json()


def wait(driver, condition, timeout=30, message=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


def open_page(driver, server):
    driver.get(server.url)
    wait(driver, lambda: element(driver, "model").text not in ("", "…"), 10, "the model id never appeared")


def assistant_texts(driver):
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#log .assistant")]


def test_page_is_self_contained(chat_server):
    html = httpx.get(chat_server.url + "/").text
    assert re.search(r"<script>", html) and "<style>" in html
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", html, re.I), "an external resource"
    assert not re.search(r"url\(\s*[\"']?\s*(https?:)?//", html, re.I), "an external resource in the CSS"
    assert "@import" not in html


def test_chat(driver, chat_server):
    driver.get_log("browser")  # drop what earlier tests left in the console log
    open_page(driver, chat_server)
    assert element(driver, "model").text == "hf"
    assert "active" in element(driver, "tab-chat").get_attribute("class")  # a chat model: the chat view
    assert element(driver, "message").is_displayed() and not element(driver, "prompt").is_displayed()
    set_value(driver, "temperature", 0)  # greedy: the replies the tiny model was trained on

    element(driver, "message").send_keys("What is the capital of France?")
    element(driver, "send").click()
    wait(driver, lambda: assistant_texts(driver)[-1:] == ["Paris."] and element(driver, "send").is_enabled(),
         message=f"no reply 'Paris.': {assistant_texts(driver)} {element(driver, 'error').text!r}")
    assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#log .user")] == ["What is the capital of France?"]
    assert element(driver, "message").get_attribute("value") == ""
    assert re.search(r"^\d+ tokens · [\d.]+ tok/s · stop$", element(driver, "stats").text), element(driver, "stats").text
    assert not element(driver, "stop").is_enabled()

    # the second turn, sent with Enter, carries the first one with it
    element(driver, "message").send_keys("Say hello.", Keys.ENTER)
    wait(driver, lambda: assistant_texts(driver) == ["Paris.", "Hello!"] and element(driver, "send").is_enabled(),
         message=f"no reply 'Hello!': {assistant_texts(driver)} {element(driver, 'error').text!r}")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#log .user")) == 2
    assert element(driver, "error").text == ""

    element(driver, "reset").click()
    assert driver.find_elements(By.CSS_SELECTOR, "#log > *") == []
    assert driver.execute_script("return conversation.length") == 0
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []


def test_completion_streams_and_stops(driver, base_server):
    open_page(driver, base_server)
    assert "active" in element(driver, "tab-complete").get_attribute("class")  # a base model: completion view
    assert element(driver, "prompt").is_displayed() and not element(driver, "message").is_displayed()
    set_value(driver, "max_tokens", 4000)
    set_value(driver, "temperature", 1)
    element(driver, "prompt").send_keys("Once upon a time")
    # an untrained model ends its text at random, one token in 49,152: in the rare run
    # where that happens before Stop is pressed, generate again
    for attempt in range(3):
        before = health(base_server)["tokens_generated"]
        element(driver, "send").click()
        wait(driver, lambda: text_length(driver, "completion") > 0, message="no text streamed in")
        first = text_length(driver, "completion")
        wait(driver, lambda: text_length(driver, "completion") > first or element(driver, "send").is_enabled(),
             message="the continuation did not grow while streaming")
        if element(driver, "send").is_enabled():
            continue  # it ended by itself
        assert element(driver, "stop").is_enabled() and not element(driver, "send").is_enabled()
        element(driver, "stop").click()
        wait(driver, lambda: not element(driver, "stop").is_enabled(), message="Stop stayed enabled")
        if element(driver, "stats").text.endswith("stopped"):
            break
    else:
        pytest.fail(f"three generations ended before Stop: {element(driver, 'stats').text}")
    stopped = text_length(driver, "completion")
    assert stopped > first  # the partial text stays, all of it
    assert element(driver, "send").is_enabled()
    assert element(driver, "echo").text == "Once upon a time"
    # the server noticed the closed connection and stopped generating
    wait(driver, lambda: health(base_server)["active_requests"] == 0, 60, "the stopped request is still active")
    # a request after it gets the model's worker after any step of the stopped one still queued there:
    # when it is answered, the stopped one has nothing more to send, and the page shows nothing more
    r = httpx.post(base_server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "ignore_eos": True},
                   timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert text_length(driver, "completion") == stopped, "text kept coming after Stop"
    generated = health(base_server)["tokens_generated"] - before - 3
    assert 0 < generated < 4000, generated  # the server stopped long before max tokens


def test_errors_are_shown(driver, chat_server):
    open_page(driver, chat_server)
    for max_tokens, expected in ((0, "max_tokens: Input should be greater than or equal to 1"),
                                 (100000, "maximum context length is")):
        set_value(driver, "max_tokens", max_tokens)
        element(driver, "message").send_keys("What is the capital of France?")
        element(driver, "send").click()
        wait(driver, lambda: expected in element(driver, "error").text, 10,
             f"no error {expected!r} in the page: {element(driver, 'error').text!r}")
        # the turn is taken back, and the message given back to send again
        assert driver.find_elements(By.CSS_SELECTOR, "#log > *") == []
        assert element(driver, "message").get_attribute("value") == "What is the capital of France?"
        assert element(driver, "send").is_enabled() and not element(driver, "stop").is_enabled()
        element(driver, "message").clear()
    # fixed, the same message goes through and the error goes away
    set_value(driver, "max_tokens", 16)
    set_value(driver, "temperature", 0)
    element(driver, "message").send_keys("What is the capital of France?", Keys.ENTER)
    wait(driver, lambda: assistant_texts(driver) == ["Paris."], message=f"no reply: {assistant_texts(driver)}")
    assert element(driver, "error").text == ""


def test_chat_with_the_official_instruct_weights(driver, instruct_server):
    """SmolLM2-135M-Instruct answers in the page and its turn ends at <|im_end|>: the
    reply stops by itself, well before max tokens, and the next turn follows on."""
    open_page(driver, instruct_server)
    assert element(driver, "model").text == "SmolLM2-135M-Instruct"
    assert "active" in element(driver, "tab-chat").get_attribute("class")
    set_value(driver, "temperature", 0)
    set_value(driver, "max_tokens", 200)
    for question, answer in (("What is the capital of France?", "The capital of France is Paris."),
                             ("And of Italy?", "The capital of Italy is Rome.")):
        element(driver, "message").send_keys(question, Keys.ENTER)
        wait(driver, lambda: element(driver, "send").is_enabled() and len(assistant_texts(driver)) > 0 and
             assistant_texts(driver)[-1] != "", 60, f"no reply to {question!r}: {element(driver, 'error').text!r}")
        assert assistant_texts(driver)[-1] == answer
        assert element(driver, "stats").text.endswith(" · stop"), element(driver, "stats").text
    assert driver.execute_script("return conversation.length") == 4


@pytest.fixture(scope="module")
def keyed_page_server(chat_model):
    with Server("--init_from", chat_model["hf"], "--dtype", "float32", "--api_key", "sesame") as server:
        yield server


def test_the_page_with_an_api_key(driver, keyed_page_server):
    """serve.py --api_key prints the page's address with #key=...: opened so, the page
    sends the key; opened without it, the server's 401 message is shown."""
    driver.get(keyed_page_server.url + "/#key=sesame")
    wait(driver, lambda: element(driver, "model").text == "hf", 10, "the model id never appeared")
    assert driver.current_url == keyed_page_server.url + "/"  # the key is out of the address bar
    set_value(driver, "temperature", 0)
    element(driver, "message").send_keys("What is the capital of France?", Keys.ENTER)
    wait(driver, lambda: assistant_texts(driver)[-1:] == ["Paris."], message=f"no reply: {element(driver, 'error').text!r}")
    driver.get("about:blank")
    open_page(driver, keyed_page_server)  # no key this time
    element(driver, "message").send_keys("What is the capital of France?", Keys.ENTER)
    wait(driver, lambda: "Incorrect or missing API key" in element(driver, "error").text, 10,
         f"no API key error in the page: {element(driver, 'error').text!r}")


def test_a_reply_waiting_for_a_row_shows_its_place_in_line(driver, chat_model):
    # one row, held by a long stream: the page's request waits, and says so; when the row
    # frees, the reply comes
    server = Server("--init_from", chat_model["hf"], "--dtype", "float32", "--max_batch", "1")
    try:
        open_page(driver, server)
        set_value(driver, "temperature", 0)
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "Once", "max_tokens": 8000, "ignore_eos": True, "stream": True}) as busy:
            lines = busy.iter_lines()  # held: a dropped line iterator closes its response
            next(lines)  # decoding: the only row is taken
            element(driver, "message").send_keys("What is the capital of France?", Keys.ENTER)
            wait(driver, lambda: element(driver, "stats").text == "waiting, 0 ahead",
                 message=f"no place in line shown: {element(driver, 'stats').text!r}")
            assert health(server)["waiting"] == 1 and assistant_texts(driver) == [""]
        wait(driver, lambda: assistant_texts(driver) == ["Paris."] and element(driver, "send").is_enabled(),
             message=f"no reply once the row freed: {assistant_texts(driver)} {element(driver, 'error').text!r}")
    finally:
        server.stop()
