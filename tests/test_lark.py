"""Lark grammars as token constraints: the language matches Lark's own Earley parser (dynamic_complete lexer),
masks agree with `accept`, every tokenization of a valid string is accepted, and bad grammars raise
`ConstraintError` subclasses."""

from __future__ import annotations

import lark
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import CompileLimitError, ConstraintError, SpecError, UnsupportedError, Vocabulary
from constrain.grammars.lark import lark_grammar
from constrain.testing import check_complete, check_refuses, check_sound_step, from_grammar

HS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GRAMMARS = {
    "arith": r"""
        ?start: sum
        ?sum: product | sum "+" product | sum "-" product
        ?product: atom | product "*" atom | product "/" atom
        ?atom: NUMBER | "-" atom | "(" sum ")"
        %import common.INT -> NUMBER
        %import common.WS_INLINE
        %ignore WS_INLINE
    """,
    # ambiguous: E -> E E | "a" | "ab" ; the lexer may split "ab" two ways
    "ambiguous": r"""
        start: e
        e: e e | A | AB | "b"
        A: "a"
        AB: "ab"
    """,
    # empty rules, optional items, templates, a case-insensitive keyword
    "empty_rules": r"""
        start: opt x opt
        opt: | "x" opt
        x: "k"i "=" [NAME] _sep{NAME, ","}?
        _sep{item, delim}: item (delim item)*
        NAME: /[a-z]+/
        %ignore " "
    """,
    "json": r"""
        ?start: value
        ?value: object | array | ESCAPED_STRING | SIGNED_NUMBER | "true" | "false" | "null"
        array  : "[" [value ("," value)*] "]"
        object : "{" [pair ("," pair)*] "}"
        pair   : ESCAPED_STRING ":" value
        %import common.ESCAPED_STRING
        %import common.SIGNED_NUMBER
        %import common.WS
        %ignore WS
    """,
}
ALPHABETS = {
    "arith": "0123 +-*/()",
    "ambiguous": "ab",
    "empty_rules": "xkK=ab, ",
    "json": '{}[]",:1.-e tn\\a',
}


def small_vocab() -> Vocabulary:
    """Every byte as a token, plus multi-byte tokens that span lexeme boundaries, and an EOS."""
    extra = [
        b"ab",
        b"ba",
        b"aab",
        b"12",
        b"+(",
        b") ",
        b"1 + 2",
        b'{"',
        b'":',
        b'", "',
        b'"}',
        b"true",
        b"  ",
        b"x=",
        b"K=",
        b"xk",
        b"a,b",
        b", ",
        b"e-",
        b'\\"',
        b"],",
    ]
    tokens = [bytes([b]) for b in range(256)] + extra
    return Vocabulary(tokens + [b"</s>"], special_ids=[len(tokens)], eos_ids=[len(tokens)], name="small")


VOCAB = small_vocab()
ORACLES = {
    name: lark.Lark(text, parser="earley", lexer="dynamic_complete") for name, text in GRAMMARS.items()
}
COMPILED = {name: lark_grammar(text).compile(VOCAB) for name, text in GRAMMARS.items()}


def lark_accepts(name: str, text: str) -> bool:
    try:
        ORACLES[name].parse(text)
        return True
    except lark.exceptions.LarkError:
        return False


def our_accepts(name: str, text: str) -> bool:
    m = COMPILED[name].matcher()
    return m.accept_bytes(text.encode()) and m.is_accepting() if text else m.is_accepting()


def tokenize_greedy(text: bytes) -> list[int]:
    """A longest-match tokenization over the small vocabulary (one of many valid ones)."""
    out, i = [], 0
    index = {b: t for t, b in enumerate(VOCAB.token_bytes) if t not in VOCAB.special_ids}
    while i < len(text):
        for n in range(min(6, len(text) - i), 0, -1):
            if text[i : i + n] in index:
                out.append(index[text[i : i + n]])
                i += n
                break
    return out


@pytest.mark.parametrize("name", sorted(GRAMMARS))
@HS
@given(data=st.data())
def test_generated_strings_are_accepted_by_lark_and_by_the_matcher(name, data):
    """Property: a string derived from the grammar is in Lark's language, and our matcher accepts it (as
    bytes, and token by token under a greedy tokenization with each token in the mask, EOS at the end)."""
    text = data.draw(from_grammar(GRAMMARS[name], max_depth=5))
    assert lark_accepts(name, text), text
    assert our_accepts(name, text), text
    check_complete(COMPILED[name], tokenize_greedy(text.encode()), label=repr(text))


@pytest.mark.parametrize("name", sorted(GRAMMARS))
@HS
@given(data=st.data())
def test_language_equals_lark_on_mutated_and_random_strings(name, data):
    """Property: for random strings and single-edit mutations of valid ones, we accept iff Lark parses."""
    if data.draw(st.booleans()):
        text = data.draw(st.text(alphabet=ALPHABETS[name], max_size=12))
    else:
        text = data.draw(from_grammar(GRAMMARS[name], max_depth=4))
        pos = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        ch = data.draw(st.sampled_from(ALPHABETS[name]))
        if edit == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif edit == "insert":
            text = text[:pos] + ch + text[pos:]
        else:
            text = text[:pos] + ch + text[pos + 1 :]
    assert our_accepts(name, text) == lark_accepts(name, text), text
    if not lark_accepts(name, text):
        check_refuses(COMPILED[name], tokenize_greedy(text.encode()), label=repr(text))


@pytest.mark.parametrize("name", sorted(GRAMMARS))
@HS
@given(data=st.data())
def test_mask_agrees_with_accept_and_allowed_tokens_never_dead_end(name, data):
    """Property: along a valid prefix, every probed token is allowed by the mask iff `accept` takes it, and
    an allowed token always leaves a state that can still finish."""
    text = data.draw(from_grammar(GRAMMARS[name], max_depth=4))
    cut = data.draw(st.integers(0, len(text)))
    m = COMPILED[name].matcher()
    assert m.accept_bytes(text[:cut].encode()) or cut == 0
    check_sound_step(m, np.random.default_rng(cut), samples=24)


def test_ambiguous_grammar_accepts_every_split():
    for text, ok in [("ab", True), ("aab", True), ("abab", True), ("b", True), ("", False), ("c", False)]:
        assert our_accepts("ambiguous", text) == ok == lark_accepts("ambiguous", text), text


def test_real_tokenizer_json_every_token_allowed_and_eos_at_end(vocabularies, tokenizers):
    vocab = vocabularies("gpt2")
    tok = tokenizers("gpt2")
    compiled = lark_grammar(GRAMMARS["json"]).compile(vocab)
    text = '{"name": "Al\\"ice", "tags": [1, -2.5e3, true, null, {}], "n": {"x": []}}\n'
    check_complete(compiled, tok.encode(text, add_special_tokens=False), label=text)
    bad = '{"name": "Alice",}'
    check_refuses(compiled, tok.encode(bad, add_special_tokens=False), label=bad)


def test_rollback_and_fork_restore_states():
    compiled = COMPILED["arith"]
    m = compiled.matcher()
    assert m.accept_bytes(b"1+") and not m.is_accepting()
    f = m.fork()
    assert f.accept(VOCAB.token_id(b"2")) and f.is_accepting()
    assert not m.is_accepting()  # the fork is independent
    f.rollback(1)
    assert not f.is_accepting()
    assert f.accept(VOCAB.token_id(b"(")) and not f.is_accepting()
    with pytest.raises(ConstraintError):
        f.rollback(5)
    eos = next(iter(VOCAB.eos_ids))
    g = compiled.matcher()
    assert not g.accept(eos)
    assert g.accept(VOCAB.token_id(b"7")) and g.accept(eos) and g.is_terminated()
    assert not g.accept(VOCAB.token_id(b"7"))
    assert g.allowed_tokens().tolist() == [eos]
    g.rollback(1)
    assert not g.is_terminated() and g.accept(VOCAB.token_id(b"7"))


@pytest.mark.parametrize(
    "text, error, fragment",
    [
        ("start: foo", SpecError, "foo"),
        ('start: "a" )', SpecError, "line 1"),
        ("start: A\nA: /(?<=x)a/", UnsupportedError, "lookaround"),
        ("start: A\nA: /a*/", SpecError, "zero-width"),
        ("start: A\nA: /(/", SpecError, "missing )"),
        ("start: start", SpecError, "generates no string"),
        ("start: A\nA: /a{5000}/", CompileLimitError, "5000"),
        ("start: A\n%declare A", SpecError, "A"),
    ],
)
def test_bad_grammars_raise_constraint_errors_naming_the_place(text, error, fragment):
    with pytest.raises(error) as info:
        lark_grammar(text)
    assert fragment in str(info.value)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet='start:|"ab/*+?()[]%ignore WS\n->_.~{}0', max_size=40))
def test_fuzzed_grammar_text_raises_only_constraint_errors(text):
    """Property: arbitrary grammar text either compiles or raises a ConstraintError (never anything else)."""
    try:
        lark_grammar(text)
    except ConstraintError:
        pass


def test_grammar_ir_with_empty_matching_terminal_is_refused():
    from constrain.grammars.cfg import GrammarConstraint
    from constrain.grammars.earley import GrammarIR, Rule, Terminal

    ir = GrammarIR(terminals=(Terminal("A", "a*"),), rules=(Rule("s", ("A",)),), start="s")
    with pytest.raises(SpecError, match="A matches the empty string"):
        GrammarConstraint(ir).compile(VOCAB)
