"""JSON Schema numbers: `multipleOf` and decimal bounds are enforced exactly, as decimals. The oracle is
the `jsonschema` validator (Draft 2020-12) with the schema and the instance both read as exact fractions
(`parse_float=Fraction`), so that 0.07 is a multiple of 0.01 as the specification says (float division
says otherwise)."""

from __future__ import annotations

import json
from fractions import Fraction

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import SpecError, UnsupportedError, Vocabulary
from constrain.grammars.json_numbers import cmp_regex, multiple_dfa
from constrain.grammars.json_schema import json_schema

VOCAB = Vocabulary(
    [bytes([b]) for b in range(256)] + [b"</s>"], special_ids=[256], eos_ids=[256], name="bytes"
)
HS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STEPS = [1, 3, 7, 12, 0.01, 0.5, 2.5, 0.25, 0.3, 0.001, 1.5]
BOUNDS = [-100, -2.5, -1, -0.5, -0.01, 0, 0.01, 0.5, 1, 2.5, 7, 99.99]


def accepts(compiled, text: str) -> bool:
    m = compiled.matcher()
    return m.accept_bytes(text.encode()) and m.is_accepting()


def oracle(schema: dict, text: str) -> bool:
    """Draft 2020-12 validity, reading every number of the schema and of `text` as an exact decimal."""
    exact_schema = json.loads(json.dumps(schema), parse_float=Fraction)
    value = json.loads(text, parse_float=Fraction)
    return jsonschema.Draft202012Validator(exact_schema).is_valid(value)


def decimal_text(value: Fraction, zeros: int = 0, minus_zero: bool = False) -> str:
    """The exponent-free spelling of a finite decimal, with `zeros` extra trailing fraction zeros."""
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    scaled = abs(value * 10**places).numerator
    whole, frac = divmod(scaled, 10**places)
    sign = "-" if value < 0 or (value == 0 and minus_zero) else ""
    digits = str(frac).rjust(places, "0") if places else ""
    digits += "0" * zeros
    return sign + str(whole) + ("." + digits if digits else "")


DELTAS = [Fraction(0), Fraction(1, 1000), Fraction(1, 100), Fraction(1, 2), Fraction(1), Fraction(7, 3)]


@st.composite
def number_texts(draw, anchors: list[Fraction]) -> str:
    """Decimal spellings near the schema's bounds and multiples of its step (and anywhere), with trailing
    zeros and minus zero sometimes, and sometimes an exponent."""
    if anchors and draw(st.integers(0, 3)):
        value = draw(st.sampled_from(anchors)) * draw(st.sampled_from([1, -1, 2, 3, -5]))
        delta = draw(st.sampled_from(DELTAS))
        value += delta if draw(st.booleans()) else -delta
        if value.denominator % 3 == 0:  # 1/3 has no decimal form: cut it to its whole part
            value = Fraction(int(value))
    else:
        value = Fraction(draw(st.integers(-12000, 12000)), 10 ** draw(st.integers(0, 4)))
    text = decimal_text(value, draw(st.integers(0, 2)) if draw(st.booleans()) else 0, draw(st.booleans()))
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["e0", "e1", "E-1", "e+2", "e-3"]))
    return text


@st.composite
def number_schemas(draw) -> dict:
    schema: dict = {"type": draw(st.sampled_from(["number", "integer"]))}
    if draw(st.booleans()):
        schema["multipleOf"] = draw(st.sampled_from(STEPS))
    for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if draw(st.integers(0, 3)) == 0:
            schema[key] = draw(st.sampled_from(BOUNDS))
    return schema


def anchors_of(schema: dict) -> list[Fraction]:
    return [Fraction(repr(v)) for k, v in schema.items() if k != "type"]


@HS
@given(data=st.data())
def test_number_keywords_accept_exactly_the_valid_exponent_free_spellings(data):
    """Property: every accepted number is valid (soundness, exponent spellings included); every valid
    exponent-free spelling is accepted (completeness), except integers written with a fraction or as -0,
    which the integer grammar refuses (a documented gap)."""
    schema = data.draw(number_schemas())
    texts = data.draw(st.lists(number_texts(anchors_of(schema)), min_size=10, max_size=25))
    try:
        compiled = json_schema(schema).compile(VOCAB)
    except SpecError as exc:  # the bounds leave no number: then no text is valid
        assert "generates no string" in str(exc)
        assert not any(oracle(schema, text) for text in texts)
        return
    for text in texts:
        ok = oracle(schema, text)
        got = accepts(compiled, text)
        if got:
            assert ok, (schema, text)
        canonical = "e" not in text.lower() and (
            schema["type"] == "number" or ("." not in text and text != "-0")
        )
        if ok and canonical:
            assert got, (schema, text)


@pytest.mark.parametrize("step", [Fraction(1), Fraction(7), Fraction(1, 100), Fraction(5, 2), Fraction(3, 8)])
@pytest.mark.parametrize("integer_only", [False, True])
def test_multiple_dfa_matches_exactly_the_multiples(step, integer_only):
    """Every spelling -?(0|[1-9]d*)(.d+)? of the numbers k/1000 (|k| < 3000), with 0-2 trailing zeros, is
    accepted iff it is a multiple of `step` (and an integer spelling, with `integer_only`)."""
    dfa = multiple_dfa(step, integer_only=integer_only)
    for k in range(-3000, 3001):
        value = Fraction(k, 1000)
        whole, frac = divmod(abs(k), 1000)
        sign = "-" if k < 0 else ""
        spellings = [f"{sign}{whole}.{frac:03d}" + "0" * z for z in range(3)]
        if frac == 0:
            spellings.append(f"{sign}{whole}")
        for text in spellings:
            want = (value / step).denominator == 1 and (not integer_only or "." not in text)
            assert dfa.matches(text.encode()) == want, (step, text)
    assert not dfa.matches(b"01") and not dfa.matches(b"1.") and not dfa.matches(b"--0")


@given(
    shift=st.integers(-1, 1),
    frac=st.text("0123456789", max_size=4),
    bound=st.sampled_from(BOUNDS),
    prefix=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_cmp_regex_compares_decimals_exactly(shift, frac, bound, prefix):
    """Property: cmp_regex(op, b) matches a non-negative spelling iff its value compares so with b (values
    drawn around b: the same whole part give or take one, fraction digits that share a prefix with b's)."""
    import re

    b = abs(Fraction(repr(float(bound))))
    exact_text = decimal_text(b)
    if prefix and "." in exact_text:
        frac = exact_text.split(".")[1][: len(frac)] + frac[len(frac) // 2 :]
    text = str(max(int(b) + shift, 0)) + ("." + frac if frac else "")
    value = Fraction(text)
    for op, want in ((">", value > b), (">=", value >= b), ("<", value < b), ("<=", value <= b)):
        pattern = cmp_regex(op, b)
        assert bool(pattern and re.fullmatch(pattern, text)) == want, (op, b, text)


def test_multiple_of_is_exact_where_float_division_is_not():
    compiled = json_schema({"type": "number", "multipleOf": 0.01}).compile(VOCAB)
    assert 0.07 / 0.01 != 7  # what a float check gets wrong
    assert accepts(compiled, "0.07") and accepts(compiled, "-3.10") and accepts(compiled, "5")
    assert not accepts(compiled, "0.075") and not accepts(compiled, "1e2")  # 1e2: no exponents (a gap)


def test_multiple_of_conjunction_is_the_least_common_multiple():
    compiled = json_schema({"allOf": [{"multipleOf": 0.5}, {"multipleOf": 0.3}]}).compile(VOCAB)
    assert [t for t in ["0", "0.3", "0.5", "1.5", "3", "4.5", "2"] if accepts(compiled, t)] == [
        "0",
        "1.5",
        "3",
        "4.5",
    ]


def test_enum_values_are_filtered_by_multiple_of_exactly():
    compiled = json_schema({"enum": [0.07, 0.075, "x"], "multipleOf": 0.01}).compile(VOCAB)
    assert accepts(compiled, "0.07") and accepts(compiled, '"x"') and not accepts(compiled, "0.075")


@pytest.mark.parametrize("step", [0, -1, "2", True])
def test_multiple_of_must_be_a_positive_number(step):
    with pytest.raises(SpecError, match="multipleOf at #"):
        json_schema({"type": "number", "multipleOf": step})


def test_multiple_of_with_a_huge_modulus_raises_naming_it_or_is_listed_when_lenient():
    schema = {"properties": {"n": {"type": "integer", "multipleOf": 1000003}}}
    with pytest.raises(UnsupportedError, match="'multipleOf' at #/properties/n"):
        json_schema(schema)
    assert json_schema(schema, lenient=True).ignored == ["#/properties/n/multipleOf"]


def test_not_multiple_of_has_no_exact_rewrite():
    with pytest.raises(UnsupportedError, match="not"):
        json_schema({"type": "number", "not": {"multipleOf": 2}})


@pytest.mark.parametrize(
    "schema, yes, no",
    [
        ({"type": "number", "minimum": 0}, ["0", "-0", "-0.00", "0.5"], ["-0.001", "-1"]),
        ({"type": "number", "exclusiveMinimum": 0}, ["0.001", "1e-3"], ["0", "-0", "-0.0"]),
        ({"type": "number", "maximum": 0}, ["-0.5", "0", "-0", "0.000"], ["0.1", "1e-9"]),
        (
            {"type": "number", "minimum": 0.01, "exclusiveMaximum": 99.99},
            ["0.01", "0.010", "99.98999"],
            ["0.00999", "99.99", "99.990", "1e-3"],
        ),
        (
            {"type": "number", "minimum": -0.5, "maximum": 2.5},
            ["-0.5", "2.5", "1e-5", "-0.49"],
            ["-0.51", "2.5001", "3"],
        ),
        ({"type": "integer", "minimum": 0.5, "maximum": 2.5}, ["1", "2"], ["0", "3", "1.5"]),
        ({"type": "number", "minimum": 0, "maximum": 0.5}, ["-0", "-0.0", "0.5"], ["-0.1", "0.51"]),
        ({"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.5}, ["0.5", "1.50"], ["0", "-0", "-0.5"]),
        ({"type": "number", "maximum": 0, "multipleOf": 0.5}, ["-0", "0", "-1.5"], ["0.5", "-0.2"]),
    ],
)
def test_decimal_bounds_at_their_edges(schema, yes, no):
    compiled = json_schema(schema).compile(VOCAB)
    assert [t for t in yes if not accepts(compiled, t)] == []
    assert [t for t in no if accepts(compiled, t)] == []
    assert all(oracle(schema, t) for t in yes) and not any(oracle(schema, t) for t in no)
