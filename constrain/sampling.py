"""Public masked sampling: validate the inputs, then call the kernels (fused on CUDA, torch elsewhere).

    tokens = masked_sample(logits, bitmask, temperature=0.7, top_p=0.9, seeds=seeds)
    tokens, logprobs = masked_sample(logits, bitmask, indices=parent_rows, return_logprobs=True)
    apply_bitmask_(logits, bitmask)          # disallowed logits -> -inf, in place

The semantics (order of the filters, ties, randomness, logprobs) are defined in
`constrain.kernels.torch_sampling.masked_sample_torch` and docs/sampling.md. This module only adds the checks:
bad tensors raise `BitmaskError` or `ConstraintError`, a row that allows nothing raises `NoAllowedTokenError`.
Checks of values that live on the GPU (NaN logits, empty rows, parameter or index tensors already there) are
read back once, after the kernels are launched: one synchronisation per call, none before the launch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, NoReturn

import torch
from torch import Tensor

from . import kernels
from .bitmask import check_bitmask
from .errors import BitmaskError, ConstraintError, NoAllowedTokenError

__all__ = ["apply_bitmask_", "masked_sample"]

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_logits(logits: object) -> tuple[int, int]:
    """Raise `ConstraintError` unless `logits` is a 2-D float32/bfloat16/float16 tensor; return `(B, V)`."""
    if not isinstance(logits, Tensor):
        raise ConstraintError(f"logits must be a torch.Tensor (B, V), got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ConstraintError(f"logits must be 2-D (B, V) with V >= 1, got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ConstraintError(f"logits dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    return logits.shape[0], logits.shape[1]


def _check_bitmask(bitmask: object, vocab_size: int, device: torch.device) -> Tensor:
    """Raise `BitmaskError` unless `bitmask` is an int32 `(rows, ceil(V/32))` tensor on `device`."""
    if not isinstance(bitmask, Tensor):
        raise BitmaskError(f"bitmask must be a torch.Tensor, got {type(bitmask).__name__}")
    check_bitmask(bitmask, vocab_size)
    if bitmask.device != device:
        raise BitmaskError(f"bitmask is on {bitmask.device} but logits are on {device} (copy it over first)")
    return bitmask


# A check of values on an accelerator, read back later with the others: (0-d bool "bad" tensor, raiser).
_Deferred = list[tuple[Tensor, Callable[[], NoReturn]]]


def _on_host(tensor: Tensor) -> bool:
    """True when reading `tensor`'s values costs no device synchronisation."""
    return tensor.device.type == "cpu"


def _check_indices(
    indices: Tensor | Sequence[int] | None, num_rows: int, device: torch.device, deferred: _Deferred
) -> Tensor | None:
    """`indices` as int64 on `device` (a host tensor is checked there, then copied without a synchronisation);
    `ConstraintError` unless 1-D integers in [0, num_rows). The range check of a tensor already on an
    accelerator goes to `deferred` instead (read back once, after the launch)."""
    if indices is None:
        return None
    if not isinstance(indices, Tensor):
        try:
            indices = torch.tensor(list(indices), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConstraintError(
                f"indices must be a 1-D integer tensor or a list of ints: {error}"
            ) from None
        if indices.ndim != 1:  # e.g. an empty list gives shape (0,), a ragged one fails above
            raise ConstraintError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ConstraintError(f"indices must have an integer dtype (int64), got {indices.dtype}")
    if indices.ndim != 1:
        raise ConstraintError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    indices = indices.to(torch.int64)

    def raise_bad() -> NoReturn:
        k = int(((indices < 0) | (indices >= num_rows)).nonzero(as_tuple=True)[0][0])
        raise ConstraintError(f"indices[{k}] = {int(indices[k])} is out of range for {num_rows} logits rows")

    bad = ((indices < 0) | (indices >= num_rows)).any()
    if _on_host(indices):
        if bool(bad):
            raise_bad()
        return kernels.to_device_nonblocking(indices, device)
    deferred.append((bad, raise_bad))
    return indices.to(device)


def _check_param(
    name: str,
    value: object,
    num_rows: int,
    device: torch.device,
    deferred: _Deferred,
    *,
    integer: bool,
    low: float,
    high: float,
    low_open: bool = False,
) -> float | int | Tensor:
    """Check a sampling parameter (a python number or an `(N,)` tensor) against [low, high] / (low, high].

    Returns the scalar, or the tensor as float32/int64 on `device` (a host tensor is checked there, then
    copied without a synchronisation). Raises `ConstraintError` naming the parameter, and for a tensor the
    first offending row; the value check of a tensor already on an accelerator goes to `deferred` instead.
    """
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high == math.inf else ']'}"
    if isinstance(value, Tensor):
        if value.shape != (num_rows,):
            raise ConstraintError(
                f"{name} must be a python number or a tensor of shape ({num_rows},), got {tuple(value.shape)}"
            )
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise ConstraintError(f"{name} must be an integer tensor, got dtype {value.dtype}")
        if not integer and not value.dtype.is_floating_point:
            raise ConstraintError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        value = value.to(torch.int64 if integer else torch.float32)
        below = value <= low if low_open else value < low
        bad_rows = below | (value > high) | ~torch.isfinite(value.float())

        def raise_bad() -> NoReturn:
            i = int(bad_rows.nonzero(as_tuple=True)[0][0])
            raise ConstraintError(f"{name}[{i}] = {value[i].item()} is outside {interval}")

        if _on_host(value):
            if num_rows and bool(bad_rows.any()):
                raise_bad()
            return kernels.to_device_nonblocking(value, device)
        deferred.append((bad_rows.any(), raise_bad))
        return value.to(device)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a float"
        raise ConstraintError(f"{name} must be {expected} or a tensor of shape (N,), got {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high or not math.isfinite(value):
        raise ConstraintError(f"{name} = {value!r} is outside {interval}")
    return int(value) if integer else float(value)


def _check_seeds(seeds: object, generator: object, num_rows: int) -> Tensor | None:
    """`seeds` as int64 (where they are: the kernels copy them without a synchronisation); `ConstraintError`
    for a bad shape or dtype, or for both seeds and generator."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConstraintError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seeds is None:
        return None
    if generator is not None:
        raise ConstraintError("pass either seeds or generator, not both")
    if not isinstance(seeds, Tensor) or seeds.shape != (num_rows,):
        shape = tuple(seeds.shape) if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ConstraintError(f"seeds must be an int64 tensor of shape ({num_rows},), got {shape}")
    if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
        raise ConstraintError(f"seeds must have an integer dtype (int64), got {seeds.dtype}")
    return seeds.to(torch.int64)


def _raise_nonfinite(logits: Tensor, indices: Tensor | None) -> NoReturn:
    """Raise `ConstraintError` naming the first NaN or +inf in a logits row that is sampled from."""
    used = None if indices is None else torch.unique(indices.to(logits.device))
    rows = logits if used is None else logits[used]
    bad = (torch.isnan(rows) | torch.isposinf(rows)).nonzero()
    if not bad.numel():  # the status bit and this scan disagree: a kernel bug, never ignored
        raise ConstraintError("the sampler reported NaN or +inf logits, but none were found (a kernel bug)")
    row, token = (int(v) for v in bad[0])
    row = row if used is None else int(used[row])
    value = logits[row, token].item()
    raise ConstraintError(f"logits[{row}, {token}] is {value}: logits must be finite or -inf")


def _read_back(status: Tensor, deferred: _Deferred) -> tuple[int, list[bool]]:
    """The status word and the deferred checks' flags, in one device read."""
    if not deferred:
        return int(status.item()), []
    flags = torch.stack([bad for bad, _ in deferred]).to(device=status.device, dtype=torch.int32)
    values = torch.cat([status.reshape(1), flags]).tolist()
    return values[0], [bool(v) for v in values[1:]]


def apply_bitmask_(logits: Tensor, bitmask: Tensor, indices: Tensor | Sequence[int] | None = None) -> Tensor:
    """Set the logits of the tokens that `bitmask` disallows to -inf, in place, and return `logits`.

    logits: `(B, V)` float32/bfloat16/float16, any device. bitmask: int32 `(B, ceil(V/32))` on the same device
    (token `j` of row `i` allowed iff `(bitmask[i, j >> 5] >> (j & 31)) & 1`; bits at or past V ignored).
    indices (as XGrammar's `apply_token_bitmask_inplace`): None masks every row; otherwise only the listed
    rows, logits row `b` with bitmask row `b` for each `b` in indices, and the bitmask needs only more than
    `max(indices)` rows. A row may end up all -inf: that is not an error here (`masked_sample` reports it).

    Raises `BitmaskError` for a bitmask of the wrong dtype, shape, device or row count, and `ConstraintError`
    for bad logits or indices.
    """
    num_rows, vocab_size = _check_logits(logits)
    _check_bitmask(bitmask, vocab_size, logits.device)
    if indices is None:
        if bitmask.shape[0] != num_rows:
            raise BitmaskError(f"bitmask has {bitmask.shape[0]} rows but logits have {num_rows}")
    else:
        deferred: _Deferred = []
        indices = _check_indices(indices, num_rows, logits.device, deferred)
        for bad, raise_bad in deferred:  # in place on the logits: check before the kernel writes
            if bool(bad):
                raise_bad()
        if indices.numel() and int(indices.max()) >= bitmask.shape[0]:
            raise BitmaskError(
                f"indices name row {int(indices.max())} but the bitmask has only {bitmask.shape[0]} rows"
            )
    return kernels.apply_bitmask_(logits, bitmask, indices)


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
    indices: Tensor | Sequence[int] | None = None,
    return_logprobs: bool = False,
    on_empty: Literal["raise", "return"] = "raise",
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample one token per bitmask row from masked, tempered, filtered logits: int64 `(N,)`, logits' device.

    logits: `(B, V)` float32/bfloat16/float16, finite or -inf (not modified). bitmask: int32 `(N, ceil(V/32))`
    on the same device. indices: None (N == B) or N ints in [0, B): output row `i` samples from logits row
    `indices[i]` under bitmask row `i` (several branches can share one logits row).
    temperature >= 0 (0 = greedy: argmax over allowed tokens, ties to the lowest id); top_k >= 0 (0 = off);
    top_p in (0, 1] (1 = off); min_p in [0, 1] (0 = off): each a python number or an `(N,)` tensor.
    Randomness: `seeds` (int64 `(N,)`, one per row: same seed and inputs give the same token) or `generator`
    (a torch.Generator), or neither (torch's default generator). Vary the seeds from step to step.
    return_logprobs: also return float32 `log_softmax(masked logits)` at the chosen tokens (temperature 1, no
    filters). on_empty: "raise" (default) raises for a row that allows no token with a finite logit; "return"
    gives token -1 (logprob -inf) for such rows.

    The exact semantics are `constrain.kernels.torch_sampling.masked_sample_torch`'s. Values on the GPU (NaN
    logits, empty rows, parameter or index tensors already there) are checked with a single read after the
    kernels are launched: one synchronisation per call on CUDA, and none before the launch. (To capture
    sampling in a CUDA graph, call the unchecked `constrain.kernels.masked_sample` with seeds on the device.)

    Raises `BitmaskError` (bitmask dtype/shape/device, rows not matching the logits or indices),
    `ConstraintError` (bad logits, NaN/+inf logits, parameters out of range, bad indices/seeds/generator) and
    `NoAllowedTokenError` naming the empty rows.
    """
    num_logit_rows, vocab_size = _check_logits(logits)
    device = logits.device
    _check_bitmask(bitmask, vocab_size, device)
    num_rows = bitmask.shape[0]
    deferred: _Deferred = []
    indices = _check_indices(indices, num_logit_rows, device, deferred)
    if indices is None and num_rows != num_logit_rows:
        raise BitmaskError(f"bitmask has {num_rows} rows but logits have {num_logit_rows} (and no indices)")
    if indices is not None and indices.shape[0] != num_rows:
        raise BitmaskError(f"bitmask has {num_rows} rows but indices has {indices.shape[0]} entries")
    if on_empty not in ("raise", "return"):
        raise ConstraintError(f"on_empty must be 'raise' or 'return', got {on_empty!r}")
    inf = float("inf")

    def param(name: str, value: object, **limits: object) -> float | int | Tensor:
        return _check_param(name, value, num_rows, device, deferred, **limits)

    params = {
        "temperature": param("temperature", temperature, integer=False, low=0, high=inf),
        "top_k": param("top_k", top_k, integer=True, low=0, high=inf),
        "top_p": param("top_p", top_p, integer=False, low=0, high=1, low_open=True),
        "min_p": param("min_p", min_p, integer=False, low=0, high=1),
    }
    # k > V keeps every token, so clamping is exact (and keeps a huge python int out of int64 overflow).
    k = params["top_k"]
    params["top_k"] = k.clamp(max=vocab_size) if isinstance(k, Tensor) else min(k, vocab_size)
    seeds = _check_seeds(seeds, generator, num_rows)
    if deferred and kernels.backend(device) != "triton":
        # The reference indexes with `indices` directly: read the checks before it runs (the fused kernels
        # are memory-safe on bad values, so there they are read with the status, after the launch).
        for bad, raise_bad in deferred:
            if bool(bad):
                raise_bad()
        deferred = []

    tokens, logprobs, status = kernels.masked_sample_status(
        logits,
        bitmask,
        **params,
        generator=generator,
        seeds=seeds,
        indices=indices,
        return_logprobs=return_logprobs,
    )
    code, bad = _read_back(status, deferred)  # the call's one synchronisation
    for failed, (_, raise_bad) in zip(bad, deferred, strict=True):
        if failed:
            raise_bad()
    if code & kernels.STATUS_NONFINITE:
        _raise_nonfinite(logits, indices)
    if code & kernels.STATUS_EMPTY and on_empty == "raise":
        empty = (tokens < 0).nonzero(as_tuple=True)[0].tolist()
        raise NoAllowedTokenError(_empty_rows_message(empty, bitmask, vocab_size, indices))
    return (tokens, logprobs) if return_logprobs else tokens


def _empty_rows_message(empty: list[int], bitmask: Tensor, vocab_size: int, indices: Tensor | None) -> str:
    """Name the empty rows, and say whether their masks allow nothing or only tokens whose logit is -inf."""
    allowed = kernels.unpack_bitmask(bitmask[empty], vocab_size).any(dim=1).tolist()
    no_bits = [row for row, any_allowed in zip(empty, allowed, strict=True) if not any_allowed]
    only_inf = [row for row, any_allowed in zip(empty, allowed, strict=True) if any_allowed]
    parts = []
    if no_bits:
        parts.append(f"bitmask row(s) {no_bits} allow no token")
    if only_inf:
        where = "" if indices is None else f" (logits rows {indices[only_inf].tolist()})"
        parts.append(f"bitmask row(s) {only_inf} allow only tokens whose logit is -inf{where}")
    return "; ".join(parts) + " (pass on_empty='return' to get token -1 for such rows)"
