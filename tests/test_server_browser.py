"""The chat page in a real headless browser (Debian's chromium driven by Playwright).

scripts/setup-browser.sh installs both; without chromium these tests skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CannedHandler, http_server
from tests.test_server import PROMPTS, reference, serve_runtime, wait_until

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(
        "no /usr/bin/chromium: run scripts/setup-browser.sh (apt chromium + playwright)", allow_module_level=True
    )
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: scripts/setup-browser.sh"
)
pytest.importorskip("fastapi")

BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.problems = problems  # type: ignore[attr-defined]
    yield page
    context.close()


def open_chat(page, url: str, *, temperature: str = "0", max_tokens: str = "10") -> None:
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llama'")
    page.click("#toggle-settings")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def ignore_eos(page) -> None:
    """The page's chat requests ask the server to go on past the end-of-text token (the tiny random model may
    sample it at once), so a reply is still streaming when the test acts on it."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.continue_(post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})),
    )


def say(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_a_conversation_streams_and_is_kept_in_the_page(page, runtime):
    first = reference(runtime, PROMPTS[0], 10)
    with serve_runtime(runtime, max_running=2) as live:
        open_chat(page, live.url)
        say(page, PROMPTS[0])
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert page.inner_text(".msg.user") == PROMPTS[0]
        conversation = page.evaluate("conversation")
        assert conversation == [
            {"role": "user", "content": PROMPTS[0]},
            {"role": "assistant", "content": first.text},
        ]
        # The second turn sends the whole conversation: the server sees both earlier messages.
        say(page, "and then?")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
        assert len(page.evaluate("conversation")) == 4
        assert live.engine.snapshot().prompt_tokens > 2 * first.stats.prompt_tokens
        # New chat forgets it.
        page.click("#new-chat")
        assert page.evaluate("conversation") == []
        assert page.query_selector_all(".msg") == []
    assert page.problems == []  # type: ignore[attr-defined]


def test_the_stop_button_cancels_on_the_server(page, runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        cancelled: list[int] = []
        real_cancel = slow.engine.cancel
        slow.engine.cancel = lambda handle: (cancelled.append(handle.id), real_cancel(handle))
        open_chat(page, slow.url, temperature="0.7", max_tokens="100")
        # The tiny random model's vocabulary is small enough that it may sample its end-of-text token
        # before Stop is pressed; the request asks the server to ignore it. (The CI failures blamed on that
        # were a pending repaint wiping the "stopped" note: fixed in the page.)
        ignore_eos(page)
        say(page, "tell me a long story")
        page.wait_for_function("() => document.body.dataset.state === 'streaming'")
        page.wait_for_function(
            "() => conversation.length === 1 && document.querySelector('.msg.assistant').textContent"
        )
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert "stopped" in page.inner_text(".msg.assistant .note")
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)
        assert len(cancelled) == 1
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        # What was shown stays in the conversation.
        assert page.evaluate("conversation")[1]["role"] == "assistant"


def test_new_chat_during_a_reply_starts_empty(page, runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        open_chat(page, slow.url, temperature="0.7", max_tokens="100")
        sent: list[list[dict]] = []

        def forward(route):
            body = {**route.request.post_data_json, "ignore_eos": True}  # still streaming when we click
            sent.append(body["messages"])
            route.continue_(post_data=json.dumps(body))

        page.route("**/v1/chat/completions", forward)
        say(page, "tell me a long story")
        page.wait_for_function("() => document.querySelector('.msg.assistant')?.textContent")
        page.click("#new-chat")
        page.wait_for_function("() => document.body.dataset.state === 'idle'")
        # The cut-short reply ended after the click: it must not join the new conversation.
        assert page.evaluate("conversation") == []
        page.fill("#max-tokens", "2")
        say(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert sent[-1] == [{"role": "user", "content": "hello"}]


def test_a_streaming_reply_leaves_a_reader_who_scrolled_up_where_they_are(page, runtime):
    page.set_viewport_size({"width": 800, "height": 320})  # with Settings open, room for a few lines only
    grown = "(n) => document.querySelectorAll('.msg.assistant')[1].textContent.length > n"
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        open_chat(page, slow.url, temperature="0.7", max_tokens="60")
        reply_with(page, "\n\n".join("abcdefgh"))  # a first answer taller than the room, in few tokens
        say(page, "a long first answer")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        page.unroute("**/v1/chat/completions")
        ignore_eos(page)
        say(page, "go on")
        page.wait_for_function(grown, arg=0)
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        shown = page.evaluate("document.querySelectorAll('.msg.assistant')[1].textContent.length")
        page.wait_for_function(grown, arg=shown + 5)
        assert page.evaluate("document.getElementById('messages').scrollTop") == 0
        # Back at the end, the reply is followed again.
        page.evaluate("document.getElementById('messages').scrollTop = 1e9")
        shown = page.evaluate("document.querySelectorAll('.msg.assistant')[1].textContent.length")
        page.wait_for_function(grown, arg=shown + 5)
        page.wait_for_function("atBottom")
        page.wait_for_function("() => document.body.dataset.state === 'idle'")


def test_errors_are_shown_and_the_key_is_asked_for(page, runtime):
    with serve_runtime(runtime, api_key="sesame") as guarded:
        page.goto(guarded.url + "/")
        page.wait_for_function("() => document.getElementById('model').textContent.includes('API key')")
        assert page.is_visible("#api-key")
        say(page, "hi")
        page.wait_for_selector(".msg.error")
        assert page.inner_text(".msg.error") == "this server needs an API key: enter it in Settings"
        assert page.evaluate("conversation") == []
        page.fill("#api-key", "open sesame")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("() => document.getElementById('model').textContent.includes('refused')")
        say(page, "hi")
        page.wait_for_function("() => document.querySelectorAll('.msg.error').length === 2")
        assert page.inner_text(".msg.error >> nth=1") == "the server refused the API key: check it in Settings"
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llama'")
        page.fill("#max-tokens", "3")
        say(page, "hi")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert len(page.evaluate("conversation")) == 2


def test_a_refused_question_goes_back_to_the_box(page, runtime):
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        say(page, PROMPTS[0])
        page.wait_for_selector(".msg.assistant[data-state=done]")
        too_long = " ".join(["word"] * 300)  # over the tiny model's 128-token context: a 400
        say(page, too_long)
        page.wait_for_selector(".msg.error")
        assert "context" in page.inner_text(".msg.error") and "New chat" in page.inner_text(".msg.error")
        # The page shows the conversation the server will see, and the question is there to shorten and resend.
        assert [question.inner_text() for question in page.query_selector_all(".msg.user")] == [PROMPTS[0]]
        assert len(page.evaluate("conversation")) == 2
        assert page.input_value("#input") == too_long
        assert page.is_enabled("#send")


def streamed(text: str) -> str:
    """The event stream of a chat reply of `text`, a few characters a chunk, as the server sends it."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i : i + 3]}}]} for i in range(0, len(text), 3)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def reply_with(page, text: str) -> None:
    """Every chat request gets `text` as its reply."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=streamed(text)),
    )


def reply_and_record(page, text: str) -> list[dict]:
    """Every chat request gets `text` as its reply; the list fills with the requests' bodies."""
    sent: list[dict] = []

    def answer(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=streamed(text))

    page.route("**/v1/chat/completions", answer)
    return sent


def test_a_question_keeps_its_first_lines_indentation(page, runtime):
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        sent = reply_and_record(page, "ok")
        page.fill("#system", "\n  Answer in code.  \n")
        say(page, "\n  \n    def f():\n        return 1  \n\n")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        code = "    def f():\n        return 1"  # was "def f():\n        return 1"
        assert sent[0]["messages"] == [
            {"role": "system", "content": "  Answer in code."},
            {"role": "user", "content": code},
        ]
        assert page.evaluate("document.querySelector('.msg.user').textContent") == code
        # A question of only whitespace is still not sent (the page sends, or not, as Enter is pressed).
        say(page, " \n\t\n  ")
        assert len(page.query_selector_all(".msg.user")) == 1 and page.input_value("#input") == " \n\t\n  "
        assert len(sent) == 1


@pytest.mark.parametrize("event", ["{'choices': []}", "null", '{"choices": [{"delta": {"content": "cut'])
def test_an_unreadable_event_is_named_and_the_reply_so_far_kept(page, runtime, event):
    body = streamed("Hello there").replace("data: [DONE]", f"data: {event}\n\ndata: [DONE]")
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
        )
        say(page, "hi")
        page.wait_for_selector(".msg.error")
        # Was the browser's own words: "Expected property name or '}' in JSON at position 1 (line 1 column 2)".
        assert page.inner_text(".msg.error") == "the server sent an event the page cannot read; the reply stops here"
        page.wait_for_selector(".msg.assistant[data-state=done]")
        assert page.inner_text(".msg.assistant") == "Hello there"
        assert page.evaluate("conversation")[1] == {"role": "assistant", "content": "Hello there"}
    assert page.problems == []  # type: ignore[attr-defined]


def reload(page) -> None:
    page.reload()
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llama'")


def test_a_reload_keeps_the_conversation_until_new_chat(page, runtime):
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        sent = reply_and_record(page, "**Hi** there")
        say(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        reload(page)  # was an empty page: the conversation lived in a variable
        turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "**Hi** there"}]
        assert page.evaluate("conversation") == turn
        assert page.inner_text(".msg.user") == "hello"
        assert page.inner_html(".msg.assistant") == "<p><strong>Hi</strong> there</p>"
        # The next question goes out with the restored conversation.
        say(page, "and?")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-state=done]').length === 2")
        assert sent[-1]["messages"] == [*turn, {"role": "user", "content": "and?"}]
        other = page.context.new_page()  # another tab has its own conversation: it neither sees nor replaces this one
        try:
            other.goto(live.url)
            other.wait_for_function("() => typeof conversation !== 'undefined'")
            assert other.evaluate("conversation") == []
        finally:
            other.close()
        page.click("#new-chat")
        reload(page)
        assert page.evaluate("conversation") == [] and page.query_selector_all(".msg") == []
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_reply_streaming_when_the_page_reloads_is_kept_as_far_as_it_got(page, runtime):
    with serve_runtime(runtime, delay=0.05, max_running=1) as slow:
        open_chat(page, slow.url, temperature="0.7", max_tokens="100")
        ignore_eos(page)
        say(page, "tell me a long story")
        page.wait_for_function("() => streamingReply && streamingReply.length > 5")
        so_far = page.evaluate("streamingReply")
        reload(page)
        question, reply = page.evaluate("conversation")
        assert question == {"role": "user", "content": "tell me a long story"}
        assert reply["role"] == "assistant" and reply["content"].startswith(so_far)
        assert page.inner_text(".msg.assistant .note") == "the page was reloaded before this reply ended"
        assert wait_until(lambda: slow.engine.snapshot().running == 0, 10)  # the reload ended the request


def test_what_is_stored_is_bounded_and_a_full_storage_never_stops_the_page(page, runtime):
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        # Three turns of 900,000 characters each: past the bound, the oldest turn is left out.
        page.evaluate(
            """() => {
                for (const mark of "abc") conversation.push(
                    { role: "user", content: mark.repeat(900000) }, { role: "assistant", content: mark });
                saveConversation();
            }"""
        )
        stored = page.evaluate("JSON.parse(sessionStorage.getItem('gptcli-conversation')).messages")
        assert [(m["role"], m["content"][0]) for m in stored] == [("user", "b"), ("assistant", "b")] * 1 + [
            ("user", "c"),
            ("assistant", "c"),
        ]
        # Storage that another key has filled: the newest turns that fit are kept, and nothing throws.
        page.click("#new-chat")
        room = page.evaluate(
            """() => {
                const fillers = {};
                for (let size = 1 << 24; size >= 16; ) {
                    const key = "filler" + Object.keys(fillers).length;
                    try { sessionStorage.setItem(key, "x".repeat(size)); fillers[key] = size; }
                    catch (_) { size >>= 1; }
                }
                const [key] = Object.entries(fillers).find(([key, size]) => size === 1 << 18);
                sessionStorage.removeItem(key);
                let fits = 0;  // how many characters fit now, as the browser counts them
                for (let step = 1 << 20; step >= 1; step >>= 1) {
                    try { sessionStorage.setItem("probe", "x".repeat(fits + step)); fits += step; } catch (_) {}
                }
                sessionStorage.removeItem("probe");
                return fits;
            }"""
        )
        reply_with(page, "ok")
        for n, mark in enumerate("abc"):  # each turn 40 % of the room: the three do not fit
            say(page, mark * int(room * 0.4))
            page.wait_for_function("(n) => conversation.length === n && !controller", arg=2 * n + 2)
        reload(page)
        kept = page.evaluate("conversation")
        assert 0 < len(kept) < 6 and kept[0]["role"] == "user" and kept[-2]["content"][0] == "c"
    assert page.problems == []  # type: ignore[attr-defined]


def test_a_wide_code_block_scrolls_inside_its_message_on_a_phone(page, runtime):
    page.set_viewport_size({"width": 375, "height": 640})
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        table = "| " + " | ".join(["column"] * 30) + " |\n" + "|---" * 30 + "|\n"
        reply_with(
            page, "Here:\n```python\nx = '" + "a" * 300 + "'\n```\nand a long line " + "b" * 300 + "\n\n" + table
        )
        say(page, "a wide answer please")
        page.wait_for_selector(".msg.assistant[data-state=done]")
        # The message fits the screen, so its prose can be read; the code line scrolls inside its block.
        assert page.evaluate("document.querySelector('.msg.assistant').getBoundingClientRect().right") <= 375
        assert page.evaluate("(pre => pre.scrollWidth > pre.clientWidth)(document.querySelector('.msg pre'))")
        assert page.evaluate("(table => table.scrollWidth > table.clientWidth)(document.querySelector('.msg table'))")


def test_a_server_that_cannot_be_reached_is_named(page, runtime):
    with serve_runtime(runtime) as live:
        open_chat(page, live.url)
        page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
        say(page, "hello?")
        page.wait_for_selector(".msg.error")
        assert "cannot reach the server" in page.inner_text(".msg.error")
        assert "gptcli serve" in page.inner_text(".msg.error")
        assert page.input_value("#input") == "hello?"


LINK = '<a href="{url}" target="_blank" rel="noopener noreferrer">{label}</a>'
MARKDOWN_CASES = [
    ("**bold** and *it* and `x<y`", "<p><strong>bold</strong> and <em>it</em> and <code>x&lt;y</code></p>"),
    ("- one\n- two", "<ul><li>one</li><li>two</li></ul>"),
    ("1. one\n2. two", "<ol><li>one</li><li>two</li></ol>"),
    ("```py\n<b>x</b> **no**\n```", '<pre><code class="language-py">&lt;b&gt;x&lt;/b&gt; **no**</code></pre>'),
    (
        "[site](https://example.org/a?b=1&c=2)",
        '<p><a href="https://example.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">site</a></p>',
    ),
    ("<script>alert(1)</script>", "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    ('<img src=x onerror="alert(1)">', "<p>&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</p>"),
    ("snake_case_name stays", "<p>snake_case_name stays</p>"),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("```\nunfinished", "<pre><code>unfinished</code></pre>"),
    # A fence's info string may say more than the language; what follows the block is not code.
    ("```bash title=run.sh\necho hi\n```\nafter", '<pre><code class="language-bash">echo hi</code></pre><p>after</p>'),
    ('```js" onclick="x\n1\n```', '<pre><code class="language-js">1</code></pre>'),
    # Emphasis never reaches inside a link's attributes: not its URL, not the target="_blank" it adds.
    ("[a](https://x.org/_y_/*z*)", f"<p>{LINK.format(url='https://x.org/_y_/*z*', label='a')}</p>"),
    ("[docs](https://x.org) is my_ thing", f"<p>{LINK.format(url='https://x.org', label='docs')} is my_ thing</p>"),
    ("*see [it](https://x.org) now*", f"<p><em>see {LINK.format(url='https://x.org', label='it')} now</em></p>"),
    (
        "[**b** `c_d_`](https://x.org)",
        f"<p>{LINK.format(url='https://x.org', label='<strong>b</strong> <code>c_d_</code>')}</p>",
    ),
    # GitHub's tables, escaped as everywhere else (were one paragraph of pipes and dashes).
    (
        "| a | b |\n|---|---|\n| 1 | **2** |",
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td><strong>2</strong></td></tr></tbody></table>",
    ),
    (
        "Compare:\nx | y | z\n:-- | :-: | --:\n1 | 2 | 3\nafter",
        '<p>Compare:</p><table><thead><tr><th class="left">x</th><th class="center">y</th><th class="right">z</th>'
        '</tr></thead><tbody><tr><td class="left">1</td><td class="center">2</td><td class="right">3</td></tr>'
        "</tbody></table>"
        "<p>after</p>",
    ),
    (
        '| <script>alert(1)</script> | b |\n|-|-|\n| <img src=x onerror="alert(1)"> | `x\\|y` |',
        "<table><thead><tr><th>&lt;script&gt;alert(1)&lt;/script&gt;</th><th>b</th></tr></thead><tbody><tr>"
        "<td>&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</td><td><code>x|y</code></td></tr></tbody></table>",
    ),
    (
        "| a | b |\n| --- | --- |\n| 1 |\n| 1 | 2 | 3 |",
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td></td></tr>"
        "<tr><td>1</td><td>2</td></tr></tbody></table>",
    ),
    ("| a |\n| --- |", "<table><thead><tr><th>a</th></tr></thead></table>"),
    ("a | b\n---", "<p>a | b<br>---</p>"),  # no "|" in the dashes, and one cell for two: not a table
    ("a | b\n|---|", "<p>a | b<br>|---|</p>"),
    # ~~~ fences (were prose), and fences longer than three marks, closed by as many of the same mark.
    ("~~~python\nx = 1\n```\n~~~\nafter", '<pre><code class="language-python">x = 1\n```</code></pre><p>after</p>'),
    ("````md\n```py\nx\n```\n````", '<pre><code class="language-md">```py\nx\n```</code></pre>'),
    ("~~~\n<b>\n~~~~", "<pre><code>&lt;b&gt;</code></pre>"),
]


def test_the_markdown_renderer_escapes_first(page, runtime):
    with serve_runtime(runtime) as live:
        page.goto(live.url + "/")
        for source, html in MARKDOWN_CASES:
            assert page.evaluate("renderMarkdown", source) == html, source
        # Model text that looks like HTML is shown, never run.
        page.evaluate("addMessage('assistant', '<img src=x onerror=\"window.pwned=1\">')")
        page.evaluate("addMessage('assistant', '| <img src=x onerror=\"window.pwned=1\"> |\\n|---|')")
        assert page.query_selector(".msg.assistant table th")
        assert page.evaluate("window.pwned") is None
        assert page.query_selector(".msg.assistant img") is None


def test_the_page_loads_nothing_from_outside(page, runtime):
    with serve_runtime(runtime) as live:
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        response = page.goto(live.url + "/")
        assert "default-src 'none'" in response.headers["content-security-policy"]
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llama'")
        assert requests and all(url.startswith(live.url) or url.startswith("data:") for url in requests)


def test_only_the_pages_own_script_and_style_run(page, runtime):
    """The CSP allows the page's inline <script> and <style> by hash: injected markup stays inert."""
    with serve_runtime(runtime) as live:
        refused: list[str] = []
        page.on("console", lambda message: "Content Security Policy" in message.text and refused.append(message.text))
        response = page.goto(live.url + "/")
        policy = response.headers["content-security-policy"]
        assert "unsafe-inline" not in policy and "'sha256-" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llama'")
        assert page.evaluate("getComputedStyle(document.getElementById('settings')).display") == "none"
        assert refused == []
        # Markup that reached the DOM without the renderer (a bug there, an extension) runs no handler.
        page.evaluate(
            """() => new Promise((done) => {
                document.getElementById('messages').insertAdjacentHTML('beforeend',
                    '<img id="bait" src="x" onerror="window.pwned = 1"><p id="styled" style="display: none">x</p>');
                document.getElementById('bait').addEventListener('error', done);
            })"""
        )
        assert page.evaluate("window.pwned") is None
        assert page.is_visible("#styled")


def test_setup_script_is_a_no_op_when_everything_is_there():
    script = Path(__file__).resolve().parents[1] / "scripts" / "setup-browser.sh"
    venv = Path(sys.executable).parents[1]
    result = subprocess.run(
        ["bash", str(script)], env={**os.environ, "GPTCLI_VENV": str(venv)}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


@contextlib.contextmanager
def page_elsewhere() -> Iterator[str]:
    """An empty page served by Python's http.server from another loopback port: another origin than the API's."""

    class Blank(CannedHandler):
        def do_GET(self) -> None:
            self.answer(200, b"<!doctype html><title>front end</title>", "text/html")

    with http_server(Blank) as url:
        yield url


ASK_FROM_THE_PAGE = """async ([url, key]) => {
    const headers = {"Content-Type": "application/json", "x-stainless-lang": "js"};
    if (key) headers["Authorization"] = "Bearer " + key;
    const body = JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 3, stream: true});
    try {
        const answer = await fetch(url + "/v1/chat/completions", {method: "POST", headers, body});
        return {status: answer.status, text: await answer.text()};
    } catch (error) {
        return {error: String(error)};
    }
}"""


def test_a_front_end_on_another_origin_works_once_it_is_allowed(page, runtime):
    """A web app served from elsewhere could not use the server at all (403, and no CORS answers to read one)."""
    with page_elsewhere() as front_end:
        page.goto(front_end + "/")
        with serve_runtime(runtime) as closed:
            refused = page.evaluate(ASK_FROM_THE_PAGE, [closed.url, None])
            assert "error" in refused, refused  # the browser hides the 403 from a page it did not allow
        with serve_runtime(runtime, api_key="sesame", allowed_origins=(front_end,)) as open_to_it:
            answered = page.evaluate(ASK_FROM_THE_PAGE, [open_to_it.url, "sesame"])  # preflighted: a key, a header
            assert answered.get("status") == 200 and answered["text"].rstrip().endswith("data: [DONE]"), answered
            unkeyed = page.evaluate(ASK_FROM_THE_PAGE, [open_to_it.url, None])
            assert unkeyed.get("status") == 401 and "API key" in unkeyed["text"], unkeyed
