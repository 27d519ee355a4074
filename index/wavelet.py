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

This module builds both structures with numpy; the numba kernels that query them (rank, the wavelet-matrix
walks) live in `fm_kernels.py` beside the FM-index loops that inline them (numba's on-disk cache only notices
changes to a kernel's own file, so kernels that call each other share one file).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD_BITS = 64
BLOCK_WORDS = 8  # one rank sample per 8 words = 512 bits
BLOCK_BITS = WORD_BITS * BLOCK_WORDS


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
        return cls(
            words=words, block_rank=block_rank, zeros=zeros, bottom_start=starts, n=n, sigma=int(sigma)
        )
