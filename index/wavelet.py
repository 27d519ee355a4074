"""Rank bit vectors and a wavelet matrix over integer sequences, with numba kernels for the FM-index.

A `RankBits` stores `n` bits as uint64 words plus, per 512-bit block (one cache line of words), the number of
ones before the block (uint32), so `rank1(i)` = one table read + at most 8 popcounts (6.25% space overhead).

A `WaveletMatrix` (Claude, Navarro & Ordóñez, "The wavelet matrix", 2015) stores a sequence over `[0, sigma)`
in `L = ceil(log2 sigma)` bit levels. Level `l` holds bit `L-1-l` of every value, in the order the values have
after being stably partitioned by their `l` higher bits (zeros first; `zeros[l]` of them). A position `i` at
level `l` moves to `rank0(l, i)` if its bit is 0 and to `zeros[l] + rank1(l, i)` if it is 1; after the last
level all copies of a symbol `c` sit in one run starting at `bottom_start[c]`, so

    rank_c(i) = (position of i after following c's bits down) - bottom_start[c].

That gives, in O(L) ranks each: `rank_c` at two positions (a backward-search step), access + rank of the
symbol at `i` (an LF step), and the distinct symbols of a range `[s, e)` in O(k L) for `k` symbols (a
depth-first walk that drops empty children), in ascending symbol order.

The kernels take the matrix as plain arrays `(words, block_rank, zeros)` so that numba can inline them into
the FM-index kernels; all positions are int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

WORD_BITS = 64
BLOCK_WORDS = 8  # one rank sample per 8 words = 512 bits
BLOCK_BITS = WORD_BITS * BLOCK_WORDS


@intrinsic
def popcount64(typingctx, x):  # noqa: ARG001 - numba's intrinsic signature
    """Number of set bits of a uint64 (LLVM's ctpop: one POPCNT instruction on x86-64)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


def pack_bits(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack a 0/1 array of `n` bits into (words uint64, block_rank uint32) for `rank1`.

    Words are padded so that `rank1(n)` is valid: `n // 512 + 1` blocks of 8 words.
    """
    bits = np.asarray(bits, dtype=np.uint8)
    n = int(bits.shape[0])
    n_blocks = n // BLOCK_BITS + 1
    padded = np.zeros(n_blocks * BLOCK_BITS, dtype=np.uint8)
    padded[:n] = bits
    words = np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)
    per_block = padded.reshape(n_blocks, BLOCK_BITS).sum(axis=1, dtype=np.int64)
    block_rank = np.zeros(n_blocks, dtype=np.uint32)
    block_rank[1:] = np.cumsum(per_block[:-1])
    return words, block_rank


@dataclass(frozen=True)
class RankBits:
    """A bit vector with constant-time rank (see the module docstring)."""

    words: np.ndarray  # uint64 (n_blocks * 8,)
    block_rank: np.ndarray  # uint32 (n_blocks,)
    n: int

    @classmethod
    def build(cls, bits: np.ndarray) -> RankBits:
        words, block_rank = pack_bits(bits)
        return cls(words=words, block_rank=block_rank, n=int(len(bits)))

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes + self.block_rank.nbytes)


@dataclass(frozen=True)
class WaveletMatrix:
    """A sequence of `n` values in `[0, sigma)` as `n_levels` rank bit vectors (see the module docstring)."""

    words: np.ndarray  # uint64 (n_levels, n_blocks * 8)
    block_rank: np.ndarray  # uint32 (n_levels, n_blocks)
    zeros: np.ndarray  # int64 (n_levels,): number of 0 bits at each level
    bottom_start: np.ndarray  # int64 (sigma,): where each symbol's run starts after the last level
    n: int
    sigma: int

    @property
    def n_levels(self) -> int:
        return int(self.words.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes + self.block_rank.nbytes + self.zeros.nbytes + self.bottom_start.nbytes)

    @classmethod
    def build(cls, values: np.ndarray, sigma: int) -> WaveletMatrix:
        """Build from `values` (1-D, each in `[0, sigma)`); O(n log sigma) numpy work."""
        values = np.asarray(values, dtype=np.int64)
        n = int(values.shape[0])
        n_levels = max(1, int(sigma - 1).bit_length())
        n_blocks = n // BLOCK_BITS + 1
        words = np.empty((n_levels, n_blocks * BLOCK_WORDS), dtype=np.uint64)
        block_rank = np.empty((n_levels, n_blocks), dtype=np.uint32)
        zeros = np.empty(n_levels, dtype=np.int64)
        current = values
        for level in range(n_levels):
            bits = (current >> (n_levels - 1 - level)) & 1
            words[level], block_rank[level] = pack_bits(bits)
            ones = bits.astype(bool)
            zeros[level] = n - int(ones.sum())
            current = np.concatenate([current[~ones], current[ones]])  # stable partition
        # After the last level values are ordered by their bit-reversed code (stable), so each symbol's run
        # starts after all symbols with a smaller reversed code; absent symbols get an empty run there.
        symbols = np.arange(sigma, dtype=np.int64)
        reversed_code = np.zeros(sigma, dtype=np.int64)
        for bit in range(n_levels):
            reversed_code |= ((symbols >> bit) & 1) << (n_levels - 1 - bit)
        counts = np.bincount(values, minlength=sigma).astype(np.int64)
        order = np.argsort(reversed_code, kind="stable")
        starts = np.zeros(sigma, dtype=np.int64)
        starts[order[1:]] = np.cumsum(counts[order])[:-1]
        return cls(words=words, block_rank=block_rank, zeros=zeros, bottom_start=starts, n=n, sigma=int(sigma))


# -- numba kernels ------------------------------------------------------------------------------------------
_jit = numba.njit(cache=True, nogil=True)


@_jit
def rank1(words, block_rank, i):
    """Number of 1 bits in positions `[0, i)` of a 1-D packed bit vector."""
    block = i >> 9
    count = np.int64(block_rank[block])
    word = i >> 6
    for j in range(block << 3, word):
        count += np.int64(popcount64(words[j]))
    rest = i & 63
    if rest:
        mask = (np.uint64(1) << np.uint64(rest)) - np.uint64(1)
        count += np.int64(popcount64(words[word] & mask))
    return count


@_jit
def level_rank1(words, block_rank, level, i):
    """`rank1` on one level of a wavelet matrix (2-D arrays, no slicing on the hot path)."""
    block = i >> 9
    count = np.int64(block_rank[level, block])
    word = i >> 6
    for j in range(block << 3, word):
        count += np.int64(popcount64(words[level, j]))
    rest = i & 63
    if rest:
        mask = (np.uint64(1) << np.uint64(rest)) - np.uint64(1)
        count += np.int64(popcount64(words[level, word] & mask))
    return count


@_jit
def get_bit(words, i):
    """Bit `i` of a 1-D packed bit vector (0 or 1)."""
    return np.int64((words[i >> 6] >> np.uint64(i & 63)) & np.uint64(1))


@_jit
def wm_follow_pair(words, block_rank, zeros, symbol, s, e):
    """Positions of `s` and `e` after following `symbol`'s bits to the bottom level.

    `rank_symbol(x) = result - bottom_start[symbol]`; both move together, so `e' - s'` is the number of
    occurrences of `symbol` in `[s, e)`.
    """
    n_levels = words.shape[0]
    for level in range(n_levels):
        r1s = level_rank1(words, block_rank, level, s)
        r1e = level_rank1(words, block_rank, level, e)
        if (symbol >> (n_levels - 1 - level)) & 1:
            s = zeros[level] + r1s
            e = zeros[level] + r1e
        else:
            s = s - r1s
            e = e - r1e
    return s, e


@_jit
def wm_access_follow(words, block_rank, zeros, i):
    """The symbol at position `i` and `i`'s position at the bottom level (so `rank_symbol(i)` follows)."""
    n_levels = words.shape[0]
    symbol = np.int64(0)
    for level in range(n_levels):
        word = words[level, i >> 6]
        bit = np.int64((word >> np.uint64(i & 63)) & np.uint64(1))
        r1 = level_rank1(words, block_rank, level, i)
        symbol = (symbol << 1) | bit
        if bit:
            i = zeros[level] + r1
        else:
            i = i - r1
    return symbol, i


@_jit
def wm_distinct(words, block_rank, zeros, s, e, out_symbol, out_start, out_end):
    """The distinct symbols of positions `[s, e)`, ascending, with their bottom-level runs.

    Writes `out_symbol[j]` and the run `[out_start[j], out_end[j])` (positions after following the symbol
    down, as `wm_follow_pair` returns them) and returns how many. The outputs need room for
    `min(e - s, sigma)` entries. Work: O(k * n_levels) ranks for k distinct symbols.
    """
    n_levels = words.shape[0]
    stack_level = np.empty(n_levels + 2, dtype=np.int64)
    stack_s = np.empty(n_levels + 2, dtype=np.int64)
    stack_e = np.empty(n_levels + 2, dtype=np.int64)
    stack_value = np.empty(n_levels + 2, dtype=np.int64)
    count = 0
    if e <= s:
        return count
    stack_level[0], stack_s[0], stack_e[0], stack_value[0] = 0, s, e, 0
    top = 1
    while top > 0:
        top -= 1
        level, lo, hi, value = stack_level[top], stack_s[top], stack_e[top], stack_value[top]
        if level == n_levels:
            out_symbol[count], out_start[count], out_end[count] = value, lo, hi
            count += 1
            continue
        r1lo = level_rank1(words, block_rank, level, lo)
        r1hi = level_rank1(words, block_rank, level, hi)
        # Push the 1-child first so that the 0-child (smaller symbols) is visited first.
        if r1hi > r1lo:
            stack_level[top], stack_s[top], stack_e[top] = level + 1, zeros[level] + r1lo, zeros[level] + r1hi
            stack_value[top] = (value << 1) | 1
            top += 1
        if (hi - r1hi) > (lo - r1lo):
            stack_level[top], stack_s[top], stack_e[top] = level + 1, lo - r1lo, hi - r1hi
            stack_value[top] = value << 1
            top += 1
    return count
