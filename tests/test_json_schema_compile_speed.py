"""Compile-time fast paths of the JSON-schema constraint, each checked against the slow path it replaces or
an independent oracle (Python `re`, `jsonschema`, a pure-Python minimisation).

- `dfa.minimize` in one numba kernel: against Moore's partition refinement written out in Python.
- counted repeats in `terminals._Lowering` copy their body's first lowering: the NFA equals the one repeated
  lowering builds, and the DFA's language is `re.fullmatch`'s.
- `json_schema.length_string_dfa` (minLength/maxLength strings, built as layers): equal to the DFA of its
  pattern built by `pattern_dfa` without the cache, walk base included.
- `json_schema.strings_dfa` (property-name sets, a trie for one-spelling names): equal to the regex route.
- `terminals.pattern_dfa`'s cache is keyed by pattern and flags, not by the terminal's name.
- `json_schema.base_dfa`: schema-independent terminals share one DFA across schemas.
"""

from __future__ import annotations

import json
import re
import re._parser as sre_parse

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import Vocabulary
from constrain.errors import CompileLimitError, SpecError
from constrain.grammars import json_schema as js
from constrain.grammars import terminals
from constrain.grammars.dfa import ByteDFA, minimize
from constrain.grammars.product import base_hint

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_dfa(a: ByteDFA, b: ByteDFA) -> bool:
    return (
        a.start == b.start
        and np.array_equal(a.transitions, b.transitions)
        and np.array_equal(a.accepting, b.accepting)
    )


# -- minimize -----------------------------------------------------------------------------------------------
def moore_minimal(table: np.ndarray, accepting: np.ndarray, start: int, class_of: np.ndarray) -> tuple:
    """The minimal DFA by Moore's refinement over bytes, renumbered breadth-first in byte order: a tuple of
    (row of 256 targets, accepting) per state, () for the empty language. Independent of `dfa.py`."""
    n = table.shape[0]
    full = [[int(table[q, class_of[b]]) for b in range(256)] for q in range(n)]
    live = {q for q in range(n) if accepting[q]}
    changed = True
    while changed:
        changed = False
        for q in range(n):
            if q not in live and any(t in live for t in full[q]):
                live.add(q)
                changed = True
    if start not in live:
        return ()
    block = {q: int(bool(accepting[q])) for q in live}
    while True:
        sigs = {q: (block[q], tuple(block[t] if t in live else -1 for t in full[q])) for q in live}
        ids: dict = {}
        new = {q: ids.setdefault(sigs[q], len(ids)) for q in sorted(live)}
        if len(ids) == len(set(block.values())):
            break
        block = new
    rep = {}
    for q in sorted(live):
        rep.setdefault(block[q], q)
    order = {block[start]: 0}
    todo = [block[start]]
    out = []
    while todo:
        b = todo.pop(0)
        row = []
        for t in full[rep[b]]:
            if t in live:
                tb = block[t]
                if tb not in order:
                    order[tb] = len(order)
                    todo.append(tb)
                row.append(order[tb])
            else:
                row.append(-1)
        out.append((tuple(row), bool(accepting[rep[b]])))
    return tuple(out)


@st.composite
def class_dfas(draw):
    """A random partial DFA over byte classes (some unreachable or dead states): table, accepting, start,
    class_of."""
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 5))
    cells = draw(st.lists(st.integers(-1, n - 1), min_size=n * k, max_size=n * k))
    table = np.asarray(cells, dtype=np.int32).reshape(n, k)
    accepting = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    start = draw(st.integers(0, n - 1))
    cuts = sorted(draw(st.lists(st.integers(1, 255), min_size=k - 1, max_size=k - 1, unique=True)))
    class_of = np.searchsorted(np.asarray(cuts), np.arange(256), side="right")
    return table, accepting, start, class_of


@SETTINGS
@given(class_dfas())
def test_minimize_kernel_equals_moores_refinement(case):
    """For any partial DFA over byte classes, `minimize` gives the minimal DFA Moore's refinement gives,
    numbered breadth-first in byte order (the canonical form equal languages share)."""
    table, accepting, start, class_of = case
    dfa = minimize(table, accepting, start, class_of)
    want = moore_minimal(table, accepting, start, class_of)
    got = tuple((tuple(dfa.transitions[q].tolist()), bool(dfa.accepting[q])) for q in range(dfa.n_states))
    assert got == want
    assert dfa.start == (0 if want else -1)


@SETTINGS
@given(class_dfas(), st.integers(0, 3))
def test_minimize_without_refinement_renumbers_a_minimal_dfa_to_itself(case, pad):
    """`merged=True` (for constructions minimal by design) only trims and renumbers: on a minimal DFA with
    dead and unreachable states added and its states shuffled, it gives that minimal DFA back."""
    dfa = minimize(*case)
    n = dfa.n_states
    if n == 0:
        return
    rng = np.random.default_rng(n + pad)
    perm = rng.permutation(n + pad)  # old state -> new position; `pad` extra dead states
    table = np.full((n + pad, 256), -1, dtype=np.int32)
    table[perm[:n]] = np.where(dfa.transitions >= 0, perm[np.maximum(dfa.transitions, 0)], -1)
    table[perm[n:], 0] = perm[n:]  # dead: loops that never accept
    accepting = np.zeros(n + pad, dtype=bool)
    accepting[perm[:n]] = dfa.accepting
    assert same_dfa(minimize(table, accepting, int(perm[0]), np.arange(256), merged=True), dfa)


def test_minimize_handles_256_wide_tables_of_product_automata():
    """A product-sized table (256 byte columns, many equal): the result is the oracle's."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        pattern = rng.integers(0, 6, 256)  # 6 distinct columns, spread over the bytes
        cols = np.where(rng.random((n, 6)) < 0.5, rng.integers(0, n, (n, 6)), -1).astype(np.int32)
        table = cols[:, pattern]
        accepting = rng.random(n) < 0.3
        dfa = minimize(table, accepting, 0, np.arange(256))
        want = moore_minimal(table, accepting, 0, np.arange(256))
        got = tuple((tuple(dfa.transitions[q].tolist()), bool(dfa.accepting[q])) for q in range(dfa.n_states))
        assert got == want


# -- counted repeats copy their first lowering --------------------------------------------------------------
ATOMS = ["a", "b", "[a-c]", "[^a]", "é", r"\d", "(?:ab|c)", "(?:x|)", "[α-ω]", "(?i:k)"]


@st.composite
def repeat_patterns(draw, depth=1):
    atom = draw(st.sampled_from(ATOMS))
    if depth and draw(st.booleans()):
        atom = "(?:" + draw(repeat_patterns(depth=depth - 1)) + ")"
    lo = draw(st.integers(0, 3))
    hi = draw(st.one_of(st.none(), st.integers(lo, lo + 3)))
    rep = f"{{{lo},{'' if hi is None else hi}}}"
    tail = draw(st.sampled_from(["", "z", "[0-9]{2}"]))
    return atom + rep + tail


def lower(pattern: str, copy: bool) -> tuple:
    tree = sre_parse.parse(pattern, 0)
    low = terminals._Lowering(pattern, "t")
    low.copy_repeats = copy
    start = low.nfa.add_state()
    end = low.seq(list(tree), tree.state.flags, start)
    return low.nfa.edges, low.nfa.eps, end, low.relaxable


@SETTINGS
@given(repeat_patterns(), st.lists(st.text(alphabet="abcxzé0α9Kk", max_size=9), max_size=25))
def test_copied_repeat_bodies_build_the_nfa_of_repeated_lowering(pattern, texts):
    """Copying a counted repeat's body gives, state for state and edge for edge, the NFA that lowering
    the body once per copy gives; and the DFA matches exactly what `re.fullmatch` matches."""
    assert lower(pattern, True) == lower(pattern, False)
    try:
        dfa = terminals.pattern_dfa.__wrapped__(pattern, 0, "t")
    except CompileLimitError:  # nested wide repeats can blow up the subset construction: refused, not wrong
        return
    for text in texts:
        assert dfa.matches(text.encode()) == bool(re.fullmatch(pattern, text)), (pattern, text)


def test_copied_repeats_keep_the_limits_errors():
    """A repeat past `MAX_UNROLL` is still refused, with the terminal named."""
    with pytest.raises(CompileLimitError, match="T9"):
        terminals.pattern_dfa.__wrapped__("a{0,5000}", 0, "T9")


# -- length-limited strings ----------------------------------------------------------------------------------
def test_one_json_character_dfa_has_the_shape_the_layered_construction_needs():
    """`_CHAR`'s DFA: one accepting state with no way out (a prefix-free language), and `"` never starts a
    character: what `length_string_dfa` relies on to chain characters layer by layer."""
    char = js.base_dfa(js._CHAR)
    (sink,) = np.flatnonzero(char.accepting)
    assert (char.transitions[sink] < 0).all()
    assert char.transitions[char.start, ord('"')] < 0


@SETTINGS
@given(st.integers(0, 6), st.one_of(st.none(), st.integers(0, 30)))
def test_length_string_dfa_equals_the_dfa_of_its_pattern(lo, span):
    """For any minLength/maxLength, the layered DFA is identical (arrays and numbering) to `pattern_dfa`'s
    of `"_CHAR{lo,hi}"`, and gets the same walk base (the unbounded version) when the span is long."""
    hi = None if span is None else lo + span
    pattern = '"' + js._CHAR + f"{{{lo},{'' if hi is None else hi}}}" + '"'
    slow = terminals.pattern_dfa.__wrapped__(pattern, 0, "t")
    fast = js.length_string_dfa.__wrapped__(lo, hi)
    assert same_dfa(fast, slow)
    slow_base, fast_base = base_hint(slow), base_hint(fast)
    assert (slow_base is None) == (fast_base is None)
    if slow_base is not None:
        assert same_dfa(fast_base, slow_base)


def test_length_string_dfa_refuses_past_the_state_limit():
    with pytest.raises(CompileLimitError, match="1200 characters"):
        js.length_string_dfa.__wrapped__(0, 1200)


def test_length_bounds_outside_the_fast_path_raise_as_before():
    """minLength > maxLength, and counts past `MAX_UNROLL`, take the pattern route and its errors."""
    with pytest.raises(SpecError):
        js.json_schema({"type": "string", "minLength": 5, "maxLength": 3})
    with pytest.raises(CompileLimitError, match="exceeds"):
        js.json_schema({"type": "string", "maxLength": 70000})


VOCAB = Vocabulary([bytes([b]) for b in range(256)] + [b"</s>"], special_ids=[256], eos_ids=[256], name="b")
LENGTH_SCHEMAS = [
    {"type": "string", "minLength": 2, "maxLength": 5},
    {"type": "string", "maxLength": 40},
    {"type": "string", "minLength": 3},
    {"type": "string", "maxLength": 4, "pattern": "^[a-z]+$"},
    {"type": "string", "minLength": 1, "maxLength": 30, "pattern": "b"},
    {"type": "object", "properties": {"a": {"type": ["string", "null"], "maxLength": 20}}},
]
COMPILED = [js.json_schema(s, whitespace="compact").compile(VOCAB) for s in LENGTH_SCHEMAS]


@SETTINGS
@given(
    st.integers(0, len(LENGTH_SCHEMAS) - 1),
    st.one_of(st.text(max_size=45), st.text(alphabet='ab@.é"\\\U0001f600', max_size=8)),
    st.booleans(),
)
def test_length_limited_strings_are_accepted_exactly_when_jsonschema_validates(i, s, wrap):
    """A compiled schema with minLength/maxLength accepts a JSON text iff `jsonschema` validates it
    (lengths count code points: an emoji is one character, two UTF-16 escapes in JSON)."""
    schema = LENGTH_SCHEMAS[i]
    value = {"a": s} if wrap and schema["type"] == "object" else s
    text = json.dumps(value, ensure_ascii=bool(len(s) % 2), separators=(",", ":"))
    checker = jsonschema.FormatChecker()
    want = jsonschema.validators.validator_for(schema)(schema, format_checker=checker).is_valid(value)
    m = COMPILED[i].matcher()
    got = m.accept_bytes(text.encode()) and m.is_accepting()
    assert got == want, (schema, text)


# -- property-name sets --------------------------------------------------------------------------------------
NAMES = st.one_of(st.text(max_size=6), st.text(alphabet="ab/_-$ ", max_size=6))


@SETTINGS
@given(st.lists(NAMES, min_size=1, max_size=6))
def test_strings_dfa_equals_the_regex_of_every_spelling(names):
    """For any set of names, `strings_dfa` (a trie when every name has one spelling) is identical to the DFA
    of the alternation of their `string_literal_regex`es."""
    values = tuple(sorted(set(names)))
    regex = "|".join(js.string_literal_regex(v) for v in values)
    assert same_dfa(js.strings_dfa.__wrapped__(values), terminals.pattern_dfa.__wrapped__(regex, 0, "t"))


def test_one_spelling_names_are_exactly_printable_ascii_but_quote_backslash_slash():
    """The trie route is taken exactly for the characters `_char_regex` spells one way."""
    for code in range(0x80):
        c = chr(code)
        one = js._char_regex(c) == re.escape(c) and c not in '"\\'
        assert bool(js._ONE_SPELLING.fullmatch(c)) == one, repr(c)


# -- caches --------------------------------------------------------------------------------------------------
def test_pattern_dfa_cache_ignores_the_terminal_name_but_errors_name_it():
    a = terminals.pattern_dfa("[a-f]{1,3}q", 0, "T1")
    assert terminals.pattern_dfa("[a-f]{1,3}q", 0, "T7") is a
    assert terminals.pattern_dfa("[a-f]{1,3}q", re.IGNORECASE, "T7") is not a
    for name in ("T1", "T8"):
        with pytest.raises(SpecError, match=name):
            terminals.pattern_dfa("(unclosed", 0, name)


def test_base_terminals_share_one_dfa_across_schemas_and_equal_their_patterns():
    """Strings, numbers, punctuation and whitespace are the same DFA objects in unrelated schemas (their
    lexer walks are shared), and each equals its pattern's uncached DFA."""
    terminals.pattern_dfa.cache_clear()  # even with the pattern cache emptied in between
    a = js.json_schema({"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "string"}}})
    terminals.pattern_dfa.cache_clear()
    b = js.json_schema({"type": "array", "items": {"type": ["string", "number"]}})
    by_pattern_a = {t.pattern: t.dfa for t in a.ir.terminals}
    by_pattern_b = {t.pattern: t.dfa for t in b.ir.terminals}
    shared = [js._STRING, js._NUMBER, r"[ \t\n\r]{1,20}", r"[ \t\n\r]{0,20},[ \t\n\r]{0,20}"]
    for p in shared:
        assert by_pattern_a[p] is not None and by_pattern_a[p] is by_pattern_b[p], p
        assert same_dfa(by_pattern_a[p], terminals.pattern_dfa.__wrapped__(p, 0, "t"))


def test_a_repeated_schema_reuses_its_lowering_unless_it_differs_or_was_mutated():
    """Equal schemas (same key order, same options) share one constraint; key order, options, 1 vs "1",
    and a mutation of the first caller's dict all give a fresh lowering; `clear_compile_cache` forgets it."""
    from constrain.constraint import clear_compile_cache

    def schema():
        return {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"const": 1}}}

    first = js.json_schema(schema())
    assert js.json_schema(schema()) is first
    assert js.json_schema(schema(), whitespace="compact") is not first
    reordered = {"type": "object", "properties": {"b": {"const": 1}, "a": {"type": "integer"}}}
    assert js.json_schema(reordered).ir != first.ir  # schema property order is part of the language
    assert (
        js.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"const": "1"}}})
        is not first
    )
    mutable = {"type": "object", "properties": {"c": {"type": "integer"}}}
    cached = js.json_schema(mutable)
    mutable["properties"]["c"]["maximum"] = 3  # the cached constraint's own schema object changes
    again = js.json_schema({"type": "object", "properties": {"c": {"type": "integer"}}})
    assert again is not cached
    assert again.compile(VOCAB).matcher().accept_bytes(b'{"c":5}')  # no maximum: the schema asked for
    assert js.json_schema(mutable).compile(VOCAB).matcher().accept_bytes(b'{"c":5') is False
    clear_compile_cache()
    assert js.json_schema(schema()) is not again
