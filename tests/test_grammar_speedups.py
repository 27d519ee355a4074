"""The grammar engine's fast paths checked against slow, plain reference implementations and brute force.

* `grammars.product`: the numba product construction (lexers, and the binary and/minus products of
  `json_schema.product_dfa`) against the former pure-Python constructions, and against the languages
  themselves on every short string.
* `terminals.pattern_dfa` on finite patterns (JSON keys, enums): a trie instead of the NFA route.
* `dfa._subsets` (numba subset construction) against the plain-Python construction it replaced.
* `lexer.Frontier.walk`: the token ids the numba walk records (sparse results), and the mask it falls back
  to past `SPARSE_IDS`, against running each token's bytes through the lexer.
* walks derived from a base lexer's (`product.set_base`: strings minus names, long counted repeats) against
  brute force on random automata and frontiers, and against the plain walk on a real vocabulary.
* Earley states interned by kernel against a parser that builds every state afresh.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from constrain.errors import CompileLimitError
from constrain.grammars import dfa as dfa_mod
from constrain.grammars import lexer as lexer_mod
from constrain.grammars import product as product_mod
from constrain.grammars import terminals
from constrain.grammars.dfa import ByteDFA, minimize
from constrain.grammars.json_schema import product_dfa
from constrain.grammars.lexer import Frontier, Lexer
from constrain.grammars.product import product
from constrain.grammars.terminals import pattern_dfa
from constrain.vocab import Vocabulary

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ALPHABET = (97, 98, 99, 0xC3)  # a, b, c and a byte that no ASCII pattern uses
SHORT = [bytes(w) for n in range(5) for w in itertools.product(ALPHABET, repeat=n)]


# -- random DFAs -------------------------------------------------------------------------------------------
@st.composite
def dfas(draw: st.DrawFn) -> ByteDFA:
    """A minimal `ByteDFA` over `ALPHABET` with up to 5 states (sometimes the empty language)."""
    n = draw(st.integers(1, 5))
    table = np.full((n, 256), -1, dtype=np.int32)
    for s in range(n):
        for b in ALPHABET:
            table[s, b] = draw(st.integers(-1, n - 1))
    accepting = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return minimize(table, accepting, 0, np.arange(256))


# -- references: the constructions the numba kernel replaced (pure Python/numpy, as they were) ------------
def reference_lexer(automata: list[ByteDFA]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    start = tuple((j, d.start) for j, d in enumerate(automata) if d.start >= 0)
    ids = {start: 0}
    tuples = [start]
    rows = []
    i = 0
    while i < len(tuples):
        tup = tuples[i]
        row = np.full(256, -1, dtype=np.int32)
        for b in range(256):
            key = tuple(
                (j, int(automata[j].transitions[s, b])) for j, s in tup if automata[j].transitions[s, b] >= 0
            )
            if key:
                row[b] = ids.setdefault(key, len(ids))
                if row[b] == len(tuples):
                    tuples.append(key)
        rows.append(row)
        i += 1
    accepts = [tuple(j for j, s in tup if automata[j].accepting[s]) for tup in tuples]
    return np.stack(rows), accepts


def reference_product_dfa(a: ByteDFA, b: ByteDFA, mode: str) -> ByteDFA:
    if a.start < 0 or (mode == "and" and b.start < 0):
        return ByteDFA.empty()
    ids = {(a.start, b.start): 0}
    pairs = [(a.start, b.start)]
    rows = []
    i = 0
    while i < len(pairs):
        p, q = pairs[i]
        row = np.full(256, -1, dtype=np.int32)
        for byte in range(256):
            p2 = int(a.transitions[p, byte])
            q2 = int(b.transitions[q, byte]) if q >= 0 else -1
            if p2 < 0 or (mode == "and" and q2 < 0):
                continue
            row[byte] = ids.setdefault((p2, q2), len(ids))
            if row[byte] == len(pairs):
                pairs.append((p2, q2))
        rows.append(row)
        i += 1
    if mode == "and":
        acc = [bool(a.accepting[p]) and q >= 0 and bool(b.accepting[q]) for p, q in pairs]
    else:
        acc = [bool(a.accepting[p]) and not (q >= 0 and b.accepting[q]) for p, q in pairs]
    return minimize(np.stack(rows), np.asarray(acc), 0, np.arange(256))


def canonical(transitions: np.ndarray, labels: list) -> tuple:
    """The automaton renumbered breadth-first from state 0 in byte order, with each state's label."""
    if transitions.shape[0] == 0:
        return ()
    order = {0: 0}
    todo = [0]
    out = []
    while todo:
        s = todo.pop(0)
        row = []
        for t in transitions[s].tolist():
            if t >= 0 and t not in order:
                order[t] = len(order)
                todo.append(t)
            row.append(order[t] if t >= 0 else -1)
        out.append((tuple(row), labels[s]))
    return tuple(out)


def run(transitions: np.ndarray, data: bytes) -> int:
    s = 0
    for byte in data:
        s = int(transitions[s, byte])
        if s < 0:
            return -1
    return s


# -- products ----------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(dfas(), min_size=1, max_size=4))
def test_numba_lexer_product_equals_the_reference_construction(automata):
    """For any terminal DFAs, `Lexer` builds the same automaton (up to numbering) with the same accept sets
    as the pure-Python product, and each state's accept set is exactly the terminals matching its input."""
    lexer = Lexer(automata)
    ref_trans, ref_accepts = reference_lexer(automata)
    assert canonical(lexer.transitions, lexer.accepts) == canonical(ref_trans, ref_accepts)
    for w in SHORT:
        s = run(lexer.transitions, w)
        alive = [j for j, d in enumerate(automata) if d.start >= 0 and d.run(d.start, w) >= 0]
        assert (s >= 0) == (bool(alive) or w == b"")  # state 0 exists even when nothing is alive
        if s >= 0:
            assert lexer.accepts[s] == tuple(j for j, d in enumerate(automata) if d.matches(w))
            assert bool(lexer.accepting[s]) == any(d.matches(w) for d in automata)
            assert lexer.row(s) == tuple(lexer.transitions[s].tolist())


@SETTINGS
@given(dfas(), dfas(), st.sampled_from(["and", "minus"]))
def test_numba_binary_product_equals_the_reference_and_the_language_operation(a, b, mode):
    """`product_dfa(a, b, mode)` is the minimal DFA of L(a) ∩ L(b) or L(a) \\ L(b): the same automaton as the
    reference construction, and the right verdict on every string of up to 4 bytes."""
    got = product_dfa(a, b, mode)
    ref = reference_product_dfa(a, b, mode)
    assert canonical(got.transitions, got.accepting.tolist()) == canonical(
        ref.transitions, ref.accepting.tolist()
    )
    for w in SHORT:
        want = a.matches(w) and (b.matches(w) if mode == "and" else not b.matches(w))
        assert got.matches(w) == want


def test_products_of_real_terminals_equal_the_reference():
    """JSON-ish terminals (Unicode strings, numbers, keywords, whitespace): same lexers, same differences."""
    patterns = [
        r'"(?:[^"\\]|\\.)*"',
        r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?",
        r"[ \t\n]+",
        "true",
        r"\w+",
        "abc|abd",
    ]
    automata = [pattern_dfa(p) for p in patterns]
    for r in (2, 3, 6):
        for combo in itertools.combinations(automata, r):
            lexer = Lexer(list(combo))
            assert canonical(lexer.transitions, lexer.accepts) == canonical(*reference_lexer(list(combo)))
    names = pattern_dfa('"(?:abc|abd|x)"')
    for mode in ("and", "minus"):
        got, ref = product_dfa(automata[0], names, mode), reference_product_dfa(automata[0], names, mode)
        assert canonical(got.transitions, got.accepting.tolist()) == canonical(
            ref.transitions, ref.accepting.tolist()
        )


def test_product_past_its_state_bound_raises_compile_limit_error():
    automata = [pattern_dfa("[ab]{0,40}"), pattern_dfa("[bc]{0,40}")]
    assert product(automata, max_states=10_000, what="x").n_states > 40
    with pytest.raises(CompileLimitError, match="the test automaton needs more than 40 states"):
        product(automata, max_states=40, what="the test automaton")


def test_a_product_with_no_live_component_is_one_dead_state():
    lexer = Lexer([ByteDFA.empty(), ByteDFA.empty()])
    assert lexer.n_states == 1 and (lexer.transitions == -1).all() and lexer.accepts == [()]


# -- walks -------------------------------------------------------------------------------------------------
TOKENS = [bytes(w) for n in (1, 2, 3) for w in itertools.product(b"abc", repeat=n)] + [b"\xc3\xa9", b"<eos>"]
VOCAB = Vocabulary(TOKENS, special_ids=[len(TOKENS) - 1], eos_ids=[len(TOKENS) - 1], name="abc")


def walked_tokens(frontier: Frontier, lexer: Lexer, state: int) -> set[int]:
    result = frontier.walk(lexer, state, VOCAB)
    out = np.zeros((VOCAB.vocab_size + 31) // 32, dtype=np.uint32)
    result.apply(out)
    bits = np.unpackbits(out.view(np.uint8), bitorder="little")[: VOCAB.vocab_size]
    return set(np.flatnonzero(bits).tolist())


@pytest.mark.parametrize("sparse_ids", [0, 3, 1024])
@SETTINGS
@given(automata=st.lists(dfas(), min_size=1, max_size=3), data=st.data())
def test_walk_records_exactly_the_tokens_the_lexer_keeps_alive(sparse_ids, automata, data, monkeypatch):
    """From any lexer state, the root walk allows exactly the ordinary tokens whose bytes keep the lexer
    alive, whether they are recorded as ids (up to SPARSE_IDS of them) or as a mask past that."""
    monkeypatch.setattr(lexer_mod, "SPARSE_IDS", sparse_ids)
    lexer = Lexer(automata)
    state = data.draw(st.integers(0, lexer.n_states - 1))
    frontier = Frontier(np.zeros(1, dtype=np.int32))
    want = set()
    for t, tok in enumerate(TOKENS[:-1]):
        s = state
        for byte in tok:
            s = int(lexer.transitions[s, byte])
            if s < 0:
                break
        if s >= 0:
            want.add(t)
    assert walked_tokens(frontier, lexer, state) == want


# -- finite patterns: the trie fast path of pattern_dfa ---------------------------------------------------
def nfa_route_dfa(pattern: str) -> ByteDFA:
    """The DFA of `pattern` built the general way (Thompson NFA, subsets, minimisation)."""
    tree = terminals.sre_parse.parse(pattern, 0)
    low = terminals._Lowering(pattern, "test")
    start = low.nfa.add_state()
    end = low.seq(list(tree), tree.state.flags, start)
    return ByteDFA.from_nfa(low.nfa, start, end, max_states=100_000)


ATOMS = ["a", "b", "é", "日", r"\-", "[ab]", "[a-c]", "[é-ë]", "(?:a|bc)", "(?:)", "\ud800", r"\\u00[eE]9"]
piece = st.tuples(st.sampled_from(ATOMS), st.sampled_from(["", "?", "{2}", "{0,2}", "{1,3}"])).map("".join)
sequence = st.lists(piece, min_size=1, max_size=4).map("".join)
finite_patterns = st.lists(sequence, min_size=1, max_size=3).map("|".join) | st.tuples(
    st.lists(sequence, min_size=1, max_size=2).map("|".join), st.sampled_from(["", "?", "{1,2}"])
).map(lambda t: f"x(?:{t[0]}){t[1]}")


@SETTINGS
@given(finite_patterns)
def test_finite_patterns_get_the_same_minimal_dfa_as_the_nfa_route(pattern):
    """A pattern with finitely many strings (literals, small classes, alternations, bounded repeats, lone
    surrogates included) gets, through the trie fast path, the same minimal DFA as through the NFA."""
    assume(
        terminals._finite_language(list(terminals.sre_parse.parse(pattern, 0))) is not None
    )  # not too many
    fast = terminals.pattern_dfa.__wrapped__(pattern, 0, "test")
    slow = nfa_route_dfa(pattern)
    assert canonical(fast.transitions, fast.accepting.tolist()) == canonical(
        slow.transitions, slow.accepting.tolist()
    )


def test_patterns_with_unbounded_or_large_parts_take_the_nfa_route():
    for pattern in ["a*", "[^a]", r"\w", "a{0,40}b{0,40}", "(?i:ab)", "."]:
        assert terminals._finite_language(list(terminals.sre_parse.parse(pattern, 0))) is None


plain_patterns = st.one_of(
    st.text(st.sampled_from('ab-é日 \n"\\.*[]{}|()?+^$\ud800')).map(re.escape),
    st.lists(st.sampled_from(["a", "b", "é", r"\-", r"\.", r"\ ", r"\é", '"', r"\\", "\ud800"])).map("".join),
)


@SETTINGS
@given(plain_patterns)
def test_literal_patterns_skip_the_parser_and_get_the_same_dfa(pattern):
    """A pattern of plain characters and escaped non-alphanumerics (anything `re.escape` writes) gets,
    without the regex parser, the same minimal DFA as through the NFA (the empty language for a lone
    surrogate), and accepts exactly the string `re` matches."""
    assert terminals._PLAIN.fullmatch(pattern)  # the fast path is the one taken
    fast = terminals.pattern_dfa.__wrapped__(pattern, 0, "test")
    slow = nfa_route_dfa(pattern)
    assert canonical(fast.transitions, fast.accepting.tolist()) == canonical(
        slow.transitions, slow.accepting.tolist()
    )
    text = re.sub(r"\\(.)", r"\1", pattern, flags=re.DOTALL)
    assert re.fullmatch(pattern, text)
    if "\ud800" not in text:
        assert fast.matches(text.encode("utf-8"))


# -- subset construction: the numba kernel against the plain-Python one -----------------------------------
def reference_determinize(
    nfa: dfa_mod.NFA, start: int, accept: int, max_states: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plain-Python subset construction the numba kernel replaced (same outputs, up to numbering)."""
    class_of = dfa_mod._byte_classes(nfa)
    k = int(class_of[-1]) + 1
    cls = class_of.tolist()
    cedges = [[(cls[lo], cls[hi], t) for lo, hi, t in edges] for edges in nfa.edges]
    # A DFA state is the set of "important" NFA states it contains: those with byte edges, and `accept`.
    important = [bool(edges) or s == accept for s, edges in enumerate(nfa.edges)]
    closures: dict[int, frozenset[int]] = {}
    empty: frozenset[int] = frozenset()

    def closure(s: int) -> frozenset[int]:
        hit = closures.get(s)
        if hit is not None:
            return hit
        if not nfa.eps[s]:
            result = frozenset((s,)) if important[s] else empty
        else:
            seen = {s}
            todo = [s]
            while todo:
                for t in nfa.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            result = frozenset(t for t in seen if important[t])
        closures[s] = result
        return result

    move_cache: dict[frozenset[int], frozenset[int]] = {}
    start_set = closure(start)
    ids: dict[frozenset[int], int] = {start_set: 0}
    sets = [start_set]
    rows: list[list[int]] = []
    i = 0
    while i < len(sets):
        edges = [e for s in sets[i] for e in cedges[s]]
        row = [-1] * k
        # Cut the class axis at every edge end; each piece moves to one set of NFA states.
        cuts = sorted({c for lo, hi, _ in edges for c in (lo, hi + 1)})
        pieces: list[set[int]] = [set() for _ in cuts]
        for lo, hi, t in edges:
            for p in range(bisect_left(cuts, lo), bisect_left(cuts, hi + 1)):
                pieces[p].add(t)
        for p, raw in enumerate(pieces):
            if not raw:
                continue
            if len(raw) == 1:
                closed = closure(next(iter(raw)))
            else:
                key = frozenset(raw)
                closed = move_cache.get(key)
                if closed is None:
                    closed = frozenset().union(*(closure(t) for t in raw))
                    move_cache[key] = closed
            j = ids.get(closed)
            if j is None:
                if len(sets) >= max_states:
                    raise CompileLimitError(
                        f"the DFA needs more than max_states={max_states} states (a pattern such as "
                        "(a|b)*a(a|b){40} blows up exponentially); simplify the pattern or raise max_states"
                    )
                j = len(sets)
                ids[closed] = j
                sets.append(closed)
            row[cuts[p] : cuts[p + 1]] = [j] * (cuts[p + 1] - cuts[p])
        rows.append(row)
        i += 1
    accepting = np.fromiter((accept in s for s in sets), dtype=bool, count=len(sets))
    return np.asarray(rows, dtype=np.int32).reshape(len(sets), k), accepting, class_of


regex_atoms = st.sampled_from(["a", "b", "é", "[ab]", "[^a]", ".", r"\w", r"\d", "(?:a|bc)", "[a-c]"])
regex_pieces = st.tuples(regex_atoms, st.sampled_from(["", "?", "*", "+", "{2}", "{0,3}", "{1,2}"])).map(
    "".join
)
regexes = st.lists(st.lists(regex_pieces, min_size=1, max_size=4).map("".join), min_size=1, max_size=3).map(
    "|".join
)


@SETTINGS
@given(regexes)
def test_numba_subset_construction_equals_the_python_one(pattern):
    """For any regex (Unicode classes, loops, alternations), the numba subset construction gives, once
    minimised, the same DFA as the plain-Python construction."""
    tree = terminals.sre_parse.parse(pattern, 0)
    low = terminals._Lowering(pattern, "test")
    start = low.nfa.add_state()
    end = low.seq(list(tree), tree.state.flags, start)
    fast = minimize(*dfa_mod._subsets(low.nfa, start, end, 100_000)[:2], 0, dfa_mod._byte_classes(low.nfa))
    table, accepting, class_of = reference_determinize(low.nfa, start, end, 100_000)
    slow = minimize(table, accepting, 0, class_of)
    assert canonical(fast.transitions, fast.accepting.tolist()) == canonical(
        slow.transitions, slow.accepting.tolist()
    )


def test_subset_construction_past_its_bound_raises_compile_limit_error():
    pattern = "(?:a|b)*a(?:a|b){8}"  # 512 subset states
    tree = terminals.sre_parse.parse(pattern, 0)
    low = terminals._Lowering(pattern, "test")
    start = low.nfa.add_state()
    end = low.seq(list(tree), tree.state.flags, start)
    assert ByteDFA.from_nfa(low.nfa, start, end, max_states=512).n_states == 512
    with pytest.raises(CompileLimitError, match="max_states=100"):
        ByteDFA.from_nfa(low.nfa, start, end, max_states=100)


# -- walks derived from a base lexer's (product.set_base) ------------------------------------------------
def brute_walk(frontier_nodes: list[int], lexer: Lexer, state: int) -> tuple[set[int], dict[tuple, set[int]]]:
    """The tokens and boundaries of a walk, by running each trie node's bytes below each root."""
    trie = VOCAB.trie
    tokens: set[int] = set()
    groups: dict[tuple, set[int]] = {}
    for root in frontier_nodes:
        path: dict[int, int] = {int(trie.node_depth[root]): state}
        for i in range(root + 1, int(trie.node_end[root])):
            depth = int(trie.node_depth[i])
            prev = path.get(depth - 1, -1)
            s = int(lexer.transitions[prev, trie.node_byte[i]]) if prev >= 0 else -1
            path[depth] = s
            if s < 0:
                continue
            tokens.update(trie.token_ids[trie.token_start[i] : trie.token_start[i + 1]].tolist())
            if lexer.accepting[s] and trie.node_end[i] > i + 1:
                groups.setdefault(lexer.accepts[s], set()).add(i)
    return tokens, groups


def walk_sets(result: lexer_mod.WalkResult) -> tuple[set[int], dict[tuple, set[int]]]:
    out = np.zeros((VOCAB.vocab_size + 31) // 32, dtype=np.uint32)
    result.apply(out)
    bits = np.unpackbits(out.view(np.uint8), bitorder="little")[: VOCAB.vocab_size]
    groups: dict[tuple, set[int]] = {}
    for acc, f in result.groups:
        groups.setdefault(acc, set()).update(f.nodes.tolist())
    return set(np.flatnonzero(bits).tolist()), groups


@pytest.mark.parametrize("sparse_ids", [0, 1024])
@SETTINGS
@given(a=dfas(), b=dfas(), hint=st.one_of(st.none(), dfas()), data=st.data())
def test_walks_derived_from_a_base_lexer_equal_brute_force(sparse_ids, a, b, hint, data, monkeypatch):
    """For L = a minus b, hinted to derive its walks from a's (or from an unrelated DFA: the hint must not
    matter), the walk from every state of L's lexer over any frontier (root, nested or not) allows exactly
    the tokens and records exactly the boundaries that running the bytes through L gives."""
    monkeypatch.setattr(lexer_mod, "SPARSE_IDS", sparse_ids)
    minus = product_mod.product_dfa(a, b, "minus", 1000)
    assume(minus.n_states > 0)
    if hint is not None:
        product_mod.set_base(minus, hint)
    lexer = Lexer([minus])
    n_nodes = VOCAB.trie.n_nodes
    roots = data.draw(
        st.just([0]) | st.lists(st.integers(0, n_nodes - 1), min_size=1, max_size=4, unique=True).map(sorted)
    )
    frontier = Frontier(np.asarray(roots, dtype=np.int32))
    for state in range(lexer.n_states):
        assert walk_sets(frontier.walk(lexer, state, VOCAB)) == brute_walk(roots, lexer, state)


def _minus_names_dfa() -> ByteDFA:
    string = pattern_dfa(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt])*"')
    return product_mod.product_dfa(string, pattern_dfa('"name"|"nam"|"x"'), "minus", 1000)


@pytest.mark.parametrize(
    "make", [_minus_names_dfa, lambda: pattern_dfa('"[a-z ]{0,30}"'), lambda: pattern_dfa("x[ab]{2,40}")]
)
def test_hinted_lexer_walks_use_the_base_and_equal_the_plain_walk(make):
    """Lexers whose DFA has a base hint (strings minus names: from the product; a long counted repeat: the
    same pattern unbounded above) derive their walks from the base's; on the GPT-2 vocabulary, every
    state's root walk equals the plain numba walk of the same lexer."""
    from constrain.assets import load_vocabulary

    vocab = load_vocabulary("gpt2")
    minus = make()
    assert product_mod.base_hint(minus) is not None
    derived = Lexer([minus])
    plain = Lexer([minus])
    plain.base_dfa = None
    link = derived.link()
    assert link is not None and (link.base_of >= 0).all()
    root = Frontier(np.zeros(1, dtype=np.int32))
    for state in range(derived.n_states):
        got = root.walk(derived, state, vocab)
        want = root.walk(plain, state, vocab)
        bits = []
        for r in (got, want):
            out = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.uint32)
            r.apply(out)
            bits.append(out)
        assert np.array_equal(bits[0], bits[1]), state
        assert {a: set(f.nodes.tolist()) for a, f in got.groups} == {
            a: set(f.nodes.tolist()) for a, f in want.groups
        }


# -- Earley states interned by kernel ---------------------------------------------------------------------
class _NoInterning(dict):
    """A `Grammar.states` table that never keeps a state: every scan builds a fresh one (the slow path)."""

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        return default

    def setdefault(self, key, default=None):  # noqa: ANN001, ANN201
        return default


SYMBOLS = ["a", "b", "c", "S", "A", "B"]
rules_strategy = st.lists(
    st.tuples(st.sampled_from(["S", "A", "B"]), st.lists(st.sampled_from(SYMBOLS), max_size=3).map(tuple)),
    min_size=1,
    max_size=8,
)


@SETTINGS
@given(rules=rules_strategy, text=st.lists(st.sampled_from("abc"), max_size=12))
def test_interned_earley_states_behave_like_fresh_ones(rules, text):
    """On random grammars (left, right and self recursion, empty rules) and random terminal strings, the
    parser that interns states by kernel expects the same terminals, accepts at the same places and dies at
    the same place as the parser that builds every state afresh."""
    from constrain.errors import SpecError
    from constrain.grammars.earley import Grammar, GrammarIR, Rule, Terminal

    ir = GrammarIR(
        terminals=tuple(Terminal(x, x) for x in "abc"),
        rules=tuple(Rule(lhs, rhs) for lhs, rhs in rules),
        start="S",
    )
    try:
        fast = Grammar(ir)
    except SpecError:
        assume(False)
    slow = Grammar(ir)
    slow.states = _NoInterning()
    ids = {x: i for i, x in enumerate("abc")}
    a, b = fast.root, slow.root
    for x in text:
        assert (a.expected, a.accepting) == (b.expected, b.accepting)
        na, nb = a.after(frozenset({ids[x]})), b.after(frozenset({ids[x]}))
        assert len(na) == len(nb)
        if not na:
            return
        a, b = na[0], nb[0]
    assert (a.expected, a.accepting) == (b.expected, b.accepting)


def test_a_grammar_loop_comes_back_to_the_same_earley_state():
    """In a left-recursive list, the state after each separator is the same object from the second on."""
    from constrain.grammars.earley import Grammar, GrammarIR, Rule, Terminal

    ir = GrammarIR(
        terminals=(Terminal("X", "x"), Terminal("C", ",")),
        rules=(Rule("S", ("X", "T")), Rule("T", ()), Rule("T", ("T", "C", "X"))),
        start="S",
    )
    g = Grammar(ir)
    x, c = frozenset({0}), frozenset({1})
    states = [g.root]
    for t in [x, c, x, c, x, c, x]:
        (nxt,) = states[-1].after(t)
        states.append(nxt)
    assert states[4] is states[2] and states[6] is states[2] and states[5] is states[3]
    assert states[7] is states[3] and states[7].accepting


def reference_item_sets(g, text: list[int]) -> list[tuple[set[tuple[int, int, int]], bool]]:
    """Earley item sets `(rule, dot, origin position)` after each prefix of the terminal ids `text`, by the
    textbook agenda (every item, predicted ones included, goes through it; nullable symbols are advanced at
    prediction), plus whether the prefix is a sentence. Stops after the first empty set."""
    sets: list[set[tuple[int, int, int]]] = []
    out = []
    kernel = {(0, 0, 0)}
    for i in range(len(text) + 1):
        items: set[tuple[int, int, int]] = set()
        agenda = list(kernel)
        while agenda:
            item = agenda.pop()
            if item in items:
                continue
            items.add(item)
            r, d, o = item
            rhs = g.rhs[r]
            if d == len(rhs):
                if o < i:  # complete: advance the items of set `o` waiting for this rule's symbol
                    agenda += [
                        (r2, d2 + 1, o2)
                        for r2, d2, o2 in sets[o]
                        if d2 < len(g.rhs[r2]) and g.rhs[r2][d2] == g.lhs[r]
                    ]
                continue
            sym = rhs[d]
            if sym >= g.n_terminals:
                agenda += [(r2, 0, i) for r2 in g.rules_of.get(sym, ())]
                if sym in g.nullable:
                    agenda.append((r, d + 1, o))
        sets.append(items)
        out.append((items, (0, 1, 0) in items))
        if not items or i == len(text):
            break
        kernel = {(r, d + 1, o) for r, d, o in items if d < len(g.rhs[r]) and g.rhs[r][d] == text[i]}
        if not kernel:
            out.append((set(), False))
            break
    return out


def engine_items(state) -> set[tuple[int, int, int]]:
    """A state's items `(rule, dot, id(origin state))`: the ones waiting for a symbol (the only ones kept)."""
    return {(r, d, id(o)) for r, d, o in state.items()}


@SETTINGS
@given(rules=rules_strategy, text=st.lists(st.sampled_from("abc"), max_size=10))
# Two predictions that reach one non-terminal (B) in the same state: its items must be added once.
@example(
    rules=[("S", ("a", "A")), ("S", ("a", "S")), ("S", ("B",)), ("A", ("B",)), ("B", ("b",))], text=["a"]
)
def test_bulk_predicted_earley_states_hold_the_textbook_items(rules, text):
    """On random grammars (recursion of every kind, empty rules) and random terminal strings, every Earley
    state built with bulk prediction holds exactly the textbook item sets' items that wait for a symbol
    (origins mapped to the states at those positions), expects the same terminals and accepts where the
    textbook parser does."""
    from constrain.errors import SpecError
    from constrain.grammars.earley import Grammar, GrammarIR, Rule, Terminal

    ir = GrammarIR(
        terminals=tuple(Terminal(x, x) for x in "abc"),
        rules=tuple(Rule(lhs, rhs) for lhs, rhs in rules),
        start="S",
    )
    try:
        g = Grammar(ir)
    except SpecError:
        assume(False)
    ids = [{"a": 0, "b": 1, "c": 2}[x] for x in text]
    ref = reference_item_sets(g, ids)
    states = [g.root]
    for t in ids[: len(ref) - 1]:
        states.append(states[-1].scan([t]))
        if states[-1] is None:
            break
    assert len(states) == len(ref)  # both die at the same place, or both read all of `text`
    for state, (items, accepting) in zip(states, ref, strict=True):
        if state is None:
            assert not items
            continue
        waiting = {(r, d, id(states[o])) for r, d, o in items if d < len(g.rhs[r])}
        assert engine_items(state) == waiting
        assert len(state.items()) == len(waiting)  # each item once
        assert state.accepting == accepting
        assert state.expected == frozenset(g.rhs[r][d] for r, d, _ in waiting if g.rhs[r][d] < g.n_terminals)
        assert state.n_items >= len(waiting)
