"""Regex constraints on real vocabularies: masks are sound and complete, and the Matcher protocol holds."""

from __future__ import annotations

import hashlib
import re
import threading
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from constrain import (
    BitmaskError,
    CompileLimitError,
    ConstraintError,
    SpecError,
    TokenOutOfRangeError,
    UnsupportedError,
    Vocabulary,
    allocate_bitmask,
    compile,
)
from constrain.bitmask import allowed_ids, bitmask_words
from constrain.grammars.regex import Choice, CompiledRegex, Regex, RegexMatcher, choice, regex

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCABS = ("llama3", "smollm2", "gpt2")
PATTERNS = [
    (r"\d{4}-\d{2}-\d{2}", 0),
    (r"[A-Z][a-z]+(?: [A-Z][a-z]+)*", 0),
    (r'\{"name": "\w+", "age": \d{1,3}\}', 0),
    (r"(?i)(yes|no|maybe)[.!]?", 0),
    (r"[^\d\s]{1,8} [\wé😀]+\n?", 0),
    (r"-?(0|[1-9]\d*)(\.\d+)?", 0),
]
IDS = [p for p, _ in PATTERNS]


def bit(row: np.ndarray, token: int) -> bool:
    return bool((int(row.view(np.uint32)[token >> 5]) >> (token & 31)) & 1)


def fresh_row(vocab: Vocabulary) -> np.ndarray:
    return np.full((1, bitmask_words(vocab.vocab_size)), -1, dtype=np.int32)  # all ones: fill must overwrite


def walk(matcher, tokens) -> bool:
    """Feed `tokens`, checking before each that its mask bit agrees with accept(); True if all accepted."""
    row = fresh_row(matcher.vocab)
    for token in tokens:
        matcher.fill_bitmask(row, 0)
        allowed = bit(row[0], token)
        assert matcher.accept(token) == allowed, f"mask bit {allowed} disagrees with accept() for {token}"
        if not allowed:
            return False
    return True


def eos_allowed(matcher) -> bool:
    row = fresh_row(matcher.vocab)
    matcher.fill_bitmask(row, 0)
    return all(bit(row[0], e) for e in matcher.vocab.eos_ids)


@lru_cache(maxsize=4)
def token_matrix(vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ordinary tokens, longest first: (ids, bytes padded into a matrix, how many are longer than j per j)."""
    ids = vocab.ordinary_ids
    lengths = np.asarray([len(vocab.token_bytes[i]) for i in ids])
    order = np.argsort(-lengths, kind="stable")
    ids, lengths = ids[order], lengths[order]
    data = np.zeros((ids.size, lengths.max()), dtype=np.uint8)
    for row, i in enumerate(ids.tolist()):
        data[row, : lengths[row]] = np.frombuffer(vocab.token_bytes[i], dtype=np.uint8)
    longer = (lengths[None, :] > np.arange(lengths.max())[:, None]).sum(axis=1)
    return ids, data, longer


def brute_force_mask(compiled: CompiledRegex, state: int) -> np.ndarray:
    """The allowed ids of `state` by running the DFA over every token's bytes (no trie), sorted."""
    ids, data, longer = token_matrix(compiled.vocab)
    table = np.vstack([compiled.dfa.transitions, np.full((1, 256), -1, dtype=np.int32)])  # row -1: dead
    states = np.full(ids.size, state, dtype=np.int64)
    for j, count in enumerate(longer.tolist()):  # tokens are sorted longest first: the first `count` go on
        states[:count] = table[states[:count], data[:count, j]]
    allowed = set(ids[states >= 0].tolist()) - compiled.vocab.eos_ids
    if compiled.dfa.accepting[state]:
        allowed |= compiled.vocab.eos_ids
    return np.asarray(sorted(allowed), dtype=np.int64)


# -- completeness ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize(("pattern", "flags"), PATTERNS, ids=IDS)
def test_the_tokenizers_own_tokenization_of_a_match_is_accepted(
    name, pattern, flags, tokenizers, vocabularies
):
    vocab, tok = vocabularies(name), tokenizers(name)
    compiled = regex(pattern, flags).compile(vocab)

    @SETTINGS
    @given(st.from_regex(re.compile(pattern, flags), fullmatch=True))
    def check(text):
        """Completeness: each canonical token is set in the mask filled just before it; then EOS is too."""
        ids = tok.encode(text, add_special_tokens=False)
        assume(vocab.decode_bytes(ids) == text.encode("utf-8"))  # SmolLM2 lacks 21 bytes: some text is lost
        m = compiled.matcher()
        assert walk(m, ids), text
        assert m.is_accepting() and eos_allowed(m)

    check()


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize(("pattern", "flags"), PATTERNS[::2], ids=IDS[::2])
def test_byte_by_byte_and_char_by_char_tokenizations_are_accepted(
    name, pattern, flags, tokenizers, vocabularies
):
    vocab, tok = vocabularies(name), tokenizers(name)
    compiled = regex(pattern, flags).compile(vocab)
    index = vocab._index

    @SETTINGS
    @given(st.from_regex(re.compile(pattern, flags), fullmatch=True))
    def check(text):
        """Completeness for non-canonical tokenizations: single bytes (where the vocabulary has them all),
        else single characters (falling back to the tokenizer for a character with no token of its own)."""
        data = text.encode("utf-8")
        if all(bytes([b]) in index for b in data):
            ids = [index[bytes([b])] for b in data]
        else:
            ids = []
            for ch in text:
                single = index.get(ch.encode("utf-8"))
                ids += [single] if single is not None else tok.encode(ch, add_special_tokens=False)
        assume(vocab.decode_bytes(ids) == data)
        m = compiled.matcher()
        assert walk(m, ids), text
        assert eos_allowed(m)

    check()


# -- soundness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize(("pattern", "flags"), PATTERNS, ids=IDS)
def test_text_that_does_not_match_is_refused_somewhere(name, pattern, flags, tokenizers, vocabularies):
    vocab, tok = vocabularies(name), tokenizers(name)
    compiled = regex(pattern, flags).compile(vocab)
    matching = st.from_regex(re.compile(pattern, flags), fullmatch=True)
    noise = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=4)

    @SETTINGS
    @given(matching, st.integers(0, 30), noise, st.text(max_size=10))
    def check(good, cut, insert, arbitrary):
        """Soundness: for text re.fullmatch rejects, some token is refused (its mask bit clear) or EOS is."""
        for text in (good[:cut] + insert + good[cut + 1 :], arbitrary):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text) or re.fullmatch(pattern, text, flags):
                continue
            ids = tok.encode(text, add_special_tokens=False)
            if vocab.decode_bytes(ids) != text.encode("utf-8"):
                continue  # the tokenizer cannot write this text (a byte missing from its vocabulary)
            m = compiled.matcher()
            if walk(m, ids):
                assert not m.is_accepting() and not eos_allowed(m), text

    check()


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize(("pattern", "flags"), [*PATTERNS[:4], (r"(?s).*", 0)], ids=[*IDS[:4], "dotall"])
def test_cached_masks_equal_a_brute_force_mask_over_every_token(name, pattern, flags, vocabularies):
    vocab = vocabularies(name)
    compiled = regex(pattern, flags).compile(vocab)
    rng = np.random.default_rng(0)
    states = sorted({0, compiled.dfa.n_states - 1, *rng.integers(0, compiled.dfa.n_states, 4).tolist()})
    for state in states:
        got = allowed_ids(compiled.state_mask(state), vocab.vocab_size)
        assert np.array_equal(got, brute_force_mask(compiled, state)), f"state {state}"


def test_precomputed_masks_equal_lazy_ones(vocabularies):
    vocab = vocabularies("gpt2")
    lazy = CompiledRegex(regex(r"[a-c]{2}\d?x").dfa, vocab)
    eager = CompiledRegex(regex(r"[a-c]{2}\d?x").dfa, vocab)
    eager.precompute()
    for state in range(lazy.dfa.n_states):
        assert np.array_equal(lazy.state_mask(state), eager.state_mask(state))


def test_masks_filled_from_many_threads_agree(vocabularies):
    vocab = vocabularies("llama3")
    compiled = CompiledRegex(regex(r"[a-z]{1,6}\d{0,3}").dfa, vocab)
    results: dict[int, list[np.ndarray]] = {}

    def work(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(compiled.dfa.n_states)
        results[seed] = [compiled.state_mask(int(s)).copy() for s in sorted(order[:8])]

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, masks in results.items():
        order = sorted(np.random.default_rng(seed).permutation(compiled.dfa.n_states)[:8])
        for s, mask in zip(order, masks, strict=True):
            assert np.array_equal(mask, compiled.state_mask(int(s)))


# -- matcher protocol on a small vocabulary with specials and padding --------------------------------------
TOY_TOKENS = [b"a", b"b", b"ab", b"abc", b"c", b"<eos>", b"<sp>", b"", b"\xc3", b"\xa9", "é".encode(), b"ca"]
EOS, SPECIAL, EMPTY = 5, 6, 7


@pytest.fixture
def toy() -> Vocabulary:
    return Vocabulary(TOY_TOKENS, vocab_size=70, special_ids=[EOS, SPECIAL], eos_ids=[EOS], name="toy")


def test_padding_specials_and_empty_tokens_are_never_allowed(toy):
    m = regex(r"(?s).*").compile(toy).matcher()
    allowed = set(m.allowed_tokens().tolist())
    assert allowed == {0, 1, 2, 3, 4, 8, 10, 11, EOS}  # not 9: a lone continuation byte is not UTF-8
    row = fresh_row(toy)
    m.fill_bitmask(row, 0)
    assert not any(bit(row[0], t) for t in range(len(TOY_TOKENS), 96)), "a padding bit is set"
    assert not m.accept(SPECIAL) and not m.accept(EMPTY) and not m.accept(len(TOY_TOKENS))
    assert not m.accept(69)
    assert m.state == 0


def test_specials_are_not_allowed_even_when_their_text_matches(toy):
    m = regex(r"<sp>|a").compile(toy).matcher()
    assert set(m.allowed_tokens().tolist()) == {0}


def test_eos_is_allowed_exactly_when_accepting_and_terminates(toy):
    m = regex(r"ab?").compile(toy).matcher()
    assert not m.is_accepting() and not m.is_allowed(EOS) and not m.accept(EOS)
    assert m.accept(0) and m.is_accepting() and m.is_allowed(EOS)
    assert set(m.allowed_tokens().tolist()) == {1, EOS}
    assert m.accept(EOS) and m.is_terminated() and m.is_accepting()
    assert set(m.allowed_tokens().tolist()) == {EOS}
    assert not m.accept(1)
    assert m.accept(EOS) and m.is_terminated()


def test_rollback_restores_earlier_states_and_masks(toy):
    m = regex(r"(ab|c)+").compile(toy).matcher()
    masks = [m.allowed_tokens()]
    for token in (2, 4, 0, 1):  # "ab" "c" "a" "b"
        assert m.accept(token)
        masks.append(m.allowed_tokens())
    assert m.accept(EOS)
    m.rollback(1)
    assert not m.is_terminated() and np.array_equal(m.allowed_tokens(), masks[4])
    m.rollback(2)
    assert np.array_equal(m.allowed_tokens(), masks[2])
    m.rollback(0)
    assert np.array_equal(m.allowed_tokens(), masks[2])
    with pytest.raises(ConstraintError):
        m.rollback(3)
    with pytest.raises(ConstraintError):
        m.rollback(-1)
    m.rollback(2)
    assert np.array_equal(m.allowed_tokens(), masks[0]) and m.state == 0


def test_fork_is_independent_and_accepts_leaves_the_state_unchanged(toy):
    m = regex(r"a+b").compile(toy).matcher()
    assert m.accept(0)
    fork = m.fork()
    assert fork.accept(1) and fork.is_accepting()
    assert not m.is_accepting() and m.accept(0)
    assert fork.state != m.state
    before = m.state
    assert m.accepts([0, 0, 1]) and not m.accepts([1, 1])
    assert m.state == before and len(m._stack) == 3


def test_split_utf8_tokens_are_accepted(toy):
    m = regex(r"é+").compile(toy).matcher()
    assert m.is_allowed(8) and not m.is_allowed(9) and m.is_allowed(10)
    assert m.accept(8) and not m.is_accepting() and set(m.allowed_tokens().tolist()) == {9}
    assert m.accept(9) and m.is_accepting() and m.accept(10)


def test_token_ids_out_of_range_raise(toy):
    m = regex("a").compile(toy).matcher()
    for token in (-1, 70, 10**9):
        with pytest.raises(TokenOutOfRangeError):
            m.accept(token)
        with pytest.raises(TokenOutOfRangeError):
            m.is_allowed(token)


@pytest.mark.parametrize(
    "bitmask",
    [
        np.zeros((1, 3), dtype=np.int64),
        np.zeros((1, 2), dtype=np.int32),
        np.zeros(3, dtype=np.int32),
        torch.zeros((1, 3), dtype=torch.float32),
        torch.zeros((2, 4), dtype=torch.int32),
    ],
)
def test_bitmasks_of_the_wrong_dtype_or_shape_raise(toy, bitmask):
    with pytest.raises(BitmaskError):
        regex("a").compile(toy).matcher().fill_bitmask(bitmask, 0)


def test_a_row_out_of_range_raises(toy):
    with pytest.raises(BitmaskError):
        regex("a").compile(toy).matcher().fill_bitmask(allocate_bitmask(2, toy.vocab_size), 2)


def test_fill_writes_only_its_row_of_a_torch_bitmask(toy):
    bitmask = allocate_bitmask(3, toy.vocab_size)
    regex("c").compile(toy).matcher().fill_bitmask(bitmask, 1)
    assert (bitmask[0] == -1).all() and (bitmask[2] == -1).all()
    assert allowed_ids(bitmask[1], toy.vocab_size).tolist() == [4]


def test_compile_is_cached_per_spec_and_vocabulary(toy):
    a = compile(regex(r"a|b"), toy)
    assert compile(regex(r"a|b"), toy) is a and compile(regex(r"a|b", re.I), toy) is not a
    assert isinstance(a, CompiledRegex) and isinstance(a.matcher(), RegexMatcher)


# -- choice ------------------------------------------------------------------------------------------------
def test_choice_allows_exactly_the_options(vocabularies):
    vocab = vocabularies("llama3")
    options = ["yes", "no", "maybe", "no way", "Ünïcödé ✓"]
    compiled = choice(options).compile(vocab)
    for option in options:
        for tokens in ([vocab.token_id(bytes([b])) for b in option.encode()], vocab_encode(vocab, option)):
            m = compiled.matcher()
            assert walk(m, tokens) and m.is_accepting() and eos_allowed(m)
    m = compiled.matcher()
    assert walk(m, vocab_encode(vocab, "no")) and m.is_accepting()
    assert m.is_allowed(vocab.token_id(" way")) and not m.is_allowed(vocab.token_id(" yes"))
    for state in range(compiled.dfa.n_states):
        assert np.array_equal(
            allowed_ids(compiled.state_mask(state), vocab.vocab_size), brute_force_mask(compiled, state)
        )


def vocab_encode(vocab: Vocabulary, text: str) -> list[int]:
    """Greedy longest-match tokenization (a valid, non-canonical one) for tests that need no tokenizer."""
    data, out, i = text.encode(), [], 0
    while i < len(data):
        j = max(j for j in range(i + 1, len(data) + 1) if data[i:j] in vocab._index)
        out.append(vocab._index[data[i:j]])
        i = j
    return out


@pytest.mark.parametrize("options", [[], "abc", [1, "a"], None])
def test_choice_rejects_bad_options(options):
    with pytest.raises(SpecError):
        choice(options)


def test_choice_has_a_state_limit():
    options = [hashlib.sha1(str(i).encode()).hexdigest()[:12] for i in range(200)]  # little sharing
    with pytest.raises(CompileLimitError):
        choice(options, max_states=100)
    assert choice(options).dfa.n_states > 100


def test_choice_and_regex_are_frozen_hashable_specs():
    assert regex("a+") == regex("a+") and hash(regex("a+")) == hash(Regex("a+"))
    assert choice(["x", "y"]).cache_key() == (("x", "y"), choice(["x"]).max_states)
    assert isinstance(choice(["x"]), Choice)
    with pytest.raises(AttributeError):
        regex("a").pattern = "b"


# -- errors at the constraint level ---------------------------------------------------------------------
def test_regex_errors_surface_from_the_constructor():
    with pytest.raises(UnsupportedError, match="backreference"):
        regex(r"(a)\1")
    with pytest.raises(SpecError, match="position 1"):
        regex("a(")
    with pytest.raises(SpecError, match="matches no text"):
        regex(r"[^\s\S]")
    with pytest.raises(CompileLimitError):
        regex(r"(a|b)*a(a|b){40}")
    with pytest.raises(SpecError):
        regex("a", max_states=0)
