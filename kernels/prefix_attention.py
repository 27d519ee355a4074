"""Shared-prefix ("cascade") attention: many branches' queries over KV held once per level, merged exactly.

Best-of-N and beam search run B branches that share a prompt. Instead of copying the prompt's keys and values
B times, the KV is kept in levels (Hydragen, arXiv:2402.05099; FlashInfer's cascade attention):

    level 0: the prompt, stored once (1 row), read by every branch
    level 1: (optional) tokens shared by a subset of branches, e.g. a beam tree's common generated text
    last:    each branch's own generated tokens (B rows)

Attention over the concatenation of the levels equals a merge of attention over each level: with
`o_l = softmax(q K_l^T s) V_l` and `lse_l = log sum_j exp(q k_lj s)`,

    o = sum_l exp(lse_l - lse) o_l,   lse = log sum_l exp(lse_l)                      (exact, not an estimate)

and for a level every branch shares, the B branches' queries are stacked into one matrix, so the prefix is
read once per step by one matrix product (queries of shape `(1, Hkv, B*g*M, D)` against keys `(1, Hkv, L, D)`)
instead of B times by B matrix-vector products. Grouped-query attention (GQA, `g = Hq / Hkv` query heads per
KV head) is handled by the same stacking, without repeating the keys.

Two implementations with the same semantics: `reference_level_attention` (explicit matmul and softmax in
float32, chunked over queries so memory stays bounded; the definition the tests check against) and the fused
path through PyTorch's flash-attention operators, which return the log-sum-exp the merge needs
(`aten._scaled_dot_product_flash_attention` on CUDA for fp16/bf16, `..._for_cpu` on the CPU,
`aten._scaled_dot_product_efficient_attention` on CUDA for float32). `cascade_attention` picks the fused path
where it applies and the reference elsewhere. Inputs are assumed valid (callers check shapes): like everything
in `kernels/`, this module imports torch only, nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KVLevel",
    "attention_with_lse",
    "cascade_attention",
    "merge_attention_states",
    "reference_attention",
    "reference_level_attention",
]

# Bytes of float32 scores the reference path materialises at once (it loops over query chunks beyond this).
_REFERENCE_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class KVLevel:
    """The keys and values of one level, and which branches read which of its rows.

    `keys`, `values`: `(R, Hkv, L, D)`. `rows`: None when `R == 1` (every branch reads row 0: a shared
    prefix) or `R == B` (branch `b` reads row `b`: the branches' own tokens); otherwise an int64 `(B,)`
    tensor, branch `b` reads row `rows[b]` (a level shared by subsets of branches). `causal`: the M queries
    are the last M positions of this level, so query `i` sees keys `j <= L - M + i` (the level being written
    this step); otherwise every query sees all L keys (earlier levels lie wholly before the queries).
    `length`: a 0-d int64 tensor on the keys' device; only the first `length` positions hold keys, the rest
    of the buffer is ignored (fixed-size buffers whose fill level lives on the device, as CUDA graphs need).
    """

    keys: Tensor
    values: Tensor
    rows: Tensor | None = None
    causal: bool = False
    length: Tensor | None = None


# -- one attention block with its log-sum-exp ----------------------------------------------------------------
def reference_level_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False, length: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Attention with log-sum-exp, in float32 by explicit matmul and softmax (the reference semantics).

    Shapes: `q (R, Hkv, Q, D)`, `k, v (R, Hkv, L, D)` (query rows may stack several heads or branches).
    Returns `out (R, Hkv, Q, D)` and `lse (R, Hkv, Q)`, both float32; a query that sees no key gets `out = 0`,
    `lse = -inf`. With `causal`, query row `i` sees keys `j <= L - Q + i` (bottom-right alignment), so callers
    pass `causal=True` only when the Q rows are exactly the last Q positions of the keys. `length` (a 0-d
    tensor): keys at positions `>= length` are ignored.
    """
    rows, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    out = torch.zeros((rows, heads, n_q, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.full((rows, heads, n_q), float("-inf"), dtype=torch.float32, device=q.device)
    if n_k == 0 or n_q == 0:
        return out, lse
    kf, vf = k.float(), v.float()
    chunk = max(1, _REFERENCE_CHUNK_BYTES // max(1, rows * heads * n_k * 4))
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * scale
        if causal:
            qi = torch.arange(start, stop, device=q.device)[:, None] + (n_k - n_q)
            scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > qi, float("-inf"))
        if length is not None:
            scores = scores.masked_fill(torch.arange(n_k, device=q.device) >= length, float("-inf"))
        block_lse = torch.logsumexp(scores, dim=-1)
        finite = torch.isfinite(block_lse)
        weights = torch.exp(scores - torch.where(finite, block_lse, torch.zeros_like(block_lse))[..., None])
        out[:, :, start:stop] = torch.matmul(weights, vf) * finite[..., None]
        lse[:, :, start:stop] = block_lse
    return out, lse


def _fused_level_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """PyTorch's flash / memory-efficient kernels with their log-sum-exp; same contract as the reference
    (outputs in q's dtype for flash, float32 lse). Only called where `_fused_applies` said yes."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse
    if q.dtype in (torch.float16, torch.bfloat16):
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return result[0], result[1][..., : q.shape[2]]
    result = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return result[0], result[1][..., : q.shape[2]]  # its lse may be padded past the query count


def _fused_applies(q: Tensor, k: Tensor, causal: bool) -> bool:
    """Whether the fused operators compute exactly what the reference does for these shapes.

    Their `is_causal` aligns the mask top-left, which equals the reference's bottom-right alignment only when
    there are as many queries as keys.
    """
    if causal and q.shape[2] != k.shape[2]:
        return False
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[-1] != k.shape[-1]:
        return False
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if q.device.type == "cuda":
        return (
            q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        )
    return False


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool = False,
    *,
    fused: bool = True,
    length: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of grouped queries `q (R, Hkv, Q, D)` over `k, v (R, Hkv, L, D)` with its log-sum-exp.

    Returns `(out (R, Hkv, Q, D), lse (R, Hkv, Q) float32)`; see `reference_level_attention` for the
    semantics (including `causal` and `length`). `fused=False` forces the reference.
    """
    if fused and length is None and _fused_applies(q, k, causal):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return _fused_level_attention(q, k, v, scale, causal)
    return reference_level_attention(q, k, v, scale, causal, length)


def merge_attention_states(states: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Merge partial attention results over disjoint key sets into the result over their union.

    `states`: `(out_l, lse_l)` pairs of the same shapes (`out (..., Q, D)`, `lse (..., Q)`). Returns float32
    `(out, lse)` with `lse = log sum_l exp(lse_l)` and `out = sum_l exp(lse_l - lse) out_l`. Rows where every
    `lse_l` is -inf (no key at all) get `out = 0`, `lse = -inf`.
    """
    if len(states) == 1:
        out, lse = states[0]
        return out.float(), lse.float()
    lses = torch.stack([lse.float() for _, lse in states])  # (n, ..., Q)
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    merged = None
    for (out, _), lse in zip(states, lses, strict=True):
        term = out.float() * torch.exp(lse - safe)[..., None]
        merged = term if merged is None else merged + term
    return merged, total


# -- the levels ----------------------------------------------------------------------------------------------
def _stack_branches(q: Tensor, heads_kv: int) -> Tensor:
    """`(B, Hq, M, D)` -> `(1, Hkv, B*g*M, D)`: all branches' queries against one KV row, M innermost."""
    b, hq, m, d = q.shape
    g = hq // heads_kv
    return q.reshape(b, heads_kv, g, m, d).permute(1, 0, 2, 3, 4).reshape(1, heads_kv, b * g * m, d)


def _unstack_branches(x: Tensor, b: int, hq: int, m: int) -> Tensor:
    """Inverse of `_stack_branches` for outputs `(1, Hkv, B*g*M, D)` and lse `(1, Hkv, B*g*M)`."""
    heads_kv = x.shape[1]
    g = hq // heads_kv
    tail = x.shape[3:]
    return (
        x.reshape(heads_kv, b, g, m, *tail)
        .permute(1, 0, 2, 3, *range(4, 4 + len(tail)))
        .reshape(b, hq, m, *tail)
    )


def _level_attention(q: Tensor, level: KVLevel, scale: float, fused: bool) -> tuple[Tensor, Tensor]:
    """One level's `(out (B, Hq, M, D), lse (B, Hq, M))` for queries `q (B, Hq, M, D)`."""
    b, hq, m, d = q.shape
    k, v = level.keys, level.values
    rows, heads_kv = k.shape[0], k.shape[1]
    g = hq // heads_kv
    if level.causal and m > 1:
        if level.length is not None:
            raise ValueError("a causal level of several new positions cannot have a device-side length")
        # Several new positions of this level (a prompt's prefill): stacked rows would interleave heads or
        # branches with positions, which a causal mask cannot express, so give each branch its own keys for
        # every query head instead (done once per prompt, not per step).
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if level.rows is not None:
            k, v = k[level.rows.to(k.device)], v[level.rows.to(v.device)]
        elif rows != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        return attention_with_lse(q, k, v, scale, True, fused=fused)
    # One new position per branch sees every key of every level: no mask from here on.
    if level.rows is None and rows == b:
        grouped = q.reshape(b, heads_kv, g * m, d)
        out, lse = attention_with_lse(grouped, k, v, scale, fused=fused, length=level.length)
        return out.reshape(b, hq, m, -1), lse.reshape(b, hq, m)
    if level.rows is None:  # one row read by every branch: one matrix product for all of them
        stacked = _stack_branches(q, heads_kv)
        out, lse = attention_with_lse(stacked, k, v, scale, fused=fused, length=level.length)
        return _unstack_branches(out, b, hq, m), _unstack_branches(lse, b, hq, m)
    # Rows shared by subsets of branches: one stacked product per distinct row.
    out = torch.empty((b, hq, m, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hq, m), dtype=torch.float32, device=q.device)
    row_of = level.rows.to(device=q.device, dtype=torch.int64)
    for row in torch.unique(row_of).tolist():
        members = (row_of == row).nonzero(as_tuple=True)[0]
        o_r, l_r = attention_with_lse(
            _stack_branches(q[members], heads_kv),
            k[row : row + 1],
            v[row : row + 1],
            scale,
            fused=fused,
            length=level.length,
        )
        out[members] = _unstack_branches(o_r, members.numel(), hq, m).float()
        lse[members] = _unstack_branches(l_r, members.numel(), hq, m)
    return out, lse


def cascade_attention(q: Tensor, levels: list[KVLevel], scale: float, *, fused: bool = True) -> Tensor:
    """Attention of `q (B, Hq, M, D)` over the concatenation of `levels`, in q's dtype `(B, Hq, M, D)`.

    Each level is attended separately (a level with one row by all branches at once) and the results are
    merged exactly by their log-sum-exp. Levels with no keys are skipped. `fused=False` forces the reference
    path. A query that sees no key at all gets zeros.
    """
    states = [_level_attention(q, lv, scale, fused) for lv in levels if lv.keys.shape[2] > 0]
    if not states:
        return torch.zeros_like(q)
    if len(states) == 1:
        return states[0][0].to(q.dtype)
    out, _ = merge_attention_states(states)
    return out.to(q.dtype)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True) -> Tensor:
    """Plain attention over materialised per-branch KV, for tests: `q (B, Hq, M, D)`, `k, v (B, Hkv, L, D)`.

    Float32 softmax over all L keys, the M queries being the last M positions when `causal`. Returns float32.
    """
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        qi = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > qi, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
