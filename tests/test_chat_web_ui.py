"""The chat page (picochat/web/ui.html) in a real headless browser (Chromium via Selenium and the
system chromedriver) against the real `picochat chat-web` over the tiny base checkpoint: health
indicator, a streamed answer, editing a message (a branch), regenerating an answer, slash commands
and what the page sends. What the tiny model cannot be made to write (tool calls, HTML in an answer,
errors, a 401) comes from a stub of fetch inside the page, so the page's own stream parsing and
rendering run on it; the Markdown renderer is also called directly on hostile text.

Skips only when no browser or driver is found: `apt-get install chromium chromium-driver` and
`pip install selenium` provide them."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, free_port


def find_browser():
    """(chromium binary, chromedriver binary, None), or (None, None, why not)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "selenium is not installed (pip install selenium)"
    names = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    binary = os.environ.get("PICOCHAT_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)
    if not binary:
        return None, None, "no Chromium/Chrome binary found (apt-get install chromium, or set PICOCHAT_CHROMIUM)"
    driver = os.environ.get("PICOCHAT_CHROMEDRIVER") or shutil.which("chromedriver")
    if not driver:
        return None, None, "no chromedriver found (apt-get install chromium-driver, or set PICOCHAT_CHROMEDRIVER)"
    return binary, driver, None


CHROMIUM, CHROMEDRIVER, NO_BROWSER = find_browser()
pytestmark = pytest.mark.skipif(NO_BROWSER is not None, reason=f"no headless browser: {NO_BROWSER}")

MAX_TOKENS = 40  # the server's default answer length (-m), which the page must pick up from /health


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(base_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("chat_web_ui") / "home"
    shutil.copytree(base_home, home)
    port = free_port()
    env = {**os.environ, "PICOCHAT_HOME": str(home), "OMP_NUM_THREADS": "1", "PICOCHAT_DTYPE": "float32"}
    env.pop("PICOCHAT_API_KEY", None)
    log_path = home / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "picochat", "chat-web", "-i", "base", "-p", str(port),
                             "--device-type", "cpu", "-m", str(MAX_TOKENS)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if get_json(url + "/health").get("ready"):
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.close()
            pytest.fail("chat-web did not come up:\n" + log_path.read_text()[-3000:])
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--no-first-run", "--disable-extensions", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


def wait(driver, condition, what, timeout=20):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())
    except TimeoutException:
        errors = [e.text for e in css_all(driver, "#messages .error, #banner")]
        pytest.fail(f"timed out waiting for {what}; errors shown: {errors}")


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def css_all(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda: css(driver, "#status").get_attribute("data-state") == "ready", "the health indicator")


def type_in(driver, text):
    from selenium.webdriver.common.keys import Keys

    box = css(driver, "#input")
    box.send_keys(text + Keys.ENTER)


def wait_idle(driver):
    wait(driver, lambda: not driver.execute_script("return window.picochat.generating()"), "the answer to finish")
    assert not css(driver, "#stop").is_displayed() and css(driver, "#send").is_displayed()
    assert not css_all(driver, "#messages .error"), [e.text for e in css_all(driver, "#messages .error")]


def roles(driver):
    return [m["role"] for m in driver.execute_script("return window.picochat.messages()")]


def assistant_text(driver):
    return css(driver, "#messages .msg.assistant .body").text.strip()


def test_chat_edit_and_regenerate_against_the_server(server, browser):
    from selenium.webdriver.common.keys import Keys

    d = browser
    open_page(d, server)
    health = get_json(server + "/health")
    assert css(d, "#model").text == health["model"] and health["model"]
    assert "max tokens 40" in css(d, "#settings").text  # the server's -m, read from /health
    assert "ready" in css(d, "#status").text

    d.execute_script("window.picochat_sent = []; const f = window.fetch; window.fetch = function (u, o) {"
                     " if (o && o.body) window.picochat_sent.push(JSON.parse(o.body)); return f(u, o); };")
    # greedy, so the tiny model's answers are the same every run
    type_in(d, "/temperature 0")
    type_in(d, "The river flows")
    wait(d, lambda: css_all(d, "#messages .msg.assistant"), "an assistant message")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"]
    assert assistant_text(d), "no assistant text appeared"
    assert css(d, "#messages .msg.user .bubble").text == "The river flows"
    first = d.execute_script("return window.picochat_sent")[-1]
    assert first["messages"] == [{"role": "user", "content": "The river flows"}]
    assert (first["temperature"], first["top_k"], first["max_tokens"]) == (0, health["defaults"]["top_k"], 40)

    # a follow-up sends the whole conversation
    type_in(d, "And then?")
    wait(d, lambda: len(roles(d)) == 4, "the second answer")
    wait_idle(d)
    sent = d.execute_script("return window.picochat_sent")[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and sent[2]["content"] == "And then?"

    # edit the first message: the conversation is cut there and the edit is sent (a branch)
    css_all(d, "#messages .msg.user .bubble")[0].click()
    editor = wait(d, lambda: css_all(d, "#messages .msg.user .editor textarea"), "the editor")[0]
    assert editor.get_attribute("value") == "The river flows"
    editor.send_keys(Keys.CONTROL, "a")
    editor.send_keys("The city was" + Keys.ENTER)
    wait(d, lambda: css_all(d, "#messages .msg.assistant"), "the edited message's answer")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"]
    assert [b.text for b in css_all(d, "#messages .msg.user .bubble")] == ["The city was"]
    assert assistant_text(d)
    assert d.execute_script("return window.picochat_sent")[-1]["messages"] == [
        {"role": "user", "content": "The city was"}]

    # click the answer: it is generated again, from the same conversation
    old = css(d, "#messages .msg.assistant")
    css(d, "#messages .msg.assistant .body").click()
    wait(d, lambda: old not in css_all(d, "#messages .msg.assistant") and css_all(d, "#messages .msg.assistant"),
         "the regenerated answer")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"] and assistant_text(d)
    assert len(d.execute_script("return window.picochat_sent")) == 4

    # Stop: a long answer, stopped at once; the server gets its worker back
    type_in(d, "/maxtokens 4096")
    type_in(d, "Once upon a time")
    wait(d, lambda: css(d, "#stop").is_displayed(), "the Stop button")
    css(d, "#stop").click()
    wait(d, lambda: not d.execute_script("return window.picochat.generating()"), "the stop")
    assert not css(d, "#stop").is_displayed()
    shown = " ".join(e.text for e in css_all(d, "#messages .meta, #messages .note"))
    assert "stopped" in shown.lower(), "the answer was not stopped"  # a greedy answer here runs ~600 tokens
    wait(d, lambda: get_json(server + "/health")["available_workers"] == health["available_workers"],
         "the worker to be free again", timeout=15)

    # New conversation (the button; Ctrl+Shift+N below)
    css(d, "#new-chat").click()
    assert roles(d) == [] and not css_all(d, "#messages > *") and css(d, "#welcome").is_displayed()


def test_slash_commands(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    d = browser
    open_page(d, server)
    type_in(d, "/help")
    help_text = css_all(d, "#messages .note")[-1].text
    for command in ("/temperature", "/topk", "/maxtokens", "/clear", "/help"):
        assert command in help_text
    assert roles(d) == []  # commands are not messages

    type_in(d, "/temperature 0.5")
    assert d.execute_script("return window.picochat.settings()")["temperature"] == 0.5
    assert "temperature 0.5" in css(d, "#settings").text
    type_in(d, "/temperature")
    assert "0.5" in css_all(d, "#messages .note")[-1].text
    for bad in ("/temperature 3", "/topk 1.5", "/topk 201", "/maxtokens 0", "/maxtokens x"):
        type_in(d, bad)
        assert "bad" in css_all(d, "#messages .note")[-1].get_attribute("class"), bad
    type_in(d, "/topk 7")
    type_in(d, "/maxtokens 12")
    type_in(d, "/nonsense")
    assert "Unknown command" in css_all(d, "#messages .note")[-1].text
    assert d.execute_script("return window.picochat.settings()") == {"temperature": 0.5, "top_k": 7,
                                                                     "max_tokens": 12}
    assert css(d, "#input").get_attribute("value") == ""

    # Shift+Enter is a new line, and the box grows with it
    box = css(d, "#input")
    height = box.size["height"]
    box.send_keys("line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two", Keys.SHIFT, Keys.ENTER, Keys.NULL,
                  "line three")
    assert box.get_attribute("value") == "line one\nline two\nline three" and roles(d) == []
    assert box.size["height"] > height
    box.send_keys(Keys.ENTER)
    wait(d, lambda: css_all(d, "#messages .msg.assistant"), "an answer")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"]

    ActionChains(d).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("n").key_up(Keys.SHIFT) \
        .key_up(Keys.CONTROL).perform()
    assert roles(d) == []
    type_in(d, "/clear")
    assert not css_all(d, "#messages > *")


# A stub of fetch for /chat/completions inside the page: answers with STUB.status and STUB.body
# (a JSON error) or streams STUB.events (each a JSON-able object) in 5-byte chunks, with CRLF
# separators when STUB.crlf; with STUB.hold the stream stays open until the request is aborted.
# With STUB.key, requests without "Authorization: Bearer <key>" get 401. Records every request.
STUB = """
window.stubRequests = [];
const realFetch = window.fetch;
window.fetch = function (url, options) {
  if (String(url).indexOf("chat/completions") === -1) return realFetch(url, options);
  const s = window.STUB, headers = Object.assign({}, options.headers || {});
  window.stubRequests.push({url: String(url), headers: headers, body: JSON.parse(options.body)});
  const json = (status, obj) => Promise.resolve(new Response(JSON.stringify(obj),
    {status: status, headers: {"Content-Type": "application/json"}}));
  if (s.key && headers.Authorization !== "Bearer " + s.key)
    return json(401, {error: {message: "missing or wrong API key", type: "authentication_error"}});
  if (s.status) return json(s.status, s.body);
  const sep = s.crlf ? "\\r\\n\\r\\n" : "\\n\\n";
  const bytes = new TextEncoder().encode(s.events.map(e => "data: " + JSON.stringify(e) + sep).join(""));
  const body = new ReadableStream({start(c) {
    for (let i = 0; i < bytes.length; i += 5) c.enqueue(bytes.slice(i, i + 5));
    if (!s.hold) c.close();
    else options.signal.addEventListener("abort", () => c.error(new DOMException("aborted", "AbortError")));
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}}));
};
"""

ANSWER = [
    {"token": "Sure: **bold** and ", "gpu": 0, "part": "text"},
    {"token": "<script>window.pwned=1</script> <img src=x onerror=\"window.pwned=2\"> é🙂\n", "gpu": 0,
     "part": "text"},
    {"token": "print(", "gpu": 0, "part": "python"},
    {"token": "6*7)", "gpu": 0, "part": "python"},
    {"token": "42", "gpu": 0, "part": "output"},
    {"token": "\nSo 42.", "gpu": 0, "part": "text"},
    {"done": True},
]


def stub(d, **settings):
    d.execute_script("window.STUB = arguments[0];", {"events": ANSWER, **settings})


def test_stream_parts_errors_stop_and_api_key_with_a_stubbed_fetch(server, browser):
    d = browser
    open_page(d, server)
    d.execute_script(STUB)
    stub(d, crlf=True)
    type_in(d, "hi")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"]
    body = css(d, "#messages .msg.assistant .body")
    boxes = css_all(d, "#messages .msg.assistant .body > *")
    assert [b.get_attribute("class") for b in boxes] == ["part", "tool tool-call", "tool tool-output", "part"]
    assert css(d, ".tool-call .label").text.lower() == "python" and css(d, ".tool-call pre").text == "print(6*7)"
    assert css(d, ".tool-output .label").text.lower() == "output" and css(d, ".tool-output pre").text == "42"
    assert css(d, ".tool-call pre").value_of_css_property("font-family") != body.value_of_css_property("font-family")
    text = boxes[0].text
    assert "<script>window.pwned=1</script>" in text and '<img src=x onerror="window.pwned=2">' in text
    assert "é🙂" in text and css(d, "#messages strong").text == "bold"
    assert not css_all(d, "#messages script, #messages img")
    assert d.execute_script("return window.pwned") is None
    assert "gpu 0" in css(d, "#messages .msg.assistant .meta").text
    content = d.execute_script("return window.picochat.messages()")[1]["content"]
    assert content == ("Sure: **bold** and <script>window.pwned=1</script> <img src=x onerror=\"window.pwned=2\"> "
                       "é🙂\n<|python_start|>print(6*7)<|python_end|><|output_start|>42<|output_end|>\nSo 42.")

    # an error mid-stream: the text so far stays, the error shows
    stub(d, events=[{"token": "half an ans", "gpu": 0, "part": "text"}, {"error": {"message": "worker died"}}])
    type_in(d, "more")
    wait(d, lambda: css_all(d, "#messages .error"), "the error bubble")
    assert "worker died" in css(d, "#messages .error").text
    assert roles(d) == ["user", "assistant"] * 2 and "half an ans" in css_all(d, ".msg.assistant")[-1].text

    # busy (503): the message comes back to the input box and leaves the conversation
    css(d, "#new-chat").click()
    stub(d, status=503, body={"error": {"message": "all workers are busy", "type": "server_error",
                                        "param": None, "code": None}})
    type_in(d, "are you there?")
    wait(d, lambda: css_all(d, "#messages .error"), "the busy message")
    assert "server busy, try again" in css(d, "#messages .error").text.lower()
    assert roles(d) == [] and css(d, "#input").get_attribute("value") == "are you there?"
    css(d, "#input").clear()

    # another error (400) shows the server's message
    stub(d, status=400, body={"error": {"message": "messages[0] has empty content", "type": "invalid_request_error",
                                        "param": "messages", "code": None}})
    type_in(d, "x")
    wait(d, lambda: len(css_all(d, "#messages .error")) == 2, "the error message")
    assert "messages[0] has empty content" in css_all(d, "#messages .error")[-1].text
    css(d, "#new-chat").click()

    # Stop: the fetch is aborted, the partial answer kept
    stub(d, hold=True, events=[{"token": "a long story", "gpu": 0, "part": "text"}])
    type_in(d, "tell me a story")
    wait(d, lambda: "a long story" in css(d, "#messages .msg.assistant").text, "the streamed text")
    assert css(d, "#stop").is_displayed() and not css(d, "#send").is_displayed()
    css(d, "#stop").click()
    wait(d, lambda: not css(d, "#stop").is_displayed(), "Stop to go away")
    assert "stopped" in css(d, "#messages .msg.assistant .meta").text
    assert roles(d) == ["user", "assistant"] and not css_all(d, "#messages .error")

    # a 401 asks for a key, keeps it in sessionStorage and sends it as a bearer token
    css(d, "#new-chat").click()
    stub(d, key="sekrit")
    type_in(d, "hello")
    wait(d, lambda: css(d, "#auth").is_displayed(), "the API key dialog")
    field = css(d, "#auth-key")
    field.send_keys("sekrit\n")
    wait_idle(d)
    assert roles(d) == ["user", "assistant"]
    requests = d.execute_script("return window.stubRequests")
    assert "Authorization" not in requests[-2]["headers"]
    assert requests[-1]["headers"]["Authorization"] == "Bearer sekrit"
    assert d.execute_script("return sessionStorage.getItem('picochat_api_key')") == "sekrit"
    d.execute_script("sessionStorage.clear()")


def test_markdown_renderer_builds_elements_never_html(server, browser):
    d = browser
    open_page(d, server)
    source = ("# Title\n\nSome **bold**, *italic*, `a < b` and snake_case_name.\nSecond line.\n\n"
              "- one\n- two\n  - nested\n\n1. first\n2. second\n\n"
              "```python\nx = '<b>not bold</b>'\n```\n\n"
              "<script>window.pwned = 1</script>\n<img src=x onerror=\"window.pwned = 2\">\n"
              "> quoted <iframe src=\"javascript:alert(1)\"></iframe>")
    result = d.execute_script("""
        const node = window.picochatRenderMarkdown(arguments[0]);
        document.body.appendChild(node);
        const count = s => node.querySelectorAll(s).length;
        return {tags: Array.from(node.querySelectorAll("*"), e => e.tagName.toLowerCase()).sort(),
                text: node.textContent, h1: node.querySelector("h1").textContent,
                strong: node.querySelector("strong").textContent, em: count("em"),
                code: node.querySelector("p code").textContent, pre: node.querySelector("pre").textContent,
                items: Array.from(node.querySelectorAll("li"), e => e.firstChild.textContent),
                nested: count("ul ul li"), ol: count("ol li"), attrs: Array.from(node.querySelectorAll("*"))
                  .flatMap(e => Array.from(e.attributes, a => a.name)).filter(a => a !== "class")};
    """, source)
    time.sleep(0.3)  # an <img onerror> would have fired by now
    assert d.execute_script("return window.pwned") is None
    allowed = {"div", "h1", "p", "strong", "em", "code", "br", "ul", "ol", "li", "pre", "span", "button", "blockquote"}
    assert set(result["tags"]) <= allowed, result["tags"]
    assert set(result["attrs"]) <= {"type"}, result["attrs"]  # the copy button's type only
    assert result["h1"] == "Title" and result["strong"] == "bold" and result["em"] == 1
    assert result["code"] == "a < b" and result["pre"] == "x = '<b>not bold</b>'"
    assert result["items"] == ["one", "two", "nested", "first", "second"]
    assert result["nested"] == 1 and result["ol"] == 2
    for literal in ("snake_case_name", "<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">',
                    '<iframe src="javascript:alert(1)"></iframe>'):
        assert literal in result["text"]
