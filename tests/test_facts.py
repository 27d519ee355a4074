"""Fact files, verbalization, tokenization with and without a leading space, shipped fact bases, the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from constrain import ConstraintError, SpecError
from constrain.assets import load_tokenizer, load_vocabulary
from constrain.index.cli import register
from constrain.index.facts import (
    DEFAULT_TEMPLATE,
    FactFileError,
    Triple,
    airport_triples,
    build_fact_index,
    check_template,
    country_triples,
    encode_fact_texts,
    read_triples,
    verbalize,
)
from constrain.index.trie import TrieIndex, trie_constraint

PARIS = Triple("Paris", "is the capital of", "France")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -------------------------------------------------------------------------------------------
def test_tsv_with_header_comments_and_blank_lines(tmp_path):
    path = write(
        tmp_path,
        "f.tsv",
        "subject\trelation\tobject\n# a comment\n\nParis\tis the capital of\tFrance\n"
        "  Rome \tis the capital of\tItaly\n",
    )
    assert list(read_triples(path)) == [PARIS, Triple("Rome", "is the capital of", "Italy")]


def test_tsv_without_header_and_with_quotes_kept_as_text(tmp_path):
    path = write(tmp_path, "f.txt", 'Paris\tis the capital of\tFrance\n"Le Monde"\tis a\tnewspaper\n')
    assert list(read_triples(path, fmt="tsv")) == [PARIS, Triple("Le Monde", "is a", "newspaper")]


def test_csv_header_in_any_order_with_extra_columns_and_quoted_commas(tmp_path):
    path = write(
        tmp_path, "f.csv", 'object,id,subject,relation\n"Washington, D.C.",7,United States,has the capital\n'
    )
    assert list(read_triples(path)) == [Triple("United States", "has the capital", "Washington, D.C.")]


def test_jsonl_objects_and_lists(tmp_path):
    lines = [
        json.dumps({"subject": "Paris", "relation": "is the capital of", "object": "France", "x": 1}),
        json.dumps(["Mount Everest", "has a height of", 8849]),
    ]
    path = write(tmp_path, "f.jsonl", "\n".join(lines) + "\n\n")
    assert list(read_triples(path)) == [PARIS, Triple("Mount Everest", "has a height of", "8849")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("f.tsv", "Paris\tis the capital of\tFrance\nRome\tItaly\n", r"f\.tsv:2: expected 3 fields, got 2"),
        ("f.tsv", "Paris\tis\n", r"f\.tsv:1: expected 3 tab-separated fields"),
        ("f.tsv", "Paris\t\tFrance\n", r"f\.tsv:1: empty relation"),
        ("f.csv", "a,b,c\nd,e,f,g\n", r"f\.csv:2: expected 3 fields, got 4"),
        ("f.csv", "subject,relation,object\nx,y\n", r"f\.csv:2: expected 3 fields, got 2"),
        (
            "f.jsonl",
            '{"subject": "a", "relation": "b", "object": "c"}\n{"subject": "a"\n',
            r"f\.jsonl:2: invalid JSON",
        ),
        ("f.jsonl", '{"subject": "a", "relation": "b"}\n', r"f\.jsonl:1: object lacks \['object'\]"),
        ("f.jsonl", '["a", "b"]\n', r"f\.jsonl:1: expected an object"),
        ("f.jsonl", '["a", "b", null]\n', r"f\.jsonl:1: object must be a string or number"),
        ("f.xml", "<a/>", r"f\.xml: unknown fact file format"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(FactFileError, match=message):
        list(read_triples(path))


def test_unreadable_files_are_fact_file_errors(tmp_path):
    with pytest.raises(FactFileError, match="cannot open"):
        list(read_triples(tmp_path / "missing.tsv"))
    path = tmp_path / "latin1.tsv"
    path.write_bytes("Z\u00fcrich\tis in\tSwitzerland\n".encode("latin-1"))
    with pytest.raises(FactFileError, match="not UTF-8"):
        list(read_triples(path))
    assert issubclass(FactFileError, ConstraintError)


# -- templates ------------------------------------------------------------------------------------------
def test_templates_verbalize_triples():
    assert verbalize(PARIS) == "Paris is the capital of France."
    assert (
        verbalize(PARIS, "<{subject}> <{relation}> <{object}> .") == "<Paris> <is the capital of> <France> ."
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{subject} {relation}.", r"missing field\(s\) \['object'\]"),
        ("{subject} {relation} {object} {date}", "unknown field {date}"),
        ("{subject!r} {relation} {object}", "unknown field"),
        ("{subject} {relation} {object", "fact template"),
    ],
)
def test_bad_templates_are_spec_errors(template, message):
    with pytest.raises(SpecError, match=message):
        check_template(template)
    with pytest.raises(SpecError):
        build_fact_index([PARIS], None, tokenizer="smollm2", template=template)
    assert check_template(DEFAULT_TEMPLATE) == DEFAULT_TEMPLATE


# -- tokenizing: the leading space ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2"), load_vocabulary("smollm2")


def test_leading_space_mode_matches_the_tokens_a_model_writes_after_a_trigger(smollm2):
    """Default: facts are stored as they appear after "Fact:", so the continuation of the trigger's tokens is
    exactly a stored fact (" Paris" is one token, not "Paris")."""
    tokenizer, vocab = smollm2
    index = build_fact_index([PARIS, Triple("Rome", "is the capital of", "Italy")], None, tokenizer="smollm2")
    in_context = tokenizer.encode("Fact: " + verbalize(PARIS), add_special_tokens=False)
    trigger = tokenizer.encode("Fact:", add_special_tokens=False)
    assert in_context[: len(trigger)] == trigger
    fact_tokens = in_context[len(trigger) :]
    assert vocab.token_bytes[fact_tokens[0]] == b" Paris"
    m = trie_constraint(index).compile(vocab).matcher()
    assert m.accepts(fact_tokens)
    assert not m.accepts(tokenizer.encode(verbalize(PARIS), add_special_tokens=False))  # "Paris" at the start
    assert index.meta["leading_space"] is True and index.meta["tokenizer"] == "smollm2"


def test_no_leading_space_mode_stores_the_text_as_it_starts_a_string(smollm2):
    tokenizer, vocab = smollm2
    index = build_fact_index([PARIS], None, tokenizer="smollm2", leading_space=False)
    bare = tokenizer.encode(verbalize(PARIS), add_special_tokens=False)
    assert vocab.token_bytes[bare[0]] == b"Paris"
    m = trie_constraint(index).compile(vocab).matcher()
    assert m.accepts(bare)
    assert not m.accepts(tokenizer.encode(" " + verbalize(PARIS), add_special_tokens=False))
    assert list(index.facts()) == [tuple(bare)]


def test_encoded_facts_decode_back_to_the_exact_text(smollm2):
    tokenizer, vocab = smollm2
    texts = [
        "Zürich is in Switzerland.",
        "日本 has the capital Tokyo.",
        "C++ was designed by Bjarne Stroustrup.",
    ]
    for leading_space in (True, False):
        for text, ids in zip(
            texts, encode_fact_texts(texts, tokenizer, vocab, leading_space=leading_space), strict=True
        ):
            assert vocab.decode_bytes(ids) == ((" " if leading_space else "") + text).encode()


def test_a_tokenizer_that_cannot_encode_a_fact_exactly_is_an_error():
    """SentencePiece always prefixes a space, so it cannot store a fact without one: an error, not a
    silently different fact."""
    tokenizer, vocab = load_tokenizer("mistral-sp"), load_vocabulary("mistral-sp")
    ids = next(encode_fact_texts(["Paris is the capital of France."], tokenizer, vocab, leading_space=True))
    assert vocab.decode_bytes(ids) == b" Paris is the capital of France."
    with pytest.raises(ConstraintError, match="does not encode it without a leading space"):
        list(encode_fact_texts(["Paris is the capital of France."], tokenizer, vocab, leading_space=False))


def test_duplicate_triples_are_stored_once(tmp_path):
    rows = ["Paris\tis the capital of\tFrance", "Rome\tis the capital of\tItaly"] * 3
    path = write(tmp_path, "f.tsv", "\n".join(rows) + "\n")
    index = build_fact_index(read_triples(path), tmp_path / "kb", tokenizer="smollm2", progress=False)
    assert index.n_facts == 2 and index.meta["n_input"] == 2  # texts deduped before tokenizing
    assert TrieIndex.load(tmp_path / "kb").n_facts == 2


# -- shipped fact bases -----------------------------------------------------------------------------------
def test_airports_base_holds_known_facts():
    triples = set(airport_triples())
    assert len(triples) > 150_000
    cdg = "Charles de Gaulle International Airport"
    for fact in [
        (cdg, "is located in", "Paris"),
        (cdg, "has the IATA code", "CDG"),
        ("LFPG", "is the ICAO code of", cdg),
        (cdg, "is located in the country", "France"),
        (cdg, "is in the time zone", "Europe/Paris"),
    ]:
        assert Triple(*fact) in triples


def test_countries_base_holds_known_facts():
    triples = set(country_triples())
    assert len(triples) > 2_000
    for fact in [
        ("France", "has the capital", "Paris"),
        ("Paris", "is the capital of", "France"),
        ("France", "borders", "Germany"),
        ("France", "uses the currency", "Euro"),
        ("France", "has the language", "French"),
        ("Japan", "is located in", "Asia"),
    ]:
        assert Triple(*fact) in triples


# -- CLI ----------------------------------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="constrain")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_builds_from_a_file_and_reports_stats(tmp_path, capsys):
    facts = write(tmp_path, "facts.tsv", "Paris\tis the capital of\tFrance\nRome\tis the capital of\tItaly\n")
    out = tmp_path / "kb"
    assert run_cli("index", "build", str(facts), "-o", str(out), "--tokenizer", "smollm2", "--quiet") == 0
    assert "2 facts" in capsys.readouterr().out
    assert run_cli("index", "stats", str(out), "--verify") == 0
    text = capsys.readouterr().out
    assert "facts         2" in text and "smollm2" in text and "checksums and structure OK" in text
    assert run_cli("index", "stats", str(out), "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    lengths = [
        len(load_tokenizer("smollm2").encode(" " + t, add_special_tokens=False))
        for t in ("Paris is the capital of France.", "Rome is the capital of Italy.")
    ]
    assert stats["facts"] == 2 and stats["max_depth"] == max(lengths) and stats["bytes"] > 0
    assert stats["fact_tokens"] == sum(lengths)
    assert stats["bytes_per_fact"] == pytest.approx(stats["bytes"] / 2)


def test_cli_builds_a_shipped_source(tmp_path, capsys):
    out = tmp_path / "countries"
    assert (
        run_cli(
            "index",
            "build",
            "--source",
            "countries",
            "-o",
            str(out),
            "--tokenizer",
            "llama3",
            "--template",
            "<{subject}> <{relation}> <{object}> .",
            "--quiet",
        )
        == 0
    )
    index = TrieIndex.load(out)
    assert index.meta["source"] == "source:countries" and index.meta["tokenizer"] == "llama3"
    vocab = load_vocabulary("llama3")
    fact = load_tokenizer("llama3").encode(" <France> <has the capital> <Paris> .", add_special_tokens=False)
    assert tuple(fact) in index
    assert trie_constraint(index).compile(vocab).matcher().accepts(fact)


def test_cli_errors_are_reported_with_status_2(tmp_path, capsys):
    facts = write(tmp_path, "facts.tsv", "Paris\tis\n")
    assert run_cli("index", "build", str(facts), "-o", str(tmp_path / "kb"), "--quiet") == 2
    assert "facts.tsv:1" in capsys.readouterr().err
    assert run_cli("index", "build", "-o", str(tmp_path / "kb"), "--quiet") == 2
    assert "either a facts file or --source" in capsys.readouterr().err
    assert run_cli("index", "stats", str(tmp_path / "nothing")) == 2
    assert "no index here" in capsys.readouterr().err
    good = write(tmp_path, "good.tsv", "Paris\tis the capital of\tFrance\n")
    assert run_cli("index", "build", str(good), "-o", str(tmp_path / "kb"), "--quiet") == 0
    assert run_cli("index", "build", str(good), "-o", str(tmp_path / "kb"), "--quiet") == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli("index", "build", str(good), "-o", str(tmp_path / "kb"), "--quiet", "--force") == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".kb")]  # no temporary folders left
