"""Suffix arrays of integer texts by prefix doubling (numpy only, any alphabet size).

`suffix_array(text)` sorts the suffixes of `text`, which must end with a unique smallest symbol (a
sentinel), so no suffix is a prefix of another. Each round sorts the suffixes by their first `2k` symbols,
using the ranks of the first `k` symbols twice (Manber & Myers); rounds stop once every rank is distinct,
i.e. after `ceil(log2(longest repeat))` rounds. Each round is one stable argsort of `n` int64 keys, so
building the suffix array of a 1M-token text takes seconds, independent of the alphabet size (which rules out
byte-oriented libraries for 128k-token vocabularies).
"""

from __future__ import annotations

import numpy as np

from constrain.errors import ConstraintError

# Keys are rank * (n + 1) + next_rank + 1 in int64, so n must stay below 2**31.
MAX_TEXT_LENGTH = 2**31 - 1


def suffix_array(text: np.ndarray) -> np.ndarray:
    """The suffix array of `text` (int64 positions, lexicographic order of `text[i:]`).

    `text` is a 1-D array of non-negative integers whose last symbol is smaller than every other symbol.
    Raises `ConstraintError` if the text is empty, longer than `MAX_TEXT_LENGTH`, or lacks the sentinel.
    """
    text = np.asarray(text)
    n = int(text.shape[0])
    if text.ndim != 1 or n == 0:
        raise ConstraintError(f"suffix_array needs a non-empty 1-D text, got shape {text.shape}")
    if n > MAX_TEXT_LENGTH:
        raise ConstraintError(f"text of {n} symbols exceeds the suffix-array limit of {MAX_TEXT_LENGTH}")
    if n > 1 and int(text[:-1].min()) <= int(text[-1]):
        raise ConstraintError("suffix_array: the text must end with a unique smallest symbol (sentinel)")
    # Dense ranks of single symbols: equal symbols share a rank.
    order = np.argsort(text, kind="stable")
    rank = _dense_ranks(order, text[order])
    k = 1
    while int(rank.max()) < n - 1:
        # Rank of the suffix k positions later, or -1 past the end (shorter suffixes sort first).
        following = np.full(n, -1, dtype=np.int64)
        following[: n - k] = rank[k:]
        key = rank * (n + 1) + (following + 1)
        order = np.argsort(key, kind="stable")
        rank = _dense_ranks(order, key[order])
        k *= 2
    return order.astype(np.int64)


def _dense_ranks(order: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Rank of each position (0 = smallest key); positions with equal keys get equal ranks."""
    n = order.shape[0]
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    np.cumsum(sorted_keys[1:] != sorted_keys[:-1], out=starts[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = starts
    return rank
