"""Masked sampling: the torch reference (`constrain.kernels`) and the public API (`constrain.sampling`).

Oracles are independent of the code under test: bitmasks are packed bit by bit in numpy, expected
distributions are computed in float64 numpy straight from the written semantics (sort, cumulative sum,
thresholds), and frequencies are compared with scipy's chi-square test on fixed seeds (deterministic, so
never flaky).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from constrain import kernels
from constrain.errors import BitmaskError, ConstraintError, NoAllowedTokenError
from constrain.kernels.torch_sampling import (
    exponential_from_bits,
    masked_sample_torch,
    philox4x32,
    philox_rounds,
    row_seeds,
    token_bits,
)
from constrain.sampling import apply_bitmask_, masked_sample

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DRAWS = 20_000
ALPHA = 1e-3  # chi-square p-value below which a sampled distribution is rejected


# --------------------------------------------------------------------------------------------------- oracles


def pack_bits(allowed: np.ndarray, padding: np.random.Generator | None = None) -> torch.Tensor:
    """Pack a bool (rows, V) array into the int32 ABI bit by bit; `padding` sets random bits past V."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    packed = np.zeros((rows, words), dtype=np.uint64)
    for j in range(vocab):
        packed[:, j // 32] |= allowed[:, j].astype(np.uint64) << np.uint64(j % 32)
    if padding is not None:
        for j in range(vocab, words * 32):
            packed[:, j // 32] |= padding.integers(0, 2, rows).astype(np.uint64) << np.uint64(j % 32)
    return torch.from_numpy(packed.astype(np.uint32).view(np.int32).copy())


def masked_float64(logits_row: torch.Tensor, allowed_row: np.ndarray) -> np.ndarray:
    """The logits row as float64 (exactly its float32/bf16/fp16 values), -inf where disallowed."""
    return np.where(allowed_row, logits_row.double().numpy(), -np.inf)


def expected_probs(
    logits_row: torch.Tensor,
    allowed_row: np.ndarray,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> np.ndarray:
    """The distribution masked_sample draws from, written plainly in float64 (mask, T, top-k, top-p, min-p).

    Asserts that no token sits within 1e-5 of a top-p or min-p boundary, where float32 and float64 could
    legitimately disagree: the test data must be unambiguous.
    """
    x = masked_float64(logits_row, allowed_row)
    if temperature == 0:
        probs = np.zeros_like(x)
        probs[np.argmax(x)] = 1.0
        return probs
    t = (x - x.max()) / temperature
    keep = np.isfinite(t)
    if top_k > 0:
        kth = np.sort(t[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= t >= kth
    if top_p < 1.0:
        p = np.where(keep, np.exp(t), 0.0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        assert np.abs(cumulative - top_p).min() > 1e-5, "test data too close to the top-p boundary"
        m = min(np.searchsorted(cumulative, top_p), len(p) - 1)  # first position with cumulative >= top_p
        keep &= p >= p[order][m]
    if min_p > 0.0:
        p = np.where(keep, np.exp(t), 0.0)
        ratio = p / p.max()
        assert np.abs(ratio[keep] - min_p).min() > 1e-5, "test data too close to the min-p boundary"
        keep &= ratio >= min_p
    probs = np.where(keep, np.exp(t), 0.0)
    return probs / probs.sum()


def chi_square_pvalue(tokens: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value of `tokens` against `expected` (categories under 5 expected draws pooled)."""
    n = len(tokens)
    counts = np.bincount(tokens, minlength=len(expected))
    support = expected > 0
    observed, wanted = counts[support].astype(float), expected[support] * n
    small = wanted < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        wanted = np.append(wanted[~small], wanted[small].sum())
    if len(observed) < 2:
        return 1.0
    return float(stats.chisquare(observed, wanted).pvalue)


def assert_follows(tokens: torch.Tensor, expected: np.ndarray) -> None:
    """Every draw has positive expected probability and the frequencies pass the chi-square test."""
    tokens = tokens.numpy()
    assert (tokens >= 0).all()
    outside = tokens[expected[tokens] == 0]
    assert outside.size == 0, f"drew tokens with probability 0: {sorted(set(outside.tolist()))}"
    pvalue = chi_square_pvalue(tokens, expected)
    assert pvalue > ALPHA, f"chi-square p = {pvalue:.3g}"


def draw(logits_row: torch.Tensor, allowed_row: np.ndarray, n: int = DRAWS, seed: int = 0, **params):
    """`n` draws from one logits row: n bitmask rows all mapped to logits row 0 through `indices`."""
    bitmask = pack_bits(np.repeat(allowed_row[None, :], n, axis=0))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.zeros(n, dtype=torch.int64)
    return masked_sample(logits_row, bitmask, indices=indices, generator=generator, **params)


def random_case(
    seed: int, vocab: int, density: float = 0.5, dtype: torch.dtype = torch.float32, scale: float = 2.0
):
    """A (1, V) logits row (normal with std `scale`) and a bool mask with at least two allowed tokens."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, scale, (1, vocab)).astype(np.float32)).to(dtype)
    allowed = rng.random(vocab) < density
    allowed[rng.choice(vocab, 2, replace=False)] = True
    return logits, allowed


# ------------------------------------------------------------------------------------------------ randomness


def test_philox_matches_random123_known_answers():
    """Philox-4x32-10 reproduces the known-answer vectors published with Random123 (kat_vectors)."""
    m = 0xFFFFFFFF
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((m, m, m, m, m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for words, expected in cases:
        out = philox_rounds(*(torch.tensor([w]) for w in words))
        assert tuple(int(o) for o in out) == expected


def test_philox_seed_is_split_into_low_and_high_key_words():
    """philox4x32(seed, j) keys Philox with (low 32 bits, high 32 bits) of the seed's two's complement."""
    seeds = torch.tensor([0, 1, 2**32 + 5, -1, -(2**40) + 7, 2**63 - 1])
    counters = torch.tensor([0, 1, 7, 2**31, 2**32 - 1, 12345])
    low = seeds & 0xFFFFFFFF
    high = (seeds >> 32) & 0xFFFFFFFF
    zero = torch.zeros_like(seeds)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            philox4x32(seeds, counters), philox_rounds(counters, zero, zero, zero, low, high), strict=True
        )
    )


def test_exponential_from_bits_is_finite_and_positive_at_the_extremes():
    bits = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFF])
    e = exponential_from_bits(bits)
    assert e.dtype == torch.float32
    assert torch.isfinite(e).all() and (e > 0).all()
    assert e[0] == e.max() and e[3] == e.min()  # U smallest at bits 0, closest to 1 at 0x80000000


def test_token_bits_of_four_consecutive_tokens_are_the_four_words_of_one_philox_call():
    """Token j uses word j % 4 of Philox counter j // 4 (Random123's known answer for key 0, counter 0)."""
    zero = torch.zeros(8, dtype=torch.int64)
    words = token_bits(zero, torch.arange(8))
    assert words[:4].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words[4:].tolist() == [int(w) for w in philox4x32(torch.tensor(0), torch.tensor(1))]


def test_token_bits_fast_cpu_path_equals_the_torch_philox():
    """The numba path (which reuses one Philox call for runs of tokens sharing a seed and counter) equals the
    torch Philox word by word: sorted runs, seed changes inside a run of one counter, and random order."""
    gen = torch.Generator().manual_seed(1)
    random_seeds = torch.randint(-(2**63), 2**63 - 1, (3000,), generator=gen)
    random_tokens = torch.randint(0, 2**32, (3000,), generator=gen)
    run_seeds = torch.tensor([7] * 6 + [8] * 3 + [7] * 4)  # 7 -> 8 -> 7 while the counter stays the same
    run_tokens = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 4, 6, 9, 2**32 - 1])
    seeds = torch.cat([random_seeds, run_seeds, torch.full((400,), 3)])
    tokens = torch.cat([random_tokens, run_tokens, torch.arange(400).flip(0)])
    words = philox4x32(seeds, tokens >> 2)
    expected = torch.zeros_like(tokens)
    for w in range(4):
        expected = torch.where((tokens & 3) == w, words[w], expected)
    assert torch.equal(token_bits(seeds, tokens), expected)


def test_exponential_from_philox_words_is_standard_exponential():
    """The variates of 200,000 consecutive tokens (all four words of 50,000 calls) pass a Kolmogorov-Smirnov
    test against Exp(1)."""
    e = exponential_from_bits(token_bits(torch.full((200_000,), 2024), torch.arange(200_000)))
    assert stats.kstest(e.double().numpy(), "expon").pvalue > ALPHA
    for w in range(4):  # and each word on its own
        assert stats.kstest(e[w::4].double().numpy(), "expon").pvalue > ALPHA


def test_row_seeds_from_a_generator_are_reproducible_and_distinct():
    a = row_seeds(64, generator=torch.Generator().manual_seed(5))
    b = row_seeds(64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.unique().numel() == 64 and (a >= 0).all()
    given_seeds = torch.tensor([3, -4, 3], dtype=torch.int32)
    assert torch.equal(row_seeds(3, seeds=given_seeds), given_seeds.long())


# -------------------------------------------------------------------------------------------- apply_bitmask_


@HYPOTHESIS
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 200),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf(rows, vocab, dtype, seed):
    """For any mask (random bits past V), allowed logits keep their exact value and the others become -inf."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((rows, vocab)) < rng.random()
    logits = torch.from_numpy(rng.normal(0, 3, (rows, vocab)).astype(np.float32)).to(dtype)
    out = logits.clone()
    assert apply_bitmask_(out, pack_bits(allowed, padding=rng)) is out
    expected = torch.where(torch.from_numpy(allowed), logits, torch.tensor(float("-inf"), dtype=dtype))
    assert torch.equal(out, expected)


def test_apply_bitmask_with_indices_masks_only_listed_rows_with_their_own_mask_row():
    """XGrammar's convention: logits row b is masked with bitmask row b for each b in indices."""
    rng = np.random.default_rng(1)
    allowed = rng.random((4, 70)) < 0.5
    logits = torch.randn(4, 70)
    out = logits.clone()
    apply_bitmask_(out, pack_bits(allowed), indices=torch.tensor([2, 0]))
    for b in range(4):
        if b in (0, 2):
            assert torch.equal(out[b], torch.where(torch.from_numpy(allowed[b]), logits[b], float("-inf")))
        else:
            assert torch.equal(out[b], logits[b])


def test_apply_bitmask_with_indices_accepts_a_bitmask_with_fewer_rows_than_the_logits():
    allowed = np.zeros((2, 40), dtype=bool)
    allowed[1, 5] = True
    logits = torch.randn(6, 40)
    out = logits.clone()
    apply_bitmask_(out, pack_bits(allowed), indices=[1])
    assert torch.isinf(out[1]).sum() == 39 and out[1, 5] == logits[1, 5]
    assert torch.equal(out[[0, 2, 3, 4, 5]], logits[[0, 2, 3, 4, 5]])


# ------------------------------------------------------------------------------------------------- soundness


@HYPOTHESIS
@given(
    vocab=st.integers(1, 300),
    logit_rows=st.integers(1, 4),
    rows=st.integers(1, 48),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    per_row=st.booleans(),
)
def test_never_draws_a_disallowed_token(vocab, logit_rows, rows, dtype, seed, per_row):
    """Whatever the logits, mask (random bits past V), dtype and parameters, every drawn token is allowed by
    its mask row, and a row gets -1 exactly when its mask allows no token below V."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((rows, vocab)) < rng.choice([0.0, 0.01, 0.2, 0.9])
    allowed[rng.random(rows) < 0.7, rng.integers(0, vocab)] = True  # most rows allow something
    logits = torch.from_numpy(rng.normal(0, 4, (logit_rows, vocab)).astype(np.float32)).to(dtype)
    indices = torch.from_numpy(rng.integers(0, logit_rows, rows))

    def param(low, high, integer=False):
        values = rng.integers(low, high + 1, rows) if integer else rng.uniform(low, high, rows)
        return torch.from_numpy(values) if per_row else values[0].item()

    temperature = param(0, 2)
    if per_row:
        temperature[rng.random(rows) < 0.2] = 0.0  # some greedy rows among sampled ones
    tokens = masked_sample(
        logits,
        pack_bits(allowed, padding=rng),
        temperature=temperature,
        top_k=param(0, vocab + 2, integer=True),
        top_p=param(0.05, 1),
        min_p=param(0, 0.5),
        seeds=torch.from_numpy(rng.integers(-(2**62), 2**62, rows)),
        indices=indices,
        on_empty="return",
    ).numpy()
    empty = ~allowed.any(axis=1)
    assert (tokens[empty] == -1).all()
    assert (tokens[~empty] >= 0).all() and (tokens < vocab).all()
    assert allowed[np.flatnonzero(~empty), tokens[~empty]].all()


def test_a_row_whose_only_bits_lie_past_the_vocabulary_is_empty():
    allowed = np.zeros((1, 33), dtype=bool)  # V = 33: two words, bits 33..63 are padding
    bitmask = pack_bits(allowed)
    bitmask[0, 1] = -2  # every padding bit set, bit 32 (token 32) clear
    tokens = masked_sample(torch.randn(1, 33), bitmask, on_empty="return")
    assert tokens.tolist() == [-1]


# --------------------------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_frequencies_match_the_renormalised_masked_softmax(dtype):
    logits, allowed = random_case(seed=11, vocab=45, dtype=dtype)
    assert_follows(draw(logits, allowed), expected_probs(logits[0], allowed))


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.5},
        {"temperature": 2.0},
        {"top_k": 5},
        {"top_k": 5, "temperature": 3.0},
        {"top_p": 0.7},
        {"top_p": 0.3, "temperature": 1.7},
        {"min_p": 0.2},
        {"min_p": 0.05, "temperature": 0.6},
        {"temperature": 0.8, "top_k": 12, "top_p": 0.85, "min_p": 0.03},
    ],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()),
)
def test_sampled_frequencies_match_the_filtered_distribution(params):
    logits, allowed = random_case(seed=3, vocab=70, density=0.6, scale=1.0)
    expected = expected_probs(logits[0], allowed, **params)
    assert (expected > 0).sum() >= 2  # the filters leave a real choice
    assert_follows(draw(logits, allowed, **params), expected)


def test_per_row_parameter_tensors_apply_to_their_own_rows():
    logits, allowed = random_case(seed=8, vocab=60, density=0.7)
    half = DRAWS // 2
    temperature = torch.tensor([0.5] * half + [1.5] * half)
    top_k = torch.tensor([4] * half + [0] * half)
    top_p = torch.tensor([1.0] * half + [0.6] * half)
    tokens = draw(logits, allowed, temperature=temperature, top_k=top_k, top_p=top_p)
    assert_follows(tokens[:half], expected_probs(logits[0], allowed, temperature=0.5, top_k=4))
    assert_follows(tokens[half:], expected_probs(logits[0], allowed, temperature=1.5, top_p=0.6))


def test_chi_square_check_rejects_a_wrong_distribution():
    """The frequency test has power: draws at temperature 0.7 fail against the temperature-1 distribution."""
    logits, allowed = random_case(seed=11, vocab=45)
    tokens = draw(logits, allowed, temperature=0.7).numpy()
    assert chi_square_pvalue(tokens, expected_probs(logits[0], allowed)) < 1e-9


def test_top_k_keeps_every_token_tied_with_the_kth_value():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0, 2.5]])
    allowed = np.array([True, True, True, True, True, False])  # the masked 2.5 does not count
    tokens = draw(logits, allowed, n=4000, top_k=2)
    assert set(tokens.tolist()) == {0, 1, 2}
    assert_follows(tokens, expected_probs(logits[0], allowed, top_k=2))


def test_top_k_one_with_a_tied_maximum_samples_among_the_tied_tokens():
    logits = torch.tensor([[1.0, 5.0, 5.0, 4.9]])
    tokens = draw(logits, np.ones(4, dtype=bool), n=4000, top_k=1)
    assert_follows(tokens, np.array([0.0, 0.5, 0.5, 0.0]))


def test_top_p_keeps_every_token_tied_with_the_last_kept_one():
    # probabilities 0.4, 0.2, 0.2, 0.2: the prefix reaching 0.5 ends on a 0.2, so all three 0.2 tokens stay.
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    tokens = draw(logits, np.ones(4, dtype=bool), n=4000, top_p=0.5)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    # probabilities 0.5, 0.3, 0.2 with top_p 0.45: the most likely token alone reaches it.
    logits = torch.log(torch.tensor([[0.3, 0.5, 0.2]]))
    assert set(draw(logits, np.ones(3, dtype=bool), n=500, top_p=0.45).tolist()) == {1}


# ---------------------------------------------------------------------------------------------------- greedy


@HYPOTHESIS
@given(vocab=st.integers(1, 200), rows=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_greedy_is_the_argmax_over_allowed_tokens_with_ties_to_the_lowest_id(vocab, rows, seed):
    """temperature=0 returns the first (lowest-id) maximum of the masked logits; bf16 logits with few distinct
    values make ties common."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((rows, vocab)) < 0.5
    allowed[:, rng.integers(0, vocab)] = True
    logits = torch.from_numpy(rng.integers(-3, 4, (rows, vocab)).astype(np.float32)).to(torch.bfloat16)
    tokens = masked_sample(logits, pack_bits(allowed), temperature=0.0, top_k=3, top_p=0.2, min_p=0.9)
    for i in range(rows):
        assert tokens[i] == np.argmax(masked_float64(logits[i], allowed[i]))  # np.argmax: first maximum


def test_top_k_one_equals_greedy_when_the_maximum_is_unique():
    rng = np.random.default_rng(4)
    allowed = rng.random((32, 500)) < 0.3
    allowed[:, 0] = True
    logits = torch.from_numpy(rng.normal(0, 2, (32, 500)).astype(np.float32))
    bitmask = pack_bits(allowed)
    greedy = masked_sample(logits, bitmask, temperature=0.0)
    seeds = torch.arange(32)
    assert torch.equal(masked_sample(logits, bitmask, top_k=1, temperature=0.8, seeds=seeds), greedy)


def test_neutral_filter_values_are_no_ops():
    """top_k=0, top_p=1.0 and min_p=0.0 given as per-row tensors, and top_k >= V, draw the same tokens as no
    filter at all (same seeds): the filter code runs but removes nothing, not even negligible tokens."""
    rng = np.random.default_rng(6)
    rows, vocab = 256, 90
    allowed = rng.random((rows, vocab)) < 0.5
    allowed[:, 3] = True
    logits = torch.from_numpy(rng.normal(0, 6, (rows, vocab)).astype(np.float32))
    bitmask, seeds = pack_bits(allowed), torch.arange(rows) * 7919
    plain = masked_sample(logits, bitmask, seeds=seeds)
    neutral = masked_sample(
        logits,
        bitmask,
        seeds=seeds,
        top_k=torch.zeros(rows, dtype=torch.int64),
        top_p=torch.ones(rows),
        min_p=torch.zeros(rows),
    )
    assert torch.equal(plain, neutral)
    assert torch.equal(plain, masked_sample(logits, bitmask, seeds=seeds, top_k=vocab))
    assert torch.equal(plain, masked_sample(logits, bitmask, seeds=seeds, top_k=10**30))


# -------------------------------------------------------------------------------------------- seeds, indices


def test_same_seed_gives_the_same_token_whatever_the_other_rows_hold():
    rng = np.random.default_rng(9)
    vocab = 300
    logits0 = torch.from_numpy(rng.normal(0, 1, (1, vocab)).astype(np.float32))
    allowed0 = rng.random((1, vocab)) < 0.5
    reference = None
    for trial in range(5):
        others = 1 + trial * 3
        logits = torch.cat([logits0, torch.from_numpy(rng.normal(0, 1, (others, vocab)).astype(np.float32))])
        allowed = np.concatenate([allowed0, rng.random((others, vocab)) < 0.5])
        seeds = torch.cat([torch.tensor([1234]), torch.from_numpy(rng.integers(0, 2**62, others))])
        top_k = torch.from_numpy(np.concatenate([[20], rng.integers(0, 50, others)]))
        token = masked_sample(logits, pack_bits(allowed), seeds=seeds, top_k=top_k, temperature=1.3)[0]
        reference = token if reference is None else reference
        assert token == reference
    # Moving the row (with its seed) to another position moves its token with it.
    seeds = torch.tensor([1234, 99, 5])
    logits = torch.from_numpy(rng.normal(0, 1, (3, vocab)).astype(np.float32))
    allowed = rng.random((3, vocab)) < 0.5
    forward = masked_sample(logits, pack_bits(allowed), seeds=seeds)
    backward = masked_sample(logits.flip(0), pack_bits(allowed[::-1]), seeds=seeds.flip(0))
    assert torch.equal(forward, backward.flip(0))


def test_different_seeds_give_different_draws_and_generators_reproduce():
    logits, allowed = random_case(seed=2, vocab=1000, density=1.0)
    allowed_rows = np.repeat(allowed[None], 64, axis=0)
    bitmask = pack_bits(allowed_rows)
    logits = logits.repeat(64, 1) * 0.1  # a flat distribution: 64 seeds should not agree
    assert masked_sample(logits, bitmask, seeds=torch.arange(64)).unique().numel() > 40
    first = masked_sample(logits, bitmask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, masked_sample(logits, bitmask, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(17)
    default_a = masked_sample(logits, bitmask)
    torch.manual_seed(17)
    assert torch.equal(default_a, masked_sample(logits, bitmask))


def test_indices_map_each_output_row_to_its_logits_row():
    """N > B: output row i equals a draw from the explicitly gathered logits[indices[i]], same seed."""
    rng = np.random.default_rng(12)
    vocab, rows = 77, 12
    logits = torch.from_numpy(rng.normal(0, 2, (3, vocab)).astype(np.float32))
    indices = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 1, 2, 0, 1])
    allowed = rng.random((rows, vocab)) < 0.4
    allowed[:, 0] = True
    bitmask, seeds = pack_bits(allowed), torch.arange(rows) + 100
    tokens, logprobs = masked_sample(
        logits, bitmask, indices=indices, seeds=seeds, top_p=0.9, return_logprobs=True
    )
    gathered, gathered_lp = masked_sample(
        logits[indices], bitmask, seeds=seeds, top_p=0.9, return_logprobs=True
    )
    assert torch.equal(tokens, gathered) and torch.equal(logprobs, gathered_lp)
    assert allowed[np.arange(rows), tokens.numpy()].all()


def test_masked_sample_leaves_the_logits_untouched():
    logits = torch.randn(3, 50)
    before = logits.clone()
    masked_sample(logits, pack_bits(np.random.default_rng(0).random((3, 50)) < 0.5), temperature=0.5, top_k=3)
    assert torch.equal(logits, before)


# -------------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_are_log_softmax_of_the_masked_logits_at_the_chosen_tokens(dtype):
    """Temperature and filters change what is drawn, not the score: log_softmax at temperature 1."""
    rng = np.random.default_rng(21)
    rows, vocab = 64, 130
    allowed = rng.random((rows, vocab)) < 0.3
    allowed[:, 7] = True
    logits = torch.from_numpy(rng.normal(0, 5, (rows, vocab)).astype(np.float32)).to(dtype)
    temperature = torch.from_numpy(np.where(np.arange(rows) % 4 == 0, 0.0, 0.7))
    tokens, logprobs = masked_sample(
        logits,
        pack_bits(allowed),
        temperature=temperature,
        top_k=9,
        min_p=0.01,
        seeds=torch.arange(rows),
        return_logprobs=True,
    )
    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
    for i in range(rows):
        x = masked_float64(logits[i], allowed[i])
        log_softmax = x - x.max() - np.log(np.exp(x - x.max()).sum())
        assert logprobs[i].item() == pytest.approx(log_softmax[tokens[i]], abs=1e-4)


# ------------------------------------------------------------------------------------------------ empty rows


def test_empty_rows_give_minus_one_and_minus_inf_logprob_from_the_reference():
    allowed = np.zeros((3, 40), dtype=bool)
    allowed[1, 4] = allowed[2, 9] = True
    logits = torch.randn(3, 40)
    logits[2, 9] = float("-inf")  # row 2 allows only a token the model gives -inf
    tokens, logprobs = masked_sample_torch(logits, pack_bits(allowed), return_logprobs=True)
    assert tokens.tolist() == [-1, 4, -1]
    assert logprobs[0] == float("-inf") and logprobs[2] == float("-inf") and torch.isfinite(logprobs[1])


def test_public_sampler_raises_no_allowed_token_error_naming_the_rows():
    allowed = np.zeros((4, 40), dtype=bool)
    allowed[1, 4] = allowed[2, 9] = allowed[3, 1] = True
    logits = torch.randn(4, 40)
    logits[2, 9] = float("-inf")
    with pytest.raises(NoAllowedTokenError, match=r"row\(s\) \[0\] allow no token.*\[2\] allow only tokens"):
        masked_sample(logits, pack_bits(allowed))
    tokens = masked_sample(logits, pack_bits(allowed), on_empty="return")
    assert tokens.tolist() == [-1, 4, -1, 1]


# ---------------------------------------------------------------------------------------------------- errors


def _valid_call():
    logits = torch.randn(2, 40)
    return {"logits": logits, "bitmask": pack_bits(np.ones((2, 40), dtype=bool))}


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"bitmask": torch.zeros(2, 2, dtype=torch.int64)}, BitmaskError, "int32"),
        ({"bitmask": torch.zeros(2, 3, dtype=torch.int32)}, BitmaskError, "words per row"),
        ({"bitmask": torch.zeros(2, dtype=torch.int32)}, BitmaskError, "2-D"),
        ({"bitmask": torch.zeros(2, 2, dtype=torch.int32, device="meta")}, BitmaskError, "meta"),
        ({"bitmask": torch.zeros(3, 2, dtype=torch.int32)}, BitmaskError, "3 rows but logits have 2"),
        ({"bitmask": np.zeros((2, 2), dtype=np.int32)}, BitmaskError, "torch.Tensor"),
        ({"indices": torch.tensor([0, 1, 1])}, BitmaskError, "indices has 3 entries"),
        ({"indices": torch.tensor([0, 2])}, ConstraintError, r"indices\[1\] = 2 is out of range"),
        ({"indices": torch.tensor([0, -1])}, ConstraintError, r"indices\[1\] = -1"),
        ({"indices": torch.tensor([0.0, 1.0])}, ConstraintError, "indices must have an integer dtype"),
        ({"indices": torch.zeros(2, 1, dtype=torch.int64)}, ConstraintError, "indices must be 1-D"),
        ({"logits": torch.randn(40)}, ConstraintError, "logits must be 2-D"),
        ({"logits": torch.zeros(2, 40, dtype=torch.int32)}, ConstraintError, "logits dtype"),
        ({"logits": torch.zeros(2, 40, dtype=torch.float64)}, ConstraintError, "logits dtype"),
        ({"temperature": -0.5}, ConstraintError, "temperature = -0.5 is outside"),
        ({"temperature": float("nan")}, ConstraintError, "temperature"),
        ({"temperature": float("inf")}, ConstraintError, "temperature"),
        ({"temperature": torch.tensor([1.0, -1.0])}, ConstraintError, r"temperature\[1\] = -1.0"),
        ({"temperature": torch.ones(3)}, ConstraintError, r"temperature must be .* shape \(2,\)"),
        ({"temperature": "hot"}, ConstraintError, "temperature must be a float"),
        ({"top_p": 0.0}, ConstraintError, r"top_p = 0.0 is outside \(0, 1\]"),
        ({"top_p": 1.5}, ConstraintError, "top_p = 1.5"),
        ({"top_p": torch.tensor([0.5, 0.0])}, ConstraintError, r"top_p\[1\] = 0.0"),
        ({"top_k": -1}, ConstraintError, "top_k = -1"),
        ({"top_k": 2.5}, ConstraintError, "top_k must be an int"),
        ({"top_k": True}, ConstraintError, "top_k must be an int"),
        ({"top_k": torch.tensor([1.0, 2.0])}, ConstraintError, "top_k must be an integer tensor"),
        ({"top_k": torch.tensor([3, -2])}, ConstraintError, r"top_k\[1\] = -2"),
        ({"min_p": -0.1}, ConstraintError, "min_p = -0.1"),
        ({"min_p": 1.1}, ConstraintError, "min_p = 1.1"),
        ({"min_p": torch.tensor([0, 1])}, ConstraintError, "min_p must be a floating-point tensor"),
        ({"seeds": torch.tensor([1, 2]), "generator": torch.Generator()}, ConstraintError, "not both"),
        ({"seeds": torch.tensor([1, 2, 3])}, ConstraintError, r"seeds must be .* shape \(2,\)"),
        ({"seeds": torch.tensor([1.0, 2.0])}, ConstraintError, "seeds must have an integer dtype"),
        ({"generator": 42}, ConstraintError, "generator must be a torch.Generator"),
        ({"on_empty": "ignore"}, ConstraintError, "on_empty"),
    ],
)
def test_public_sampler_rejects_bad_input_with_a_message_naming_it(change, error, fragment):
    with pytest.raises(error, match=fragment):
        masked_sample(**{**_valid_call(), **change})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_public_sampler_rejects_nan_and_plus_inf_logits_naming_the_place(bad):
    call = _valid_call()
    call["logits"][1, 3] = bad
    with pytest.raises(ConstraintError, match=r"logits\[1, 3\] is (nan|inf)"):
        masked_sample(**call)
    with pytest.raises(ConstraintError, match=r"logits\[1, 3\]"):
        masked_sample(**call, indices=torch.tensor([1, 1]))
    masked_sample(**call, indices=torch.tensor([0, 0]))  # row 1 is not sampled from: fine


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"bitmask": torch.zeros(2, 2, dtype=torch.int16)}, BitmaskError, "int32"),
        ({"bitmask": torch.zeros(1, 2, dtype=torch.int32)}, BitmaskError, "1 rows but logits have 2"),
        ({"bitmask": torch.zeros(1, 2, dtype=torch.int32), "indices": [1]}, BitmaskError, "only 1 rows"),
        ({"indices": [0, 5]}, ConstraintError, r"indices\[1\] = 5 is out of range"),
        ({"indices": [[0]]}, ConstraintError, "indices must be 1-D"),
        ({"logits": torch.zeros(2, 40, dtype=torch.int64)}, ConstraintError, "logits dtype"),
    ],
)
def test_public_apply_bitmask_rejects_bad_input_with_a_message_naming_it(change, error, fragment):
    with pytest.raises(error, match=fragment):
        apply_bitmask_(**{**_valid_call(), **change})


# -------------------------------------------------------------------------------------------------- dispatch


def test_cpu_tensors_dispatch_to_the_torch_reference():
    assert kernels.backend("cpu") == "torch"
    logits = torch.randn(5, 64)
    bitmask = pack_bits(np.random.default_rng(0).random((5, 64)) < 0.5)
    seeds = torch.arange(5)
    assert torch.equal(
        kernels.masked_sample(logits, bitmask, seeds=seeds, top_p=0.8),
        kernels.masked_sample_torch(logits, bitmask, seeds=seeds, top_p=0.8),
    )
    empty = kernels.masked_sample(logits, bitmask[:0], indices=torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_kernels_package_imports_only_torch_numba_triton_and_the_standard_library():
    kernels_dir = Path(__file__).resolve().parent.parent / "kernels"
    allowed_roots = {"torch", "numba", "triton", "numpy"}
    for path in kernels_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside kernels/"
                names = [node.module] if node.level == 0 and node.module else []
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in allowed_roots or root in _stdlib(), f"{path.name} imports {name}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names)


# ------------------------------------------------------------------------------------------------------- GPU


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
def test_reference_on_cuda_matches_cpu_for_greedy_and_frequencies():
    logits, allowed = random_case(seed=11, vocab=45)
    bitmask = pack_bits(np.repeat(allowed[None], DRAWS, axis=0))
    indices = torch.zeros(DRAWS, dtype=torch.int64)
    seeds = torch.arange(DRAWS)
    greedy_cpu = kernels.masked_sample_torch(logits, bitmask[:1], temperature=0.0)
    greedy_gpu = kernels.masked_sample_torch(logits.cuda(), bitmask[:1].cuda(), temperature=0.0)
    assert torch.equal(greedy_cpu, greedy_gpu.cpu())
    tokens = kernels.masked_sample_torch(logits.cuda(), bitmask.cuda(), indices=indices.cuda(), seeds=seeds)
    assert_follows(tokens.cpu(), expected_probs(logits[0], allowed))
    # Same seeds, same Philox words; only float rounding of log() may differ between devices.
    cpu = kernels.masked_sample_torch(logits, bitmask, indices=indices, seeds=seeds)
    assert (cpu == tokens.cpu()).float().mean() > 0.999


@pytest.mark.gpu
@requires_cuda
def test_philox_matches_triton_randint():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def randint_kernel(out_ptr, seed_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        tl.store(out_ptr + offsets, tl.randint(seed, offsets).to(tl.int32, bitcast=True), mask=offsets < n)

    n = 5000
    for seed in (0, 1, 2**40 + 3, -7, 2**63 - 1):
        out = torch.empty(n, dtype=torch.int32, device="cuda")
        randint_kernel[(triton.cdiv(n, 1024),)](out, torch.tensor([seed], device="cuda"), n, BLOCK=1024)
        expected = philox4x32(torch.tensor(seed), torch.arange(n))[0]
        assert torch.equal(out.cpu().long() & 0xFFFFFFFF, expected)
