"""The shipped grammars (grammars/*.lark): real examples parse with Lark and are accepted token by token under
a real tokenizer, broken ones are refused, and text sampled at random under the masks parses with Lark."""

from __future__ import annotations

import lark
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from constrain.grammars.lark import SHIPPED, shipped_grammar, shipped_grammar_text
from constrain.testing import check_complete, check_refuses, from_grammar

EXAMPLES = {
    "json": (
        ['{"a": [1, 2.5e-3, -0], "b": {"c": null, "d": "x\\"y\\u00e9"}}', "[]", "  true ", '"just a string"'],
        ['{"a": 1,}', "[1 2]", "01", '{"a" 1}', "tru"],
    ),
    "arithmetic": (
        ["1 + 2 * (3 - 4.5) / 6", "-(2^3^2)", "((7))", "10 - -3"],
        ["1 +", "(1", "2 ** 3", "1.", "* 2"],
    ),
    "sql_select": (
        [
            "SELECT name, COUNT(*) AS n FROM users AS u WHERE age >= 18 AND city IN ('Paris', 'Rome') "
            "GROUP BY name ORDER BY n DESC LIMIT 10;",
            "select * from t",
            "SELECT a.x FROM a LEFT JOIN b ON a.id = b.id WHERE NOT b.y IS NULL",
        ],
        ["SELECT FROM t", "SELECT a FROM", "SELECT a FROM t WHERE", "SELECT a, FROM t", "SELECT 'x FROM t"],
    ),
    "python_call": (
        [
            'f(1, "a", x=[1, 2], y={"k": None}, z=g(True))',
            "os.path.join('a', 'b')",
            "h()",
            "m.n(t=(1,), u=-2.5e3)",
        ],
        ["f(", "f(x=)", "(1)", "f(1,,2)", "f(**k)"],
    ),
    "csv": (
        ['a,b,c\n1,"x, y",3\n', 'name\n"He said ""hi"""\n', ",,\n"],
        ['a,"b\n', "a,b", 'a,b"c\n'],
    ),
}


@pytest.fixture(scope="module")
def gpt2(vocabularies, tokenizers):
    return vocabularies("gpt2"), tokenizers("gpt2")


@pytest.mark.parametrize("name", SHIPPED)
def test_real_examples_parse_and_are_accepted_token_by_token(name, gpt2):
    vocab, tok = gpt2
    oracle = lark.Lark(shipped_grammar_text(name), parser="earley", lexer="dynamic_complete")
    compiled = shipped_grammar(name).compile(vocab)
    good, bad = EXAMPLES[name]
    for text in good:
        oracle.parse(text)
        check_complete(compiled, tok.encode(text), label=text)
    for text in bad:
        with pytest.raises(lark.exceptions.LarkError):
            oracle.parse(text)
        check_refuses(compiled, tok.encode(text), label=text)


def _finishes(m, token: int) -> bool:
    f = m.fork()
    return f.accept(token) and f.is_accepting()


@pytest.mark.parametrize("name", SHIPPED)
def test_text_sampled_under_the_masks_parses_with_lark(name, gpt2):
    """Random generation: pick allowed tokens at random (EOS with probability 1/2 when allowed); every
    finished text must parse."""
    vocab, _ = gpt2
    oracle = lark.Lark(shipped_grammar_text(name), parser="earley", lexer="dynamic_complete")
    compiled = shipped_grammar(name).compile(vocab)
    rng = np.random.default_rng(0)
    finished = 0
    for _ in range(6):
        m = compiled.matcher()
        out = []
        for _ in range(40):
            allowed = m.allowed_tokens()
            eos = [t for t in allowed if t in vocab.eos_ids]
            if eos and rng.random() < 0.5:
                finished += 1
                oracle.parse(vocab.decode(out))
                break
            choices = [t for t in allowed if t not in vocab.eos_ids]
            # prefer short tokens, and now and then one that completes the text, so walks finish
            short = [t for t in choices if len(vocab.token_bytes[t]) <= 2] or choices
            t = int(rng.choice(short))
            if rng.random() < 0.3:
                singles = [c for c in choices if len(vocab.token_bytes[c]) == 1]
                candidates = list(rng.choice(choices, size=min(60, len(choices)))) + singles
                finishing = [int(c) for c in candidates if _finishes(m, int(c))]
                t = int(finishing[0]) if finishing else t
            assert m.accept(t)
            out.append(t)
    assert finished >= 1


@pytest.mark.parametrize("name", SHIPPED)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=__import__("hypothesis").strategies.data())
def test_generated_sentences_are_accepted(name, data, gpt2):
    """Property: strings derived from the grammar parse with Lark and are accepted as GPT-2 tokens."""
    vocab, tok = gpt2
    text = data.draw(from_grammar(shipped_grammar_text(name), max_depth=4))
    lark.Lark(shipped_grammar_text(name), parser="earley", lexer="dynamic_complete").parse(text)
    check_complete(shipped_grammar(name).compile(vocab), tok.encode(text), label=repr(text))
