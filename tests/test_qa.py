"""Knowledge-grounded QA: the fact parser and checker against a plain set of fact texts, and an end-to-end run
of the real SmolLM2 model where every stated fact of the constrained answer must be in the base."""

from __future__ import annotations

import argparse

import pytest

from constrain import ConstraintError
from constrain.index.facts import Triple, build_fact_index, verbalize
from constrain.index.qa import FactChecker, answer, answer_batch, build_prompt, parse_facts, register_qa

TRIPLES = [
    Triple("London Heathrow Airport", "is located in the country", "United Kingdom"),
    Triple("London Heathrow Airport", "is located in", "London"),
    Triple("LHR", "is the IATA code of", "London Heathrow Airport"),
    Triple("John F Kennedy International Airport", "is located in", "New York"),
    Triple("John F Kennedy International Airport", "is located in the country", "United States"),
    Triple("JFK", "is the IATA code of", "John F Kennedy International Airport"),
    Triple("Charles de Gaulle International Airport", "is located in the country", "France"),
    Triple("CDG", "is the IATA code of", "Charles de Gaulle International Airport"),
    Triple("Australia", "has the capital", "Canberra"),
    Triple("Canberra", "is the capital of", "Australia"),
    Triple("Japan", "uses the currency", "Yen"),
    Triple("Japan", "has the capital", "Tokyo"),
    Triple("St. Lucia", "has the capital", "Castries"),
]
FACTS = {verbalize(t) for t in TRIPLES}


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    return build_fact_index(
        TRIPLES, tmp_path_factory.mktemp("qa") / "kb", tokenizer="smollm2", progress=False
    )


@pytest.fixture(scope="module")
def smollm2():
    from constrain.assets import load_model

    return load_model("smollm2")


# -- parsing and checking -----------------------------------------------------------------------------------
def test_parse_facts_reads_each_trigger_line_and_splits_a_fact_from_what_follows_it():
    """Each "Fact:" starts a fact that runs to the end of its line or the next trigger; a line that goes on
    after a fact of the base is cut after that fact; other lines end at their first sentence end."""
    text = (
        "Fact: Japan uses the currency Yen. So it is yen.\n"
        "Fact: Japan is in Europe. Really.\n"
        "Fact: St. Lucia has the capital Castries. Fact: Canberra is the capital of Australia.\n"
        "Answer: Yen"
    )
    facts = parse_facts(text, FACTS.__contains__)
    assert [(f.text, f.in_base, f.complete) for f in facts] == [
        ("Japan uses the currency Yen.", True, True),
        ("Japan is in Europe.", False, True),
        ("St. Lucia has the capital Castries.", True, True),
        ("Canberra is the capital of Australia.", True, True),
    ]


def test_parse_facts_marks_a_fact_cut_by_the_token_limit_as_incomplete():
    """With cut_off=True, a fact on the unterminated last line is incomplete (neither true nor false) unless
    it is already a fact of the base; earlier lines are unaffected."""
    text = "Fact: Australia has the capital Canberra.\nFact: Japan uses the curr"
    facts = parse_facts(text, FACTS.__contains__, cut_off=True)
    assert [(f.in_base, f.complete) for f in facts] == [(True, True), (False, False)]
    assert [f.complete for f in parse_facts(text, FACTS.__contains__, cut_off=False)] == [True, True]
    done = parse_facts("Fact: Japan uses the currency Yen.", FACTS.__contains__, cut_off=True)
    assert [(f.in_base, f.complete) for f in done] == [(True, True)]


def test_fact_checker_agrees_with_the_set_of_fact_texts(kb, tokenizers):
    """The trie-based checker says yes exactly for the verbalized facts: every fact, and no near miss (a
    prefix, a changed word, a missing period, an extra space)."""
    check = FactChecker(kb, tokenizers("smollm2"))
    for fact in FACTS:
        assert check(fact)
        for near in (
            fact[:-1],
            fact[:-2] + "x.",
            fact + " ",
            fact.replace(" ", "  ", 1),
            fact[: len(fact) // 2],
        ):
            assert check(near) == (near in FACTS)
    assert not check("") and not check("Japan uses the currency Euro.")


def test_build_prompt_rejects_an_empty_question(tokenizers):
    with pytest.raises(ConstraintError, match="empty"):
        build_prompt(tokenizers("smollm2"), "  ")


# -- end to end on SmolLM2 ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_fact_of_a_constrained_answer_is_in_the_base(kb, smollm2):
    """SmolLM2 answers two questions under trigger mode + trie: it states at least one complete fact each,
    every complete "Fact:" line is a fact of the base (checked against the set of texts, not the trie), and
    every span the trie constrained is such a fact. In the same batch, the unconstrained answers' facts are
    marked in-base exactly when they are in the set."""
    model, tokenizer = smollm2
    questions = ["Which country is the airport LHR in?", "What is the capital of Australia?"]
    answers = answer_batch(
        questions + questions,
        kb,
        model,
        tokenizer,
        constrained=[True, True, False, False],
        max_new_tokens=40,
    )
    for a in answers[:2]:
        assert a.constrained and a.text.startswith("Fact:")
        assert a.stated, a.text
        for f in a.stated:
            assert f.text in FACTS, a.text
        for span in a.spans:
            if span.complete:
                assert span.text.strip() in FACTS
        assert any(span.complete for span in a.spans)
    for a in answers[2:]:
        assert not a.constrained and not a.spans
        for f in a.facts:
            assert f.in_base == (f.text in FACTS)


@pytest.mark.slow
def test_answer_refuses_an_index_built_for_another_vocabulary(smollm2, tmp_path):
    model, tokenizer = smollm2
    other = build_fact_index(TRIPLES[:2], tmp_path / "kb-llama3", tokenizer="llama3", progress=False)
    with pytest.raises(ConstraintError, match="another vocabulary"):
        answer("Which country is LHR in?", other, model, tokenizer, max_new_tokens=4)


# -- the command -------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="constrain")
    register_qa(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.slow
def test_qa_command_compares_constrained_and_unconstrained_runs(kb, capsys):
    """`constrain qa --index kb/ --compare QUESTION` prints both answers, each with its facts marked."""
    args = _parser().parse_args(
        ["qa", "--index", str(kb.path), "--compare", "--max-new-tokens", "24", "Which country is LHR in?"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "== constrained" in out and "== unconstrained" in out
    constrained = out.split("== unconstrained")[0]
    assert "[in base    ]" in constrained and "[NOT in base]" not in constrained


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["qa", "--index", "/no/such/kb", "Which country is LHR in?"], "no index at /no/such/kb"),
        (["qa", "--index", "postgresql://127.0.0.1:1/x?table=bad-name", "Q?"], "bad table name"),
        (["qa", "Which country is LHR in?"], "give --index"),
    ],
)
def test_qa_command_reports_bad_input_with_status_2(argv, message, capsys):
    args = _parser().parse_args(argv)
    assert args.func(args) == 2
    assert message in capsys.readouterr().err


def test_qa_command_without_a_question_reports_it(kb, capsys):
    args = _parser().parse_args(["qa", "--index", str(kb.path)])
    assert args.func(args) == 2
    assert "no question given" in capsys.readouterr().err
