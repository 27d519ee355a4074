"""Reference masked sampling in plain torch: runs on any device and defines what the fused kernel computes.

Two operations, both on logits `(B, V)` (float32, bfloat16 or float16) and an int32 bitmask in the shared ABI
(token `j` of mask row `i` allowed iff `(bitmask[i, j >> 5] >> (j & 31)) & 1`; bits at or past `V` ignored):

- `apply_bitmask_torch_`: set the logits of disallowed tokens to -inf, in place.
- `masked_sample_torch`: mask, then temperature, top-k, top-p, min-p (Hugging Face's order), then draw one
  token per bitmask row with a counter-based random number generator (Philox-4x32-10, the generator behind
  `triton.language.randint`), so that a seeded draw is a pure function of (logits row, mask row, parameters,
  seed) and a fused kernel can reproduce it.

The exact arithmetic, step by step, is in `masked_sample_torch`'s docstring and in docs/sampling.md. Inputs
are assumed valid (shapes, dtypes, devices, parameter ranges): `constrain.sampling` checks them and raises
`constrain.ConstraintError`; this module, like everything in `kernels/`, imports nothing of ours.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

__all__ = [
    "apply_bitmask_torch_",
    "exponential_from_bits",
    "masked_sample_torch",
    "philox4x32",
    "philox_rounds",
    "row_seeds",
    "to_device_nonblocking",
    "token_bits",
    "unpack_bitmask",
]

# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the same in
# Random123, cuRAND and triton.language.random).
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
# Seeds drawn from a torch.Generator lie in [0, _SEED_HIGH).
_SEED_HIGH = 2**63 - 1


def _mulhilo32(const: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of `const * x` for a uint32 constant and uint32 values held in int64.

    The 64-bit product would overflow int64, so it is formed from 16-bit halves of the constant: each partial
    product is below 2**48.
    """
    c_hi, c_lo = const >> 16, const & 0xFFFF
    p_lo = x * c_lo
    p_hi = x * c_hi  # const * x == p_hi * 2**16 + p_lo
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox_rounds(
    c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor, rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 (`rounds` rounds) of counter `(c0, c1, c2, c3)` under key `(k0, k1)`.

    All arguments are int64 tensors of one shape holding uint32 values; returns the four output words alike.
    Matches Random123's `philox4x32_R` and `triton.language.random.philox_impl` on uint32 words.
    """
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox4x32(seed: Tensor, counter: Tensor, rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32 of counter `(counter, 0, 0, 0)` under key `(seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)`.

    This is `triton.language.randint4x(seed, counter)` for a 32-bit `counter` (Random123's `philox4x32_10`),
    computed with int64 torch arithmetic. `seed` and `counter` are int64 tensors that broadcast together
    (`counter` in [0, 2**32)); returns the four output words as int64 tensors holding uint32 values.
    """
    seed = seed.to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32  # arithmetic shift, then mask: the high word of the seed's 64 bits
    c0, k0, k1 = torch.broadcast_tensors(counter.to(torch.int64) & _MASK32, k0, k1)
    zero = torch.zeros_like(c0)
    return philox_rounds(c0, zero, zero, zero, k0, k1, rounds)


@njit(nogil=True, cache=True)
def _token_bits_numba(seeds: np.ndarray, tokens: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """`token_bits(seeds[i], tokens[i])` for each i, on uint64 arrays (`token_bits`' CPU path).

    One Philox call serves up to four consecutive entries: runs of the same seed and counter `token >> 2` (the
    row-major order in which the reference lists a row's tokens) reuse the previous call's four words.
    """
    mask = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    have = False
    last_seed = np.uint64(0)
    last_counter = np.uint64(0)
    words = np.zeros(4, dtype=np.uint64)
    for i in range(seeds.size):
        counter = (tokens[i] & mask) >> np.uint64(2)
        if not have or seeds[i] != last_seed or counter != last_counter:
            k0 = seeds[i] & mask
            k1 = seeds[i] >> shift
            c0 = counter
            c1 = np.uint64(0)
            c2 = np.uint64(0)
            c3 = np.uint64(0)
            for _ in range(10):
                prod_b = np.uint64(_PHILOX_ROUND_B) * c2  # both factors < 2**32: exact in uint64
                prod_a = np.uint64(_PHILOX_ROUND_A) * c0
                c0, c1, c2, c3 = (
                    (prod_b >> shift) ^ c1 ^ k0,
                    prod_b & mask,
                    (prod_a >> shift) ^ c3 ^ k1,
                    prod_a & mask,
                )
                k0 = (k0 + np.uint64(_PHILOX_KEY_A)) & mask
                k1 = (k1 + np.uint64(_PHILOX_KEY_B)) & mask
            words[0], words[1], words[2], words[3] = c0, c1, c2, c3
            have = True
            last_seed = seeds[i]
            last_counter = counter
        out[i] = words[tokens[i] & np.uint64(3)]


def token_bits(seed: Tensor, token: Tensor) -> Tensor:
    """The Philox word the race uses for token `token` of a row seeded `seed`: word `token & 3` of
    `philox4x32(seed, token >> 2)`.

    One Philox-4x32-10 call (counter `token // 4`) gives the words of four consecutive tokens, so the noise of
    a row costs V / 4 calls. `seed` and `token` are 1-D int64 tensors of one length (`token` in [0, 2**32));
    returns int64 holding uint32 values. On CPU a numba loop computes it (the torch version costs some 250
    tensor passes); elsewhere `philox4x32`. Both give the same integers.
    """
    if seed.device.type != "cpu":
        token = token.to(torch.int64)
        words = torch.stack(philox4x32(seed, token >> 2), dim=-1)
        return words.gather(-1, (token & 3).unsqueeze(-1)).squeeze(-1)
    seeds = seed.to(torch.int64).contiguous().numpy().view(np.uint64)
    tokens = token.to(torch.int64).contiguous().numpy().view(np.uint64)
    out = np.empty(seeds.size, dtype=np.uint64)
    _token_bits_numba(seeds, tokens, out)
    return torch.from_numpy(out.view(np.int64))


def exponential_from_bits(bits: Tensor) -> Tensor:
    """Map uint32 words (held in int64) to float32 standard-exponential variates `E = -log(U)`, `U` in (0, 1).

    The top bit chooses the half of (0, 1) that `U` lies in and the low 31 bits its place there:
    `x = float32(2 * (bits & 0x7FFFFFFF) + 1) * 2**-33` (one round-to-nearest conversion; x in [2**-33, 0.5]);
    `E = -log(x)` when the top bit is 0 (`U = x`) and `E = -log1p(-x)` when it is 1 (`U = 1 - x`). Working
    on the small distance from 0 or from 1 keeps full float32 precision at both ends, so `E` lies in
    [1.2e-10, 22.9] and is never 0 or inf (a plain `float32(bits) / 2**32` can round to 1.0 and give 0).
    """
    bits = bits.to(torch.int64)
    x = (2 * (bits & 0x7FFFFFFF) + 1).to(torch.float32) * 2.0**-33
    upper = (bits >> 31) & 1
    return torch.where(upper == 0, -torch.log(x), -torch.log1p(-x))


def row_seeds(
    n: int,
    *,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The int64 seed of each of `n` rows: `seeds` as given, else `n` draws from `generator`.

    Without `seeds`, one `torch.randint(0, 2**63 - 1, (n,), dtype=torch.int64)` call is made on `generator`
    (on the generator's device; torch's default CPU generator when `generator` is None, so
    `torch.manual_seed` makes it reproducible). Every row draws a seed, greedy rows included, so row `i`'s
    seed depends only on the generator's state and `i`. The result is moved to `device` without waiting for
    the device (a pageable host tensor is staged by the copy call itself, so no host synchronisation; a
    pinned `seeds` tensor is copied synchronously, since its caller may overwrite it right after).
    """
    if seeds is not None:
        return to_device_nonblocking(seeds.to(torch.int64), device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randint(0, _SEED_HIGH, (n,), dtype=torch.int64, generator=generator, device=gen_device)
    return to_device_nonblocking(drawn, device)


def to_device_nonblocking(tensor: Tensor, device: torch.device | str | None) -> Tensor:
    """`tensor` on `device`; a copy from pageable host memory does not block on the device's queue.

    Only host-to-device copies from pageable memory are made non-blocking: CUDA stages such a source before
    the call returns, so it is safe to reuse at once (a device-to-host copy must block to be readable).
    """
    if device is None or tensor.device == torch.device(device):
        return tensor
    pageable_host = tensor.device.type == "cpu" and not tensor.is_pinned()
    return tensor.to(device, non_blocking=pageable_host)


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """Bool `(rows, vocab_size)`: True where the int32 bitmask allows the token (bits past V dropped)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift is fine: only the low bit is kept
    return bits.reshape(bitmask.shape[0], bitmask.shape[1] * 32)[:, :vocab_size].bool()


def apply_bitmask_torch_(logits: Tensor, bitmask: Tensor, indices: Tensor | None = None) -> Tensor:
    """Set the logits of tokens that `bitmask` disallows to -inf, in place; returns `logits`.

    logits: `(B, V)` float tensor. bitmask: int32 `(rows, ceil(V/32))` on the same device; bits past `V` are
    ignored. indices (XGrammar's convention for `apply_token_bitmask_inplace`): None masks every row `b` of
    the logits with bitmask row `b`; an integer tensor masks only the rows named in it, logits row
    `indices[k]` with bitmask row `indices[k]` (the same index into both; other rows are left alone; a
    repeated index is harmless).
    """
    vocab_size = logits.shape[1]
    if indices is None:
        logits.masked_fill_(~unpack_bitmask(bitmask, vocab_size), float("-inf"))
        return logits
    rows = indices.to(device=logits.device, dtype=torch.int64)
    allowed = unpack_bitmask(bitmask[rows.to(bitmask.device)], vocab_size)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def _row_param(value: float | Tensor, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A python scalar or an `(n,)` tensor as an `(n,)` tensor of `dtype` on `device`."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((n,), value, dtype=dtype, device=device)


def _is_off(value: float | Tensor, off: float) -> bool:
    """True when a filter parameter is the python scalar that turns the filter off (skips its work)."""
    return not isinstance(value, Tensor) and value == off


def _filtered_logits(
    x: Tensor, temperature: Tensor, top_k: Tensor | None, top_p: Tensor | None, min_p: Tensor | None
) -> Tensor:
    """Tempered logits of rows with an allowed finite logit, with every token that a filter drops set to -inf.

    x: float32 `(R, V)` masked logits (-inf where disallowed), each row with a finite maximum. temperature:
    `(R,)` float32, > 0. top_k `(R,)` int64, top_p / min_p `(R,)` float32, or None for a filter that is off
    in every row.
    """
    neg_inf = float("-inf")
    # Tempered logits, shifted so that the row maximum is exactly 0: exp() cannot overflow, e_max == 1.
    t = (x - x.amax(dim=1, keepdim=True)) / temperature.unsqueeze(1)
    vocab_size = t.shape[1]
    if top_k is not None:
        # Keep t >= the k-th largest value (ties at the boundary kept); k == 0 keeps all, k > V is clamped.
        sorted_t = torch.sort(t, dim=1, descending=True).values
        kth = sorted_t.gather(1, (top_k.clamp(1, vocab_size) - 1).unsqueeze(1))
        keep = (t >= kth) | (top_k == 0).unsqueeze(1)
        t = t.masked_fill(~keep, neg_inf)
    if top_p is not None:
        # Smallest prefix (descending probability) whose mass reaches top_p of the remaining total, plus ties
        # of its last member: keep e >= e_(m), m = the first position where the running sum reaches top_p * Z.
        e = torch.exp(t)
        sorted_e = torch.sort(e, dim=1, descending=True).values
        running = torch.cumsum(sorted_e, dim=1)
        total = running[:, -1:]
        m = (running < top_p.unsqueeze(1) * total).sum(dim=1, keepdim=True)  # running is non-decreasing
        threshold = sorted_e.gather(1, m.clamp(max=vocab_size - 1))
        keep = (e >= threshold) | (top_p >= 1.0).unsqueeze(1)
        t = t.masked_fill(~keep, neg_inf)
    if min_p is not None:
        # p_j >= min_p * p_max  <=>  exp(t_j - t_max) >= min_p, and t_max == 0 (top-k/top-p keep the maximum).
        keep = torch.exp(t) >= min_p.unsqueeze(1)
        t = t.masked_fill(~keep, neg_inf)
    return t


def _sample_rows(t: Tensor, seeds: Tensor) -> Tensor:
    """Exponential race (Gumbel-max): argmax over kept `j` of `t_j - log(E_j)`; ties go to the lowest id.

    `E_j = exponential_from_bits(token_bits(seed, j))`: word `j % 4` of the Philox call with counter `j // 4`
    under the row's seed, computed only where `t` is finite. The winner is distributed as softmax(t) over the
    kept tokens.
    """
    rows, cols = torch.isfinite(t).nonzero(as_tuple=True)
    exponential = exponential_from_bits(token_bits(seeds[rows], cols))
    keys = torch.full_like(t, float("-inf"))
    keys[rows, cols] = t[rows, cols] - torch.log(exponential)
    return keys.argmax(dim=1)


@torch.no_grad()
def masked_sample_torch(
    logits: Tensor,
    bitmask: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    indices: Tensor | None = None,
    return_logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw one token per bitmask row from the masked, tempered and filtered logits (the reference semantics).

    Shapes: logits `(B, V)` float32/bfloat16/float16; bitmask int32 `(N, ceil(V/32))`; indices None (then
    N == B) or an integer `(N,)` tensor with values in [0, B). Output row `i` uses logits row `indices[i]` (or
    `i`) under bitmask row `i`, so N branches can sample from one logits row. temperature, top_k, top_p,
    min_p: python scalars or `(N,)` tensors. Nothing is modified in place. Returns int64 tokens `(N,)` on
    the logits' device, and with `return_logprobs` also float32 log-probabilities `(N,)`.

    Per output row, in float32 (`x` = the logits row upcast, -inf where the mask disallows; params float32):

    1. Empty row: no allowed token with a logit > -inf -> token -1 (logprob -inf). Never raises.
    2. temperature == 0: greedy, `argmax_j x_j`, ties to the lowest id (top_k, top_p, min_p ignored).
    3. Otherwise `t_j = (x_j - max(x)) / temperature` (so `max(t) == 0`), then, each filter setting the tokens
       it drops to -inf and seeing only the tokens kept so far:
       - top_k > 0: keep `t_j >= ` the k-th largest value of `t` (ties at the boundary kept; k > V keeps all).
       - top_p < 1: `e_j = exp(t_j)`; sort `e` descending, running sum `S_m`, `Z = S_last`; `m` = the first
         position with `S_m >= top_p * Z`; keep `e_j >= e_(m)` (the smallest prefix reaching top_p plus every
         token tied with its last member). Equivalently: the largest `v` with `sum(e_j >= v) >= top_p * Z`.
       - min_p > 0: keep `exp(t_j) >= min_p` (that is `p_j >= min_p * p_max`).
       Then sample `argmax_j (t_j - log E_j)` over kept `j`, ties to the lowest id, where
       `E_j = exponential_from_bits(philox4x32(seed_i, j // 4)[j % 4])` (`token_bits`: one Philox call gives
       the words of four consecutive tokens): the exponential race, which draws `j` with probability
       `exp(t_j) / sum_kept exp(t)` (the renormalised kept distribution).

    Randomness: `seed_i = seeds[i]` if `seeds` is given, else `row_seeds(N, generator=generator)` (one int64
    per row drawn from `generator`, or from torch's default CPU generator). So a token depends only on its
    row's inputs and seed: the same seed and inputs give the same token, whatever the other rows hold. Seeds
    must change from one decoding step to the next (the uniforms are a function of (seed, token id) alone).

    Logprobs: `log_softmax(x)[token]`, the masked distribution at temperature 1 without filters (the score
    that best-of-N and beam search add up); finite for every token drawn.
    """
    num_rows = bitmask.shape[0]
    device = logits.device
    vocab_size = logits.shape[1]
    seed_per_row = row_seeds(num_rows, generator=generator, seeds=seeds, device=device)
    rows = logits if indices is None else logits[indices.to(device=device, dtype=torch.int64)]
    allowed = unpack_bitmask(bitmask.to(device), vocab_size)
    x = rows.to(torch.float32).masked_fill(~allowed, float("-inf"))  # a new tensor: the input stays untouched

    nonempty = x.amax(dim=1) > float("-inf")
    tokens = x.argmax(dim=1)  # greedy rows' answer (first maximum = lowest id); sampled rows overwrite theirs
    temp = _row_param(temperature, num_rows, torch.float32, device)
    sampled_rows = (nonempty & (temp > 0)).nonzero(as_tuple=True)[0]
    if sampled_rows.numel():

        def subset(value: float | Tensor, off: float, dtype: torch.dtype) -> Tensor | None:
            return None if _is_off(value, off) else _row_param(value, num_rows, dtype, device)[sampled_rows]

        t = _filtered_logits(
            x[sampled_rows],
            temp[sampled_rows],
            subset(top_k, 0, torch.int64),
            subset(top_p, 1.0, torch.float32),
            subset(min_p, 0.0, torch.float32),
        )
        tokens[sampled_rows] = _sample_rows(t, seed_per_row[sampled_rows])
    tokens = torch.where(nonempty, tokens, torch.full_like(tokens, -1))
    if not return_logprobs:
        return tokens
    logprobs = torch.log_softmax(x, dim=1).gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1)
    logprobs = torch.where(nonempty, logprobs, torch.full_like(logprobs, float("-inf")))
    return tokens, logprobs
