"""Product automata of byte DFAs, built by a numba kernel: the grammar lexers (all the terminals a parser
state allows, run side by side) and binary products (intersection and difference of two languages).

The component DFAs are laid side by side in one global state space (component `j`'s states are shifted by
the number of states before it). A product state is then the sorted array of its live global states, at most
one per component; states are interned in an open-addressing hash table with an exact comparison on
collision, so the numbering is exact whatever the hashes do. States are numbered breadth-first from the start
state (0), and -1 is the dead state: no component alive, or a required component dead.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from numba import njit

from constrain.errors import CompileLimitError

from .dfa import ByteDFA, minimize
from .sets import FULL_POOL, FULL_STATES, intern, table_size

# Base hints (see `set_base`): a DFA -> a DFA of a nearly equal language, whose lexer walks are shared.
_bases: weakref.WeakKeyDictionary[ByteDFA, ByteDFA] = weakref.WeakKeyDictionary()


def set_base(dfa: ByteDFA, base: ByteDFA) -> None:
    """Hint that the language of `dfa` differs from that of `base` only on few strings (e.g. JSON strings
    minus a set of property names): the trie walks of `dfa`'s lexer are then derived from the (shared,
    cached) walks of `base`'s, walking the trie only where the two languages differ (`lexer.BaseLink`).

    Exact whatever the hint: a poor one only costs time. Used by lexers of `dfa` alone.
    """
    if dfa is not base and dfa.n_states > 0 and base.n_states > 0:
        _bases[dfa] = base


def base_hint(dfa: ByteDFA) -> ByteDFA | None:
    """The base set for `dfa` by `set_base`, if any."""
    return _bases.get(dfa)


@njit(cache=True, nogil=True)
def _product(trans, base, start, required, n_required, table, pool, off, hashes, htab):  # noqa: ANN001, ANN202
    """Breadth-first product construction over the global state space, into preallocated arrays.

    Args:
        trans: int32 (n_global, 256): the components' transition tables, one after the other.
        base: int32 (n_global,): the first global state of each state's component (added to its targets).
        start: int32 sorted: the live global start states.
        required: bool (n_global,): the state belongs to a component that must stay alive.
        n_required: how many components are required (a successor missing one of them is dead).
        table: int32 (cap, 256): the product's transitions (output).
        pool, off, hashes, htab: the interned states (see `_intern`); `off` has cap + 1 entries.

    Returns the number of states, or `FULL_STATES` / `FULL_POOL` if the arrays were too small. Product state
    `i` is the sorted global states `pool[off[i]:off[i + 1]]`.
    """
    k0 = start.shape[0]
    buf = np.empty(max(k0, 1), dtype=np.int32)
    for j in range(k0):
        buf[j] = start[j]
    off[0] = 0
    htab[:] = -1
    s, n = intern(buf, k0, pool, off, hashes, htab, 0)
    if s < 0:
        return s
    i = 0
    while i < n:
        a = off[i]
        k = off[i + 1] - a
        prev = -1
        for b in range(256):
            m = 0
            req = 0
            for j in range(k):
                g = pool[a + j]
                t = trans[g, b]
                if t >= 0:
                    t += base[g]
                    buf[m] = t
                    m += 1
                    if required[t]:
                        req += 1
            if m == 0 or req < n_required:
                table[i, b] = -1
                continue
            # Runs of bytes usually lead to the same state: compare with the previous byte's target first.
            if prev >= 0 and off[prev + 1] - off[prev] == m:
                p = off[prev]
                same = True
                for j in range(m):
                    if pool[p + j] != buf[j]:
                        same = False
                        break
                if same:
                    table[i, b] = prev
                    continue
            s, n = intern(buf, m, pool, off, hashes, htab, n)
            if s < 0:
                return s
            table[i, b] = s
            prev = s
        i += 1
    return n


@njit(cache=True, nogil=True)
def _accept_sets(pool, off, n, comp_of, acc_global, spool, soff, hashes, htab, ids):  # noqa: ANN001, ANN202
    """Per product state, the id (in `ids`) of its set of accepting components, interned in (spool, soff).

    Returns the number of distinct sets, or `FULL_STATES` / `FULL_POOL` if the arrays were too small.
    """
    buf = np.empty(max(comp_of.shape[0], 1), dtype=np.int32)
    soff[0] = 0
    htab[:] = -1
    n_sets = 0
    for i in range(n):
        m = 0
        for p in range(off[i], off[i + 1]):
            g = pool[p]
            if acc_global[g]:
                buf[m] = comp_of[g]
                m += 1
        s, n_sets = intern(buf, m, spool, soff, hashes, htab, n_sets)
        if s < 0:
            return s
        ids[i] = s
    return n_sets


class Product:
    """The product of several byte DFAs (see the module docstring).

    Attributes:
        transitions: int32 (n_states, 256), -1 = dead.
        accept_id: int32 (n_states,): the index into `accept_sets` of each state's accepting components.
        accept_sets: tuples of component indices, distinct (the empty tuple among them when some state
            accepts nothing).
    """

    def __init__(self, transitions: np.ndarray, accept_id: np.ndarray, accept_sets: list[tuple[int, ...]]):
        self.transitions = transitions
        self.accept_id = accept_id
        self.accept_sets = accept_sets

    @property
    def n_states(self) -> int:
        return int(self.transitions.shape[0])


def product(dfas: Sequence[ByteDFA], *, required: Sequence[int] = (), max_states: int, what: str) -> Product:
    """The product automaton of `dfas`, where a state lives while some component does and every component
    listed in `required` does.

    Raises:
        CompileLimitError: more than `max_states` product states (`what` names the automaton).
    """
    required_set = set(required)
    live = [j for j, d in enumerate(dfas) if d.start >= 0]
    if not live or any(dfas[j].start < 0 for j in required_set):
        return Product(np.full((1, 256), -1, dtype=np.int32), np.zeros(1, dtype=np.int32), [()])
    if len(live) == 1 and required_set <= set(live) and dfas[live[0]].start == 0:
        # One live component: the product is that DFA itself (every state reachable, start 0: `minimize`).
        d = dfas[live[0]]
        return Product(d.transitions, d.accepting.astype(np.int32), [(), (live[0],)])
    sizes = [d.n_states for d in dfas]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    trans = np.concatenate([d.transitions for d in dfas])  # component-local targets: `base` shifts them
    base = np.repeat(offsets[:-1].astype(np.int32), sizes)
    comp_of = np.repeat(np.arange(len(dfas), dtype=np.int32), sizes)
    acc_global = np.concatenate([d.accepting for d in dfas])
    is_required = np.repeat(np.asarray([j in required_set for j in range(len(dfas))], dtype=np.bool_), sizes)
    start = [int(offsets[j]) + dfas[j].start for j in live]
    starts = np.asarray(start, dtype=np.int32)
    n_required = len(required_set)
    # Start small and grow (rerunning the kernel): most lexers have a few dozen states.
    n_global = int(offsets[-1])
    cap, pool_cap = min(max(256, n_global), max_states), 1024 + 2 * n_global
    while True:
        table = np.empty((cap, 256), dtype=np.int32)
        pool = np.empty(pool_cap, dtype=np.int32)
        off = np.empty(cap + 1, dtype=np.int64)
        hashes = np.empty(cap, dtype=np.uint64)
        htab = np.empty(table_size(cap), dtype=np.int64)
        n = _product(trans, base, starts, is_required, n_required, table, pool, off, hashes, htab)
        if n == FULL_POOL:
            pool_cap *= 4
        elif n == FULL_STATES:
            if cap >= max_states:
                raise CompileLimitError(f"{what} needs more than {max_states} states")
            cap = min(4 * cap, max_states)
        else:
            break
    ids = np.empty(n, dtype=np.int32)
    set_cap, set_pool_cap = 64, 1024
    while True:
        spool = np.empty(set_pool_cap, dtype=np.int32)
        soff = np.empty(set_cap + 1, dtype=np.int64)
        n_sets = _accept_sets(
            pool,
            off,
            n,
            comp_of,
            acc_global,
            spool,
            soff,
            np.empty(set_cap, np.uint64),
            np.empty(table_size(set_cap), np.int64),
            ids,
        )
        if n_sets == FULL_POOL:
            set_pool_cap *= 4
        elif n_sets == FULL_STATES:
            set_cap *= 4
        else:
            break
    sets = [tuple(spool[soff[i] : soff[i + 1]].tolist()) for i in range(n_sets)]
    return Product(table[:n], ids, sets)


def product_dfa(a: ByteDFA, b: ByteDFA, mode: str, max_states: int) -> ByteDFA:
    """The minimal DFA of L(a) minus L(b) (`mode="minus"`) or L(a) and L(b) (`"and"`).

    Raises `CompileLimitError` past `max_states` product states.
    """
    if a.start < 0 or (mode == "and" and b.start < 0):
        return ByteDFA.empty()
    required = (0, 1) if mode == "and" else (0,)
    prod = product([a, b], required=required, max_states=max_states, what="a product of string automata")
    if mode == "and":
        set_ok = [0 in s and 1 in s for s in prod.accept_sets]
    else:
        set_ok = [0 in s and 1 not in s for s in prod.accept_sets]
    accepting = np.asarray(set_ok, dtype=np.bool_)[prod.accept_id]
    out = minimize(prod.transitions, accepting, 0, np.arange(256))
    if mode == "minus":  # a few strings less (names, enum values): walks can start from those of `a`
        set_base(out, a)
    return out
