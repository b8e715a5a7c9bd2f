"""Grammars as structured output: Lark (llguidance's syntax) and llama.cpp's GBNF (`--grammar FILE`, a chat's
`/format grammar FILE`), and a choice list (vLLM's `choice`), each an exact constraint."""

from __future__ import annotations

import json
import re

import pytest

from gptcli import constraints
from gptcli.config import OutputConstraint
from gptcli.errors import ConfigError, UsageError
from gptcli.output_requests import from_flags
from tests.conftest import reads, run_cli

YES_NO_GBNF = 'root ::= answer "."\nanswer ::= "yes" | "no"\n'
YES_NO_LARK = 'start: answer "."\nanswer: "yes" | "no"\n'
CODE_GBNF = 'root ::= [A-Z] [A-Z] "-" digit digit digit\ndigit ::= [0-9]\n'
CODE = r"[A-Z]{2}-[0-9]{3}"


@pytest.mark.parametrize("source", [YES_NO_GBNF, YES_NO_LARK])
def test_a_gbnf_or_lark_grammar_matches_exactly_its_language(source):
    grammar = constraints.grammar_text(source, "--grammar")
    assert grammar == OutputConstraint("grammar", source)  # kept as written: a chat file, /show
    assert reads(grammar, "yes.") and reads(grammar, "no.")
    assert not reads(grammar, "yes") and not reads(grammar, "maybe.") and not reads(grammar, "yes. ")


def test_a_grammar_string_that_starts_with_a_byte_order_mark_reads_as_without_it():
    """A server's `grammar` field (or a batch line's) as an editor saved it: the mark is dropped, as from a file."""
    from gptcli.output_requests import requested_output

    param, grammar = requested_output({"grammar": "\ufeff" + YES_NO_GBNF})
    assert (param, grammar.source) == ("grammar", YES_NO_GBNF)
    assert reads(grammar, "no.") and not reads(grammar, "No.")


def test_a_choice_list_is_an_exact_alternation_of_its_strings_escaped():
    values = ['say "hi"', "back\\slash", "(.*)", "line\nbreak", "é😀", "\x01"]
    choice = constraints.choice(values, "choice")
    assert all(reads(choice, value) for value in values)
    assert not any(reads(choice, text) for text in ["say hi", "(anything)", "", "back\\slashes", "é"])


@pytest.mark.parametrize(
    ("values", "said"),
    [([], "choice: must be a list"), (["a", ""], "choice: must be a list"), ("yes", "choice"), ([1], "choice")],
)
def test_a_choice_list_of_anything_but_non_empty_strings_is_refused(values, said):
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}"):
        constraints.choice(values, "choice")


@pytest.mark.parametrize(
    ("source", "said"),
    [
        ('start: "yes" | no\nno: /[a-z/\n', "invalid grammar at line 2 ('no: /[a-z/'): invalid regex"),
        ('start: "a" |\n  b c\n', "invalid grammar at line 2 ('b c'): Expected token"),
        ('root: "a"\n', "invalid grammar: no start rule found"),
        ('root ::= "a" (\n', "invalid GBNF grammar: Expected ')' at line 2"),
        ('root ::= "a" b\n', "invalid GBNF grammar: Rule 'b' not found"),
        ('answer ::= "a"\n', "invalid GBNF grammar: No 'root' rule found"),
        # Python's "maximum recursion depth exceeded while calling a Python object" (the converter recurses)
        ("root ::= " + "(" * 3000 + '"a"' + ")" * 3000, "invalid GBNF grammar: nested too deeply"),
        ("   \n", "must be a grammar (text)"),
    ],
)
def test_a_bad_grammar_is_one_line_naming_where_it_fails(source, said):
    with pytest.raises(ConfigError) as info:
        constraints.grammar_text(source, "g.gbnf")
    assert info.value.message.startswith(f"g.gbnf: {said}") and "\n" not in info.value.message, info.value.message
    assert "GBNF" in (info.value.hint or "")


def test_a_grammar_larger_than_the_cache_holds_is_refused(monkeypatch):
    monkeypatch.setattr(constraints, "MAX_GRAMMAR_SOURCE", 64)
    with pytest.raises(ConfigError, match=r"^g: the grammar is too large"):
        constraints.grammar_text("start: " + " | ".join(f'"{i}"' for i in range(40)), "g")
    with pytest.raises(ConfigError, match=r"^choice: the grammar is too large"):
        constraints.choice([str(i) for i in range(40)], "choice")


def test_grammar_flag_reads_a_file_and_goes_with_no_other_structured_flag(tmp_path):
    path = tmp_path / "yes-no.gbnf"
    path.write_text(YES_NO_GBNF, encoding="utf-8")
    assert from_flags(None, None, None, path) == OutputConstraint("grammar", YES_NO_GBNF)
    with pytest.raises(UsageError, match=r"^--regex and --grammar cannot be used together"):
        from_flags(None, None, "[a-z]", path)


def test_cli_generate_and_chat_follow_a_grammar_file(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    code = tmp_path / "code.gbnf"
    code.write_text(CODE_GBNF, encoding="utf-8")
    for seed in range(3):
        run = run_cli("generate", "A code:", "-m", model, "--grammar", str(code), "-t", "1", "--seed", str(seed))
        assert run.returncode == 0, run.stderr.decode()
        assert re.fullmatch(CODE, run.stdout.decode().rstrip("\n")), run.stdout
    lark = tmp_path / "yes-no.lark"
    lark.write_text(YES_NO_LARK, encoding="utf-8")
    chat = run_cli("chat", "-m", model, "--grammar", str(lark), "-t", "1", input="hi\nagain\n/show\n")
    assert chat.returncode == 0, chat.stderr.decode()
    assert [line in {"yes.", "no."} for line in chat.stdout.decode().splitlines()] == [True, True], chat.stdout
    assert "output             grammar start: answer" in chat.stderr.decode()


def test_cli_refuses_a_bad_grammar_with_exit_3_and_a_grammar_with_url(tiny_models, tmp_path):
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a" (\n', encoding="utf-8")
    run = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "--grammar", str(bad))
    lines = run.stderr.decode().splitlines()
    assert run.returncode == 3 and run.stdout == b"", run.stderr.decode()
    assert lines[0].startswith(f"error: {bad}: invalid GBNF grammar: Expected ')' at line 2"), lines
    assert "Traceback" not in run.stderr.decode()
    good = tmp_path / "yes-no.gbnf"
    good.write_text(YES_NO_GBNF, encoding="utf-8")
    remote = run_cli("generate", "hi", "--url", "http://127.0.0.1:9/v1", "--grammar", str(good))
    assert remote.returncode == 2 and "--grammar does not work with --url" in remote.stderr.decode()


def test_a_grammar_or_schema_file_that_matches_no_text_is_named_in_generate_and_in_a_chats_format(
    tiny_models, tmp_path
):
    """Found only against the vocabulary, after the flags were read: the error named no file (and /format's
    said `/format`, not the file or `/format regex`)."""
    model = str(tiny_models["llama"])
    grammar, schema = tmp_path / "empty.gbnf", tmp_path / "loop.json"
    grammar.write_text("root ::= [a&&b]\n", encoding="utf-8")
    schema.write_text('{"$ref": "#"}', encoding="utf-8")
    said = {
        grammar: f"error: {grammar}: invalid grammar: it matches no text at all",
        schema: f"error: {schema}: invalid JSON Schema: it matches no text at all",
    }
    for flag, path in (("--grammar", grammar), ("--json-schema", schema)):
        run = run_cli("generate", "hi", "-m", model, "-n", "4", flag, str(path))
        assert run.returncode == 3 and run.stdout == b"", run.stderr.decode()
        assert run.stderr.decode().splitlines()[0] == said[path]
    lines = f"/format grammar {grammar}\n/format schema {schema}\n/format regex [a&&b]\n"
    chat = run_cli("chat", "-m", model, "-n", "4", input=lines)
    errors = [line for line in chat.stderr.decode().splitlines() if line.startswith("error: ")]
    regex = "error: /format regex: invalid regex '[a&&b]': it matches no text at all"
    assert errors == [said[grammar], said[schema], regex], chat.stderr.decode()


def test_a_chat_keeps_its_grammar_in_its_file_and_over_url_refuses_it(tiny_models, isolated_home, tmp_path):
    from gptcli.chat.conversation import Conversation, output_from_json, output_to_json
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.config import Settings

    grammar = OutputConstraint("grammar", YES_NO_GBNF)
    assert output_from_json(json.loads(json.dumps(output_to_json(grammar))), "f") == grammar
    path = tmp_path / "yes-no.gbnf"
    path.write_text(YES_NO_GBNF, encoding="utf-8")
    run = run_cli("chat", "-m", str(tiny_models["llama"]), "-t", "1", input=f"/format grammar {path}\nhi\n")
    assert run.returncode == 0 and run.stdout.decode().splitlines() in (["yes."], ["no."]), run.stdout
    (saved,) = (isolated_home / "data" / "chats").glob("*.json")
    assert json.loads(saved.read_text(encoding="utf-8"))["output"] == {"grammar": YES_NO_GBNF}
    conversation = Conversation(id="c1", output=grammar)
    with pytest.raises(UsageError, match=r"^conversation c1: its output format: a grammar does not work with --url"):
        RemoteChatSession(None, None, Settings(), conversation)


def rule_chain(links: int, gbnf: bool = False) -> str:
    """A grammar of `links` rules, each naming the next (the shape that overflowed llguidance's stack)."""
    arrow = " ::= " if gbnf else ": "
    rules = [f"{'root' if gbnf else 'start'}{arrow}r0"] + [f'r{i}{arrow}r{i + 1} "x"' for i in range(links)]
    return "\n".join([*rules, f'r{links}{arrow}"z"']) + "\n"


def ref_chain(links: int, around: bool = False) -> dict:
    """A schema whose $defs each lead to the next by $ref (or by an anyOf around that $ref)."""
    defs = {
        f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "integer"}]}
        if around
        else {"$ref": f"#/$defs/d{i + 1}"}
        for i in range(links)
    }
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{links}": {"type": "string"}}}


def test_how_deep_references_chain_is_measured_cycles_cut():
    from gptcli.grammar_depth import lark_chain, schema_chain

    assert lark_chain(rule_chain(10)) == 12  # start, r0 ... r10
    assert lark_chain(constraints.lark(rule_chain(10, gbnf=True))) == 12
    # Recursion (a rule naming itself or an ancestor) is read lazily by the engine: the cycle adds nothing.
    assert lark_chain('start: list\nlist: "[" (item ("," item)*)? "]"\nitem: NUMBER | list\nNUMBER: /[0-9]+/\n') == 4
    assert lark_chain('start: "e" // e\n  | /e/ "a"\ne: "b"\n') == 1  # literals, regexes, comments name no rule
    assert schema_chain(ref_chain(10)) == 12
    assert schema_chain(ref_chain(10, around=True)) == 22  # the anyOf's item is a subschema too
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}}}
    assert (
        schema_chain({**tree, "$ref": "#/$defs/node"}) == 4
    )  # root, node, kids, its items; their $ref back to the root: cut


@pytest.mark.parametrize(
    ("flag", "text", "said"),
    [
        ("--grammar", rule_chain(3000), "its rules name one another 3,002 deep"),
        ("--grammar", rule_chain(3000, gbnf=True), "its rules name one another 3,002 deep"),
        ("--json-schema", json.dumps(ref_chain(5000)), "its subschemas and $refs go 5,002 deep"),
        ("--json-schema", json.dumps(ref_chain(2000, around=True)), "its subschemas and $refs go 4,002 deep"),
        # A Lark grammar embeds a schema with llguidance's %json: its $refs chain as a --json-schema's do.
        (
            "--grammar",
            f"start: %json {json.dumps(ref_chain(5000))}\n",
            "the subschemas and $refs of its %json go 5,002 deep",
        ),
    ],
)
def test_a_reference_chain_too_deep_for_the_grammar_engine_is_exit_3_not_a_crash(
    tiny_models, tmp_path, flag, text, said
):
    """Each of these (180 KB at most) killed the process with SIGSEGV inside llguidance: no output, exit 139."""
    path = tmp_path / "deep"
    path.write_text(text, encoding="utf-8")
    run = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "-n", "2", flag, str(path))
    assert run.returncode == 3, run.stderr.decode()
    assert run.stderr.decode().startswith(f"error: {path}: {said}, past the 256 the grammar engine can follow\n")


def test_the_schemas_a_lark_grammar_embeds_are_found():
    from gptcli.grammar_depth import lark_json_schemas

    text = 'start: "a" %json {"type": "integer"} | b\nb: %json{"$ref": "#/$defs/x",\n "$defs": {"x": {}}}\nc: "%json"\n'
    assert lark_json_schemas(text) == [{"type": "integer"}, {"$ref": "#/$defs/x", "$defs": {"x": {}}}]
    assert reads(constraints.grammar_text(f"start: %json {json.dumps(ref_chain(10))}\n", "--grammar"), '"a"')


def test_a_chain_within_the_limit_still_compiles():
    from gptcli.grammar_depth import MAX_CHAIN

    assert reads(constraints.grammar_text(rule_chain(MAX_CHAIN - 2), "--grammar"), "z" + "x" * (MAX_CHAIN - 2))
    assert reads(constraints.schema_constraint(ref_chain(MAX_CHAIN - 2), "--json-schema"), '"a"')
    with pytest.raises(ConfigError, match="257 deep"):
        constraints.grammar_text(rule_chain(MAX_CHAIN - 1), "--grammar")
