"""Bitmask ABI helpers, the compile cache and the batched fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrain import (
    BitmaskError,
    CompiledConstraint,
    Constraint,
    ConstraintError,
    Matcher,
    Vocabulary,
    allocate_bitmask,
    bitmask_to_bool,
    bool_to_bitmask,
    check_bitmask,
    compile,
    fill_bitmasks,
)
from constrain.bitmask import allowed_ids, row_view


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 200), st.data())
def test_bool_and_bitmask_round_trip_follows_the_abi(batch, vocab_size, data):
    """Packing then unpacking is the identity, and bit j of row i sits at word j >> 5, bit j & 31."""
    flags = data.draw(st.lists(st.booleans(), min_size=batch * vocab_size, max_size=batch * vocab_size))
    allowed = torch.tensor(flags, dtype=torch.bool).reshape(batch, vocab_size)
    packed = bool_to_bitmask(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (batch, (vocab_size + 31) // 32)
    assert torch.equal(bitmask_to_bool(packed, vocab_size), allowed)
    for i in range(batch):
        for j in range(vocab_size):
            assert bool((int(packed[i, j >> 5]) >> (j & 31)) & 1) == bool(allowed[i, j])
        assert (
            allowed_ids(packed[i].numpy(), vocab_size).tolist()
            == torch.nonzero(allowed[i]).flatten().tolist()
        )


def test_allocate_bitmask_allows_everything_with_the_abi_shape():
    mask = allocate_bitmask(3, 100)
    assert mask.shape == (3, 4) and mask.dtype == torch.int32
    assert bitmask_to_bool(mask, 100).all()


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.zeros(2, 4, dtype=torch.int64), "dtype must be int32"),
        (torch.zeros(4, dtype=torch.int32), "must be 2-D"),
        (torch.zeros(2, 3, dtype=torch.int32), "needs 4"),
        (np.zeros((2, 5), dtype=np.int32), "needs 4"),
    ],
)
def test_bitmask_of_wrong_dtype_or_shape_is_refused(mask, message):
    with pytest.raises(BitmaskError, match=message):
        check_bitmask(mask, 100)


def test_row_view_refuses_a_row_out_of_range_and_shares_memory():
    mask = allocate_bitmask(2, 64)
    with pytest.raises(BitmaskError, match="row 2 out of range"):
        row_view(mask, 2, 64)
    row_view(mask, 1, 64)[:] = 0
    assert mask[1].eq(0).all() and mask[0].eq(-1).all()


class _Fixed(Constraint):
    """A test double of the protocol: allows exactly one token id, then only EOS."""

    def __init__(self, token: int):
        self.token = token
        self.compiles = 0

    def cache_key(self):
        return self.token

    def _compile(self, vocab):
        self.compiles += 1
        return _FixedCompiled(vocab, self.token)


class _FixedCompiled(CompiledConstraint):
    def __init__(self, vocab, token):
        self.vocab, self.token = vocab, token

    def matcher(self):
        return _FixedMatcher(self.vocab, self.token)


class _FixedMatcher(Matcher):
    def __init__(self, vocab, token):
        self.vocab, self.token, self.done = vocab, token, 0

    def fill_bitmask(self, bitmask, row=0):
        words = row_view(bitmask, row, self.vocab.vocab_size)
        words[:] = 0
        for t in [self.token] if self.done == 0 else sorted(self.vocab.eos_ids):
            words[t >> 5] |= np.uint32(1 << (t & 31))

    def accept(self, token):
        self.vocab.check_token(token)
        ok = token == self.token if self.done == 0 else token in self.vocab.eos_ids and self.done == 1
        self.done += ok
        return ok

    def rollback(self, n=1):
        self._check_rollback(n, self.done)
        self.done -= n

    def fork(self):
        m = _FixedMatcher(self.vocab, self.token)
        m.done = self.done
        return m

    def is_accepting(self):
        return self.done == 1

    def is_terminated(self):
        return self.done == 2


VOCAB = Vocabulary(
    [b"<eos>"] + [bytes([c]) for c in b"abcdefghij"], vocab_size=40, special_ids=[0], eos_ids=[0]
)


def test_compile_caches_by_spec_and_vocabulary():
    spec = _Fixed(3)
    first = compile(spec, VOCAB)
    assert compile(spec, VOCAB) is first and spec.compiles == 1
    other_vocab = Vocabulary(VOCAB.token_bytes, vocab_size=64, special_ids=[0], eos_ids=[0])
    assert compile(spec, other_vocab) is not first


def test_compile_refuses_what_is_not_a_constraint():
    with pytest.raises(ConstraintError, match="expects a Constraint"):
        compile("[a-z]+", VOCAB)


def test_fill_bitmasks_fills_each_row_and_leaves_none_unconstrained():
    matchers = [compile(_Fixed(5), VOCAB).matcher(), None]
    mask = allocate_bitmask(2, VOCAB.vocab_size)
    fill_bitmasks(matchers, mask, VOCAB)
    assert allowed_ids(mask[0].numpy(), 40).tolist() == [5]
    # Unconstrained: every tokenizer id, no padding id past the tokenizer's 11 tokens.
    assert allowed_ids(mask[1].numpy(), 40).tolist() == list(range(11))
    with pytest.raises(BitmaskError, match="rows"):
        fill_bitmasks(matchers, allocate_bitmask(3, 40), VOCAB)


def test_matcher_conveniences_follow_the_protocol():
    m = compile(_Fixed(2), VOCAB).matcher()
    assert m.allowed_tokens().tolist() == [2]
    assert m.accepts([2, 0]) and m.done == 0  # accepts() leaves the state unchanged
    assert not m.accepts([3])
    assert m.accept(2) and m.is_accepting()
    with pytest.raises(ConstraintError, match="cannot roll back 2"):
        m.rollback(2)


def test_clear_compile_cache_also_forgets_the_regex_dfa_cache():
    from constrain.constraint import clear_compile_cache
    from constrain.grammars.regex import compile_dfa, regex

    compile(regex(r"[ab]{3}"), VOCAB)
    assert compile_dfa.cache_info().currsize > 0
    clear_compile_cache()
    assert compile_dfa.cache_info().currsize == 0
