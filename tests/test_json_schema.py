"""JSON Schema constraints: the accepted language agrees with the `jsonschema` validator on generated valid
values and on mutations of them, real tokenizations are accepted token by token, options work, and keywords
we cannot enforce raise `UnsupportedError` (or are listed under `lenient=True`)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from constrain import SpecError, UnsupportedError, Vocabulary
from constrain.grammars.json_schema import int_range_regex, json_schema, string_literal_regex
from constrain.testing import check_complete, from_schema, json_text

HS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "mixed": {
        "type": "object",
        "properties": {
            "kind": {"const": "point"},
            "xy": {
                "type": "array",
                "prefixItems": [{"type": "number"}, {"type": "number"}],
                "items": False,
                "minItems": 2,
            },
            "when": {"type": "string", "format": "date"},
            "id": {"anyOf": [{"type": "string", "pattern": "^[a-f0-9]{4}$"}, {"type": "null"}]},
        },
        "required": ["kind"],
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "bounded_number": {"type": "number", "minimum": -3, "exclusiveMaximum": 7},
    "pattern_props": {
        "type": "object",
        "properties": {"title": {"type": "string"}, "c1": {"type": "integer"}},
        "patternProperties": {"^c[0-9]$": {"type": "integer", "minimum": 0}},
        "additionalProperties": {"type": "boolean"},
    },
    "one_of_types": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "integer"}, {"type": "boolean"}]},
}


def small_vocab() -> Vocabulary:
    tokens = [bytes([b]) for b in range(256)] + [
        b'{"',
        b'":',
        b'", "',
        b'"}',
        b", ",
        b": ",
        b"true",
        b"null",
        b"12",
    ]
    return Vocabulary(tokens + [b"</s>"], special_ids=[len(tokens)], eos_ids=[len(tokens)], name="small")


VOCAB = small_vocab()
COMPILED = {name: json_schema(s).compile(VOCAB) for name, s in SCHEMAS.items()}


def accepts(name: str, text: str) -> bool:
    m = COMPILED[name].matcher()
    return m.accept_bytes(text.encode()) and m.is_accepting()


def valid(name: str, text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    checker = jsonschema.FormatChecker()
    return jsonschema.validators.validator_for(SCHEMAS[name])(SCHEMAS[name], format_checker=checker).is_valid(
        value
    )


def in_schema_order(name: str, value, schema=None) -> object:
    """Reorder object keys as the schema lists them, recursively (the default property order we enforce)."""
    root = SCHEMAS[name]
    schema = root if schema is None else schema
    while isinstance(schema, dict) and "$ref" in schema:
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        schema = node
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        order = list(props)
        keys = sorted(value, key=lambda k: order.index(k) if k in order else len(order))
        return {k: in_schema_order(name, value[k], props.get(k, True)) for k in keys}
    if isinstance(value, list):
        return [in_schema_order(name, v, schema.get("items", True)) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@HS
@given(data=st.data())
def test_valid_values_are_accepted_in_every_whitespace_style(name, data):
    """Property: a value the validator accepts (keys in schema order), serialised compact, with json.dumps'
    spacing or indented, is accepted in full (byte by byte and token by token, EOS at the end)."""
    value = in_schema_order(name, data.draw(from_schema(SCHEMAS[name])))
    for style in ("compact", "default", "indent"):
        text = json_text(value, style)
        assert accepts(name, text), text
    tokens = [VOCAB.token_id(bytes([b])) for b in json_text(value).encode()]
    check_complete(COMPILED[name], tokens, label=json_text(value))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@HS
@given(data=st.data())
def test_mutated_texts_are_accepted_only_if_valid(name, data):
    """Property: after a one-character edit of a valid text, we accept iff the text is valid JSON that the
    validator (with format checks) accepts — never an invalid instance (soundness)."""
    value = in_schema_order(name, data.draw(from_schema(SCHEMAS[name])))
    text = json_text(value, data.draw(st.sampled_from(["compact", "default"])))
    pos = data.draw(st.integers(0, len(text)))
    ch = data.draw(st.sampled_from(list('{}[]",:0123456789-.eabtnul x')))
    edit = data.draw(st.sampled_from(["delete", "insert", "replace"]))
    if edit == "delete":
        text = text[:pos] + text[pos + 1 :]
    elif edit == "insert":
        text = text[:pos] + ch + text[pos:]
    else:
        text = text[:pos] + ch + text[pos + 1 :]
    if accepts(name, text):
        assert valid(name, text), text


def test_real_tokenizer_instances_accepted_token_by_token(vocabularies, tokenizers):
    vocab, tok = vocabularies("llama3"), tokenizers("llama3")
    compiled = json_schema(SCHEMAS["person"]).compile(vocab)
    for value in [
        {"name": "Ann", "age": 41, "tags": ["a", "c"]},
        {"name": "Zoë", "age": 0, "email": "a.b@c.de"},
    ]:
        text = json.dumps(value, ensure_ascii=False)
        check_complete(compiled, tok.encode(text, add_special_tokens=False), label=text)


def test_known_invalid_instances_are_refused():
    for name, text in [
        ("person", '{"name": "", "age": 3}'),
        ("person", '{"name": "a", "age": 131}'),
        ("person", '{"name": "a", "age": 3, "x": 1}'),
        ("person", '{"age": 3}'),
        ("mixed", '{"kind": "line"}'),
        ("mixed", '{"kind": "point", "xy": [1]}'),
        ("mixed", '{"kind": "point", "when": "2024-13-01"}'),
        ("mixed", '{"kind": "point", "id": "abcg"}'),
        ("recursive", '{"v": 1, "kids": [{"kids": []}]}'),
        ("bounded_number", "7"),
        ("bounded_number", "-3.5"),
        ("one_of_types", '"abcd"'),
        ("pattern_props", '{"c1": -1}'),
        ("pattern_props", '{"c2": true}'),
        ("pattern_props", '{"x": 1}'),
    ]:
        assert not valid(name, text), text
        assert not accepts(name, text), text
    assert (
        accepts("bounded_number", "6.99")
        and accepts("bounded_number", "-3")
        and accepts("bounded_number", "-2.5")
    )


def test_extra_properties_follow_declared_ones_and_may_not_repeat_declared_names():
    c = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}).compile(VOCAB)

    def ok(text):
        m = c.matcher()
        return m.accept_bytes(text.encode()) and m.is_accepting()

    assert ok('{"a": 1, "b": [true, {"x": null}]}') and ok('{"zz": "a"}') and ok("{}")
    assert not ok('{"a": 1, "a": 2}')  # the extra-key terminal excludes declared names
    assert not ok('{"a": "no"}')


@settings(max_examples=200, deadline=None)
@given(st.integers(-5000, 5000), st.integers(-5000, 5000), st.integers(-(10**5), 10**5))
def test_integer_range_regex_matches_exactly_the_range(a, b, n):
    """Property: the integer-range regex matches n iff lo <= n <= hi (and only canonical spellings)."""
    lo, hi = min(a, b), max(a, b)
    assert bool(re.fullmatch(int_range_regex(lo, hi), str(n))) == (lo <= n <= hi)
    assert bool(re.fullmatch(int_range_regex(lo, None), str(n))) == (n >= lo)
    assert bool(re.fullmatch(int_range_regex(None, hi), str(n))) == (n <= hi)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=6))
def test_string_literal_regex_matches_every_json_spelling(s):
    """Property: json.dumps with and without ASCII escaping both spell the string the regex accepts."""
    r = re.compile(string_literal_regex(s))
    assert r.fullmatch(json.dumps(s)) and r.fullmatch(json.dumps(s, ensure_ascii=False))
    assert not r.fullmatch(json.dumps(s + "x"))


class Point(BaseModel):
    x: int
    y: float
    label: str | None = None


def test_pydantic_model_is_accepted_and_parsed_back():
    c = json_schema(Point)
    m = c.compile(VOCAB).matcher()
    text = '{"x": 3, "y": 2.5, "label": null}'
    assert m.accept_bytes(text.encode()) and m.is_accepting()
    assert c.parse(text) == Point(x=3, y=2.5)
    m = c.compile(VOCAB).matcher()
    assert not m.accept_bytes(b'{"x": 3.5')


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "integer"}}, "not"),
        ({"oneOf": [{"type": "string"}, {"format": "date"}]}, "oneOf"),
        ({"type": "number", "multipleOf": 1000003}, "multipleOf"),
    ],
)
def test_unenforceable_keywords_raise_or_are_listed_when_lenient(schema, keyword):
    with pytest.raises(UnsupportedError, match=keyword):
        json_schema(schema)
    assert any(keyword in item for item in json_schema(schema, lenient=True).ignored)


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ({"$ref": "#/$defs/missing"}, "does not resolve"),
        ({"$ref": "http://x.org/s.json"}, "only local"),
        ({"type": "strin"}, "unknown type"),
        (False, "no string"),
        ({"type": "string", "maxLength": -1}, "maxLength"),
        ('{"type": ', "not JSON"),
        ({"type": "string", "pattern": "("}, "pattern"),
        (42, "object or a boolean"),
    ],
)
def test_malformed_schemas_raise_spec_errors_naming_the_place(schema, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)):
        json_schema(schema)


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "type",
                        "items",
                        "properties",
                        "required",
                        "enum",
                        "minimum",
                        "$ref",
                        "anyOf",
                        "pattern",
                        "maxLength",
                        "const",
                        "x",
                    ]
                ),
                inner,
                max_size=3,
            )
        ),
        max_leaves=10,
    )
)
def test_fuzzed_schemas_compile_or_raise_constraint_errors(schema):
    """Property: any JSON value given as a schema either compiles or raises a ConstraintError."""
    from constrain import ConstraintError

    try:
        json_schema(schema)
    except ConstraintError:
        pass


def test_jump_forward_reports_forced_bytes_and_safe_tokens():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
        "additionalProperties": False,
    }
    compiled = json_schema(schema, whitespace="compact").compile(VOCAB)
    m = compiled.matcher()
    assert m.forced_bytes() == b'{"name":"'
    assert m.accept_bytes(b'{"name":"Al"')
    assert m.forced_bytes() == b',"ok":'
    tokens = m.forced_tokens()
    # greedy split: , " o k ": — the last token is left to the model (a longer one could span it)
    assert b"".join(VOCAB.token_bytes[t] for t in tokens) == b',"ok'
    assert m.accepts(tokens)
    assert m.accept_bytes(b',"ok":t')
    assert m.forced_bytes() == b"rue}"
    m.accept_bytes(b"rue}")
    assert m.forced_bytes() == b""  # complete: EOS or nothing
    flexible = json_schema(schema).compile(VOCAB).matcher()
    assert flexible.forced_bytes() == b""  # leading whitespace is a choice


@pytest.mark.parametrize(
    "pattern", [r"^a|b$", r"^$|^[0-9]+(/[0-9])?$", r"ab", r"^x\$", r"^(a|b)c$", r"^a|^b|c"]
)
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet='ab0/$xc\n"\\é', max_size=5))
def test_pattern_follows_python_re_search_on_json_spellings(pattern, text):
    """Property: a JSON string (json.dumps spelling, with or without ASCII escaping) is accepted by the
    pattern's content regex iff `re.search(pattern, decoded)` (jsonschema's semantics), anchors included."""
    from constrain.grammars.json_schema import _Lowering

    content = re.compile(
        _Lowering({}, whitespace="compact", max_whitespace=0, lenient=False).json_pattern(pattern, "#")
    )
    expected = bool(re.search(pattern, text))
    assert bool(content.fullmatch(json.dumps(text)[1:-1])) == expected
    assert bool(content.fullmatch(json.dumps(text, ensure_ascii=False)[1:-1])) == expected


def test_whitespace_options_compact_flexible_and_indented():
    schema = SCHEMAS["person"]
    value = {"name": "Ann", "age": 4, "tags": ["a"]}

    def ok(options, text):
        m = json_schema(schema, **options).compile(VOCAB).matcher()
        return m.accept_bytes(text.encode()) and m.is_accepting()

    compact, spaced, indented = json_text(value, "compact"), json_text(value), json_text(value, "indent")
    assert ok({"whitespace": "compact"}, compact) and not ok({"whitespace": "compact"}, spaced)
    assert ok({}, compact) and ok({}, spaced) and ok({}, indented)
    assert ok({"whitespace": "indented"}, indented) and not ok(
        {"whitespace": "indented"}, '{ "name": "Ann", "age": 4}'
    )
    assert not ok({"max_whitespace": 3}, '{"name":     "Ann", "age": 4}')  # more than 3 in one gap
    with pytest.raises(SpecError, match="whitespace"):
        json_schema(schema, whitespace="loose")
