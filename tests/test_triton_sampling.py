"""The fused Triton masked sampler (kernels/triton_sampling.py) against independent oracles and the reference.

Without CUDA the kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported), on small shapes; with CUDA the same tests run on the GPU too, plus larger shapes.
Oracles: bitmasks packed with numpy's packbits, greedy answers and logprobs from float64 numpy, distributions
checked with scipy's chi-square test (fixed seeds: deterministic), and `masked_sample_torch` (whose semantics
the kernel reproduces with the same Philox noise, so the tokens themselves must agree).

The interpreter is slow (~50 ms per program), so CPU cases use few rows and small tiles; small tiles also make
the kernel cut short vocabularies into several tiles and slices, and make its candidate set small enough that
the exact fallback kernel runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from scipy import stats

CUDA = torch.cuda.is_available()
if not CUDA:  # normally already set by conftest.py; needed here when this file runs on its own
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from constrain import kernels  # noqa: E402
from constrain.errors import ConstraintError, NoAllowedTokenError  # noqa: E402
from constrain.kernels.torch_sampling import masked_sample_torch, token_bits  # noqa: E402
from constrain.kernels.triton_sampling import (  # noqa: E402
    _group_bits,
    apply_bitmask_triton_,
    masked_sample_triton,
    sample_full,
    sample_with_flags,
    with_config,
)
from constrain.sampling import masked_sample  # noqa: E402

# The interpreter must be chosen before triton's first import, and then it runs every kernel (CUDA ones too):
# one process tests either the compiled kernels on CUDA or the interpreter on the CPU.
DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(CUDA, reason="CUDA present: the compiled kernels are tested")
    ),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ONE: a whole short row in one tile (the interpreter's cost is per tile) and a small candidate set (2 groups
# of 32 tokens), so the exact fallback runs on flat rows. SMALL: several tiles and slices per row.
ONE = with_config(tile=256, groups_per_split=2, gathered_groups=2, num_warps=4)
SMALL = with_config(tile=64, groups_per_split=2, gathered_groups=2, num_warps=4)
FALLBACK = with_config(tile=256, groups_per_split=2, gathered_groups=2, num_warps=4, force_fallback=True)
pytestmark = pytest.mark.filterwarnings(
    # The interpreter evaluates both sides of tl.where in numpy: -inf - -inf and log(0) in unselected lanes.
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)
# No shrinking: under the interpreter each example costs seconds, and shrinking a failure can take minutes.
FEW = settings(
    max_examples=6 if not CUDA else 10,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
ALPHA = 1e-3  # chi-square p-value below which a sampled distribution is rejected


# ----------------------------------------------------------------------------------------------- oracles


def pack_bits(allowed: np.ndarray, padding: np.random.Generator | None = None) -> torch.Tensor:
    """Pack bool (rows, V) into the int32 ABI with numpy's packbits; `padding` sets random bits past V."""
    rows, vocab = allowed.shape
    words = (vocab + 31) // 32
    bits = np.zeros((rows, words * 32), dtype=bool)
    bits[:, :vocab] = allowed
    if padding is not None:
        bits[:, vocab:] = padding.random((rows, words * 32 - vocab)) < 0.5
    packed = np.packbits(bits, axis=1, bitorder="little").view("<u4")  # bit j of word w = token 32 w + j
    return torch.from_numpy(packed.view(np.int32).copy())


def masked64(logits_row: torch.Tensor, allowed_row: np.ndarray) -> np.ndarray:
    """A logits row as float64 (exactly its stored values), -inf where disallowed."""
    return np.where(allowed_row, logits_row.double().cpu().numpy(), -np.inf)


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def make_case(rows: int, vocab: int, dtype: torch.dtype, seed: int, density: float = 0.5, scale: float = 2.0):
    """Random logits (rows, vocab) on CPU, an allowed-token bool array (each row non-empty), its bitmask."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0.0, scale, (rows, vocab)).astype(np.float32)).to(dtype)
    allowed = rng.random((rows, vocab)) < density
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True
    return logits, allowed, pack_bits(allowed, padding=rng)


def on(device: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(device) for t in tensors]


# ------------------------------------------------------------------------------------- greedy and logprobs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_the_lowest_id_argmax_over_allowed_tokens_and_logprobs_are_log_softmax(device, dtype):
    rng = np.random.default_rng(1)
    rows, vocab = 6, 200
    # Small integers: many ties, so the lowest-id rule matters.
    logits = torch.from_numpy(rng.integers(-3, 4, (rows, vocab)).astype(np.float32)).to(dtype)
    allowed = rng.random((rows, vocab)) < 0.3
    allowed[:, 0] = False
    allowed[np.arange(rows), rng.integers(1, vocab, rows)] = True
    lg, bm = on(device, logits, pack_bits(allowed, padding=rng))
    tokens, logprobs = masked_sample_triton(
        lg, bm, temperature=0.0, seeds=torch.arange(rows), return_logprobs=True, config=SMALL
    )  # several tiles and slices: ties across them go to the lowest id
    for i in range(rows):
        x = masked64(logits[i], allowed[i])
        assert tokens[i].item() == int(np.argmax(x))  # numpy's argmax takes the first maximum
        expected = x[tokens[i].item()] - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert logprobs[i].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_logprobs_are_log_softmax_of_the_masked_logits_at_the_drawn_token(device):
    logits, allowed, bm = make_case(3, 150, torch.float32, seed=2)
    lg, bm = on(device, logits, bm)
    tokens, logprobs = masked_sample_triton(
        lg, bm, temperature=0.7, top_p=0.8, seeds=torch.arange(3) + 9, return_logprobs=True, config=ONE
    )
    for i in range(3):
        x = masked64(logits[i], allowed[i])
        assert allowed[i, tokens[i].item()]
        expected = x[tokens[i].item()] - (x.max() + np.log(np.exp(x - x.max()).sum()))
        assert logprobs[i].item() == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------- same tokens as the reference

PARAMS = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.5, 1.0, 1.7]),
        "top_k": st.sampled_from([0, 1, 3, 20]),
        "top_p": st.sampled_from([1.0, 0.95, 0.6, 0.2]),
        "min_p": st.sampled_from([0.0, 0.05, 0.3]),
    }
)


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(
    vocab=st.integers(1, 250),
    rows=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    params=PARAMS,
    density=st.sampled_from([0.02, 0.3, 1.0]),
    seed=st.integers(0, 2**31),
    several_tiles=st.booleans(),
)
def test_tokens_equal_the_reference_tokens_for_the_same_seeds(
    device, vocab, rows, dtype, params, density, seed, several_tiles
):
    """Property: for any logits, mask (padding bits set past V), dtype and filters, the kernel draws exactly
    the reference's tokens (same Philox noise), never a disallowed token, and -1 only for an empty row."""
    logits, allowed, bm = make_case(rows, vocab, dtype, seed, density)
    seeds = torch.from_numpy(np.random.default_rng(seed + 1).integers(-(2**62), 2**62, rows))
    expected = masked_sample_torch(logits, bm, seeds=seeds, **params)
    lg, bmd = on(device, logits, bm)
    got = masked_sample_triton(lg, bmd, seeds=seeds, config=SMALL if several_tiles else ONE, **params).cpu()
    assert torch.equal(got, expected)
    assert all(allowed[i, t] for i, t in enumerate(got.tolist()))


@pytest.mark.parametrize("device", DEVICES)
@FEW
@given(params=PARAMS, seed=st.integers(0, 2**31), scale=st.sampled_from([0.3, 3.0, 12.0]))
def test_candidate_path_and_exact_fallback_draw_the_same_tokens(device, params, seed, scale):
    """Property: the fast filter path (gathered candidates) and the exact fallback kernel forced for every
    row both return the reference's tokens."""
    logits, allowed, bm = make_case(2, 200, torch.float32, seed, density=0.7, scale=scale)
    seeds = torch.arange(2) * 7919 + seed
    expected = masked_sample_torch(logits, bm, seeds=seeds, **params)
    lg, bmd = on(device, logits, bm)
    for config in (ONE, FALLBACK):
        got = masked_sample_triton(lg, bmd, seeds=seeds, config=config, **params).cpu()
        assert torch.equal(got, expected), config


@pytest.mark.parametrize("device", DEVICES)
def test_the_fallback_runs_exactly_for_rows_whose_candidates_do_not_settle_the_filters(device):
    # Flat logits and a wide nucleus: 4 gathered groups (64 tokens) cannot hold a top-p 0.99 nucleus of ~250.
    # Flat logits and a wide nucleus: 2 gathered groups (64 tokens) cannot hold a top-p 0.99 nucleus of ~250.
    logits, allowed, bm = make_case(2, 256, torch.float32, seed=5, density=1.0, scale=0.1)
    lg, bmd = on(device, logits, bm)
    seeds = torch.arange(2)
    tokens, _, flags = sample_with_flags(lg, bmd, seeds=seeds, top_p=0.99, config=SMALL)
    assert flags.tolist() == [1, 1]
    assert torch.equal(tokens.cpu(), masked_sample_torch(logits, bm, seeds=seeds, top_p=0.99))
    # Two tokens far above the rest, top-k 2 (so top-k drops the winner only by chance): the gathered groups
    # hold both, the thresholds are exact without the fallback, whichever slice kept them.
    peaked = logits.clone()
    peaked[:, 7] = 40.0
    peaked[:, 100] = 39.0
    tokens, _, flags = sample_with_flags(peaked.to(device), bmd, seeds=seeds, top_k=2, config=SMALL)
    assert flags.tolist() == [0, 0]
    assert torch.equal(tokens.cpu(), masked_sample_torch(peaked, bm, seeds=seeds, top_k=2))


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_parameter_tensors_apply_to_their_own_rows(device):
    logits, allowed, bm = make_case(4, 120, torch.float32, seed=6, density=0.8)
    params = dict(
        temperature=torch.tensor([0.0, 0.5, 1.0, 2.0]),
        top_k=torch.tensor([0, 5, 1, 50]),
        top_p=torch.tensor([0.5, 1.0, 0.9, 0.3]),
        min_p=torch.tensor([0.0, 0.1, 0.0, 0.02]),
    )
    seeds = torch.tensor([3, 1, 4, 1])
    expected = masked_sample_torch(logits, bm, seeds=seeds, **params)
    lg, bmd = on(device, logits, bm)
    got = masked_sample_triton(
        lg, bmd, seeds=seeds, config=ONE, **{k: v.to(device) for k, v in params.items()}
    )
    assert torch.equal(got.cpu(), expected)


# ------------------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_frequencies_match_the_renormalised_masked_softmax(device):
    """Many branches of one logits row in one launch (indices), each its own seed: a chi-square test."""
    rng = np.random.default_rng(7)
    vocab = 40
    logits = torch.from_numpy(rng.normal(0.0, 1.0, (1, vocab)).astype(np.float32))
    allowed = np.zeros((1, vocab), dtype=bool)
    allowed[0, [0, 3, 17, 31, 32, 39]] = True  # across a word boundary, up to the last (partial) word
    draws = 240 if device == "cpu" else 50_000
    bm = pack_bits(np.repeat(allowed, draws, axis=0))
    config = with_config(tile=64, num_warps=4)  # one tile: the interpreter's cost is per tile
    lg, bmd = on(device, logits, bm)
    idx = torch.zeros(draws, dtype=torch.int64, device=device)
    tokens = masked_sample_triton(
        lg, bmd, temperature=0.8, seeds=torch.arange(draws), indices=idx, config=config
    )
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    probs = softmax64(masked64(logits[0], allowed[0]) / 0.8)
    assert counts[~allowed[0]].sum() == 0
    keep = allowed[0]
    assert stats.chisquare(counts[keep], probs[keep] * draws).pvalue > ALPHA


@pytest.mark.skipif(not CUDA, reason="needs many draws: fast only on CUDA")
def test_filtered_frequencies_match_the_top_k_top_p_distribution_on_cuda():
    rng = np.random.default_rng(8)
    vocab = 1000
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (1, vocab)).astype(np.float32))
    allowed = rng.random((1, vocab)) < 0.5
    draws = 100_000
    x = masked64(logits[0], allowed[0])
    t = x - x.max()
    kth = np.sort(t[np.isfinite(t)])[::-1][29]
    t = np.where(t >= kth, t, -np.inf)  # top_k = 30
    e = np.exp(t)
    order = np.sort(e)[::-1]
    running = np.cumsum(order)
    e_p = order[np.searchsorted(running, 0.8 * running[-1])]  # top_p = 0.8
    probs = np.where(e >= e_p, e, 0.0)
    probs /= probs.sum()
    bm = pack_bits(np.repeat(allowed, draws, axis=0)).cuda()
    idx = torch.zeros(draws, dtype=torch.int64, device="cuda")
    tokens = masked_sample_triton(
        logits.cuda(), bm, top_k=30, top_p=0.8, seeds=torch.arange(draws), indices=idx
    )
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    assert stats.chisquare(counts[keep], probs[keep] * draws).pvalue > ALPHA


# ------------------------------------------------------------------------------------------------ the noise


@triton.jit
def _group_bits_kernel(out_ptr, seed_ptr, G: tl.constexpr):
    gid = tl.program_id(0) * G + tl.arange(0, G)
    tok = gid[:, None] * 32 + tl.arange(0, 32)[None, :]
    tl.store(out_ptr + tok, _group_bits(tl.load(seed_ptr), gid).to(tl.int32, bitcast=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 12345, -(2**40) + 3, 2**63 - 1])
def test_kernel_noise_words_equal_the_reference_token_bits(device, seed):
    """The kernels' words for tokens 0..511 (8 Philox calls per 32-token group, words interleaved) are the
    reference's `token_bits(seed, j)`: word j % 4 of the call with counter j // 4."""
    out = torch.empty(512, dtype=torch.int32, device=device)
    _group_bits_kernel[(4,)](out, torch.tensor([seed], device=device), G=4)
    expected = token_bits(torch.full((512,), seed), torch.arange(512))
    assert torch.equal(out.cpu().long() & 0xFFFFFFFF, expected)


# ------------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_give_minus_one_and_minus_inf_logprob(device):
    vocab = 70  # last word holds 6 tokens: bits past V must not count
    logits = torch.randn(4, vocab)
    logits[3, 5] = float("-inf")
    allowed = np.zeros((4, vocab), dtype=bool)
    allowed[1, 33] = True
    allowed[3, 5] = True  # allowed, but its logit is -inf: nothing to draw
    bm = pack_bits(allowed)
    bm[2, 2] = -64  # row 2: only bits past V set (bits 6..31 of the last word: tokens 70..95)
    lg, bmd = on(device, logits, bm)
    for params in (dict(temperature=0.0), dict(), dict(top_k=3, top_p=0.5)):
        tokens, logprobs = masked_sample_triton(
            lg, bmd, seeds=torch.arange(4), return_logprobs=True, config=ONE, **params
        )
        assert tokens.tolist() == [-1, 33, -1, -1]
        assert logprobs[[0, 2, 3]].tolist() == [float("-inf")] * 3
        assert logprobs[1].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(), dict(top_k=1), dict(top_p=0.1, min_p=0.5)])
def test_a_single_allowed_token_is_always_drawn(device, params):
    logits, _, _ = make_case(3, 97, torch.float32, seed=9)
    only = [0, 64, 96]  # first token, a word's first bit, the last token of a partial word
    allowed = np.zeros((3, 97), dtype=bool)
    allowed[np.arange(3), only] = True
    lg, bmd = on(device, logits, pack_bits(allowed, padding=np.random.default_rng(0)))
    tokens = masked_sample_triton(lg, bmd, seeds=torch.arange(3), config=ONE, **params)
    assert tokens.tolist() == only


@pytest.mark.parametrize("device", DEVICES)
def test_everything_allowed_and_neutral_filters_change_nothing(device):
    logits, _, _ = make_case(4, 160, torch.float32, seed=10)
    allowed = np.ones((4, 160), dtype=bool)
    lg, bmd = on(device, logits, pack_bits(allowed))
    seeds = torch.arange(4) + 100
    plain = masked_sample_triton(lg, bmd, seeds=seeds, config=ONE)
    neutral = masked_sample_triton(
        lg, bmd, seeds=seeds, top_k=0, top_p=1.0, min_p=0.0, config=ONE, temperature=torch.ones(4).to(device)
    )
    assert torch.equal(plain, neutral)
    assert torch.equal(plain.cpu(), masked_sample_torch(logits, pack_bits(allowed), seeds=seeds))


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_one_equals_greedy_when_the_maximum_is_unique(device):
    logits, allowed, bm = make_case(3, 90, torch.float32, seed=11)
    lg, bmd = on(device, logits, bm)
    greedy = masked_sample_triton(lg, bmd, temperature=0.0, seeds=torch.arange(3), config=ONE)
    top1 = masked_sample_triton(lg, bmd, top_k=1, seeds=torch.arange(3), config=ONE)
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("device", DEVICES)
def test_padded_vocabulary_never_draws_a_padding_id(device):
    """Logits wider than the tokenizer (V = 100, 90 real tokens): padding logits huge, bits set past V."""
    logits, _, _ = make_case(3, 100, torch.float32, seed=12)
    logits[:, 90:] = 50.0
    allowed = np.zeros((3, 100), dtype=bool)
    allowed[:, :90] = np.random.default_rng(12).random((3, 90)) < 0.5
    allowed[:, 0] = True
    bm = pack_bits(allowed, padding=np.random.default_rng(13))
    lg, bmd = on(device, logits, bm)
    for params in (dict(temperature=0.0), dict(), dict(top_k=2)):
        tokens = masked_sample_triton(lg, bmd, seeds=torch.arange(3), config=ONE, **params)
        assert all(allowed[i, t] for i, t in enumerate(tokens.tolist()))


# ----------------------------------------------------------------------------- determinism and row mapping


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_gives_the_same_token_whatever_the_batch_and_launch_plan(device):
    logits, allowed, bm = make_case(4, 250, torch.float32, seed=14)
    lg, bmd = on(device, logits, bm)
    seeds = torch.arange(4) * 31 + 5
    together = masked_sample_triton(lg, bmd, seeds=seeds, top_p=0.9, config=ONE)
    for i in (0, 3):
        alone = masked_sample_triton(
            lg[i : i + 1], bmd[i : i + 1], seeds=seeds[i : i + 1], top_p=0.9, config=ONE
        )
        assert alone.item() == together[i].item()
    # Other cuts of the vocabulary into tiles and slices (more slices, one program per row, a smaller tile
    # for the filtered pass only) agree.
    filter_tile = with_config(tile=256, filter_tile=64, groups_per_split=2, gathered_groups=2, num_warps=4)
    for config in (SMALL, with_config(tile=64, target_programs=1, num_warps=4), filter_tile):
        assert torch.equal(masked_sample_triton(lg, bmd, seeds=seeds, top_p=0.9, config=config), together)


@pytest.mark.parametrize("device", DEVICES)
def test_indices_map_each_output_row_to_its_logits_row(device):
    logits, _, _ = make_case(3, 130, torch.float32, seed=15)
    rng = np.random.default_rng(15)
    indices = torch.tensor([2, 0, 2])
    allowed = rng.random((3, 130)) < 0.4
    allowed[:, 129] = True
    bm = pack_bits(allowed)
    seeds = torch.tensor([5, 4, 3])
    expected = masked_sample_torch(logits, bm, seeds=seeds, indices=indices, top_k=10)
    lg, bmd = on(device, logits, bm)
    got = masked_sample_triton(lg, bmd, seeds=seeds, indices=indices.to(device), top_k=10, config=ONE)
    assert torch.equal(got.cpu(), expected)
    # Row by row without indices: branch i is logits row indices[i] under mask row i.
    for i, r in enumerate(indices.tolist()):
        one = masked_sample_triton(
            lg[r : r + 1], bmd[i : i + 1], seeds=seeds[i : i + 1], top_k=10, config=ONE
        )
        assert one.item() == got[i].item()


@pytest.mark.parametrize("device", DEVICES)
def test_an_out_of_range_index_reads_nothing_and_gives_minus_one(device):
    logits, allowed, bm = make_case(2, 64, torch.float32, seed=16)
    lg, bmd = on(device, logits, bm)
    tokens = masked_sample_triton(
        lg, bmd, seeds=torch.arange(2), indices=torch.tensor([1, 7]).to(device), config=ONE
    )
    assert tokens[1].item() == -1 and allowed[0, tokens[0].item()]  # output row 0: logits row 1, mask row 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_generator_draws_the_same_seeds_and_tokens_as_the_reference(device):
    logits, _, bm = make_case(3, 80, torch.float32, seed=17)
    lg, bmd = on(device, logits, bm)
    got = masked_sample_triton(lg, bmd, generator=torch.Generator().manual_seed(42), config=ONE)
    expected = masked_sample_torch(logits, bm, generator=torch.Generator().manual_seed(42))
    assert torch.equal(got.cpu(), expected)
    again = masked_sample_triton(lg, bmd, generator=torch.Generator().manual_seed(43), config=ONE)
    assert torch.equal(
        again.cpu(), masked_sample_torch(logits, bm, generator=torch.Generator().manual_seed(43))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_is_modified_in_place(device):
    logits, _, bm = make_case(3, 80, torch.float32, seed=18)
    lg, bmd = on(device, logits, bm)
    before = lg.clone(), bmd.clone()
    masked_sample_triton(lg, bmd, seeds=torch.arange(3), top_k=4, top_p=0.7, return_logprobs=True, config=ONE)
    assert torch.equal(lg, before[0]) and torch.equal(bmd, before[1])


# ------------------------------------------------------------------------------------------- apply bitmask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf(device, dtype):
    logits, allowed, bm = make_case(3, 1100, dtype, seed=19)  # two tiles of 1024, a partial last word
    lg, bmd = on(device, logits, bm)
    apply_bitmask_triton_(lg, bmd)
    expected = torch.where(torch.from_numpy(allowed), logits, torch.tensor(float("-inf"), dtype=dtype))
    assert torch.equal(lg.cpu(), expected)  # allowed logits bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_apply_bitmask_with_indices_masks_only_the_listed_rows_with_their_own_mask_row(device):
    logits, allowed, bm = make_case(4, 100, torch.float32, seed=20)
    lg, bmd = on(device, logits, bm)
    apply_bitmask_triton_(lg, bmd, torch.tensor([3, 1, 3]).to(device))
    expected = logits.clone()
    for r in (1, 3):
        expected[r] = torch.where(torch.from_numpy(allowed[r]), logits[r], torch.tensor(float("-inf")))
    assert torch.equal(lg.cpu(), expected)


# ---------------------------------------------------------------------------------------- CUDA, real sizes


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
@pytest.mark.parametrize(
    "params", [dict(), dict(temperature=0.7), dict(top_k=50, top_p=0.9), dict(min_p=0.05)]
)
def test_real_vocabulary_sizes_match_the_reference_on_cuda(vocab, params):
    rows = 16
    logits, allowed, bm = make_case(rows, vocab, torch.bfloat16, seed=vocab, density=0.5, scale=3.0)
    seeds = torch.arange(rows) + vocab
    lg, bmd = logits.cuda(), bm.cuda()
    expected, expected_lp = masked_sample_torch(lg, bmd, seeds=seeds, return_logprobs=True, **params)
    got, got_lp = masked_sample_triton(lg, bmd, seeds=seeds, return_logprobs=True, **params)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got_lp, expected_lp, rtol=0, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_capture_replays_the_same_tokens():
    logits, _, bm = make_case(8, 32000, torch.float32, seed=21)
    lg, bmd = logits.cuda(), bm.cuda()
    seeds = torch.arange(8, device="cuda")
    eager = masked_sample_triton(lg, bmd, seeds=seeds, top_k=50, top_p=0.9)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = masked_sample_triton(lg, bmd, seeds=seeds, top_k=50, top_p=0.9)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


# ------------------------------------------------------------------------- status word and invalid input


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.8)])
def test_status_word_flags_empty_rows_and_nonfinite_logits_of_sampled_rows_only(device, params):
    logits, allowed, bm = make_case(3, 90, torch.float32, seed=30)
    lg, bmd = on(device, logits, bm)
    seeds = torch.arange(3)

    def status(lg, bmd, indices=None):
        result = sample_full(
            lg, bmd, seeds=seeds, indices=indices, return_logprobs=True, config=ONE, **params
        )
        return int(result.status.item())

    assert status(lg, bmd) == 0
    empty = bmd.clone()
    empty[1] = 0
    assert status(lg, empty) == kernels.STATUS_EMPTY
    for bad in (float("nan"), float("inf")):
        poisoned = lg.clone()
        token = int(np.flatnonzero(~allowed[2])[0])  # a disallowed token: still reported
        poisoned[2, token] = bad
        assert status(poisoned, bmd) == kernels.STATUS_NONFINITE
        # Output rows that read only logits rows 0 and 1 do not see row 2.
        assert status(poisoned, bmd, torch.tensor([0, 1, 1], device=device)) == 0
        assert status(poisoned, empty, torch.tensor([0, 1, 2], device=device)) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_values_leave_the_kernels_memory_safe_with_tokens_in_range(device):
    """NaN / +inf logits and out-of-range parameter tensors (which `constrain.sampling` reports only after
    the launch) still give tokens in [-1, V) and finish; the status word flags the non-finite rows."""
    logits, allowed, bm = make_case(6, 130, torch.float32, seed=31)
    logits[0] = float("nan")  # a whole row of NaN
    logits[1, ::3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :] = float("inf")
    lg, bmd = on(device, logits, bm)
    bad_params = [
        dict(min_p=torch.tensor([1.5, 2.0, 1.5, 3.0, 1.5, 7.0])),
        dict(
            top_p=torch.tensor([0.0, float("nan"), -1.0, 0.0, 0.5, 2.0]),
            top_k=torch.tensor([-5, 0, 3, -1, 0, 9]),
        ),
        dict(temperature=torch.tensor([-1.0, float("nan"), float("inf"), 1e-30, 0.5, 2.0]), top_p=0.5),
        dict(temperature=torch.tensor([float("inf")] * 6), min_p=0.5),
    ]
    for params in bad_params:
        params = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
        for config in (ONE, FALLBACK):
            result = sample_full(
                lg, bmd, seeds=torch.arange(6), return_logprobs=True, config=config, **params
            )
            tokens = result.tokens.cpu()
            assert ((tokens >= -1) & (tokens < 130)).all(), (params, tokens)
            assert int(result.status.item()) & kernels.STATUS_NONFINITE
    out_of_range = torch.tensor([9, -3, 2, 2, 1, 0], device=device)
    tokens = masked_sample_triton(lg, bmd, seeds=torch.arange(6), indices=out_of_range, top_p=0.5, config=ONE)
    assert tokens[:2].tolist() == [-1, -1]


@pytest.fixture
def fused_dispatch(monkeypatch, request):
    """Route `constrain.sampling` to the fused kernels on this device (the interpreter on a CPU)."""
    device = request.param
    monkeypatch.setattr(kernels, "backend", lambda _device: "triton")
    return device


@pytest.mark.parametrize("fused_dispatch", DEVICES, indirect=True)
def test_public_sampler_on_the_fused_kernels_reports_nan_logits_and_empty_rows(fused_dispatch):
    """The public wrapper reads the fused kernels' status word after the launch and raises what it used to
    check beforehand: the NaN's place, then the empty rows; on_empty='return' gives -1."""
    device = fused_dispatch
    logits, allowed, bm = make_case(3, 70, torch.float32, seed=32)
    lg, bmd = on(device, logits, bm)
    seeds = torch.arange(3)
    tokens = masked_sample(lg, bmd, seeds=seeds, top_k=5)
    assert torch.equal(tokens.cpu(), masked_sample_torch(logits, bm, seeds=seeds, top_k=5))
    empty = bmd.clone()
    empty[2] = 0
    with pytest.raises(NoAllowedTokenError, match=r"bitmask row\(s\) \[2\] allow no token"):
        masked_sample(lg, empty, seeds=seeds)
    assert masked_sample(lg, empty, seeds=seeds, on_empty="return")[2].item() == -1
    poisoned = lg.clone()
    poisoned[1, 4] = float("nan")
    with pytest.raises(ConstraintError, match=r"logits\[1, 4\] is nan"):
        masked_sample(poisoned, empty, seeds=seeds, on_empty="return")
    masked_sample(poisoned, bmd, seeds=seeds, indices=[0, 0, 2])  # row 1 is not sampled from: fine


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("per_row", [False, True])
def test_public_sampler_synchronises_once_per_call_on_cuda(per_row):
    """With seeds and parameters on the device, `masked_sample` waits on the GPU exactly once (the status
    read after the launch); an out-of-range parameter tensor is still reported."""
    logits, _, bm = make_case(8, 32000, torch.float32, seed=33)
    lg, bmd = logits.cuda(), bm.cuda()
    seeds = torch.arange(8, device="cuda")
    top_p = torch.full((8,), 0.9, device="cuda") if per_row else 0.9
    masked_sample(lg, bmd, seeds=seeds, top_p=top_p, return_logprobs=True)  # compile outside the count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning, match="synchroniz") as record:
            masked_sample(lg, bmd, seeds=seeds, top_p=top_p, return_logprobs=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in record) == 1
    with pytest.raises(ConstraintError, match=r"top_p\[3\] = 0.0"):
        masked_sample(lg, bmd, seeds=seeds, top_p=torch.tensor([0.9] * 3 + [0.0] * 5, device="cuda"))
