"""Trigger mode: masks equal a brute-force reference (bytes.endswith over the whole text) along random walks;
facts come from the base; banned phrases never appear, even across tokens; stop phrases end the text;
rollback and fork agree with a replay; real vocabularies, a regex inner constraint and the decode loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import BitmaskError, ConstraintError, SpecError, TokenOutOfRangeError, Vocabulary
from constrain.bitmask import bitmask_words
from constrain.grammars.regex import regex
from constrain.index.trie import build_trie, trie_constraint
from constrain.index.triggers import build_automaton, trigger_mode

# -- a tiny vocabulary whose tokens overlap, so phrases span token boundaries ------------------------------
ALPHABET = b"abcF:. \n"
MULTI = [b"ab", b"ba", b"abc", b"ca", b"Fa", b"F:", b": ", b"a.", b".\n", b"b:", b"aF", b"cab", b"bb"]
MULTI += [b"a b", b"c:", b":a", b"\n\n", b"Fab", b"c.", b" F"]
TOKENS = [bytes([b]) for b in ALPHABET] + MULTI
EOS = len(TOKENS)
OTHER_SPECIAL = EOS + 1
N_TOKENS = EOS + 2
VOCAB = Vocabulary(
    TOKENS + [b"<eos>", b"<sep>"],
    vocab_size=N_TOKENS + 10,
    special_ids=[EOS, OTHER_SPECIAL],
    eos_ids=[EOS],
    name="tiny-overlap",
)
ORDINARY = list(range(EOS))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

phrase = st.lists(st.sampled_from(list(ALPHABET)), min_size=1, max_size=3).map(bytes)
fact = st.lists(st.sampled_from(ORDINARY), min_size=1, max_size=4).map(tuple)
fact_set = st.lists(fact, min_size=1, max_size=6).map(lambda fs: sorted(set(fs)))


@st.composite
def setups(draw):
    """Distinct phrases (1-2 triggers, 0-1 stop, 0-2 banned), a fact base per trigger, a prompt tail."""
    phrases = draw(st.lists(phrase, min_size=1, max_size=5, unique=True))
    n_triggers = draw(st.integers(1, min(2, len(phrases))))
    triggers = phrases[:n_triggers]
    rest = phrases[n_triggers:]
    n_stop = draw(st.integers(0, min(1, len(rest))))
    stop, banned = rest[:n_stop], rest[n_stop:]
    facts = [draw(fact_set) for _ in triggers]
    context = draw(st.sampled_from([b"", triggers[0], b"xa" + triggers[0][:-1]]))
    no_repeat = draw(st.booleans())
    return triggers, stop, banned, facts, context, no_repeat


def compile_setup(triggers, stop, banned, facts, no_repeat, **kwargs):
    inners = [
        trie_constraint(build_trie([list(f) for f in fs], None, vocab=VOCAB), no_repeat=no_repeat)
        for fs in facts
    ]
    spec = trigger_mode(list(zip(triggers, inners, strict=True)), stop=stop, banned=banned, **kwargs)
    return spec.compile(VOCAB)


class Reference:
    """The semantics of trigger mode, written directly on bytes: a phrase "ends" when the text so far ends
    with it (bytes.endswith), checked after every byte; facts are plain sets of token tuples."""

    def __init__(self, triggers, stop, banned, facts, context=b"", no_repeat=False):
        self.triggers, self.stop, self.banned = triggers, stop, banned
        self.facts = [set(fs) for fs in facts]
        self.no_repeat = no_repeat
        self.text = bytes(context)
        self.mode, self.trigger, self.prefix = "free", -1, ()
        self.done: list[set] = [set() for _ in triggers]
        self.completed: list[tuple[int, tuple]] = []
        if context:
            self._after_free_bytes()

    @staticmethod
    def data(token):
        return b"" if token >= EOS else TOKENS[token]

    def _ends(self, text, phrases):
        return any(text.endswith(p) for p in phrases)

    def _after_free_bytes(self):
        if self._ends(self.text, self.stop):
            self.mode = "stopped"
            return
        ending = [i for i, t in enumerate(self.triggers) if self.text.endswith(t)]
        if ending:
            self.mode, self.prefix = "inner", ()
            self.trigger = max(ending, key=lambda i: len(self.triggers[i]))

    def banned_ok(self, token):
        data = self.data(token)
        return not any(self._ends(self.text + data[:k], self.banned) for k in range(1, len(data) + 1))

    def free_ok(self, token):
        data = self.data(token)
        for k in range(1, len(data) + 1):
            text = self.text + data[:k]
            if self._ends(text, self.banned):
                return False
            if k < len(data) and self._ends(text, self.triggers + self.stop):
                return False
        return True

    def live(self):
        facts = self.facts[self.trigger]
        return facts - self.done[self.trigger] if self.no_repeat else facts

    def continuations(self):
        n = len(self.prefix)
        return {f[n] for f in self.live() if len(f) > n and f[:n] == self.prefix}

    def complete(self):
        return self.mode == "inner" and self.prefix in self.live()

    def allowed(self):
        if self.mode in ("stopped", "done"):
            return {EOS}
        free = {t for t in range(N_TOKENS) if t == EOS or self.free_ok(t)}
        if self.mode == "free":
            return free
        inner = {t for t in self.continuations() if self.banned_ok(t)}
        return inner | free if self.complete() else inner

    def accept(self, token):
        assert token in self.allowed()
        if token == EOS:
            if self.mode == "inner":
                self._close()
            self.mode = "done"
            return
        if self.mode == "inner":
            if token in self.continuations() and self.banned_ok(token):
                self.prefix += (token,)
                self.text += self.data(token)
                return
            self._close()
        self.text += self.data(token)
        if self.data(token):
            self._after_free_bytes()

    def _close(self):
        self.completed.append((self.trigger, self.prefix))
        self.done[self.trigger].add(self.prefix)
        self.mode = "free"


def mask_of(matcher) -> set[int]:
    return {int(t) for t in matcher.allowed_tokens()}


def walk(data, matcher, ref, steps):
    """Random walk: at every step the masks must be equal; returns the tokens taken. Tokens are chosen with a
    `random.Random` seeded by hypothesis: its own draws favour the first choices, which would make walks of
    'aaaa' that rarely reach a stop phrase."""
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="walk seed"))
    taken = []
    for _ in range(steps):
        expected = ref.allowed()
        assert mask_of(matcher) == expected, (ref.mode, ref.text, ref.prefix)
        assert matcher.mode == ref.mode
        assert matcher.is_terminated() == (ref.mode == "done")
        assert matcher.is_accepting() == (EOS in expected and ref.mode != "done")
        choices = sorted(expected)
        if not choices:
            break
        # EOS only now and then (or when nothing else is left), so walks get long enough to reach phrases.
        ordinary = [t for t in choices if t != EOS]
        if ordinary and rng.random() < 0.95:
            choices = ordinary
        token = rng.choice(choices)
        assert matcher.accept(token)
        ref.accept(token)
        taken.append(token)
        if ref.mode in ("done", "stopped"):  # nothing but EOS can follow; leave a stopped matcher stopped
            break
    assert mask_of(matcher) == ref.allowed() and matcher.mode == ref.mode
    return taken


# -- masks against the reference ------------------------------------------------------------------------
@SETTINGS
@given(setups(), st.data())
def test_masks_equal_the_bytewise_reference_along_random_walks(setup, data):
    """Soundness and completeness: at every step of a random walk the mask equals the reference's allowed set
    (free tokens minus banned / mid-token trigger or stop; the trie's continuations minus banned; their union
    where a fact may end; EOS only after a stop phrase), and tokens outside it are refused without effect."""
    triggers, stop, banned, facts, context, no_repeat = setup
    compiled = compile_setup(triggers, stop, banned, facts, no_repeat)
    matcher = compiled.matcher(context)
    ref = Reference(triggers, stop, banned, facts, context, no_repeat)
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="walk seed"))
    for _ in range(25):
        expected = ref.allowed()
        assert mask_of(matcher) == expected
        refused = [t for t in range(N_TOKENS) if t not in expected]
        for t in rng.sample(refused, min(4, len(refused))):
            assert not matcher.accept(t)
        if ref.mode == "done" or not expected:  # not expected: a dead end (no_repeat used up the base)
            break
        ordinary = [t for t in sorted(expected) if t != EOS]
        token = rng.choice(ordinary if ordinary and rng.random() < 0.95 else sorted(expected))
        assert matcher.accept(token)
        ref.accept(token)


@SETTINGS
@given(setups(), st.data())
def test_every_completed_fact_is_in_its_triggers_base(setup, data):
    """Every span the matcher reports complete is a fact of its own trigger's base (and, with no_repeat, no
    fact is completed twice under one trigger); the spans are those of the reference, in order."""
    triggers, stop, banned, facts, context, no_repeat = setup
    compiled = compile_setup(triggers, stop, banned, facts, no_repeat)
    matcher = compiled.matcher(context)
    ref = Reference(triggers, stop, banned, facts, context, no_repeat)
    walk(data, matcher, ref, 30)
    spans = matcher.facts()
    closed = [s for s in spans if s.complete]
    for span in closed:
        assert span.tokens in set(facts[triggers.index(span.trigger.encode())])
        assert span.text == VOCAB.decode(span.tokens)
    # The reference's closed facts, plus an open one that happens to be complete.
    expected = list(ref.completed)
    if ref.mode == "inner" and ref.complete():
        expected.append((ref.trigger, ref.prefix))
    assert [(triggers.index(s.trigger.encode()), s.tokens) for s in closed] == expected
    if no_repeat:
        for i in range(len(triggers)):
            mine = [s.tokens for s in closed if s.trigger.encode() == triggers[i]]
            assert len(mine) == len(set(mine))


@SETTINGS
@given(setups(), st.data())
def test_banned_phrases_never_appear_and_stop_phrases_end_the_text(setup, data):
    """No banned phrase ends anywhere in the output (context + output, occurrences ending in the output),
    even where it spans several tokens; after a stop phrase the mask is EOS only."""
    triggers, stop, banned, facts, context, no_repeat = setup
    compiled = compile_setup(triggers, stop, banned, facts, no_repeat)
    matcher = compiled.matcher(context)
    ref = Reference(triggers, stop, banned, facts, context, no_repeat)
    tokens = walk(data, matcher, ref, 30)
    text = bytes(context) + VOCAB.decode_bytes(tokens, skip_special=True)
    for b in banned:
        start = text.find(b, max(0, len(context) - len(b) + 1))
        assert start < 0, (b, text)
    stopped = any(text.endswith(s) for s in stop) and ref.mode == "stopped"
    assert (matcher.mode == "stopped") == stopped
    if stopped:
        assert mask_of(matcher) == {EOS} and matcher.is_accepting() and not matcher.accept(0)


def test_banned_phrase_split_across_tokens_is_masked_exactly():
    """'abc' banned: after 'ab' the tokens 'c', 'ca', 'c:', 'c.' are masked; after 'a' the token 'bb' is
    fine but 'b' leads to 'ab' and is allowed; a single token 'abc' is masked everywhere; nothing else is."""
    compiled = trigger_mode({}, banned=[b"abc"]).compile(VOCAB)
    m = compiled.matcher()
    tid = {b: i for i, b in enumerate(TOKENS)}
    everything = set(range(N_TOKENS))
    assert mask_of(m) == everything - {tid[b"abc"]}
    assert m.accept(tid[b"a"]) and m.accept(tid[b"b"])
    assert mask_of(m) == everything - {
        tid[b"abc"],
        tid[b"c"],
        tid[b"ca"],
        tid[b"c:"],
        tid[b"c."],
        tid[b"cab"],
    }
    assert not m.accept(tid[b"ca"])
    assert m.accept(tid[b"ab"])  # "abab": no "abc" yet
    assert not m.accept(tid[b"cab"])


def test_stop_phrase_inside_a_token_is_refused_and_at_its_end_leaves_only_eos():
    """Stop phrase '.\\n': the token '.\\n' completes it on its last byte (allowed, then only EOS); after '.',
    the token '\\n' completes it (allowed) while '\\n\\n' would carry a byte past it (masked)."""
    compiled = trigger_mode({}, stop=[b".\n"]).compile(VOCAB)
    tid = {b: i for i, b in enumerate(TOKENS)}
    m = compiled.matcher()
    assert m.accept(tid[b"a"])
    assert m.is_allowed(tid[b".\n"])
    m2 = m.fork()
    assert m2.accept(tid[b"."])
    assert m2.is_allowed(tid[b"\n"]) and not m2.is_allowed(tid[b"\n\n"])  # "\n\n" runs past ".\n"
    assert m.accept(tid[b".\n"])
    assert m.mode == "stopped" and mask_of(m) == {EOS} and m.is_accepting() and not m.is_terminated()
    assert not m.accept(tid[b"a"])
    assert m.accept(EOS) and m.is_terminated() and mask_of(m) == {EOS}


# -- rollback and fork ---------------------------------------------------------------------------------------
def _snapshot(matcher):
    return mask_of(matcher), matcher.mode, matcher.is_accepting(), matcher.spans()


@SETTINGS
@given(setups(), st.data())
def test_rollback_and_fork_agree_with_a_replay(setup, data):
    """After a random walk, a fork advanced further leaves the original unchanged; for every n, rollback(n)
    (on a fork) gives the same mask, mode and spans as a fresh matcher fed the remaining prefix, and both
    continue identically (the inner matchers were restored, not only the mask)."""
    triggers, stop, banned, facts, context, no_repeat = setup
    compiled = compile_setup(triggers, stop, banned, facts, no_repeat)
    matcher = compiled.matcher(context)
    tokens = walk(data, matcher, Reference(triggers, stop, banned, facts, context, no_repeat), 16)
    before = _snapshot(matcher)
    fork = matcher.fork()
    walk(data, fork, _replayed_reference(setup, tokens), 6)
    assert _snapshot(matcher) == before
    for n in range(len(tokens) + 1):
        rolled = matcher.fork()
        rolled.rollback(n)
        kept = tokens[: len(tokens) - n]
        fresh = compiled.matcher(context)
        for t in kept:
            assert fresh.accept(t)
        assert _snapshot(rolled) == _snapshot(fresh)
        more = walk(data, rolled, _replayed_reference(setup, kept), 4)
        for t in more:
            assert fresh.accept(t)
        assert _snapshot(rolled) == _snapshot(fresh)
    assert _snapshot(matcher) == before


def _replayed_reference(setup, tokens):
    triggers, stop, banned, facts, context, no_repeat = setup
    ref = Reference(triggers, stop, banned, facts, context, no_repeat)
    for t in tokens:
        ref.accept(t)
    return ref


def test_rollback_past_the_start_raises():
    m = trigger_mode({}, banned=["ab"]).compile(VOCAB).matcher()
    assert m.accept(0)
    with pytest.raises(ConstraintError, match="roll back 2"):
        m.rollback(2)


# -- the automaton ------------------------------------------------------------------------------------------
kinds = st.lists(st.sampled_from(["trigger", "stop", "banned"]), min_size=6, max_size=6)
texts = st.lists(st.sampled_from(list(ALPHABET)), max_size=40).map(bytes)


@settings(max_examples=100, deadline=None)
@given(st.lists(phrase, min_size=1, max_size=6, unique=True), kinds, texts)
def test_dense_automaton_reports_exactly_the_phrases_that_end_at_each_byte(phrases, kind, text):
    """Stepping the dense table byte by byte, the outputs at position i are exactly the phrases that
    text[:i+1] ends with (banned / stop flags, the longest trigger), and pyahocorasick's own search finds the
    same occurrences."""
    triggers = [p for p, k in zip(phrases, kind[: len(phrases)], strict=True) if k == "trigger"]
    stop = [p for p, k in zip(phrases, kind[: len(phrases)], strict=True) if k == "stop"]
    banned = [p for p, k in zip(phrases, kind[: len(phrases)], strict=True) if k == "banned"]
    a = build_automaton(triggers, stop, banned)
    state = 0
    occurrences = []
    for i in range(len(text)):
        state = a.step(state, text[i : i + 1])
        prefix = text[: i + 1]
        assert bool(a.banned[state]) == any(prefix.endswith(p) for p in banned)
        assert bool(a.stop[state]) == any(prefix.endswith(p) for p in stop)
        ending = [j for j, p in enumerate(triggers) if prefix.endswith(p)]
        longest = max(ending, key=lambda j: len(triggers[j])) if ending else -1
        assert int(a.trigger[state]) == longest
        occurrences += [(i + 1, p) for p in phrases if prefix.endswith(p)]
    assert sorted((end, p) for end, _, _, p in a.find(text)) == sorted(occurrences)


def test_bad_phrases_and_arguments_raise_spec_errors():
    inner = regex("a")
    with pytest.raises(SpecError, match="empty"):
        trigger_mode({"": inner})
    with pytest.raises(SpecError, match="given twice"):
        trigger_mode({"Fact:": inner}, banned=["Fact:"])
    with pytest.raises(SpecError, match="must be a Constraint"):
        trigger_mode({"Fact:": "not a constraint"})
    with pytest.raises(SpecError, match="at least one"):
        trigger_mode({})
    with pytest.raises(SpecError, match="single str"):
        trigger_mode({}, banned="abc")
    with pytest.raises(SpecError, match="str or bytes"):
        trigger_mode({}, stop=[3])
    with pytest.raises(SpecError, match="max_cached_rows"):
        trigger_mode({}, banned=["x"], max_cached_rows=0)
    with pytest.raises(SpecError, match="trigger #0"):
        trigger_mode(["Fact:"])


def test_bad_tokens_and_bitmasks_raise_constraint_errors():
    m = trigger_mode({}, banned=["ab"]).compile(VOCAB).matcher()
    with pytest.raises(TokenOutOfRangeError):
        m.accept(VOCAB.vocab_size)
    assert not m.accept(N_TOKENS) and not m.is_allowed(N_TOKENS)  # a padding id: in range, never allowed
    assert m.accept(0)
    with pytest.raises(BitmaskError):
        m.fill_bitmask(np.zeros((1, 3), dtype=np.int32))
    with pytest.raises(BitmaskError):
        m.fill_bitmask(torch.zeros((1, bitmask_words(VOCAB.vocab_size)), dtype=torch.int64))


def test_row_cache_stays_within_its_bound_and_masks_stay_right():
    """With max_cached_rows=2 and a walk through many automaton states, the cache never holds more than 2
    rows, and the masks equal those of an unbounded cache."""
    phrases = [b"abc", b"bca", b"cab", b"F:a"]
    small = trigger_mode({}, banned=phrases, max_cached_rows=2).compile(VOCAB)
    big = trigger_mode({}, banned=phrases).compile(VOCAB)
    a, b = small.matcher(), big.matcher()
    rng = random.Random(0)
    for _ in range(60):
        options = sorted(mask_of(b) - {EOS, OTHER_SPECIAL})
        assert mask_of(a) == set(mask_of(b))
        assert small.cached_rows <= 2
        t = rng.choice(options)
        assert a.accept(t) and b.accept(t)
    assert small.walks > 2


# -- real vocabularies, other inner constraints, the decode loop ---------------------------------------------
def brute_force_free(vocab, text, triggers, stop, banned) -> set[int]:
    """Free-mode tokens after `text`, by brute force: every id of the tokenizer except tokens that complete a
    banned phrase, or complete a trigger / stop phrase before their last byte."""
    allowed = set()
    for t in range(vocab.n_tokens):
        data = b"" if t in vocab.special_ids else vocab.token_bytes[t]
        ok = True
        for k in range(1, len(data) + 1):
            now = text + data[:k]
            if any(now.endswith(p) for p in banned) or (
                k < len(data) and any(now.endswith(p) for p in triggers + stop)
            ):
                ok = False
                break
        if ok:
            allowed.add(t)
    return allowed


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_free_mask_on_a_real_vocabulary_equals_brute_force(vocabularies, name):
    """On a real vocabulary, after some text, the free mask equals a per-token brute force: every id of the
    tokenizer except tokens that complete a banned phrase or run past a trigger / stop phrase."""
    vocab = vocabularies(name)
    triggers, stop, banned = [b"Fact:"], [b"\n\n"], [b"ello wor", b"Paris"]
    spec = trigger_mode({b"Fact:": regex(r" [a-z]+\.")}, stop=stop, banned=banned)
    compiled = spec.compile(vocab)
    m = compiled.matcher()
    prefix = b"Well h"
    for t in vocab.token_id(b"Well"), vocab.token_id(b" h"):
        assert m.accept(t)
    got = set(m.allowed_tokens().tolist())
    expected = brute_force_free(vocab, prefix, triggers, stop, banned)
    assert got == expected
    assert vocab.token_id(b"ello") in got and vocab.token_id(b" Paris") not in got
    assert len(expected) > vocab.n_tokens - 200  # free text is (almost) unconstrained


def test_regex_inner_constraint_composes_and_hands_back_to_free_text(vocabularies):
    """Trigger 'Year:' -> regex ' [0-9]{4}\\.': inside, the mask is the regex's own (no EOS until it
    accepts); once complete (nothing can follow the '.'), the mask is the brute-force free mask; the span is
    recorded with its text."""
    vocab = vocabularies("smollm2")
    inner = regex(r" [0-9]{4}\.")
    m = trigger_mode({"Year:": inner}).compile(vocab).matcher()
    r = inner.compile(vocab).matcher()
    for piece in (b"The", b" year", b".", b" Year", b":"):
        assert m.accept(vocab.token_id(piece))
    assert m.mode == "inner"
    for piece in (b" ", b"1", b"9", b"8", b"9", b"."):
        assert mask_of(m) == mask_of(r) and not m.is_accepting()
        t = vocab.token_id(piece)
        assert m.accept(t) and r.accept(t)
    assert r.is_accepting() and m.is_accepting()
    assert mask_of(m) == brute_force_free(vocab, b"The year. Year: 1989.", [b"Year:"], [], [])
    assert m.accept(vocab.token_id(b" Done"))
    assert m.mode == "free"
    [span] = m.facts()
    assert span.trigger == "Year:" and span.text == " 1989." and span.complete


def test_trigger_mode_in_the_decode_loop_keeps_facts_in_the_base(vocabularies):
    """A tiny random Llama with SmolLM2's vocabulary samples (temperature 1) under trigger mode, starting
    right after 'Fact:': every completed fact is in the base and no banned phrase appears in the output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from constrain.assets import load_tokenizer
    from constrain.generate import generate

    vocab = vocabularies("smollm2")
    tokenizer = load_tokenizer("smollm2")
    texts = [" Paris is the capital of France.", " Rome is the capital of Italy.", " Oslo is in Norway."]
    facts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    index = build_trie(facts, None, vocab=vocab)
    spec = trigger_mode({"Fact:": trie_constraint(index)}, banned=["Rome", "zz"])
    compiled = spec.compile(vocab)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    matchers = [compiled.matcher("Fact:") for _ in range(4)]
    outs = generate(model, tokenizer, [[1, 2, 3]] * 4, matchers, max_new_tokens=24, temperature=1.0, seed=1)
    for out, m in zip(outs, matchers, strict=True):
        data = vocab.decode_bytes(out.token_ids, skip_special=True)
        assert b"Rome" not in data and b"zz" not in data
        spans = m.facts()
        # Each row starts inside a fact, and a fact is at most 8 tokens: the first span is always complete.
        assert spans and spans[0].start == 0
        for span in spans:
            assert list(span.tokens) in facts and span.text in (texts[0], texts[2])
