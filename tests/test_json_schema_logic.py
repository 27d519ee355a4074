"""JSON Schema logic keywords (`not`, `if/then/else`, dependencies, overlapping `oneOf`, allOf merges),
property counts and property order: the accepted language agrees with the `jsonschema` validator (Draft
2020-12 unless the schema names its draft) on hypothesis-generated instances, in both directions."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import UnsupportedError, Vocabulary
from constrain.grammars.json_schema import MAX_ANY_ORDER_PROPERTIES, json_schema

VOCAB = Vocabulary(
    [bytes([b]) for b in range(256)] + [b"</s>"], special_ids=[256], eos_ids=[256], name="bytes"
)
HS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LOGIC = {
    "not_type": {"not": {"type": ["string", "null"]}},
    "not_enum": {"type": ["string", "boolean"], "not": {"enum": ["a", True]}},
    "not_required": {"type": "object", "not": {"required": ["a", "b"]}},
    "not_props": {"not": {"properties": {"a": {"type": ["string", "number"], "maxLength": 1, "minimum": 2}}}},
    "not_pattern": {"type": "string", "not": {"pattern": "^a"}},
    "if_then_else": {
        "type": "object",
        "if": {"properties": {"a": {"const": "x"}}, "required": ["a"]},
        "then": {"required": ["b"]},
        "else": {"properties": {"b": {"type": "null"}}},
    },
    "dependent_required": {"type": "object", "dependentRequired": {"a": ["b"], "c": ["a"]}},
    "dependencies": {
        "$schema": "http://json-schema.org/draft-07/schema#",  # `dependencies` is draft 4-7
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "dependencies": {"a": ["c"], "b": {"not": {"required": ["c"]}}},
    },
    "dependent_schemas": {
        "type": "object",
        "dependentSchemas": {
            "a": {"required": ["b"], "properties": {"b": {"type": "integer", "minimum": 1}}}
        },
    },
    "one_of_overlap": {"oneOf": [{"type": "number"}, {"type": "number", "minimum": 1}, {"type": "string"}]},
    "one_of_required": {"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    "property_counts": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {}},
        "minProperties": 1,
        "maxProperties": 2,
    },
    "all_of_closed": {  # each branch's additionalProperties counts only that branch's properties
        "allOf": [
            {"properties": {"a": {"type": "integer"}}, "additionalProperties": False},
            {"properties": {"a": {}, "b": {}}},
        ]
    },
    "enum_with_logic": {"enum": ["a", "bb", 3, None], "not": {"type": "null"}, "maxLength": 1},
    "pattern_properties_overlapping": {  # "b" matches both patterns: its value must satisfy both schemas
        "type": "object",
        "properties": {"a": {"type": ["integer", "string"]}},
        "patternProperties": {"^[ab]": {"type": "integer"}, "[bc]$": {"minimum": 0}, "^d": False},
        "additionalProperties": {"type": "string"},
    },
    "property_names_pattern": {
        "type": "object",
        "properties": {"a": {}, "d": {}},
        "propertyNames": {"pattern": "^[abc]$"},
        "patternProperties": {"^b": {"type": "integer"}},
    },
    "property_names_enum": {"type": "object", "propertyNames": {"enum": ["a", "c", 1]}, "minProperties": 1},
    "property_names_false": {"type": "object", "propertyNames": False},
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["a", "x", "ab", "bb", ""]), st.just(1.5)
)
instances = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abcd"), inner, max_size=4),
    max_leaves=8,
)
COMPILED = {name: json_schema(s, property_order="any").compile(VOCAB) for name, s in LOGIC.items()}


def accepts(compiled, text: str) -> bool:
    m = compiled.matcher()
    return m.accept_bytes(text.encode()) and m.is_accepting()


@pytest.mark.parametrize("name", sorted(LOGIC))
@HS
@given(value=instances)
def test_logic_keywords_accept_exactly_the_valid_instances(name, value):
    """Property: an instance (any key order, json.dumps spacing) is accepted iff Draft 2020-12 says it is
    valid — soundness and completeness of the rewrites of not / if / dependencies / oneOf / allOf."""
    schema = LOGIC[name]
    valid = jsonschema.validators.validator_for(schema)(schema).is_valid(value)
    assert accepts(COMPILED[name], json.dumps(value)) == valid, (name, value)


@HS
@given(value=st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 2), max_size=6))
def test_any_order_takes_each_property_once_in_any_order(value):
    """Property: with property_order="any", an object is accepted iff valid, whatever its key order."""
    schema = {
        "type": "object",
        "properties": {k: {"type": "integer", "maximum": 1} for k in "abcd"},
        "required": ["b", "c"],
        "additionalProperties": {"const": 2},
    }
    compiled = json_schema(schema, property_order="any", whitespace="compact").compile(VOCAB)
    valid = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert accepts(compiled, json.dumps(value, separators=(",", ":"))) == valid
    assert not accepts(compiled, '{"b":0,"c":1,"b":0}')  # a declared property at most once


def test_schema_order_is_the_default_and_refuses_other_orders():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    compiled = json_schema(schema).compile(VOCAB)
    assert accepts(compiled, '{"a": 1, "b": 2}') and not accepts(compiled, '{"b": 2, "a": 1}')
    assert accepts(json_schema(schema, property_order="any").compile(VOCAB), '{"b": 2, "a": 1}')


def test_any_order_with_too_many_properties_raises_naming_the_place():
    n = MAX_ANY_ORDER_PROPERTIES + 1
    schema = {"type": "object", "properties": {"p": {"properties": {f"k{i}": {} for i in range(n)}}}}
    with pytest.raises(UnsupportedError, match="#/properties/p"):
        json_schema(schema, property_order="any")
    assert json_schema(schema, property_order="any", lenient=True).ignored == ["#/properties/p/properties"]


def test_referenced_properties_come_first_in_schema_order():
    """allOf/$ref members: the referenced schema's properties first, then the siblings (as llguidance)."""
    schema = {
        "$defs": {"base": {"properties": {"priority": {"type": "number"}}, "required": ["priority"]}},
        "allOf": [{"$ref": "#/$defs/base"}],
        "properties": {"options": {"type": "object"}},
    }
    compiled = json_schema(schema).compile(VOCAB)
    assert accepts(compiled, '{"priority": 1, "options": {}}')


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"not": {"format": "date"}}, "not"),
        ({"oneOf": [{"type": "string"}, {"format": "date"}]}, "oneOf"),
        ({"type": "object", "if": {"propertyNames": {"maxLength": 2}}, "then": {"required": ["a"]}}, "if"),
        ({"type": "object", "propertyNames": {"not": {"const": "a"}}}, "propertyNames"),
        ({"type": "object", "maxProperties": 1000}, "maxProperties"),
    ],
)
def test_logic_keywords_without_an_exact_rewrite_raise_or_are_listed_when_lenient(schema, keyword):
    with pytest.raises(UnsupportedError, match=keyword):
        json_schema(schema)
    assert any(keyword in item for item in json_schema(schema, lenient=True).ignored)


def test_overlapping_patterns_with_equal_schemas_are_one_conjunct():
    """Patterns that all `$ref` one definition (which has patternProperties of its own) need no merge."""
    schema = {
        "definitions": {"cmd": {"type": "object", "patternProperties": {"^k": {"type": "integer"}}}},
        "type": "object",
        "patternProperties": {".*": {"$ref": "#/definitions/cmd"}, "^x$": {"$ref": "#/definitions/cmd"}},
    }
    compiled = json_schema(schema).compile(VOCAB)
    for value in ({"x": {"k": 1}}, {"y": {"k": "s"}}, {"x": {"k": "s"}}, {"x": 1}):
        assert accepts(compiled, json.dumps(value)) == jsonschema.Draft202012Validator(schema).is_valid(value)
