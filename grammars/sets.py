"""Sets of small integers (sorted int32 arrays) interned for numba kernels: an open-addressing hash table
with an exact comparison on collision, over fixed-size arrays (the caller grows them and reruns).

The product automata (`grammars.product`) and the subset construction (`grammars.dfa`) number their states
this way: a product state is a set of component states, a subset state a set of NFA states.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


@njit(cache=True, nogil=True)
def hash_set(buf: np.ndarray, m: int) -> np.uint64:
    """A 64-bit hash of the set `buf[:m]` (FNV-1a over its members, then a shift-xor)."""
    h = _FNV_OFFSET
    for i in range(m):
        h = (h ^ np.uint64(buf[i] + 1)) * _FNV_PRIME
    return h ^ (h >> np.uint64(29))


# Kernel results: the table of sets, or the pool of their members, ran out of room.
FULL_STATES, FULL_POOL = -1, -2


@njit(cache=True, nogil=True)
def intern(buf, m, pool, off, hashes, htab, n):  # noqa: ANN001, ANN202 - numba kernel
    """Find or add the set `buf[:m]` among the `n` sets stored in `pool[off[i]:off[i + 1]]`.

    The arrays have fixed sizes (rebinding arrays in a numba loop costs a reference count per iteration):
    `htab` holds at least twice as many slots as `off` has entries. Returns (id, n after), id `FULL_STATES`
    or `FULL_POOL` when there is no room.
    """
    h = hash_set(buf, m)
    mask = htab.shape[0] - 1
    slot = np.int64(h & np.uint64(mask))
    while True:
        s = htab[slot]
        if s < 0:
            break
        if hashes[s] == h and off[s + 1] - off[s] == m:
            a = off[s]
            same = True
            for j in range(m):
                if pool[a + j] != buf[j]:
                    same = False
                    break
            if same:
                return s, n
        slot = (slot + 1) & mask
    if n + 1 >= off.shape[0]:
        return FULL_STATES, n
    end = off[n]
    if end + m > pool.shape[0]:
        return FULL_POOL, n
    for j in range(m):
        pool[end + j] = buf[j]
    off[n + 1] = end + m
    hashes[n] = h
    htab[slot] = n
    return n, n + 1


def table_size(cap: int) -> int:
    """Hash table slots for `cap` entries: a power of two, load at most one half."""
    return 1 << max(4, (2 * cap - 1).bit_length())
