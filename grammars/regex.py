"""Regex constraints: a Python-syntax regex compiled to a byte-level DFA, with one token mask per DFA state.

    from constrain.grammars.regex import regex, choice
    compiled = regex(r"\\d{4}-\\d{2}-\\d{2}").compile(vocab)
    m = compiled.matcher(); m.fill_bitmask(bitmask, row); m.accept(token)

Semantics: the text generated so far, decoded as UTF-8, must be extendable to a string `s` with
`re.fullmatch(pattern, s, flags)`, and EOS is allowed exactly when it already matches. The pattern is parsed
by Python's own parser (`re._parser`), and every character class that involves categories, `.` or IGNORECASE
(`\\d`, `\\w`, `\\s`, negated sets, case folding, the ASCII flag) is read off Python's `re` itself by running
the compiled class over every code point once, so the classes are exactly Python's (plain sets of literals
and ranges are the code points they list). Surrogates are not text (no UTF-8 encoding) and never match.

Refused (`UnsupportedError`, with the construct and its position): backreferences, lookaround, conditional
groups, `\\b` / `\\B`, atomic groups and possessive quantifiers, and anchors (`^ $ \\A \\Z`) anywhere but the
very start / very end. Malformed patterns raise `SpecError` with the position; a DFA larger than `max_states`
raises `CompileLimitError`. See docs/regex.md.
"""

from __future__ import annotations

import re
import re._compiler as _sre_compiler
import re._constants as _sre
import re._parser as _sre_parser
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from constrain.bitmask import bitmask_words, row_view
from constrain.constraint import CompiledConstraint, Constraint, Matcher, register_compile_cache
from constrain.errors import CompileLimitError, SpecError, UnsupportedError
from constrain.kernels.trie_walk import dfa_trie_mask, dfa_trie_masks
from constrain.vocab import Vocabulary

from .dfa import DEAD, NFA, ByteDFA

__all__ = [
    "DEFAULT_MAX_STATES",
    "Choice",
    "CompiledRegex",
    "Regex",
    "RegexMatcher",
    "choice",
    "compile_dfa",
    "regex",
]

DEFAULT_MAX_STATES = 20_000
NFA_STATES_PER_DFA_STATE = 25  # the NFA bound is this times max_states (counted repeats copy their body)

_SUPPORTED_FLAGS = re.IGNORECASE | re.LOCALE | re.MULTILINE | re.DOTALL | re.UNICODE | re.VERBOSE | re.ASCII
_TYPE_FLAGS = re.ASCII | re.LOCALE | re.UNICODE
_CHARSET_FLAGS = re.IGNORECASE | _TYPE_FLAGS
_TERMINATED = -2  # matcher stack marker: EOS was accepted


# -- character classes, read off Python's `re` ---------------------------------------------------------------
@lru_cache(maxsize=1)
def _all_text() -> tuple[tuple[int, str], tuple[int, str]]:
    """Every code point except the surrogates, in order, as two strings with their first code point."""
    low = "".join(map(chr, range(0xD800)))
    high = "".join(map(chr, range(0xE000, 0x110000)))
    return (0, low), (0xE000, high)


@lru_cache(maxsize=2048)
def _codepoints(op: Any, key: Any, flags: int) -> tuple[tuple[int, int], ...]:
    """The inclusive code-point ranges one single-character node matches under `flags`.

    The node (`LITERAL`, `NOT_LITERAL`, `ANY` or `IN`, from `re._parser`) is compiled by `re` itself as
    `node+` and run over every code point; the runs it matches are the ranges. ~10-25 ms, once per node.
    """
    node = (op, list(key) if op == _sre.IN else key)
    state = _sre_parser.State()
    state.flags = flags
    inner = _sre_parser.SubPattern(state, [node])
    runs = _sre_compiler.compile(
        _sre_parser.SubPattern(state, [(_sre.MAX_REPEAT, (1, _sre.MAXREPEAT, inner))]), flags
    )
    ranges = []
    for base, text in _all_text():
        for m in runs.finditer(text):
            a, b = m.span()
            ranges.append((base + a, base + b - 1))
    return tuple(ranges)


def _explicit_set(op: Any, av: Any) -> tuple[tuple[int, int], ...] | None:
    """Without IGNORECASE, a literal, a negated literal or a set of only literals and ranges (perhaps negated)
    matches exactly the code points it lists (no flag changes that); None for anything else."""
    if op == _sre.LITERAL:
        return ((av, av),)
    items = (
        [(_sre.LITERAL, av), (_sre.NEGATE, None)] if op == _sre.NOT_LITERAL else av if op == _sre.IN else []
    )
    if not items or any(kind not in (_sre.LITERAL, _sre.RANGE, _sre.NEGATE) for kind, _ in items):
        return None
    spans = sorted((v, v) if kind == _sre.LITERAL else tuple(v) for kind, v in items if kind != _sre.NEGATE)
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    if not any(kind == _sre.NEGATE for kind, _ in items):
        return tuple(merged)
    gaps, nxt = [], 0
    for lo, hi in merged:
        if lo > nxt:
            gaps.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= 0x10FFFF:
        gaps.append((nxt, 0x10FFFF))
    return tuple(gaps)


def _charset(op: Any, av: Any, flags: int) -> tuple[tuple[int, int], ...]:
    """The code-point ranges of a single-character node: listed code points directly, the rest from `re`."""
    if not flags & re.IGNORECASE:
        explicit = _explicit_set(op, av)
        if explicit is not None:
            return explicit  # (surrogates in it are dropped by the UTF-8 lowering)
    relevant = flags & _CHARSET_FLAGS
    if op == _sre.ANY:
        relevant |= flags & re.DOTALL
    return _codepoints(op, tuple(av) if op == _sre.IN else av, relevant)


def _combine_flags(flags: int, add: int, remove: int) -> int:
    """Flags inside `(?add-remove:...)`, as `re` combines them (a type flag replaces the others)."""
    if add & _TYPE_FLAGS:
        flags &= ~_TYPE_FLAGS
    return (flags | add) & ~remove


# -- locating constructs in the pattern text (the parse tree has no positions) -----------------------------
_ANCHORS = {
    _sre.AT_BEGINNING: ("^", "begin"),
    _sre.AT_BEGINNING_STRING: ("\\A", "begin"),
    _sre.AT_END: ("$", "end"),
    _sre.AT_END_STRING: ("\\Z", "end"),
}
_FLAG_GROUP = re.compile(r"\(\?([aiLmsux]*)(?:-([imsx]+))?([:)])")
_REPEAT_BRACES = re.compile(r"\{[0-9]*(?:,[0-9]*)?\}")
_OCTAL = "01234567"
_DIGITS = "0123456789"


def _constructs(pattern: str, verbose: bool) -> list[tuple[int, int, str]]:
    """(position, length, kind) of the constructs we may refuse, in text order, outside character classes.

    Kinds: backreference, lookahead, negative lookahead, lookbehind, negative lookbehind, conditional group,
    atomic group, possessive quantifier, \\b, \\B, ^, $, \\A, \\Z. Follows `re._parser`'s lexical rules
    (escapes, classes, `(?#...)` comments, VERBOSE whitespace and comments, scoped `(?x:...)`). The pattern
    has already been parsed successfully, so the scan can be lenient about malformed input.
    """
    out: list[tuple[int, int, str]] = []
    scopes: list[bool] = []
    n = len(pattern)
    i = 0

    def quantifier_suffix(j: int) -> int:
        if j < n and pattern[j] == "+":
            out.append((j, 1, "possessive quantifier"))
            return j + 1
        return j + 1 if j < n and pattern[j] == "?" else j

    while i < n:
        ch = pattern[i]
        if verbose and ch in " \t\n\r\v\f":
            i += 1
        elif verbose and ch == "#":
            end = pattern.find("\n", i)
            i = n if end < 0 else end + 1
        elif ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt in ("b", "B", "A", "Z"):
                out.append((i, 2, "\\" + nxt))
                i += 2
            elif nxt and nxt in _DIGITS and nxt != "0":
                j = i + 2
                if j < n and pattern[j] in _DIGITS:
                    if nxt in _OCTAL and pattern[j] in _OCTAL and j + 1 < n and pattern[j + 1] in _OCTAL:
                        i = j + 2  # three octal digits: a character, not a group reference
                        continue
                    j += 1
                out.append((i, j - i, "backreference"))
                i = j
            else:
                i += 2
        elif ch == "[":
            j = i + 1
            if pattern[j : j + 1] == "^":
                j += 1
            if pattern[j : j + 1] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
        elif ch == "(":
            rest = pattern[i + 1 : i + 4]
            flag_group = _FLAG_GROUP.match(pattern, i)
            if rest.startswith("?#"):
                end = pattern.find(")", i)
                i = n if end < 0 else end + 1
                continue
            if rest.startswith("?P="):
                end = pattern.find(")", i)
                out.append((i, (n if end < 0 else end + 1) - i, "backreference"))
                i = n if end < 0 else end + 1
                continue
            scopes.append(verbose)
            if flag_group:
                added, removed, closer = flag_group.groups()
                if closer == ")":  # global flags: they apply to the whole pattern (already in `verbose`)
                    scopes.pop()
                elif "x" in added:
                    verbose = True
                elif removed and "x" in removed:
                    verbose = False
                i = flag_group.end()
                continue
            kinds = {
                "?=": "lookahead",
                "?!": "negative lookahead",
                "?>": "atomic group",
                "?(": "conditional group",
            }
            if rest[:2] in kinds:
                out.append((i, 2 + 1, kinds[rest[:2]]))
                if rest[:2] == "?(":  # skip the condition "(name)" so its ")" closes nothing
                    end = pattern.find(")", i + 3)
                    i = n if end < 0 else end + 1
                    continue
            elif rest in ("?<=", "?<!"):
                out.append((i, 4, "lookbehind" if rest == "?<=" else "negative lookbehind"))
            elif rest.startswith("?P<"):
                end = pattern.find(">", i)
                i = n if end < 0 else end + 1
                continue
            i += 1
        elif ch == ")":
            if scopes:
                verbose = scopes.pop()
            i += 1
        elif ch in "*+?":
            i = quantifier_suffix(i + 1)
        elif ch == "{":
            braces = _REPEAT_BRACES.match(pattern, i)
            if braces and braces.group() != "{}":
                i = quantifier_suffix(braces.end())
            else:
                i += 1
        elif ch in "^$":
            out.append((i, 1, ch))
            i += 1
        else:
            i += 1
    return out


def _unsupported(pattern: str, verbose: bool, kind: str, what: str) -> UnsupportedError:
    position = next((pos for pos, _, k in _constructs(pattern, verbose) if k == kind), None)
    return UnsupportedError(
        f"{what} is not supported in a regex constraint", source=pattern, position=position
    )


# -- Thompson construction from the parse tree ---------------------------------------------------------
def _items(sub: Any) -> list:
    return sub.data if isinstance(sub, _sre_parser.SubPattern) else list(sub)


class _Thompson:
    """Builds a byte NFA from `re._parser`'s tree, from a source state to the exit state each node returns.

    Every node's exit is a state it created (or its entry, for an empty sequence), and a loop only closes over
    a state its own repeat created, so adding edges after a node never changes what came before it.
    """

    def __init__(self, nfa: NFA, pattern: str, verbose: bool):
        self.nfa = nfa
        self.pattern = pattern
        self.verbose = verbose
        self.anchors: list[tuple[Any, int]] = []  # (AT code, the fresh state just past the anchor)

    def refuse(self, kind: str, what: str) -> UnsupportedError:
        return _unsupported(self.pattern, self.verbose, kind, what)

    def sequence(self, items: Any, flags: int, src: int) -> int:
        for op, av in _items(items):
            src = self.node(op, av, flags, src)
        return src

    def node(self, op: Any, av: Any, flags: int, src: int) -> int:
        nfa = self.nfa
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
            dst = nfa.add_state()
            nfa.add_codepoints(src, _charset(op, av, flags), dst)
            return dst
        if op == _sre.SUBPATTERN:
            _, add, remove, body = av
            return self.sequence(body, _combine_flags(flags, add, remove), src)
        if op == _sre.BRANCH:
            dst = nfa.add_state()
            for branch in av[1]:
                nfa.add_epsilon(self.sequence(branch, flags, src), dst)
            return dst
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):  # lazy or greedy: the same set of full matches
            lo, hi, body = av
            return self.repeat(lo, hi, body, flags, src)
        if op == _sre.AT and av in _ANCHORS:
            dst = nfa.add_state()  # a fresh state: what follows the anchor leaves from here only
            nfa.add_epsilon(src, dst)
            self.anchors.append((av, dst))
            return dst
        raise self._refusal(op, av)

    def _refusal(self, op: Any, av: Any) -> UnsupportedError:
        if op == _sre.GROUPREF:
            return self.refuse("backreference", "a backreference (\\N or (?P=name))")
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            kind = "lookahead" if av[0] == 1 else "lookbehind"
            if op == _sre.ASSERT_NOT:
                kind = "negative " + kind
            return self.refuse(kind, f"a {kind} assertion")
        if op == _sre.GROUPREF_EXISTS:
            return self.refuse("conditional group", "a conditional group (?(id)yes|no)")
        if op == _sre.ATOMIC_GROUP:
            return self.refuse("atomic group", "an atomic group (?>...)")
        if op == _sre.POSSESSIVE_REPEAT:
            return self.refuse("possessive quantifier", "a possessive quantifier (*+, ++, ?+, {m,n}+)")
        if op == _sre.AT and av == _sre.AT_BOUNDARY:
            return self.refuse("\\b", "the word boundary \\b")
        if op == _sre.AT and av == _sre.AT_NON_BOUNDARY:
            return self.refuse("\\B", "the non-boundary \\B")
        return UnsupportedError(f"the regex construct {op} is not supported", source=self.pattern)

    def repeat(self, lo: int, hi: int, body: Any, flags: int, src: int) -> int:
        nfa = self.nfa
        unbounded = hi == _sre.MAXREPEAT
        cur = src
        for _ in range(lo - 1 if unbounded and lo > 0 else lo):
            cur = self.sequence(body, flags, cur)
        if unbounded:
            loop = nfa.add_state()
            nfa.add_epsilon(cur, loop)
            end = self.sequence(body, flags, loop)
            if lo == 0:  # body*: leave from the loop state
                nfa.add_epsilon(end, loop)
                return loop
            out = nfa.add_state()  # body+: the last mandatory copy, then back to the loop or on
            nfa.add_epsilon(end, out)
            nfa.add_epsilon(out, loop)
            return out
        out = nfa.add_state()
        for _ in range(hi - lo):  # nested optionals: (body(body(body)?)?)?
            nfa.add_epsilon(cur, out)
            cur = self.sequence(body, flags, cur)
        nfa.add_epsilon(cur, out)
        return out

    def misplaced_anchor(self, start: int) -> Any | None:
        """The AT code of an anchor that is not at the very start / very end, or None.

        `^`/`\\A` are exact no-ops iff no path reaches them after reading a byte; `$`/`\\Z` (under fullmatch)
        iff no byte can be read after them. Then they are plain epsilon moves.
        """
        after_bytes: set[int] | None = None
        for code, state in self.anchors:
            if _ANCHORS[code][1] == "begin":
                if after_bytes is None:
                    after_bytes = self.nfa.reachable(self.nfa.reachable([start]), consuming_only_first=True)
                if state in after_bytes:
                    return code
            elif any(self.nfa.edges[s] for s in self.nfa.reachable([state])):
                return code
        return None


def _parse(pattern: str, flags: int) -> Any:
    """`re._parser`'s tree for `pattern`, after `re.compile` has vetted it (its errors name the position)."""
    try:
        re.compile(pattern, flags)
        return _sre_parser.parse(pattern, flags)
    except re.error as exc:
        raise SpecError(f"invalid regex: {exc.msg}", source=pattern, position=exc.pos) from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise SpecError(f"invalid regex {pattern!r} with flags {flags!r}: {exc}") from None


def _check_flags(flags: Any) -> int:
    if not isinstance(flags, int):
        raise SpecError(f"regex flags must be an int (re.IGNORECASE | ...), got {type(flags).__name__}")
    flags = int(flags) & ~re.DEBUG  # DEBUG only prints the parse tree
    unknown = flags & ~_SUPPORTED_FLAGS
    if unknown:
        raise UnsupportedError(f"unsupported regex flag bits {unknown:#x} (supported: I L M S U X A)")
    return flags


def _build(pattern: str, flags: int, max_nfa_states: int) -> tuple[NFA, int, int, _Thompson]:
    tree = _parse(pattern, flags)
    global_flags = tree.state.flags
    if global_flags & ~_SUPPORTED_FLAGS & ~re.DEBUG:
        raise UnsupportedError(f"unsupported inline flags in regex {pattern!r}")
    nfa = NFA(max_states=max_nfa_states)
    builder = _Thompson(nfa, pattern, bool(global_flags & re.VERBOSE))
    start = nfa.add_state()
    end = builder.sequence(tree, global_flags, start)
    accept = nfa.add_state()
    nfa.add_epsilon(end, accept)
    return nfa, start, accept, builder


def _misplaced_anchor_position(pattern: str, flags: int, verbose: bool, max_nfa_states: int) -> int | None:
    """The position of the first anchor that is misplaced on its own (the others replaced by `(?:)`)."""
    anchors = [
        (pos, length)
        for pos, length, kind in _constructs(pattern, verbose)
        if kind in ("^", "$", "\\A", "\\Z")
    ]
    for pos, _ in anchors:
        text = pattern
        for other, length in reversed(anchors):
            if other != pos:
                text = text[:other] + "(?:)" + text[other + length :]
        try:
            nfa, start, _, builder = _build(text, flags, max_nfa_states)
        except SpecError:
            continue
        if builder.misplaced_anchor(start) is not None:
            return pos
    return None


@lru_cache(maxsize=256)
def compile_dfa(pattern: str, flags: int = 0, max_states: int = DEFAULT_MAX_STATES) -> ByteDFA:
    """Compile a Python regex to the minimal `ByteDFA` of `re.fullmatch(pattern, text, flags)` on UTF-8.

    Cached per `(pattern, flags, max_states)`; the result is immutable and shared.

    Raises:
        SpecError: a malformed pattern or bad flags (the message shows the position).
        UnsupportedError: a construct a DFA cannot enforce exactly (named, with its position).
        CompileLimitError: more than `max_states` DFA states (or a proportional number of NFA states).
    """
    if not isinstance(pattern, str):
        raise SpecError(f"a regex pattern must be str, got {type(pattern).__name__}")
    flags = _check_flags(flags)
    max_nfa = max(100_000, NFA_STATES_PER_DFA_STATE * max_states)
    try:
        nfa, start, accept, builder = _build(pattern, flags, max_nfa)
        misplaced = builder.misplaced_anchor(start)
        if misplaced is not None:
            text, edge = _ANCHORS[misplaced]
            where = "very start" if edge == "begin" else "very end"
            position = _misplaced_anchor_position(pattern, flags, builder.verbose, max_nfa)
            raise UnsupportedError(
                f"the anchor {text} is only supported at the {where} of the pattern",
                source=pattern,
                position=position,
            )
        return ByteDFA.from_nfa(nfa, start, accept, max_states=max_states)
    except RecursionError:
        raise CompileLimitError(f"regex {pattern[:60]!r} is nested too deeply to compile") from None


register_compile_cache(compile_dfa.cache_clear)


# -- constraints -------------------------------------------------------------------------------------------
def _check_max_states(max_states: Any) -> int:
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise SpecError(f"max_states must be a positive int, got {max_states!r}")
    return max_states


@dataclass(frozen=True)
class Regex(Constraint):
    """A constraint that the output fullmatches a Python regex (build it with `regex()`)."""

    pattern: str
    flags: int = 0
    max_states: int = DEFAULT_MAX_STATES

    def cache_key(self) -> object:
        return (self.pattern, self.flags, self.max_states)

    @property
    def dfa(self) -> ByteDFA:
        """The pattern's minimal byte DFA (compiled once per process, then cached)."""
        return compile_dfa(self.pattern, self.flags, self.max_states)

    def _compile(self, vocab: Vocabulary) -> CompiledRegex:
        return CompiledRegex(self.dfa, vocab, name=f"regex {self.pattern!r}")


@dataclass(frozen=True)
class Choice(Constraint):
    """A constraint that the output is exactly one of some literal strings (build it with `choice()`)."""

    options: tuple[str, ...]
    max_states: int = DEFAULT_MAX_STATES

    def cache_key(self) -> object:
        return (self.options, self.max_states)

    @property
    def dfa(self) -> ByteDFA:
        """The minimal byte DFA of the options (built once per process, then cached)."""
        return _choice_dfa(self.options, self.max_states)

    def _compile(self, vocab: Vocabulary) -> CompiledRegex:
        return CompiledRegex(self.dfa, vocab, name=f"choice of {len(self.options)} options")


@lru_cache(maxsize=64)
def _choice_dfa(options: tuple[str, ...], max_states: int) -> ByteDFA:
    return ByteDFA.from_literals((o.encode("utf-8") for o in options), max_states=max_states)


def regex(pattern: str, flags: int = 0, *, max_states: int = DEFAULT_MAX_STATES) -> Regex:
    """A constraint: the output must fullmatch `pattern` (Python `re` syntax and semantics) under `flags`.

    The pattern is compiled (and checked) here, once per process; `compile(vocab)` then only adds masks.

    Raises:
        SpecError: a malformed pattern (with the position), bad flags, or a pattern that matches no text.
        UnsupportedError: backreferences, lookaround, conditionals, \\b/\\B, atomic groups, possessive
            quantifiers, anchors other than at the very start/end (named, with the position).
        CompileLimitError: the DFA would need more than `max_states` states.
    """
    spec = Regex(pattern, _check_flags(flags), _check_max_states(max_states))
    if spec.dfa.start < 0:
        raise SpecError(f"regex {pattern!r} matches no text (nothing that can be written as UTF-8)")
    return spec


def choice(options: Sequence[str], *, max_states: int = DEFAULT_MAX_STATES) -> Choice:
    """A constraint: the output must be exactly one of `options` (literal strings, not regexes).

    Raises:
        SpecError: no options, or an option that is not a str.
        CompileLimitError: the options' minimal DFA would need more than `max_states` states.
    """
    if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
        raise SpecError(f"choice() takes a sequence of strings, got {type(options).__name__}")
    if not options:
        raise SpecError("choice() needs at least one option, got an empty list")
    for i, option in enumerate(options):
        if not isinstance(option, str):
            raise SpecError(f"choice() option {i} must be a str, got {type(option).__name__}: {option!r}")
    spec = Choice(tuple(options), _check_max_states(max_states))
    spec.dfa  # noqa: B018 - build (and check the size of) the DFA now, not at the first compile
    return spec


# -- compiled form and matcher ---------------------------------------------------------------------------
class CompiledRegex(CompiledConstraint):
    """A byte DFA compiled against a vocabulary: one token mask per DFA state, computed on first use.

    The mask of state `s` (uint32, `ceil(vocab_size/32)` words) allows every ordinary token whose bytes keep
    the DFA alive from `s`, plus the EOS ids iff `s` accepts. It is computed by a numba walk of the
    vocabulary trie the first time a matcher needs it, then shared read-only by all matchers and threads.
    """

    def __init__(self, dfa: ByteDFA, vocab: Vocabulary, *, name: str = "regex"):
        if dfa.start < 0:
            raise SpecError(f"{name} matches no text: there is nothing to constrain to")
        self.dfa = dfa
        self.vocab = vocab
        self.name = name
        self.n_words = bitmask_words(vocab.vocab_size)
        self._masks: list[np.ndarray | None] = [None] * dfa.n_states
        self._lock = threading.Lock()
        self._eos = [(int(e) >> 5, np.uint32(1 << (int(e) & 31))) for e in vocab.eos_array]
        eos_only = np.zeros(self.n_words, dtype=np.uint32)
        for word, bit in self._eos:
            eos_only[word] |= bit
        eos_only.setflags(write=False)
        self.eos_mask = eos_only
        self._no_text = vocab.special_ids | vocab.eos_ids  # never advance the DFA

    def __repr__(self) -> str:
        return f"CompiledRegex({self.name}, {self.dfa.n_states} states, {self.vocab!r})"

    def matcher(self) -> RegexMatcher:
        return RegexMatcher(self)

    def state_mask(self, state: int) -> np.ndarray:
        """The read-only uint32 mask of DFA `state` (EOS bits included iff it accepts); computed once."""
        mask = self._masks[state]
        if mask is not None:
            return mask
        trie = self.vocab.trie
        mask = np.zeros(self.n_words, dtype=np.uint32)
        dfa_trie_mask(
            self.dfa.transitions,
            state,
            *trie.walk_arrays,
            mask,
        )
        self._finish(mask, state)
        with self._lock:  # two threads may race to fill a state: keep the first, both are equal
            if self._masks[state] is None:
                self._masks[state] = mask
            return self._masks[state]

    def precompute(self) -> None:
        """Fill the masks of every DFA state now (one batched walk) instead of lazily."""
        missing = np.asarray([s for s, m in enumerate(self._masks) if m is None], dtype=np.int32)
        if not missing.size:
            return
        trie = self.vocab.trie
        out = np.zeros((missing.size, self.n_words), dtype=np.uint32)
        dfa_trie_masks(
            self.dfa.transitions,
            missing,
            *trie.walk_arrays,
            out,
        )
        for row, state in enumerate(missing.tolist()):
            mask = out[row]
            self._finish(mask, state)
            with self._lock:
                if self._masks[state] is None:
                    self._masks[state] = mask

    def _finish(self, mask: np.ndarray, state: int) -> None:
        # EOS ids mean "stop", never text: clear them, then allow them exactly in accepting states.
        for word, bit in self._eos:
            mask[word] &= ~bit
        if self.dfa.accepting[state]:
            mask |= self.eos_mask
        mask.setflags(write=False)

    def token_allowed(self, state: int, token: int) -> bool:
        """True if ordinary `token` keeps the DFA alive from `state` (EOS and specials: False)."""
        if token >= self.vocab.n_tokens or token in self._no_text:
            return False
        data = self.vocab.token_bytes[token]
        return bool(data) and self.dfa.run(state, data) >= 0


class RegexMatcher(Matcher):
    """Follows one sequence through a `CompiledRegex`: a stack of DFA states, so rollback is a pop."""

    def __init__(self, compiled: CompiledRegex, stack: list[int] | None = None):
        self.compiled = compiled
        self.vocab = compiled.vocab
        self._stack = [compiled.dfa.start] if stack is None else stack

    @property
    def state(self) -> int:
        """The current DFA state (-2 once EOS has been accepted)."""
        return self._stack[-1]

    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        words = row_view(bitmask, row, self.vocab.vocab_size)
        state = self._stack[-1]
        words[:] = self.compiled.eos_mask if state == _TERMINATED else self.compiled.state_mask(state)

    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        state = self._stack[-1]
        compiled = self.compiled
        if token in self.vocab.eos_ids:
            if state == _TERMINATED or compiled.dfa.accepting[state]:
                self._stack.append(_TERMINATED)
                return True
            return False
        if state == _TERMINATED or token >= self.vocab.n_tokens or token in compiled._no_text:
            return False
        data = self.vocab.token_bytes[token]
        nxt = compiled.dfa.run(state, data) if data else DEAD
        if nxt < 0:
            return False
        self._stack.append(nxt)
        return True

    def rollback(self, n: int = 1) -> None:
        self._check_rollback(n, len(self._stack) - 1)
        if n:
            del self._stack[-n:]

    def fork(self) -> RegexMatcher:
        return RegexMatcher(self.compiled, list(self._stack))

    def is_accepting(self) -> bool:
        state = self._stack[-1]
        return state == _TERMINATED or bool(self.compiled.dfa.accepting[state])

    def is_terminated(self) -> bool:
        return self._stack[-1] == _TERMINATED
