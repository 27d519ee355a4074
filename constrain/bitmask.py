"""Bitmask helpers for the shared ABI (vLLM, SGLang, XGrammar, llguidance, outlines-core).

A bitmask is a `torch.int32` tensor of shape `(batch, ceil(V/32))`; token `j` of row `i` is allowed iff
`(bitmask[i, j >> 5] >> (j & 31)) & 1`. `V` is the model's logits width; bits at or past `V` are ignored.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .errors import BitmaskError


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words that hold one row of `vocab_size` bits."""
    return (int(vocab_size) + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int, *, pin_memory: bool = False) -> torch.Tensor:
    """A CPU int32 bitmask of shape `(batch, ceil(vocab_size/32))`, every bit set (everything allowed).

    `pin_memory=True` pins it so a copy to the GPU can run asynchronously (needs CUDA).
    """
    if batch < 1 or vocab_size < 1:
        raise BitmaskError(
            f"allocate_bitmask needs batch >= 1 and vocab_size >= 1, got ({batch}, {vocab_size})"
        )
    mask = torch.full((batch, bitmask_words(vocab_size)), -1, dtype=torch.int32)
    return mask.pin_memory() if pin_memory else mask


def check_bitmask(bitmask: torch.Tensor | np.ndarray, vocab_size: int, batch: int | None = None) -> None:
    """Raise `BitmaskError` unless `bitmask` follows the ABI for `vocab_size` (and `batch` rows, if given)."""
    # Compare within one library: a numpy-vs-torch dtype comparison costs microseconds on the hot path.
    if isinstance(bitmask, torch.Tensor):
        ok = bitmask.dtype == torch.int32
    elif isinstance(bitmask, np.ndarray):
        ok = bitmask.dtype == np.int32
    else:
        raise BitmaskError(f"bitmask must be a torch.Tensor or numpy array, got {type(bitmask).__name__}")
    if not ok:
        raise BitmaskError(f"bitmask dtype must be int32, got {bitmask.dtype}")
    if bitmask.ndim != 2:
        raise BitmaskError(f"bitmask must be 2-D (batch, words), got shape {tuple(bitmask.shape)}")
    words = bitmask_words(vocab_size)
    if bitmask.shape[1] != words:
        raise BitmaskError(
            f"bitmask has {bitmask.shape[1]} words per row, but vocab_size {vocab_size} needs {words} "
            f"(shape must be (batch, {words}))"
        )
    if batch is not None and bitmask.shape[0] != batch:
        raise BitmaskError(f"bitmask has {bitmask.shape[0]} rows, expected {batch}")


# The last tensor given to row_view and its numpy view: a decode loop fills the same bitmask every step, and
# `Tensor.numpy()` costs a few microseconds, a noticeable part of a cached mask fill.
_last_view: tuple[weakref.ref, int, tuple[int, ...], np.ndarray] | None = None


def _numpy_view(bitmask: torch.Tensor) -> np.ndarray:
    global _last_view
    cached = _last_view
    if (
        cached is not None
        and cached[0]() is bitmask
        and cached[1] == bitmask.data_ptr()
        and cached[2] == tuple(bitmask.shape)
    ):
        return cached[3]
    if not bitmask.is_cpu:
        raise BitmaskError(
            f"matchers fill a CPU bitmask; got one on {bitmask.device} (fill on CPU, then copy)"
        )
    array = bitmask.numpy()
    _last_view = (weakref.ref(bitmask), bitmask.data_ptr(), tuple(bitmask.shape), array)
    return array


def row_view(bitmask: torch.Tensor | np.ndarray, row: int, vocab_size: int) -> np.ndarray:
    """The `row`-th row of a CPU bitmask as a writable `uint32` numpy view (shares memory with `bitmask`)."""
    check_bitmask(bitmask, vocab_size)
    array = _numpy_view(bitmask) if isinstance(bitmask, torch.Tensor) else bitmask
    if not 0 <= row < array.shape[0]:
        raise BitmaskError(f"row {row} out of range for a bitmask of {array.shape[0]} rows")
    return array[row].view(np.uint32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Expand an int32 bitmask to a bool tensor `(batch, vocab_size)` (True = allowed)."""
    check_bitmask(bitmask, vocab_size)
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def bool_to_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor `(batch, V)` into the int32 bitmask ABI `(batch, ceil(V/32))`."""
    if allowed.ndim != 2:
        raise BitmaskError(f"expected a 2-D bool tensor (batch, V), got shape {tuple(allowed.shape)}")
    batch, vocab_size = allowed.shape
    words = bitmask_words(vocab_size)
    padded = torch.zeros(batch, words * 32, dtype=torch.int64, device=allowed.device)
    padded[:, :vocab_size] = allowed.to(torch.int64)
    weights = torch.tensor([1 << i for i in range(32)], dtype=torch.int64, device=allowed.device)
    packed = (padded.view(batch, words, 32) * weights).sum(-1)
    # Reinterpret the low 32 bits as signed int32 (bit 31 set means a negative word).
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)
    return packed.to(torch.int32)


def allowed_ids(bitmask_row: torch.Tensor | np.ndarray, vocab_size: int) -> np.ndarray:
    """The sorted token ids allowed by one bitmask row (1-D int32 words), as an int64 numpy array."""
    words = np.asarray(bitmask_row).view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).astype(np.int64)
