"""constrain.kernels: tensor code only (masking logits with a bitmask, fused masked sampling).

`apply_bitmask_` and `masked_sample` dispatch on the logits' device: CUDA tensors go to the fused Triton
kernels in `triton_sampling.py` when Triton can be imported and that module exists; everything else goes to
the torch reference in `torch_sampling.py`, whose docstrings define the semantics both follow. The reference
functions are also exported by their own names. Inputs are assumed valid: `constrain.sampling` validates them
and raises `constrain.ConstraintError`. This package imports torch, numba and triton only, nothing of ours.
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
    unpack_bitmask,
)

__all__ = [
    "apply_bitmask_",
    "apply_bitmask_torch_",
    "backend",
    "exponential_from_bits",
    "masked_sample",
    "masked_sample_torch",
    "philox4x32",
    "row_seeds",
    "unpack_bitmask",
]


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
