"""constrain.kernels: tensor code only (masking logits with a bitmask, fused masked sampling).

`apply_bitmask_`, `masked_sample` and `masked_sample_status` dispatch on the logits' device: CUDA tensors go
to the fused Triton kernels in `triton_sampling.py` when Triton can be imported and that module exists;
everything else goes to the torch reference in `torch_sampling.py`, whose docstrings define the semantics both
follow. The reference functions are also exported by their own names. Inputs are assumed valid:
`constrain.sampling` validates them and raises `constrain.ConstraintError`. This package imports torch, numba
and triton only, nothing of ours.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

import torch
from torch import Tensor

from .torch_sampling import (
    apply_bitmask_torch_,
    exponential_from_bits,
    masked_sample_torch,
    philox4x32,
    row_seeds,
    to_device_nonblocking,
    token_bits,
    unpack_bitmask,
)

__all__ = [
    "apply_bitmask_",
    "apply_bitmask_torch_",
    "backend",
    "exponential_from_bits",
    "masked_sample",
    "masked_sample_status",
    "masked_sample_torch",
    "philox4x32",
    "row_seeds",
    "to_device_nonblocking",
    "token_bits",
    "unpack_bitmask",
]

# Bits of the status word `masked_sample_status` returns.
STATUS_NONFINITE = 1  # a logits row that is sampled from holds NaN or +inf
STATUS_EMPTY = 2  # some row got token -1 (no allowed token with a finite logit)


@functools.cache
def _triton_sampling() -> ModuleType | None:
    """The fused-kernel module, or None when Triton cannot be imported or the module is not there.

    Only those two conditions select the reference; an error raised while importing an existing
    `triton_sampling` module is a bug and propagates.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    name = f"{__name__}.triton_sampling"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def backend(device: torch.device | str) -> str:
    """Which implementation serves tensors on `device`: "triton" (CUDA with the fused kernels) or "torch"."""
    if torch.device(device).type == "cuda" and _triton_sampling() is not None:
        return "triton"
    return "torch"


def apply_bitmask_(logits: Tensor, bitmask: Tensor, indices: Tensor | None = None) -> Tensor:
    """Set disallowed logits to -inf in place and return `logits` (semantics: `apply_bitmask_torch_`)."""
    if backend(logits.device) == "triton":
        _triton_sampling().apply_bitmask_triton_(logits, bitmask, indices)
    else:
        apply_bitmask_torch_(logits, bitmask, indices)
    return logits


def masked_sample(
    logits: Tensor,
    bitmask: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    indices: Tensor | None = None,
    return_logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One token per bitmask row (int64 `(N,)`, -1 for an empty row), and float32 logprobs if asked.

    See `masked_sample_torch` for the exact semantics, which the fused kernel reproduces.
    """
    sample = masked_sample_torch
    if backend(logits.device) == "triton" and bitmask.shape[0] > 0:
        sample = _triton_sampling().masked_sample_triton
    return sample(
        logits,
        bitmask,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        generator=generator,
        seeds=seeds,
        indices=indices,
        return_logprobs=return_logprobs,
    )


def masked_sample_status(
    logits: Tensor,
    bitmask: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    top_k: int | Tensor = 0,
    top_p: float | Tensor = 1.0,
    min_p: float | Tensor = 0.0,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    indices: Tensor | None = None,
    return_logprobs: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`masked_sample`'s tokens and logprobs (None unless asked), and a status word; nothing is read back.

    status: int32 `(1,)` on the logits' device: `STATUS_NONFINITE` (bit 0) when a logits row that some output
    row samples from holds NaN or +inf anywhere (masked or not; the tokens are then unspecified but in
    [-1, V)), `STATUS_EMPTY` (bit 1) when some token is -1. One 4-byte read tells a caller that every row is
    fine. The fused kernels compute it in their own pass (and stay memory-safe on invalid input: an index
    out of range, NaN logits, out-of-range parameter tensors); the reference path costs extra tensor passes
    and must be given valid indices.
    """
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if backend(logits.device) == "triton" and bitmask.shape[0] > 0:
        result = _triton_sampling().sample_full(
            logits,
            bitmask,
            **params,
            generator=generator,
            seeds=seeds,
            indices=indices,
            return_logprobs=return_logprobs,
        )
        return result.tokens, result.logprobs, result.status
    out = masked_sample_torch(
        logits,
        bitmask,
        **params,
        generator=generator,
        seeds=seeds,
        indices=indices,
        return_logprobs=return_logprobs,
    )
    tokens, logprobs = out if return_logprobs else (out, None)
    row_bad = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1)
    if indices is not None:
        row_bad = row_bad[indices.to(device=logits.device, dtype=torch.int64)]
    nonfinite = row_bad.any().to(torch.int32) * STATUS_NONFINITE
    status = nonfinite | (tokens < 0).any().to(torch.int32) * STATUS_EMPTY
    return tokens, logprobs, status.reshape(1)
