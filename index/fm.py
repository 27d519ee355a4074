"""Constrain generation to spans of a corpus (SEAL / RetroLLM style) with an FM-index.

    index = FMIndex.build(documents, vocab_size=vocab.vocab_size)      # token-id documents
    compiled = compile(fm_constraint(index, start="any", min_tokens=1), vocab)
    m = compiled.matcher()
    m.fill_bitmask(bitmask, row)    # the tokens that keep the span a substring of some document
    m.accept(token); m.occurrences()  # -> [(document, offset), ...] of the span so far

A matcher keeps the range of the span's occurrences (FM-index rows, or entries of the sentence suffix array)
for each accepted token, so `accept` is one incremental search step, `rollback` pops ranges and `fork` copies
them. The allowed tokens are the distinct symbols in the BWT range (a wavelet-matrix walk, O(k log sigma)
for k tokens); the empty span's mask is precomputed at compile time.

Which tokens a span may contain: the vocabulary's ordinary tokens (not special, not EOS, not padding); a
corpus token that is not one acts like a document boundary. EOS is allowed once the span has `min_tokens`
tokens. With `min_tokens > 1` a token is allowed only if some occurrence of the extended span leaves room for
`min_tokens` tokens in its document, so the mask never leads into a dead end.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from constrain.bitmask import bitmask_words, row_view
from constrain.constraint import CompiledConstraint, Constraint, Matcher
from constrain.errors import ConstraintError
from constrain.vocab import Vocabulary

from .fm_index import FIRST_TOKEN_SYMBOL, START_MODES, FMIndex, StartMode
from .fm_kernels import (
    fill_fm,
    fill_sparse,
    reversed_text_walk,
    room_at_least,
    room_per_position,
    room_per_row,
    room_summaries,
)

__all__ = ["FMConstraint", "FMIndex", "FMMatcher", "CompiledFM", "fm_constraint"]

MAX_MIN_TOKENS = 255  # room values are capped at 255 (uint8)
# Masks of occurrence ranges at least this wide are kept in a per-compiled LRU cache: listing thousands of
# distinct followers costs ~0.3 µs each, and the widest ranges (a span of one common token) recur the most.
WIDE_RANGE = 256
MASK_CACHE_ENTRIES = 512  # 16 KB each for a 128k vocabulary


class FMConstraint(Constraint):
    """Spans of the corpus of `index` (see `fm_constraint`)."""

    def __init__(self, index: FMIndex, *, start: StartMode = "any", min_tokens: int = 1):
        if not isinstance(index, FMIndex):
            raise ConstraintError(f"fm_constraint expects an FMIndex, got {type(index).__name__}")
        if start not in START_MODES:
            raise ConstraintError(f"fm_constraint: start must be one of {START_MODES}, got {start!r}")
        if start == "sentence" and not index.has_sentences:
            raise ConstraintError('fm_constraint: start="sentence" needs an index built with sentence_starts')
        if (
            isinstance(min_tokens, bool)
            or not isinstance(min_tokens, int)
            or not 1 <= min_tokens <= MAX_MIN_TOKENS
        ):
            raise ConstraintError(
                f"fm_constraint: min_tokens must be an int in [1, {MAX_MIN_TOKENS}], got {min_tokens!r}"
            )
        self.index = index
        self.start = start
        self.min_tokens = min_tokens

    def cache_key(self) -> object:
        return (self.index.fingerprint, self.start, self.min_tokens)

    def _compile(self, vocab: Vocabulary) -> CompiledFM:
        return CompiledFM(self.index, vocab, start=self.start, min_tokens=self.min_tokens)

    def __repr__(self) -> str:
        return f"fm_constraint({self.index!r}, start={self.start!r}, min_tokens={self.min_tokens})"


def fm_constraint(index: FMIndex, *, start: StartMode = "any", min_tokens: int = 1) -> FMConstraint:
    """A constraint that keeps the generated span a contiguous substring of one document of `index`.

    `start`: "any" (the span may begin anywhere), "document" (at a document's first token) or "sentence" (at
    a sentence start given to `FMIndex.build`). EOS is allowed once the span has at least `min_tokens` (>= 1)
    tokens. Raises `ConstraintError` for a bad `start` / `min_tokens`, or "sentence" on an index without
    sentence starts; compiling raises it if the index's `vocab_size` exceeds the vocabulary's.
    """
    return FMConstraint(index, start=start, min_tokens=min_tokens)


class CompiledFM(CompiledConstraint):
    """An FM-index constraint compiled for one vocabulary: allowed-id mask, room tables, the start mask."""

    def __init__(self, index: FMIndex, vocab: Vocabulary, *, start: StartMode, min_tokens: int):
        if index.vocab_size > vocab.vocab_size:
            name = vocab.name or "a vocabulary"
            raise ConstraintError(
                f"FM-index built for vocab_size {index.vocab_size} cannot constrain {name} of logits width "
                f"{vocab.vocab_size}: its corpus may hold ids the model cannot produce"
            )
        self.index = index
        self.vocab = vocab
        self.start = start
        self.min_tokens = min_tokens
        self.sparse = start == "sentence"
        # Ids a span may contain: ordinary (not special, not empty, not padding) and not EOS.
        ids = np.setdiff1d(vocab.ordinary_ids, vocab.eos_array)
        self.allowed = np.zeros(bitmask_words(vocab.vocab_size), dtype=np.uint32)
        np.bitwise_or.at(self.allowed, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
        tokens = np.asarray(index.tokens, dtype=np.int64)
        self.symbol_ok = np.zeros(tokens.shape[0] + FIRST_TOKEN_SYMBOL, dtype=np.bool_)
        self.symbol_ok[FIRST_TOKEN_SYMBOL:] = (
            self.allowed[tokens >> 5] >> (tokens & 31).astype(np.uint32)
        ) & 1
        self.eos_bits = [(int(e) >> 5, np.uint32(1) << np.uint32(int(e) & 31)) for e in vocab.eos_array]
        self._room, self._block_max, self._super_max = self._room_tables()
        self.start_range = index.start_range(start)
        self.start_words = np.empty_like(self.allowed)
        self.fill_words(self.start_range, 0, self.start_words)
        self.wide_range = WIDE_RANGE  # ranges this wide use the mask cache (a benchmark/test knob)
        self._mask_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._mask_cache_lock = threading.Lock()

    def _room_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-range room for spans that must still grow to `min_tokens` (dummies when min_tokens == 1)."""
        if self.min_tokens == 1:
            dummy = np.zeros(1, dtype=np.uint8)
            return dummy, dummy, dummy
        index = self.index
        if self.sparse:
            room = room_per_position(index.text, self.symbol_ok)[index.sentence_suffixes]
        else:
            symbols, row_of = reversed_text_walk(
                index.wm_words, index.wm_block_rank, index.wm_zeros, index.lf_offset, index.n_rows
            )
            room = room_per_row(symbols, row_of, self.symbol_ok)
        block_max, super_max = room_summaries(room)
        return room, block_max, super_max

    def matcher(self) -> FMMatcher:
        return FMMatcher(self)

    def write_words(self, span_range: tuple[int, int], depth: int, out: np.ndarray) -> None:
        """Overwrite `out` (uint32 words) with the tokens allowed after a span of `depth` tokens (no EOS);
        wide ranges go through the mask cache."""
        lo, hi = span_range
        if hi - lo < self.wide_range:
            self.fill_words(span_range, depth, out)
            return
        # The mask depends on the range and, through the room check, on how many tokens are still needed.
        key = (lo, hi, depth if self.sparse else max(0, self.min_tokens - depth - 1))
        with self._mask_cache_lock:
            words = self._mask_cache.get(key)
            if words is not None:
                self._mask_cache.move_to_end(key)
        if words is None:
            words = np.empty_like(self.allowed)
            self.fill_words(span_range, depth, words)
            with self._mask_cache_lock:
                self._mask_cache[key] = words
                while len(self._mask_cache) > MASK_CACHE_ENTRIES:
                    self._mask_cache.popitem(last=False)
        out[:] = words

    def fill_words(self, span_range: tuple[int, int], depth: int, out: np.ndarray) -> None:
        """Overwrite `out` (uint32 words) with the tokens allowed after this range at `depth` (uncached)."""
        lo, hi = span_range
        index = self.index
        if self.sparse:
            fill_sparse(
                index.text, index.sentence_suffixes, index.tokens, lo, hi, depth, self.allowed,
                self.min_tokens, self._room, self._block_max, self._super_max, out,
            )  # fmt: skip
        else:
            fill_fm(
                index.wm_words, index.wm_block_rank, index.wm_zeros, index.lf_offset, index.tokens, lo, hi,
                self.allowed, self.min_tokens - depth - 1, self._room, self._block_max, self._super_max, out,
            )  # fmt: skip

    def step(self, span_range: tuple[int, int], depth: int, token: int) -> tuple[int, int] | None:
        """The range after appending `token` to a span of `depth` tokens, or None if it is not allowed."""
        if token >= self.index.vocab_size or not (int(self.allowed[token >> 5]) >> (token & 31)) & 1:
            return None
        symbol = self.index.symbol(token)
        if symbol < 0:
            return None
        lo, hi = self.index.extend(span_range, depth, symbol, self.start)
        if lo >= hi:
            return None
        need = self.min_tokens if self.sparse else self.min_tokens - depth - 1
        if depth + 1 < self.min_tokens and not room_at_least(
            self._room, self._block_max, self._super_max, lo, hi, need
        ):
            return None
        return lo, hi


class FMMatcher(Matcher):
    """Per-sequence state: the occurrence range after each accepted token (see the module docstring)."""

    def __init__(self, compiled: CompiledFM):
        self.compiled = compiled
        self.vocab = compiled.vocab
        self._ranges: list[tuple[int, int]] = [compiled.start_range]
        self._tokens: list[int] = []
        self._eos = 0  # EOS tokens accepted (they only ever come last)

    @property
    def span(self) -> tuple[int, ...]:
        """The span's tokens so far (EOS excluded)."""
        return tuple(self._tokens)

    def occurrences(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Where the span occurs, as sorted `(document, offset)` pairs that respect the start mode."""
        if not self._tokens:
            return []
        return self.compiled.index.locate(self._tokens, start=self.compiled.start, limit=limit)

    def span_range(self) -> tuple[int, int]:
        """The current occurrence range (FM-index rows, or sentence-suffix entries)."""
        return self._ranges[-1]

    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        words = row_view(bitmask, row, self.vocab.vocab_size)
        if self._eos:
            words[:] = 0
        elif not self._tokens:
            words[:] = self.compiled.start_words
        else:
            self.compiled.write_words(self._ranges[-1], len(self._tokens), words)
        if self._eos or self.is_accepting():
            for word, bit in self.compiled.eos_bits:
                words[word] |= bit

    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        if token in self.vocab.eos_ids:
            if self._eos or self.is_accepting():
                self._eos += 1
                return True
            return False
        if self._eos:
            return False
        new_range = self.compiled.step(self._ranges[-1], len(self._tokens), token)
        if new_range is None:
            return False
        self._ranges.append(new_range)
        self._tokens.append(token)
        return True

    def rollback(self, n: int = 1) -> None:
        self._check_rollback(n, self._eos + len(self._tokens))
        undo_eos = min(n, self._eos)
        self._eos -= undo_eos
        for _ in range(n - undo_eos):
            self._ranges.pop()
            self._tokens.pop()

    def fork(self) -> FMMatcher:
        twin = FMMatcher.__new__(FMMatcher)
        twin.compiled = self.compiled
        twin.vocab = self.vocab
        twin._ranges = list(self._ranges)
        twin._tokens = list(self._tokens)
        twin._eos = self._eos
        return twin

    def is_accepting(self) -> bool:
        return not self._eos and len(self._tokens) >= self.compiled.min_tokens

    def is_terminated(self) -> bool:
        return self._eos > 0
