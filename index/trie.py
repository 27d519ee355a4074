"""A token trie over a fact base (ReFactX style): the model may only write token sequences the index holds.

Every fact is a token-id sequence (a verbalized triple, tokenized). The facts are stored in a path-compressed
prefix tree (a radix tree) laid out breadth-first in flat numpy arrays, so the children of a node are a
contiguous range of node ids and need no child-pointer array (see docs/trie.md):

    node c (0 = root)       label  = labels[label_start[c] : label_start[c + 1]]   tokens on the edge into c
                            kids   = range(child_start[c], child_start[c + 1])     sorted by first label token
                            leaf_count[c] = facts at or below c;  terminal[c] = 1 if a fact ends at c

A position in the trie (an uncompressed trie node) is the pair (c, k): k tokens of c's label consumed. It
is packed into one int, `node = c << 32 | k`; the root is 0. A fact ends at a node (no terminator token is
stored): the matcher allows EOS there, and also the children if the fact is a prefix of longer ones.

Build (`build_trie`) streams: sequences are gathered into chunks that are sorted and deduplicated in
memory (numba) and spilled to disk; the sorted runs are k-way merged (dropping duplicates across runs) and the
tree is built breadth-first from the merged, sorted sequences in one pass. The arrays are written through
`index.storage` (atomic, checksummed, memory-mapped on load).

Matching (`trie_constraint`): a matcher's state is the node reached; `fill_bitmask` clears the row and sets
the bits of the next tokens: O(children) after an O(V/32) memset. `no_repeat=True` applies ReFactX's
subtraction: facts already completed in this sequence (`end_fact`) are not allowed again, by subtracting them
from the leaf counts along their path; a child with nothing left below it is disallowed.

Any store that implements `TrieStore` (e.g. a PostgreSQL table of edges) can back the same matcher.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

from constrain.bitmask import bitmask_words, row_view
from constrain.constraint import CompiledConstraint, Constraint, Matcher
from constrain.errors import ConstraintError, IndexFormatError
from constrain.vocab import Vocabulary

from .storage import FileSet, FileSetWriter, load_file_set, verify_checksums

FORMAT = "constrain.trie"
VERSION = 1
ROOT = 0
_K_BITS = 32
_K_MASK = (1 << _K_BITS) - 1
_ARRAYS = ("label_start", "labels", "child_start", "leaf_count", "terminal", "tokens_present")
# One bit per position in a 32-bit word, as int32 (bit 31 is the sign bit).
_BITS = np.array([1 << i for i in range(32)], dtype=np.uint32).view(np.int32)
_MAX_TOKEN = (1 << 31) - 1
# Nodes with at least this many children get a precomputed mask row (at most MAX_WIDE_ROWS per compile).
WIDE_FANOUT = 1024
MAX_WIDE_ROWS = 256


def pack_node(compressed: int, consumed: int) -> int:
    """The public node id of position (compressed node, tokens of its label consumed)."""
    return (int(compressed) << _K_BITS) | int(consumed)


def unpack_node(node: int) -> tuple[int, int]:
    """(compressed node, tokens of its label consumed) of a node id."""
    return int(node) >> _K_BITS, int(node) & _K_MASK


def _offset_dtype(max_value: int) -> np.dtype:
    """int32 when every value fits, else int64 (kernels are compiled for both)."""
    return np.dtype(np.int32) if max_value < 2**31 else np.dtype(np.int64)


# ======================================================================================================
# numba kernels: the matcher's inner loop
# ======================================================================================================
@numba.njit(nogil=True, cache=True)
def set_token_bits(words: np.ndarray, tokens: np.ndarray) -> None:
    """OR the bits of `tokens` (any int array, each < 32 * len(words)) into an int32 or uint32 mask row."""
    for i in range(tokens.shape[0]):
        t = tokens[i]
        words[t >> 5] |= _BITS[t & 31]


@numba.njit(nogil=True, cache=True)
def _fill_node(mask, row, node, label_start, labels, child_start, terminal, eos, forbidden, allow_eos):
    """Write the tokens allowed at `node` into `mask[row]` (all other bits cleared).

    Returns 1 if a fact ends at `node`, 0 if not, -1 if the arrays are inconsistent (a corrupt index): every
    index read is bounds-checked, so a damaged file can never make this read or write out of bounds.
    """
    words = mask[row]
    words[:] = 0
    n_nodes = child_start.shape[0] - 1
    n_labels = labels.shape[0]
    n_bits = words.shape[0] * 32
    c = node >> 32
    k = node & 0xFFFFFFFF
    if c < 0 or c >= n_nodes:
        return -1
    ls = label_start[c]
    le = label_start[c + 1]
    if ls < 0 or le < ls or le > n_labels or k > le - ls:
        return -1
    if k < le - ls:  # inside a label: exactly one next token
        t = labels[ls + k]
        if t < 0 or t >= n_bits or forbidden[t >> 5] & _BITS[t & 31]:
            return -1
        words[t >> 5] |= _BITS[t & 31]
        return 0
    cs = child_start[c]
    ce = child_start[c + 1]
    if cs > ce or ce > n_nodes or (ce > cs and cs <= c):
        return -1
    for ch in range(cs, ce):
        p = label_start[ch]
        if p < 0 or p >= n_labels:
            return -1
        t = labels[p]
        if t < 0 or t >= n_bits or forbidden[t >> 5] & _BITS[t & 31]:
            return -1
        words[t >> 5] |= _BITS[t & 31]
    if terminal[c]:
        if allow_eos:
            for i in range(eos.shape[0]):
                words[eos[i] >> 5] |= _BITS[eos[i] & 31]
        return 1
    return 0


@numba.njit(nogil=True, cache=True)
def _step_node(node, token, label_start, labels, child_start):
    """The node reached from `node` by `token`: -1 if `token` does not continue any fact, -2 if corrupt."""
    n_nodes = child_start.shape[0] - 1
    n_labels = labels.shape[0]
    c = node >> 32
    k = node & 0xFFFFFFFF
    if c < 0 or c >= n_nodes:
        return -2
    ls = label_start[c]
    le = label_start[c + 1]
    if ls < 0 or le < ls or le > n_labels or k > le - ls:
        return -2
    if k < le - ls:
        return node + 1 if labels[ls + k] == token else -1
    lo = child_start[c]
    hi = child_start[c + 1]
    if lo > hi or hi > n_nodes:
        return -2
    while lo < hi:  # binary search the children by the first token of their label
        mid = (lo + hi) >> 1
        p = label_start[mid]
        if p < 0 or p >= n_labels:
            return -2
        t = labels[p]
        if t == token:
            return (np.int64(mid) << 32) | 1
        if t < token:
            lo = mid + 1
        else:
            hi = mid
    return -1


@numba.njit(nogil=True, cache=True)
def _check_structure(label_start, labels, child_start, leaf_count, terminal):
    """Full structural check of the arrays; returns (node, problem code), or (-1, 0) if consistent.

    codes: 1 label offsets, 2 child ranges, 3 children not sorted / duplicate first tokens, 4 leaf counts,
    5 empty label below the root, 6 leaf that ends no fact, 7 negative token.
    """
    n = child_start.shape[0] - 1
    if label_start.shape[0] != n + 1 or leaf_count.shape[0] != n or terminal.shape[0] != n:
        return 0, 1
    if label_start[0] != 0 or label_start[1] != 0 or label_start[n] != labels.shape[0]:
        return 0, 1
    if child_start[n] != n:
        return n, 2
    for c in range(n):  # first pass: offsets, so the second pass may index with them
        if label_start[c + 1] < label_start[c]:
            return c, 1
        if c > 0 and label_start[c + 1] == label_start[c]:
            return c, 5
        cs = child_start[c]
        ce = child_start[c + 1]
        if ce < cs or (ce > cs and cs <= c) or ce > n:
            return c, 2
    for c in range(n):
        cs = child_start[c]
        ce = child_start[c + 1]
        total = np.int64(terminal[c] != 0)
        prev = np.int64(-1)
        for ch in range(cs, ce):
            t = np.int64(labels[label_start[ch]])
            if t <= prev:
                return c, 3
            prev = t
            total += leaf_count[ch]
        if total != leaf_count[c]:
            return c, 4
        if ce == cs and terminal[c] == 0:
            return c, 6
    for i in range(labels.shape[0]):
        if labels[i] < 0:
            return -1, 7
    return -1, 0


_STRUCTURE_PROBLEMS = {
    1: "label offsets are not monotonic or do not cover labels.npy",
    2: "child ranges are out of order or out of range",
    3: "children are not sorted by first token (or two share one)",
    4: "a leaf count differs from the facts below the node",
    5: "a node below the root has an empty label",
    6: "a leaf node ends no fact",
    7: "a negative token id",
}


# ======================================================================================================
# the store protocol
# ======================================================================================================
class TrieStore(ABC):
    """Read access to a token trie; what `TrieMatcher` needs, so any backend (mmap'd arrays, PostgreSQL) fits.

    Node ids are ints chosen by the store (>= 0), one per distinct prefix of the facts; `ROOT` (0) is the
    empty prefix. A store must implement `children`, `leaf_count`, `is_terminal`, `n_facts`,
    `distinct_tokens` and `store_id`; `child` and `fill_children` have generic defaults built on `children`
    that a store may replace with faster ones.
    """

    @property
    @abstractmethod
    def n_facts(self) -> int:
        """Number of distinct facts stored."""

    @property
    @abstractmethod
    def store_id(self) -> str:
        """A string that identifies this store's content (compile-cache key); equal only for equal content."""

    @abstractmethod
    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(next tokens, child node ids) at `node`: int32 tokens sorted ascending, int64 ids, same length."""

    @abstractmethod
    def leaf_count(self, node: int) -> int:
        """Number of facts that have `node`'s prefix (including a fact that ends exactly at `node`)."""

    @abstractmethod
    def is_terminal(self, node: int) -> bool:
        """True if a fact ends exactly at `node`."""

    @abstractmethod
    def distinct_tokens(self) -> np.ndarray:
        """Every token id that occurs in some fact, sorted (int64); checked against vocabularies."""

    def child(self, node: int, token: int) -> int:
        """The child of `node` by `token`, or -1 if no fact continues `node`'s prefix with `token`."""
        tokens, nodes = self.children(node)
        i = int(np.searchsorted(tokens, token))
        return int(nodes[i]) if i < len(tokens) and int(tokens[i]) == token else -1

    def fill_children(self, node: int, words: np.ndarray) -> None:
        """OR the bits of `node`'s next tokens into one int32 mask row `words` (the row is not cleared)."""
        set_token_bits(words, self.children(node)[0])


# ======================================================================================================
# the array-backed trie
# ======================================================================================================
@dataclass(frozen=True)
class TrieArrays:
    """The flat arrays of a compressed, breadth-first token trie (see the module docstring)."""

    label_start: np.ndarray  # int32/int64 (n_nodes + 1,)
    labels: np.ndarray  # int32 (n_labels,)
    child_start: np.ndarray  # int32/int64 (n_nodes + 1,)
    leaf_count: np.ndarray  # int32/int64 (n_nodes,)
    terminal: np.ndarray  # uint8 (n_nodes,)
    tokens_present: np.ndarray  # bool (max_token + 1,)


class TrieIndex(TrieStore):
    """A token trie held in flat arrays, memory-mapped from a file set written by `build_trie`.

    Use `TrieIndex.load(path)`; `build_trie(...)` returns one too. Read-only and shareable across threads.
    """

    def __init__(self, files: FileSet):
        self.files = files
        a = files.arrays
        self.arrays = TrieArrays(**{name: np.asarray(a[name]) for name in _ARRAYS})
        meta = files.meta
        self.path: Path = files.path
        self._n_facts = int(meta["n_facts"])
        self.max_len = int(meta["max_len"])
        self.n_tokens_total = int(meta["n_tokens"])
        self._check_cheap()

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool | None = None, mmap: bool = True) -> TrieIndex:
        """Open the index folder at `path`, memory-mapped (`mmap=False` reads it into memory).

        Sizes, dtypes and shapes are always checked; SHA-256 checksums and a full structural check run when
        `verify=True`, or (`verify=None`) for indexes of at most 64 MiB. Raises `IndexFormatError` naming the
        file and the problem.
        """
        files = load_file_set(path, kind=FORMAT, version=VERSION, required=_ARRAYS, verify=verify, mmap=mmap)
        for key in ("n_facts", "max_len", "n_tokens"):
            if not isinstance(files.meta.get(key), int):
                raise IndexFormatError(f"{files.path}/header.json: meta.{key} missing or not an integer")
        index = cls(files)
        if verify or (verify is None and files.nbytes <= 64 << 20):
            index._check_structure()
        return index

    def verify(self) -> None:
        """Check every checksum and the whole structure (reads every byte); raises `IndexFormatError`."""
        verify_checksums(self.path, self.files.header)
        self._check_structure()

    def _check_cheap(self) -> None:
        """O(1) consistency checks between the arrays (their sizes were checked against the header)."""
        a = self.arrays
        where = self.path
        offsets = (a.label_start.dtype, a.child_start.dtype, a.leaf_count.dtype)
        if (
            any(d not in (np.int32, np.int64) for d in offsets)
            or a.labels.dtype != np.int32
            or (a.terminal.dtype != np.uint8 or a.tokens_present.dtype != np.bool_)
        ):
            raise IndexFormatError(f"{where}: unexpected array dtypes")
        if any(getattr(a, name).ndim != 1 for name in _ARRAYS):
            raise IndexFormatError(f"{where}: index arrays must be one-dimensional")
        self.n_nodes = int(a.leaf_count.shape[0])
        self.n_labels = int(a.labels.shape[0])
        if a.label_start.shape[0] != self.n_nodes + 1 or a.child_start.shape[0] != self.n_nodes + 1:
            raise IndexFormatError(
                f"{where}: node arrays disagree in length (label_start, child_start, leaf_count)"
            )
        if a.terminal.shape[0] != self.n_nodes or self.n_nodes < 2:
            raise IndexFormatError(f"{where}: terminal.npy length or node count ({self.n_nodes}) is wrong")
        if int(a.label_start[-1]) != self.n_labels or int(a.child_start[-1]) != self.n_nodes:
            raise IndexFormatError(f"{where}: label_start/child_start do not end at the array sizes")
        if int(a.leaf_count[0]) != self._n_facts:
            raise IndexFormatError(
                f"{where}: root leaf count {int(a.leaf_count[0])} != n_facts {self._n_facts}"
            )

    def _check_structure(self) -> None:
        a = self.arrays
        node, code = _check_structure(a.label_start, a.labels, a.child_start, a.leaf_count, a.terminal)
        if code:
            raise IndexFormatError(f"{self.path}: corrupt trie at node {node}: {_STRUCTURE_PROBLEMS[code]}")
        present = np.zeros(a.tokens_present.shape[0], dtype=bool)
        if self.n_labels and int(a.labels.max()) >= present.shape[0]:
            raise IndexFormatError(f"{self.path}: labels.npy holds a token past tokens_present.npy")
        present[a.labels] = True
        if not np.array_equal(present, a.tokens_present):
            raise IndexFormatError(f"{self.path}: tokens_present.npy does not match labels.npy")

    # -- TrieStore -------------------------------------------------------------------------------------
    @property
    def n_facts(self) -> int:
        return self._n_facts

    @property
    def store_id(self) -> str:
        return f"trie:{self.files.build_id}"

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata recorded at build time (tokenizer, template, leading_space, vocab fingerprint ...)."""
        return self.files.meta

    def _decode(self, node: int) -> tuple[int, int, int, int]:
        c, k = unpack_node(node)
        if not 0 <= c < self.n_nodes:
            raise ConstraintError(f"node id {node} is not a node of {self.path}")
        ls, le = int(self.arrays.label_start[c]), int(self.arrays.label_start[c + 1])
        if not 0 <= k <= le - ls or (k == 0 and c != 0):
            raise ConstraintError(f"node id {node} is not a node of {self.path}")
        return c, k, ls, le

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        c, k, ls, le = self._decode(node)
        a = self.arrays
        if k < le - ls:
            return a.labels[ls + k : ls + k + 1].astype(np.int32), np.array([int(node) + 1], dtype=np.int64)
        cs, ce = int(a.child_start[c]), int(a.child_start[c + 1])
        tokens = a.labels[a.label_start[cs:ce]].astype(np.int32)
        return tokens, (np.arange(cs, ce, dtype=np.int64) << _K_BITS) | 1

    def child(self, node: int, token: int) -> int:
        a = self.arrays
        result = int(_step_node(np.int64(node), np.int64(token), a.label_start, a.labels, a.child_start))
        if result == -2:
            raise IndexFormatError(f"{self.path}: corrupt trie near node {node} (run TrieIndex.verify())")
        return result

    def leaf_count(self, node: int) -> int:
        return int(self.arrays.leaf_count[self._decode(node)[0]])

    def is_terminal(self, node: int) -> bool:
        c, k, ls, le = self._decode(node)
        return k == le - ls and bool(self.arrays.terminal[c])

    def distinct_tokens(self) -> np.ndarray:
        return np.flatnonzero(self.arrays.tokens_present).astype(np.int64)

    # -- queries for tests, stats and export ---------------------------------------------------------
    def __contains__(self, fact: Sequence[int]) -> bool:
        node = ROOT
        for token in fact:
            node = self.child(node, int(token))
            if node < 0:
                return False
        return self.is_terminal(node)

    def facts(self) -> Iterator[tuple[int, ...]]:
        """Every fact, in sorted token order (a depth-first walk; for tests and export, not the hot path)."""
        a = self.arrays
        stack: list[tuple[int, tuple[int, ...]]] = [(0, ())]
        while stack:
            c, prefix = stack.pop()
            prefix = prefix + tuple(int(t) for t in a.labels[a.label_start[c] : a.label_start[c + 1]])
            if a.terminal[c]:
                yield prefix
            cs, ce = int(a.child_start[c]), int(a.child_start[c + 1])
            stack.extend((ch, prefix) for ch in range(ce - 1, cs - 1, -1))

    def stats(self) -> dict[str, Any]:
        """Facts, nodes, bytes, bytes per fact, depth (tokens per fact) and the build metadata."""
        nbytes = self.files.nbytes
        return {
            "path": str(self.path),
            "facts": self.n_facts,
            "nodes": self.n_nodes,
            "label_tokens": self.n_labels,
            "fact_tokens": self.n_tokens_total,
            "bytes": nbytes,
            "bytes_per_fact": nbytes / max(self.n_facts, 1),
            "bytes_vs_int32_tokens": nbytes / max(4 * self.n_tokens_total, 1),
            "max_depth": self.max_len,
            "mean_depth": self.n_tokens_total / max(self.n_facts, 1),
            "meta": {k: v for k, v in self.meta.items() if k not in ("n_facts", "n_tokens", "max_len")},
        }

    def __repr__(self) -> str:
        return f"TrieIndex({self.path}: {self.n_facts} facts, {self.n_nodes} nodes)"


# ======================================================================================================
# build: chunk sort -> spill -> k-way merge -> breadth-first layout
# ======================================================================================================
@numba.njit(nogil=True, cache=True)
def _compare(tok_a, off_a, a, tok_b, off_b, b):
    """Lexicographic order of sequence a (in tok_a/off_a) and b: -1, 0 or 1; a proper prefix sorts first."""
    sa = off_a[a]
    la = off_a[a + 1] - sa
    sb = off_b[b]
    lb = off_b[b + 1] - sb
    n = min(la, lb)
    for i in range(n):
        x = tok_a[sa + i]
        y = tok_b[sb + i]
        if x != y:
            return -1 if x < y else 1
    if la == lb:
        return 0
    return -1 if la < lb else 1


@numba.njit(nogil=True, cache=True)
def _sort_sequences(tokens, offsets):
    """A stable order of the sequences (bottom-up merge sort over indices; insertion sort for runs of 16)."""
    n = offsets.shape[0] - 1
    order = np.arange(n)
    for lo in range(0, n, 16):
        hi = min(lo + 16, n)
        for i in range(lo + 1, hi):
            x = order[i]
            j = i - 1
            while j >= lo and _compare(tokens, offsets, order[j], tokens, offsets, x) > 0:
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = x
    buf = np.empty_like(order)
    width = 16
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, o = lo, mid, lo
            while i < mid and j < hi:
                if _compare(tokens, offsets, order[j], tokens, offsets, order[i]) < 0:
                    buf[o] = order[j]
                    j += 1
                else:
                    buf[o] = order[i]
                    i += 1
                o += 1
            while i < mid:
                buf[o] = order[i]
                i += 1
                o += 1
            while j < hi:
                buf[o] = order[j]
                j += 1
                o += 1
        order, buf = buf, order
        width *= 2
    return order


@numba.njit(nogil=True, cache=True)
def _gather_unique(tokens, offsets, order, out_tokens, out_offsets):
    """Copy sequences in `order` to out_*, skipping repeats of the previous one; returns (count, tokens)."""
    n_out = 0
    pos = 0
    out_offsets[0] = 0
    for idx in range(order.shape[0]):
        s = order[idx]
        if n_out > 0 and _compare(tokens, offsets, s, out_tokens, out_offsets, n_out - 1) == 0:
            continue
        for i in range(offsets[s], offsets[s + 1]):
            out_tokens[pos] = tokens[i]
            pos += 1
        n_out += 1
        out_offsets[n_out] = pos
    return n_out, pos


@numba.njit(nogil=True, cache=True)
def _sift_down(heap, size, i, tokens, offsets, run_pos):
    while True:
        left = 2 * i + 1
        if left >= size:
            return
        best = left
        right = left + 1
        if (
            right < size
            and _compare(tokens, offsets, run_pos[heap[right]], tokens, offsets, run_pos[heap[left]]) < 0
        ):
            best = right
        if _compare(tokens, offsets, run_pos[heap[best]], tokens, offsets, run_pos[heap[i]]) >= 0:
            return
        heap[i], heap[best] = heap[best], heap[i]
        i = best


@numba.njit(nogil=True, cache=True)
def _merge_runs(tokens, offsets, run_pos, run_end, heap, state, out_tokens, out_offsets, limit):
    """k-way merge of sorted runs of sequences (a binary heap of run ids), dropping duplicates; resumable.

    state = [heap size, sequences written, tokens written]; writes at most `limit` sequences per call.
    """
    size = state[0]
    n_out = state[1]
    pos = state[2]
    written = 0
    while size > 0 and written < limit:
        r = heap[0]
        s = run_pos[r]
        if n_out == 0 or _compare(tokens, offsets, s, out_tokens, out_offsets, n_out - 1) != 0:
            for i in range(offsets[s], offsets[s + 1]):
                out_tokens[pos] = tokens[i]
                pos += 1
            n_out += 1
            out_offsets[n_out] = pos
            written += 1
        run_pos[r] = s + 1
        if run_pos[r] == run_end[r]:
            size -= 1
            heap[0] = heap[size]
        _sift_down(heap, size, 0, tokens, offsets, run_pos)
    state[0] = size
    state[1] = n_out
    state[2] = pos


@numba.njit(nogil=True, cache=True)
def _heapify(heap, size, tokens, offsets, run_pos):
    for i in range(size // 2 - 1, -1, -1):
        _sift_down(heap, size, i, tokens, offsets, run_pos)


@numba.njit(nogil=True, cache=True)
def _build_nodes(tokens, offsets, lo, hi, start_depth, label_len, child_start, terminal, state, limit):
    """Breadth-first construction of the compressed trie from sorted, distinct sequences; resumable.

    Node i covers the sequences [lo[i], hi[i]) (all share its prefix); its label is label_len[i] tokens from
    depth start_depth[i]. Processing node i appends its children (one per distinct next token) to the queue,
    which is the node array itself. state = [next node to process, nodes so far, error flag]; at most
    `limit` nodes per call.
    """
    i = state[0]
    count = state[1]
    done = 0
    while i < count and done < limit:
        first = lo[i]
        end = hi[i]
        depth = start_depth[i] + label_len[i]
        child_start[i] = count
        s = first
        if offsets[first + 1] - offsets[first] == depth:  # the shortest sequence ends here: a fact
            terminal[i] = 1
            s += 1
        while s < end:
            if offsets[s + 1] - offsets[s] <= depth or count >= lo.shape[0]:
                state[2] = 1  # input not sorted and distinct: refuse rather than write out of bounds
                return
            t = tokens[offsets[s] + depth]
            a = s + 1  # the group of sequences with token t at `depth` ends at the first larger token
            b = end
            while a < b:
                m = (a + b) >> 1
                if tokens[offsets[m] + depth] <= t:
                    a = m + 1
                else:
                    b = m
            e = a
            last = e - 1
            length_s = offsets[s + 1] - offsets[s] - depth
            if last == s:
                n = length_s
            else:  # sorted, so the group's common prefix is that of its first and last sequence
                most = min(length_s, offsets[last + 1] - offsets[last] - depth)
                n = 1
                while n < most and tokens[offsets[s] + depth + n] == tokens[offsets[last] + depth + n]:
                    n += 1
            lo[count] = s
            hi[count] = e
            start_depth[count] = depth
            label_len[count] = n
            count += 1
            s = e
        i += 1
        done += 1
    state[0] = i
    state[1] = count


@numba.njit(nogil=True, cache=True)
def _fill_labels(tokens, offsets, lo, start_depth, label_start, labels, tokens_present):
    for c in range(label_start.shape[0] - 1):
        src = offsets[lo[c]] + start_depth[c]
        dst = label_start[c]
        for j in range(label_start[c + 1] - dst):
            t = tokens[src + j]
            labels[dst + j] = t
            tokens_present[t] = True


class _Progress:
    """A tqdm bar when asked for (or, with `enabled=None`, when stderr is a terminal); otherwise silent."""

    def __init__(self, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)

    def bar(self, desc: str, total: int | None, unit: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not self.enabled, leave=False)


class _Spill:
    """Sorted, deduplicated runs of sequences appended to two raw files (tokens int32, offsets int64)."""

    def __init__(self, folder: Path):
        self.tok_path = folder / "runs.tok"
        self.off_path = folder / "runs.off"
        self._tok = open(self.tok_path, "wb")
        self._off = open(self.off_path, "wb")
        self._off.write(np.zeros(1, dtype=np.int64).tobytes())
        self.run_bounds = [0]  # sequence index where each run starts, then the total
        self.n_tokens = 0

    def add_chunk(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        order = _sort_sequences(tokens, offsets)
        out_tokens = np.empty_like(tokens)
        out_offsets = np.empty(offsets.shape[0], dtype=np.int64)
        n, used = _gather_unique(tokens, offsets, order, out_tokens, out_offsets)
        self._tok.write(out_tokens[:used].tobytes())
        self._off.write((out_offsets[1 : n + 1] + self.n_tokens).tobytes())
        self.n_tokens += int(used)
        self.run_bounds.append(self.run_bounds[-1] + int(n))

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        self._tok.close()
        self._off.close()
        return _map_raw(self.tok_path, np.int32), _map_raw(self.off_path, np.int64)


def _map_raw(path: Path, dtype: Any) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r"))


def _merge(spill: _Spill, tokens: np.ndarray, offsets: np.ndarray, folder: Path, progress: _Progress):
    """Merge the spill's runs into one sorted, distinct sequence list (memory-mapped files in `folder`)."""
    bounds = np.asarray(spill.run_bounds, dtype=np.int64)
    n_runs = len(bounds) - 1
    if n_runs == 1:  # a single run is already sorted and distinct
        return tokens, offsets
    run_pos = bounds[:-1].copy()
    run_end = bounds[1:].copy()
    heap = np.array([r for r in range(n_runs) if run_pos[r] < run_end[r]], dtype=np.int64)
    _heapify(heap, heap.shape[0], tokens, offsets, run_pos)
    out_tokens = np.asarray(
        np.memmap(folder / "merged.tok", dtype=np.int32, mode="w+", shape=(max(len(tokens), 1),))
    )
    out_offsets = np.asarray(
        np.memmap(folder / "merged.off", dtype=np.int64, mode="w+", shape=(len(offsets),))
    )
    out_offsets[0] = 0
    state = np.array([heap.shape[0], 0, 0], dtype=np.int64)
    with progress.bar(f"merging {n_runs} runs", int(bounds[-1]), "seq") as bar:
        while state[0] > 0:
            before = int(state[1])
            _merge_runs(tokens, offsets, run_pos, run_end, heap, state, out_tokens, out_offsets, 1 << 20)
            bar.update(int(state[1]) - before)
    n = int(state[1])
    return out_tokens[: int(state[2])], out_offsets[: n + 1]


def _layout(
    tokens: np.ndarray, offsets: np.ndarray, writer: FileSetWriter, progress: _Progress
) -> tuple[int, int, int]:
    """Build the breadth-first compressed trie of sorted distinct sequences; write its arrays via `writer`.

    Returns (facts, nodes, label tokens).
    """
    n_facts = offsets.shape[0] - 1
    cap = 2 * n_facts + 1  # root + at most n_facts terminal nodes + at most n_facts - 1 branching nodes
    lo = np.zeros(cap, dtype=np.int64)
    hi = np.zeros(cap, dtype=np.int64)
    start_depth = np.zeros(cap, dtype=np.int32)
    label_len = np.zeros(cap, dtype=np.int64)
    child_start = np.zeros(cap + 1, dtype=np.int64)
    terminal = np.zeros(cap, dtype=np.uint8)
    hi[0] = n_facts
    state = np.array([0, 1, 0], dtype=np.int64)
    with progress.bar("building nodes", None, "node") as bar:
        while state[0] < state[1]:
            before = int(state[0])
            _build_nodes(
                tokens, offsets, lo, hi, start_depth, label_len, child_start, terminal, state, 1 << 20
            )
            if state[2]:
                raise ConstraintError("internal error: merged facts are not sorted and distinct")
            bar.update(int(state[0]) - before)
    n_nodes = int(state[1])
    child_start[n_nodes] = n_nodes
    label_start = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(label_len[:n_nodes], out=label_start[1:])
    n_labels = int(label_start[-1])
    max_token = int(tokens.max()) if tokens.shape[0] else 0
    labels = writer.open_array("labels", np.int32, (n_labels,))
    tokens_present = np.zeros(max_token + 1, dtype=np.bool_)
    _fill_labels(tokens, offsets, lo, start_depth, label_start, labels, tokens_present)
    del labels  # written through the shared mapping; commit() fsyncs the file
    writer.save("label_start", label_start.astype(_offset_dtype(n_labels)))
    writer.save("child_start", child_start[: n_nodes + 1].astype(_offset_dtype(n_nodes)))
    writer.save("leaf_count", (hi[:n_nodes] - lo[:n_nodes]).astype(_offset_dtype(n_facts)))
    writer.save("terminal", terminal[:n_nodes])
    writer.save("tokens_present", tokens_present)
    return n_facts, n_nodes, n_labels


@dataclass(frozen=True)
class TokenBatch:
    """Many token sequences in two flat arrays: `tokens[offsets[i]:offsets[i + 1]]` is sequence i."""

    tokens: np.ndarray  # int (n_tokens,)
    offsets: np.ndarray  # int64 (n + 1,), offsets[0] == 0

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> TokenBatch:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1


def _check_batch(batch: TokenBatch, first_fact: int, vocab: Vocabulary | None) -> np.ndarray:
    """Validate one batch (non-empty sequences, ids in range, no special ids); return its tokens as int32."""
    lengths = np.diff(batch.offsets)
    if batch.offsets[0] != 0 or lengths.min(initial=1) < 0 or batch.offsets[-1] != batch.tokens.shape[0]:
        raise ConstraintError(f"facts #{first_fact}..: offsets do not describe the token array")
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ConstraintError(f"fact #{first_fact + int(empty[0])}: empty token sequence")
    tokens = np.asarray(batch.tokens)
    if tokens.dtype.kind not in "iu":
        raise ConstraintError(f"facts #{first_fact}..: token ids must be integers, got dtype {tokens.dtype}")
    limit = vocab.n_tokens if vocab is not None else _MAX_TOKEN
    bad = np.flatnonzero((tokens < 0) | (tokens >= limit))
    if vocab is not None and not bad.size:
        banned = np.zeros(vocab.n_tokens, dtype=np.bool_)
        banned[list(vocab.special_ids | vocab.eos_ids)] = True
        bad = np.flatnonzero(banned[tokens])
    if bad.size:
        pos = int(bad[0])
        fact = first_fact + int(np.searchsorted(batch.offsets, pos, side="right")) - 1
        what = (
            f"for {vocab.name or 'the vocabulary'} ({vocab.n_tokens} tokens, specials excluded)"
            if vocab
            else ""
        )
        raise ConstraintError(
            f"fact #{fact}: token id {int(tokens[pos])} not allowed in a fact {what}".rstrip()
        )
    return tokens.astype(np.int32, copy=False)


def build_trie(
    sequences: Iterable[Sequence[int]] | Iterable[TokenBatch],
    out: str | os.PathLike | None = None,
    *,
    vocab: Vocabulary | None = None,
    meta: dict[str, Any] | None = None,
    chunk_tokens: int = 64 << 20,
    chunk_facts: int = 1 << 20,
    overwrite: bool = False,
    progress: bool | None = None,
    _durable: bool = True,
) -> TrieIndex:
    """Build a token trie from token-id sequences (facts), streaming, and write it to the folder `out`.

    `sequences` yields facts (sequences of ints) or `TokenBatch`es (many facts in flat arrays: the fast
    path; a batch is never split). Up to `chunk_tokens` tokens are sorted in memory at a time and spilled
    to disk; the sorted runs are then merged (through memory-mapped files), so memory is bounded by one
    chunk plus the node arrays (37 bytes per node, allocated for the 2F + 1 worst case: ~75 bytes per
    distinct fact). Identical facts are stored once.

    `vocab`: every id must be an ordinary token of it (no special, EOS or padding id); its fingerprint is
    recorded so the index only compiles against it. `meta` (JSON-serialisable) goes into the header.
    `out=None` builds in a temporary folder and returns an in-memory index. `progress` shows tqdm bars
    (None: when stderr is a terminal).

    The write is atomic: the folder appears complete or not at all. Raises `ConstraintError` for an empty
    fact list, an empty fact or a bad token id (naming the fact's position), or an existing `out` without
    `overwrite`.
    """
    if out is None:
        with tempfile.TemporaryDirectory(prefix="constrain-trie-") as tmp:
            built = build_trie(
                sequences,
                Path(tmp) / "trie",
                vocab=vocab,
                meta=meta,
                chunk_tokens=chunk_tokens,
                chunk_facts=chunk_facts,
                progress=progress,
                _durable=False,
            )
            return TrieIndex.load(built.path, verify=False, mmap=False)
    show = _Progress(progress)
    started = time.perf_counter()
    with FileSetWriter(out, kind=FORMAT, version=VERSION, overwrite=overwrite, durable=_durable) as writer:
        spill = _Spill(writer.scratch("spill"))
        pending_tokens: list[np.ndarray] = []
        pending_offsets: list[np.ndarray] = []
        pending = 0
        n_input = 0
        n_tokens_in = 0
        max_len = 0

        def flush() -> None:
            nonlocal pending
            if not pending_tokens:
                return
            tokens = np.concatenate(pending_tokens)
            offsets = np.concatenate([pending_offsets[0]] + [o[1:] for o in pending_offsets[1:]])
            spill.add_chunk(tokens, offsets)
            pending_tokens.clear()
            pending_offsets.clear()
            pending = 0

        items = iter(sequences)
        with show.bar("reading facts", None, "fact") as bar:
            for batch in _as_batches(items, chunk_facts):
                if len(batch) == 0:
                    continue
                tokens = _check_batch(batch, n_input, vocab)
                offsets = batch.offsets.astype(np.int64, copy=False)
                if pending_offsets:  # shift to continue the pending chunk's offsets
                    offsets = offsets + pending
                pending_tokens.append(tokens)
                pending_offsets.append(offsets)
                pending += int(tokens.shape[0])
                n_input += len(batch)
                n_tokens_in += int(tokens.shape[0])
                max_len = max(max_len, int(np.diff(batch.offsets).max()))
                bar.update(len(batch))
                if pending >= chunk_tokens:
                    flush()
            flush()
        if n_input == 0:
            raise ConstraintError("no facts to index: the input is empty")
        tokens, offsets = spill.close()
        tokens, offsets = _merge(spill, tokens, offsets, writer.scratch("merge"), show)
        n_facts = offsets.shape[0] - 1
        n_tokens = int(offsets[-1])
        n_facts, n_nodes, n_labels = _layout(tokens, offsets, writer, show)
        del tokens, offsets
        info = dict(meta or {})
        if vocab is not None:
            info.setdefault("vocab_name", vocab.name)
            info["vocab_fingerprint"] = vocab.fingerprint
        info.update(
            n_facts=n_facts,
            n_input=n_input,
            n_tokens=n_tokens,
            max_len=max_len,
            n_nodes=n_nodes,
            n_labels=n_labels,
            build_seconds=round(time.perf_counter() - started, 3),
        )
        files = writer.commit(info)
    return TrieIndex.load(files.path, verify=False)


def _as_batches(items: Iterator[Any], chunk_facts: int) -> Iterator[TokenBatch]:
    """Pass `TokenBatch`es through; group plain sequences into batches of `chunk_facts`."""
    plain: list[Sequence[int]] = []
    for item in items:
        if isinstance(item, TokenBatch):
            if plain:
                yield TokenBatch.from_sequences(plain)
                plain = []
            yield item
            continue
        plain.append(item)
        if len(plain) >= chunk_facts:
            yield TokenBatch.from_sequences(plain)
            plain = []
    if plain:
        yield TokenBatch.from_sequences(plain)


def load_trie(path: str | os.PathLike, *, verify: bool | None = None) -> TrieIndex:
    """Shorthand for `TrieIndex.load(path, verify=verify)`."""
    return TrieIndex.load(path, verify=verify)


# ======================================================================================================
# the constraint and its matcher
# ======================================================================================================
class TrieConstraint(Constraint):
    """Only token sequences that spell a fact of the index (then EOS); see `trie_constraint`."""

    def __init__(
        self, index: TrieStore | str | os.PathLike, *, no_repeat: bool = False, verify: bool | None = None
    ):
        self.store = index if isinstance(index, TrieStore) else TrieIndex.load(index, verify=verify)
        self.no_repeat = bool(no_repeat)

    def cache_key(self) -> object:
        key = (
            self.store.store_id
            if isinstance(self.store, TrieIndex)
            else f"{self.store.store_id}@{id(self.store)}"
        )
        return (key, self.no_repeat)

    def _compile(self, vocab: Vocabulary) -> CompiledTrie:
        return CompiledTrie(self.store, vocab, no_repeat=self.no_repeat)

    def __repr__(self) -> str:
        return f"trie_constraint({self.store!r}, no_repeat={self.no_repeat})"


def trie_constraint(
    index_or_path: TrieStore | str | os.PathLike, *, no_repeat: bool = False
) -> TrieConstraint:
    """A constraint that lets the model write exactly one fact of the index (token by token), then EOS.

    `index_or_path`: a `TrieIndex` (or any `TrieStore`) or the folder of one. `no_repeat=True`: facts already
    completed in this sequence (see `TrieMatcher.end_fact`) cannot be written again. Raises `IndexFormatError`
    for a corrupt index folder; compiling raises `ConstraintError` if the index holds ids that are special,
    EOS or padding ids of the vocabulary, or was built for a different vocabulary.
    """
    return TrieConstraint(index_or_path, no_repeat=no_repeat)


_I32 = np.dtype(np.int32)
_tensor_views: tuple[Any, int, tuple[int, ...], np.ndarray] | None = None


def _mask_array(bitmask: torch.Tensor | np.ndarray, row: int, vocab_size: int, words: int) -> np.ndarray:
    """The bitmask as a 2-D int32 numpy array (shared memory), checked: a cheap path for the common cases.

    The numpy view of the last torch tensor seen is cached (keyed on identity, data pointer and shape), since
    `Tensor.numpy()` alone costs ~1.5 us. Anything unusual goes through `row_view` (raises `BitmaskError`).
    """
    global _tensor_views
    if type(bitmask) is np.ndarray:
        if (
            bitmask.dtype == _I32
            and bitmask.ndim == 2
            and bitmask.shape[1] == words
            and 0 <= row < bitmask.shape[0]
        ):
            return bitmask
    elif isinstance(bitmask, torch.Tensor):
        cached = _tensor_views
        if (
            cached is not None
            and cached[0] is bitmask
            and cached[1] == bitmask.data_ptr()
            and cached[2] == bitmask.shape
            and 0 <= row < cached[3].shape[0]
        ):
            return cached[3]
    row_view(bitmask, row, vocab_size)  # raises BitmaskError with the precise problem
    array = bitmask.numpy() if isinstance(bitmask, torch.Tensor) else bitmask
    if isinstance(bitmask, torch.Tensor):
        _tensor_views = (bitmask, bitmask.data_ptr(), bitmask.shape, array)
    return array


class CompiledTrie(CompiledConstraint):
    """A trie store checked against one vocabulary; `matcher()` gives a per-sequence `TrieMatcher`."""

    def __init__(self, store: TrieStore, vocab: Vocabulary, *, no_repeat: bool = False):
        self.store = store
        self.vocab = vocab
        self.no_repeat = no_repeat
        self.words = bitmask_words(vocab.vocab_size)
        self.eos = vocab.eos_array
        fingerprint = store.meta.get("vocab_fingerprint") if isinstance(store, TrieIndex) else None
        if fingerprint is not None and fingerprint != vocab.fingerprint:
            raise ConstraintError(
                f"index {getattr(store, 'path', store)} was built for vocabulary "
                f"{store.meta.get('vocab_name', '?')!r} (fingerprint {fingerprint}), not {vocab.name!r} "
                f"({vocab.fingerprint}); rebuild it with this tokenizer"
            )
        # Ids a fact may never contain: specials, EOS and padding (and anything past the bitmask).
        forbidden = np.zeros(self.words, dtype=np.int32)
        banned = np.concatenate(
            [
                np.asarray(sorted(vocab.special_ids | vocab.eos_ids), dtype=np.int64),
                np.arange(vocab.n_tokens, self.words * 32, dtype=np.int64),
            ]
        )
        set_token_bits(forbidden, banned)
        self.forbidden = forbidden
        present = store.distinct_tokens()
        bad = present[(present >= vocab.n_tokens) | np.isin(present, banned)]
        if bad.size:
            shown = ", ".join(
                f"{int(t)}" + (f" {vocab.token_bytes[t]!r}" if t < vocab.n_tokens else "") for t in bad[:5]
            )
            raise ConstraintError(
                f"index {getattr(store, 'path', store)} holds token ids that are special, EOS or padding "
                f"ids of {vocab.name or 'the vocabulary'} ({vocab.n_tokens} tokens): {shown}"
            )
        self.fast = store.arrays if isinstance(store, TrieIndex) else None
        self.wide: dict[int, tuple[np.ndarray, bool]] = {}
        if self.fast is not None:
            a = self.fast
            # The kernels' array arguments, gathered once: attribute lookups cost on the hot path.
            self.fill_args = (a.label_start, a.labels, a.child_start, a.terminal, self.eos, self.forbidden)
            self.step_args = (a.label_start, a.labels, a.child_start)
            self.wide = self._wide_rows()

    def _wide_rows(self) -> dict[int, tuple[np.ndarray, bool]]:
        """Precomputed mask rows (EOS excluded) of the nodes with the most children (at least WIDE_FANOUT,
        at most MAX_WIDE_ROWS of them), by node id, with their terminal flag: copying a row costs about one
        memset, while setting 10k scattered bits costs ~30 us.

        Scans child_start once (O(nodes), in chunks; 8.5 ms at 1.5M nodes). Raises `IndexFormatError` if a
        wide node's children are corrupt.
        """
        a = self.fast
        found: list[np.ndarray] = []
        fanouts: list[np.ndarray] = []
        n_nodes = a.child_start.shape[0] - 1
        for start in range(0, n_nodes, 1 << 22):
            fanout = np.diff(np.asarray(a.child_start[start : start + (1 << 22) + 1], dtype=np.int64))
            wide = np.flatnonzero(fanout >= WIDE_FANOUT)
            found.append(wide + start)
            fanouts.append(fanout[wide])
        nodes, fanout = np.concatenate(found), np.concatenate(fanouts)
        rows: dict[int, tuple[np.ndarray, bool]] = {}
        for c in nodes[np.argsort(-fanout, kind="stable")[:MAX_WIDE_ROWS]].tolist():
            node = pack_node(c, int(a.label_start[c + 1]) - int(a.label_start[c]))
            row = np.zeros((1, self.words), dtype=np.int32)
            status = _fill_node(row, 0, node, *self.fill_args, False)
            if status < 0:
                raise IndexFormatError(
                    f"{self.store.path}: corrupt trie near node {c} (run TrieIndex.verify())"
                )
            rows[node] = (row[0], status == 1)
        return rows

    def matcher(self) -> TrieMatcher:
        return TrieMatcher(self)


class TrieMatcher(Matcher):
    """Follows one sequence through the trie: the state is the node reached (see `trie_constraint`).

    Beyond the `Matcher` protocol: `end_fact()` records the fact just completed and returns to the root for
    the next one (trigger mode writes several facts per sequence), `completed_facts()` lists them, and
    `node` is the current node id.
    """

    def __init__(self, compiled: CompiledTrie):
        self._c = compiled
        self.vocab = compiled.vocab
        # The node after each accepted token (-1: EOS accepted); [0] is the start.
        self._nodes: list[int] = [ROOT]
        self._tokens: list[int] = []
        self._ends: list[int] = []  # indices into _nodes where end_fact() returned to the root
        self._used: dict[int, int] = {}  # no_repeat: completed facts through each node
        self._done: set[int] = set()  # no_repeat: terminal nodes of completed facts
        self._blocked: dict[int, list[int]] = {}  # no_repeat: parent node -> next tokens with nothing left

    # -- state -----------------------------------------------------------------------------------------
    @property
    def node(self) -> int:
        """The current node id (`ROOT` at the start of a fact; -1 once EOS was accepted)."""
        return self._nodes[-1]

    def is_terminated(self) -> bool:
        return self._nodes[-1] < 0

    def is_accepting(self) -> bool:
        node = self._nodes[-1]
        if node < 0:
            return False
        return self._c.store.is_terminal(node) and node not in self._done

    # -- masks -----------------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        c = self._c
        array = _mask_array(bitmask, row, self.vocab.vocab_size, c.words)
        node = self._nodes[-1]
        if node < 0:  # terminated: only EOS, so a finished row stays harmless
            array[row] = 0
            set_token_bits(array[row], c.eos)
            return
        wide = c.wide.get(node)
        if wide is not None:  # a node with many children: copy its precomputed row
            array[row] = wide[0]
            if wide[1] and node not in self._done:
                set_token_bits(array[row], c.eos)
        elif c.fast is not None:
            status = _fill_node(array, row, node, *c.fill_args, node not in self._done)
            if status < 0:
                raise IndexFormatError(
                    f"{c.store.path}: corrupt trie near node {node} (run TrieIndex.verify())"
                )
        else:
            words = array[row]
            words[:] = 0
            c.store.fill_children(node, words)
            if (words & c.forbidden).any():
                raise ConstraintError(f"store {c.store.store_id}: node {node} offers a special or padding id")
            if c.store.is_terminal(node) and node not in self._done:
                set_token_bits(words, c.eos)
        blocked = self._blocked.get(node)
        if blocked:
            words = array[row]
            for t in blocked:
                words[t >> 5] &= ~_BITS[t & 31]

    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        node = self._nodes[-1]
        if token in self.vocab.eos_ids:
            if node >= 0 and not self.is_accepting():
                return False
            self._push(token, -1)
            return True
        if node < 0:
            return False
        c = self._c
        if c.fast is not None:
            nxt = int(_step_node(node, token, *c.step_args))
            if nxt == -2:
                raise IndexFormatError(
                    f"{c.store.path}: corrupt trie near node {node} (run TrieIndex.verify())"
                )
        else:
            nxt = c.store.child(node, token)
        if nxt < 0 or (self._blocked and token in self._blocked.get(node, ())):
            return False
        self._push(token, nxt)
        return True

    def _push(self, token: int, node: int) -> None:
        self._tokens.append(token)
        self._nodes.append(node)

    def rollback(self, n: int = 1) -> None:
        """Undo the last `n` tokens, and every `end_fact()` made after the first of them was accepted."""
        self._check_rollback(n, len(self._tokens))
        if n == 0:
            return
        keep = len(self._nodes) - n
        del self._nodes[keep:]
        del self._tokens[keep - 1 :]
        if self._ends and self._ends[-1] >= keep:
            self._ends = [e for e in self._ends if e < keep]
            self._recount()

    def fork(self) -> TrieMatcher:
        other = TrieMatcher.__new__(TrieMatcher)
        other._c = self._c
        other.vocab = self.vocab
        other._nodes = list(self._nodes)
        other._tokens = list(self._tokens)
        other._ends = list(self._ends)
        other._used = dict(self._used)
        other._done = set(self._done)
        other._blocked = {k: list(v) for k, v in self._blocked.items()}
        return other

    # -- several facts per sequence ---------------------------------------------------------------------
    def end_fact(self) -> None:
        """Record the fact just completed and move to the root to start the next one (no token consumed).

        With `no_repeat`, that fact can no longer be generated by this matcher. Raises `ConstraintError` if
        the tokens since the last `end_fact()` do not form a complete fact (or EOS was accepted).
        """
        node = self._nodes[-1]
        if node < 0 or not self.is_accepting():
            raise ConstraintError("end_fact(): the tokens since the last fact do not complete a fact here")
        self._ends.append(len(self._nodes) - 1)
        self._nodes[-1] = ROOT
        if self._c.no_repeat:
            self._recount()

    def completed_facts(self) -> list[tuple[int, ...]]:
        """The token sequences of the facts ended with `end_fact()`, in order."""
        facts = []
        start = 0
        for end in self._ends:
            facts.append(tuple(self._tokens[start:end]))
            start = end
        return facts

    def _recount(self) -> None:
        """Recompute the no_repeat subtraction from the completed facts (few per sequence, so cheap)."""
        self._used.clear()
        self._done.clear()
        self._blocked.clear()
        if not self._c.no_repeat:
            return
        store = self._c.store
        for fact in self.completed_facts():
            node = ROOT
            path = []
            for token in fact:
                nxt = store.child(node, token)
                path.append((node, token, nxt))
                node = nxt
            self._done.add(node)
            for parent, token, child in path:
                used = self._used.get(child, 0) + 1
                self._used[child] = used
                if used >= store.leaf_count(child):
                    self._blocked.setdefault(parent, []).append(token)
        # The start node of a fact is the root; its terminal-ness never matters (facts are non-empty).

    def __repr__(self) -> str:
        return f"TrieMatcher(node={self.node}, tokens={len(self._tokens)}, facts={len(self._ends)})"


__all__ = [
    "ROOT",
    "CompiledTrie",
    "TokenBatch",
    "TrieArrays",
    "TrieConstraint",
    "TrieIndex",
    "TrieMatcher",
    "TrieStore",
    "build_trie",
    "load_trie",
    "pack_node",
    "set_token_bits",
    "trie_constraint",
    "unpack_node",
]
