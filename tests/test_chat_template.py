"""`--chat-template FILE` (config key chat_template, $GPTCLI_CHAT_TEMPLATE): a Jinja chat template rendered in place
of the model's own, or given to a model without one; the runtime's tokenizer carries it, so every prompt built from
messages (generate, chat, summarize, batch lines, the server's routes and /tokenize) renders it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import gptcli
from gptcli.config import Settings
from gptcli.errors import EXIT_CONFIG, EXIT_USAGE, ChatTemplateRefusal, ConfigError, InputError
from gptcli.prompts import build_prompt, messages_for
from tests.conftest import CHATML, run_cli

ASK = [{"role": "user", "content": "Name a colour."}]
CHATML_TEXT = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
BRACKETS = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
NO_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}" + CHATML


def write(folder: Path, text: str, name: str = "template.jinja") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def open_with(model: Path, template: Path | None) -> Any:
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(model), chat_template=str(template) if template else None), print)


def ids_of(runtime: Any, text: str) -> list[int]:
    return runtime.tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def chatml_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("templates"), CHATML, "chatml.jinja")


@pytest.fixture(scope="module")
def gpt2_chatml(tiny_models, chatml_file) -> Any:
    """The tiny GPT-2, which has no chat template, given ChatML."""
    return open_with(tiny_models["gpt2"], chatml_file)


def test_a_model_without_a_template_renders_the_given_one(tiny_models, gpt2_chatml):
    plain = build_prompt(open_with(tiny_models["gpt2"], None).tokenizer, ASK)
    assert not plain.templated  # its own: the plain transcript
    prompt = build_prompt(gpt2_chatml.tokenizer, ASK)
    assert prompt.templated and prompt.ids == ids_of(gpt2_chatml, CHATML_TEXT)
    assert gpt2_chatml.tokenizer.decode(prompt.ids, skip_special_tokens=False) == CHATML_TEXT


def test_a_model_with_a_template_renders_the_given_one_in_its_place(tiny_models, tmp_path):
    runtime = open_with(tiny_models["llama"], write(tmp_path, BRACKETS))
    prompt = build_prompt(runtime.tokenizer, messages_for("hi", "Be brief."))
    assert prompt.ids == ids_of(runtime, "[system] Be brief.\n[user] hi\n[assistant] ")


def test_a_template_that_refuses_the_messages_is_still_a_refusal_naming_the_file(tiny_models, tmp_path):
    template = write(tmp_path, NO_SYSTEM)
    tokenizer = open_with(tiny_models["gpt2"], template).tokenizer
    with pytest.raises(ChatTemplateRefusal, match=f"^{template}: chat template error: no system messages$"):
        build_prompt(tokenizer, messages_for("hi", "Be brief."))
    assert build_prompt(tokenizer, ASK).templated


MESSAGES = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{{ 'x' * 10**8 }}" + MESSAGES, "a repetition of 100,000,000 items, over 1,048,576"),  # 10 GB when tokenized
        ("{{ [messages] * 10**7 }}" + MESSAGES, "a repetition of 10,000,000 items, over 1,048,576"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "over 2,000,000 lines"),
        ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "it renders over 16,777,216 characters"),
    ],
)
def test_a_template_is_bounded_in_what_it_makes_and_how_long_it_runs(tiny_models, tmp_path, text, says):
    """Each of these ate gigabytes or ran for hours (in the server, holding one of its few worker threads, which no
    client leaving and no SIGTERM could end): a template is code."""
    import time

    from gptcli.errors import InputError

    template = write(tmp_path, text)
    tokenizer = open_with(tiny_models["llama"], template).tokenizer
    started = time.perf_counter()
    with pytest.raises(InputError, match=f"^{template}: the chat template stopped: .*{says}"):
        build_prompt(tokenizer, ASK)
    assert time.perf_counter() - started < 30
    assert build_prompt(open_with(tiny_models["llama"], write(tmp_path, MESSAGES, "ok.jinja")).tokenizer, ASK).templated


DOUBLING = "{% set x = namespace(s='a') %}{% for i in range(40) %}{% set x.s = x.s OP x.s %}{% endfor %}"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (DOUBLING.replace("OP", "~"), "a text of 33,554,432 characters"),
        (DOUBLING.replace("OP", "+"), "a concatenation of 33,554,432 characters"),
        (
            "{% set x = namespace(s='a') %}{% for i in range(40) %}{% set y %}{{ x.s }}{{ x.s }}{% endset %}"
            "{% set x.s = y %}{% endfor %}",
            "a text of",
        ),  # a {% set %} block
        (
            "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{% set x = namespace(s='a') %}"
            "{% for i in range(40) %}{% set x.s = twice(x.s) %}{% endfor %}",
            "a text of",
        ),
        ("{{ 'a'.ljust(2000000000) }}", "a ljust 2,000,000,000 wide"),
        ("{{ 'a'.zfill(10**9) }}", "a zfill 1,000,000,000 wide"),
        ("{{ ('\t' * 1000).expandtabs(10**6) }}", "an expandtabs of 1,000,001,000 characters"),
        ("{{ ('a' * 10**6).replace('a', 'a' * 1000) }}", "a replace of 1,000,000,000 characters"),
        ("{{ '{:>1000000000}'.format('a') }}", "a formatted field 1,000,000,000 wide"),
        ("{{ '%1000000000s' % 'a' }}", "a formatted field 1,000,000,000 wide"),
        ("{{ '%*s' % (10**9, 'a') }}", "a formatted field 1,000,000,000 wide"),
        ("{{ '%1000000000s'|format('a') }}", "a formatted field 1,000,000,000 wide"),
        ("{{ 'a'|center(10**9) }}", "a center 1,000,000,000 wide"),
        ("{{ ('a\n' * 10**5)|indent(10**5) }}", "an indent of"),
        ("{{ (['a' * 10**6] * 1000)|join }}", "a join of 1,000,000,000 characters"),
        ("{{ ('a' * 10**6)|replace('a', 'a' * 100) }}", "a replace of 100,000,000 characters"),
        ("{{ [1]|batch(10**9, 0)|list }}", "a batch of 1,000,000,000 items"),
        ("{{ [1]|slice(10**9)|list }}", "a slice into parts of 1,000,000,000 items"),
        ("{{ messages|tojson(indent=10**9) }}", "a tojson indent of 1,000,000,000"),
        ("{{ messages|tojson(indent=' ' * 10**6) }}", "a tojson indent of 1,000,000"),
    ],
)
def test_every_way_a_template_builds_a_value_is_bounded_before_it_is_made(tiny_models, tmp_path, text, says):
    """QA: only `*` was bounded. A doubling loop with `~` (or `+`, a set block, a macro) took 3.8 GB at range(31)
    and 20 GB (killed) at range(40); 'a'.ljust(2e9), '%1000000000s' % 'a' and the like 2.6-4.5 GB before the
    render's size check saw their output."""
    import resource

    template = write(tmp_path, text + MESSAGES)
    tokenizer = open_with(tiny_models["llama"], template).tokenizer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=f"^{re.escape(str(template))}: the chat template stopped: .*{says}"):
        build_prompt(tokenizer, ASK)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB: under 512 MB more


def test_tojson_takes_transformers_arguments_in_its_order(tiny_models, tmp_path):
    """QA: sort_keys and separators were dropped, and a positional argument was the indent (transformers':
    ensure_ascii)."""
    text = (
        "{{ {'b': 1, 'a': 'é'}|tojson(sort_keys=true) }}|{{ {'b': 1, 'a': 'é'}|tojson(separators=(',', ':')) }}|"
        "{{ 'é'|tojson(true) }}|{{ [1]|tojson(indent=1) }}"
    )
    tokenizer = open_with(tiny_models["llama"], write(tmp_path, text)).tokenizer
    assert tokenizer.render_chat(ASK) == '{"a": "é", "b": 1}|{"b":1,"a":"é"}|"\\u00e9"|[\n 1\n]'


def test_bounded_templates_still_render_what_real_ones_do(tiny_models, tmp_path):
    text = (
        "{% set sep = ', ' %}{{ messages|map(attribute='content')|join(sep) }}|{{ 'x'.ljust(5, '.') }}|"
        "{{ '%5s' % 'ab' }}|{{ '{:>4}'.format('c') }}|{{ 'a b'|replace(' ', '-') }}|{{ 'a' ~ 'b' ~ 1 }}|"
        "{{ 'q'|center(5) }}|{{ messages|tojson(indent=2)|length > 0 }}|{% set b %}in{% endset %}{{ b }}"
    )
    tokenizer = open_with(tiny_models["llama"], write(tmp_path, text)).tokenizer
    assert tokenizer.render_chat(ASK) == "Name a colour.|x....|   ab|   c|a-b|ab1|  q  |True|in"


def test_a_templates_bounds_leave_a_debuggers_trace_function_in_place(tiny_models, tmp_path):
    import sys

    tokenizer = open_with(tiny_models["llama"], write(tmp_path, MESSAGES)).tokenizer

    def tracer(frame: Any, event: str, arg: Any) -> None:
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        assert build_prompt(tokenizer, ASK).templated
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(before)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{% for m in messages %}\n{{ m.content }\n{% endfor %}", r":2: not a valid chat template: unexpected '}'$"),
        ("{% if x %}\nno end", r":2: not a valid chat template: Unexpected end of template"),
        ("{% for m in messages %}{% break %}{% endfor %}", None),  # loop controls: as transformers renders them
        ("  \n", " is empty$"),
        ("\x00binary", "looks like a binary file"),
    ],
)
def test_a_template_file_is_read_and_compiled_before_use(tmp_path, text, says):
    from gptcli.tokenizer import read_chat_template

    path = write(tmp_path, text)
    if says is None:
        assert read_chat_template(path).text == text
        return
    with pytest.raises(ConfigError, match=says) as caught:
        read_chat_template(path)
    assert str(path) in caught.value.message and "\n" not in caught.value.message
    assert caught.value.exit_code == EXIT_CONFIG


def test_a_missing_template_fails_before_the_model_is_opened(tmp_path):
    """The model does not exist either: the template is checked first (a first use converts a model: minutes)."""
    with pytest.raises(ConfigError, match=f"^chat template: file not found: {tmp_path / 'none.jinja'}$"):
        open_with(tmp_path / "no-model", tmp_path / "none.jinja")


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def live(gpt2_chatml):
    from tests.test_server import serve_runtime

    with serve_runtime(gpt2_chatml, max_running=2) as server:
        yield server


def test_the_server_renders_the_given_template_on_every_route(live, gpt2_chatml):
    httpx = pytest.importorskip("httpx")
    expected = ids_of(gpt2_chatml, CHATML_TEXT)
    assert httpx.post(live.url + "/tokenize", json={"messages": ASK}).json()["tokens"] == expected
    chat = live.client().chat.completions.create(model="default", messages=ASK, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == len(expected)
    counted = live.client().responses.input_tokens.count(model="default", input=ASK[0]["content"])
    assert counted.input_tokens == len(expected)
    response = live.client().responses.create(model="default", input=ASK[0]["content"], max_output_tokens=16)
    assert response.usage.input_tokens == len(expected)


# ------------------------------------------------------------------------------------------------ the CLI


def generate_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = run_cli("generate", *args, "-n", "1", "--temperature", "0", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_generate_takes_it_from_the_flag_the_environment_and_a_config_file(tiny_models, chatml_file, tmp_path):
    model = ["-m", str(tiny_models["gpt2"]), "Name a colour."]
    expected = len(ids_of(open_with(tiny_models["gpt2"], chatml_file), CHATML_TEXT))
    assert generate_json(*model)["templated"] is False
    config = tmp_path / "config.yaml"
    config.write_text(f"chat_template: {chatml_file}\n")
    for args, env in [
        (["--chat-template", str(chatml_file)], None),
        ([], {"GPTCLI_CHAT_TEMPLATE": str(chatml_file)}),
        (["--config", str(config)], None),
    ]:
        reply = generate_json(*model, *args, env=env)
        assert reply["templated"] is True and reply["usage"]["prompt_tokens"] == expected, args or env
    shown = run_cli("config", "show", env={"GPTCLI_CHAT_TEMPLATE": str(chatml_file)}).stdout.decode()
    assert any(
        line.split()[:3] == ["chat_template", str(chatml_file), "$GPTCLI_CHAT_TEMPLATE"] for line in shown.splitlines()
    )


def test_batch_lines_render_it(tiny_models, chatml_file, tmp_path):
    batch = tmp_path / "in.jsonl"
    batch.write_text(json.dumps({"id": "a", "messages": ASK, "max_tokens": 1}) + "\n")
    result = run_cli(
        "generate", "--batch", str(batch), "-m", str(tiny_models["gpt2"]), "--chat-template", str(chatml_file)
    )
    assert result.returncode == 0, result.stderr.decode()
    expected = len(ids_of(open_with(tiny_models["gpt2"], chatml_file), CHATML_TEXT))
    assert json.loads(result.stdout)["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["summarize", "-"], ["serve", "--port", "0"]])
def test_every_command_that_builds_chat_prompts_checks_the_file_first(tmp_path, command):
    bad = write(tmp_path, "{{ messages[0] }\n")
    result = run_cli(*command, "-m", str(tmp_path / "no-model"), "--chat-template", str(bad), input="text\n")
    assert result.returncode == EXIT_CONFIG, result.stderr.decode()
    assert result.stderr.decode().splitlines()[0] == f"error: {bad}:1: not a valid chat template: unexpected '}}'"


def test_generate_raw_reads_no_template_and_says_it_is_ignored_as_system_is(tiny_models, tmp_path):
    """--raw sends the text without a chat template: a broken file was read and refused (exit 3) all the same."""
    bad = write(tmp_path, "{{ messages[0] }\n")
    model = ["-m", str(tiny_models["gpt2"]), "--raw", "Once", "-n", "1", "--temperature", "0"]
    result = run_cli("generate", *model, "--chat-template", str(bad), "--system", "x")
    assert result.returncode == 0, result.stderr.decode()
    said = ["warning: --chat-template is ignored with --raw", "warning: --system is ignored with --raw"]
    assert result.stderr.decode().splitlines() == said
    plain = run_cli("generate", *model)
    assert result.stdout == plain.stdout and plain.stderr == b"", plain.stderr.decode()


def test_generate_raw_quietly_leaves_a_system_and_template_the_config_or_environment_set(tiny_models, tmp_path):
    """Set for chat turns (a config file, GPTCLI_*), not for this command: no warning on every raw completion."""
    bad = write(tmp_path, "{{ messages[0] }\n")
    config = write(tmp_path, f"system: be brief\nchat_template: {bad}\n", "c.yaml")
    model = ["-m", str(tiny_models["gpt2"]), "--raw", "Once", "-n", "1", "--temperature", "0"]
    from_file = run_cli("generate", "-c", str(config), *model)
    from_env = run_cli("generate", *model, env={"GPTCLI_SYSTEM": "be brief", "GPTCLI_CHAT_TEMPLATE": str(bad)})
    plain = run_cli("generate", *model)
    for result in (from_file, from_env):
        assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
        assert result.stdout == plain.stdout


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["summarize", "-"]])
def test_with_url_it_is_a_usage_error(chatml_file, command):
    url = ["--url", "http://127.0.0.1:9/v1"]
    result = run_cli(*command, *url, "--chat-template", str(chatml_file), input="text\n")
    assert result.returncode == EXIT_USAGE, result.stderr.decode()
    assert "--chat-template: not used with --url (the model runs on the server)" in result.stderr.decode()
    assert "hint: drop it, or drop --url to run the model here" in result.stderr.decode()  # one flag: "it" (QA)


# ------------------------------------------------------------------------------------------------ chat


def chat_turn(model: Path, *args: str) -> dict[str, Any]:
    result = run_cli("chat", "-m", str(model), "--jsonl", "-n", "1", "--temperature", "0", *args, input="Hi\n")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def chatml(messages: list[dict[str, Any]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def test_a_saved_chat_keeps_its_template_when_resumed_with_its_model(tiny_models, chatml_file, isolated_home):
    runtime = open_with(tiny_models["gpt2"], chatml_file)
    first = chat_turn(tiny_models["gpt2"], "--chat-template", str(chatml_file))
    assert first["usage"]["prompt_tokens"] == len(ids_of(runtime, chatml([{"role": "user", "content": "Hi"}])))
    saved = next((isolated_home / "data" / "chats").glob("*.json"))
    assert json.loads(saved.read_text())["chat_template"] == str(chatml_file)
    shown = run_cli("chat", "--continue", input="/show\n").stderr.decode()
    assert f"chat template      {chatml_file}" in shown
    resumed = run_cli("chat", "--continue", "--jsonl", "-n", "1", input="Hi\n")
    messages = json.loads(saved.read_text())["messages"][:-1]
    assert json.loads(resumed.stdout)["usage"]["prompt_tokens"] == len(ids_of(runtime, chatml(messages)))
    another = run_cli("chat", "--continue", "-m", str(tiny_models["gpt2"]), input="/show\n").stderr.decode()
    assert "chat template      none: a plain transcript" in another  # the tiny GPT-2 has none


def test_a_relative_template_is_kept_as_its_absolute_path(tiny_models, chatml_file, isolated_home):
    result = run_cli(
        "chat",
        "-m",
        str(tiny_models["gpt2"]),
        "--chat-template",
        chatml_file.name,
        "-n",
        "1",
        input="Hi\n",
        env={"PYTHONPATH": str(Path(gptcli.__file__).parents[1])},  # these sources, from another folder
        cwd=chatml_file.parent,
    )
    assert result.returncode == 0, result.stderr.decode()
    saved = next((isolated_home / "data" / "chats").glob("*.json"))
    assert json.loads(saved.read_text())["chat_template"] == str(chatml_file)


def test_a_resumed_chat_whose_template_is_gone_says_so(tiny_models, tmp_path, isolated_home):
    template = write(tmp_path, CHATML)
    chat_turn(tiny_models["gpt2"], "--chat-template", str(template))
    template.unlink()
    result = run_cli("chat", "--continue", input="Hi\n")
    assert result.returncode == EXIT_CONFIG
    error, hint = result.stderr.decode().splitlines()[-2:]
    assert error.startswith("error: conversation ") and error.endswith(f"'s chat template: file not found: {template}")
    assert hint == "hint: restore it, pass --chat-template FILE, or --model NAME to render with the model's own"


def test_a_chat_file_with_a_chat_template_that_is_no_path_is_refused():
    from gptcli.chat.conversation import Conversation
    from gptcli.errors import InputError

    assert Conversation.from_dict({"messages": [], "chat_template": "/a.jinja"}, "f").chat_template == "/a.jinja"
    with pytest.raises(InputError, match=r"^f: 'chat_template' must be a file's path$"):
        Conversation.from_dict({"messages": [], "chat_template": 3}, "f")


def test_models_info_says_where_the_chat_template_comes_from(tiny_models, chatml_file):
    def origin(model: Path, env: dict[str, str] | None = None) -> Any:
        result = run_cli("models", "info", str(model), "--json", env=env)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)["chat_template"]

    assert origin(tiny_models["gpt2"]) is None
    llama = tiny_models["llama"]
    assert origin(llama) in (str(llama / "chat_template.jinja"), str(llama / "tokenizer_config.json"))
    assert origin(llama, {"GPTCLI_CHAT_TEMPLATE": str(chatml_file)}) == str(chatml_file)
    text = run_cli("models", "info", str(tiny_models["gpt2"])).stdout.decode().splitlines()[-1]
    assert text.split(None, 1) == ["chat_template", "none (a chat is a plain User:/Assistant: transcript)"]
