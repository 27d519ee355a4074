"""Grammar terminals: Python `re` patterns (the syntax Lark and our JSON-schema lowering emit) -> `ByteDFA`.

A terminal's language is the set of strings its pattern *fully* matches (`re.fullmatch`), as UTF-8 bytes.
The pattern is parsed with Python's own regex parser (`re._parser`), so the syntax and the Unicode meaning of
`\\d`, `\\w`, `\\s`, `.` and case-insensitive matching are Python's; it is lowered to a byte NFA
(`constrain.grammars.dfa.NFA`) and determinised/minimised into a `ByteDFA`.

Constructs a DFA cannot express exactly raise `UnsupportedError` naming them: anchors, lookaround,
backreferences, possessive repeats and atomic groups. Lark's `common.ESCAPED_STRING` (written with a
lookbehind) is recognised and replaced by its exact regular equivalent.
"""

from __future__ import annotations

import _sre
import re
import re._casefix as _casefix
import re._constants as C  # noqa: N812 - the module's own short name
import re._parser as sre_parse
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import cache, lru_cache

import numpy as np

from constrain.errors import CompileLimitError, ConstraintError, SpecError, UnsupportedError

from .dfa import NFA, ByteDFA
from .product import set_base

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 20_000
_MAXREPEAT = C.MAXREPEAT
# Counted repeats are unrolled; past this many copies of the body the pattern is refused (never a hang).
MAX_UNROLL = 4_000
# A pattern with a repeat {lo,hi} where hi - lo exceeds this gets the same pattern with {lo,} as its walk
# base (`product.set_base`): strings of at most 40 characters walk by difference from strings of any length.
RELAX_SPAN = 16

# Lark's common.lark terminals written with lookaround, mapped to exact regular equivalents.
_KNOWN_REWRITES = {
    r'".*?(?<!\\)(\\\\)*?"': r'"(?:[^"\\\n]|\\[^\n])*"',
    r"(?:\".*?(?<!\\)(\\\\)*?\")": r'"(?:[^"\\\n]|\\[^\n])*"',
}


def effective_pattern(pattern: str) -> str:
    """The pattern actually compiled for `pattern` (known lookaround patterns replaced by regular ones)."""
    return _KNOWN_REWRITES.get(pattern, pattern)


@cache
def _all_chars() -> str:
    """Every code point but the surrogates, in order, as one string (decoded from UTF-32 in one go)."""
    codes = np.concatenate(
        [np.arange(0xD800, dtype=np.uint32), np.arange(0xE000, sys.maxunicode + 1, dtype=np.uint32)]
    )
    return codes.tobytes().decode("utf-32-le")


@cache
def _category_ranges(category: str) -> tuple[tuple[int, int], ...]:
    """The code-point ranges that Python's `re` matches with a category escape (e.g. `\\d`, `\\w`, `\\s`)."""
    chars = _all_chars()
    ranges = [(ord(m.group()[0]), ord(m.group()[-1])) for m in re.finditer(category + "+", chars)]
    return tuple(_merge(ranges))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    nxt = 0
    for lo, hi in _merge(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= sys.maxunicode:
        out.append((nxt, sys.maxunicode))
    return out


@lru_cache(maxsize=1)
def _lower_groups() -> dict[int, tuple[int, ...]]:
    """`re`'s simple lower-case form -> every code point with that form (only groups of two or more)."""
    groups: dict[int, list[int]] = {}
    for c in range(sys.maxunicode + 1):
        groups.setdefault(_sre.unicode_tolower(c), []).append(c)
    return {k: tuple(v) for k, v in groups.items() if len(v) > 1}


def _case_partners(c: int) -> set[int]:
    """The code points Python's case-insensitive `re` treats as equal to `c`: those with the same simple
    lower-case form (as `re` computes it), plus `re`'s own extra cases (e.g. U+017F for `s`)."""
    out = {c, *_lower_groups().get(_sre.unicode_tolower(c), ())}
    for x in list(out):
        out.update(_casefix._EXTRA_CASES.get(x, ()))
    return out


def _fold(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Add every case partner of the code points in `ranges` (small classes only: big ones hold both)."""
    size = sum(hi - lo + 1 for lo, hi in ranges)
    if size > 20_000:
        return ranges
    extra = [(p, p) for lo, hi in ranges for c in range(lo, hi + 1) for p in _case_partners(c)]
    return _merge(list(ranges) + extra)


_CATEGORY = {
    C.CATEGORY_DIGIT: (r"\d", False),
    C.CATEGORY_NOT_DIGIT: (r"\d", True),
    C.CATEGORY_SPACE: (r"\s", False),
    C.CATEGORY_NOT_SPACE: (r"\s", True),
    C.CATEGORY_WORD: (r"\w", False),
    C.CATEGORY_NOT_WORD: (r"\w", True),
}


class _Lowering:
    """Thompson construction from `re._parser`'s tree into a byte NFA."""

    def __init__(self, pattern: str, name: str, relax: bool = False):
        self.pattern = pattern
        self.name = name
        self.nfa = NFA(max_states=MAX_NFA_STATES)
        self.relax = relax  # lower long counted repeats {lo,hi} as {lo,}
        self.relaxable = False  # the pattern has such a repeat
        self.copy_repeats = True  # counted repeats copy their body's first lowering (`_copier`)

    def fail(self, what: str) -> UnsupportedError:
        return UnsupportedError(
            f"terminal {self.name}: {what} cannot be enforced by a DFA (pattern /{self.pattern}/)"
        )

    def klass(self, items: list, flags: int) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        negate = False
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                ranges.append((av, av))
            elif op is C.RANGE:
                ranges.append((av[0], av[1]))
            elif op is C.CATEGORY:
                ranges.extend(self.category(av, flags))
            else:
                raise self.fail(f"class item {op}")
        if flags & re.IGNORECASE:
            ranges = _fold(ranges)
        ranges = _merge(ranges)
        return _complement(ranges) if negate else ranges

    def category(self, cat: object, flags: int) -> list[tuple[int, int]]:
        if cat not in _CATEGORY:
            raise self.fail(f"category {cat}")
        escape, negated = _CATEGORY[cat]
        if flags & re.ASCII:
            base = [(lo, hi) for lo, hi in _category_ranges(escape) if lo < 128]
            base = [(lo, min(hi, 127)) for lo, hi in base]
        else:
            base = list(_category_ranges(escape))
        return _complement(base) if negated else base

    def _copier(self, body: list, flags: int) -> Callable[[int], int]:
        """A function `src -> end` that lowers `body` from `src` as `seq` does: the first call lowers it,
        later ones copy the states and edges that call made, in the same order, so the NFA is the very one
        repeated lowering builds (a counted repeat such as `{0,256}` of a JSON string character lowers its
        body, classes and UTF-8 splits included, once instead of 256 times)."""
        nfa = self.nfa
        template: list = []

        def lower(src: int) -> int:
            if not template:
                k0, e0, p0 = len(nfa.eps), len(nfa.edges[src]), len(nfa.eps[src])
                end = self.seq(body, flags, src)
                k1 = len(nfa.eps)
                inner = [(list(nfa.edges[q]), list(nfa.eps[q])) for q in range(k0, k1)]
                template.extend([src, k0, k1, nfa.edges[src][e0:], nfa.eps[src][p0:], inner, end])
                return end
            t_src, k0, k1, src_edges, src_eps, inner, t_end = template
            nfa._check_room(k1 - k0)
            shift = len(nfa.eps) - k0

            def m(q: int) -> int:
                return src if q == t_src else q + shift if k0 <= q < k1 else q

            nfa.eps.extend([m(t) for t in eps] for _, eps in inner)
            nfa.edges.extend([(lo, hi, m(t)) for lo, hi, t in edges] for edges, _ in inner)
            nfa.edges[src].extend((lo, hi, m(t)) for lo, hi, t in src_edges)
            nfa.eps[src].extend(m(t) for t in src_eps)
            return m(t_end)

        return lower

    def seq(self, items: list, flags: int, src: int) -> int:
        """Lower a sequence starting at NFA state `src`; returns its end state."""
        for op, av in items:
            src = self.one(op, av, flags, src)
        return src

    def edge(self, src: int, ranges: list[tuple[int, int]]) -> int:
        dst = self.nfa.add_state()
        if ranges:
            self.nfa.add_codepoints(src, ranges, dst)
        return dst

    def one(self, op: object, av: object, flags: int, src: int) -> int:
        nfa = self.nfa
        if op is C.LITERAL:
            ranges = [(av, av)]
            return self.edge(src, _fold(ranges) if flags & re.IGNORECASE else ranges)
        if op is C.NOT_LITERAL:
            ranges = _fold([(av, av)]) if flags & re.IGNORECASE else [(av, av)]
            return self.edge(src, _complement(ranges))
        if op is C.ANY:
            return self.edge(src, [(0, sys.maxunicode)] if flags & re.DOTALL else _complement([(10, 10)]))
        if op is C.IN:
            return self.edge(src, self.klass(av, flags))
        if op is C.BRANCH:
            end = nfa.add_state()
            for alt in av[1]:
                start = nfa.add_state()
                nfa.add_epsilon(src, start)
                nfa.add_epsilon(self.seq(alt, flags, start), end)
            return end
        if op is C.SUBPATTERN:
            _group, add, remove, body = av
            return self.seq(body, (flags | add) & ~remove, src)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # laziness does not change the fullmatch language
            lo, hi, body = av
            if lo > MAX_UNROLL or (hi is not _MAXREPEAT and hi > MAX_UNROLL):
                raise CompileLimitError(
                    f"terminal {self.name}: counted repeat {{{lo},{hi}}} exceeds {MAX_UNROLL} "
                    f"(pattern /{self.pattern}/)"
                )
            if hi is not _MAXREPEAT and hi - lo > RELAX_SPAN:
                self.relaxable = True
                if self.relax:
                    hi = _MAXREPEAT
            copies = lo + (1 if hi is _MAXREPEAT else hi - lo)
            lower = self._copier(body, flags) if copies > 1 and self.copy_repeats else None
            for _ in range(lo):
                src = lower(src) if lower else self.seq(body, flags, src)
            if hi is _MAXREPEAT:
                loop = nfa.add_state()
                nfa.add_epsilon(src, loop)
                back = lower(loop) if lower else self.seq(body, flags, loop)
                nfa.add_epsilon(back, loop)
                return loop
            end = nfa.add_state()
            nfa.add_epsilon(src, end)
            for _ in range(hi - lo):
                src = lower(src) if lower else self.seq(body, flags, src)
                nfa.add_epsilon(src, end)
            return end
        names = {
            C.AT: "an anchor",
            C.ASSERT: "a lookaround",
            C.ASSERT_NOT: "a negative lookaround",
            C.GROUPREF: "a backreference",
            C.GROUPREF_EXISTS: "a conditional group",
        }
        raise self.fail(names.get(op, f"the construct {op}"))


# A pattern of plain characters and escaped non-alphanumerics (what `re.escape` writes) is a literal.
_PLAIN = re.compile(r"(?:[^\\.^$*+?{}\[\]|()]|\\[^A-Za-z0-9])*", re.DOTALL)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
MAX_FINITE_STRINGS = 1024  # past this many strings a finite pattern goes the NFA way


def _finite_language(items: list) -> list[str] | None:
    """Every string a parsed pattern matches, if it is made of literals, small explicit classes,
    alternations, groups without flags and bounded repeats, and there are at most `MAX_FINITE_STRINGS`
    of them; otherwise None."""
    out = [""]
    for op, av in items:
        if op is C.LITERAL:
            options = [chr(av)]
        elif op is C.IN:
            options = []
            for kind, x in av:
                if kind is C.LITERAL:
                    options.append(chr(x))
                elif kind is C.RANGE and x[1] - x[0] < 64:
                    options.extend(chr(c) for c in range(x[0], x[1] + 1))
                else:
                    return None
            options = sorted(set(options))
        elif op is C.BRANCH:
            options = []
            for alt in av[1]:
                sub = _finite_language(list(alt))
                if sub is None:
                    return None
                options.extend(sub)
        elif op is C.SUBPATTERN and not av[1] and not av[2]:
            options = _finite_language(list(av[3]))
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT) and av[1] is not _MAXREPEAT and av[1] <= 16:
            body = _finite_language(list(av[2]))
            if body is None:
                return None
            options, power = [], [""]
            for count in range(av[1] + 1):
                if count >= av[0]:
                    options.extend(power)
                if count < av[1]:
                    power = [p + b for p in power for b in body]
                    if len(power) > MAX_FINITE_STRINGS:
                        return None
        else:
            return None
        if options is None or len(out) * len(options) > MAX_FINITE_STRINGS:
            return None
        out = [p + o for p in out for o in options]
    return out


_PATTERN_CACHE_SIZE = 4096
_pattern_cache: OrderedDict[tuple[str, int], ByteDFA] = OrderedDict()
_pattern_lock = threading.Lock()


def pattern_dfa(pattern: str, flags: int = 0, name: str = "?") -> ByteDFA:
    """The minimal `ByteDFA` of the strings `pattern` fully matches (Python `re` syntax and flags).

    Cached (least recently used) by `(pattern, flags)`: `name` only labels errors, so the same pattern
    under another terminal name (T3 in one schema, T7 in the next) is a hit. `pattern_dfa.__wrapped__`
    builds without the cache.

    Raises:
        SpecError: the pattern does not parse (the message gives the position).
        UnsupportedError: anchors, lookaround, backreferences, possessive repeats or atomic groups.
        CompileLimitError: the automaton would exceed `MAX_NFA_STATES` / `MAX_DFA_STATES`.
    """
    key = (pattern, flags)
    with _pattern_lock:
        dfa = _pattern_cache.get(key)
        if dfa is not None:
            _pattern_cache.move_to_end(key)
            return dfa
    dfa = _build_pattern_dfa(pattern, flags, name)
    with _pattern_lock:
        dfa = _pattern_cache.setdefault(key, dfa)
        while len(_pattern_cache) > _PATTERN_CACHE_SIZE:
            _pattern_cache.popitem(last=False)
    return dfa


def _clear_pattern_cache() -> None:
    with _pattern_lock:
        _pattern_cache.clear()


def _build_pattern_dfa(pattern: str, flags: int = 0, name: str = "?") -> ByteDFA:
    """`pattern_dfa` without the cache."""
    pattern = _KNOWN_REWRITES.get(pattern, pattern)
    if not flags and _PLAIN.fullmatch(pattern):  # a literal (e.g. a JSON key): no parse, no automaton work
        try:
            return ByteDFA.from_literals(
                [_UNESCAPE.sub(r"\1", pattern).encode("utf-8")], max_states=MAX_DFA_STATES
            )
        except UnicodeEncodeError:
            pass  # a lone surrogate: the general route knows it matches nothing
    try:
        tree = sre_parse.parse(pattern, flags)
    except re.error as exc:
        raise SpecError(f"terminal {name}: bad regex: {exc.msg}", source=pattern, position=exc.pos) from exc
    if not tree.state.flags & re.IGNORECASE:
        options = _finite_language(list(tree))
        if options is not None:  # literals and small alternations: a trie, no NFA (most JSON keys)
            encoded = set()
            for text in options:
                try:
                    encoded.add(text.encode("utf-8"))
                except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form: this string is not in it
                    continue
            return ByteDFA.from_literals(encoded, max_states=MAX_DFA_STATES)
    low = _Lowering(pattern, name)
    start = low.nfa.add_state()
    end = low.seq(list(tree), tree.state.flags, start)
    dfa = ByteDFA.from_nfa(low.nfa, start, end, max_states=MAX_DFA_STATES)
    if low.relaxable:
        base = _relaxed_dfa(pattern, flags)
        if base is not None:
            set_base(dfa, base)
    return dfa


pattern_dfa.__wrapped__ = _build_pattern_dfa  # type: ignore[attr-defined]
pattern_dfa.cache_clear = _clear_pattern_cache  # type: ignore[attr-defined]

_by_content: dict[tuple[bytes, bytes], ByteDFA] = {}


@lru_cache(maxsize=1024)
def _relaxed_dfa(pattern: str, flags: int) -> ByteDFA | None:
    """The DFA of `pattern` with its long counted repeats unbounded above (None if it cannot be built).

    Interned by content (minimal DFAs are numbered canonically), so patterns that differ only in their
    bounds share one base, and its walks.
    """
    try:
        tree = sre_parse.parse(pattern, flags)
        low = _Lowering(pattern, "relaxed", relax=True)
        start = low.nfa.add_state()
        end = low.seq(list(tree), tree.state.flags, start)
        dfa = ByteDFA.from_nfa(low.nfa, start, end, max_states=MAX_DFA_STATES)
    except (re.error, ConstraintError):
        return None
    return intern_by_content(dfa)


def intern_by_content(dfa: ByteDFA) -> ByteDFA:
    """The one shared DFA equal to `dfa` (minimal DFAs are numbered canonically, so equal languages give
    equal arrays): walk bases built by different routes are then one object, with one set of walks."""
    key = (dfa.transitions.tobytes(), dfa.accepting.tobytes())
    return _by_content.setdefault(key, dfa)


def literal_dfa(text: str, ignore_case: bool = False, name: str = "?") -> ByteDFA:
    """The DFA of one literal string (case-insensitively with `ignore_case`)."""
    return pattern_dfa(re.escape(text), re.IGNORECASE if ignore_case else 0, name)
