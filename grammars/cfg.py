"""Context-free grammars as token constraints: `GrammarConstraint` (a `GrammarIR`), its compiled form, and
`GrammarMatcher`, the per-sequence state.

A matcher state is a small set of *threads* `(earley_state, lexer, lexer_state)`: the parse up to the last
lexeme boundary, one of the lexers for the terminals it allows, and how far the current lexeme has got in it
(`FRESH` = no byte of it yet). Each wide terminal (a string, free text) has a lexer of its own, shared by
every place and grammar that allows it, and the other terminals share one (`CompiledGrammar.views`). Several
threads also exist where the input is lexically ambiguous (a lexeme may end here or go on). A token is
allowed iff, from some thread, its bytes can be split into lexeme continuations the lexer keeps alive and
lexemes the parser accepts.

Masks: each thread walks the vocabulary trie from the root through its lexer (a cached, parser-independent
walk); where a lexeme can end inside a token, the parser is advanced once for that group of boundaries and the
walk goes on from those trie nodes with the next lexers (also cached). The walk results behind one set of
threads are cached too (`threads_fill`): parse states are shared, so the same threads recur at the same place
of every instance. See docs/grammar.md.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from constrain.bitmask import row_view
from constrain.constraint import CompiledConstraint, Constraint, Matcher
from constrain.errors import CompileLimitError
from constrain.vocab import Vocabulary

from .earley import EarleyState, Grammar, GrammarIR
from .lexer import Lexer, WalkResult, lexer_for, or_ids, root_frontier

FRESH = -2  # lexer position of a thread that has read no byte of its current lexeme
MAX_THREADS = 512  # lexically ambiguous threads kept per position
MAX_FILL_STEPS = 200_000  # (parser state, frontier) pairs visited by one mask fill
MAX_FILL_NODES = 50_000_000  # trie nodes walked (uncached walks) by one mask fill, ~ a few seconds
MAX_CACHED_FILLS = 50_000  # fills kept per grammar and vocabulary (the cache is emptied when full)

WIDE_BYTES = 64  # a terminal with a state that goes on with this many bytes gets a lexer of its own
Thread = tuple[EarleyState, "LexerView", int]


class LexerView:
    """A shared `Lexer` seen from one grammar: its terminal indices mapped to the grammar's terminal ids."""

    __slots__ = ("lexer", "terms", "_acc")

    def __init__(self, lexer: Lexer, terms: tuple[int, ...]):
        self.lexer = lexer
        self.terms = terms
        self._acc: dict[tuple[int, ...], frozenset[int]] = {}

    def grammar_terms(self, local: tuple[int, ...]) -> frozenset[int]:
        """The grammar's terminal ids for a tuple of this lexer's terminal indices."""
        hit = self._acc.get(local)
        if hit is None:
            hit = self._acc[local] = frozenset(self.terms[j] for j in local)
        return hit

    def accepted(self, state: int) -> frozenset[int]:
        """The grammar terminals that accept in lexer `state` (empty for `FRESH`)."""
        if state < 0:
            return frozenset()
        return self.grammar_terms(self.lexer.accepts[state])


class CompiledGrammar:
    """A `Grammar` plus its lexer views (vocabulary-independent; shared by the per-vocabulary forms)."""

    def __init__(self, ir: GrammarIR):
        self.grammar = Grammar(ir)
        self._views: dict[frozenset[int], tuple[LexerView, ...]] = {}
        self._parts: dict[frozenset[int], LexerView] = {}
        self._wide: dict[int, bool] = {}
        self._fills: dict[str, dict[tuple, Fill]] = {}  # per vocabulary: see `threads_fill`
        self._lock = threading.Lock()

    def views(self, state: EarleyState, exclude: frozenset[int] = frozenset()) -> tuple[LexerView, ...]:
        """The lexers for the terminals `state` allows (plus the ignored ones), less `exclude`.

        Each wide terminal (one that can go on with many different bytes: strings, free text) gets a lexer of
        its own, and the others share one. A wide terminal's walks cost the most (they visit much of the
        vocabulary trie), and alone its lexer is the same at every place and in every grammar that allows
        it, so its walks are cached once instead of once per combination of terminals.
        """
        g = self.grammar
        allowed = (state.expected | g.ignore) - exclude
        hit = self._views.get(allowed)
        if hit is not None:
            return hit
        wide = sorted(t for t in allowed if self._is_wide(t))
        parts = [frozenset((t,)) for t in wide]
        rest = allowed.difference(wide)
        if rest or not parts:  # no terminal at all: one dead lexer (the thread keeps the parse state)
            parts.append(rest)
        views = tuple(self._part(terms) for terms in parts)
        with self._lock:
            return self._views.setdefault(allowed, views)

    def _is_wide(self, t: int) -> bool:
        hit = self._wide.get(t)
        if hit is None:
            hit = self._wide[t] = self.grammar.dfas[t].max_live_bytes >= WIDE_BYTES
        return hit

    def _part(self, terms: frozenset[int]) -> LexerView:
        hit = self._parts.get(terms)
        if hit is not None:
            return hit
        g = self.grammar
        ordered = sorted(terms, key=lambda t: (g.ir.terminals[t].pattern, g.ir.terminals[t].flags, t))
        keys = tuple((g.ir.terminals[t].pattern, g.ir.terminals[t].flags) for t in ordered)
        lexer = lexer_for(keys, [g.dfas[t] for t in ordered])
        view = LexerView(lexer, tuple(ordered))
        with self._lock:
            return self._parts.setdefault(terms, view)

    def fills(self, vocab: Vocabulary) -> dict[tuple, Fill]:
        """The cache of `Fill`s for `vocab` (walk results depend on the vocabulary)."""
        hit = self._fills.get(vocab.fingerprint)
        if hit is None:
            with self._lock:
                hit = self._fills.setdefault(vocab.fingerprint, {})
        return hit

    def fresh_threads(self, state: EarleyState, exclude: frozenset[int] = frozenset()) -> list[Thread]:
        """The threads at the start of a lexeme after `state`: one per lexer of `views(state, exclude)`."""
        return [(state, view, FRESH) for view in self.views(state, exclude)]

    def initial_threads(self) -> tuple[Thread, ...]:
        return tuple(self.fresh_threads(self.grammar.root))


def advance(cg: CompiledGrammar, threads: tuple[Thread, ...], data: bytes) -> tuple[Thread, ...]:
    """The threads after reading `data` (empty if some byte cannot continue any thread).

    Raises `CompileLimitError` if lexical ambiguity exceeds `MAX_THREADS` threads.
    """
    for byte in data:
        nxt: dict[tuple[int, int, int], Thread] = {}
        for state, view, pos in threads:
            lexer = view.lexer
            s = lexer.row(0 if pos == FRESH else pos)[byte]
            if s < 0:
                continue
            nxt.setdefault((id(state), id(view), s), (state, view, s))
            if lexer.accepting[s]:
                for after in state.after(view.accepted(s)):
                    for thread in cg.fresh_threads(after):
                        nxt.setdefault((id(after), id(thread[1]), FRESH), thread)
        if len(nxt) > MAX_THREADS:
            raise CompileLimitError(f"more than {MAX_THREADS} lexically ambiguous parses at one position")
        threads = tuple(nxt.values())
        if not threads:
            return ()
    return threads


def threads_accepting(threads: tuple[Thread, ...]) -> bool:
    """True if the input so far is a complete sentence (some thread can end its lexeme and the parse here)."""
    for state, view, pos in threads:
        if pos == FRESH:
            if state.accepting:
                return True
        elif view.lexer.accepting[pos]:
            if any(after.accepting for after in state.after(view.accepted(pos))):
                return True
    return False


class Fill:
    """The walk results whose union is the mask after one set of threads (see `threads_fill`).

    The sparse results are merged into one id array; the dense ones are kept as they are (shared with the
    walk results, not copied). `threads` keeps the threads alive: the cache of fills is keyed by their ids.
    """

    __slots__ = ("threads", "dense", "ids")

    def __init__(self, threads: tuple[Thread, ...], results: list[WalkResult]):
        self.threads = threads
        self.dense = tuple(r.words for r in results if r.words is not None)
        sparse = [r.ids for r in results if r.ids is not None]
        # Repeated ids are harmless (setting a bit twice): no sort, no copy of a lone array.
        self.ids = (sparse[0] if len(sparse) == 1 else np.concatenate(sparse)) if sparse else None

    def write(self, out: np.ndarray) -> None:
        """Set `out` (uint32 words) to exactly these tokens."""
        if self.dense:
            np.copyto(out, self.dense[0])
            for words in self.dense[1:]:
                np.bitwise_or(out, words, out=out)
        else:
            out[:] = 0
        if self.ids is not None:
            or_ids(out, self.ids)

    def apply(self, out: np.ndarray) -> None:
        """OR these tokens into `out` (uint32 words)."""
        for words in self.dense:
            np.bitwise_or(out, words, out=out)
        if self.ids is not None:
            or_ids(out, self.ids)


def fill_words(cg: CompiledGrammar, vocab: Vocabulary, threads: tuple[Thread, ...], out: np.ndarray) -> None:
    """OR into `out` (uint32 words) every ordinary token allowed after `threads`."""
    threads_fill(cg, vocab, threads).apply(out)


def threads_fill(cg: CompiledGrammar, vocab: Vocabulary, threads: tuple[Thread, ...]) -> Fill:
    """The (cached) `Fill` of every ordinary token allowed after `threads`.

    Parse states are shared (`EarleyState.after` is cached), so the same threads come back at the same
    place of every instance of a grammar: the traversal below then runs once per distinct set of threads.
    """
    fills = cg.fills(vocab)
    key = tuple([(id(state), id(view), pos) for state, view, pos in threads])
    hit = fills.get(key)
    if hit is None:
        hit = Fill(threads, _walk_results(cg, vocab, threads))
        if len(fills) >= MAX_CACHED_FILLS:
            fills.clear()
        fills[key] = hit
    return hit


def _walk_results(cg: CompiledGrammar, vocab: Vocabulary, threads: tuple[Thread, ...]) -> list[WalkResult]:
    """The walk results whose union is the set of tokens allowed after `threads`.

    Raises `CompileLimitError` past `MAX_FILL_STEPS` (parser state, frontier) pairs or `MAX_FILL_NODES`
    trie nodes walked.
    """
    root = root_frontier(vocab)
    stack = [(state, view, pos, root) for state, view, pos in threads]
    seen: set[tuple[int, int, int, int]] = set()
    results: dict[int, WalkResult] = {}
    steps = 0
    nodes = 0
    while stack:
        state, view, pos, frontier = stack.pop()
        key = (id(state), id(view), pos, id(frontier))
        if key in seen:
            continue
        seen.add(key)
        steps += 1
        if steps > MAX_FILL_STEPS:
            raise CompileLimitError(f"a mask needed more than {MAX_FILL_STEPS} parser/trie steps")
        cached = (id(view.lexer), 0 if pos == FRESH else pos) in frontier.cache
        result = frontier.walk(view.lexer, 0 if pos == FRESH else pos, vocab)
        if not cached:
            nodes += result.visited
            if nodes > MAX_FILL_NODES:
                raise CompileLimitError(
                    f"a mask needed more than {MAX_FILL_NODES} trie nodes walked (a grammar where lexemes "
                    "can end almost anywhere, e.g. two identifiers side by side?)"
                )
        results[id(result)] = result
        closed = cg.grammar.closed_ignore
        for local, child in result.groups:
            terms = view.grammar_terms(local)
            for after in state.after(terms):
                # After an ignored lexeme closed under concatenation, another one of it adds nothing new.
                skip = terms & closed if after is state else frozenset()
                stack.extend((after, v, FRESH, child) for v in cg.views(after, skip))
    return list(results.values())


class GrammarConstraint(Constraint):
    """A context-free grammar (`GrammarIR`) as a token constraint.

    Args:
        ir: the grammar.
        label: a short description for messages (e.g. the file name).
    """

    def __init__(self, ir: GrammarIR, label: str = "grammar"):
        self.ir = ir
        self.label = label
        self._core: CompiledGrammar | None = None

    def cache_key(self) -> object:
        return self.ir

    @property
    def core(self) -> CompiledGrammar:
        """The vocabulary-independent compiled grammar (built on first use; raises `ConstraintError`)."""
        if self._core is None:
            self._core = _core_for(self.ir)
        return self._core

    def _compile(self, vocab: Vocabulary) -> CompiledGrammarConstraint:
        return CompiledGrammarConstraint(self.core, vocab)

    def __repr__(self) -> str:
        return f"GrammarConstraint({self.label})"


_cores: dict[GrammarIR, CompiledGrammar] = {}
_cores_lock = threading.Lock()


def _core_for(ir: GrammarIR) -> CompiledGrammar:
    hit = _cores.get(ir)
    if hit is None:
        hit = CompiledGrammar(ir)
        with _cores_lock:
            hit = _cores.setdefault(ir, hit)
            while len(_cores) > 512:
                _cores.pop(next(iter(_cores)))
    return hit


class CompiledGrammarConstraint(CompiledConstraint):
    """A grammar compiled against one vocabulary."""

    def __init__(self, core: CompiledGrammar, vocab: Vocabulary):
        self.core = core
        self.vocab = vocab
        self.words = (vocab.vocab_size + 31) // 32

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self, self.core.initial_threads())


class GrammarMatcher(Matcher):
    """Matching state for one sequence (see the module docstring)."""

    def __init__(self, compiled: CompiledGrammarConstraint, threads: tuple[Thread, ...]):
        self.compiled = compiled
        self.vocab = compiled.vocab
        # One entry per accepted token: (threads, terminated); the first is the start.
        self._history: list[tuple[tuple[Thread, ...], bool]] = [(threads, False)]

    @property
    def threads(self) -> tuple[Thread, ...]:
        """The current threads (see the module docstring)."""
        return self._history[-1][0]

    def fill_words(self, out: np.ndarray) -> None:
        """Write the allowed-token words (uint32, zeroed first) for the current state, EOS included."""
        terminated = self.is_terminated()
        if terminated:
            out[:] = 0
        else:
            threads_fill(self.compiled.core, self.vocab, self.threads).write(out)
        if terminated or threads_accepting(self.threads):
            for t in self.vocab.eos_ids:
                out[t >> 5] |= np.uint32(1 << (t & 31))

    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        self.fill_words(row_view(bitmask, row, self.vocab.vocab_size))

    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        if token in self.vocab.eos_ids:
            if not self.is_accepting():
                return False
            self._history.append((self.threads, True))
            return True
        if self.is_terminated() or token in self.vocab.special_ids or token >= self.vocab.n_tokens:
            return False
        data = self.vocab.token_bytes[token]
        return bool(data) and self.accept_bytes(data)

    def accept_bytes(self, data: bytes) -> bool:
        """Advance by raw bytes (not a token); False (state unchanged) if they cannot continue the text.

        Counts as one step for `rollback`.
        """
        if self.is_terminated():
            return False
        threads = advance(self.compiled.core, self.threads, data)
        if not threads:
            return False
        self._history.append((threads, False))
        return True

    def next_bytes(self) -> np.ndarray:
        """Bool (256,): the bytes that can come next (each keeps some lexer thread alive, hence viable)."""
        out = np.zeros(256, dtype=bool)
        if self.is_terminated():
            return out
        for _, view, pos in self.threads:
            out |= view.lexer.transitions[0 if pos == FRESH else pos] >= 0
        return out

    def forced_bytes(self, max_bytes: int = 256) -> bytes:
        """Jump-forward: the bytes every continuation must start with (empty if EOS or a choice comes first).

        The state is unchanged. At most `max_bytes` are returned.
        """
        probe = self.fork()
        out = bytearray()
        while len(out) < max_bytes and not probe.is_accepting():
            nxt = np.flatnonzero(probe.next_bytes())
            if len(nxt) != 1:
                break
            out.append(int(nxt[0]))
            probe.accept_bytes(bytes(out[-1:]))
        return bytes(out)

    def forced_tokens(self, max_bytes: int = 256) -> list[int]:
        """Jump-forward tokens: the forced bytes split greedily (longest token first), without the last token,
        which a longer token reaching past the forced bytes could span (so the tokenization at the boundary
        stays the model's choice). Every returned token is accepted in order from the current state."""
        data = self.forced_bytes(max_bytes)
        longest = self.vocab.trie.max_depth
        tokens: list[int] = []
        i = 0
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                try:
                    t = self.vocab.token_id(data[i : i + n])
                except KeyError:
                    continue
                if t not in self.vocab.special_ids:
                    tokens.append(t)
                    i += n
                    break
            else:
                return tokens[:-1]  # a byte no token spells alone: stop before it
        return tokens[:-1]

    def rollback(self, n: int = 1) -> None:
        self._check_rollback(n, len(self._history) - 1)
        del self._history[len(self._history) - n :]

    def fork(self) -> GrammarMatcher:
        clone = GrammarMatcher(self.compiled, self.threads)
        clone._history = list(self._history)
        return clone

    def is_accepting(self) -> bool:
        return self.is_terminated() or threads_accepting(self.threads)

    def is_terminated(self) -> bool:
        return self._history[-1][1]
