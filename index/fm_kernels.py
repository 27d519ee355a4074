"""numba inner loops of the FM-index: rank, wavelet-matrix walks, backward steps, locate, mask filling, room.

All kernels that call each other live in this one file on purpose: numba's on-disk cache (`cache=True`) only
checks the file that defines a kernel, so a kernel inlined from another file could keep running stale code.

Conventions (see `docs/fm_index.md`): the FM-index is built over the reversed corpus, so a row range
`[sp, ep)` of its suffix array holds the occurrences of the current span, and the symbols of the BWT in that
range are the tokens that follow them. Symbol 0 is the sentinel, 1 the document separator, `s >= 2` the token
`tokens[s - 2]`; `lf_offset[s] = C[s] - bottom_start[s]` folds the FM `C` array into the wavelet matrix's
bottom-level offsets, so a backward step is `wm_follow_pair(...) + lf_offset[s]`.

Masks are uint32 words (the bitmask ABI viewed unsigned); `allowed` is the mask of ids a span may contain
(ordinary, non-EOS tokens of the vocabulary).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_jit = numba.njit(cache=True, nogil=True)

ROOM_CAP = 255  # room values are stored as uint8
_BLOCK_SHIFT = 6  # room maxima per 64 entries ...
_SUPER_SHIFT = 12  # ... and per 4096 entries


@intrinsic
def popcount64(typingctx, x):  # noqa: ARG001 - numba's intrinsic signature
    """Number of set bits of a uint64 (LLVM's ctpop: one POPCNT instruction on x86-64)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


# -- bit vectors and the wavelet matrix (layouts in wavelet.py) -------------------------------------------
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


# -- FM-index: search and locate ----------------------------------------------------------------------------
@_jit
def backward_step(words, block_rank, zeros, lf_offset, sp, ep, symbol):
    """The row range of `symbol` + (the span of rows `[sp, ep)`), i.e. the span extended to the right."""
    s, e = wm_follow_pair(words, block_rank, zeros, symbol, sp, ep)
    return s + lf_offset[symbol], e + lf_offset[symbol]


@_jit
def lf_step(words, block_rank, zeros, lf_offset, row):
    """(symbol in the BWT at `row`, LF(row)): the row of the suffix one text position to the left."""
    symbol, bottom = wm_access_follow(words, block_rank, zeros, row)
    return symbol, bottom + lf_offset[symbol]


@_jit
def locate_rows(words, block_rank, zeros, lf_offset, marked_words, marked_rank, samples, sp, ep):
    """Text positions (in the reversed text) of the suffixes in rows `[sp, ep)`, via the sampled SA.

    A row is marked when its suffix position is a multiple of the sample rate; unmarked rows walk LF steps
    (one text position each) until a marked row, so each row costs at most `rate - 1` steps.
    """
    out = np.empty(ep - sp, dtype=np.int64)
    for row in range(sp, ep):
        r = row
        steps = 0
        while get_bit(marked_words, r) == 0:
            _, r = lf_step(words, block_rank, zeros, lf_offset, r)
            steps += 1
        out[row - sp] = samples[rank1(marked_words, marked_rank, r)] + steps
    return out


@_jit
def reversed_text_walk(words, block_rank, zeros, lf_offset, n_rows):
    """Walk the whole text by LF from the sentinel's row: (symbol at each reversed-text position, row of
    the suffix starting at each position). Used once per compile to derive per-row data."""
    symbols = np.empty(n_rows - 1, dtype=np.int32)
    row_of = np.empty(n_rows, dtype=np.int64)
    row = 0  # the suffix "$" starts at position n_rows - 1
    row_of[n_rows - 1] = 0
    for position in range(n_rows - 2, -1, -1):
        symbol, row = lf_step(words, block_rank, zeros, lf_offset, row)
        symbols[position] = symbol
        row_of[position] = row
    return symbols, row_of


# -- room: how many ordinary tokens can still follow ------------------------------------------------------
@_jit
def room_per_row(symbols, row_of, symbol_ok):
    """For each row of the reversed-text SA: how many tokens that a span may contain come right after the
    occurrence that ends there (in the forward text), capped at ROOM_CAP."""
    room = np.empty(row_of.shape[0], dtype=np.uint8)
    run = 0
    room[row_of[0]] = 0
    for position in range(1, row_of.shape[0]):
        run = min(run + 1, ROOM_CAP) if symbol_ok[symbols[position - 1]] else 0
        room[row_of[position]] = run
    return room


@_jit
def room_per_position(text, symbol_ok):
    """For each forward-text position: the length of the run of allowed tokens starting there (capped)."""
    room = np.zeros(text.shape[0], dtype=np.uint8)
    run = 0
    for position in range(text.shape[0] - 1, -1, -1):
        run = min(run + 1, ROOM_CAP) if symbol_ok[text[position]] else 0
        room[position] = run
    return room


def room_summaries(room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maxima of `room` per 64 and per 4096 entries, for `room_at_least`."""
    padded = np.zeros(-(-room.shape[0] // 4096) * 4096 or 4096, dtype=np.uint8)
    padded[: room.shape[0]] = room
    return padded.reshape(-1, 64).max(axis=1), padded.reshape(-1, 4096).max(axis=1)


@_jit
def room_at_least(room, block_max, super_max, a, b, need):
    """True if some entry of `room[a:b]` is >= `need` (block maxima skip 64 / 4096 entries at a time)."""
    i = a
    while i < b and (i & 63):
        if room[i] >= need:
            return True
        i += 1
    while i + 64 <= b and (i & 4095):
        if block_max[i >> _BLOCK_SHIFT] >= need:
            return True
        i += 64
    while i + 4096 <= b:
        if super_max[i >> _SUPER_SHIFT] >= need:
            return True
        i += 4096
    while i + 64 <= b:
        if block_max[i >> _BLOCK_SHIFT] >= need:
            return True
        i += 64
    while i < b:
        if room[i] >= need:
            return True
        i += 1
    return False


@_jit
def _is_allowed(allowed, token):
    return (allowed[token >> 5] >> np.uint32(token & 31)) & np.uint32(1)


# -- mask filling -----------------------------------------------------------------------------------------
@_jit
def fill_fm(
    words, block_rank, zeros, lf_offset, tokens, sp, ep, allowed, need, room, block_max, super_max, out
):
    """Overwrite `out` with the tokens that follow the span of rows `[sp, ep)` (the distinct BWT symbols).

    With `need > 0`, a token counts only if some occurrence of the extended span is followed by at least
    `need` more allowed tokens (so the span can still reach `min_tokens`).
    """
    out[:] = 0
    size = min(ep - sp, lf_offset.shape[0])
    symbols = np.empty(size, dtype=np.int64)
    starts = np.empty(size, dtype=np.int64)
    ends = np.empty(size, dtype=np.int64)
    k = wm_distinct(words, block_rank, zeros, sp, ep, symbols, starts, ends)
    for j in range(k):
        symbol = symbols[j]
        if symbol < 2:  # sentinel or document separator: never a token
            continue
        token = tokens[symbol - 2]
        if not _is_allowed(allowed, token):
            continue
        if need > 0:
            shift = lf_offset[symbol]
            if not room_at_least(room, block_max, super_max, starts[j] + shift, ends[j] + shift, need):
                continue
        out[token >> 5] |= np.uint32(1) << np.uint32(token & 31)


# -- sentence starts: a sparse suffix array over the forward text -------------------------------------------
@_jit
def _upper_bound(text, starts, lo, hi, depth, symbol):
    """First k in [lo, hi) whose suffix has a symbol > `symbol` at `depth` (keys ascend over the range)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if text[starts[mid] + depth] <= symbol:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def sparse_step(text, starts, lo, hi, depth, symbol):
    """The sub-range of `[lo, hi)` whose suffixes have `symbol` at `depth` (the span extended by it)."""
    a = _upper_bound(text, starts, lo, hi, depth, symbol - 1)
    b = _upper_bound(text, starts, a, hi, depth, symbol)
    return a, b


@_jit
def fill_sparse(text, starts, tokens, lo, hi, depth, allowed, min_tokens, room, block_max, super_max, out):
    """Overwrite `out` with the tokens at `depth` of the suffixes `starts[lo:hi]` (sharing `depth` tokens).

    Runs of equal symbols are skipped by galloping, so k distinct tokens cost O(k log(range)). With
    `min_tokens > depth + 1`, a token counts only if some of its suffixes begins a run of at least
    `min_tokens` allowed tokens (`room` is indexed like `starts`).
    """
    out[:] = 0
    k = lo
    while k < hi:
        symbol = text[starts[k] + depth]
        # Gallop to a bound past the run of `symbol`, then binary search inside it.
        step = 1
        last = k
        while last + step < hi and text[starts[last + step] + depth] == symbol:
            last += step
            step <<= 1
        end = _upper_bound(text, starts, last + 1, min(last + step, hi), depth, symbol)
        if symbol >= 2:
            token = tokens[symbol - 2]
            if _is_allowed(allowed, token) and (
                min_tokens <= depth + 1 or room_at_least(room, block_max, super_max, k, end, min_tokens)
            ):
                out[token >> 5] |= np.uint32(1) << np.uint32(token & 31)
        k = end
