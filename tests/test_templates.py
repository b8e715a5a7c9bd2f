"""Prompt templates: built-ins, user templates, variables, sampling defaults, `generate --template`."""

import json
import re

import pytest
import yaml

from tests.conftest import run_cli

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend"}


def test_builtins_load_and_render():
    from gptcli.templates import get_template, list_templates

    names = [t.name for t in list_templates()]
    assert names == ["explain", "qa", "summarize", "translate"]
    translate = get_template("translate")
    assert translate.required == ["to"]
    system, user = translate.render("Bonjour {not a field}", {"to": "English"})
    assert "translator" in system
    assert user == "Translate the following text into English.\n\nBonjour {not a field}"
    qa = get_template("qa")
    assert qa.render("The sky is green.", {"question": "What colour?"})[1].endswith("Question: What colour?")
    assert get_template("explain").render("x")[1].startswith("Explain the following to a curious beginner.")


def test_missing_unknown_variables_and_unknown_template():
    from gptcli.errors import UsageError
    from gptcli.templates import get_template, parse_vars

    with pytest.raises(UsageError, match="template 'translate' needs the variable 'to'") as missing:
        get_template("translate").render("hi")
    assert missing.value.hint == "pass --var to=VALUE"
    with pytest.raises(UsageError, match="has no variable 'lang'"):
        get_template("translate").bind({"lang": "fr"})
    with pytest.raises(UsageError, match="unknown template 'translat' \\(did you mean 'translate'\\?\\)"):
        get_template("translat")
    assert parse_vars(["to=French", "x=a=b", "empty="]) == {"to": "French", "x": "a=b", "empty": ""}
    for blank in ("", "  "):  # a required variable has no default: empty is as good as missing
        with pytest.raises(UsageError, match="template 'translate' needs a value for 'to', not an empty one"):
            get_template("translate").render("hi", {"to": blank})
    assert get_template("summarize").bind({"format": ""})["format"] == ""  # a defaulted one may be emptied
    with pytest.raises(UsageError, match="--var expects NAME=VALUE"):
        parse_vars(["nope"])


def test_user_template_overrides_and_is_validated(tmp_path):
    from gptcli.errors import ConfigError
    from gptcli.templates import get_template, list_templates, user_templates_dir

    folder = user_templates_dir()
    assert folder == tmp_path / "xdg-config" / "gptcli" / "templates"
    folder.mkdir(parents=True)
    (folder / "pirate.yaml").write_text(
        "description: Talk like a pirate\nuser: 'Say this as a {who}: {input}'\n"
        "variables:\n  who: pirate\nsampling:\n  temperature: 1.1\n  stop: ['ARR']\n"
    )
    (folder / "summarize.yaml").write_text("user: 'TL;DR {input}'\n")
    pirate = get_template("pirate")
    assert pirate.source == "user" and pirate.sampling == {"temperature": 1.1, "stop": ("ARR",)}
    assert pirate.render("hello")[1] == "Say this as a pirate: hello"
    assert get_template("summarize").user == "TL;DR {input}"
    assert {t.name: t.source for t in list_templates()}["summarize"] == "user"

    bad = {
        "noinput.yaml": ("user: 'no placeholder here'\n", "never uses {input}"),
        "typo.yaml": ("user: '{input}'\nsampling:\n  temprature: 1\n", "sampling -> temprature: unknown key"),
        "range.yaml": ("user: '{input}'\nsampling:\n  top_p: 3\n", "must be in (0, 1]"),
        "braces.yaml": ("user: '{input} {'\n", "invalid placeholder"),
        "extra.yaml": ("user: '{input}'\nprompt: x\n", "prompt: unknown template key"),
        "yaml.yaml": ("user: [unclosed\n", "invalid YAML"),
    }
    for name, (text, message) in bad.items():
        (folder / name).write_text(text)
        with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
            get_template(name.removesuffix(".yaml"))
        (folder / name).unlink()


@pytest.mark.parametrize(
    ("text", "said", "hint"),
    [
        ("description: [1, 2]\n", "description must be text, got [1, 2]", 'description: "..."'),
        ("description: {a: 1}\n", "description must be text, got {'a': 1}", 'description: "..."'),
        ("variables:\n  who: [pirate]\n", "variables.who must be text, got ['pirate']", 'who: "..."'),
        ("variables:\n  who: yes\n", "variables.who must be text, got True", 'who: "..."'),  # was: "True"
    ],
)
def test_a_template_value_that_is_not_text_is_refused_not_turned_into_text(isolated_home, text, said, hint):
    """`description: [1, 2]` was listed and shown as the text '[1, 2]'; a default of `yes` filled {who} with 'True'."""
    from gptcli.templates import user_templates_dir

    folder = user_templates_dir()
    folder.mkdir(parents=True)
    (folder / "odd.yaml").write_text(text + "user: 'Say {input} as {who}'\n")
    result = run_cli("templates", "show", "odd")
    assert result.returncode == 3
    assert result.stderr.decode().splitlines() == [
        f"error: {folder / 'odd.yaml'}: {said}",
        f"hint: write it as text in quotes ({hint})",
    ]


def test_a_template_number_is_text_as_written():
    from gptcli.templates import parse_template

    data = {"description": 2024, "user": "{input} {n}", "variables": {"n": 3, "m": None}}
    template = parse_template("n", data, "n.yaml", "user", None)
    assert template.description == "2024" and template.variables == {"n": "3", "m": None}


@pytest.mark.parametrize("name", [1, True, "my topic", "2nd"])
def test_a_variable_whose_name_no_placeholder_can_use_is_refused(name):
    """YAML's `1:` or `yes:` became the variable "1" / "True": declared, never fillable, silently."""
    from gptcli.errors import ConfigError
    from gptcli.templates import parse_template

    data = {"user": "{input}", "variables": {name: "x"}}
    with pytest.raises(ConfigError, match=f"n.yaml: variables: {re.escape(repr(name))} is not a plain name"):
        parse_template("n", data, "n.yaml", "user", None)


def test_a_template_that_is_not_utf8_is_called_a_template_file(isolated_home):
    """It said 'cannot read config file PATH: not UTF-8 text': the user looked for a config file."""
    from gptcli.templates import user_templates_dir

    folder = user_templates_dir()
    folder.mkdir(parents=True)
    (folder / "latin.yaml").write_bytes("description: café\nuser: '{input}'\n".encode("latin-1"))
    said = f"cannot read template file {folder / 'latin.yaml'}: not UTF-8 text (byte 16)"
    shown = run_cli("templates", "show", "latin")
    assert shown.returncode == 3
    assert shown.stderr.decode().splitlines() == [f"error: {said}", "hint: convert it, e.g. iconv -t UTF-8"]
    listed = run_cli("templates", "list")
    assert listed.returncode == 0 and f"left out: {said}" in listed.stderr.decode()


def test_sampling_defaults_only_replace_defaults():
    from gptcli.config import resolve
    from gptcli.templates import apply_sampling_defaults, get_template

    template = get_template("summarize")
    plain = apply_sampling_defaults(resolve(environ={}), template)
    assert plain.sampling.temperature == 0.3 and plain.sampling.max_tokens == 256
    flagged = apply_sampling_defaults(resolve(environ={}, flags={"sampling.temperature": 0.9}), template)
    assert flagged.sampling.temperature == 0.9 and flagged.sampling.max_tokens == 256


def test_templates_commands(tmp_path):
    listing = json.loads(run_cli("templates", "list", "--json").stdout)
    assert {row["name"]: row["required"] for row in listing}["qa"] == ["question"]
    shown = run_cli("templates", "show", "translate")
    assert shown.returncode == 0 and "Translate the following text into {to}." in shown.stdout.decode()
    # Written as a template file is: the multi-line text a `|-` block, not a quoted string with doubled newlines.
    assert "user: |-\n  Translate the following text into {to}.\n\n  {input}\n" in shown.stdout.decode()
    from gptcli.templates import get_template

    assert yaml.safe_load(shown.stdout) == get_template("translate").to_yaml_dict()
    assert run_cli("templates", "path").stdout.decode().strip() == str(tmp_path / "xdg-config" / "gptcli" / "templates")
    missing = run_cli("templates", "show", "nope")
    assert missing.returncode == 2 and missing.stderr.decode().startswith("error: unknown template 'nope'")
    # One broken user template is left out of the list with a warning; the others still show.
    folder = tmp_path / "xdg-config" / "gptcli" / "templates"
    folder.mkdir(parents=True)
    (folder / "broken.yaml").write_text("user: '{input}'\nsampling:\n  temperature: -1\n")
    (folder / "fine.yaml").write_text("user: 'Fine: {input}'\n")
    listed = run_cli("templates", "list", "--json")
    assert listed.returncode == 0
    assert {"fine", "qa"} <= {row["name"] for row in json.loads(listed.stdout)}
    assert "broken" not in {row["name"] for row in json.loads(listed.stdout)}
    assert listed.stderr.decode().startswith("warning: left out: ") and "broken.yaml" in listed.stderr.decode()
    assert run_cli("templates", "show", "broken").returncode == 3  # asked for by name, it is still an error


def test_generate_with_template(tiny_models):
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    env = {
        **SCRIPTED,
        "GPTCLI_TEST_CONTEXT": "4096",
        "GPTCLI_TEST_SCRIPT": json.dumps([*tok.encode("Bonjour", add_special_tokens=False), 2]),
    }
    args = ["generate", "Hello", "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "--template", "translate"]
    result = run_cli(*args, "--var", "to=French", env=env)
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout)
    from gptcli.prompts import encode_prompt
    from gptcli.templates import get_template

    system, user = get_template("translate").render("Hello", {"to": "French"})
    assert data["usage"]["prompt_tokens"] == len(encode_prompt(tok, user, system=system).ids)

    # A missing variable fails before the model loads (the model path does not even exist).
    missing = run_cli("generate", "Hello", "-m", "/nonexistent", "--template", "translate")
    assert missing.returncode == 2
    assert missing.stderr.decode().splitlines() == [
        "error: template 'translate' needs the variable 'to'",
        "hint: pass --var to=VALUE",
    ]
    stray = run_cli("generate", "Hello", "--var", "to=French")
    assert stray.returncode == 2 and "--var needs --template" in stray.stderr.decode()

    # --to is the translate template with its variable: the same prompt as above.
    shorthand = run_cli(
        "generate", "Hello", "-m", str(tiny_models["llama"]), "-b", "scripted", "--json", "--to", "French", env=env
    )
    assert shorthand.returncode == 0, shorthand.stderr.decode()
    assert json.loads(shorthand.stdout)["usage"] == data["usage"]
    both = run_cli("generate", "Hello", "--to", "French", "--question", "what")  # QA: "translate has no 'question'"
    assert both.returncode == 2 and both.stderr.decode().splitlines() == [
        "error: --to and --question ask for two templates (translate, qa)",
        "hint: give one of them",
    ]


def test_a_summarize_template_with_a_variable_summarize_does_not_fill_names_the_file(tmp_path):
    """`summarize` has no --var: it said "hint: pass --var who=VALUE" (exit 2), after loading the model."""
    folder = tmp_path / "xdg-config" / "gptcli" / "templates"
    folder.mkdir(parents=True)
    (folder / "summarize.yaml").write_text("user: 'Summarise {length} for {who}: {input}'\n")
    result = run_cli("summarize", "-m", "/nonexistent", input="Some text.")  # fails before the model loads
    assert result.returncode == 3, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [
        f"error: {folder / 'summarize.yaml'}: variables: 'who' has no default, and `gptcli summarize` fills only "
        "{length}, {format}",
        "hint: give it one in the template (variables: who: VALUE), or remove {who}",
    ]
    (folder / "summarize.yaml").write_text("user: 'Summarise {length} for {who}: {input}'\nvariables: {who: me}\n")
    assert run_cli("summarize", "-m", "/nonexistent", input="Some text.").returncode == 5  # now on to the model


def test_a_template_named_by_a_path_is_refused_not_looked_up_in_the_templates_folder(isolated_home, tmp_path):
    """`--template ./pirate` read <templates>/./pirate.yaml, not ./pirate.yaml; '../x' and '/abs/x' read any YAML."""
    from gptcli.errors import UsageError
    from gptcli.templates import get_template, user_templates_dir

    folder = user_templates_dir()
    folder.mkdir(parents=True)
    (folder / "pirate.yaml").write_text("user: 'Pirate: {input}'\n")
    (tmp_path / "elsewhere.yaml").write_text("user: 'Elsewhere: {input}'\n")
    assert get_template("pirate").user == "Pirate: {input}"
    for name in ("./pirate", "../templates/pirate", str(tmp_path / "elsewhere"), "a/b"):
        with pytest.raises(UsageError, match=r"is a path: a template is named by its file NAME\.yaml in "):
            get_template(name)


def test_a_template_that_repeats_input_cannot_build_a_prompt_past_the_prompt_limit():
    """{input} 5,000 times over a 4 kB input: it built the 20 MB prompt (a 1 MB template of them took gigabytes)."""
    from gptcli.errors import InputError
    from gptcli.templates import Template

    many = Template(name="many", user="{input}" * 5000, system="{tone}", variables={"tone": "calm"})
    with pytest.raises(InputError, match=r"template 'many' makes a prompt of 19\.5 MiB .*\{input\} 5000 time"):
        many.render("x" * 4096)
    system, user = many.render("x" * 100)  # within the limit it renders as before
    assert system == "calm" and len(user) == 500_000


def test_a_template_with_thousands_of_variables_lists_in_linear_time(isolated_home):
    from gptcli.templates import user_templates_dir

    names = [f"v{i}" for i in range(3000)]
    folder = user_templates_dir()
    folder.mkdir(parents=True)
    (folder / "many.yaml").write_text('user: "{input} ' + " ".join("{" + n + "}" for n in names) + '"\n')
    result = run_cli("templates", "list", timeout=60)  # was cubic: past 120 s for these 3,000 names
    assert result.returncode == 0 and "v2999" in result.stdout.decode()


def test_a_template_name_that_is_a_folder_or_a_broken_link_is_named_not_skipped(isolated_home):
    """A summarize.yaml folder (or a link to a moved file) was skipped: the built-in ran instead, and a name
    with no built-in was an 'unknown template' while templates list said nothing of it."""
    from gptcli.errors import ConfigError
    from gptcli.templates import get_template, list_templates, user_templates_dir

    folder = user_templates_dir()
    (folder / "summarize.yaml").mkdir(parents=True)
    (folder / "pirate.yaml").symlink_to(folder / "moved.yaml")
    with pytest.raises(ConfigError, match=r"summarize\.yaml is a folder, not a YAML file"):
        get_template("summarize")
    with pytest.raises(ConfigError, match=r"pirate\.yaml is a link to a missing file, not a YAML file"):
        get_template("pirate")
    left_out: list[str] = []
    names = [t.name for t in list_templates(on_error=lambda exc: left_out.append(exc.message))]
    assert "pirate" not in names and len(left_out) == 2
    assert get_template("translate").source == "built-in"  # the others still load


def test_a_name_too_long_for_a_file_is_an_unknown_template_not_a_file_error(isolated_home):
    """`templates show yyy…` (300 characters) said '…/templates_builtin/yyy…: File name too long' (exit 6)."""
    from gptcli.errors import UsageError
    from gptcli.templates import get_template

    with pytest.raises(UsageError) as info:
        get_template("y" * 300)
    assert info.value.exit_code == 2 and info.value.message.startswith("unknown template 'yyy")
    assert len(info.value.message) < 300
