"""JSON Schema (Draft 2020-12, common older forms) and pydantic models as token constraints.

    from constrain.grammars.json_schema import json_schema
    c = json_schema({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    c = json_schema(MyModel)                       # a pydantic BaseModel subclass
    c.parse(text)                                  # -> MyModel instance (validated)

The schema is lowered to a `GrammarIR` (terminals are regexes, rules a context-free grammar) and matched by
the grammar engine (`constrain.grammars.cfg`). What is enforced exactly: `type` (and lists of types),
`enum`/`const`, `properties`/`required`/`additionalProperties` (properties in schema order, extra ones after
them), `items`/`prefixItems`/`additionalItems`/`minItems`/`maxItems`, `minLength`/`maxLength`, `pattern`,
`format` (date, time, date-time, email, uuid, ipv4, ipv6, hostname, uri), integer and decimal bounds and
`multipleOf` (exact decimals: `json_numbers`), `patternProperties` (several patterns), `propertyNames` (string
keywords), `anyOf`, `allOf` of mergeable schemas, `minProperties`/`maxProperties`, local
`$ref`/`$defs`/`definitions` (recursion included), boolean schemas; `not`, `if`/`then`/`else`,
`dependentRequired`/`dependentSchemas`/`dependencies` and `oneOf` where `schema_logic` rewrites them exactly.
Property order: the schema's (default) or any (`property_order="any"`).

A validation keyword we cannot enforce exactly raises `UnsupportedError` naming it and its place; with
`lenient=True` it is skipped instead and listed in `constraint.ignored`. Annotations (`title`,
`description`, `default`, `examples`, unknown keywords ...) are ignored, as validators ignore them.

Whitespace: "flexible" (default: JSON whitespace after `{ [ , :` and before `} ]`, at most
`max_whitespace` characters per gap), "compact" (none), or "indented" (a newline and indentation: up to
`max_whitespace` spaces after each newline).
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np

from constrain.constraint import register_compile_cache
from constrain.errors import CompileLimitError, ConstraintError, SpecError, UnsupportedError

from .cfg import GrammarConstraint
from .dfa import ByteDFA, minimize
from .earley import GrammarIR, Rule, Terminal
from .json_numbers import exact, lower_bound_regex, multiple_dfa, upper_bound_regex
from .product import product_dfa as _product_dfa
from .product import set_base
from .schema_logic import (
    LOGIC_KEYWORDS,
    NOT_ENUM,
    NOT_PATTERN,
    NotExpressible,
    Undecided,
    check_value,
    conjuncts,
)
from .terminals import MAX_DFA_STATES, MAX_UNROLL, RELAX_SPAN, intern_by_content, pattern_dfa

ANNOTATIONS = {
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
    "contentMediaType",
    "contentEncoding",
    "$anchor",
    "$defs",
    "definitions",
    "$vocabulary",
    "discriminator",
    "nullable_annotation",
}
# Validation keywords, by the type they apply to (anything else is an annotation or unknown: ignored).
HANDLED = {
    "type",
    "patternProperties",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "additionalItems",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "minProperties",
    "maxProperties",
    "multipleOf",
    "propertyNames",
}
HANDLED |= {*LOGIC_KEYWORDS, NOT_ENUM, NOT_PATTERN}  # rewritten by `schema_logic`, or internal
UNSUPPORTED = {
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
    "$dynamicRef",
    "$recursiveRef",
}
ALL_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# One JSON string character: unescaped, a short escape, a \uXXXX escape of a non-surrogate, or a surrogate
# pair (one character once decoded, as maxLength counts it). Lone surrogate escapes are refused.
_CHAR = (
    r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_STRING = '"' + _CHAR + '*"'  # any JSON string
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_INTEGER = r"-?(?:0|[1-9][0-9]*)"

_D2 = r"[0-9]{2}"
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_HM = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = rf"{_HM}:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-]{_HM})"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9a-fA-F]{1,4}"
_IPV6 = (
    rf"(?:(?:{_H16}:){{7}}{_H16}|(?:{_H16}:){{1,7}}:|(?:{_H16}:){{1,6}}:{_H16}|(?:{_H16}:){{1,5}}(?::{_H16}){{1,2}}"
    rf"|(?:{_H16}:){{1,4}}(?::{_H16}){{1,3}}|(?:{_H16}:){{1,3}}(?::{_H16}){{1,4}}|(?:{_H16}:){{1,2}}(?::{_H16}){{1,5}}"
    rf"|{_H16}:(?::{_H16}){{1,6}}|:(?:(?::{_H16}){{1,7}}|:)|(?:{_H16}:){{6}}{_IPV4}|::(?:{_H16}:){{0,5}}{_IPV4}"
    rf"|(?:{_H16}:){{1,5}}:{_IPV4})"
)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": rf"{_DATE}[tT]{_TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": _IPV4,
    "ipv6": _IPV6,
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*",
    "email": r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
    "uri": r"[A-Za-z][A-Za-z0-9+.-]*:[^\x00-\x20\"<>\\^`{|}\x7f-\U0010ffff]*",
    "uri-reference": r"[^\x00-\x20\"<>\\^`{|}\x7f-\U0010ffff]*",
    "byte": r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",  # base64 (OpenAPI)
    "iri": r"[A-Za-z][A-Za-z0-9+.-]*:[^\x00-\x20\"<>\\^`{|}]*",
}


@lru_cache(maxsize=4096)
def _char_regex(c: str) -> str:
    """The JSON spellings of one character inside a string: itself (if allowed bare) or its escapes (no
    `\\u00XX` escapes of printable ASCII: see below)."""
    code = ord(c)
    options = []
    if c not in '"\\' and code >= 0x20:
        options.append(re.escape(c))
    short = {
        '"': '\\\\"',
        "\\": "\\\\\\\\",
        "/": "\\\\/",
        "\b": "\\\\b",
        "\f": "\\\\f",
        "\n": "\\\\n",
        "\r": "\\\\r",
        "\t": "\\\\t",
    }
    if c in short:
        options.append(short[c])
    if 0x20 <= code < 0x7F and c not in '"\\':
        # printable ASCII is spelled as itself (and "/" also as "\/"), not as \u00XX: a deliberate restriction
        # that keeps keys and enum values forced for jump-forward; json.dumps never writes those escapes
        return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"
    units = (
        [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
    )
    hexes = ""
    for u in units:
        hexes += r"\\u" + "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{u:04x}")
    options.append(hexes)
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


@lru_cache(maxsize=16384)
def string_literal_regex(value: str) -> str:
    """A regex for every JSON spelling of the string `value` (quotes included)."""
    return '"' + "".join(_char_regex(c) for c in value) + '"'


# Characters with one JSON spelling inside a string (see `_char_regex`): printable ASCII but `"`, `\\`, `/`.
_ONE_SPELLING = re.compile(r"[ !#-.0-\[\]-~]*")


@lru_cache(maxsize=4096)
def strings_dfa(values: tuple[str, ...]) -> ByteDFA:
    """The DFA of every JSON spelling (quotes included) of each string in `values` (e.g. property names).

    Values with a single spelling (printable ASCII but `"`, `\\`, `/`: most keys) are built as a trie of
    their bytes, with no regex parse; the others go through `string_literal_regex`. Cached by `values`, so
    the products made from it (`product_dfa`) are shared by equal sets.
    """
    if all(_ONE_SPELLING.fullmatch(v) for v in values):
        return ByteDFA.from_literals([f'"{v}"'.encode() for v in values], max_states=MAX_DFA_STATES)
    return pattern_dfa("|".join(string_literal_regex(v) for v in values), 0, "property names")


def int_range_regex(lo: int | None, hi: int | None) -> str:
    """A regex of the canonical JSON integers n with lo <= n <= hi (None = unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        return r"(?!)"
    parts = []
    if hi is None or hi >= 0:  # non-negative part
        a = max(lo, 0) if lo is not None else 0
        parts.append(_nonneg_range(a, hi))
    if lo is None or lo < 0:  # negative part: -n with n in [max(1, -hi), -lo]
        a = max(1, -hi) if hi is not None else 1
        b = -lo if lo is not None else None
        if b is None or a <= b:
            parts.append("-" + _nonneg_range(a, b))
    parts = [p for p in parts if p != "(?!)" and p != "-(?!)"]
    if not parts:
        return r"(?!)"
    return "(?:" + "|".join(parts) + ")"


def _nonneg_range(a: int, b: int | None) -> str:
    """Regex for decimal integers a..b (b None = no upper bound), without leading zeros."""
    if b is None:
        # a..(10^len(a) - 1) then any longer number
        n = len(str(a))
        head = _nonneg_range(a, 10**n - 1)
        return f"(?:{head}|[1-9][0-9]{{{n},}})"
    if a > b:
        return "(?!)"
    out = []
    lo = a
    while lo <= b:
        # the largest block [lo, hi] with the same length, aligned on a power of ten
        n = len(str(lo))
        hi = min(b, 10**n - 1)
        out.extend(_same_length(str(lo), str(hi)))
        lo = hi + 1
    return "(?:" + "|".join(out) + ")"


def _same_length(lo: str, hi: str) -> list[str]:
    """Regexes for the integers lo..hi (equal length strings)."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + x for x in _alt(_same_length(lo[1:], hi[1:]))]
    out = []
    rest = len(lo) - 1
    out.extend(lo[0] + x for x in _alt(_same_length(lo[1:], "9" * rest)))
    if int(hi[0]) - int(lo[0]) > 1:
        out.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{rest}}}")
    out.extend(hi[0] + x for x in _alt(_same_length("0" * rest, hi[1:])))
    return out


def _alt(parts: list[str]) -> list[str]:
    return parts if len(parts) == 1 else ["(?:" + "|".join(parts) + ")"]


MAX_ANY_ORDER_PROPERTIES = 10  # property_order="any": the grammar tracks which of n properties came (2^n)
_MEMBER_KEYS = ("properties", "patternProperties", "additionalProperties")
MAX_BRANCHES = 256  # anyOf branches from distributing a conjunction of anyOfs (dependencies, if/then/else)
MAX_PATTERN_PROPERTIES = 8  # patternProperties: key classes are the sets of patterns that match (pruned)
MAX_COUNTED_PROPERTIES = 64  # minProperties/maxProperties: one grammar state per count


class ObjectMembers:
    """The members of one object (what lies between its braces), as grammar rules.

    Declared properties (`pairs`: name -> key terminal, colon, value symbol) each appear at most once, the
    `required` ones always; other keys come through `extra` (a symbol for one extra member, or None); the
    number of members lies in [lo, hi]. `schema_order()` lists declared properties in schema order with the
    extras after them; `any_order()` takes members in any order (its states are the subsets of declared
    properties seen, so callers bound the number of properties).
    """

    def __init__(
        self,
        low: _Lowering,
        names: list[str],
        pairs: dict,
        required: set,
        extra: str | None,
        comma: str,
        lo: int,
        hi: int | None,
    ):
        self.low, self.names, self.pairs, self.required = low, names, pairs, required
        self.extra, self.comma, self.lo, self.hi = extra, comma, lo, hi
        # Counts past `cap` need not be told apart: above hi is dead, at or above lo (no hi) is enough.
        self.cap = hi + 1 if hi is not None else lo
        self.memo: dict[tuple, str] = {}

    def bump(self, count: int) -> int:
        return min(count + 1, self.cap)

    def count_ok(self, count: int) -> bool:
        return count >= self.lo and (self.hi is None or count <= self.hi)

    def sep(self, emitted: bool) -> tuple[str, ...]:
        return (self.comma,) if emitted else ()

    def symbol(self, key: tuple) -> tuple[str, bool]:
        """(non-terminal for state `key`, True if it is new and needs its rules)."""
        name = self.memo.get(key)
        if name is not None:
            return name, False
        name = self.memo[key] = self.low.fresh("props")
        return name, True

    def dead(self, name: str) -> str:
        self.low.rule(name, name)  # no string: pruned by the grammar compiler
        return name

    def schema_order(self, i: int = 0, emitted: bool = False, count: int = 0) -> str:
        name, new = self.symbol(("s", i, emitted, count))
        if not new:
            return name
        if self.hi is not None and count > self.hi:
            return self.dead(name)
        if i == len(self.names):
            return self.extras(name, emitted, count)
        n = self.names[i]
        self.low.rule(
            name, *self.sep(emitted), *self.pairs[n], self.schema_order(i + 1, True, self.bump(count))
        )
        if n not in self.required:
            self.low.rule(name, self.schema_order(i + 1, emitted, count))
        return name

    def extras(self, name: str, emitted: bool, count: int) -> str:
        """Rules for `name`: the extra members after the declared ones, given `count` members so far."""
        low = self.low
        if self.count_ok(count):
            low.rule(name)
        if self.extra is None:
            if not self.count_ok(count):
                self.dead(name)
            return name
        if self.hi is None and count >= self.lo:  # any number of extras: (, extra)*
            loop, new = self.symbol(("loop",))
            if new:
                low.rule(loop)
                low.rule(loop, loop, self.comma, self.extra)
            low.rule(name, *self.sep(emitted), self.extra, loop)
            return name
        nxt, new = self.symbol(("s", len(self.names), True, self.bump(count)))
        if new:
            if self.hi is not None and self.bump(count) > self.hi:
                self.dead(nxt)
            else:
                self.extras(nxt, True, self.bump(count))
        low.rule(name, *self.sep(emitted), self.extra, nxt)
        return name

    def any_order(self, seen: frozenset = frozenset(), emitted: bool = False, count: int = 0) -> str:
        name, new = self.symbol(("a", seen, emitted, count))
        if not new:
            return name
        if self.hi is not None and count > self.hi:
            return self.dead(name)
        low = self.low
        if self.required <= seen and self.count_ok(count):
            low.rule(name)
        for n in self.names:
            if n not in seen:
                low.rule(
                    name,
                    *self.sep(emitted),
                    *self.pairs[n],
                    self.any_order(seen | {n}, True, self.bump(count)),
                )
        if self.extra is not None:
            low.rule(name, *self.sep(emitted), self.extra, self.any_order(seen, True, self.bump(count)))
        return name


class _Lowering:
    """Schema -> grammar: one non-terminal per schema node, terminals shared by pattern."""

    def __init__(
        self,
        root: Any,
        *,
        whitespace: str,
        max_whitespace: int,
        lenient: bool,
        property_order: str = "schema",
    ):
        if whitespace not in ("flexible", "compact", "indented"):
            raise SpecError(f"whitespace must be 'flexible', 'compact' or 'indented', got {whitespace!r}")
        if property_order not in ("schema", "any"):
            raise SpecError(f"property_order must be 'schema' or 'any', got {property_order!r}")
        self.property_order = property_order
        self.root = root
        self.lenient = lenient
        self.ignored: list[str] = []
        self.terminals: dict[str, str] = {}  # pattern -> name
        self.dfas: dict[str, ByteDFA] = {}  # prebuilt automata for terminals no regex spells
        self.rules: list[Rule] = []
        self.memo: dict[int, str] = {}
        self.keep: list[Any] = []  # keeps memoised schema objects alive (their ids are keys)
        n = int(max_whitespace)
        self.style = "compact" if n <= 0 else whitespace
        if self.style == "compact":
            self.ws_after = self.ws_before = ""
        elif self.style == "flexible":
            self.ws_after = self.ws_before = rf"[ \t\n\r]{{0,{n}}}"
        else:
            self.ws_after = self.ws_before = rf"(?:\n {{0,{n}}})?"
        self.n_symbols = 0
        self.where = "#"

    # -- helpers ---------------------------------------------------------------------------------------
    def term(self, pattern: str, base: bool = False) -> str:
        """The terminal for `pattern`; `base` (or a pattern in `_BASE_PATTERNS`): a schema-independent one,
        whose DFA `base_dfa` keeps for the process."""
        name = self.terminals.get(pattern)
        if name is None:
            name = self.terminals[pattern] = f"T{len(self.terminals)}"
            if base or pattern in _BASE_PATTERNS:
                self.dfas[pattern] = base_dfa(pattern, name)
        return name

    def punct(self, ch: str) -> str:
        """A punctuation terminal with the whitespace allowed around it (see `whitespace`)."""
        esc = re.escape(ch)
        before, after = self.ws_before, self.ws_after
        if ch in "{[":
            return self.term(esc + after, base=True)
        if ch in "}]":
            return self.term(before + esc, base=True)
        if self.style == "indented":
            return self.term(esc + (after if ch == "," else " ?"), base=True)
        return self.term(before + esc + after, base=True)

    def fresh(self, hint: str) -> str:
        self.n_symbols += 1
        return f"{hint}_{self.n_symbols}"

    def rule(self, lhs: str, *rhs: str) -> None:
        self.rules.append(Rule(lhs, tuple(rhs)))

    def unsupported(self, keyword: str, where: str, why: str = "") -> None:
        message = f"JSON schema keyword {keyword!r} at {where or '#'} cannot be enforced exactly{why}"
        if not self.lenient:
            raise UnsupportedError(message)
        self.ignored.append(f"{where or '#'}/{keyword}")

    def resolve(self, ref: str, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedError(
                f"$ref {ref!r} at {where or '#'}: only local references (#/...) are supported"
            )
        node = self.root
        path = ref[1:]
        if path.startswith("/"):
            for part in path[1:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                try:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                except (KeyError, IndexError, ValueError, TypeError) as exc:
                    raise SpecError(f"$ref {ref!r} at {where or '#'} does not resolve (no {part!r})") from exc
        elif path:
            raise UnsupportedError(f"$ref {ref!r} at {where or '#'}: anchors are not supported")
        return node

    # -- values ----------------------------------------------------------------------------------------
    def value(self, schema: Any, where: str) -> str:
        """The non-terminal for the JSON values `schema` accepts (memoised per schema object)."""
        key = id(schema)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        name = self.fresh("v")
        self.memo[key] = name
        self.where = where
        self.keep.append(schema)
        alts = self.alternatives(schema, where)
        for alt in alts:
            self.rule(name, *alt)
        if not alts:
            self.rule(name, name)  # no value: an unproductive symbol, pruned by the grammar compiler
        return name

    def alternatives(self, schema: Any, where: str) -> list[tuple[str, ...]]:
        """Right-hand sides for the values `schema` accepts."""
        if schema is True:
            schema = {}
        if schema is False:
            return []
        if not isinstance(schema, dict):
            raise SpecError(
                f"schema at {where or '#'} must be an object or a boolean, got {type(schema).__name__}"
            )
        for k in schema:
            if k in UNSUPPORTED:
                self.unsupported(k, where)
        schema = self.rewrite(schema, where)
        if "$ref" in schema:
            target = self.resolve(schema["$ref"], where)
            rest = {k: v for k, v in schema.items() if k not in ("$ref",) and k in HANDLED}
            if not rest:
                return [(self.value(target, schema["$ref"]),)]
            # the referenced schema first: its properties come first in schema order (as llguidance does)
            schema = self.merge([target, rest], where)
        if "allOf" in schema:
            subs = schema["allOf"]
            if not isinstance(subs, list):
                raise SpecError(f"allOf at {where} must be a list")
            base = {k: v for k, v in schema.items() if k != "allOf"}
            schema = self.merge([*subs, base], where + "/allOf")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise SpecError(f"{key} at {where} must be a non-empty list")
                base = {k: v for k, v in schema.items() if k != key}
                if key == "oneOf" and not self.disjoint(subs, where):
                    self.unsupported("oneOf", where, " (branches may overlap; only disjoint types are exact)")
                out = []
                for i, sub in enumerate(subs):
                    merged = self.merge([base, sub], f"{where}/{key}/{i}") if base else sub
                    out.append((self.value(merged, f"{where}/{key}/{i}"),))
                return out
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list):
                raise SpecError(f"enum at {where} must be a list")
            rest = {k: v for k, v in schema.items() if k not in ("const", "enum")}
            return [
                self.literal(v, where)
                for v in values
                if self.admits(schema, v) and self.check(v, rest, where)
            ]
        types = schema.get("type", list(ALL_TYPES))
        if isinstance(types, str):
            types = [types]
        if not isinstance(types, list):
            raise SpecError(f"type at {where or '#'} must be a string or a list, got {types!r}")
        for t in types:
            if t not in ALL_TYPES:
                raise SpecError(f"unknown type {t!r} at {where or '#'}")
        if "integer" in types and "number" in types:
            types = [t for t in types if t != "integer"]
        out = []
        for t in types:
            out.extend(getattr(self, "type_" + t)(schema, where))
        return out

    def admits(self, schema: dict, value: Any) -> bool:
        """True if a const/enum value has one of the schema's types (other keywords are not checked)."""
        kind = _json_type(value)
        if any(_json_type(x) == kind and x == value for x in schema.get(NOT_ENUM, ())):
            return False
        types = schema.get("type")
        if types is None:
            return True
        types = [types] if isinstance(types, str) else types
        return kind in types or (kind == "integer" and "number" in types)

    def disjoint(self, subs: list, where: str) -> bool:
        """True if no value can match two of the branches (then `oneOf` is `anyOf`)."""
        return all(self.exclusive(subs[i], subs[j], where) for i in range(len(subs)) for j in range(i))

    def deref(self, sub: Any, where: str) -> Any:
        for _ in range(50):
            if isinstance(sub, dict) and "$ref" in sub:
                rest = {k: v for k, v in sub.items() if k != "$ref" and k in HANDLED | UNSUPPORTED}
                target = self.resolve(sub["$ref"], where)
                sub = self.merge([rest, target], where) if rest else target
            else:
                return sub
        raise SpecError(f"$ref chain too long at {where}")

    def kinds(self, sub: Any, where: str, depth: int = 0) -> set[str] | None:
        """The JSON types a schema can match (None = any, or unknown)."""
        sub = self.deref(sub, where)
        if sub is False:
            return set()
        if not isinstance(sub, dict) or depth > 20:
            return None
        out: set[str] | None = None
        if "const" in sub:
            out = {_json_type(sub["const"])}
        elif "enum" in sub and isinstance(sub["enum"], list):
            out = {_json_type(v) for v in sub["enum"]}
        if "type" in sub:
            t = {sub["type"]} if isinstance(sub["type"], str) else set(sub["type"])
            out = t if out is None else out & (t | ({"integer"} if "number" in t else set()))
        for key in ("anyOf", "oneOf"):
            if isinstance(sub.get(key), list):
                parts = [self.kinds(x, where, depth + 1) for x in sub[key]]
                union = None if any(p is None for p in parts) else set().union(*parts)
                out = union if out is None else (out if union is None else out & union)
        if out is not None and "number" in out:
            out = out | {"integer"}
        return out

    def discriminated(self, a: Any, b: Any, where: str) -> bool:
        """Both schemas are objects requiring some property whose const/enum values differ."""
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        pa, pb = a.get("properties", {}), b.get("properties", {})
        for name in set(a.get("required", [])) & set(b.get("required", [])):
            va, vb = self.values_of(pa.get(name), where), self.values_of(pb.get(name), where)
            if va is not None and vb is not None and not any(x == y for x in va for y in vb):
                return True
        return False

    def values_of(self, sub: Any, where: str) -> list | None:
        sub = self.deref(sub, where)
        if isinstance(sub, dict):
            if "const" in sub:
                return [sub["const"]]
            if isinstance(sub.get("enum"), list):
                return sub["enum"]
        return None

    def rewrite(self, schema: Any, where: str) -> Any:
        """`schema` with its logic keywords (`not`, `if`, dependencies, `oneOf`) rewritten by `schema_logic`
        into an `allOf` of schemas the lowering enforces (unchanged if it has none of them)."""
        if not isinstance(schema, dict) or not any(k in schema for k in LOGIC_KEYWORDS):
            return schema
        if "enum" in schema or "const" in schema:
            return schema  # the values are checked against every keyword instead (see `check`)
        base = {k: v for k, v in schema.items() if k not in LOGIC_KEYWORDS}
        try:
            extra = conjuncts(
                schema,
                lambda ref: self.resolve(ref["$ref"], where),
                (HANDLED | UNSUPPORTED) - {"$defs", "definitions"},
                lambda a, b: self.exclusive(a, b, where),
            )
        except NotExpressible as exc:
            keyword = str(exc).split(":", 1)[0]
            self.unsupported(keyword if keyword in LOGIC_KEYWORDS else "not", where, f" ({exc})")
            return base
        if not extra:
            return base
        out = {"allOf": [base, *extra]}
        self.keep.append(out)
        return out

    def check(self, value: Any, schema: Any, where: str) -> bool:
        """Whether the enum/const `value` satisfies `schema` (its other keywords); a keyword the check
        cannot evaluate is unsupported (under `lenient`, the value is kept)."""
        try:
            return check_value(value, schema, lambda ref: self.resolve(ref["$ref"], where), FORMATS)
        except Undecided as exc:
            self.unsupported("enum", where, f" (cannot check its values against {exc})")
            return True

    def exclusive(self, a: Any, b: Any, where: str) -> bool:
        """True if no instance can match both schemas (disjoint types, or a required discriminator)."""
        a, b = self.deref(a, where), self.deref(b, where)
        ka, kb = self.kinds(a, where), self.kinds(b, where)
        common = (set(ALL_TYPES) if ka is None else ka) & (set(ALL_TYPES) if kb is None else kb)
        if not common:
            return True
        if common != {"object"}:  # keywords on objects say nothing of other values
            return False
        return self.discriminated(a, b, where) or self.forbids(a, b, where) or self.forbids(b, a, where)

    def forbids(self, a: Any, b: Any, where: str) -> bool:
        """`a` requires a property that `b` does not allow (`false` schema, or closed without it)."""
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        props = b.get("properties", {})
        for name in a.get("required", []):
            if name in props:
                if self.deref(props[name], where) is False:
                    return True
            elif b.get("additionalProperties", True) is False and not any(
                re.search(p, name) for p in b.get("patternProperties", {})
            ):
                return True
        return False

    def merge(self, schemas: list, where: str) -> dict:
        """The conjunction of schemas, when it is a plain merge (no keyword set twice to different values)."""
        for s in schemas:  # an enum/const member: the conjunction is its values that satisfy every member
            target = self.deref(s, where)
            if isinstance(target, dict) and ("enum" in target or "const" in target):
                values = [target["const"]] if "const" in target else target["enum"]
                if isinstance(values, list):
                    resolve = lambda ref: self.resolve(ref["$ref"], where)  # noqa: E731
                    try:
                        return {
                            "enum": [
                                x for x in values if all(check_value(x, m, resolve, FORMATS) for m in schemas)
                            ]
                        }
                    except Undecided:
                        pass  # lower the conjunction instead
                break
        out: dict = {}
        objects: list[dict] = []  # the schemas that say something of object members
        for s in schemas:
            if s is True:
                continue
            if s is False:
                return {"enum": []}
            if not isinstance(s, dict):
                raise SpecError(f"schema at {where} must be an object or a boolean")
            s = self.rewrite(s, where)
            if "$ref" in s:
                target = self.resolve(s["$ref"], where)
                rest = {k: v for k, v in s.items() if k != "$ref"}
                s = self.merge([target, rest], where) if rest else target
                if s is True:
                    continue
                if s is False or not isinstance(s, dict):
                    return self.merge([s], where)
            if "allOf" in s:
                s = self.merge([*s["allOf"], {k: v for k, v in s.items() if k != "allOf"}], where)
            if any(k in s for k in _MEMBER_KEYS):
                objects.append(s)
            for k, v in s.items():
                if k in ANNOTATIONS or (k not in HANDLED and k not in UNSUPPORTED) or k in _MEMBER_KEYS:
                    continue
                if k not in out:
                    out[k] = v
                elif k == "required":
                    out[k] = list(dict.fromkeys([*out[k], *v]))
                elif k in (NOT_ENUM, NOT_PATTERN):
                    out[k] = [*out[k], *v]
                elif k == "anyOf":  # (A1 or A2) and (B1 or B2): every pair, within a bound
                    if len(out[k]) * len(v) > MAX_BRANCHES:
                        self.unsupported(
                            "anyOf", where, f" (a conjunction of more than {MAX_BRANCHES} branches)"
                        )
                        continue
                    out[k] = [{"allOf": [a, b]} for a in out[k] for b in v]
                elif k == "type":
                    a = {out[k]} if isinstance(out[k], str) else set(out[k])
                    b = {v} if isinstance(v, str) else set(v)
                    both = a & b
                    if "number" in a and "integer" in b or "number" in b and "integer" in a:
                        both.add("integer")
                    out[k] = sorted(both)
                elif k in ("minimum", "minLength", "minItems", "exclusiveMinimum", "minProperties"):
                    out[k] = max(out[k], v)
                elif k in ("maximum", "maxLength", "maxItems", "exclusiveMaximum", "maxProperties"):
                    out[k] = min(out[k], v)
                elif k == "multipleOf":  # multiples of both: multiples of their least common multiple
                    out[k] = _lcm(self.multiple_of(out, where), self.multiple_of({k: v}, where))
                elif out[k] != v:
                    self.unsupported("allOf", where, f" (both branches set {k!r})")
        if len(objects) == 1:
            out.update({k: objects[0][k] for k in _MEMBER_KEYS if k in objects[0]})
        elif objects:
            out.update(self.merge_members(objects, where))
        return out

    def merge_members(self, objects: list[dict], where: str) -> dict:
        """`properties`/`patternProperties`/`additionalProperties` of the conjunction of `objects`: each
        member's value must satisfy what every object says of that member (its property schema, else its
        pattern's, else its additionalProperties)."""
        with_patterns = [o for o in objects if o.get("patternProperties")]
        if len(with_patterns) > 1:
            self.unsupported("allOf", where, " (patternProperties in more than one branch)")

        def member(o: dict, name: str) -> Any:
            props, pats = o.get("properties", {}), o.get("patternProperties") or {}
            hits = [ps for pat, ps in pats.items() if re.search(pat, name)]
            if name in props:
                return self.conjoin([props[name], *hits])
            return self.conjoin(hits) if hits else o.get("additionalProperties", True)

        # Schema order: where a property is first declared with a schema other than `false` (a `false`
        # property cannot appear, so where it is listed says nothing of the order).
        listed = [(n, ps is False) for o in objects for n, ps in o.get("properties", {}).items()]
        names = list(dict.fromkeys([n for n, no in listed if not no] + [n for n, no in listed if no]))
        out: dict = {
            "properties": {
                n: self.merge([member(o, n) for o in objects], f"{where}/properties/{n}") for n in names
            }
        }
        extras = [o.get("additionalProperties", True) for o in objects]
        if with_patterns:
            others = [o.get("additionalProperties", True) for o in objects if o is not with_patterns[0]]
            out["patternProperties"] = {
                pat: self.conjoin([ps, *others]) for pat, ps in with_patterns[0]["patternProperties"].items()
            }
        if any(x is not True for x in extras):
            out["additionalProperties"] = self.conjoin(extras)
        return out

    def conjoin(self, schemas: list) -> Any:
        """A schema for the conjunction of `schemas` (True dropped; one left is returned as is)."""
        rest = [x for x in schemas if x is not True]
        if not rest:
            return True
        if len(rest) == 1:
            return rest[0]
        out = {"allOf": rest}
        self.keep.append(out)
        return out

    def literal(self, value: Any, where: str) -> tuple[str, ...]:
        """The right-hand side for exactly the JSON value `value` (any whitespace/escape spelling)."""
        if isinstance(value, str):
            return (self.term(string_literal_regex(value)),)
        if isinstance(value, bool) or value is None:
            return (self.term(json.dumps(value)),)
        if isinstance(value, int):
            return (self.term(re.escape(str(value)) + r"(?:\.0+)?"),)
        if isinstance(value, float):
            if value.is_integer():
                return (self.term(re.escape(str(int(value))) + r"(?:\.0+)?"),)
            return (self.term(re.escape(json.dumps(value))),)
        if isinstance(value, list):
            if not value:
                return (self.punct("["), self.punct("]"))
            rhs: list[str] = [self.punct("[")]
            for i, v in enumerate(value):
                if i:
                    rhs.append(self.punct(","))
                rhs.extend(self.literal(v, where))
            rhs.append(self.punct("]"))
            return tuple(rhs)
        if isinstance(value, dict):
            rhs = [self.punct("{")]
            for i, (k, v) in enumerate(value.items()):
                if i:
                    rhs.append(self.punct(","))
                rhs.extend([self.term(string_literal_regex(k)), self.punct(":"), *self.literal(v, where)])
            rhs.append(self.punct("}"))
            return tuple(rhs)
        raise SpecError(f"const/enum value at {where} is not JSON: {value!r}")

    # -- types -----------------------------------------------------------------------------------------
    def type_null(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        return [(self.term("null"),)] if self.admits(schema, None) else []

    def type_boolean(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        return [(self.term(json.dumps(b)),) for b in (True, False) if self.admits(schema, b)]

    def bounds(self, schema: dict, where: str) -> tuple[float | None, bool, float | None, bool]:
        lo, lo_x, hi, hi_x = schema.get("minimum"), False, schema.get("maximum"), False
        emin, emax = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(emin, bool):  # draft 4: a flag on minimum
            lo_x = emin
        elif emin is not None and (lo is None or emin >= lo):
            lo, lo_x = emin, True
        if isinstance(emax, bool):
            hi_x = emax
        elif emax is not None and (hi is None or emax <= hi):
            hi, hi_x = emax, True
        for k, v in (("minimum", lo), ("maximum", hi)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise SpecError(f"{k} at {where} must be a finite number, got {v!r}")
        return lo, lo_x, hi, hi_x

    def type_integer(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        lo, lo_x, hi, hi_x = self.bounds(schema, where)
        step = self.multiple_of(schema, where)
        if lo is None and hi is None and step is None:
            return [(self.term(_INTEGER),)]
        ilo = None if lo is None else (int(lo) + 1 if lo_x and lo == int(lo) else math.ceil(lo))
        ihi = None if hi is None else (int(hi) - 1 if hi_x and hi == int(hi) else math.floor(hi))
        pattern = int_range_regex(ilo, ihi)
        if pattern == "(?!)":
            return []
        if step is None:
            return [(self.term(pattern),)]
        return self.number_terminal([] if lo is None and hi is None else [pattern], step, True, where)

    def multiple_of(self, schema: dict, where: str) -> Fraction | None:
        """The `multipleOf` step as an exact decimal (None if absent). Raises `SpecError` unless > 0."""
        if "multipleOf" not in schema:
            return None
        try:
            step = exact(schema["multipleOf"])
        except (TypeError, ValueError):
            step = None
        if step is None or step <= 0:
            raise SpecError(f"multipleOf at {where} must be a number > 0, got {schema['multipleOf']!r}")
        return step

    def number_terminal(
        self, patterns: list[str], step: Fraction | None, integer_only: bool, where: str
    ) -> list[tuple[str, ...]]:
        """The right-hand side for numbers every pattern matches and, with a `step`, that are multiples
        of it (an exact residue automaton, exponent-free spellings); [] if there are none."""
        key = "\x00number:" + json.dumps([patterns, str(step), integer_only])
        name = self.terminals.get(key)
        if name is not None:
            return [(name,)]
        dfa = None
        if step is not None:
            dfa = multiple_dfa(step, integer_only=integer_only)
            if dfa is None:
                self.unsupported("multipleOf", where, f" (a step of {step} needs too large an automaton)")
        if dfa is None and not patterns:
            return [(self.term(_INTEGER if integer_only else _NUMBER),)]
        for p in patterns:
            other = pattern_dfa(p, 0, "number")
            dfa = other if dfa is None else product_dfa(dfa, other, "and")
        if dfa.start < 0:
            return []
        name = self.terminals[key] = f"T{len(self.terminals)}"
        self.dfas[key] = dfa
        return [(name,)]

    def type_number(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        """Numbers; with integer bounds, one regex of exponent-free spellings (`-I.F`) and `D.Fe-N` ones;
        with decimal bounds or `multipleOf`, exact automata (`json_numbers`)."""
        lo, lo_x, hi, hi_x = self.bounds(schema, where)
        step = self.multiple_of(schema, where)
        if lo is None and hi is None and step is None:
            return [(self.term(_NUMBER),)]
        if step is not None or any(v is not None and v != math.floor(v) for v in (lo, hi)):
            return self.decimal_number(lo, lo_x, hi, hi_x, step, where)
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
        lo_in = None if lo is None else lo + (1 if lo_x else 0)  # bounds for an exact integer value
        hi_in = None if hi is None else hi - (1 if hi_x else 0)
        zero_frac, frac = r"(?:\.0+)?", r"\.[0-9]*[1-9][0-9]*"

        def nonneg(a: int | None, b: int | None) -> str | None:
            a = 0 if a is None else max(a, 0)
            return None if b is not None and a > b else _nonneg_range(a, b)

        def neg(x: int | None) -> int | None:
            return None if x is None else -x

        alts = []
        # "I" / "I.000": the value I;  "I.F" (F > 0): a value in (I, I+1)
        if (r := nonneg(lo_in, hi_in)) is not None:
            alts.append(r + zero_frac)
        if (r := nonneg(lo, None if hi is None else hi - 1)) is not None:
            alts.append(r + frac)
        # "-I" / "-I.000": the value -I;  "-I.F": a value in (-I-1, -I)
        if (r := nonneg(neg(hi_in), neg(lo_in))) is not None:
            alts.append("-" + r + zero_frac)
        if (r := nonneg(neg(hi), None if lo is None else -lo - 1)) is not None:
            alts.append("-" + r + frac)
        # Exponent spellings: only "D.Fe-N" (one non-zero digit before the point, as repr() writes small
        # floats), whose value lies in (0, 1) or, negated, in (-1, 0); larger exponents are refused (a gap).
        small = r"[1-9](?:\.[0-9]+)?[eE]-0*[1-9][0-9]*"
        if (lo is None or lo <= 0) and (hi is None or hi >= 1):
            alts.append(small)
        if (lo is None or lo <= -1) and (hi is None or hi >= 0):
            alts.append("-" + small)
        return [(self.term("(?:" + "|".join(alts) + ")"),)] if alts else []

    def decimal_number(
        self, lo: Any, lo_x: bool, hi: Any, hi_x: bool, step: Fraction | None, where: str
    ) -> list[tuple[str, ...]]:
        """Numbers within decimal bounds and/or multiples of `step`, compared exactly as decimals.
        Exponent spellings: none under `multipleOf`; else `D.Fe-N` (in (0, 1)) and its negation where the
        bounds hold all of (0, 1) or (-1, 0), as for integer bounds."""
        patterns = []
        small = r"[1-9](?:\.[0-9]+)?[eE]-0*[1-9][0-9]*"
        exps = []
        if step is None:
            if (lo is None or lo <= 0) and (hi is None or hi >= 1):
                exps.append(small)
            if (lo is None or lo <= -1) and (hi is None or hi >= 0):
                exps.append("-" + small)
        for v, x, side in ((lo, lo_x, lower_bound_regex), (hi, hi_x, upper_bound_regex)):
            if v is None:
                continue
            r = side(exact(v), x)
            if r is None and not exps:
                return []
            patterns.append("(?:" + "|".join([*([r] if r else []), *exps]) + ")")
        return self.number_terminal(patterns, step, False, where)

    def type_string(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        lo = schema.get("minLength", 0)
        hi = schema.get("maxLength")
        for k, v in (("minLength", lo), ("maxLength", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise SpecError(f"{k} at {where} must be a non-negative integer, got {v!r}")
        count = "*" if not lo and hi is None else f"{{{lo},{'' if hi is None else hi}}}"
        fmt = schema.get("format")
        if fmt is not None and fmt not in FORMATS:
            self.unsupported("format", where, f" (unknown format {fmt!r})")
            fmt = None
        parts = []  # each a regex for the whole JSON string; the value must match all of them
        if "pattern" in schema:
            parts.append('"' + self.json_pattern(schema["pattern"], where) + '"')
        if fmt is not None:
            parts.append('"' + FORMATS[fmt] + '"')
        if count != "*" or not parts:
            parts.append('"' + _CHAR + count + '"')
            if count != "*" and max(lo, hi or 0) <= MAX_UNROLL and (hi is None or lo <= hi):
                # (outside those bounds, pattern_dfa raises its errors on the pattern, as before)
                self.dfas.setdefault(parts[-1], length_string_dfa(lo, hi))
        # negations (from `not`): strings matching none of these
        minus = ['"' + self.json_pattern(x, where) + '"' for x in schema.get(NOT_PATTERN, ())]
        excluded = [v for v in schema.get(NOT_ENUM, ()) if isinstance(v, str)]
        if excluded:
            minus.append("|".join(string_literal_regex(v) for v in excluded))
        if len(parts) == 1 and not minus:
            return [(self.term(parts[0]),)]
        return [(self.intersection(parts, minus),)]

    def intersection(self, patterns: list[str], minus: list[str] | None = None) -> str:
        """A terminal for the strings every pattern matches and no `minus` pattern matches (DFA products:
        Python regex has no `and` or `not`)."""
        minus = minus or []
        key = "\x00and:" + json.dumps(patterns) + ("\x00minus:" + json.dumps(minus) if minus else "")
        name = self.terminals.get(key)
        if name is None:
            name = self.terminals[key] = f"T{len(self.terminals)}"
            dfa = self.dfas.get(patterns[0]) or pattern_dfa(patterns[0], 0, "string")
            for p in patterns[1:]:
                dfa = product_dfa(dfa, self.dfas.get(p) or pattern_dfa(p, 0, "string"), "and")
            for p in minus:
                dfa = product_dfa(dfa, pattern_dfa(p, 0, "string"), "minus")
            self.dfas[key] = dfa
        return name

    def json_pattern(self, pattern: Any, where: str) -> str:
        """The regex, over JSON string *content*, of strings that contain a match of `pattern` (re.search)."""
        if not isinstance(pattern, str):
            raise SpecError(f"pattern at {where} must be a string")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SpecError(f"pattern at {where}: {exc.msg}", source=pattern, position=exc.pos) from exc
        return _json_escape_regex(pattern, self, where)

    def type_array(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-2019: items as a list is prefixItems
            prefix, items = items, schema.get("additionalItems", True)
        prefix = prefix or []
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        if isinstance(lo, bool) or not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)):
            raise SpecError(f"minItems/maxItems at {where} must be integers")
        elems = [self.value(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix)]
        item = None if items is False else self.value(items, f"{where}/items")
        lb, rb, comma = self.punct("["), self.punct("]"), self.punct(",")
        if hi is not None and hi > 2000:
            hi = None if item is not None else hi
        # Sequences of n elements: prefix[:n] then items, for n in [lo, hi].
        max_n = hi if hi is not None else None
        out: list[tuple[str, ...]] = []
        if lo == 0 and (max_n is None or max_n >= 0):
            out.append((lb, rb))
        # fixed part: first max(lo,1) elements (prefix or item), then an optional tail
        need = max(lo, 1)
        seq: list[str] = []
        for i in range(need):
            sym = elems[i] if i < len(elems) else item
            if sym is None or (max_n is not None and i >= max_n):
                return out
            if i:
                seq.append(comma)
            seq.append(sym)
        tail = self.array_tail(elems, item, need, max_n, comma)
        out.append((lb, *seq, *((tail,) if tail else ()), rb))
        return out

    def array_tail(
        self, elems: list[str], item: str | None, i: int, max_n: int | None, comma: str
    ) -> str | None:
        """A non-terminal for the optional elements from index `i` on (None if nothing can follow)."""
        if max_n is not None and i >= max_n:
            return None
        if i >= len(elems):
            if item is None:
                return None
            name = self.fresh("tail")
            self.rule(name)
            if max_n is None:  # (, item)*
                self.rule(name, name, comma, item)
            else:
                nxt = self.array_tail(elems, item, i + 1, max_n, comma)
                self.rule(name, comma, item, *((nxt,) if nxt else ()))
            return name
        name = self.fresh("tail")
        self.rule(name)
        nxt = self.array_tail(elems, item, i + 1, max_n, comma)
        self.rule(name, comma, elems[i], *((nxt,) if nxt else ()))
        return name

    def type_object(self, schema: dict, where: str) -> list[tuple[str, ...]]:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise SpecError(f"properties at {where} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise SpecError(f"required at {where} must be a list")
        extra = schema.get("additionalProperties", True)
        patterns = schema.get("patternProperties") or {}
        if not isinstance(patterns, dict):
            raise SpecError(f"patternProperties at {where} must be an object")
        if len(patterns) > MAX_PATTERN_PROPERTIES:
            self.unsupported("patternProperties", where, f" (more than {MAX_PATTERN_PROPERTIES} patterns)")
            patterns = {}
        key_names = self.key_names(schema, where)  # propertyNames: None, or the DFA of allowed keys
        pattern = next(iter(patterns.items())) if len(patterns) == 1 and key_names is None else None
        missing = [r for r in required if r not in props]
        if missing and extra is False and not patterns:
            return []  # a required property that can never appear
        names = list(props)
        lb, rb, comma, colon = self.punct("{"), self.punct("}"), self.punct(","), self.punct(":")
        # Required properties not declared in `properties` come first among the extras: treat as declared.
        for r in missing:
            names.append(r)
        schemas = {n: props.get(n, extra if extra is not None else True) for n in names}
        for n in names:  # a name a pattern matches must also satisfy the pattern's schema
            hits = [ps for pat, ps in patterns.items() if re.search(pat, n)]
            if hits:
                schemas[n] = self.conjoin(_distinct([props[n] if n in props else True, *hits]))
            if key_names is not None and not key_names.matches(json.dumps(n).encode()):
                schemas[n] = False  # propertyNames refuses it: it cannot appear
        required_set = set(required)
        extra_pair = None
        extra_keys = []  # (key terminal, value schema, where) for properties not in `names`
        if pattern is None and (patterns or key_names is not None):
            extra_keys = self.key_classes(names, patterns, extra, key_names, where)
        elif pattern is None:
            if extra is not False:
                extra_keys.append((self.other_key(names), extra, f"{where}/additionalProperties"))
        else:
            matching = '"' + self.json_pattern(pattern[0], f"{where}/patternProperties") + '"'
            tag = json.dumps([sorted(names), pattern[0]])
            extra_keys.append(
                (self.key_class("match", tag, names, matching), pattern[1], f"{where}/patternProperties")
            )
            if extra is not False:
                rest_key = self.key_class("nomatch", tag, names, matching)
                extra_keys.append((rest_key, extra, f"{where}/additionalProperties"))
        if extra_keys:
            extra_pair = self.fresh("extra")
            for key, value_schema, at in extra_keys:
                self.rule(extra_pair, key, colon, self.value(value_schema, at))
        pairs = {
            n: (self.term(string_literal_regex(n)), colon, self.value(schemas[n], f"{where}/properties/{n}"))
            for n in names
        }
        lo_p, hi_p = self.property_counts(schema, where)
        members = ObjectMembers(self, names, pairs, required_set, extra_pair, comma, lo_p, hi_p)
        if self.property_order == "any" and (len(names) > 1 or (names and extra_pair is not None)):
            if len(names) > MAX_ANY_ORDER_PROPERTIES:
                self.unsupported(
                    "properties",
                    where,
                    f" in any order ({len(names)} properties; at most {MAX_ANY_ORDER_PROPERTIES}:"
                    " the grammar grows as 2^n); lenient falls back to schema order",
                )
                return [(lb, members.schema_order(), rb)]
            return [(lb, members.any_order(), rb)]
        return [(lb, members.schema_order(), rb)]

    def key_names(self, schema: dict, where: str) -> ByteDFA | None:
        """The DFA of the JSON spellings of keys `propertyNames` allows (None if absent or `true`).
        Exact for string keywords (`pattern`, lengths, `format`, `enum`/`const`, `type`); anything else is
        unsupported (under `lenient`, None)."""
        sub = self.deref(schema.get("propertyNames", True), where + "/propertyNames")
        if sub is True or sub == {}:
            return None
        if sub is False:
            return ByteDFA.empty()
        if not isinstance(sub, dict):
            raise SpecError(f"propertyNames at {where} must be a schema")
        keys = {k for k in sub if k in HANDLED | UNSUPPORTED}
        allowed = {"type", "pattern", "minLength", "maxLength", "format", "enum", "const"}
        if keys - allowed:
            self.unsupported("propertyNames", where, f" (only {sorted(allowed)} on keys; got {sorted(keys)})")
            return None
        if "enum" in sub or "const" in sub:
            values = [sub["const"]] if "const" in sub else sub["enum"]
            if not isinstance(values, list):
                raise SpecError(f"enum at {where}/propertyNames must be a list")
            names = [v for v in values if isinstance(v, str) and self.check(v, sub, where)]
            if not names:
                return ByteDFA.empty()
            return strings_dfa(tuple(sorted(set(names))))
        types = sub.get("type", "string")
        if "string" not in ([types] if isinstance(types, str) else types):
            return ByteDFA.empty()
        alts = self.type_string(sub, where + "/propertyNames")
        if not alts:
            return ByteDFA.empty()
        key = next(k for k, v in self.terminals.items() if v == alts[0][0])
        return self.dfas.get(key) or pattern_dfa(key, 0, "property names")

    def key_classes(
        self, names: list[str], patterns: dict, extra: Any, key_names: ByteDFA | None, where: str
    ) -> list[tuple[str, Any, str]]:
        """(key terminal, value schema, where) for the keys not in `names`, one class per set of patterns
        that match (the value must satisfy all their schemas; no pattern: `additionalProperties`), each key
        DFA cut to what `propertyNames` allows. Classes no key can be in are left out."""
        self.other_key(names)
        any_key = base_dfa(_STRING)
        dfa = self.dfas.get(self.other_key_key(names)) if names else any_key
        if key_names is not None:
            dfa = product_dfa(dfa, key_names, "and")
        at = f"{where}/patternProperties"
        matchers = [
            (pattern_dfa('"' + self.json_pattern(p, at) + '"', 0, "key pattern"), ps)
            for p, ps in patterns.items()
        ]
        out: list[tuple[str, Any, str]] = []

        def split(dfa: ByteDFA, i: int, hits: list) -> None:
            if dfa.start < 0:
                return
            if i < len(matchers):
                split(product_dfa(dfa, matchers[i][0], "and"), i + 1, [*hits, matchers[i][1]])
                split(product_dfa(dfa, matchers[i][0], "minus"), i + 1, hits)
                return
            if not hits and extra is False:
                return
            key = f"\x00key-class:{id(dfa)}"  # DFAs are kept alive in self.dfas: ids stay unique
            name = self.terminals.get(key)
            if name is None:
                name = self.terminals[key] = f"T{len(self.terminals)}"
                self.dfas[key] = dfa
            value = self.conjoin(_distinct(hits)) if hits else extra
            out.append((name, value, f"{where}/{'patternProperties' if hits else 'additionalProperties'}"))

        split(dfa, 0, [])
        return out

    def property_counts(self, schema: dict, where: str) -> tuple[int, int | None]:
        """(minProperties, maxProperties or None), validated."""
        lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
        for k, v in (("minProperties", lo), ("maxProperties", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise SpecError(f"{k} at {where} must be a non-negative integer, got {v!r}")
        if hi is not None and hi > MAX_COUNTED_PROPERTIES or lo > MAX_COUNTED_PROPERTIES:
            self.unsupported(
                "maxProperties" if hi is not None and hi > MAX_COUNTED_PROPERTIES else "minProperties",
                where,
                f" (counts above {MAX_COUNTED_PROPERTIES})",
            )
            return 0, None
        return lo, hi

    def key_class(self, kind: str, tag: str, names: list[str], matching: str) -> str:
        """A terminal for keys not in `names` that match (`kind="match"`) or do not match the JSON-string
        regex `matching` (a pattern property's keys, and the rest)."""
        key = f"\x00key-{kind}:" + tag
        name = self.terminals.get(key)
        if name is None:
            name = self.terminals[key] = f"T{len(self.terminals)}"
            others = self.dfas.get(self.other_key_key(names)) if names else None
            if others is None:
                self.other_key(names)
                others = self.dfas.get(self.other_key_key(names)) or base_dfa(_STRING)
            self.dfas[key] = product_dfa(
                others, pattern_dfa(matching, 0, "key pattern"), "and" if kind == "match" else "minus"
            )
        return name

    @staticmethod
    def other_key_key(names: list[str]) -> str:
        return "\x00json-string-except:" + json.dumps(sorted(names))

    def other_key(self, names: list[str]) -> str:
        """A terminal for JSON strings that decode to none of `names` (a DFA difference: no regex for it)."""
        if not names:
            return self.term(_STRING)
        key = self.other_key_key(names)
        name = self.terminals.get(key)
        if name is None:
            name = self.terminals[key] = f"T{len(self.terminals)}"
            names_dfa = strings_dfa(tuple(sorted(set(names))))
            self.dfas[key] = product_dfa(base_dfa(_STRING), names_dfa, "minus")
        return name


# Terminals that do not depend on the schema (plain strings, numbers, literals, formats; whitespace and
# punctuation are marked `base` where made): their DFAs are kept for the process, never evicted from
# `pattern_dfa`'s bounded cache by a large schema, so they and the lexer walks cached on them stay shared.
_BASE_PATTERNS = frozenset(
    [_STRING, _NUMBER, _INTEGER, "null", "true", "false", *('"' + f + '"' for f in FORMATS.values())]
)
_BASE_DFAS: dict[str, ByteDFA] = {}
_MAX_BASE_DFAS = 1024  # whitespace options make a few patterns each; past this, fall back to pattern_dfa


def base_dfa(pattern: str, name: str = "json") -> ByteDFA:
    """The DFA of a schema-independent terminal pattern, built once per process.

    Raises what `pattern_dfa` raises, naming the terminal `name` (a whitespace option too large, say).
    """
    dfa = _BASE_DFAS.get(pattern)
    if dfa is None:
        dfa = pattern_dfa(pattern, 0, name)
        if len(_BASE_DFAS) < _MAX_BASE_DFAS:
            _BASE_DFAS[pattern] = dfa
    return dfa


@lru_cache(maxsize=32)  # a DFA here can take ~20 MB (20,000 states x 256 bytes)
def length_string_dfa(lo: int, hi: int | None) -> ByteDFA:
    """The minimal DFA of JSON strings of `lo` to `hi` characters (`hi` None: no upper bound), quotes
    included: the language of the pattern `"` + `_CHAR{lo,hi}` + `"`, built directly.

    The NFA route unrolls `_CHAR` (21 DFA states, UTF-8 splits included) `hi` times and determinises that
    (~80 ms for maxLength 256); here the DFA is laid out as layers: layer k holds a copy of the states of
    one character's DFA `C` reached after k characters. `C` accepts a prefix-free language with its one
    accepting state a sink, and never starts with `"`, so finishing a character steps to the next layer's
    start and `"` from a layer's start (k >= lo) closes the string. With more than `RELAX_SPAN` optional
    characters, the DFA gets the unbounded one as its walk base, as `pattern_dfa` would give it.

    Raises `CompileLimitError` past `MAX_DFA_STATES` states (`lo`, `hi` at most `MAX_UNROLL`: the layout is
    built before the check).
    """
    char = base_dfa(_CHAR)
    (sink,) = np.flatnonzero(char.accepting)  # the structure the layout relies on (checked by tests)
    inner = np.flatnonzero(~char.accepting)  # a character's unfinished states, copied per layer
    local = np.full(char.n_states, -1, dtype=np.int64)
    local[inner] = np.arange(inner.size)
    width = inner.size
    layers = (hi if hi is not None else lo) + 1
    n = 1 + layers * width + 1
    close = n - 1
    rows = char.transitions[inner].astype(np.int64)  # (width, 256)
    k = np.arange(layers)[:, None, None]
    first = 1 + k * width  # each layer's first state id
    nxt = k + 1 if hi is not None else np.minimum(k + 1, lo)  # unbounded: the last layer loops
    to_next = np.where(nxt < layers, 1 + nxt * width + local[char.start], -1)
    table = np.where(rows < 0, -1, np.where(rows == sink, to_next, first + local[np.maximum(rows, 0)]))
    table = np.concatenate(
        [np.full((1, 256), -1), table.reshape(layers * width, 256), np.full((1, 256), -1)]
    ).astype(np.int32)
    table[0, ord('"')] = 1 + local[char.start]
    starts = 1 + np.arange(lo, layers) * width + local[char.start]
    table[starts, ord('"')] = close
    accepting = np.zeros(n, dtype=bool)
    accepting[close] = True
    # With an upper bound, minimal by design once dead states go (the last layer's unfinished characters):
    # a character's states are pairwise distinct (C is minimal), layers differ in how many characters may
    # follow, and strings decode uniquely (C prefix-free, `"` starts none): only trimming and renumbering
    # are left. Unbounded, layers lo-1 and lo agree mid-character (any number may follow): refine.
    dfa = minimize(table, accepting, 0, np.arange(256), merged=hi is not None)
    if dfa.n_states > MAX_DFA_STATES:
        raise CompileLimitError(
            f"a JSON string of {lo} to {hi} characters needs more than max_states={MAX_DFA_STATES} DFA states"
        )
    if hi is not None and hi - lo > RELAX_SPAN:
        set_base(dfa, intern_by_content(length_string_dfa(lo, None)))
    return dfa


@lru_cache(maxsize=2048)
def product_dfa(a: ByteDFA, b: ByteDFA, mode: str) -> ByteDFA:
    """The minimal DFA of L(a) minus L(b) (`mode="minus"`) or L(a) and L(b) (`"and"`), by a product.

    Cached by the operands' identity (DFAs from `pattern_dfa` are shared, so repeated names sets hit).
    Raises `CompileLimitError` past `MAX_DFA_STATES` product states.
    """
    return _product_dfa(a, b, mode, MAX_DFA_STATES)


def _distinct(schemas: list) -> list:
    """`schemas` without repeats (equal schemas, e.g. patterns that all `$ref` one definition)."""
    out: list = []
    for x in schemas:
        if not any(x is y or x == y for y in out):
            out.append(x)
    return out


def _lcm(a: Fraction, b: Fraction) -> Fraction:
    """The least positive rational that is an integer multiple of both `a` and `b` (both > 0)."""
    return Fraction(math.lcm(a.numerator, b.numerator), math.gcd(a.denominator, b.denominator))


def _json_type(value: Any) -> str:
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
    if isinstance(value, list):
        return "array"
    return "object"


def _json_escape_regex(pattern: str, low: _Lowering, where: str) -> str:
    """Rewrite a regex over decoded characters into one over JSON string content (escapes spelled out)."""
    import re._constants as C  # noqa: N812
    import re._parser as sre_parse

    from .terminals import _CATEGORY, _complement, _merge

    tree = sre_parse.parse(pattern)

    def cls_ranges(items: list) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        negate = False
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                ranges.append((av, av))
            elif op is C.RANGE:
                ranges.append(av)
            elif op is C.CATEGORY:
                from .terminals import _category_ranges

                esc, neg = _CATEGORY[av]
                base = list(_category_ranges(esc))
                ranges.extend(_complement(base) if neg else base)
        ranges = _merge(ranges)
        return _complement(ranges) if negate else ranges

    def chars(ranges: list[tuple[int, int]]) -> str:
        """JSON spellings of one character from `ranges` (bare where allowed; escapes for the rest)."""
        bare = [(max(lo, 0x20), hi) for lo, hi in ranges if hi >= 0x20]
        bare_ranges = []
        for lo, hi in bare:
            for a, b in _split_out(lo, hi, (0x22, 0x5C)):
                bare_ranges.append((a, b))
        parts = []
        if bare_ranges:
            parts.append("[" + "".join(_cls(a, b) for a, b in bare_ranges) + "]")
        for c in '"\\/\b\f\n\r\t':
            if any(lo <= ord(c) <= hi for lo, hi in ranges):
                parts.append(_char_regex(c).replace("(?:", "(?:", 1))
        for lo, hi in ranges:  # control characters need escapes
            for c in range(lo, min(hi, 0x1F) + 1):
                if chr(c) not in "\b\f\n\r\t":
                    parts.append(_char_regex(chr(c)))
        return "(?:" + "|".join(parts) + ")" if parts else "(?!)"

    def emit(items: list) -> str:
        out = []
        for op, av in items:
            if op is C.LITERAL:
                out.append(chars([(av, av)]))
            elif op is C.NOT_LITERAL:
                out.append(chars(_complement([(av, av)])))
            elif op is C.ANY:
                out.append(chars(_complement([(10, 10)])))
            elif op is C.IN:
                out.append(chars(cls_ranges(av)))
            elif op is C.BRANCH:
                out.append("(?:" + "|".join(emit(alt) for alt in av[1]) + ")")
            elif op is C.SUBPATTERN:
                if av[1] or av[2]:
                    low.unsupported("pattern", where, " (inline flags)")
                out.append("(?:" + emit(av[3]) + ")")
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
                lo, hi, body = av
                hi_s = "" if hi is C.MAXREPEAT else str(hi)
                out.append("(?:" + emit(body) + f"){{{lo},{hi_s}}}")
            else:
                low.unsupported("pattern", where, f" ({op} in the regex)")
                out.append("")
        return "".join(out)

    # re.search semantics: each top-level alternative may float (any characters around it) unless anchored;
    # as in Python's re (which jsonschema uses), "$" also matches before a final newline.
    def expand(items: list) -> list[list]:
        """Top-level alternatives; re._parser factors a common "^" out of them (^a|^b -> ^(?:a|b))."""
        if len(items) == 1 and items[0][0] is C.BRANCH:
            return [x for alt in items[0][1][1] for x in expand(list(alt))]
        if len(items) == 2 and items[0][0] is C.AT and items[1][0] is C.BRANCH:
            return [[items[0], *x] for alt in items[1][1][1] for x in expand(list(alt))]
        return [items]

    alts = expand(list(tree))
    out = []
    for alt in alts:
        alt = list(alt)
        head = tail = f"{_CHAR}*"
        if alt and alt[0][0] is C.AT and alt[0][1] in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            head, alt = "", alt[1:]
        if alt and alt[-1][0] is C.AT and alt[-1][1] in (C.AT_END, C.AT_END_STRING):
            tail = "" if alt[-1][1] is C.AT_END_STRING else "(?:" + _char_regex("\n") + ")?"
            alt = alt[:-1]
        out.append(head + "(?:" + emit(alt) + ")" + tail)
    return "(?:" + "|".join(out) + ")"


def _split_out(lo: int, hi: int, points: tuple[int, ...]) -> list[tuple[int, int]]:
    out = [(lo, hi)]
    for p in points:
        nxt = []
        for a, b in out:
            if a <= p <= b:
                if a < p:
                    nxt.append((a, p - 1))
                if p < b:
                    nxt.append((p + 1, b))
            else:
                nxt.append((a, b))
        out = nxt
    return out


def _cls(a: int, b: int) -> str:
    def esc(c: int) -> str:
        return "\\" + chr(c) if chr(c) in "\\]^-[" else chr(c)

    return esc(a) if a == b else f"{esc(a)}-{esc(b)}"


class JsonSchemaConstraint(GrammarConstraint):
    """A JSON schema (or pydantic model) as a grammar constraint.

    Attributes:
        schema: the JSON schema (a dict or bool).
        model: the pydantic model class, if built from one.
        ignored: `where/keyword` of each keyword skipped under `lenient=True`.
    """

    def __init__(self, ir: GrammarIR, schema: Any, model: Any, ignored: list[str], label: str):
        super().__init__(ir, label=label)
        self.schema = schema
        self.model = model
        self.ignored = ignored

    def parse(self, text: str) -> Any:
        """Parse generated `text`: a validated pydantic model instance (if built from a model), else the JSON
        value. Raises `ConstraintError` if the text is not valid JSON for the schema."""
        from constrain.errors import ConstraintError

        try:
            if self.model is not None:
                return self.model.model_validate_json(text)
            value = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - pydantic's and json's errors, reported as ours
            raise ConstraintError(f"generated text does not validate: {exc}") from exc
        try:
            import jsonschema
        except ImportError:  # pragma: no cover - jsonschema is a test dependency
            return value
        errors = list(jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value))
        if errors:
            raise ConstraintError(f"generated text does not validate: {errors[0].message}")
        return value


def json_schema(
    schema: Any,
    *,
    whitespace: str = "flexible",
    max_whitespace: int = 20,
    lenient: bool = False,
    property_order: str = "schema",
) -> JsonSchemaConstraint:
    """A token constraint for JSON values valid under `schema`.

    Args:
        schema: a JSON schema (dict, bool, or JSON text) or a pydantic `BaseModel` subclass.
        whitespace: "flexible" (default), "compact" or "indented" (see the module docstring).
        max_whitespace: the most whitespace characters per gap (flexible) or spaces per line (indented).
        lenient: skip keywords we cannot enforce (listed in `.ignored`) instead of raising.
        property_order: "schema" (default: declared properties in the schema's order, extra ones after them)
            or "any" (members in any order, each declared property at most once; objects with more than
            `MAX_ANY_ORDER_PROPERTIES` declared properties raise `UnsupportedError`).

    Raises:
        UnsupportedError: a validation keyword that cannot be enforced exactly (message names it and where).
        SpecError: a malformed schema (bad `$ref`, wrong keyword types, a schema that admits no value).
        CompileLimitError: the grammar's automata would be too large (e.g. a maxLength in the thousands).
    """
    model = None
    if isinstance(schema, type):
        try:
            from pydantic import BaseModel
        except ImportError as exc:  # pragma: no cover
            raise SpecError("pydantic is not installed") from exc
        if not issubclass(schema, BaseModel):
            raise SpecError(
                f"json_schema() takes a schema or a pydantic BaseModel subclass, got {schema.__name__}"
            )
        model = schema
        schema = schema.model_json_schema()
    elif isinstance(schema, str | bytes):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"schema text is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
    if not isinstance(schema, dict | bool):
        raise SpecError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    # The same schema again (a server's repeated request; maskbench compiles once per instance): the lowering
    # of a large schema takes seconds. Keyed by repr, which keeps key order (property order is meaningful)
    # and tells 1 from "1" and True; unhashable oddities just skip the cache.
    try:
        key = (repr(schema), whitespace, max_whitespace, lenient, property_order, model)
        hit = _lowered.get(key)
    except TypeError:
        key, hit = None, None
    if hit is not None and repr(hit.schema) == key[0]:  # (unless the first caller's dict was mutated since)
        _lowered.move_to_end(key)
        return hit
    constraint = _lower(schema, model, whitespace, max_whitespace, lenient, property_order)
    if key is not None:
        _lowered[key] = constraint
        while len(_lowered) > _LOWERED_CACHE_SIZE:
            _lowered.popitem(last=False)
    return constraint


_LOWERED_CACHE_SIZE = 64
_lowered: OrderedDict[tuple, JsonSchemaConstraint] = OrderedDict()
register_compile_cache(_lowered.clear)


def _lower(
    schema: Any, model: Any, whitespace: str, max_whitespace: int, lenient: bool, property_order: str
) -> JsonSchemaConstraint:
    """`json_schema` without its cache."""
    low = _Lowering(
        schema,
        whitespace=whitespace,
        max_whitespace=max_whitespace,
        lenient=lenient,
        property_order=property_order,
    )
    try:
        top = low.value(schema, "#")
    except RecursionError as exc:
        raise SpecError("schema nesting is too deep") from exc
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as exc:
        if isinstance(exc, ConstraintError):
            raise
        # a keyword with a value of the wrong JSON type somewhere under the last schema entered
        raise SpecError(f"malformed schema near {low.where}: {type(exc).__name__}: {exc}") from exc
    n_ws = max(1, max_whitespace)
    ws = low.term(rf"[ \t\n\r]{{1,{n_ws}}}", base=True) if whitespace != "compact" else None
    start_rules = [Rule("start", (top,))]
    if ws:
        start_rules = [Rule("start", ("ws0", top, "ws0")), Rule("ws0", ()), Rule("ws0", (ws,))]
    terminals = tuple(
        Terminal(name, pattern, dfa=low.dfas.get(pattern)) for pattern, name in low.terminals.items()
    )
    ir = GrammarIR(terminals=terminals, rules=tuple(start_rules + low.rules), start="start")
    label = f"json schema{f' ({model.__name__})' if model else ''}"
    constraint = JsonSchemaConstraint(ir, schema, model, low.ignored, label)
    _ = constraint.core  # surface grammar errors (e.g. no value admitted) now
    return constraint
