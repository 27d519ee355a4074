"""Schema algebra for the JSON-schema lowering: keywords that have no grammar of their own are rewritten,
exactly, into ones that do (`anyOf`, `allOf`, `properties`, `required`, bounds).

    not S                       -> negate(S): a positive schema with the complementary set of instances
    if I then T else E          -> anyOf[allOf[I, T], allOf[not I, E]]
    dependentRequired {k: D}    -> anyOf[{properties: {k: false}}, {required: [k, *D]}]
    dependentSchemas {k: S}     -> anyOf[{properties: {k: false}}, allOf[{required: [k]}, S]]
    dependencies {k: D | S}     -> the two above (draft 4-7)
    oneOf [A1..An]              -> anyOf[A1 and not Aj (for each j that can overlap A1), ...]

`negate` handles what the rest of the lowering can express: types, `enum`/`const` of strings, booleans and
null, `required`, `properties`, string lengths and `pattern`, numeric, item and property-count bounds, and
`not`/`anyOf`/`allOf`/`$ref` of those. Anything else makes it return None, and the caller reports the keyword
as unsupported: a rewrite is exact or it is not made.

Two internal keywords carry negations that JSON Schema has no positive keyword for; the lowering enforces
them: `NOT_ENUM` (the value is none of these strings/booleans/null) and `NOT_PATTERN` (a list of
patterns; a string that `re.search` matches with none of them).
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

NOT_ENUM = "$constrain:notEnum"
NOT_PATTERN = "$constrain:notPattern"
ALL_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_NEGATION_DEPTH = 12

# Keywords whose negation is one schema, by keyword: value -> schema (None: no positive form).
_FLIP: dict[str, Callable[[Any], dict | None]] = {
    "minLength": lambda n: {"type": "string", "maxLength": n - 1} if n > 0 else None,
    "maxLength": lambda n: {"type": "string", "minLength": n + 1},
    "minItems": lambda n: {"type": "array", "maxItems": n - 1} if n > 0 else None,
    "maxItems": lambda n: {"type": "array", "minItems": n + 1},
    "minProperties": lambda n: {"type": "object", "maxProperties": n - 1} if n > 0 else None,
    "maxProperties": lambda n: {"type": "object", "minProperties": n + 1},
    "pattern": lambda p: {"type": "string", NOT_PATTERN: [p]},
}
_NUMERIC_FLIP = {
    "minimum": "exclusiveMaximum",
    "maximum": "exclusiveMinimum",
    "exclusiveMinimum": "maximum",
    "exclusiveMaximum": "minimum",
}
# Keywords that only annotate (no effect on validity).
_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "example",
    "$schema",
    "$id",
    "id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$anchor",
    "$defs",
    "definitions",
    "contentMediaType",
    "contentEncoding",
    "discriminator",
}


class NotExpressible(Exception):
    """A negation (or rewrite) that has no exact positive form here."""


def _types(value: Any) -> set[str]:
    return {value} if isinstance(value, str) else set(value)


def negate(schema: Any, deref: Callable[[Any], Any], known: set[str], depth: int = 0) -> Any:
    """A schema accepting exactly the instances `schema` refuses.

    Args:
        schema: a schema (dict or bool); `$ref`s are followed with `deref`.
        deref: resolves a `{"$ref": ...}` schema (with no other keywords) to its target.
        known: the validation keywords the caller knows; any other keyword is an annotation (ignored).

    Raises:
        NotExpressible: some keyword's complement cannot be written exactly with what the lowering enforces.
    """
    if depth > MAX_NEGATION_DEPTH:
        raise NotExpressible("nesting too deep")
    if isinstance(schema, dict) and set(schema) & {"$ref"}:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        target = negate(deref({"$ref": schema["$ref"]}), deref, known, depth + 1)
        if not _validation_keys(rest, known):
            return target
        return {"anyOf": [target, negate(rest, deref, known, depth + 1)]}
    if schema is True:
        return False
    if schema is False:
        return True
    if not isinstance(schema, dict):
        raise NotExpressible(f"schema of type {type(schema).__name__}")
    keys = _validation_keys(schema, known)
    parts: list[Any] = []  # not(schema) = anyOf(parts)
    for k in keys:
        v = schema[k]
        if k == "not":
            parts.append(v)
        elif k == "anyOf":
            parts.append({"allOf": [negate(x, deref, known, depth + 1) for x in v]})
        elif k == "allOf":
            parts.extend(negate(x, deref, known, depth + 1) for x in v)
        elif k == "type":
            rest = set(ALL_TYPES) - _types(v)
            if "number" in _types(v):
                rest.discard("integer")
            elif "integer" in _types(v):
                raise NotExpressible("non-integer numbers (not integer)")
            if rest:
                parts.append({"type": sorted(rest)})
        elif k in ("enum", "const"):
            values = v if k == "enum" else [v]
            if any(not (isinstance(x, str | bool) or x is None) for x in values):
                raise NotExpressible(f"{k} with numbers, arrays or objects")
            parts.append({NOT_ENUM: list(values)})
        elif k in _FLIP:
            flipped = _FLIP[k](v)
            if flipped is not None:
                parts.append(flipped)
        elif k in _NUMERIC_FLIP:
            if isinstance(v, bool):
                raise NotExpressible("draft-4 boolean exclusive bounds")
            parts.append({"type": "number", _NUMERIC_FLIP[k]: v})
        elif k == "required":
            parts.extend({"type": "object", "properties": {name: False}} for name in dict.fromkeys(v))
        elif k == "properties":
            if _validation_keys(
                {x: schema[x] for x in ("additionalProperties", "patternProperties") if x in schema}, known
            ):
                raise NotExpressible("properties beside additionalProperties/patternProperties")
            for name, sub in v.items():
                neg = negate(sub, deref, known, depth + 1)
                if neg is not False:  # the property is present with a value `sub` refuses
                    parts.append({"type": "object", "required": [name], "properties": {name: neg}})
        elif k == "additionalProperties" and v is True:
            continue
        else:
            raise NotExpressible(f"keyword {k!r}")
    if not parts:
        return False
    return parts[0] if len(parts) == 1 else {"anyOf": parts}


def _validation_keys(schema: dict, known: set[str]) -> list[str]:
    return [k for k in schema if k in known and k not in _ANNOTATIONS]


def conjuncts(schema: dict, deref: Callable[[Any], Any], known: set[str], exclusive: Callable) -> list[Any]:
    """The rewrites of `schema`'s logic keywords (`not`, `if`, dependencies, overlapping `oneOf`), as a
    list of schemas whose conjunction, with the schema's other keywords, is `schema`.

    `exclusive(a, b)` says whether no instance can match both schemas (then oneOf needs no negation).

    Raises:
        NotExpressible: with the keyword that cannot be rewritten exactly as its message.
    """
    out: list[Any] = []
    if "not" in schema:
        try:
            out.append(negate(schema["not"], deref, known))
        except NotExpressible as exc:
            raise NotExpressible(f"not: {exc}") from exc
    if "if" in schema and ("then" in schema or "else" in schema):
        cond = schema["if"]
        try:
            neg = negate(cond, deref, known)
        except NotExpressible as exc:
            raise NotExpressible(f"if: cannot negate the condition ({exc})") from exc
        out.append(
            {
                "anyOf": [
                    {"allOf": [cond, schema.get("then", True)]},
                    {"allOf": [neg, schema.get("else", True)]},
                ]
            }
        )
    deps: dict[str, Any] = {}
    for key in ("dependencies", "dependentRequired", "dependentSchemas"):
        value = schema.get(key, {})
        if not isinstance(value, dict):
            raise NotExpressible(f"{key}: must be an object")
        deps.update({f"{key}\x00{k}": v for k, v in value.items()})
    for tagged, dep in deps.items():
        name = tagged.split("\x00", 1)[1]
        absent = {"properties": {name: False}}
        if isinstance(dep, list):
            if dep:
                out.append({"anyOf": [absent, {"required": [name, *dep]}]})
        elif dep is not True:
            out.append({"anyOf": [absent, {"allOf": [{"required": [name]}, dep]}]})
    if "oneOf" in schema:
        subs = schema["oneOf"]
        if not isinstance(subs, list) or not subs:
            raise NotExpressible("oneOf: must be a non-empty list")
        branches = []
        for i, sub in enumerate(subs):
            others = [subs[j] for j in range(len(subs)) if j != i and not exclusive(sub, subs[j])]
            if not others:
                branches.append(sub)
                continue
            try:
                negs = [negate(o, deref, known) for o in others]
            except NotExpressible as exc:
                raise NotExpressible(
                    f"oneOf: branches may overlap and one cannot be negated ({exc})"
                ) from exc
            branches.append({"allOf": [sub, *negs]})
        out.append({"anyOf": branches})
    return out


LOGIC_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "oneOf",
)


class Undecided(Exception):
    """`check_value` met a keyword it does not evaluate."""


def check_value(
    value: Any, schema: Any, deref: Callable[[Any], Any], formats: dict[str, str], depth: int = 0
) -> bool:
    """Whether the JSON `value` is valid under `schema` (used to filter `enum`/`const` values by the
    schema's other keywords, logic keywords included, instead of lowering them).

    Raises:
        Undecided: a keyword this small validator does not evaluate (the caller treats it as unsupported).
    """
    import re

    if depth > 40:
        raise Undecided("nesting too deep")
    if schema is True:
        return True
    if schema is False:
        return False
    if not isinstance(schema, dict):
        raise Undecided("schema is not an object")
    kind = _kind(value)
    for k, v in schema.items():
        if k in _ANNOTATIONS:
            continue
        sub = lambda s, x=value: check_value(x, s, deref, formats, depth + 1)  # noqa: E731
        if k == "$ref":
            ok = sub(deref({"$ref": v}))
        elif k == "type":
            ok = any(kind == t or (t == "number" and kind == "integer") for t in _types(v))
        elif k == "enum":
            ok = any(_kind(x) == kind and x == value for x in v)
        elif k == "const":
            ok = _kind(v) == kind and v == value
        elif k == NOT_ENUM:
            ok = not any(_kind(x) == kind and x == value for x in v)
        elif k in ("allOf", "anyOf", "oneOf"):
            hits = sum(1 for s in v if sub(s))
            ok = hits == len(v) if k == "allOf" else hits >= 1 if k == "anyOf" else hits == 1
        elif k == "not":
            ok = not sub(v)
        elif k == "if":
            ok = sub(schema.get("then", True)) if sub(v) else sub(schema.get("else", True))
        elif k in ("then", "else"):
            continue
        elif kind == "string" and k in ("minLength", "maxLength", "pattern", "format", NOT_PATTERN):
            if k == "minLength":
                ok = len(value) >= v
            elif k == "maxLength":
                ok = len(value) <= v
            elif k == "pattern":
                ok = re.search(v, value) is not None
            elif k == NOT_PATTERN:
                ok = not any(re.search(p, value) for p in v)
            elif v in formats:
                ok = re.fullmatch(formats[v], value) is not None
            else:
                raise Undecided(f"format {v!r}")
        elif kind in ("integer", "number") and k in _NUMERIC_FLIP:
            if isinstance(v, bool):
                continue  # draft 4 flags: read with minimum/maximum below
            ok = {
                "minimum": value >= v,
                "maximum": value <= v,
                "exclusiveMinimum": value > v,
                "exclusiveMaximum": value < v,
            }[k]
            if k in ("minimum", "maximum") and schema.get("exclusive" + k[0].upper() + k[1:]) is True:
                ok = value > v if k == "minimum" else value < v
        elif kind in ("integer", "number") and k == "multipleOf":
            ok = (_exact(value) / _exact(v)).denominator == 1  # decimals, exactly (not float division)
        elif kind == "array" and k in ("minItems", "maxItems", "items", "prefixItems", "uniqueItems"):
            if k == "minItems":
                ok = len(value) >= v
            elif k == "maxItems":
                ok = len(value) <= v
            elif k == "uniqueItems":
                ok = not v or len({_freeze(x) for x in value}) == len(value)
            elif k == "prefixItems" or isinstance(v, list):
                ok = all(sub(s, x) for s, x in zip(v, value, strict=False))
            else:
                start = len(schema.get("prefixItems", [])) if "prefixItems" in schema else 0
                ok = all(sub(v, x) for x in value[start:])
        elif kind == "object" and k in (
            "required",
            "properties",
            "additionalProperties",
            "patternProperties",
            "minProperties",
            "maxProperties",
            "propertyNames",
            "dependentRequired",
            "dependentSchemas",
            "dependencies",
        ):
            ok = _check_object(value, schema, k, v, sub)
        elif k in _KEYWORD_TYPES and kind not in _KEYWORD_TYPES[k]:
            continue  # a keyword for another type: no constraint on this value
        elif k in _UNCHECKED:
            raise Undecided(f"keyword {k!r}")
        else:
            continue  # unknown keywords are annotations
        if not ok:
            return False
    return True


_UNCHECKED = {
    "contains",
    "minContains",
    "maxContains",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
    "$dynamicRef",
    "$recursiveRef",
    "multipleOf",
    "uniqueItems",
    "format",
    *(k for k in ("required", "properties", "patternProperties", "additionalProperties")),
}
_KEYWORD_TYPES = {
    **{k: ("string",) for k in ("minLength", "maxLength", "pattern", "format", NOT_PATTERN)},
    **{k: ("integer", "number") for k in (*_NUMERIC_FLIP, "multipleOf")},
    **{
        k: ("array",)
        for k in ("minItems", "maxItems", "items", "prefixItems", "uniqueItems", "additionalItems")
    },
    **{
        k: ("object",)
        for k in (
            "required",
            "properties",
            "additionalProperties",
            "patternProperties",
            "minProperties",
            "maxProperties",
            "propertyNames",
            "dependentRequired",
            "dependentSchemas",
            "dependencies",
        )
    },
}


def _check_object(value: dict, schema: dict, k: str, v: Any, sub: Callable) -> bool:
    import re

    if k == "required":
        return all(name in value for name in v)
    if k == "properties":
        return all(sub(s, value[name]) for name, s in v.items() if name in value)
    if k == "patternProperties":
        return all(sub(s, x) for p, s in v.items() for name, x in value.items() if re.search(p, name))
    if k == "additionalProperties":
        props, pats = schema.get("properties", {}), schema.get("patternProperties", {})
        extra = [
            x for name, x in value.items() if name not in props and not any(re.search(p, name) for p in pats)
        ]
        return all(sub(v, x) for x in extra)
    if k == "minProperties":
        return len(value) >= v
    if k == "maxProperties":
        return len(value) <= v
    if k == "propertyNames":
        return all(sub(v, name) for name in value)
    for name, dep in v.items():  # dependencies
        if name in value and not (all(d in value for d in dep) if isinstance(dep, list) else sub(dep)):
            return False
    return True


def _exact(number: Any) -> Fraction:
    """A JSON number as the exact decimal it was written as (floats by their shortest repr)."""
    return Fraction(repr(number)) if isinstance(number, float) else Fraction(number)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("o", frozenset((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("a", tuple(_freeze(v) for v in value))
    return (_kind(value), value)
