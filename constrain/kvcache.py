"""The shared-prefix KV cache: a prompt's keys and values stored once, each branch's generated tokens apart.

Best-of-N and beam search run many branches off one prompt. transformers copies the prompt to every branch
before the prefill (N prefills, N copies of its KV, and beam search copies the whole cache every step). Here:

    kv = open_branches(model)              # SharedKV where the model's attention is supported, else CopiedKV
    logits = kv.prefill(prompt_ids)        # (1, V): the prompt runs once, at batch 1
    kv.fork(n)                             # n branches, each with an empty suffix; the prefix is shared
    logits = kv.step(tokens)               # (n, V): one token per branch
    kv.reorder(parents)                    # beams: copies suffix rows only, never the prefix

`SharedPrefixCache` is a transformers `Cache` whose layers hold shared levels (KV segments of batch 1, read
by every branch) and an own level (batch = branches). During a forward it is "attached": the model's
`config._attn_implementation` names our attention function (registered in transformers' `AttentionInterface`),
which reads the shared levels from the cache and merges them with the own level through
`constrain.kernels.prefix_attention.cascade_attention` (exact log-sum-exp merge). The model's code is not
forked or patched: Llama, Qwen2, Qwen3 and GPT-2 call `past_key_values.update(...)` and then the attention
interface, which is all this needs.

`SharedKV(cuda_graph=True)` decodes on fixed-size own buffers written at a device-side position, so a step
can be captured once in a CUDA graph and replayed (the same step runs eagerly on the CPU).

`PrefixStore` keeps prompt prefixes' KV across requests in a radix tree of token ids with an LRU memory
bound, so a system prompt is prefilled once per process. See docs/prefix_cache.md for the design.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import ConstraintError
from .kernels.prefix_attention import KVLevel, cascade_attention

ATTENTION_NAME = "constrain_shared_prefix"
"""The name our attention function is registered under in transformers' `AttentionInterface`."""

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gpt2")
"""Model families the shared cache is tested on (exactness against transformers' own generate)."""

DEFAULT_STORE_BYTES = 1 << 30
"""Default memory bound of a model's default `PrefixStore` (1 GiB of KV)."""


class SharedPrefixUnsupportedError(ConstraintError):
    """Prefix sharing was required (`share_prefix=True`) for a model whose attention it does not support."""


class SharedPrefixFallbackWarning(UserWarning):
    """Prefix sharing is not supported for this model: the prompt's KV is copied per branch instead."""


# -- KV segments ---------------------------------------------------------------------------------------------
@dataclass
class KVSegment:
    """The keys and values of a run of tokens at batch 1: per layer `(1, Hkv, L, D)` tensors.

    Segments are read-only once built: branches and the `PrefixStore` share them by reference.
    """

    keys: list[Tensor]
    values: list[Tensor]

    @property
    def n_tokens(self) -> int:
        """Number of tokens (L)."""
        return int(self.keys[0].shape[2]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        """Bytes of its keys and values (of the L tokens, whatever storage they view)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def slice(self, start: int, stop: int, *, copy: bool = False) -> KVSegment:
        """Tokens `[start, stop)`: views of this segment, or independent copies with `copy=True`."""

        def cut(t: Tensor) -> Tensor:
            part = t[:, :, start:stop]
            return part.clone() if copy else part

        return KVSegment([cut(k) for k in self.keys], [cut(v) for v in self.values])


# -- the transformers Cache ----------------------------------------------------------------------------------
class SharedPrefixLayer(CacheLayerMixin):
    """One layer of a `SharedPrefixCache`: shared segments (batch 1) and the own level (batch = branches).

    `update` appends the new tokens' keys and values to the own level (a preallocated buffer that doubles
    when full) and returns the own level's used part; the shared segments are read by the attention function.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, capacity: int = 64):
        super().__init__()
        self.shared_keys: list[Tensor] = []
        self.shared_values: list[Tensor] = []
        self.capacity = max(1, int(capacity))
        self.length = 0  # used positions of the own buffers
        # Static mode (fixed buffers for CUDA graphs): the write position and fill level live on the device.
        self.write_pos: Tensor | None = None
        self.valid: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _allocate(self, batch: int, need: int, like_k: Tensor, like_v: Tensor) -> None:
        """(Re)allocate the own buffers for `batch` rows and at least `need` positions, keeping used data."""
        cap = max(self.capacity, need)
        if self.keys is not None and self.keys.shape[0] == batch:
            while cap < need:
                cap *= 2
        shape_k = (batch, like_k.shape[1], cap, like_k.shape[3])
        shape_v = (batch, like_v.shape[1], cap, like_v.shape[3])
        keys = torch.empty(shape_k, dtype=like_k.dtype, device=like_k.device)
        values = torch.empty(shape_v, dtype=like_v.dtype, device=like_v.device)
        if self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append `(B, Hkv, q, D)` keys/values to the own level; return its used part `(B, Hkv, len, D)`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_pos is not None:  # static mode: one position per step, at a device-side index
            self.keys.index_copy_(2, self.write_pos, key_states)
            self.values.index_copy_(2, self.write_pos, value_states)
            return self.keys, self.values
        batch, _, new, _ = key_states.shape
        if self.keys is None or self.keys.shape[0] != batch or self.length + new > self.keys.shape[2]:
            if self.keys is not None and self.keys.shape[0] != batch and self.length:
                raise ConstraintError(
                    f"shared-prefix cache: a batch of {batch} rows reached a layer holding "
                    f"{self.keys.shape[0]} branches (fork() or reorder() the cache before changing the batch)"
                )
            self._allocate(batch, self.length + new, key_states, value_states)
        self.keys[:, :, self.length : self.length + new] = key_states
        self.values[:, :, self.length : self.length + new] = value_states
        self.length += new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    @property
    def shared_length(self) -> int:
        return sum(int(k.shape[2]) for k in self.shared_keys)

    def get_seq_length(self) -> int:
        return self.shared_length + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def own(self) -> tuple[Tensor, Tensor] | None:
        """The own level's used part, or None before any update."""
        if self.keys is None:
            return None
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Branch `i` continues old branch `beam_idx[i]`: copies the own rows only (any number of rows)."""
        if self.keys is None:
            return
        idx = beam_idx.to(self.keys.device)
        if self.write_pos is not None:  # static buffers keep their storage (a CUDA graph reads them)
            if idx.shape[0] != self.keys.shape[0]:
                raise ConstraintError(
                    "static shared-prefix cache: reorder() must keep the number of branches"
                )
            self.keys.copy_(self.keys.index_select(0, idx))
            self.values.copy_(self.values.index_select(0, idx))
            return
        self.keys = self.keys.index_select(0, idx)
        self.values = self.values.index_select(0, idx)

    def reset(self) -> None:
        self.keys = self.values = None
        self.length = 0
        self.write_pos = self.valid = None


class SharedPrefixCache(Cache):
    """A transformers `Cache` whose prompt part is stored once and read by every branch.

    Levels: `shared` KV segments (batch 1, a chain in token order: e.g. a reused system prompt, then the rest
    of the prompt, then tokens every beam agreed on) and the own level (one row per branch). Use it through
    `SharedKV` or `attach`; a forward of a model with this cache but without `attach` raises.
    """

    def __init__(self, num_layers: int, *, capacity: int = 64):
        super().__init__(layers=[SharedPrefixLayer(capacity) for _ in range(num_layers)])
        self.segments: list[KVSegment] = []

    @property
    def shared_length(self) -> int:
        """Tokens in the shared levels."""
        return sum(s.n_tokens for s in self.segments)

    @property
    def own_length(self) -> int:
        """Tokens in each branch's own level."""
        return self.layers[0].length if self.layers else 0

    @property
    def batch(self) -> int:
        """Rows of the own level (branches), 0 before any forward."""
        keys = self.layers[0].keys if self.layers else None
        return int(keys.shape[0]) if keys is not None else 0

    def add_shared(self, segment: KVSegment) -> None:
        """Append a segment to the shared levels (it must follow the tokens already there)."""
        if len(segment.keys) != len(self.layers):
            raise ConstraintError(
                f"a KV segment of {len(segment.keys)} layers for a model of {len(self.layers)}"
            )
        if self.own_length:
            raise ConstraintError("shared levels must come before the branches' own tokens")
        self.segments.append(segment)
        for layer, k, v in zip(self.layers, segment.keys, segment.values, strict=True):
            layer.shared_keys.append(k)
            layer.shared_values.append(v)

    def commit(self) -> KVSegment:
        """Turn the own level of a single row (a prefill) into a new shared level; return its segment."""
        if self.batch != 1:
            raise ConstraintError(
                f"commit() needs the own level at batch 1 (a prefill), it has {self.batch} rows"
            )
        segment = KVSegment(
            [layer.keys[:, :, : layer.length] for layer in self.layers],
            [layer.values[:, :, : layer.length] for layer in self.layers],
        )
        for layer in self.layers:
            layer.reset()
        self.add_shared(segment)
        return segment

    def promote(self, n_tokens: int) -> KVSegment:
        """Move the first `n_tokens` of the own level, which every branch must hold identically (e.g. tokens
        all beams agree on), into a new shared level taken from row 0; the rows keep the rest.

        Saves `(B - 1) * n_tokens` positions and makes later reorders copy less. The caller guarantees the
        rows are identical there (same tokens at the same positions); this is not checked here.
        """
        if not 0 < n_tokens <= self.own_length:
            raise ConstraintError(f"promote({n_tokens}): the own level holds {self.own_length} tokens")
        keys, values = [], []
        for layer in self.layers:
            keys.append(layer.keys[:1, :, :n_tokens].clone())
            values.append(layer.values[:1, :, :n_tokens].clone())
            rest = layer.length - n_tokens
            layer.keys[:, :, :rest] = layer.keys[:, :, n_tokens : layer.length].clone()
            layer.values[:, :, :rest] = layer.values[:, :, n_tokens : layer.length].clone()
            layer.length = rest
        segment = KVSegment(keys, values)
        self.segments.append(segment)
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            layer.shared_keys.append(k)
            layer.shared_values.append(v)
        return segment

    def levels(self, layer_idx: int, own_keys: Tensor, own_values: Tensor) -> list[KVLevel]:
        """The attention levels of one layer: the shared segments, then the own level (causal)."""
        layer = self.layers[layer_idx]
        levels = [KVLevel(k, v) for k, v in zip(layer.shared_keys, layer.shared_values, strict=True)]
        if layer.write_pos is not None:  # static: the whole buffer, filled up to `valid`
            levels.append(KVLevel(own_keys, own_values, length=layer.valid))
        else:
            levels.append(KVLevel(own_keys, own_values, causal=True))
        return levels

    @property
    def static(self) -> bool:
        """Whether the own levels are fixed-size buffers written at a device-side position."""
        return bool(self.layers) and self.layers[0].write_pos is not None

    def make_static(self, batch: int, capacity: int) -> tuple[Tensor, Tensor]:
        """Switch to fixed own buffers of `batch` rows and `capacity` positions (zeroed past the used part);
        return the device tensors `(write_pos (1,), valid ())` that the caller sets before each step."""
        if not self.segments:
            raise ConstraintError("make_static() needs the prompt's shared level first (prefill)")
        like = self.segments[0]
        device = like.keys[0].device
        write_pos = torch.zeros(1, dtype=torch.long, device=device)
        valid = torch.zeros((), dtype=torch.long, device=device)
        for i, layer in enumerate(self.layers):
            own = layer.own()
            if own is not None and own[0].shape[0] != batch:
                raise ConstraintError(f"make_static({batch}): the cache holds {own[0].shape[0]} branches")
            buffers = []
            for ref, used in zip((like.keys[i], like.values[i]), own or (None, None), strict=True):
                buf = torch.zeros(
                    (batch, ref.shape[1], capacity, ref.shape[3]), dtype=ref.dtype, device=device
                )
                if used is not None:
                    buf[:, :, : used.shape[2]] = used
                buffers.append(buf)
            layer.keys, layer.values = buffers
            layer.capacity = capacity
            layer.write_pos, layer.valid = write_pos, valid
        return write_pos, valid

    def make_dynamic(self) -> None:
        """Leave static mode: the used part of the buffers stays, later updates append as usual."""
        for layer in self.layers:
            layer.write_pos = layer.valid = None

    def memory(self) -> KVMemory:
        """Bytes held: shared levels once, own levels as allocated and as used."""
        shared = sum(s.nbytes for s in self.segments)
        allocated = used = 0
        for layer in self.layers:
            if layer.keys is None:
                continue
            allocated += layer.keys.numel() * layer.keys.element_size()
            allocated += layer.values.numel() * layer.values.element_size()
            own = layer.own()
            used += sum(t.numel() * t.element_size() for t in own)
        return KVMemory(shared_bytes=shared, branch_bytes=used, allocated_bytes=shared + allocated)


@dataclass(frozen=True)
class KVMemory:
    """KV bytes of a generation: shared once, per-branch (used), and everything allocated (capacity too)."""

    shared_bytes: int
    branch_bytes: int
    allocated_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.shared_bytes + self.branch_bytes


# -- the attention function ----------------------------------------------------------------------------------
_active: contextvars.ContextVar[SharedPrefixCache | None] = contextvars.ContextVar(
    "constrain_shared_cache", default=None
)
_registered = False
_register_lock = threading.Lock()


def shared_prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention-interface function: `query (B, Hq, M, D)` over the attached cache's shared
    levels and the own level (`key`, `value`, as `update` returned them). Returns `(B, M, Hq, D)`.

    Without an attached cache in this thread it is plain SDPA (so another thread that runs the same model
    meanwhile is unaffected). Raises `SharedPrefixUnsupportedError` for features it does not implement
    (sliding windows, logit soft-capping, attention sinks, dropout in training).
    """
    cache = _active.get()
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise SharedPrefixUnsupportedError(
                f"shared-prefix attention does not implement {name}={kwargs[name]}"
            )
    if dropout:
        raise SharedPrefixUnsupportedError("shared-prefix attention runs in eval mode only (dropout > 0)")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise SharedPrefixUnsupportedError(f"{type(module).__name__} has no layer_idx")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cascade_attention(query, cache.levels(layer_idx, key, value), scale)
    return out.transpose(1, 2).contiguous(), None


def _shared_prefix_mask(**kwargs: Any) -> Tensor | None:
    """Mask builder registered with our attention name: none while a shared cache is attached (the levels
    carry the causal structure), transformers' SDPA mask otherwise."""
    if _active.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**kwargs)


def register_attention() -> None:
    """Register `shared_prefix_attention` (and its mask builder) with transformers, once per process."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, _shared_prefix_mask)
        _registered = True


@contextlib.contextmanager
def attach(model: Any, cache: SharedPrefixCache) -> Iterator[None]:
    """Run forwards of `model` inside the block against `cache` (switches the model's attention to ours and
    back). One shared-prefix forward per model object at a time."""
    register_attention()
    config = model.config
    previous = config._attn_implementation
    token = _active.set(cache)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _active.reset(token)


def shared_prefix_support(model: Any) -> str | None:
    """None if the shared cache supports `model`, else the reason it does not (one line)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        return f"{type(model).__name__} is not a transformers model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of the tested families {SUPPORTED_MODEL_TYPES}"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}: only full attention is supported"
    if getattr(config, "sliding_window", None) is not None:
        return f"sliding-window attention (window {config.sliding_window}) is not supported"
    if getattr(config, "add_cross_attention", False):
        return "cross-attention is not supported"
    if model.training:
        return "the model is in training mode (call model.eval())"
    return None


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions (prompt + generated), or None if the config does not say."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _num_layers(model: Any) -> int:
    config = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise SharedPrefixUnsupportedError(f"{type(model).__name__}.config does not say how many layers it has")


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


# -- branch sessions -----------------------------------------------------------------------------------------
class BranchKV(Protocol):
    """A model plus KV state for branches of one prompt (see the module docstring for the protocol)."""

    shared: bool

    def prefill(self, prompt: Sequence[int]) -> Tensor: ...
    def fork(self, n: int) -> None: ...
    def step(self, tokens: Tensor) -> Tensor: ...
    def reorder(self, parents: Tensor) -> None: ...
    def memory(self) -> KVMemory: ...


class _Forward:
    """Calls `model` with the keyword arguments its forward accepts (logits of the last position only)."""

    def __init__(self, model: Any):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in params
        self.positions = "position_ids" in params
        self.device = _device(model)

    def __call__(self, input_ids: Tensor, positions: Tensor, cache: Any, mask: Tensor | None = None) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "past_key_values": cache, "use_cache": True}
        if self.positions:
            kwargs["position_ids"] = positions
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        if mask is not None:
            kwargs["attention_mask"] = mask
        return self.model(**kwargs)


class SharedKV:
    """Branches over a `SharedPrefixCache`: the prompt is prefilled once and stored once.

    `store`: a `PrefixStore` to reuse (and record) prompt prefixes across requests, or None.
    `capacity`: positions to preallocate per branch for generated tokens (grows if exceeded).
    `cuda_graph`: run decode steps on fixed buffers of `capacity` positions, captured once in a CUDA graph
    and replayed (on a CPU model the same fixed-buffer step runs eagerly). It leaves that mode, for good,
    when the number of branches changes, the buffers are full, or tokens are promoted; if the capture
    fails it warns and replays nothing. Check `graph_steps` for how many steps were replayed.
    Raises `SharedPrefixUnsupportedError` if the model is not supported (see `shared_prefix_support`).
    """

    shared = True

    def __init__(
        self, model: Any, *, store: PrefixStore | None = None, capacity: int = 64, cuda_graph: bool = False
    ):
        reason = shared_prefix_support(model)
        if reason is not None:
            raise SharedPrefixUnsupportedError(f"shared-prefix KV cache: {reason}")
        self.model = model
        self.forward = _Forward(model)
        self.cache = SharedPrefixCache(_num_layers(model), capacity=capacity)
        self.capacity = capacity
        self.store = store
        self.reused_tokens = 0  # prompt tokens taken from the store by the last prefill
        self.length = 0  # positions so far (prompt + generated)
        self._static_wanted = cuda_graph
        self._graph: Any = None
        self._graph_failed = False
        self.graph_steps = 0

    def _run(self, input_ids: Tensor, start: int) -> Tensor:
        batch, new = input_ids.shape
        positions = (
            torch.arange(start, start + new, device=self.forward.device).unsqueeze(0).expand(batch, -1)
        )
        with attach(self.model, self.cache):
            out = self.forward(input_ids, positions, self.cache)
        self.length = start + new
        return out.logits[:, -1, :]

    def prefill(self, prompt: Sequence[int]) -> Tensor:
        """Run the prompt at batch 1 (reusing the longest stored prefix, all but its last token at most) and
        make it the shared level. Returns float logits `(1, V)` after the prompt."""
        prompt = [int(t) for t in prompt]
        if self.cache.segments or self.cache.own_length:
            raise ConstraintError("prefill() runs once per SharedKV")
        reused: list[KVSegment] = []
        if self.store is not None:
            reused, self.reused_tokens = self.store.match(self.model, prompt[:-1])
        for segment in reused:
            self.cache.add_shared(segment)
        start = self.reused_tokens
        tail = torch.tensor([prompt[start:]], dtype=torch.long, device=self.forward.device)
        for layer in self.cache.layers:
            layer.capacity = len(prompt) - start  # the prompt's own segment is allocated to its exact size
        logits = self._run(tail, start)
        segment = self.cache.commit()
        for layer in self.cache.layers:
            layer.capacity = self.capacity
        if self.store is not None and len(prompt) - 1 > start:
            self.store.insert(self.model, prompt[:-1], segment.slice(0, len(prompt) - 1 - start), start)
        return logits

    def fork(self, n: int) -> None:
        """Start `n` branches after the prompt (their own levels are allocated on the first step)."""
        if n < 1:
            raise ConstraintError(f"fork(n) needs n >= 1, got {n}")
        if self.cache.own_length:
            self.reorder(torch.zeros(n, dtype=torch.long))

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per branch `(B,)`; return float logits `(B, V)`."""
        tokens = tokens.to(self.forward.device).view(-1, 1)
        if self._static_wanted and self.cache.own_length < self.capacity:
            if not self.cache.static and (self.cache.own_length == 0 or self.cache.batch == tokens.shape[0]):
                self._enter_static(tokens.shape[0])
            if self.cache.static and self.cache.batch == tokens.shape[0]:
                return self._static_step(tokens)
        self._leave_static()
        return self._run(tokens, self.length)

    # -- fixed buffers and CUDA graphs ----------------------------------------------------------------------
    def _enter_static(self, batch: int) -> None:
        self._write_pos, self._valid = self.cache.make_static(batch, self.capacity)
        self._ids = torch.zeros((batch, 1), dtype=torch.long, device=self.forward.device)
        self._positions = torch.zeros((batch, 1), dtype=torch.long, device=self.forward.device)
        self._graph = None

    def _leave_static(self) -> None:
        if self.cache.static:
            self.cache.make_dynamic()
        self._graph = None
        self._static_wanted = False

    def _static_forward(self) -> Tensor:
        with attach(self.model, self.cache):
            return self.forward(self._ids, self._positions, self.cache).logits[:, -1, :]

    def _capture(self) -> None:
        """Capture one decode step in a CUDA graph (after two warm-up runs on a side stream)."""
        side = torch.cuda.Stream(self.forward.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_out = self._static_forward()
        self._graph = graph

    def _static_step(self, tokens: Tensor) -> Tensor:
        own = self.cache.own_length
        self._ids.copy_(tokens)
        self._positions.fill_(self.length)
        self._write_pos.fill_(own)
        self._valid.fill_(own + 1)
        logits = None
        if self.forward.device.type == "cuda" and not self._graph_failed:
            if self._graph is None:
                try:
                    self._capture()
                except Exception as error:  # noqa: BLE001 - any capture failure: run eagerly instead
                    self._graph_failed = True
                    warnings.warn(
                        f"CUDA graph capture failed ({error}); decoding without graphs", stacklevel=3
                    )
            if self._graph is not None:
                self._graph.replay()
                logits = self._graph_out.clone()
                self.graph_steps += 1
        if logits is None:
            logits = self._static_forward()
        for layer in self.cache.layers:
            layer.length = own + 1
        self.length += 1
        return logits

    def reorder(self, parents: Tensor) -> None:
        """Branch `i` continues old branch `parents[i]` (any number of branches): copies own rows only."""
        if self.cache.static and parents.shape[0] != self.cache.batch:
            self._leave_static()
        self.cache.reorder_cache(parents.to(self.forward.device))

    def promote(self, n_tokens: int) -> None:
        """Share the first `n_tokens` generated tokens, identical in every branch (`SharedPrefixCache`)."""
        self._leave_static()
        self.cache.promote(n_tokens)

    def memory(self) -> KVMemory:
        return self.cache.memory()


class CopiedKV:
    """Branches the way transformers does it, for models the shared cache does not support: a `DynamicCache`
    whose prompt KV is repeated per branch (the prompt still runs once, at batch 1)."""

    shared = False

    def __init__(self, model: Any):
        self.model = model
        self.forward = _Forward(model)
        self.cache: Any = None
        self.length = 0
        self.reused_tokens = 0

    def _run(self, input_ids: Tensor, start: int) -> Tensor:
        batch, new = input_ids.shape
        device = self.forward.device
        positions = torch.arange(start, start + new, device=device).unsqueeze(0).expand(batch, -1)
        mask = torch.ones((batch, start + new), dtype=torch.long, device=device)
        out = self.forward(input_ids, positions, self.cache, mask)
        self.cache = out.past_key_values
        self.length = start + new
        return out.logits[:, -1, :]

    def prefill(self, prompt: Sequence[int]) -> Tensor:
        ids = torch.tensor([[int(t) for t in prompt]], dtype=torch.long, device=self.forward.device)
        return self._run(ids, 0)

    def fork(self, n: int) -> None:
        if n < 1:
            raise ConstraintError(f"fork(n) needs n >= 1, got {n}")
        self.reorder(torch.zeros(n, dtype=torch.long))

    def step(self, tokens: Tensor) -> Tensor:
        return self._run(tokens.to(self.forward.device).view(-1, 1), self.length)

    def reorder(self, parents: Tensor) -> None:
        self.cache.reorder_cache(parents.to(self.forward.device))

    def memory(self) -> KVMemory:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return KVMemory(shared_bytes=0, branch_bytes=total, allocated_bytes=total)


def open_branches(
    model: Any,
    *,
    share_prefix: bool | None = None,
    store: PrefixStore | None = None,
    capacity: int = 64,
    cuda_graph: bool = False,
) -> SharedKV | CopiedKV:
    """A `SharedKV` for `model`, or a `CopiedKV` with a `SharedPrefixFallbackWarning` if prefix sharing is not
    supported. `share_prefix=True` raises `SharedPrefixUnsupportedError` instead of falling back;
    `share_prefix=False` always copies. `cuda_graph`: see `SharedKV`.
    """
    if share_prefix is False:
        return CopiedKV(model)
    reason = shared_prefix_support(model)
    if reason is None:
        return SharedKV(model, store=store, capacity=capacity, cuda_graph=cuda_graph)
    if share_prefix:
        raise SharedPrefixUnsupportedError(f"share_prefix=True, but the shared-prefix KV cache {reason}")
    warnings.warn(
        f"shared-prefix KV cache not used ({reason}); copying the prompt's KV per branch instead",
        SharedPrefixFallbackWarning,
        stacklevel=3,
    )
    return CopiedKV(model)


# -- prefix reuse across requests ----------------------------------------------------------------------------
@dataclass(eq=False)
class _Node:
    """A radix-tree node: the tokens on the edge from its parent and their KV (views or own copies)."""

    tokens: tuple[int, ...]
    kv: KVSegment | None
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_used: int = 0


class PrefixStore:
    """Prompt prefixes' KV, kept across requests: a radix tree of token ids with an LRU memory bound.

    `match` returns the KV segments of the longest stored prefix of a prompt; `insert` records a prompt's KV
    (the part past what is stored). When the stored KV exceeds `max_bytes`, least recently used leaves are
    dropped (a request already using a segment keeps its tensors alive). A store serves one model (its first
    `match`/`insert` binds it, by weak reference; another model raises `ConstraintError`). Thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_STORE_BYTES):
        if max_bytes < 0:
            raise ConstraintError(f"PrefixStore max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._root = _Node((), None, None)
        self._lock = threading.Lock()
        self._clock = 0
        self._bytes = 0
        self._model: weakref.ref | None = None
        self.hits = 0  # tokens served from the store, over all matches
        self.lookups = 0

    @property
    def nbytes(self) -> int:
        """Bytes of KV the store holds."""
        return self._bytes

    def _bind(self, model: Any) -> None:
        bound = self._model() if self._model is not None else None
        if bound is None:
            self._model = weakref.ref(model)
            self._clear()
        elif bound is not model:
            raise ConstraintError("this PrefixStore holds another model's KV; use one store per model")

    def _clear(self) -> None:
        self._root = _Node((), None, None)
        self._bytes = 0

    def _tick(self, node: _Node) -> None:
        self._clock += 1
        while node is not None:
            node.last_used = self._clock
            node = node.parent

    def match(self, model: Any, tokens: Sequence[int]) -> tuple[list[KVSegment], int]:
        """The KV segments covering the longest stored prefix of `tokens`, and its length in tokens."""
        with self._lock:
            self._bind(model)
            self.lookups += 1
            segments: list[KVSegment] = []
            node, pos = self._root, 0
            while pos < len(tokens):
                child = node.children.get(int(tokens[pos]))
                if child is None:
                    break
                common = _common_prefix(child.tokens, tokens[pos:])
                if common < len(child.tokens):
                    segments.append(child.kv.slice(0, common))
                    pos += common
                    node = child
                    break
                segments.append(child.kv)
                pos += common
                node = child
            if node is not self._root:
                self._tick(node)
            self.hits += pos
            return segments, pos

    def insert(self, model: Any, tokens: Sequence[int], kv: KVSegment, offset: int) -> None:
        """Record that `kv` holds the KV of `tokens[offset:]` (the first `offset` tokens being stored, or
        having been). Only the part not stored yet is added, as views of `kv`; nothing is added if the
        stored path no longer reaches `offset` (evicted meanwhile)."""
        if kv.n_tokens != len(tokens) - offset:
            raise ConstraintError(f"insert: {kv.n_tokens} KV positions for {len(tokens) - offset} tokens")
        with self._lock:
            self._bind(model)
            node, pos = self._root, 0
            while pos < len(tokens):
                child = node.children.get(int(tokens[pos]))
                if child is None:
                    break
                common = _common_prefix(child.tokens, tokens[pos:])
                if common < len(child.tokens):
                    child = self._split(child, common)
                pos += common
                node = child
            if pos < len(tokens) and pos >= offset:
                rest = tuple(int(t) for t in tokens[pos:])
                leaf = _Node(rest, kv.slice(pos - offset, kv.n_tokens), node)
                node.children[rest[0]] = leaf
                self._bytes += leaf.kv.nbytes
                node = leaf
            if node is not self._root:
                self._tick(node)
            self._evict()

    def _split(self, node: _Node, at: int) -> _Node:
        """Split `node`'s edge after `at` tokens; return the upper half (copies, so each half frees alone)."""
        upper = _Node(
            node.tokens[:at], node.kv.slice(0, at, copy=True), node.parent, last_used=node.last_used
        )
        lower_kv = node.kv.slice(at, len(node.tokens), copy=True)
        self._bytes += upper.kv.nbytes + lower_kv.nbytes - node.kv.nbytes
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[at:], lower_kv, upper
        upper.children[node.tokens[0]] = node
        return upper

    def _evict(self) -> None:
        while self._bytes > self.max_bytes:
            leaves = [n for n in self._iter_nodes() if not n.children]
            if not leaves:
                break
            victim = min(leaves, key=lambda n: n.last_used)
            del victim.parent.children[victim.tokens[0]]
            self._bytes -= victim.kv.nbytes

    def _iter_nodes(self) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def __len__(self) -> int:
        """Number of stored tokens (edges of the tree)."""
        with self._lock:
            return sum(len(n.tokens) for n in self._iter_nodes())

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._clear()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_default_stores: weakref.WeakKeyDictionary[Any, PrefixStore] = weakref.WeakKeyDictionary()
_default_lock = threading.Lock()


def default_store(model: Any, max_bytes: int = DEFAULT_STORE_BYTES) -> PrefixStore:
    """The process-wide `PrefixStore` of `model` (created on first use with `max_bytes`)."""
    with _default_lock:
        store = _default_stores.get(model)
        if store is None:
            store = _default_stores[model] = PrefixStore(max_bytes)
        return store
