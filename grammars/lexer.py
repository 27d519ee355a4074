"""The lexer side of grammar masks: product DFAs of allowed terminals, cached walks of the vocabulary trie.

`Lexer` is the product of the DFAs of one set of terminals (the terminals an Earley state allows, plus the
ignored ones): its state says which of them are still alive and which accept. Lexers are cached globally by
their terminals' patterns, so a lexer (and the trie walks cached on it) is shared by every grammar and schema
that allows the same terminals at some point (the inside of a JSON string, say).

`Frontier` is a set of vocabulary-trie nodes where a lexeme may end inside a token: walking on from them with
the next lexeme's lexer covers the tokens that span a lexeme boundary. `Frontier.walk(lexer, state)` walks
every node's subtree through the lexer (numba), and returns the tokens allowed without crossing another
boundary plus, grouped by which terminals accepted, the frontiers where another lexeme can end. Results depend
only on (frontier, lexer, state), never on the parser, so they are computed once and cached: per step, the
parser is consulted only once per distinct group of boundaries (see docs/grammar.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from numba import njit

from constrain.errors import CompileLimitError
from constrain.vocab import Vocabulary

from .dfa import ByteDFA
from .product import product

MAX_LEXER_STATES = 50_000
SPARSE_IDS = 1024  # walk results with at most this many tokens are stored as ids, not a full mask

_lexers: dict[tuple, Lexer] = {}
_lexers_lock = threading.Lock()


class Lexer:
    """The product DFA of several terminal DFAs (state 0 = start, -1 = dead).

    Attributes:
        transitions: int32 (n_states, 256).
        accepting: bool (n_states,): some terminal accepts here.
        accepts: per state, the indices (into the terminals this lexer was built from) that accept there.
    """

    def __init__(self, dfas: Sequence[ByteDFA], name: str = ""):
        self.name = name
        # A product state is the set of its live components (terminal, DFA state); built by a numba kernel.
        prod = product(dfas, max_states=MAX_LEXER_STATES, what=f"the lexer for terminals {name}")
        self.transitions = prod.transitions
        self.accepts: list[tuple[int, ...]] = [prod.accept_sets[i] for i in prod.accept_id.tolist()]
        self.accepting = np.asarray([bool(a) for a in prod.accept_sets], dtype=np.bool_)[prod.accept_id]
        self.n_states = prod.n_states
        self._rows: list[list[int] | None] = [None] * self.n_states

    def row(self, state: int) -> list[int]:
        """Row `state` of `transitions` as a list (stepping from Python is faster on lists).

        Rows are converted on first use: a big lexer's whole table costs more than the steps taken in it.
        """
        row = self._rows[state]
        if row is None:
            row = self._rows[state] = self.transitions[state].tolist()
        return row

    def __repr__(self) -> str:
        return f"Lexer({self.name}: {self.n_states} states)"


def lexer_for(keys: tuple[tuple[str, int], ...], dfas: Sequence[ByteDFA]) -> Lexer:
    """The shared lexer for terminals given by `(pattern, flags)` keys (sorted) and their DFAs."""
    hit = _lexers.get(keys)
    if hit is not None:
        return hit
    lexer = Lexer(dfas, name="|".join(p for p, _ in keys)[:200])
    with _lexers_lock:
        return _lexers.setdefault(keys, lexer)


@njit(nogil=True, cache=True)
def _walk(
    transitions: np.ndarray,
    accepting: np.ndarray,
    start: int,
    roots: np.ndarray,
    node_byte: np.ndarray,
    node_depth: np.ndarray,
    node_end: np.ndarray,
    token_start: np.ndarray,
    token_ids: np.ndarray,
    max_depth: int,
    out: np.ndarray,
    ids: np.ndarray,
    b_nodes: np.ndarray,
    b_states: np.ndarray,
) -> tuple[int, int, int]:
    """Walk the subtrees below `roots` from lexer state `start`.

    Finds every token whose bytes below its root keep the lexer alive: the first `len(ids)` of them are
    written to `ids`; past that, all of them are set in `out` (uint32 words) instead. Records in
    `b_nodes`/`b_states` each node with children where the lexer accepts (a lexeme may end there).
    Returns (number of boundaries, or -1 if the buffers were too small; tokens found; trie nodes visited).
    """
    states = np.empty(max_depth + 2, dtype=np.int32)
    nb = 0
    visited = 0
    cap = b_nodes.shape[0]
    n_ids = ids.shape[0]
    n_tok = 0
    for r in range(roots.shape[0]):
        root = roots[r]
        states[node_depth[root]] = start
        i = root + 1
        end = node_end[root]
        while i < end:
            visited += 1
            depth = node_depth[i]
            s = transitions[states[depth - 1], node_byte[i]]
            if s < 0:
                i = node_end[i]
                continue
            for k in range(token_start[i], token_start[i + 1]):
                t = token_ids[k]
                if n_tok < n_ids:
                    ids[n_tok] = t
                else:
                    if n_tok == n_ids:  # too many for ids: move them to the mask
                        for q in range(n_ids):
                            u = ids[q]
                            out[u >> 5] |= np.uint32(1) << np.uint32(u & 31)
                    out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
                n_tok += 1
            if accepting[s] and node_end[i] > i + 1:
                if nb >= cap:
                    return -1, n_tok, visited
                b_nodes[nb] = i
                b_states[nb] = s
                nb += 1
            states[depth] = s
            i += 1
    return nb, n_tok, visited


@njit(nogil=True, cache=True)
def or_ids(out: np.ndarray, ids: np.ndarray) -> None:
    """Set the bits of `ids` in the uint32 words `out`."""
    for k in range(ids.shape[0]):
        t = ids[k]
        out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)


class WalkResult:
    """What one frontier walk found: the allowed tokens (mask or ids), the next frontiers by accept set."""

    __slots__ = ("words", "ids", "groups", "visited")

    def __init__(
        self, words: np.ndarray | None, ids: np.ndarray | None, groups: list[tuple[tuple, Frontier]]
    ):
        self.words = words
        self.ids = ids
        self.groups = groups
        self.visited = 0  # trie nodes the walk visited: its cost, for the per-step work bound

    def apply(self, out: np.ndarray) -> None:
        """OR the allowed tokens into `out` (uint32 words)."""
        if self.words is not None:
            np.bitwise_or(out, self.words, out=out)
        elif self.ids is not None:
            or_ids(out, self.ids)


class Frontier:
    """A set of trie nodes to walk on from (the root alone, or where a lexeme may end inside tokens)."""

    __slots__ = ("nodes", "cache")

    def __init__(self, nodes: np.ndarray):
        self.nodes = nodes
        self.cache: dict[tuple[int, int], WalkResult] = {}

    def walk(self, lexer: Lexer, state: int, vocab: Vocabulary) -> WalkResult:
        """The (cached) walk of this frontier's subtrees through `lexer` from `state`."""
        key = (id(lexer), state)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        trie = vocab.trie
        words = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.uint32)
        ids = np.empty(SPARSE_IDS, dtype=np.int32)
        cap = 4096
        while True:
            b_nodes = np.empty(cap, dtype=np.int32)
            b_states = np.empty(cap, dtype=np.int32)
            nb, n_tok, visited = _walk(
                lexer.transitions,
                lexer.accepting,
                state,
                self.nodes,
                *trie.walk_arrays,
                words,
                ids,
                b_nodes,
                b_states,
            )
            if nb >= 0:
                break
            words[:] = 0
            cap = trie.n_nodes
        # Nested roots can reach the same boundary node twice: keep each node once per accept set.
        groups: dict[tuple[int, ...], set[int]] = {}
        for node, s in zip(b_nodes[:nb].tolist(), b_states[:nb].tolist(), strict=True):
            groups.setdefault(lexer.accepts[s], set()).add(node)
        result_groups = [
            (acc, Frontier(np.asarray(sorted(nodes), dtype=np.int32))) for acc, nodes in groups.items()
        ]
        if n_tok == 0:
            result = WalkResult(None, None, result_groups)
        elif n_tok <= SPARSE_IDS:
            result = WalkResult(None, ids[:n_tok].copy(), result_groups)
        else:
            words.setflags(write=False)
            result = WalkResult(words, None, result_groups)
        result.visited = visited
        return self.cache.setdefault(key, result)


_roots: dict[str, Frontier] = {}


def root_frontier(vocab: Vocabulary) -> Frontier:
    """The frontier of the trie's root for `vocab` (shared: its walk cache serves every grammar)."""
    hit = _roots.get(vocab.fingerprint)
    if hit is None:
        hit = _roots.setdefault(vocab.fingerprint, Frontier(np.zeros(1, dtype=np.int32)))
    return hit


def check_states(n: int, limit: int, what: str) -> None:
    """Raise `CompileLimitError` if `n > limit` (a bound on per-step work)."""
    if n > limit:
        raise CompileLimitError(f"{what}: {n} exceeds the limit {limit}")
