"""A context-free grammar over byte-level terminals, and a persistent incremental Earley parser for it.

The grammar form (`GrammarIR`) is what Lark grammars and JSON schemas are lowered to: named terminals (Python
`re` patterns, compiled to byte DFAs), rules `lhs -> rhs`, a start symbol and ignored terminals (whitespace).

Parser states are immutable `EarleyState`s, one per lexeme boundary; an item's origin is a reference to an
earlier state, so a state is a whole parse stack, shareable by forks and kept for rollback at no cost.
Every context-free grammar is handled, ambiguous ones and empty rules included (nullable symbols are advanced
at prediction time, as Aycock and Horspool do). Symbols that derive no string are pruned at compile time, so
every live state can still be completed: a non-empty state is a viable prefix of the language.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from constrain.errors import CompileLimitError, SpecError

from .dfa import ByteDFA
from .terminals import pattern_dfa

# Bounds on per-step work: raised as CompileLimitError, never a hang.
MAX_ITEMS_PER_STATE = 100_000


@dataclass(frozen=True)
class Terminal:
    """A terminal: the strings its Python `re` pattern fully matches (as UTF-8), never the empty string."""

    name: str
    pattern: str
    flags: int = 0
    # A prebuilt automaton for languages no regex spells (then `pattern` is only a unique key).
    dfa: ByteDFA | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class Rule:
    """A production `lhs -> rhs`; `rhs` names terminals and non-terminals (empty for an empty rule)."""

    lhs: str
    rhs: tuple[str, ...]


@dataclass(frozen=True)
class GrammarIR:
    """A context-free grammar over terminals; hashable, so compiled forms can be cached by value."""

    terminals: tuple[Terminal, ...]
    rules: tuple[Rule, ...]
    start: str
    ignore: tuple[str, ...] = ()


class Grammar:
    """A `GrammarIR` compiled for parsing: numbered symbols, terminal DFAs, nullable/productive analysis.

    Terminals are numbered `0..n_terminals-1`, non-terminals `n_terminals..`; rule 0 is `$start -> start`.

    Raises:
        SpecError: unknown symbol, duplicate terminal, a terminal that matches the empty string, or a grammar
            that generates no string at all.
        UnsupportedError / CompileLimitError: from compiling a terminal's pattern.
    """

    def __init__(self, ir: GrammarIR):
        self.ir = ir
        names = [t.name for t in ir.terminals]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise SpecError(f"terminal(s) defined twice: {', '.join(dup)}")
        self.terminal_names = names
        self.dfas: list[ByteDFA] = []
        for t in ir.terminals:
            dfa = t.dfa if t.dfa is not None else pattern_dfa(t.pattern, t.flags, t.name)
            if dfa.start >= 0 and dfa.accepting[dfa.start]:
                raise SpecError(f"terminal {t.name} matches the empty string (pattern /{t.pattern}/)")
            self.dfas.append(dfa)
        n_t = len(names)
        term_id = {n: i for i, n in enumerate(names)}
        nt_names = ["$start"] + sorted({r.lhs for r in ir.rules} - {"$start"})
        nt_id = {n: n_t + i for i, n in enumerate(nt_names)}
        if ir.start not in nt_id:
            raise SpecError(f"start symbol {ir.start!r} has no rule")
        for r in ir.rules:
            if r.lhs in term_id:
                raise SpecError(f"rule for {r.lhs!r}: the name is already a terminal")
            for s in r.rhs:
                if s not in term_id and s not in nt_id:
                    raise SpecError(f"rule {r.lhs}: unknown symbol {s!r}")
        for name in ir.ignore:
            if name not in term_id:
                raise SpecError(f"%ignore names an unknown terminal {name!r}")
        rules = [(nt_id["$start"], (nt_id[ir.start],))]
        seen_rules = set(rules)
        for r in ir.rules:
            key = (nt_id[r.lhs], tuple(term_id.get(s, nt_id.get(s)) for s in r.rhs))
            if key not in seen_rules:
                seen_rules.add(key)
                rules.append(key)
        # Productive symbols (derive some string); rules that use an unproductive one can never complete.
        productive = {i for i in range(n_t) if self.dfas[i].start >= 0}
        changed = True
        while changed:
            changed = False
            for lhs, rhs in rules:
                if lhs not in productive and all(s in productive for s in rhs):
                    productive.add(lhs)
                    changed = True
        if nt_id["$start"] not in productive:
            raise SpecError(f"the grammar generates no string (start symbol {ir.start!r} cannot complete)")
        rules = [(lhs, rhs) for lhs, rhs in rules if lhs in productive and all(s in productive for s in rhs)]
        self.n_terminals = n_t
        self.symbol_names = names + nt_names
        self.lhs = [lhs for lhs, _ in rules]
        self.rhs = [rhs for _, rhs in rules]
        self.rules_of: dict[int, list[int]] = {}
        for i, lhs in enumerate(self.lhs):
            self.rules_of.setdefault(lhs, []).append(i)
        nullable: set[int] = set()
        changed = True
        while changed:
            changed = False
            for lhs, rhs in rules:
                if lhs not in nullable and all(s in nullable for s in rhs):
                    nullable.add(lhs)
                    changed = True
        self.nullable = nullable
        self.ignore = frozenset(term_id[n] for n in ir.ignore)
        # Ignored terminals whose language is closed under concatenation (e.g. WS = /\s+/): a second such
        # lexeme right after one adds no string, so walks need not start one there (see cfg.fill_words).
        self.closed_ignore = frozenset(t for t in self.ignore if concat_closed(self.dfas[t]))
        self._lock = threading.Lock()
        self.states: dict[
            tuple[tuple[int, int, int], ...], EarleyState
        ] = {}  # by kernel (`EarleyState.scan`)
        self.root = EarleyState.initial(self)

    def __repr__(self) -> str:
        return f"Grammar({self.n_terminals} terminals, {len(self.lhs)} rules, start {self.ir.start!r})"


def concat_closed(dfa: ByteDFA) -> bool:
    """True if L·L ⊆ L for the DFA's language L: from every accepting state, L itself is accepted."""
    rows = dfa.transitions
    for f in np.flatnonzero(dfa.accepting).tolist():
        seen = {(dfa.start, f)}
        todo = [(dfa.start, f)]
        while todo:
            p, q = todo.pop()
            if dfa.accepting[p] and (q < 0 or not dfa.accepting[q]):
                return False
            row_q = rows[q] if q >= 0 else np.full(256, -1)
            for p2, q2 in set(zip(rows[p].tolist(), row_q.tolist(), strict=True)):
                if p2 >= 0 and (p2, q2) not in seen:
                    if q2 < 0:
                        return False  # p2 is live (every ByteDFA state is), q2 accepts nothing
                    seen.add((p2, q2))
                    todo.append((p2, q2))
    return True


class EarleyState:
    """The Earley item set at one lexeme boundary (immutable once built; items point at earlier states).

    Attributes:
        by_next: symbol -> the items whose next symbol it is, flat: `[rule, dot, origin, rule, dot, ...]`
            (one list per symbol, not a tuple per item: fewer objects for the garbage collector to scan).
        accepting: the input up to here is a complete sentence.
        expected: the terminals that may come next (ignored terminals not included).
    """

    __slots__ = ("g", "by_next", "accepting", "expected", "_after", "n_items", "__weakref__")

    def __init__(self, g: Grammar):
        self.g = g
        self.by_next: dict[int, list[int | EarleyState]] = {}
        self.accepting = False
        self.expected: frozenset[int] = frozenset()
        self._after: dict[frozenset[int], tuple[EarleyState, ...]] = {}
        self.n_items = 0

    @classmethod
    def initial(cls, g: Grammar) -> EarleyState:
        state = cls(g)
        state._close([(0, 0, state)], root=state)
        return state

    def _close(self, kernel: Iterable[tuple[int, int, EarleyState]], root: EarleyState) -> None:
        """Prediction and completion from the kernel items (Earley's closure, nullable-aware)."""
        g = self.g
        n_t = g.n_terminals
        seen: set[tuple[int, int, int]] = set()
        agenda: list[tuple[int, int, EarleyState]] = []
        for r, d, o in kernel:
            key = (r, d, id(o))
            if key not in seen:
                seen.add(key)
                agenda.append((r, d, o))
        predicted: set[int] = set()
        by_next = self.by_next
        accepting = False
        while agenda:
            r, d, o = agenda.pop()
            rhs = g.rhs[r]
            if d == len(rhs):
                if r == 0 and o is root:
                    accepting = True
                if o is self:
                    continue  # an empty derivation here: the nullable advance below already covered it
                it = iter(o.by_next.get(g.lhs[r], ()))
                new = [(r2, d2 + 1, o2) for r2, d2, o2 in zip(it, it, it, strict=True)]
            else:
                sym = rhs[d]
                items = by_next.get(sym)
                if items is None:
                    items = by_next[sym] = []
                items += (r, d, o)
                if sym < n_t:
                    continue
                new = []
                if sym not in predicted:
                    predicted.add(sym)
                    new.extend((r2, 0, self) for r2 in g.rules_of.get(sym, ()))
                if sym in g.nullable:
                    new.append((r, d + 1, o))
            for r2, d2, o2 in new:
                key = (r2, d2, id(o2))
                if key not in seen:
                    seen.add(key)
                    agenda.append((r2, d2, o2))
            if len(seen) > MAX_ITEMS_PER_STATE:
                raise CompileLimitError(
                    f"an Earley set grew past {MAX_ITEMS_PER_STATE} items (a highly ambiguous grammar?)"
                )
        self.n_items = len(seen)
        self.accepting = accepting
        self.expected = frozenset(s for s in by_next if s < n_t)

    def scan(self, terminals: Iterable[int]) -> EarleyState | None:
        """The state after a lexeme that any of `terminals` matched, or None if none is expected here."""
        kernel = []
        for t in terminals:
            it = iter(self.by_next.get(t, ()))
            for r, d, o in zip(it, it, it, strict=True):
                kernel.append((r, d + 1, o))
        if not kernel:
            return None
        # A state is a function of its kernel: states with equal kernels are interned, so a loop of the
        # grammar (the elements of an array, say) comes back to the same states, and to their cached fills.
        # The key holds origins by id (the interned state's items keep those origins alive), and only ints:
        # the garbage collector stops tracking it.
        key = tuple(sorted({(r, d, id(o)) for r, d, o in kernel}))
        g = self.g
        hit = g.states.get(key)
        if hit is not None:
            return hit
        state = EarleyState(g)
        state._close(kernel, root=g.root)
        with g._lock:
            return g.states.setdefault(key, state)

    def after(self, terminals: frozenset[int]) -> tuple[EarleyState, ...]:
        """The states a lexeme matched by `terminals` leads to: this one (ignored terminal) and/or the scan.

        Cached per terminal set (states are immutable).
        """
        hit = self._after.get(terminals)
        if hit is not None:
            return hit
        out: list[EarleyState] = []
        if terminals & self.g.ignore:
            out.append(self)
        normal = terminals & self.expected
        if normal:
            nxt = self.scan(sorted(normal))
            if nxt is not None:
                out.append(nxt)
        result = tuple(out)
        self._after[terminals] = result
        return result
