"""The `constrain` command line: help, generate, vocab, demo, the plugin hook, and errors (exit 2, no
traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from constrain import cli


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """--threads sets torch's global thread count: restore it for the tests that follow."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`constrain ARGV...` in process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's --help and usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_help_lists_every_command(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for command in ("generate", "vocab", "demo"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), f"{command} missing from --help"


def test_generate_help_documents_every_option(capsys):
    status, out, _ = run(capsys, "generate", "--help")
    assert status == 0
    for option in (
        "--model",
        "--regex",
        "--choice",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--min-p",
        "--seed",
        "--no-chat",
        "--stream",
        "--threads",
    ):
        assert option in out


def test_bad_regex_exits_2_with_the_position_and_no_traceback(capsys):
    status, out, err = run(capsys, "generate", "--regex", "(ab", "hello")
    assert status == 2 and out == ""
    assert "error" in err and "position 0" in err and "(ab" in err
    assert "Traceback" not in err


def test_bad_regex_from_the_shell_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "constrain.cli", "generate", "--regex", "a{2,1}", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("generate", "--regex", "a", "--choice", "x", "y", "--", "hi"),
            "give one constraint, not --regex and --choice",
        ),
        (("generate", "--choice", "x", "y"), "no prompt given"),
        (("generate", "--stream", "--regex", "a", "one", "two"), "single prompt"),
        (("generate", "--model", "/no/such/model", "hi"), "unknown model"),
        (("generate", "--threads", "0", "hi"), "--threads"),
        (("vocab", "no-such-vocabulary"), "unknown tokenizer"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(capsys, argv, message):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert message in err and "Traceback" not in err


def test_vocab_prints_sizes_specials_and_the_trie_size(capsys, vocabularies):
    status, out, _ = run(capsys, "vocab", "smollm2", "--specials")
    assert status == 0
    fields = dict(re.findall(r"^(\S[^\n]*?)\s{2,}(\S[^\n]*)$", out, re.MULTILINE))
    vocab = vocabularies("smollm2")
    assert fields["tokens"] == "49,152"
    assert fields["EOS"] == "0 '<|endoftext|>', 2 '<|im_end|>'"
    # The trie's node count is the number of distinct prefixes of the ordinary tokens, plus the root.
    prefixes = {
        vocab.token_bytes[i][:k] for i in vocab.ordinary_ids for k in range(1, len(vocab.token_bytes[i]) + 1)
    }
    assert fields["trie nodes"] == f"{len(prefixes) + 1:,}"
    assert "<|im_start|>" in out


def test_plugins_add_commands_and_missing_or_broken_ones_are_skipped(capsys, monkeypatch, tmp_path):
    calls = []

    def register(subparsers):
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("name")
        parser.set_defaults(func=lambda args: calls.append(args.name) or 0)

    monkeypatch.setitem(sys.modules, "fake_constrain_plugin", types.SimpleNamespace(register=register))
    (tmp_path / "broken_constrain_plugin.py").write_text("import a_module_that_is_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli,
        "PLUGIN_MODULES",
        ("constrain.no_such_part.cli", "broken_constrain_plugin", "fake_constrain_plugin"),
    )
    status, out, err = run(capsys, "--help")
    assert status == 0 and "hello" in out
    assert "broken_constrain_plugin" in err and "no_such_part" not in err
    status, _, _ = run(capsys, "hello", "world")
    assert status == 0 and calls == ["world"]


# -- with the real model -------------------------------------------------------------------------------------


def test_generate_prints_an_output_that_fullmatches_the_regex(capsys):
    pattern = r"\d{4}-\d{2}-\d{2}"
    status, out, err = run(
        capsys,
        "generate",
        "--regex",
        pattern,
        "--max-new-tokens",
        "16",
        "--threads",
        "1",
        "-v",
        "When did the Berlin Wall fall?",
    )
    assert status == 0, err
    assert re.fullmatch(pattern, out.strip()), out
    assert "constraint_complete" in err


def test_generate_choice_streams_the_same_text_it_would_print(capsys):
    options = ("generate", "--choice", "positive", "negative", "--threads", "1")
    prompt = ("--", "Sentiment of: 'I love it!'")  # after --choice, `--` ends the options
    status, streamed, err = run(capsys, *options, "--stream", *prompt)
    assert status == 0, err
    status, printed, err = run(capsys, *options, *prompt)
    assert status == 0, err
    assert streamed == printed and printed.strip() in ("positive", "negative")


def test_demo_shows_constrained_outputs_that_all_match(capsys):
    status, out, err = run(capsys, "demo", "--max-new-tokens", "24", "--no-qa")
    assert status == 0, err
    assert out.count("== ") == 7 and out.count("unconstrained") == 7
    assert "6/6 constrained outputs match their regex" in out
    assert "parsed        City(name=" in out  # the pydantic model, validated by pydantic itself


def test_generate_with_a_json_schema_prints_json_that_validates(capsys, tmp_path):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema))
    status, out, err = run(
        capsys,
        "generate",
        "--json-schema",
        str(path),
        "--max-new-tokens",
        "48",
        "Describe Ada Lovelace as JSON.",
    )
    assert status == 0, err
    jsonschema.validate(json.loads(out), schema)


def test_generate_with_a_lark_grammar_prints_text_lark_parses(capsys, tmp_path):
    import lark

    grammar = 'start: greeting " " NAME "!"\ngreeting: "Hello" | "Hi"\nNAME: /[A-Z][a-z]{1,10}/\n'
    path = tmp_path / "greeting.lark"
    path.write_text(grammar)
    status, out, err = run(capsys, "generate", "--grammar", str(path), "--max-new-tokens", "24", "Greet Ada.")
    assert status == 0, err
    lark.Lark(grammar, parser="earley").parse(out.rstrip("\n"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--json-schema", "/nonexistent/schema.json"], "cannot read the JSON schema file"),
        (["--regex", "a", "--choice", "b", "--"], "give one constraint"),
    ],
)
def test_bad_constraint_files_and_combinations_exit_2(capsys, argv, message):
    status, _, err = run(capsys, "generate", *argv, "prompt")
    assert status == 2 and message in err
