"""Token masks from a byte DFA: a numba walk of the vocabulary's byte trie.

The trie is the preorder-flattened one of `constrain.vocab.VocabTrie`: for node `i > 0`, `node_byte[i]` is the
byte on the edge from its parent, `node_depth[i]` its depth (root = 0), `node_end[i]` the index just past its
subtree, and the tokens ending at `i` are `token_ids[token_start[i]:token_start[i + 1]]`.

Walking in preorder, the parent of node `i` is the last node visited at depth `node_depth[i] - 1`, so one DFA
state per depth is all the walk keeps; a node whose byte kills the DFA is skipped with its whole subtree
(`i = node_end[i]`). A token is allowed iff every byte of it keeps the DFA alive (state >= 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def dfa_trie_mask(
    transitions: np.ndarray,
    state: int,
    node_byte: np.ndarray,
    node_depth: np.ndarray,
    node_end: np.ndarray,
    token_start: np.ndarray,
    token_ids: np.ndarray,
    max_depth: int,
    out: np.ndarray,
) -> int:
    """Set in `out` the bit of every trie token whose bytes, read from DFA `state`, keep the DFA alive.

    Args:
        transitions: int32 `(n_states, 256)`, -1 = dead.
        state: the DFA state to start from (>= 0).
        node_byte, node_depth, node_end, token_start, token_ids: the flattened trie (see the module doc).
        max_depth: the trie's depth (the longest token, in bytes).
        out: uint32 `(words,)` bitmask row; bits are only set (OR-ed), never cleared.

    Returns:
        The number of trie nodes visited (a measure of the work done).
    """
    states = np.empty(max_depth + 1, dtype=np.int32)
    states[0] = state
    n = node_byte.shape[0]
    visited = 0
    i = 1
    while i < n:
        visited += 1
        depth = node_depth[i]
        nxt = transitions[states[depth - 1], node_byte[i]]
        if nxt < 0:
            i = node_end[i]  # no token below this prefix can be allowed
            continue
        states[depth] = nxt
        for k in range(token_start[i], token_start[i + 1]):
            t = token_ids[k]
            out[t >> 5] |= np.uint32(1) << np.uint32(t & 31)
        i += 1
    return visited


@njit(nogil=True, cache=True)
def dfa_trie_masks(
    transitions: np.ndarray,
    states: np.ndarray,
    node_byte: np.ndarray,
    node_depth: np.ndarray,
    node_end: np.ndarray,
    token_start: np.ndarray,
    token_ids: np.ndarray,
    max_depth: int,
    out: np.ndarray,
) -> int:
    """`dfa_trie_mask` for many start states: row `r` of uint32 `out (len(states), words)` gets `states[r]`.

    Returns the total number of trie nodes visited.
    """
    total = 0
    for r in range(states.shape[0]):
        total += dfa_trie_mask(
            transitions, states[r], node_byte, node_depth, node_end, token_start, token_ids, max_depth, out[r]
        )
    return total
