"""Fused masked sampling on the GPU with Triton: logits + int32 bitmask -> one token per row (and logprob).

`masked_sample_triton` computes what `torch_sampling.masked_sample_torch` defines (read its docstring for the
semantics) with the same noise, `E_j = exponential_from_bits(token_bits(seed, j))` (word `j % 4` of the
Philox-4x32-10 call with counter `j // 4`), in the same exponential race `argmax_j t_j - log(E_j)` over the
kept tokens, so it draws the reference's tokens, not only from the same distribution. Two float32 details
differ: the unfiltered race scores `x_j / T - log(E_j)` (the reference's `(x_j - max x) / T - log(E_j)` up to
rounding: one pass needs no row maximum first), and exp/log come from other implementations than torch's;
either can flip a token only where two race scores lie within ~1e-5. The filters work on the reference's exact
`t_j = (x_j - max x) / T` (IEEE division).

Kernels, in launch order (N output rows; each row's vocabulary cut into S slices of whole tiles); both share
one workspace buffer (one allocation per call), carved into typed segments by `_workspace`:

A. `_pass_kernel`, grid (N, S): the only full read of the logits and bitmask. Per slice: masked maximum and
   its lowest argmax (greedy), count of allowed finite logits, logsumexp pieces (logprobs), tempered mass and
   the best 32-token groups (filters), whether any logit is NaN or +inf, and the unfiltered race. The race
   is the expensive part (one Philox-4x32-10 call per four tokens); logarithms are taken only in tiles where
   a cheap bound says a token can still win.
B. `_finish_kernel`, grid (N,): reduces the slices to the row's token and logprob. With filters it gathers the
   best groups' tokens, sorts them and finds the exact top-k / top-p / min-p thresholds when the gathered
   tokens provably hold every token the filters keep, or when the unfiltered winner provably survives them
   (then it is the filtered race's winner too); otherwise the same program runs the exact fallback for its
   row (`_exact_filtered_race`: a 16-pivot search over float keys of the whole row, about 8 passes per
   threshold, then the race over the survivors). It also ORs the call's status word: bit 0 when a sampled
   logits row holds NaN or +inf, bit 1 when a row gets no token (-1).

Inputs are assumed valid (`constrain.sampling` checks them); the kernels stay memory-safe on invalid ones
(an out-of-range `indices` entry reads nothing and gives -1; NaN logits or out-of-range parameters give some
token in [-1, V) and set the status bits), so the wrapper can check values after the launch, with one read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_sampling import row_seeds

__all__ = [
    "SampleResult",
    "SamplingConfig",
    "apply_bitmask_triton_",
    "masked_sample_triton",
    "sample_full",
    "sample_with_flags",
    "with_config",
]

# "No token" in argmin reductions over token ids (larger than any id).
NO_TOKEN = tl.constexpr(2147483647)
# Group key of "no group" (see `_group_key`): the ordered key of -inf in the high word, group id 0x7FFFFFFF
# (never valid) in the low word; below the key of every real group.
PAD_KEY = tl.constexpr(-2139095041 * 2**32)


@dataclass(frozen=True)
class SamplingConfig:
    """Launch parameters (performance only: every choice gives the same tokens).

    tile: tokens per tile, a power of two >= 64 (the unit of loads, of the race's skip test, of groups).
    target_programs: aim for about this many programs per launch when choosing the slices per row
        (None: 4 per streaming multiprocessor on CUDA, 4 on the CPU interpreter).
    groups_per_split: best 32-token groups each slice keeps for the filters (power of two, <= tile / 32).
    gathered_groups: best groups the finisher gathers and sorts per filtered row (power of two).
    num_warps: warps per program of the pass kernel, and of the finisher with filters.
    force_fallback: send every filtered row to the exact whole-row search (tests compare both paths).
    filter_tile, filter_num_warps: tile and warps of the pass kernel when filters are on (None: `tile`,
        `num_warps`). Its FILTER variant needs many more registers (triton 3.6, sm_90: 239 at 2048 x 8 warps,
        150 at 1024 x 8, 140 at 512 x 4; bench/gpu_notes.md), so it may want a smaller tile.
    """

    tile: int = 2048
    target_programs: int | None = None
    groups_per_split: int = 16
    gathered_groups: int = 64
    num_warps: int = 8
    force_fallback: bool = False
    filter_tile: int | None = None
    filter_num_warps: int | None = None


DEFAULT_CONFIG = SamplingConfig()


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _ordkey(x):
    """float32 -> int32 key with the same order (-0.0 and +0.0 share key 0)."""
    b = x.to(tl.int32, bitcast=True)
    b = tl.where(b == -2147483648, 0, b)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _from_ordkey(k):
    """Inverse of `_ordkey`."""
    b = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _group_key(gmax, gid):
    """int64 key of a 32-token group: its max in the high word, then lower ids first (distinct keys)."""
    return (_ordkey(gmax).to(tl.int64) << 32) | (0x7FFFFFFF - gid).to(tl.int64)


@triton.jit
def _group_of_key(key):
    """Group id stored in a `_group_key` (0x7FFFFFFF for the padding key)."""
    low = key - ((key >> 32) << 32)
    return 0x7FFFFFFF - low.to(tl.int32)


@triton.jit
def _value_of_key(key):
    """Group maximum stored in a `_group_key`."""
    return _from_ordkey((key >> 32).to(tl.int32))


@triton.jit
def _group_bits(seed, gid):
    """Philox words of the 32-token groups `gid` as (G, 32): `token_bits(seed, j)` for j = 32 gid + lane.

    Word `j % 4` of `philox4x32(seed, j // 4)`: eight Philox calls per group (counters 8 gid + q), their four
    words interleaved so that lane 4 q + w holds word w of call q.
    """
    q = tl.arange(0, 8)
    ctr = gid[:, None] * 8 + q[None, :]
    zero = tl.zeros_like(ctr)
    c0, c1, c2, c3 = tl.philox(seed, ctr, zero, zero, zero)
    # join(join(c0, c2), join(c1, c3))[g, q, a, b] is word 2 a + b; flattening puts it at lane 4 q + 2 a + b.
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [gid.shape[0], 32])


@triton.jit
def _log_exponential(seed, gid):
    """log(E_j) as (G, 32) for the groups `gid`: E = exponential_from_bits(token_bits(seed, j))."""
    return _log_exponential_of_bits(_group_bits(seed, gid))


@triton.jit
def _log_exponential_of_bits(bits):
    """log(E) for Philox words `bits` (uint32), as `exponential_from_bits`.

    x = (2 * (bits & 0x7FFFFFFF) + 1) * 2**-33; E = -log(x) if the top bit is 0, else -log1p(-x); log1p is
    computed as log(v) * (-x) / (v - 1) with v = 1 - x (exact to a few ulp, no libdevice needed).
    """
    x = (2 * (bits & 0x7FFFFFFF) + 1).to(tl.float32) * 1.1641532182693481e-10
    v = 1.0 - x
    upper = (bits >> 31) != 0
    lg = tl.log(tl.where(upper, v, x))
    log1p_neg = tl.where(v == 1.0, -x, lg * (-x) / (v - 1.0))
    e = tl.where(upper, -log1p_neg, -lg)
    return tl.log(e)


@triton.jit
def _row_of(idx_ptr, row, B, V, W, HAS_IDX: tl.constexpr):
    """(logits row as int64, V, W) of output row `row`; (0, 0, 0) for a bad index (then it reads nothing)."""
    if HAS_IDX:
        lrow = tl.load(idx_ptr + row).to(tl.int64)
    else:
        lrow = row.to(tl.int64)
    ok = (lrow >= 0) & (lrow < B)
    return tl.where(ok, lrow, 0), tl.where(ok, V, 0), tl.where(ok, W, 0)


@triton.jit
def _param(ptr, val, row, PER_ROW: tl.constexpr, DTYPE: tl.constexpr):
    """A per-row parameter from its tensor, or the scalar passed for every row, as DTYPE."""
    if PER_ROW:
        return tl.load(ptr + row).to(DTYPE)
    else:
        return tl.cast(val, DTYPE)


@triton.jit
def _load_raw(lrow_ptr, tile, V, TILE: tl.constexpr):
    """Float32 logits of one tile as (TILE/32 groups, 32), -inf past V, the token ids and the group ids."""
    G: tl.constexpr = TILE // 32
    gid = tile * G + tl.arange(0, G)
    tok = gid[:, None] * 32 + tl.arange(0, 32)[None, :]
    raw = tl.load(lrow_ptr + tok, mask=tok < V, other=float("-inf")).to(tl.float32)
    return raw, tok, gid


@triton.jit
def _apply_mask(raw, mrow_ptr, gid, W):
    """`raw` (G, 32) with -inf where the mask row's words for the groups `gid` clear the token's bit."""
    word = tl.load(mrow_ptr + gid, mask=gid < W, other=0)
    bit = (word[:, None] >> tl.arange(0, 32)[None, :]) & 1
    return tl.where(bit != 0, raw, float("-inf"))


@triton.jit
def _load_tile(lrow_ptr, mrow_ptr, tile, V, W, TILE: tl.constexpr):
    """Masked float32 logits of a tile as (TILE/32 groups, 32), -inf where disallowed; token and group ids."""
    raw, tok, gid = _load_raw(lrow_ptr, tile, V, TILE)
    return _apply_mask(raw, mrow_ptr, gid, W), tok, gid


@triton.jit
def _workspace(ws_ptr, N, S, KG: tl.constexpr, FILTER: tl.constexpr):
    """Typed pointers into the int32 workspace of one call (layout: `_workspace_words`, same order).

    int64 segments first (the buffer is 16-byte aligned): group keys (N S KG) and best dropped keys (N S),
    only with FILTER; then per (row, slice): max, arg, count, sum, mass, race score, race token, non-finite
    flag; then per row: fallback flag; then the status word.
    """
    ns = N.to(tl.int64) * S
    off = ns * 0
    gk = ws_ptr.to(tl.pointer_type(tl.int64))
    if FILTER:
        off += 2 * ns * KG
    drop = (ws_ptr + off).to(tl.pointer_type(tl.int64))
    if FILTER:
        off += 2 * ns
    m = (ws_ptr + off).to(tl.pointer_type(tl.float32))
    arg = ws_ptr + off + ns
    cnt = ws_ptr + off + 2 * ns
    s = (ws_ptr + off + 3 * ns).to(tl.pointer_type(tl.float32))
    z = (ws_ptr + off + 4 * ns).to(tl.pointer_type(tl.float32))
    score = (ws_ptr + off + 5 * ns).to(tl.pointer_type(tl.float32))
    tok = ws_ptr + off + 6 * ns
    nonfinite = ws_ptr + off + 7 * ns
    flag = ws_ptr + off + 8 * ns
    status = flag + N
    return gk, drop, m, arg, cnt, s, z, score, tok, nonfinite, flag, status


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["temp_val"])
def _pass_kernel(
    logits_ptr,
    stride_l,
    mask_ptr,
    idx_ptr,
    seed_ptr,
    B,
    V,
    W,
    temp_ptr,
    temp_val,
    ws_ptr,
    TPS,
    S,
    TILE: tl.constexpr,
    KG: tl.constexpr,
    HAS_IDX: tl.constexpr,
    TEMP_PER_ROW: tl.constexpr,
    LOGPROBS: tl.constexpr,
    FILTER: tl.constexpr,
):
    """Kernel A: one pass over a slice of a row: statistics and the unfiltered exponential race."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    G: tl.constexpr = TILE // 32
    ws_gk, ws_drop, ws_m, ws_arg, ws_cnt, ws_s, ws_z, ws_score, ws_tok, ws_nf, _, status = _workspace(
        ws_ptr, tl.num_programs(0), S, KG, FILTER
    )
    if (row == 0) & (split == 0):
        tl.store(status, 0)  # kernel B ORs into it; it runs after this kernel in the stream
    lrow, V, W = _row_of(idx_ptr, row, B, V, W, HAS_IDX)
    lrow_ptr = logits_ptr + lrow * stride_l
    mrow_ptr = mask_ptr + row.to(tl.int64) * W
    T = _param(temp_ptr, temp_val, row, TEMP_PER_ROW, tl.float32)
    race = T > 0
    inv_t = 1.0 / tl.where(race, T, 1.0)
    seed = tl.load(seed_ptr + row)

    run_m = float("-inf")
    run_arg = NO_TOKEN
    run_s = 0.0  # sum exp(x - run_m), for logprobs
    run_z = 0.0  # sum exp((x - run_m) / T), the tempered mass, for top-p
    cnt = 0
    keys = tl.full((KG,), PAD_KEY, tl.int64)
    run_drop = tl.full((), PAD_KEY, tl.int64) if FILTER else 0
    best = float("-inf")  # race: best score y - log(E) so far, y = x / T
    best_tok = NO_TOKEN
    # Elementwise NaN-propagating maximum of the raw logits (allowed or not): NaN or +inf shows at the end.
    worst = tl.full((G, 32), float("-inf"), tl.float32)
    for i in range(TPS):
        tile = split * TPS + i
        raw, tok, gid = _load_raw(lrow_ptr, tile, V, TILE)
        worst = tl.maximum(worst, raw, propagate_nan=tl.PropagateNan.ALL)
        x = _apply_mask(raw, mrow_ptr, gid, W)
        gmax = tl.max(x, axis=1)
        tmax = tl.max(gmax, axis=0)
        targ = tl.min(tl.min(tl.where(x == tmax, tok, NO_TOKEN), axis=1), axis=0)
        # Strictly greater: on ties the earlier tile (lower ids) keeps the argmax.
        run_arg = tl.where((tmax > run_m) & (tmax > float("-inf")), targ, run_arg)
        cnt += tl.sum(tl.sum((x > float("-inf")).to(tl.int32), axis=1), axis=0)
        new_m = tl.maximum(run_m, tmax)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        if LOGPROBS:
            part = tl.sum(tl.sum(tl.exp(x - safe), axis=1), axis=0)
            run_s = run_s * tl.exp(run_m - safe) + part
        if FILTER:
            part_z = tl.sum(tl.sum(tl.exp((x - safe) * inv_t), axis=1), axis=0)
            run_z = run_z * tl.exp((run_m - safe) * inv_t) + part_z
            # Keep the slice's best KG group keys, and the best key it dropped (bounds every other token).
            gkey = _group_key(gmax, gid)
            top = tl.topk(gkey, KG)
            both = tl.reshape(tl.join(keys, top), [2 * KG])
            keys = tl.topk(both, KG)
            dropped = tl.maximum(
                tl.max(tl.where(gkey < tl.min(top, axis=0), gkey, PAD_KEY), axis=0),
                tl.max(tl.where(both < tl.min(keys, axis=0), both, PAD_KEY), axis=0),
            )
            run_drop = tl.maximum(run_drop, dropped)
        run_m = new_m

        # The race, in y = x / T. A token scores y - log(E) <= y + 22.874, so a tile whose best y is below
        # best - 22.874 is skipped whole; a margin covers float rounding of the scores.
        bar = best - (1e-3 + 1e-5 * tl.abs(best))
        if race & (tmax * inv_t + 22.875 >= bar):
            y = x * inv_t
            bits = _group_bits(seed, gid)
            upper = (bits >> 31) != 0
            # Cheap necessary test (no log, no int-to-float conversion): with the top bit set E >= xlow, the
            # low bits' top 23 bits as a fraction (exact in float32), so y - log(E) >= bar needs
            # xlow <= exp(y - bar); with it clear E >= log 2, so it needs y + 0.3666 >= bar.
            low23 = ((bits & 0x7FFFFFFF) >> 8) | 0x4B000000
            xlow = (low23.to(tl.float32, bitcast=True) - 8388608.0) * 5.960464477539063e-08
            lim = tl.exp(tl.where(x > float("-inf"), y - bar, float("-inf")))
            maybe = tl.where(upper, xlow <= lim, y + 0.3666 >= bar) & (x > float("-inf"))
            if tl.max(tl.max(maybe.to(tl.int32), axis=1), axis=0) != 0:
                score = tl.where(x > float("-inf"), y - _log_exponential_of_bits(bits), float("-inf"))
                tile_best = tl.max(tl.max(score, axis=1), axis=0)
                tile_tok = tl.min(tl.min(tl.where(score == tile_best, tok, NO_TOKEN), axis=1), axis=0)
                better = tile_best > best
                best_tok = tl.where(better, tile_tok, best_tok)
                best = tl.where(better, tile_best, best)

    at = row * S + split
    tl.store(ws_m + at, run_m)
    tl.store(ws_arg + at, run_arg)
    tl.store(ws_cnt + at, cnt)
    tl.store(ws_score + at, best)
    tl.store(ws_tok + at, best_tok)
    bad = (worst != worst) | (worst == float("inf"))
    tl.store(ws_nf + at, tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0))
    if LOGPROBS:
        tl.store(ws_s + at, run_s)
    if FILTER:
        tl.store(ws_z + at, run_z)
        tl.store(ws_gk + at * KG + tl.arange(0, KG), keys)
        tl.store(ws_drop + at, run_drop)


@triton.jit(do_not_specialize=["temp_val", "topk_val", "topp_val", "minp_val"])
def _finish_kernel(
    logits_ptr,
    stride_l,
    mask_ptr,
    idx_ptr,
    seed_ptr,
    B,
    V,
    W,
    temp_ptr,
    temp_val,
    topk_ptr,
    topk_val,
    topp_ptr,
    topp_val,
    minp_ptr,
    minp_val,
    ws_ptr,
    out_tok_ptr,
    out_lp_ptr,
    S,
    NT_FB,
    SP: tl.constexpr,
    KG: tl.constexpr,
    KG2: tl.constexpr,
    TILE_FB: tl.constexpr,
    PIVOTS: tl.constexpr,
    HAS_IDX: tl.constexpr,
    TEMP_PER_ROW: tl.constexpr,
    TOPK_PER_ROW: tl.constexpr,
    TOPP_PER_ROW: tl.constexpr,
    MINP_PER_ROW: tl.constexpr,
    LOGPROBS: tl.constexpr,
    FILTER: tl.constexpr,
    FORCE_FALLBACK: tl.constexpr,
):
    """Kernel B: reduce the slices of a row to its token and logprob; resolve filters (exactly, falling back
    to the whole-row search when the gathered candidates do not settle them); OR the call's status word."""
    row = tl.program_id(0)
    ws_gk, ws_drop, ws_m, ws_arg, ws_cnt, ws_s, ws_z, ws_score, ws_tok, ws_nf, ws_flag, status = _workspace(
        ws_ptr, tl.num_programs(0), S, KG, FILTER
    )
    lrow, V, W = _row_of(idx_ptr, row, B, V, W, HAS_IDX)
    lrow_ptr = logits_ptr + lrow * stride_l
    mrow_ptr = mask_ptr + row.to(tl.int64) * W
    T = _param(temp_ptr, temp_val, row, TEMP_PER_ROW, tl.float32)
    s = tl.arange(0, SP)
    live = s < S
    ms = tl.load(ws_m + row * S + s, mask=live, other=float("-inf"))
    M = tl.max(ms, axis=0)
    empty = M == float("-inf")
    cnt = tl.sum(tl.load(ws_cnt + row * S + s, mask=live, other=0), axis=0)
    nonfinite = tl.max(tl.load(ws_nf + row * S + s, mask=live, other=0), axis=0)
    if T > 0:
        scores = tl.load(ws_score + row * S + s, mask=live, other=float("-inf"))
        toks = tl.load(ws_tok + row * S + s, mask=live, other=NO_TOKEN)
        best = tl.max(scores, axis=0)
        tok = tl.min(tl.where(scores == best, toks, NO_TOKEN), axis=0)
    else:
        args = tl.load(ws_arg + row * S + s, mask=live, other=NO_TOKEN)
        tok = tl.min(tl.where(ms == M, args, NO_TOKEN), axis=0)
    # -1 for an empty row; also for any id outside [0, V), which only invalid input (NaN logits) can give.
    tok = tl.where(empty | (tok < 0) | (tok >= V), -1, tok)

    lse = float("-inf")
    if LOGPROBS:
        sums = tl.load(ws_s + row * S + s, mask=live, other=0.0)
        safe = tl.where(empty, 0.0, M)
        lse = M + tl.log(tl.sum(sums * tl.exp(ms - safe), axis=0))

    if FILTER:
        k = _param(topk_ptr, topk_val, row, TOPK_PER_ROW, tl.int64)
        p = _param(topp_ptr, topp_val, row, TOPP_PER_ROW, tl.float32)
        mp = _param(minp_ptr, minp_val, row, MINP_PER_ROW, tl.float32)
        k_on = (k > 0) & (k < cnt)
        p_on = p < 1.0
        mp_on = mp > 0.0
        need = (T > 0) & (cnt > 0) & (tok >= 0) & (k_on | p_on | mp_on)
        flag = 0
        if need:
            inv_t = 1.0 / T
            zs = tl.load(ws_z + row * S + s, mask=live, other=0.0)
            z_all = tl.sum(zs * tl.exp((ms - M) * inv_t), axis=0)
            # The best KG2 groups of the row among those the slices kept. Every token outside them is <= u_x:
            # it lies in a group a slice dropped (<= that slice's best dropped key) or one not chosen here.
            gk = tl.load(
                ws_gk + (row * S + s[:, None]) * KG + tl.arange(0, KG)[None, :],
                mask=live[:, None],
                other=PAD_KEY,
            )
            drop_key = tl.max(tl.load(ws_drop + row * S + s, mask=live, other=PAD_KEY), axis=0)
            flat = tl.reshape(gk, [SP * KG])
            chosen = tl.topk(flat, KG2)
            kth = tl.min(chosen, axis=0)
            rest_key = tl.max(tl.where(flat < kth, flat, PAD_KEY), axis=0)
            u_x = _value_of_key(tl.maximum(drop_key, rest_key))
            u_t = tl.math.div_rn(u_x - M, T)
            u_e = tl.exp(u_t)

            gid = _group_of_key(chosen)
            gid_ok = (gid >= 0) & (gid < W)
            gid = tl.where(gid_ok, gid, 0)
            lane = tl.arange(0, 32)
            tok2 = gid[:, None] * 32 + lane[None, :]
            in2 = gid_ok[:, None] & (tok2 < V)
            x2 = tl.load(lrow_ptr + tok2, mask=in2, other=float("-inf")).to(tl.float32)
            x2 = tl.where(in2, _apply_mask(x2, mrow_ptr, gid, W), float("-inf"))
            t2 = tl.math.div_rn(x2 - M, T)
            e2 = tl.exp(t2)

            # Sorted tempered logits of the gathered tokens; the first n_plus (> u_t) are exactly the row's
            # n_plus largest, since no other token exceeds u_t.
            NC: tl.constexpr = KG2 * 32
            vs = tl.sort(tl.reshape(t2, [NC]), descending=True)
            pos = tl.arange(0, NC)
            n_plus = tl.sum((vs > u_t).to(tl.int32), axis=0)
            es = tl.exp(vs)

            # top-k: the k-th largest is known when k <= n_plus, else it is <= u_t.
            k_known = k <= n_plus
            t_k = tl.sum(tl.where(pos == k - 1, vs, 0.0), axis=0)
            t_k = tl.where(k_on & k_known, t_k, float("-inf"))
            # top-p over the top-k survivors, as the reference: running sum of e in descending order, Z its
            # last value (or the row's whole mass when top-k is off); e_p = e at the first position reaching
            # p * Z. Exact when that position lies among the first n_plus.
            run = tl.cumsum(tl.where((pos < n_plus) & (vs >= t_k), es, 0.0), axis=0)
            z_k = tl.where(k_on, tl.max(run, axis=0), z_all)
            hit = (run >= p * z_k) & (pos < n_plus)
            m_pos = tl.min(tl.where(hit, pos, NC), axis=0)
            p_undetermined = p_on & k_on & (~k_known)  # Z unknown: top-k survivors lie beyond the gathered
            p_known = p_on & (~p_undetermined) & (m_pos < n_plus)
            p_below = p_on & (~p_undetermined) & (m_pos >= n_plus)  # then e_p <= u_e
            e_p = tl.sum(tl.where(pos == m_pos, es, 0.0), axis=0)
            e_p = tl.where(p_known, e_p, 0.0)
            mp_eff = tl.where(mp_on, mp, 0.0)

            # Complete: no token outside the gathered groups survives (none exists, or a filter drops them).
            complete = (
                (u_x == float("-inf")) | (k_on & k_known) | (p_known & (e_p > u_e)) | (mp_on & (mp > u_e))
            )
            complete = complete & (~p_undetermined)
            keep2 = (x2 > float("-inf")) & (t2 >= t_k) & (e2 >= e_p) & (e2 >= mp_eff)
            seed = tl.load(seed_ptr + row)
            score2 = tl.where(keep2, t2 - _log_exponential(seed, gid), float("-inf"))
            best2 = tl.max(tl.max(score2, axis=1), axis=0)
            tok_c = tl.min(tl.min(tl.where(score2 == best2, tok2, NO_TOKEN), axis=1), axis=0)

            # Otherwise: if the unfiltered winner provably survives the filters it is the answer (the race
            # over a subset that contains the overall winner has the same winner); if not, the exact search.
            x_w = tl.load(lrow_ptr + tok).to(tl.float32)  # need: 0 <= tok < V
            t_w = tl.math.div_rn(x_w - M, T)
            e_w = tl.exp(t_w)
            w_k = (~k_on) | (k_known & (t_w >= t_k)) | ((~k_known) & (t_w > u_t))
            w_p = (~p_on) | (p_known & (e_w >= e_p)) | (p_below & (e_w >= u_e))
            w_kept = w_k & w_p & (e_w >= mp_eff) & (~p_undetermined)
            flag = tl.where(complete | w_kept, 0, 1)
            if FORCE_FALLBACK:
                flag = 1
            if flag != 0:
                tok = _exact_filtered_race(
                    lrow_ptr, mrow_ptr, V, W, M, T, k, p, mp, cnt, tok, seed, NT_FB, TILE_FB, PIVOTS
                )
            else:
                tok = tl.where(complete, tok_c, tok)
            tok = tl.where((tok >= 0) & (tok < V), tok, -1)  # no survivor: only out-of-range parameters
        tl.store(ws_flag + row, flag)

    tl.store(out_tok_ptr + row, tok.to(tl.int64))
    if LOGPROBS:
        lp = tl.load(lrow_ptr + tl.maximum(tok, 0), mask=tok >= 0, other=0.0).to(tl.float32) - lse
        tl.store(out_lp_ptr + row, tl.where(tok < 0, float("-inf"), lp))
    code = tl.where(nonfinite != 0, 1, 0) | tl.where(tok < 0, 2, 0)
    tl.atomic_or(status, code, mask=code != 0)


@triton.jit
def _count_at(lrow_ptr, mrow_ptr, V, W, M, T, pivots, NT, TILE: tl.constexpr):
    """For each pivot key: how many allowed tokens have `_ordkey(t) >= pivot`."""
    n = tl.zeros(pivots.shape, tl.int32)
    for tile in range(NT):
        x, tok, gid = _load_tile(lrow_ptr, mrow_ptr, tile, V, W, TILE)
        key = tl.where(x > float("-inf"), _ordkey(tl.math.div_rn(x - M, T)), -2147483648)
        key = tl.reshape(key, [TILE])
        n += tl.sum((key[None, :] >= pivots[:, None]).to(tl.int32), axis=1)
    return n


@triton.jit
def _mass_at(lrow_ptr, mrow_ptr, V, W, M, T, t_floor, pivots, NT, TILE: tl.constexpr):
    """For each pivot (float32 bits): sum of e = exp(t) over allowed tokens with t >= t_floor, e >= pivot."""
    z = tl.zeros(pivots.shape, tl.float32)
    floor = pivots.to(tl.float32, bitcast=True)
    for tile in range(NT):
        x, tok, gid = _load_tile(lrow_ptr, mrow_ptr, tile, V, W, TILE)
        t = tl.math.div_rn(x - M, T)
        e = tl.where((x > float("-inf")) & (t >= t_floor), tl.exp(t), -1.0)
        e = tl.reshape(e, [TILE])
        z += tl.sum(tl.where(e[None, :] >= floor[:, None], e[None, :], 0.0), axis=1)
    return z


@triton.jit
def _exact_filtered_race(
    lrow_ptr, mrow_ptr, V, W, M, T, k, p, mp, cnt, w, seed, NT, TILE: tl.constexpr, PIVOTS: tl.constexpr
):
    """The filtered race's token for one row by exact thresholds over the whole row (kernel B's fallback).

    Each search keeps [lo, hi] around the answer (the largest key whose count / mass reaches the target) and
    evaluates PIVOTS keys spread over it per pass, so 32-bit keys take about 8 passes with 16 pivots. `w` is
    the unfiltered winner (kept when it survives). Returns NO_TOKEN only if nothing survives, which valid
    parameters rule out (min_p <= 1 keeps the maximum).
    """
    spread = tl.arange(0, PIVOTS).to(tl.int64) + 1

    # top-k: the k-th largest t is the largest key with at least k tokens at or above it.
    t_k = float("-inf")
    if (k > 0) & (k < cnt):
        lo = -2139095040  # key of -FLT_MAX: every finite t is at or above it
        hi = 0  # key of 0.0, the largest t
        while lo < hi:
            pivots = (lo + ((hi - lo).to(tl.int64) * spread + PIVOTS) // (PIVOTS + 1)).to(tl.int32)
            ok = _count_at(lrow_ptr, mrow_ptr, V, W, M, T, pivots, NT, TILE) >= k
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots - 1), axis=0)
        t_k = _from_ordkey(lo)
    # top-p: e_p is the largest e value v with mass(e >= v) >= p * Z over the top-k survivors.
    e_p = 0.0
    if p < 1.0:
        zero = tl.zeros([PIVOTS], tl.int32)
        target = p * tl.max(_mass_at(lrow_ptr, mrow_ptr, V, W, M, T, t_k, zero, NT, TILE), axis=0)
        lo = 0  # bits of 0.0
        hi = 1065353216  # bits of 1.0, the largest e
        while lo < hi:
            pivots = (lo + ((hi - lo).to(tl.int64) * spread + PIVOTS) // (PIVOTS + 1)).to(tl.int32)
            ok = _mass_at(lrow_ptr, mrow_ptr, V, W, M, T, t_k, pivots, NT, TILE) >= target
            lo = tl.max(tl.where(ok, pivots, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, pivots - 1), axis=0)
        e_p = lo.to(tl.float32, bitcast=True)
    e_floor = tl.maximum(e_p, tl.where(mp > 0.0, mp, 0.0))

    # The unfiltered winner stands if it survives; else race over the survivors.
    t_w = tl.math.div_rn(tl.load(lrow_ptr + w).to(tl.float32) - M, T)
    tok = w
    if (t_w < t_k) | (tl.exp(t_w) < e_floor):
        best = float("-inf")
        tok = NO_TOKEN
        for tile in range(NT):
            x, toks, gid = _load_tile(lrow_ptr, mrow_ptr, tile, V, W, TILE)
            t = tl.math.div_rn(x - M, T)
            keep = (x > float("-inf")) & (t >= t_k) & (tl.exp(t) >= e_floor)
            score = tl.where(keep, t - _log_exponential(seed, gid), float("-inf"))
            tile_best = tl.max(tl.max(score, axis=1), axis=0)
            tile_tok = tl.min(tl.min(tl.where(score == tile_best, toks, NO_TOKEN), axis=1), axis=0)
            better = tile_best > best
            tok = tl.where(better, tile_tok, tok)
            best = tl.where(better, tile_best, best)
    return tok


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr, stride_l, mask_ptr, idx_ptr, V, W, TILE: tl.constexpr, HAS_IDX: tl.constexpr
):
    """Write -inf over the disallowed logits of one tile of one listed row (loads no logits)."""
    r = tl.program_id(0)
    tile = tl.program_id(1)
    if HAS_IDX:
        row = tl.load(idx_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    G: tl.constexpr = TILE // 32
    gid = tile * G + tl.arange(0, G)
    lane = tl.arange(0, 32)
    tok = gid[:, None] * 32 + lane[None, :]
    word = tl.load(mask_ptr + row * W + gid, mask=gid < W, other=-1)
    off = ((word[:, None] >> lane[None, :]) & 1) == 0
    neg = tl.full((G, 32), float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * stride_l + tok, neg, mask=off & (tok < V))


# ----------------------------------------------------------------------------------------------- python


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _row_arg(
    value: float | int | Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor | None, float]:
    """(per-row tensor or None, scalar) kernel arguments for a parameter given as a scalar or (N,) tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).contiguous(), 0
    return None, float(value) if dtype.is_floating_point else int(value)


def _plan(
    n_rows: int, n_tiles: int, device: torch.device, config: SamplingConfig, min_slices: int
) -> tuple[int, int]:
    """(slices per row, tiles per slice): enough programs to fill the device, whole tiles per slice."""
    target = config.target_programs
    if target is None:
        target = 4 * _sm_count(device.index or 0) if device.type == "cuda" else 4
    slices = max(1, min(n_tiles, max(min_slices, -(-target // n_rows))))
    tiles_per_slice = -(-n_tiles // slices)
    return -(-n_tiles // tiles_per_slice), tiles_per_slice


@dataclass(frozen=True)
class SampleResult:
    """Everything one launch of the fused sampler produces (device tensors; nothing is read back).

    tokens: int64 `(N,)`, -1 for a row with no allowed finite logit. logprobs: float32 `(N,)`, or None when
    not asked for. status: int32 `(1,)`, 0 when every row got a token from finite logits; bit 0 set when a
    sampled logits row holds NaN or +inf (tokens then unspecified, in [-1, V)), bit 1 when a token is -1.
    fallback: int32 `(N,)`, 1 where the row needed the exact whole-row search, or None without filters.
    """

    tokens: Tensor
    logprobs: Tensor | None
    status: Tensor
    fallback: Tensor | None


def _workspace_words(n_rows: int, slices: int, kg: int, filters: bool) -> int:
    """int32 words of the workspace `_workspace` carves (same layout)."""
    ns = n_rows * slices
    return (2 * ns * kg + 2 * ns if filters else 0) + 8 * ns + n_rows + 1


@torch.no_grad()
def masked_sample_triton(
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
    config: SamplingConfig | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused masked sampling with the semantics of `torch_sampling.masked_sample_torch` (same tokens).

    logits: `(B, V)` float32/bfloat16/float16 on a CUDA device (any device under TRITON_INTERPRET=1).
    bitmask: int32 `(N, ceil(V/32))`, same device. indices: None (N == B) or `(N,)` integers in [0, B).
    temperature / top_k / top_p / min_p: python scalars or `(N,)` tensors. seeds `(N,)` int64, or drawn with
    `row_seeds` from `generator` (torch's default CPU generator when None), as the reference does.
    Returns int64 tokens `(N,)` (-1 for a row with no allowed finite logit) and, with `return_logprobs`,
    float32 `log_softmax(masked logits)[token]` (-inf for an empty row). Inputs are assumed valid
    (`constrain.sampling` checks them and raises); nothing is modified. `config` tunes the launch only.
    Two kernel launches and two allocations (outputs, workspace), no host synchronisation: CUDA-graph
    capturable when `seeds` is given on the device (a host tensor or a generator costs a host-to-device copy).
    """
    result = sample_full(
        logits,
        bitmask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        generator=generator,
        seeds=seeds,
        indices=indices,
        return_logprobs=return_logprobs,
        config=config,
    )
    return (result.tokens, result.logprobs) if return_logprobs else result.tokens


def sample_with_flags(
    logits: Tensor, bitmask: Tensor, **kwargs: object
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`masked_sample_triton`'s (tokens, logprobs or None, fallback flags or None); see `SampleResult`.

    Kept for benchmarks and tests that report how many rows needed the exact whole-row search.
    """
    result = sample_full(logits, bitmask, **kwargs)
    return result.tokens, result.logprobs, result.fallback


@torch.no_grad()
def sample_full(
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
    config: SamplingConfig | None = None,
) -> SampleResult:
    """`masked_sample_triton` returning a `SampleResult` (tokens, logprobs, status word, fallback flags).

    The status word lets a caller check every row for empty masks and non-finite logits with one 4-byte
    read after the launch (`constrain.sampling` does); the kernels are memory-safe on invalid input.
    """
    config = config or DEFAULT_CONFIG
    device = logits.device
    n_rows = bitmask.shape[0]
    batch, vocab = logits.shape
    words = bitmask.shape[1]
    seed = row_seeds(n_rows, generator=generator, seeds=seeds, device=device).contiguous()
    # Outputs in one buffer: tokens (int64), then logprobs (float32) when asked.
    out = torch.empty(n_rows + (-(-n_rows // 2) if return_logprobs else 0), dtype=torch.int64, device=device)
    tokens = out[:n_rows]
    logprobs = out[n_rows:].view(torch.float32)[:n_rows] if return_logprobs else None
    if n_rows == 0:
        return SampleResult(tokens, logprobs, torch.zeros(1, dtype=torch.int32, device=device), None)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bitmask = bitmask.contiguous()
    idx = None if indices is None else indices.to(device=device, dtype=torch.int64).contiguous()

    temp_t, temp_v = _row_arg(temperature, torch.float32, device)
    topk_t, topk_v = _row_arg(top_k, torch.int64, device)
    topp_t, topp_v = _row_arg(top_p, torch.float32, device)
    minp_t, minp_v = _row_arg(min_p, torch.float32, device)
    filters = topk_t is not None or topp_t is not None or minp_t is not None
    filters = filters or topk_v != 0 or topp_v != 1.0 or minp_v != 0.0
    all_greedy = temp_t is None and temp_v == 0
    filters = filters and not all_greedy

    tile = (config.filter_tile or config.tile) if filters else config.tile
    warps = (config.filter_num_warps or config.num_warps) if filters else config.num_warps
    n_tiles = triton.cdiv(vocab, tile)
    # With filters, enough slices that together they keep twice the groups the finisher gathers: a slice
    # holding more of the row's best groups than it keeps would raise the bound u and cost a fallback.
    min_slices = -(-2 * config.gathered_groups // config.groups_per_split) if filters else 1
    slices, tiles_per_slice = _plan(n_rows, n_tiles, device, config, min_slices)
    sp = _next_pow2(slices)
    kg = min(tile // 32, max(config.groups_per_split, _next_pow2(-(-config.gathered_groups // slices))))
    kg2 = min(config.gathered_groups, sp * kg)
    ws = torch.empty(_workspace_words(n_rows, slices, kg, filters), dtype=torch.int32, device=device)

    dummy = seed  # any tensor: the kernels never read a parameter pointer whose PER_ROW flag is off
    common = (logits, logits.stride(0), bitmask, dummy if idx is None else idx, seed, batch, vocab, words)
    temp_args = (dummy if temp_t is None else temp_t, temp_v)
    flags = dict(HAS_IDX=idx is not None, TEMP_PER_ROW=temp_t is not None)
    _pass_kernel[(n_rows, slices)](
        *common, *temp_args, ws, tiles_per_slice, slices,
        TILE=tile, KG=kg, LOGPROBS=return_logprobs, FILTER=filters, **flags,
        num_warps=warps, enable_fp_fusion=False,  # exact float32 as in the reference: no FMA
    )  # fmt: skip
    fb_tile = min(512, max(64, _next_pow2(vocab)))  # the fallback's tile: PIVOTS x fb_tile values at once
    _finish_kernel[(n_rows,)](
        *common, *temp_args,
        dummy if topk_t is None else topk_t, int(topk_v),
        dummy if topp_t is None else topp_t, float(topp_v),
        dummy if minp_t is None else minp_t, float(minp_v),
        ws, tokens, tokens if logprobs is None else logprobs, slices, triton.cdiv(vocab, fb_tile),
        SP=sp, KG=kg, KG2=kg2, TILE_FB=fb_tile, PIVOTS=16, **flags,
        TOPK_PER_ROW=topk_t is not None, TOPP_PER_ROW=topp_t is not None, MINP_PER_ROW=minp_t is not None,
        LOGPROBS=return_logprobs, FILTER=filters, FORCE_FALLBACK=config.force_fallback,
        num_warps=warps if filters else 4, enable_fp_fusion=False,
    )  # fmt: skip
    words_total = ws.numel()
    fallback = ws[words_total - 1 - n_rows : words_total - 1] if filters else None
    return SampleResult(tokens, logprobs, ws[words_total - 1 :], fallback)


@torch.no_grad()
def apply_bitmask_triton_(logits: Tensor, bitmask: Tensor, indices: Tensor | None = None) -> Tensor:
    """Set the logits that `bitmask` disallows to -inf in place and return `logits` (one fused kernel).

    Semantics of `torch_sampling.apply_bitmask_torch_` (XGrammar's): indices None masks logits row `b` with
    bitmask row `b`; otherwise only logits rows `indices[k]`, each with bitmask row `indices[k]`. Bits past
    V are ignored. Only disallowed positions are written; allowed logits are neither read nor written.
    """
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(
            f"apply_bitmask_triton_ needs logits with a contiguous last dim, got {logits.stride()}"
        )
    bitmask = bitmask.contiguous()
    if indices is None:
        rows, idx = batch, bitmask
    else:
        idx = indices.to(device=logits.device, dtype=torch.int64).contiguous()
        rows = idx.numel()
    if rows == 0:
        return logits
    tile = 1024
    grid = (rows, triton.cdiv(vocab, tile))
    _apply_bitmask_kernel[grid](
        logits, logits.stride(0), bitmask, idx, vocab, bitmask.shape[1],
        TILE=tile, HAS_IDX=indices is not None, num_warps=4,
    )  # fmt: skip
    return logits


def with_config(**changes: object) -> SamplingConfig:
    """`DEFAULT_CONFIG` with some fields changed (for tests and benchmarks)."""
    return replace(DEFAULT_CONFIG, **changes)
