"""The constraint protocol: a spec (`Constraint`) is compiled once per vocabulary (`CompiledConstraint`),
and each sequence gets a cheap `Matcher` that writes allowed-token bitmasks and follows the tokens actually
chosen.

    compiled = compile(regex(r"\\d{4}-\\d{2}-\\d{2}"), vocab)   # cached by (spec, vocabulary)
    m = compiled.matcher()
    m.fill_bitmask(bitmask, row)     # int32 (batch, ceil(V/32)), bit = 1 means allowed
    m.accept(token)                  # False (state unchanged) if the token is not allowed
    m.rollback(1); m.fork(); m.is_accepting(); m.is_terminated()

EOS: a matcher allows the vocabulary's EOS ids exactly when `is_accepting()`; accepting EOS terminates it,
and a terminated matcher allows only EOS (so a finished row in a batch stays harmless).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .bitmask import allowed_ids, bitmask_words, check_bitmask, row_view
from .errors import ConstraintError
from .vocab import Vocabulary


class Constraint(ABC):
    """A constraint spec (regex, grammar, schema, index ...): immutable, hashable, compiled per vocabulary."""

    @abstractmethod
    def _compile(self, vocab: Vocabulary) -> CompiledConstraint:
        """Build the compiled form for `vocab` (called once per (spec, vocab) by `compile`)."""

    @abstractmethod
    def cache_key(self) -> object:
        """A hashable value that identifies the spec (its class is added by `compile`)."""

    def compile(self, vocab: Vocabulary) -> CompiledConstraint:
        """Shorthand for `constrain.compile(self, vocab)`."""
        return compile(self, vocab)


class CompiledConstraint(ABC):
    """A constraint compiled against one vocabulary: immutable and shareable across threads and requests."""

    vocab: Vocabulary

    @abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the constraint."""


class Matcher(ABC):
    """Per-sequence matching state (see the module docstring for the protocol)."""

    vocab: Vocabulary

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor | np.ndarray, row: int = 0) -> None:
        """Overwrite row `row` of a CPU int32 bitmask with the tokens allowed next (EOS iff accepting).

        Raises `BitmaskError` on a wrong dtype/shape/device or row.
        """

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Advance by `token`; return False and keep the state if it is not allowed.

        Raises `TokenOutOfRangeError` for ids outside `[0, vocab_size)`.
        """

    @abstractmethod
    def rollback(self, n: int = 1) -> None:
        """Undo the last `n` accepted tokens (raises `ConstraintError` if fewer were accepted)."""

    @abstractmethod
    def fork(self) -> Matcher:
        """An independent copy of this matcher in its current state (for beams, speculation)."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """True if the text so far is complete (EOS is allowed now)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once EOS has been accepted."""

    # -- conveniences built on the above ---------------------------------------------------------------
    def accepts(self, tokens: Iterable[int]) -> bool:
        """True if all `tokens` would be accepted in order from the current state (the state is unchanged)."""
        probe = self.fork()
        return all(probe.accept(t) for t in tokens)

    def allowed_tokens(self) -> np.ndarray:
        """The ids allowed next, sorted (int64). Convenient for tests and debugging, not for the hot path."""
        mask = np.zeros((1, bitmask_words(self.vocab.vocab_size)), dtype=np.int32)
        self.fill_bitmask(mask, 0)
        return allowed_ids(mask[0], self.vocab.vocab_size)

    def is_allowed(self, token: int) -> bool:
        """True if `token` is allowed next."""
        token = self.vocab.check_token(token)
        mask = np.zeros((1, bitmask_words(self.vocab.vocab_size)), dtype=np.int32)
        self.fill_bitmask(mask, 0)
        return bool((int(mask[0, token >> 5]) >> (token & 31)) & 1)

    def _check_rollback(self, n: int, accepted: int) -> None:
        if n < 0 or n > accepted:
            raise ConstraintError(f"cannot roll back {n} token(s): only {accepted} accepted")


# -- compile cache -------------------------------------------------------------------------------------
_CACHE_SIZE = 256
_cache: OrderedDict[tuple, CompiledConstraint] = OrderedDict()
_cache_lock = threading.Lock()


def compile(spec: Constraint, vocab: Vocabulary) -> CompiledConstraint:  # noqa: A001 - the design's name
    """Compile `spec` against `vocab`, or return the cached result for an equal spec and vocabulary.

    Raises a `ConstraintError` subclass if the spec cannot be compiled (the message names the place).
    """
    if not isinstance(spec, Constraint):
        raise ConstraintError(
            f"compile() expects a Constraint (e.g. constrain.regex(...)), got {type(spec).__name__}"
        )
    if not isinstance(vocab, Vocabulary):
        raise ConstraintError(f"compile() expects a Vocabulary, got {type(vocab).__name__}")
    key = (type(spec).__qualname__, spec.cache_key(), vocab.fingerprint)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    compiled = spec._compile(vocab)  # outside the lock: compiles of different specs run in parallel
    with _cache_lock:
        compiled = _cache.setdefault(key, compiled)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


_extra_caches: list[Callable[[], None]] = []


def register_compile_cache(clear: Callable[[], None]) -> Callable[[], None]:
    """Register the `clear` function of a layer's own compile-time cache (e.g. regex -> DFA), so that
    `clear_compile_cache()` forgets it too. Returns `clear`."""
    _extra_caches.append(clear)
    return clear


def clear_compile_cache() -> None:
    """Forget all cached compiled constraints, and the compile-time caches layers registered."""
    with _cache_lock:
        _cache.clear()
    for clear in _extra_caches:
        clear()


# -- batched fill --------------------------------------------------------------------------------------
def fill_unconstrained(bitmask: torch.Tensor | np.ndarray, row: int, vocab: Vocabulary) -> None:
    """Allow every id the tokenizer has (specials included) and no padding id past it."""
    words = row_view(bitmask, row, vocab.vocab_size)
    full, rest = divmod(vocab.n_tokens, 32)
    words[:full] = 0xFFFFFFFF
    words[full:] = 0
    if rest:
        words[full] = (1 << rest) - 1


_pool: ThreadPoolExecutor | None = None


def fill_bitmasks(
    matchers: Sequence[Matcher | None],
    bitmask: torch.Tensor | np.ndarray,
    vocab: Vocabulary,
    *,
    threads: int = 1,
) -> None:
    """Fill row `i` of `bitmask` from `matchers[i]`; a `None` matcher leaves its row unconstrained.

    With `threads > 1` rows are filled in a thread pool (the numba walks release the GIL).
    """
    check_bitmask(bitmask, vocab.vocab_size, batch=len(matchers))

    def fill(i: int) -> None:
        m = matchers[i]
        if m is None:
            fill_unconstrained(bitmask, i, vocab)
        else:
            m.fill_bitmask(bitmask, i)

    if threads <= 1 or len(matchers) < 4:
        for i in range(len(matchers)):
            fill(i)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="constrain-fill")
    list(_pool.map(fill, range(len(matchers))))
