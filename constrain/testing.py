"""Property-based testing of constraints: hypothesis strategies for strings a grammar or JSON schema accepts,
and checkers that a compiled constraint is sound and complete on them.

    from constrain.testing import from_grammar, check_complete, check_refuses
    @given(from_grammar(grammar_text))
    def test_json(s):
        check_complete(compiled, tokenizer, s)       # every token of its tokenization allowed, EOS at the end

The generators are independent of the engine: `from_grammar` derives strings from the grammar's rules and
draws each terminal with hypothesis' own `from_regex`; `from_schema` builds JSON values from the schema and
keeps those the `jsonschema` validator accepts.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from .bitmask import bitmask_words
from .constraint import CompiledConstraint, Matcher


# -- strategies ------------------------------------------------------------------------------------------
def from_grammar(grammar: Any, *, max_depth: int = 8, ignore_rate: float = 0.3) -> st.SearchStrategy[str]:
    """Strings in the language of a grammar (Lark text, `GrammarIR` or `GrammarConstraint`).

    Rules are expanded at random up to `max_depth`, then along the shortest derivations; each terminal is
    drawn with `hypothesis.strategies.from_regex(pattern, fullmatch=True)`; ignored terminals (whitespace)
    are inserted between lexemes with probability about `ignore_rate`.
    """
    from constrain.grammars.earley import GrammarIR
    from constrain.grammars.lark import lark_to_ir
    from constrain.grammars.terminals import effective_pattern

    if isinstance(grammar, str):
        ir = lark_to_ir(grammar)
    elif isinstance(grammar, GrammarIR):
        ir = grammar
    else:
        ir = grammar.ir
    terms = {t.name: t for t in ir.terminals}
    rules: dict[str, list[tuple[str, ...]]] = {}
    for r in ir.rules:
        rules.setdefault(r.lhs, []).append(r.rhs)
    # Height of the shortest derivation of each symbol (terminals: 1); rules that cannot finish are dropped.
    height: dict[str, int] = {n: 1 for n in terms}
    changed = True
    while changed:
        changed = False
        for lhs, alts in rules.items():
            for rhs in alts:
                if all(s in height for s in rhs):
                    h = 1 + max((height[s] for s in rhs), default=0)
                    if h < height.get(lhs, 1 << 30):
                        height[lhs] = h
                        changed = True
    term_st = {
        n: st.from_regex(re.compile(effective_pattern(t.pattern), t.flags), fullmatch=True)
        for n, t in terms.items()
    }
    ignore_st = [term_st[n] for n in ir.ignore]

    @st.composite
    def derive(draw: Callable, symbol: str = ir.start, depth: int = 0) -> list[str]:
        if symbol in terms:
            return [draw(term_st[symbol])]
        alts = [rhs for rhs in rules.get(symbol, ()) if all(s in height for s in rhs)]
        if depth >= max_depth:
            best = min(1 + max((height[s] for s in rhs), default=0) for rhs in alts)
            alts = [rhs for rhs in alts if 1 + max((height[s] for s in rhs), default=0) == best]
        rhs = draw(st.sampled_from(alts))
        out: list[str] = []
        for s in rhs:
            out.extend(draw(derive(s, depth + 1)))
        return out

    @st.composite
    def sentence(draw: Callable) -> str:
        lexemes = draw(derive())
        parts: list[str] = []
        for i in range(len(lexemes) + 1):
            if ignore_st and draw(st.floats(0, 1)) < ignore_rate:
                parts.append(draw(st.sampled_from(ignore_st).flatmap(lambda s: s)))
            if i < len(lexemes):
                parts.append(lexemes[i])
        return "".join(parts)

    return sentence()


def from_schema(schema: dict | bool, *, max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """JSON values that `schema` accepts (checked with `jsonschema`; hypothesis filters out the rest).

    Objects and arrays follow `properties`/`required`/`items`/`prefixItems`; enums, consts and scalar types
    are drawn directly; anything else falls back to generic JSON, filtered by the validator, so this is
    meant for schemas whose valid values are not too rare.
    """
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema)
    root = schema

    def resolve(s: Any) -> Any:
        for _ in range(20):
            if isinstance(s, dict) and "$ref" in s and s["$ref"].startswith("#/"):
                node: Any = root
                for part in s["$ref"][2:].split("/"):
                    node = node[part.replace("~1", "/").replace("~0", "~")]
                s = node
            else:
                break
        return s

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )
    generic = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=max_leaves,
    )

    def build(s: Any, depth: int) -> st.SearchStrategy[Any]:
        s = resolve(s)
        if s is True or s == {}:
            return generic
        if s is False or not isinstance(s, dict):
            return st.nothing()
        if "const" in s:
            return st.just(s["const"])
        if "enum" in s:
            return st.sampled_from(s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                return st.one_of(
                    [build({**{k: v for k, v in s.items() if k != key}, **sub}, depth) for sub in s[key]]
                )
        t = s.get("type")
        if isinstance(t, list):
            return st.one_of([build({**s, "type": x}, depth) for x in t])
        if t == "object" or (t is None and "properties" in s):
            props = s.get("properties", {})
            required = set(s.get("required", []))
            if depth > 4:
                return st.fixed_dictionaries({k: build(props.get(k, True), depth + 1) for k in required})
            return st.fixed_dictionaries(
                {k: build(props.get(k, True), depth + 1) for k in required},
                optional={k: build(v, depth + 1) for k, v in props.items() if k not in required},
            )
        if t == "array":
            prefix = [build(x, depth + 1) for x in s.get("prefixItems", [])]
            item = (
                build(s.get("items", True), depth + 1) if s.get("items", True) is not False else st.nothing()
            )
            lo = max(0, s.get("minItems", 0) - len(prefix))
            hi = s.get("maxItems")
            hi = None if hi is None else max(lo, hi - len(prefix))
            if s.get("items", True) is False:
                tail = st.just([]) if lo == 0 else st.nothing()
            else:
                tail = st.lists(item, min_size=lo, max_size=min(hi if hi is not None else 4, lo + 4))
            return st.tuples(*prefix, tail).map(lambda x: list(x[:-1]) + list(x[-1]))
        if t == "string":
            fmt = _FORMATS.get(s.get("format", ""))
            if fmt is not None:
                return fmt
            if "pattern" in s:
                return st.from_regex(s["pattern"])
            return st.text(
                min_size=s.get("minLength", 0), max_size=s.get("maxLength", s.get("minLength", 0) + 10)
            )
        if t == "integer":
            return st.integers(min_value=s.get("minimum"), max_value=s.get("maximum"))
        if t == "number":
            return st.one_of(
                st.integers(min_value=_ceil(s.get("minimum")), max_value=_floor(s.get("maximum"))),
                st.floats(s.get("minimum"), s.get("maximum"), allow_nan=False, allow_infinity=False),
            )
        if t == "boolean":
            return st.booleans()
        if t == "null":
            return st.none()
        return generic

    return build(schema, 0).filter(validator.is_valid)


_FORMATS = {
    "date": st.dates().map(lambda d: d.isoformat()),
    "date-time": st.datetimes(timezones=st.just(datetime.UTC)).map(lambda d: d.isoformat()),
    "email": st.emails(),
    "uuid": st.uuids().map(str),
    "ipv4": st.ip_addresses(v=4).map(str),
    "ipv6": st.ip_addresses(v=6).map(str),
}


def _ceil(x: float | None) -> int | None:
    return None if x is None else int(np.ceil(x))


def _floor(x: float | None) -> int | None:
    return None if x is None else int(np.floor(x))


# -- checkers --------------------------------------------------------------------------------------------
def _allowed(m: Matcher, token: int) -> bool:
    words = np.zeros((1, bitmask_words(m.vocab.vocab_size)), dtype=np.int32)
    m.fill_bitmask(words, 0)
    return bool((int(words[0, token >> 5]) >> (token & 31)) & 1)


def check_complete(compiled: CompiledConstraint, tokens: Sequence[int], label: str = "") -> None:
    """Assert that `tokens` (a tokenization of a valid string) are each allowed by the mask and accepted in
    turn, and that EOS is allowed at the end. Raises `AssertionError` naming the first failing position."""
    m = compiled.matcher()
    vocab = compiled.vocab
    for i, t in enumerate(tokens):
        assert _allowed(m, t), f"{label}: token {i} ({vocab.token_bytes[t]!r}) refused by the mask"
        assert m.accept(t), f"{label}: token {i} ({vocab.token_bytes[t]!r}) refused by accept"
    assert m.is_accepting(), f"{label}: the full text is not accepting"
    for eos in vocab.eos_ids:
        assert _allowed(m, eos), f"{label}: EOS {eos} not allowed at the end"


def check_refuses(compiled: CompiledConstraint, tokens: Sequence[int], label: str = "") -> int:
    """Assert that the token sequence (of an invalid string) is refused: some token is masked out, or EOS is
    not allowed at the end. The mask and `accept` must agree at every step. Returns the refusing position
    (`len(tokens)` if only EOS is refused)."""
    m = compiled.matcher()
    for i, t in enumerate(tokens):
        allowed = _allowed(m, t)
        accepted = m.accept(t)
        assert allowed == accepted, f"{label}: mask says {allowed} but accept says {accepted} at token {i}"
        if not accepted:
            return i
    assert not m.is_accepting(), f"{label}: an invalid text was accepted in full"
    return len(tokens)


def check_sound_step(m: Matcher, rng: np.random.Generator, samples: int = 64) -> None:
    """Assert mask/accept agreement on `samples` random token ids (plus every allowed id up to `samples`),
    and that every allowed token leads to a state that can still finish (accepting, or some token allowed)."""
    vocab = m.vocab
    words = np.zeros((1, bitmask_words(vocab.vocab_size)), dtype=np.int32)
    m.fill_bitmask(words, 0)
    bits = np.unpackbits(words[0].view(np.uint8), bitorder="little")[: vocab.vocab_size]
    allowed = np.flatnonzero(bits)
    probe = list(rng.choice(vocab.n_tokens, size=min(samples, vocab.n_tokens), replace=False))
    probe += list(rng.permutation(allowed)[:samples]) if len(allowed) else []
    for t in probe:
        t = int(t)
        f = m.fork()
        ok = f.accept(t)
        assert ok == bool(bits[t]), f"token {t} ({vocab.token_bytes[t]!r}): mask {bool(bits[t])}, accept {ok}"
        if ok and not f.is_terminated():
            inner = np.zeros_like(words)
            f.fill_bitmask(inner, 0)
            assert inner.any(), f"token {t} ({vocab.token_bytes[t]!r}) leads to a dead end"


def json_text(value: Any, style: str = "default") -> str:
    """Serialise `value` the way the tests feed JSON to constraints: 'default' (json.dumps), 'compact',
    or 'indent' (2 spaces)."""
    if style == "compact":
        return json.dumps(value, separators=(",", ":"))
    if style == "indent":
        return json.dumps(value, indent=2)
    return json.dumps(value)
