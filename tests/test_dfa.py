"""The regex -> byte DFA compiler (grammars/dfa.py, regex.compile_dfa), checked against Python's `re`."""

from __future__ import annotations

import re
import time
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from constrain.errors import CompileLimitError, ConstraintError, SpecError, UnsupportedError
from constrain.grammars.dfa import ByteDFA, utf8_sequences
from constrain.grammars.regex import compile_dfa

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (pattern, flags): ASCII and Unicode classes, negations, IGNORECASE, counted repeats, alternation, anchors.
PATTERNS = [
    (r"\d{4}-\d{2}-\d{2}", 0),
    (r"[a-z]+@[a-z]+\.(com|org)", 0),
    (r"\w+\s\w*", 0),
    (r"[^\W\d_]+", 0),
    (r"(?i)hello|wörld", 0),
    (r"[^a-c\s]{2,5}", 0),
    (r"(ab|a)*b?", 0),
    (r"", 0),
    (r".", 0),
    (r".+", re.DOTALL),
    (r"\S+?x", 0),
    (r"(?a)\w+\d", 0),
    (r"[\u0100-\u017f\U0001F600-\U0001F64F]{1,3}", 0),
    (r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?", 0),
    (r'"([^"\\]|\\.)*"', 0),
    (r"[k-ß]+", re.IGNORECASE),
    (r"a{2,4}b{0,2}c{3}", 0),
    (r" \d+ (?: \. \d+ )?  # a number", re.VERBOSE),
    (r"^(foo|bar)$", 0),
    (r"\Afoo\Z", 0),
    (r"x$", 0),
    (r"(?i:AbC)[^\w]", 0),
    (r"\D\W\S", 0),
    (r"(?s:.)\n.", 0),
    (r"(a|b)*?c{2,}", 0),
    (r"(?ia)[^k]s", 0),
    (r"(?:^a|b)c$", 0),
    (r"(?:a|^)b(?:$|c)", re.MULTILINE),
]
IDS = [f"{p!r}/{f}" for p, f in PATTERNS]

# Characters that matter to the patterns above (case pairs, Kelvin sign, long s, dotless i, digits ...).
INTERESTING = 'abcxkKsSſK\u212aßẞıİ0129٣-_.@ \n\t\r"\\éÅ😀'
TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(INTERESTING), st.characters(exclude_categories=("Cs",))), max_size=12
)


def no_surrogates(s: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


# -- UTF-8 lowering ------------------------------------------------------------------------------------------
@st.composite
def codepoint_ranges(draw):
    bounds = sorted(draw(st.lists(st.integers(0, 0x10FFFF), min_size=2, max_size=6, unique=True)))
    return tuple((bounds[i], bounds[i + 1]) for i in range(0, len(bounds) - 1, 2))


def sequence_matches(seq, data: bytes) -> bool:
    return len(seq) == len(data) and all(lo <= b <= hi for (lo, hi), b in zip(seq, data, strict=True))


@SETTINGS
@given(codepoint_ranges(), st.lists(st.integers(0, 0x10FFFF), min_size=1, max_size=30))
def test_utf8_sequences_match_exactly_the_encodings_of_the_ranges(ranges, probes):
    """A code point's UTF-8 encoding matches exactly one sequence iff it is in the ranges (no surrogates)."""
    sequences = utf8_sequences(ranges)
    probes += [b for r in ranges for b in r] + [b + 1 for r in ranges for b in r if b < 0x10FFFF]
    for cp in probes:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        data = chr(cp).encode("utf-8")
        hits = sum(sequence_matches(seq, data) for seq in sequences)
        assert hits == (1 if any(lo <= cp <= hi for lo, hi in ranges) else 0), hex(cp)


@SETTINGS
@given(codepoint_ranges())
def test_utf8_sequences_only_describe_valid_utf8(ranges):
    """Each byte string a sequence describes (checked at its corners) is UTF-8 of an in-range code point."""
    for seq in utf8_sequences(ranges):
        for corner in (bytes(lo for lo, _ in seq), bytes(hi for _, hi in seq)):
            (char,) = corner.decode("utf-8")  # strict: raises on invalid UTF-8 or surrogates
            assert any(lo <= ord(char) <= hi for lo, hi in ranges)


# -- DFA vs re.fullmatch -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "flags"), PATTERNS, ids=IDS)
def test_dfa_accepts_what_re_fullmatch_accepts(pattern, flags):
    dfa = compile_dfa(pattern, flags)
    compiled = re.compile(pattern, flags)

    @SETTINGS
    @given(st.from_regex(compiled, fullmatch=True))
    def check(text):
        """Strings generated from the pattern: DFA and re.fullmatch agree (they should both accept)."""
        assume(no_surrogates(text))
        assert dfa.matches(text.encode("utf-8")) == bool(compiled.fullmatch(text)), text

    check()


@pytest.mark.parametrize(("pattern", "flags"), PATTERNS, ids=IDS)
def test_dfa_rejects_what_re_fullmatch_rejects(pattern, flags):
    dfa = compile_dfa(pattern, flags)
    compiled = re.compile(pattern, flags)

    @SETTINGS
    @given(TEXT, st.from_regex(compiled, fullmatch=True), st.integers(0, 12), TEXT)
    def check(noise, good, cut, insert):
        """Arbitrary text, and matching text with a piece cut out or inserted: DFA == re.fullmatch."""
        for text in (noise, good[:cut] + good[cut + 1 :], good[:cut] + insert + good[cut:]):
            if no_surrogates(text):
                assert dfa.matches(text.encode("utf-8")) == bool(compiled.fullmatch(text)), text

    check()


@lru_cache(maxsize=1)
def all_codepoints_utf8() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code points, UTF-8 bytes padded to 4 (N, 4) uint8, lengths) for every non-surrogate code point."""
    cps = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)])
    lengths = np.select([cps < 0x80, cps < 0x800, cps < 0x10000], [1, 2, 3], 4)
    data = np.zeros((cps.size, 4), dtype=np.uint8)
    for n, lead, shift in ((1, 0x00, 0), (2, 0xC0, 6), (3, 0xE0, 12), (4, 0xF0, 18)):
        rows = lengths == n
        c = cps[rows]
        data[rows, 0] = lead | (c >> shift)
        for j in range(1, n):
            data[rows, j] = 0x80 | ((c >> (shift - 6 * j)) & 0x3F)
    return cps, data, lengths


def run_many(dfa: ByteDFA, data: np.ndarray, lengths: np.ndarray, state: int | None = None) -> np.ndarray:
    """Run the DFA over many byte strings at once (rows of `data`, each `lengths[i]` long): end states."""
    states = np.full(data.shape[0], dfa.start if state is None else state, dtype=np.int64)
    for j in range(data.shape[1]):
        active = (lengths > j) & (states >= 0)
        states[active] = dfa.transitions[states[active], data[active, j]]
    return states


SINGLE_CHAR_CLASSES = [
    r"\w",
    r"\D",
    r"\s",
    r".",
    r"(?i)k",
    r"(?i)[a-z]",
    r"(?i)[^k]",
    r"(?a)\w",
    r"(?i)ß",
    r"(?ai)[a-z]",
    r"(?i)[^\W\d]",
    r"(?i)Σ",
    r'[^"\\]',
    r"[a-c\u0100-\u0200x-]",
    r"[^\x00-\x7f\U00010000-\U0010fffe]",
]


@pytest.mark.parametrize("pattern", SINGLE_CHAR_CLASSES)
def test_single_character_classes_agree_with_re_on_every_code_point(pattern):
    cps, data, lengths = all_codepoints_utf8()
    dfa = compile_dfa(pattern)
    ends = run_many(dfa, data, lengths)
    accepted = (ends >= 0) & dfa.accepting[np.maximum(ends, 0)]
    compiled = re.compile(pattern)
    expected = np.fromiter((compiled.fullmatch(chr(c)) is not None for c in cps.tolist()), dtype=bool)
    wrong = cps[accepted != expected]
    assert wrong.size == 0, [hex(c) for c in wrong[:10]]


@SETTINGS
@given(st.binary(max_size=12))
def test_dot_star_accepts_exactly_the_valid_utf8(data):
    """(?s).* accepts a byte string iff it is valid UTF-8 (no overlong forms, no surrogates, <= U+10FFFF)."""
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert compile_dfa(r"(?s).*").matches(data) == valid


@pytest.mark.parametrize(
    "data", [b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff", b"\x80", b"a\xe2\x28"]
)
def test_invalid_utf8_kills_the_dfa(data):
    assert compile_dfa(r"(?s).*").run(0, data) == -1


def test_a_truncated_character_is_alive_but_not_accepted():
    dfa = compile_dfa(r"(?s).*")
    assert dfa.run(0, b"\xe2\x82") >= 0 and not dfa.matches(b"\xe2\x82") and dfa.matches(b"\xe2\x82\xac")


def test_dollar_does_not_admit_a_trailing_newline_under_fullmatch():
    dfa = compile_dfa(r"ab$")
    assert dfa.matches(b"ab") and not dfa.matches(b"ab\n")
    assert compile_dfa(r"(?m)^ab$").matches(b"ab") and not compile_dfa(r"(?m)^ab$").matches(b"ab\n")


def test_lazy_and_greedy_quantifiers_give_the_same_dfa():
    assert_same_dfa(compile_dfa(r"a+?b*?c??d{2,3}?"), compile_dfa(r"a+b*c?d{2,3}"))


def test_surrogate_literals_match_nothing():
    assert compile_dfa("\\ud800").start == -1
    assert compile_dfa("a|\\ud800").matches(b"a")


# -- DFA structure -------------------------------------------------------------------------------------------
def assert_same_dfa(a: ByteDFA, b: ByteDFA) -> None:
    assert a.start == b.start
    assert np.array_equal(a.transitions, b.transitions)
    assert np.array_equal(a.accepting, b.accepting)


def naive_classes(dfa: ByteDFA) -> int:
    """Number of Myhill-Nerode classes by plain fixpoint refinement (an independent oracle for minimality)."""
    block = dfa.accepting.astype(np.int64)
    while True:
        succ = np.where(dfa.transitions >= 0, block[np.maximum(dfa.transitions, 0)], -1)
        signature = np.column_stack([block, succ])
        _, new = np.unique(signature, axis=0, return_inverse=True)
        new = new.reshape(-1)
        if len(np.unique(new)) == len(np.unique(block)):
            return int(len(np.unique(new)))
        block = new


@pytest.mark.parametrize(("pattern", "flags"), PATTERNS, ids=IDS)
def test_dfa_is_minimal_and_every_state_can_still_accept(pattern, flags):
    dfa = compile_dfa(pattern, flags)
    assert dfa.start == 0
    assert naive_classes(dfa) == dfa.n_states
    live = dfa.accepting.copy()  # backward closure from the accepting states
    while True:
        grown = live | ((dfa.transitions >= 0) & live[np.maximum(dfa.transitions, 0)]).any(axis=1)
        if (grown == live).all():
            break
        live = grown
    assert live.all(), "a state that cannot reach an accepting state survived"
    reached = np.zeros(dfa.n_states, dtype=bool)
    reached[0] = True
    while True:
        grown = reached.copy()
        grown[dfa.transitions[reached][dfa.transitions[reached] >= 0]] = True
        if (grown == reached).all():
            break
        reached = grown
    assert reached.all(), "an unreachable state survived"


@pytest.mark.parametrize(
    ("pattern", "n_states"),
    [("abc|abd", 4), ("[0-9]{3}", 4), ("a*", 1), ("(a|b)*abb", 4), ("", 1), ("x{2,4}", 5), (r"(?a)\d+", 2)],
)
def test_known_minimal_state_counts(pattern, n_states):
    assert compile_dfa(pattern).n_states == n_states


@pytest.mark.parametrize(
    ("a", "b"), [("a|b", "[ab]"), ("ab|ac", "a[bc]"), ("(a*)*", "a*"), ("x{0,}", "x*"), ("^a$", r"\Aa\Z")]
)
def test_equal_languages_give_identical_dfas(a, b):
    assert_same_dfa(compile_dfa(a), compile_dfa(b))


def test_step_run_and_matches_follow_the_transition_table():
    dfa = compile_dfa(r"ab*c")
    s = dfa.step(dfa.start, ord("a"))
    assert s >= 0 and dfa.step(s, ord("b")) == s
    assert dfa.run(dfa.start, b"abbb") == s
    assert dfa.run(dfa.start, b"ax") == -1 and dfa.run(dfa.start, b"axbc") == -1
    assert dfa.step(-1, ord("a")) == -1
    assert dfa.matches(b"abbc") and not dfa.matches(b"abb") and not dfa.matches(b"abbcc")
    assert dfa.transitions.dtype == np.int32 and dfa.transitions.shape == (dfa.n_states, 256)
    assert not dfa.transitions.flags.writeable


@SETTINGS
@given(st.lists(st.binary(max_size=6), min_size=1, max_size=20), st.lists(st.binary(max_size=6), max_size=20))
def test_literal_dfa_accepts_exactly_its_options(options, probes):
    """from_literals: a byte string is accepted iff it is one of the options; the DFA is minimal."""
    dfa = ByteDFA.from_literals(options, max_states=10_000)
    for data in options + probes:
        assert dfa.matches(data) == (data in options)
    assert naive_classes(dfa) == dfa.n_states


# -- errors and limits -----------------------------------------------------------------------------------
UNSUPPORTED = [
    (r"(a)\1", "backreference", 3),
    (r"(?P<x>a)b(?P=x)", "backreference", 9),
    (r"a(?=b)", "lookahead", 1),
    (r"ab(?!c)", "negative lookahead", 2),
    (r"(?<=a)b", "lookbehind", 0),
    (r"x(?<!a)b", "negative lookbehind", 1),
    (r"(a)?(?(1)b|c)", "conditional", 4),
    (r"[\b]a\bc", r"\b", 5),
    (r"foo\B", r"\B", 3),
    (r"x(?>ab)", "atomic group", 1),
    (r"a*+", "possessive", 2),
    (r"[+]a{2,3}+", "possessive", 9),
    (r"ab?+", "possessive", 3),
    (r"a^b", "^", 1),
    (r"(?:a|b)(?:^c|^d)", "^", 10),
    (r"(^a)*", "^", 1),
    (r"a$b", "$", 1),
    (r"(a$)*", "$", 2),
    (r"a$\n", "$", 1),
    (r"a\Zb", r"\Z", 1),
    (r"a\Ab", r"\A", 1),
    ("(?x) a b  # comment with ^ and \\b \n  ^", "^", None),
    (r"(?x: a [ ]  \b )", r"\b", 12),
    (r"(?#not \b here)a\b", r"\b", 16),
    (r"[\1](x)\1", "backreference", 7),
    (r"\101(x)\1", "backreference", 7),
]


@pytest.mark.parametrize(("pattern", "what", "position"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_constructs_are_refused_with_their_name_and_position(pattern, what, position):
    with pytest.raises(UnsupportedError) as info:
        compile_dfa(pattern)
    assert what in str(info.value)
    if position is None:  # VERBOSE: the comment ends at the newline, the last ^ is real
        position = len(pattern) - 1
    assert info.value.position == position, str(info.value)
    assert f"at position {position}" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "position"),
    [("a(b", 1), ("[a-", 0), ("a{3,2}", 2), ("*a", 0), ("(?P<1>a)", 4), (r"\p{L}", 0)],
)
def test_malformed_patterns_raise_spec_error_with_the_position(pattern, position):
    with pytest.raises(SpecError) as info:
        compile_dfa(pattern)
    assert not isinstance(info.value, UnsupportedError)
    assert info.value.position == position
    assert f"at position {position}" in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "flags"), [("a", "i"), ("a", re.LOCALE), ("a", re.ASCII | re.UNICODE), (b"a", 0)]
)
def test_bad_flags_or_pattern_types_raise_spec_error(pattern, flags):
    with pytest.raises(SpecError):
        compile_dfa(pattern, flags)


def test_state_explosion_raises_compile_limit_error_quickly():
    start = time.perf_counter()
    with pytest.raises(CompileLimitError, match="max_states"):
        compile_dfa(r"(a|b)*a(a|b){40}")
    with pytest.raises(CompileLimitError):
        compile_dfa(r"(a|b)*a(a|b){10}", 0, 500)
    assert compile_dfa(r"(a|b)*a(a|b){10}", 0, 5000).n_states == 2048
    assert time.perf_counter() - start < 30


def test_huge_counted_repeats_raise_compile_limit_error_instead_of_hanging():
    with pytest.raises(CompileLimitError, match="NFA states"):
        compile_dfa(r"(?:(?:a{1000}){1000}){1000}", 0, 100)
    with pytest.raises(CompileLimitError):
        compile_dfa("(" * 5000 + ")" * 5000)


def test_all_errors_are_constraint_errors():
    for pattern in ("(", r"\1", "(a|b)*a(a|b){40}"):
        with pytest.raises(ConstraintError):
            compile_dfa(pattern)
