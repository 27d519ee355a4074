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
        rules_of: dict[int, list[int]] = {}
        for i, lhs in enumerate(self.lhs):
            rules_of.setdefault(lhs, []).append(i)
        # Tuples of ints, not lists: the garbage collector stops tracking them (grammars live long).
        self.rules_of: dict[int, tuple[int, ...]] = {lhs: tuple(rs) for lhs, rs in rules_of.items()}
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
        # Per non-terminal, the items its prediction adds (`own_items`), built on first use.
        self._own: dict[int, tuple[tuple[int, tuple[int, ...], int], ...]] = {}
        self.states: dict[
            tuple[tuple[int, int, int], ...], EarleyState
        ] = {}  # by kernel (`EarleyState.scan`)
        self.state_list: list[EarleyState] = []  # by `EarleyState.index`
        self.root = EarleyState.initial(self)

    def own_items(self, x: int) -> tuple[tuple[int, tuple[int, ...], int], ...]:
        """The items that predicting non-terminal `x` adds for its own rules (origin: the predicting state):
        `(rule, dot)` for every dot from 0 across a nullable prefix of the rule, up to its first non-nullable
        symbol (complete items left out: an empty derivation is covered by the nullable advance).

        Grouped by next symbol: `(symbol, (rule, dot, 0, rule, dot, 0, ...), count)`, the zeros being slots
        for the origin (the flat layout of `EarleyState.by_next`).
        """
        hit = self._own.get(x)
        if hit is not None:
            return hit
        groups: dict[int, list[int]] = {}
        for r in self.rules_of.get(x, ()):
            rhs = self.rhs[r]
            for d, sym in enumerate(rhs):
                groups.setdefault(sym, []).extend((r, d, 0))
                if sym not in self.nullable:
                    break
        out = tuple((sym, tuple(flat), len(flat) // 3) for sym, flat in groups.items())
        return self._own.setdefault(x, out)

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
        index: this state's position in `Grammar.state_list` (items name their origin by it).
        by_next: symbol -> the items whose next symbol it is, flat: `(rule, dot, origin index, rule, ...)`.
            Only ints: the garbage collector stops tracking these tuples and dicts after one pass, so the
            (many, long-lived) parse states add next to nothing to a full collection's cost.
        accepting: the input up to here is a complete sentence.
        expected: the terminals that may come next (ignored terminals not included).
    """

    __slots__ = ("g", "index", "by_next", "accepting", "expected", "_after", "n_items", "__weakref__")

    def __init__(self, g: Grammar):
        self.g = g
        with g._lock:
            self.index = len(g.state_list)
            g.state_list.append(self)
        self.by_next: dict[int, tuple[int, ...]] = {}
        self.accepting = False
        self.expected: frozenset[int] = frozenset()
        self._after: dict[frozenset[int], tuple[EarleyState, ...]] = {}
        self.n_items = 0

    @classmethod
    def initial(cls, g: Grammar) -> EarleyState:
        state = cls(g)
        state._close([(0, 0, state.index)], root=state.index)
        return state

    def items(self) -> list[tuple[int, int, EarleyState]]:
        """The items that wait for a symbol: `(rule, dot, origin state)` (for tests and debugging)."""
        states = self.g.state_list
        out = []
        for flat in self.by_next.values():
            it = iter(flat)
            out += [(r, d, states[o]) for r, d, o in zip(it, it, it, strict=True)]
        return out

    def _close(self, kernel: Iterable[tuple[int, int, int]], root: int) -> None:
        """Prediction and completion from the kernel items `(rule, dot, origin index)` (Earley's closure,
        nullable-aware); `root` is the index of the grammar's first state."""
        g = self.g
        n_t = g.n_terminals
        states = g.state_list
        me = self.index
        seen: set[tuple[int, int, int]] = set(kernel)
        agenda: list[tuple[int, int, int]] = list(seen)
        predicted: set[int] = set()
        by_next: dict[int, list[int]] = {}
        accepting = False
        n_self = 0  # items predicted here (origin `self`), added in bulk by `_predict`
        while agenda:
            item = agenda.pop()
            r, d, o = item
            rhs = g.rhs[r]
            if d == len(rhs):
                if r == 0 and o == root:
                    accepting = True
                if o == me:
                    continue  # an empty derivation here: the nullable advance below already covered it
                it = iter(states[o].by_next.get(g.lhs[r], ()))
                new = [(r2, d2 + 1, o2) for r2, d2, o2 in zip(it, it, it, strict=True)]
            else:
                sym = rhs[d]
                items = by_next.get(sym)
                if items is None:
                    items = by_next[sym] = []
                items += item
                if sym < n_t:
                    continue
                new = []
                if sym not in predicted:
                    n_self += _predict(g, me, sym, predicted, by_next)
                if sym in g.nullable:
                    new.append((r, d + 1, o))
            for item2 in new:
                if item2 not in seen:
                    seen.add(item2)
                    agenda.append(item2)
            if len(seen) + n_self > MAX_ITEMS_PER_STATE:
                raise CompileLimitError(
                    f"an Earley set grew past {MAX_ITEMS_PER_STATE} items (a highly ambiguous grammar?)"
                )
        self.by_next = {sym: tuple(flat) for sym, flat in by_next.items()}
        self.n_items = len(seen) + n_self
        self.accepting = accepting
        self.expected = frozenset(s for s in by_next if s < n_t)

    def scan(self, terminals: Iterable[int]) -> EarleyState | None:
        """The state after a lexeme that any of `terminals` matched, or None if none is expected here."""
        kernel: set[tuple[int, int, int]] = set()
        for t in terminals:
            it = iter(self.by_next.get(t, ()))
            kernel.update((r, d + 1, o) for r, d, o in zip(it, it, it, strict=True))
        if not kernel:
            return None
        # A state is a function of its kernel: states with equal kernels are interned, so a loop of the
        # grammar (the elements of an array, say) comes back to the same states, and to their cached fills.
        # The key holds only ints (origins by index): the garbage collector stops tracking it.
        key = tuple(sorted(kernel))
        g = self.g
        hit = g.states.get(key)
        if hit is not None:
            return hit
        state = EarleyState(g)
        state._close(key, root=g.root.index)
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


def _predict(g: Grammar, me: int, x: int, predicted: set[int], by_next: dict[int, list[int]]) -> int:
    """Add to `by_next` the items that predicting `x` brings in state `me` (their origin), in bulk: per
    non-terminal predicted (transitively), its rules' items from `Grammar.own_items`, which depend on the
    grammar only, so they skip the closure's agenda. Returns how many were added.

    Items predicted in a state never complete there except through nullable symbols (advanced at
    prediction), so they add nothing else: the agenda only needs the items with earlier origins.
    """
    n_t = g.n_terminals
    added = 0
    todo = [x]
    while todo:
        y = todo.pop()
        if y in predicted:
            continue
        predicted.add(y)
        for sym, flat, k in g.own_items(y):
            items = by_next.get(sym)
            if items is None:
                items = by_next[sym] = []
            start = len(items)
            items += flat
            items[start + 2 :: 3] = [me] * k
            added += k
            if sym >= n_t and sym not in predicted:
                todo.append(sym)
    return added
