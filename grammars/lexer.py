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
from .product import base_hint, product

MAX_LEXER_STATES = 50_000
SPARSE_IDS = 1024  # walk results with at most this many tokens are stored as ids, not a full mask
MAX_PAIR_CELLS = 4_000_000  # (lexer state, base state) table cells past which a base hint is not used
NO_DIFFERENCE = np.iinfo(np.int32).max  # the distance of a pair of states with equal languages

_lexers: dict[tuple, Lexer] = {}
_lexers_lock = threading.Lock()
_dfa_lexers: dict[int, tuple[ByteDFA, Lexer]] = {}  # id(dfa) -> (dfa, its one-terminal lexer)


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
        self._rows: list[tuple[int, ...] | None] = [None] * self.n_states
        # A one-terminal lexer whose DFA has a base hint walks by difference from the base's walks.
        self.base_dfa: ByteDFA | None = base_hint(dfas[0]) if len(dfas) == 1 else None
        self._link: BaseLink | None | bool = False  # False: not built yet; None: no usable base

    def row(self, state: int) -> tuple[int, ...]:
        """Row `state` of `transitions` as a tuple (stepping from Python is faster than on numpy rows).

        Rows are converted on first use: a big lexer's whole table costs more than the steps taken in it.
        Tuples, not lists: a tuple of ints stops being tracked by the garbage collector after one pass.
        """
        row = self._rows[state]
        if row is None:
            row = self._rows[state] = tuple(self.transitions[state].tolist())
        return row

    def link(self) -> BaseLink | None:
        """The pairing of this lexer's states with its base lexer's (None without a usable base hint)."""
        if self._link is False:
            self._link = None if self.base_dfa is None else BaseLink.build(self, dfa_lexer(self.base_dfa))
        return self._link

    def __repr__(self) -> str:
        return f"Lexer({self.name}: {self.n_states} states)"


def dfa_lexer(dfa: ByteDFA) -> Lexer:
    """The shared one-terminal lexer of `dfa` (by identity)."""
    hit = _dfa_lexers.get(id(dfa))
    if hit is not None:
        return hit[1]
    lexer = Lexer([dfa], name=f"dfa-{id(dfa)}")
    with _lexers_lock:
        return _dfa_lexers.setdefault(id(dfa), (dfa, lexer))[1]


@njit(nogil=True, cache=True)
def _pair_table(tl, accl, tb, accb, max_pairs):  # noqa: ANN001, ANN202 - numba kernel
    """The pairs (lexer state, base state) read by the same strings, from (0, 0), and per pair the length
    of the shortest string after which the two differ (one alive and the other not, or one accepting and the
    other not; `NO_DIFFERENCE` if none: equal languages).

    Returns (n_pairs or -1 past `max_pairs`, pid: the pair id of cell `q * (nb + 1) + s + 1` (-1: not
    reached), dist (n_pairs,), base_of: per lexer state its one base state, or -1 if it pairs with several
    or with the dead base state).
    """
    nl = tl.shape[0]
    w = tb.shape[0] + 1
    pid = np.full(nl * w, -1, dtype=np.int32)
    pq = np.empty(max_pairs, dtype=np.int32)
    ps = np.empty(max_pairs, dtype=np.int32)
    dist = np.full(max_pairs, NO_DIFFERENCE, dtype=np.int32)
    base_of = np.full(nl, -2, dtype=np.int32)
    pq[0] = 0
    ps[0] = 0
    pid[1] = 0
    n = 1
    i = 0
    while i < n:
        q = pq[i]
        s = ps[i]
        if base_of[q] == -2:
            base_of[q] = s
        elif base_of[q] != s:
            base_of[q] = -1
        if s < 0 or accl[q] != accb[s]:
            dist[i] = 0
        for b in range(256):
            q2 = tl[q, b]
            s2 = tb[s, b] if s >= 0 else -1
            if q2 < 0:
                if s2 >= 0:  # the lexer dies on `b`, the base does not
                    dist[i] = min(dist[i], 1)
                continue
            k = q2 * w + s2 + 1
            if pid[k] < 0:
                if n >= max_pairs:
                    return -1, pid, dist, base_of
                pid[k] = n
                pq[n] = q2
                ps[n] = s2
                n += 1
        i += 1
    # dist(pair) = 1 + the least dist of its successors: breadth-first backwards over reversed edges.
    cnt = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        q, s = pq[i], ps[i]
        for b in range(256):
            q2 = tl[q, b]
            if q2 >= 0:
                cnt[pid[q2 * w + (tb[s, b] if s >= 0 else -1) + 1] + 1] += 1
    for i in range(n):
        cnt[i + 1] += cnt[i]
    preds = np.empty(cnt[n], dtype=np.int32)
    fill = cnt[:n].copy()
    for i in range(n):
        q, s = pq[i], ps[i]
        for b in range(256):
            q2 = tl[q, b]
            if q2 >= 0:
                p = pid[q2 * w + (tb[s, b] if s >= 0 else -1) + 1]
                preds[fill[p]] = i
                fill[p] += 1
    queue = np.empty(n, dtype=np.int32)  # each pair enters once, when its distance is final
    done = np.zeros(n, dtype=np.bool_)
    tail = 0
    for level in (0, 1):  # the seeds: differ at once, or after one byte
        for i in range(n):
            if dist[i] == level and not done[i]:
                done[i] = True
                queue[tail] = i
                tail += 1
    head = 0
    while head < tail:
        p = queue[head]
        head += 1
        for j in range(cnt[p], cnt[p + 1]):
            i = preds[j]
            if dist[p] + 1 < dist[i]:
                dist[i] = dist[p] + 1
            if not done[i] and dist[i] == dist[p] + 1:
                done[i] = True
                queue[tail] = i
                tail += 1
    for q in range(nl):
        if base_of[q] < 0:
            base_of[q] = -1
    return n, pid, dist[:n], base_of


class BaseLink:
    """A lexer paired with its base lexer (`product.set_base`): per lexer state the base state read by the
    same strings, and per pair how many bytes the languages agree for (`_pair_table`): below a trie node
    with no deeper tokens than that, the base's walk stands."""

    __slots__ = ("base", "base_of", "pid", "dist", "width")

    def __init__(self, base: Lexer, base_of: np.ndarray, pid: np.ndarray, dist: np.ndarray):
        self.base = base
        self.base_of = base_of
        self.pid = pid
        self.dist = dist
        self.width = base.n_states + 1

    @classmethod
    def build(cls, lexer: Lexer, base: Lexer) -> BaseLink | None:
        """The link, or None where it cannot help (too big a pair table, or an accept set other than the
        one terminal's)."""
        cells = lexer.n_states * (base.n_states + 1)
        if cells > MAX_PAIR_CELLS or any(len(a) > 1 for a in lexer.accepts + base.accepts):
            return None
        n, pid, dist, base_of = _pair_table(
            lexer.transitions, lexer.accepting, base.transitions, base.accepting, 2 * lexer.n_states + 64
        )
        if n < 0:
            return None
        return cls(base, base_of, pid, dist)


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
def _derived_walk(
    tl: np.ndarray,
    accl: np.ndarray,
    tb: np.ndarray,
    pid: np.ndarray,
    dist: np.ndarray,
    height: np.ndarray,
    q0: int,
    s0: int,
    roots: np.ndarray,
    node_byte: np.ndarray,
    node_depth: np.ndarray,
    node_end: np.ndarray,
    token_start: np.ndarray,
    token_ids: np.ndarray,
    max_depth: int,
    words: np.ndarray,
    base_nodes: np.ndarray,
    drop: np.ndarray,
    b_nodes: np.ndarray,
    b_states: np.ndarray,
) -> tuple[int, int]:
    """Turn the base lexer's walk from `s0` (its tokens in `words`, its boundaries `base_nodes`, sorted)
    into the lexer's walk from `q0`, over subtrees of roots that are not nested in one another.

    Walks the lexer and the base side by side and skips every subtree entered in a pair whose languages
    agree on strings as long as the subtree is deep (`dist` > `height`: the base's verdicts stand there).
    Where the lexer is dead, the subtree's tokens are cleared and its base boundaries dropped; at any other
    node, the node's tokens are set, its base boundary dropped and the lexer's own boundary recorded in
    `b_nodes`/`b_states`.
    Returns (number of boundaries, or -1 if the buffers were too small; trie nodes visited).
    """
    states = np.empty(max_depth + 2, dtype=np.int32)
    bases = np.empty(max_depth + 2, dtype=np.int32)
    w = tb.shape[0] + 1
    nb = 0
    visited = 0
    cap = b_nodes.shape[0]
    for r in range(roots.shape[0]):
        root = roots[r]
        states[node_depth[root]] = q0
        bases[node_depth[root]] = s0
        i = root + 1
        end = node_end[root]
        while i < end:
            visited += 1
            depth = node_depth[i]
            byte = node_byte[i]
            q = tl[states[depth - 1], byte]
            sp = bases[depth - 1]
            s = tb[sp, byte] if sp >= 0 else -1
            if q < 0:
                stop = node_end[i]
                for k in range(token_start[i], token_start[stop]):
                    t = token_ids[k]
                    words[t >> 5] &= ~(np.uint32(1) << np.uint32(t & 31))
                for j in range(np.searchsorted(base_nodes, i), np.searchsorted(base_nodes, stop)):
                    drop[j] = True
                i = stop
                continue
            if dist[pid[q * w + s + 1]] > height[i]:
                i = node_end[i]
                continue
            for k in range(token_start[i], token_start[i + 1]):
                t = token_ids[k]
                words[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
            j = np.searchsorted(base_nodes, i)
            if j < base_nodes.shape[0] and base_nodes[j] == i:
                drop[j] = True
            if accl[q] and node_end[i] > i + 1:
                if nb >= cap:
                    return -1, visited
                b_nodes[nb] = i
                b_states[nb] = q
                nb += 1
            states[depth] = q
            bases[depth] = s
            i += 1
    return nb, visited


@njit(nogil=True, cache=True)
def _heights(node_depth: np.ndarray, node_end: np.ndarray) -> np.ndarray:
    """Per trie node, the most bytes below it to a descendant (0 for a leaf)."""
    n = node_depth.shape[0]
    out = np.zeros(n, dtype=np.int32)
    for i in range(n - 1, -1, -1):  # preorder reversed: children before their parent
        j = i + 1
        while j < node_end[i]:
            out[i] = max(out[i], out[j] + 1)
            j = node_end[j]
    return out


_heights_by_vocab: dict[str, np.ndarray] = {}


def subtree_heights(vocab: Vocabulary) -> np.ndarray:
    """Int32 (n_nodes,): per node of `vocab`'s trie, the depth of its subtree in bytes (cached)."""
    hit = _heights_by_vocab.get(vocab.fingerprint)
    if hit is None:
        hit = _heights(vocab.trie.node_depth, vocab.trie.node_end)
        hit.setflags(write=False)
        hit = _heights_by_vocab.setdefault(vocab.fingerprint, hit)
    return hit


@njit(nogil=True, cache=True)
def _words_to_ids(words: np.ndarray, limit: int) -> tuple[int, np.ndarray]:
    """(number of set bits, their indices if at most `limit`; else `limit + 1` and an empty array)."""
    n = 0
    for x in words:
        while x:
            x &= x - np.uint32(1)
            n += 1
        if n > limit:  # a dense result: counting it all would cost more than the walk
            return limit + 1, np.empty(0, dtype=np.int32)
    ids = np.empty(n, dtype=np.int32)
    k = 0
    for i in range(words.shape[0]):
        x = words[i]
        b = 0
        while x:
            if x & np.uint32(1):
                ids[k] = i * 32 + b
                k += 1
            x >>= np.uint32(1)
            b += 1
    return n, ids


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

    __slots__ = ("nodes", "cache", "_nested")

    def __init__(self, nodes: np.ndarray):
        self.nodes = nodes
        self.cache: dict[tuple[int, int], WalkResult] = {}
        self._nested: bool | None = None

    def nested(self, vocab: Vocabulary) -> bool:
        """True if some node lies in another's subtree (sorted nodes: the next one starts before the end)."""
        if self._nested is None:
            ends = vocab.trie.node_end[self.nodes[:-1]]
            self._nested = bool((self.nodes[1:] < ends).any())
        return self._nested

    def walk(self, lexer: Lexer, state: int, vocab: Vocabulary) -> WalkResult:
        """The (cached) walk of this frontier's subtrees through `lexer` from `state`."""
        key = (id(lexer), state)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        link = lexer.link() if lexer.base_dfa is not None else None
        if link is not None and link.base_of[state] >= 0 and not self.nested(vocab):
            return self.cache.setdefault(key, self._derived(lexer, state, link, vocab))
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

    def _derived(self, lexer: Lexer, state: int, link: BaseLink, vocab: Vocabulary) -> WalkResult:
        """The walk through `lexer` from `state`, derived from the base lexer's walk (`product.set_base`)."""
        s0 = int(link.base_of[state])
        base_cached = (id(link.base), s0) in self.cache
        base = self.walk(link.base, s0, vocab)
        height = subtree_heights(vocab)
        if link.dist[link.pid[state * link.width + s0 + 1]] > int(height[self.nodes].max()):
            return base  # the languages agree on strings as long as any token here: the same walk
        words = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.uint32)
        base.apply(words)
        groups = [(acc, f) for acc, f in base.groups if f.nodes.size]
        base_nodes = np.concatenate([f.nodes for _, f in groups]) if groups else np.zeros(0, np.int32)
        base_nodes.sort()
        drop = np.zeros(base_nodes.size, dtype=np.bool_)
        cap = 4096
        while True:
            b_nodes = np.empty(cap, dtype=np.int32)
            b_states = np.empty(cap, dtype=np.int32)
            nb, visited = _derived_walk(
                lexer.transitions,
                lexer.accepting,
                link.base.transitions,
                link.pid,
                link.dist,
                height,
                state,
                s0,
                self.nodes,
                *vocab.trie.walk_arrays,
                words,
                base_nodes,
                drop,
                b_nodes,
                b_states,
            )
            if nb >= 0:
                break
            words[:] = 0
            base.apply(words)
            drop[:] = False
            cap = vocab.trie.n_nodes
        # One terminal on both sides: every boundary accepts the same set, (0,).
        if not nb and not drop.any() and len(groups) <= 1:
            result_groups = groups  # the base's frontiers themselves (their walk caches shared)
        else:
            nodes = np.union1d(base_nodes[~drop], b_nodes[:nb]).astype(np.int32)  # sorted, each once
            result_groups = [((0,), Frontier(nodes))] if nodes.size else []
        n_tok, ids = _words_to_ids(words, SPARSE_IDS)
        if n_tok == 0:
            result = WalkResult(None, None, result_groups)
        elif n_tok <= SPARSE_IDS:
            result = WalkResult(None, ids, result_groups)
        else:
            words.setflags(write=False)
            result = WalkResult(words, None, result_groups)
        result.visited = visited + (0 if base_cached else base.visited)  # the work bound counts both
        return result


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
