"""Trigger mode: free text until a trigger phrase appears, then an inner constraint, then free text again.

    spec = trigger_mode({"Fact:": trie_constraint("kb/")}, stop=["\\n\\n"], banned=["As an AI"])
    m = spec.compile(vocab).matcher()
    ... decode ...
    m.facts()        # [TriggeredSpan(trigger='Fact:', tokens=(...), text=' Paris is ...', complete=True)]

One Aho-Corasick automaton (built by pyahocorasick) holds every phrase: the triggers (each mapped to its own
inner constraint, any `Constraint` of the core protocol), the stop phrases and the banned phrases. It runs
over the bytes of the output (special tokens have no bytes). The matcher is in one of four modes:

- **free**: every token is allowed except (a) a token whose bytes would complete a banned phrase, and (b) a
  token that would complete a trigger or stop phrase *before its last byte* (so a fact starts on a token
  boundary and nothing follows a stop phrase). A trigger completed by a token's last byte switches to its
  inner constraint; a stop phrase switches to *stopped*. If both end on the same byte, the stop phrase wins;
  of several triggers ending there, the longest.
- **inner**: the trigger's matcher decides (its mask, minus tokens that would complete a banned phrase).
  Triggers and stop phrases do not fire inside. When the inner matcher accepts (the fact is complete), the
  mask is the union of its continuations and the free mask: a token that continues the fact continues it
  (the longest fact wins), any other allowed token ends the fact and is read in free mode. EOS there ends
  the fact and the text.
- **stopped**: only EOS. **done**: EOS was accepted; only EOS (as every terminated matcher).

Banned phrases are exact across token boundaries: the mask of automaton state q bans a token iff stepping its
bytes from q reaches a state whose output set holds a banned phrase. That depends only on q, so each state's
rows are computed once (a numba walk of the vocabulary's byte trie from q, pruning a subtree as soon as a
phrase ends: O(trie nodes), ~1-3 ms) and cached; the automaton has at most (total phrase bytes + 1) states,
so the work is bounded whatever the text. A step then costs a copy of ceil(V/32) words, and `accept` steps
the automaton over the token's bytes. See docs/qa.md.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import ahocorasick
import numba
import numpy as np
import torch

from constrain.bitmask import bitmask_words, row_view
from constrain.constraint import CompiledConstraint, Constraint, Matcher, compile
from constrain.errors import ConstraintError, SpecError
from constrain.vocab import Vocabulary

TRIGGER, STOP, BANNED = "trigger", "stop", "banned"
FREE, INNER, STOPPED, DONE = 0, 1, 2, 3
MODE_NAMES = ("free", "inner", "stopped", "done")
DEFAULT_MAX_CACHED_ROWS = 4096


# ======================================================================================================
# the phrase automaton
# ======================================================================================================
@dataclass(frozen=True)
class PhraseAutomaton:
    """Every phrase in one Aho-Corasick automaton, flattened into a dense byte DFA.

    `delta[q, b]` is the state after byte `b` from state `q` (state 0 = nothing matched). The outputs of a
    state cover every phrase that ends there (its own and those of its failure chain): `banned[q]`,
    `stop[q]`, and `trigger[q]`, the index of the longest trigger ending there (-1 if none).
    `automaton` is the pyahocorasick object itself (for `find`).
    """

    delta: np.ndarray  # int32 (n_states, 256)
    banned: np.ndarray  # bool (n_states,)
    stop: np.ndarray  # bool (n_states,)
    trigger: np.ndarray  # int32 (n_states,)
    fire: np.ndarray  # bool (n_states,): a trigger or a stop phrase ends here
    automaton: ahocorasick.Automaton
    phrases: tuple[tuple[str, int, bytes], ...]  # (kind, index within its kind, bytes)

    @property
    def n_states(self) -> int:
        return int(self.delta.shape[0])

    def step(self, state: int, data: bytes) -> int:
        """The state after `data` from `state`."""
        delta = self.delta
        for b in data:
            state = int(delta[state, b])
        return state

    def find(self, data: bytes) -> list[tuple[int, str, int, bytes]]:
        """Every phrase occurrence in `data` (pyahocorasick's search): (end offset exclusive, kind, index,
        phrase), ordered by end offset."""
        found = [
            (end + 1, kind, index, phrase)
            for end, (kind, index, phrase) in self.automaton.iter(data.decode("latin-1"))
        ]
        return sorted(found, key=lambda hit: (hit[0], -len(hit[3])))


def _as_phrase(phrase: str | bytes, kind: str, i: int) -> bytes:
    if isinstance(phrase, str):
        data = phrase.encode("utf-8")
    elif isinstance(phrase, bytes | bytearray):
        data = bytes(phrase)
    else:
        raise SpecError(f"{kind} phrase #{i} must be str or bytes, got {type(phrase).__name__}")
    if not data:
        raise SpecError(f"{kind} phrase #{i} is empty (a phrase needs at least one byte)")
    return data


def build_automaton(
    triggers: Sequence[str | bytes] = (), stop: Sequence[str | bytes] = (), banned: Sequence[str | bytes] = ()
) -> PhraseAutomaton:
    """Build the phrase automaton with pyahocorasick and flatten it into a dense DFA over bytes.

    pyahocorasick builds the trie and the failure links (`make_automaton`); it has no call to step one byte
    from a saved state, so its graph (`dump()`) is turned into a dense table `delta` (the goto function closed
    under the failure links), which the matcher steps and the mask walk reads from numba. Phrases are bytes
    (str is UTF-8 encoded), mapped 1:1 onto latin-1 characters for pyahocorasick.

    Raises `SpecError` for an empty phrase, a phrase that is not str/bytes, a phrase given twice, or no phrase
    at all.
    """
    entries: list[tuple[str, int, bytes]] = []
    for kind, items in ((TRIGGER, triggers), (STOP, stop), (BANNED, banned)):
        if isinstance(items, str | bytes):
            raise SpecError(f"{kind} phrases must be a list of strings, got a single {type(items).__name__}")
        entries += [(kind, i, _as_phrase(p, kind, i)) for i, p in enumerate(items)]
    if not entries:
        raise SpecError("trigger mode needs at least one trigger, stop or banned phrase")
    automaton = ahocorasick.Automaton()
    seen: dict[bytes, tuple[str, int]] = {}
    for kind, index, data in entries:
        if data in seen:
            other = seen[data]
            raise SpecError(
                f"phrase {data!r} is given twice: as {other[0]} #{other[1]} and as {kind} #{index}"
            )
        seen[data] = (kind, index)
        automaton.add_word(data.decode("latin-1"), (kind, index, data))
    automaton.make_automaton()
    nodes, edges, fails = automaton.dump()
    children: dict[int, dict[int, int]] = {node: {} for node, _ in nodes}
    is_child: set[int] = set()
    for parent, label, child in edges:
        if len(label) != 1:  # a latin-1 character is one byte; anything else is not ours
            raise ConstraintError(f"internal error: pyahocorasick edge label {label!r} is not one byte")
        children[parent][label[0]] = child
        is_child.add(child)
    roots = [node for node, _ in nodes if node not in is_child]
    if len(roots) != 1:
        raise ConstraintError(f"internal error: pyahocorasick graph has {len(roots)} roots")
    fail_of = dict(fails)
    # Number the states breadth first (root = 0), so a state's failure target is numbered before it.
    order = [roots[0]]
    number = {roots[0]: 0}
    text: list[bytes] = [b""]
    for node in order:
        for byte, child in sorted(children[node].items()):
            number[child] = len(order)
            order.append(child)
            text.append(text[number[node]] + bytes([byte]))
    n = len(order)
    delta = np.zeros((n, 256), dtype=np.int32)
    banned_out = np.zeros(n, dtype=np.bool_)
    stop_out = np.zeros(n, dtype=np.bool_)
    trigger_out = np.full(n, -1, dtype=np.int32)
    for s, node in enumerate(order):
        fail = number.get(fail_of.get(node, roots[0]), 0) if s else 0
        if s:
            delta[s] = delta[fail]
            banned_out[s], stop_out[s], trigger_out[s] = banned_out[fail], stop_out[fail], trigger_out[fail]
        for byte, child in children[node].items():
            delta[s, byte] = number[child]
        own = seen.get(text[s]) if s else None
        if own is not None:
            kind, index = own
            if kind == BANNED:
                banned_out[s] = True
            elif kind == STOP:
                stop_out[s] = True
            else:
                trigger_out[s] = index  # the state's own phrase is the longest ending here
    fire = stop_out | (trigger_out >= 0)
    return PhraseAutomaton(
        delta=delta,
        banned=banned_out,
        stop=stop_out,
        trigger=trigger_out,
        fire=fire,
        automaton=automaton,
        phrases=tuple(entries),
    )


@numba.njit(nogil=True, cache=True)
def _blocked_tokens(
    node_byte, node_depth, node_end, token_start, token_ids, max_depth, delta, banned, fire, q0, out
):
    """OR into `out` (uint32 words) every token whose bytes, stepped from state `q0`, reach a banned state,
    or reach a `fire` state before their last byte (a walk of the vocabulary trie in preorder, pruned at the
    first banned or fire state: every token below it is decided)."""
    states = np.empty(max_depth + 1, dtype=np.int32)
    states[0] = q0
    n = node_byte.shape[0]
    i = 1
    while i < n:
        d = node_depth[i]
        s = delta[states[d - 1], node_byte[i]]
        states[d] = s
        if banned[s]:
            lo = token_start[i]  # this node's tokens and every longer one complete a banned phrase
        elif fire[s]:
            lo = token_start[i + 1]  # tokens ending exactly here are fine; longer ones run past the phrase
        else:
            i += 1
            continue
        hi = token_start[node_end[i]]
        for j in range(lo, hi):
            t = token_ids[j]
            out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
        i = node_end[i]


# ======================================================================================================
# the constraint
# ======================================================================================================
def _pairs(triggers: Mapping | Iterable) -> list[tuple[str | bytes, Constraint]]:
    items = list(triggers.items()) if isinstance(triggers, Mapping) else list(triggers)
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple) or len(item) != 2:
            raise SpecError(f"trigger #{i}: expected (phrase, constraint), got {item!r}")
        phrase, inner = item
        if not isinstance(inner, Constraint):
            raise SpecError(
                f"trigger #{i} {phrase!r}: the inner constraint must be a Constraint spec (e.g. "
                f"trie_constraint(...), regex(...)), got {type(inner).__name__}"
            )
        pairs.append((phrase, inner))
    return pairs


class TriggerConstraint(Constraint):
    """Free text with triggered inner constraints, stop phrases and banned phrases (see `trigger_mode`)."""

    def __init__(
        self,
        triggers: Mapping[str | bytes, Constraint] | Iterable[tuple[str | bytes, Constraint]],
        *,
        stop: Sequence[str | bytes] = (),
        banned: Sequence[str | bytes] = (),
        max_cached_rows: int = DEFAULT_MAX_CACHED_ROWS,
    ):
        pairs = _pairs(triggers)
        self.automaton = build_automaton([p for p, _ in pairs], stop, banned)
        by_kind: dict[str, list[bytes]] = {TRIGGER: [], STOP: [], BANNED: []}
        for kind, _, data in self.automaton.phrases:
            by_kind[kind].append(data)
        self.triggers: tuple[bytes, ...] = tuple(by_kind[TRIGGER])
        self.inners: tuple[Constraint, ...] = tuple(inner for _, inner in pairs)
        self.stop: tuple[bytes, ...] = tuple(by_kind[STOP])
        self.banned: tuple[bytes, ...] = tuple(by_kind[BANNED])
        if not isinstance(max_cached_rows, int) or max_cached_rows < 1:
            raise SpecError(f"max_cached_rows must be an int >= 1, got {max_cached_rows!r}")
        self.max_cached_rows = max_cached_rows

    def cache_key(self) -> object:
        inner = tuple((type(c).__qualname__, c.cache_key()) for c in self.inners)
        return (self.triggers, inner, self.stop, self.banned, self.max_cached_rows)

    def _compile(self, vocab: Vocabulary) -> CompiledTriggers:
        return CompiledTriggers(self, vocab)

    def __repr__(self) -> str:
        pairs = zip(self.triggers, self.inners, strict=True)
        shown = ", ".join(f"{t.decode(errors='replace')!r}: {c!r}" for t, c in pairs)
        return f"trigger_mode({{{shown}}}, stop={list(self.stop)}, banned={list(self.banned)})"


def trigger_mode(
    triggers: Mapping[str | bytes, Constraint] | Iterable[tuple[str | bytes, Constraint]],
    *,
    stop: Sequence[str | bytes] = (),
    banned: Sequence[str | bytes] = (),
    max_cached_rows: int = DEFAULT_MAX_CACHED_ROWS,
) -> TriggerConstraint:
    """Free generation; after a trigger phrase, its inner constraint until that is complete; then free again.

    Args:
        triggers: phrase -> inner constraint (a mapping or (phrase, constraint) pairs); phrases are str
            (UTF-8) or bytes, matched on the output's bytes. Each inner constraint is any `Constraint` (a
            token trie, a regex, a grammar ...). May be empty if stop or banned phrases are given.
        stop: phrases after which only EOS is allowed.
        banned: phrases that never appear in the output, even split across tokens.
        max_cached_rows: the most per-state mask rows kept per compiled constraint (an LRU; each row is
            ceil(V/32) words).

    Raises `SpecError` for an empty, duplicate or non-text phrase, an inner value that is not a `Constraint`,
    or no phrase at all. Compiling raises what the inner constraints raise.
    """
    return TriggerConstraint(triggers, stop=stop, banned=banned, max_cached_rows=max_cached_rows)


class CompiledTriggers(CompiledConstraint):
    """A `TriggerConstraint` against one vocabulary: the inner constraints compiled, and a lazily filled,
    bounded cache of per-automaton-state mask rows shared by all matchers (thread-safe)."""

    def __init__(self, spec: TriggerConstraint, vocab: Vocabulary):
        self.spec = spec
        self.vocab = vocab
        self.automaton = spec.automaton
        self.inners: tuple[CompiledConstraint, ...] = tuple(compile(c, vocab) for c in spec.inners)
        # A trie matcher can hold several facts (end_fact), which no_repeat needs: reuse one per trigger.
        self.reuse = tuple(callable(getattr(c.matcher(), "end_fact", None)) for c in self.inners)
        self.words = bitmask_words(vocab.vocab_size)
        full = np.zeros(self.words, dtype=np.uint32)
        whole, rest = divmod(vocab.n_tokens, 32)
        full[:whole] = 0xFFFFFFFF
        if rest:
            full[whole] = (1 << rest) - 1
        self.full = full
        eos = np.zeros(self.words, dtype=np.uint32)
        for t in vocab.eos_ids:
            eos[t >> 5] |= np.uint32(1 << (t & 31))
        self.eos = eos
        self.not_eos = ~eos
        self.has_banned = bool(self.automaton.banned.any())
        self._no_fire = np.zeros(self.automaton.n_states, dtype=np.bool_)
        self._rows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.walks = 0  # rows computed (a statistic for tests and benchmarks)
        # Compact Python containers for the per-byte steps of accept(): indexing an array('i') or bytes gives
        # a Python int ~10x faster than numpy scalar indexing, at the same 4 bytes per table entry.
        a = self.automaton
        self._delta = array("i", a.delta.astype(np.int32).tobytes())  # flat: delta[state * 256 + byte]
        self._banned = a.banned.astype(np.uint8).tobytes()
        self._fire = a.fire.astype(np.uint8).tobytes()
        self._stop = a.stop.astype(np.uint8).tobytes()
        self._trigger = a.trigger.tolist()
        self._text = [b"" if (i in vocab.special_ids) else b for i, b in enumerate(vocab.token_bytes)]

    def matcher(self, context: str | bytes = b"") -> TriggerMatcher:
        """A fresh matcher. `context`: the end of the prompt, so a trigger that the prompt itself ends with
        starts the inner constraint at once (e.g. a prompt that ends with "Fact:"), and phrases that span the
        prompt and the output are seen. Phrases inside the context do not count; one ending exactly at its end
        does (a trigger starts the inner constraint; a stop phrase leaves only EOS)."""
        return TriggerMatcher(self, context)

    # -- rows ------------------------------------------------------------------------------------------
    def free_row(self, state: int) -> np.ndarray:
        """Read-only uint32 row of the tokens allowed in free mode at automaton `state` (EOS included)."""
        return self._row(state, FREE)

    def banned_row(self, state: int) -> np.ndarray:
        """Read-only uint32 row of the tokens whose bytes would complete a banned phrase from `state`."""
        return self._row(state, INNER)

    def _row(self, state: int, kind: int) -> np.ndarray:
        key = (state, kind)
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
                return row
        a = self.automaton
        trie = self.vocab.trie
        blocked = np.zeros(self.words, dtype=np.uint32)
        fire = a.fire if kind == FREE else self._no_fire
        _blocked_tokens(
            *trie.walk_arrays,
            a.delta,
            a.banned,
            fire,
            state,
            blocked,
        )
        row = self.full & ~blocked if kind == FREE else blocked
        row.setflags(write=False)
        with self._lock:
            self.walks += 1
            self._rows[key] = row
            self._rows.move_to_end(key)
            while len(self._rows) > self.spec.max_cached_rows:
                self._rows.popitem(last=False)
        return row

    @property
    def cached_rows(self) -> int:
        """Rows in the cache now (at most `max_cached_rows`)."""
        return len(self._rows)

    # -- steps -----------------------------------------------------------------------------------------
    def step_free(self, state: int, data: bytes) -> tuple[int, int, int] | None:
        """Step the bytes of a free-mode token: (new state, new mode, trigger index or -1), or None if the
        token is not allowed (it completes a banned phrase, or a trigger / stop phrase before its last byte).
        The new mode is STOPPED after a stop phrase, INNER after a trigger, else FREE."""
        delta, banned, fire = self._delta, self._banned, self._fire
        last = len(data) - 1
        for i, b in enumerate(data):
            state = delta[(state << 8) | b]
            if banned[state] or (fire[state] and i < last):
                return None
        if data and fire[state]:
            if self._stop[state]:
                return state, STOPPED, -1
            return state, INNER, self._trigger[state]
        return state, FREE, -1

    def step_inner(self, state: int, data: bytes) -> int:
        """Step bytes written inside a trigger: the new state, or -1 if they complete a banned phrase."""
        delta, banned = self._delta, self._banned
        for b in data:
            state = delta[(state << 8) | b]
            if banned[state]:
                return -1
        return state


# ======================================================================================================
# the matcher
# ======================================================================================================
@dataclass
class _Segment:
    """The tokens written under one trigger: output tokens [start, start + n); closed once handed back."""

    trigger: int
    start: int
    n: int = 0
    closed: bool = False


@dataclass(frozen=True)
class TriggeredSpan:
    """What was written under one trigger: the trigger phrase, where the span starts in the generated tokens,
    its tokens and text, and whether the inner constraint completed it (a fact)."""

    trigger: str
    start: int
    tokens: tuple[int, ...]
    text: str
    complete: bool


class TriggerMatcher(Matcher):
    """Follows one sequence in trigger mode (see the module docstring). Beyond the protocol: `mode`,
    `spans()` / `facts()` (what was written under each trigger), `text` (the output so far)."""

    def __init__(self, compiled: CompiledTriggers, context: str | bytes = b""):
        self._c = compiled
        self.vocab = compiled.vocab
        self._tokens: list[int] = []
        self._segments: list[_Segment] = []
        self._inner: dict[int, Matcher] = {}
        data = context.encode("utf-8") if isinstance(context, str) else bytes(context)
        state = compiled.automaton.step(0, data)
        mode, seg = FREE, -1
        if data and compiled._stop[state]:
            mode = STOPPED
        elif data and compiled._trigger[state] >= 0:
            mode, seg = INNER, self._open(compiled._trigger[state], 0)
        # (automaton state, mode, open segment) after each prefix of the output; [0] is the start.
        self._states: list[tuple[int, int, int]] = [(state, mode, seg)]

    # -- state -------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """'free', 'inner', 'stopped' or 'done'."""
        return MODE_NAMES[self._states[-1][1]]

    @property
    def text(self) -> str:
        """The output so far (special tokens dropped)."""
        return self.vocab.decode(self._tokens, skip_special=True)

    def is_accepting(self) -> bool:
        _, mode, seg = self._states[-1]
        if mode == INNER:
            return self._inner[self._segments[seg].trigger].is_accepting()
        return mode != DONE

    def is_terminated(self) -> bool:
        return self._states[-1][1] == DONE

    # -- masks -------------------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        c = self._c
        state, mode, seg = self._states[-1]
        if mode == FREE:
            row_view(bitmask, row, self.vocab.vocab_size)[:] = c.free_row(state)
            return
        if mode != INNER:  # stopped or done: only EOS
            row_view(bitmask, row, self.vocab.vocab_size)[:] = c.eos
            return
        inner = self._inner[self._segments[seg].trigger]
        inner.fill_bitmask(bitmask, row)
        words = row_view(bitmask, row, self.vocab.vocab_size)
        if c.has_banned:
            words &= ~c.banned_row(state)
        if inner.is_accepting():  # the fact may end here: any free-mode token (and EOS) may follow
            words &= c.not_eos
            words |= c.free_row(state)

    # -- accept ------------------------------------------------------------------------------------------
    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        c = self._c
        state, mode, seg = self._states[-1]
        if token in self.vocab.eos_ids:
            if mode != DONE and not self.is_accepting():
                return False  # (a terminated matcher allows only EOS and keeps accepting it, as the others)
            if mode == INNER:
                self._close(seg)
            self._push(token, state, DONE, -1)
            return True
        if mode == STOPPED or mode == DONE or token >= self.vocab.n_tokens:  # padding ids are never allowed
            return False
        data = c._text[token]
        if mode == INNER:
            after = c.step_inner(state, data)
            if after < 0:
                return False
            inner = self._inner[self._segments[seg].trigger]
            if inner.accept(token):  # continuing the span wins over ending it
                self._segments[seg].n += 1
                self._push(token, after, INNER, seg)
                return True
            if not inner.is_accepting():
                return False
            step = c.step_free(state, data)
            if step is None:
                return False
            self._close(seg)
        else:
            step = c.step_free(state, data)
            if step is None:
                return False
        after, new_mode, trigger = step
        seg = self._open(trigger, len(self._tokens) + 1) if new_mode == INNER else -1
        self._push(token, after, new_mode, seg)
        return True

    def _push(self, token: int, state: int, mode: int, seg: int) -> None:
        self._tokens.append(token)
        self._states.append((state, mode, seg))

    def _open(self, trigger: int, start: int) -> int:
        if not (self._c.reuse[trigger] and trigger in self._inner):
            self._inner[trigger] = self._c.inners[trigger].matcher()
        self._segments.append(_Segment(trigger, start))
        return len(self._segments) - 1

    def _close(self, seg: int) -> None:
        segment = self._segments[seg]
        segment.closed = True
        if self._c.reuse[segment.trigger]:
            self._inner[segment.trigger].end_fact()

    # -- rollback and fork -------------------------------------------------------------------------------
    def rollback(self, n: int = 1) -> None:
        """Undo the last `n` tokens: the automaton state and mode come from the per-token stack; an inner
        matcher rolls back in place while the rollback stays inside its open span, else it is rebuilt by
        replaying the spans that remain (a handful of short spans per sequence)."""
        self._check_rollback(n, len(self._tokens))
        if n == 0:
            return
        keep = len(self._tokens) - n
        _, old_mode, old_seg = self._states[-1]
        _, new_mode, new_seg = self._states[keep]
        if old_mode == INNER and new_mode == INNER and old_seg == new_seg:  # inside one open span
            segment = self._segments[old_seg]
            undo = segment.n - (keep - segment.start)
            self._inner[segment.trigger].rollback(undo)
            segment.n -= undo
            del self._tokens[keep:]
            del self._states[keep + 1 :]
            return
        del self._tokens[keep:]
        del self._states[keep + 1 :]
        touched = set()
        while self._segments and self._segments[-1].start > keep:
            touched.add(self._segments.pop().trigger)
        for segment in self._segments:
            end = segment.start + segment.n
            if end > keep or (segment.closed and end >= keep):  # cut, or its hand-back token is gone
                segment.n = min(segment.n, keep - segment.start)
                segment.closed = False
                touched.add(segment.trigger)
        for trigger in touched:
            self._replay(trigger)

    def _replay(self, trigger: int) -> None:
        """Rebuild the inner matcher of `trigger` from the spans that remain."""
        c = self._c
        spans = [s for s in self._segments if s.trigger == trigger]
        if not c.reuse[trigger]:
            spans = spans[-1:]
        matcher = c.inners[trigger].matcher()
        for span in spans:
            for token in self._tokens[span.start : span.start + span.n]:
                if not matcher.accept(token):
                    raise ConstraintError(f"internal error: replaying span at token {span.start} failed")
            if span.closed and c.reuse[trigger]:
                matcher.end_fact()
        self._inner[trigger] = matcher

    def fork(self) -> TriggerMatcher:
        other = TriggerMatcher.__new__(TriggerMatcher)
        other._c = self._c
        other.vocab = self.vocab
        other._tokens = list(self._tokens)
        other._states = list(self._states)
        other._segments = [replace(s) for s in self._segments]
        other._inner = {t: m.fork() for t, m in self._inner.items()}
        return other

    # -- what was written --------------------------------------------------------------------------------
    def spans(self) -> list[TriggeredSpan]:
        """Every span written under a trigger, in order. A span is complete once handed back (or ended by
        EOS), or if it is the open one and its inner matcher accepts; an open span cut short is not."""
        out = []
        triggers = self._c.spec.triggers
        _, mode, open_seg = self._states[-1]
        for i, s in enumerate(self._segments):
            tokens = tuple(self._tokens[s.start : s.start + s.n])
            # The open span counts as complete if its inner matcher accepts (e.g. the text ended there).
            complete = s.closed or (mode == INNER and i == open_seg and self._inner[s.trigger].is_accepting())
            out.append(
                TriggeredSpan(
                    trigger=triggers[s.trigger].decode("utf-8", "replace"),
                    start=s.start,
                    tokens=tokens,
                    text=self.vocab.decode(tokens),
                    complete=complete,
                )
            )
        return out

    def facts(self) -> list[TriggeredSpan]:
        """The completed spans (each one the inner constraint accepted: with a trie, a fact of the base)."""
        return [s for s in self.spans() if s.complete]

    def __repr__(self) -> str:
        return f"TriggerMatcher(mode={self.mode}, tokens={len(self._tokens)}, spans={len(self._segments)})"


__all__ = [
    "CompiledTriggers",
    "PhraseAutomaton",
    "TriggerConstraint",
    "TriggerMatcher",
    "TriggeredSpan",
    "build_automaton",
    "trigger_mode",
]
