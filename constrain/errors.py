"""The errors that bad input raises: one base class, `ConstraintError`, and a subclass per kind of input.

Every message names the place: the offending regex position, the token id, the tensor shape, the file.
`ConstraintError` subclasses `ValueError`, so callers that already catch `ValueError` keep working.
"""

from __future__ import annotations


class ConstraintError(ValueError):
    """Base class: a constraint, vocabulary, bitmask or index that cannot be used as given."""


class SpecError(ConstraintError):
    """A constraint's text (regex, grammar, schema) is malformed; the message names the position."""

    def __init__(self, message: str, *, source: str | None = None, position: int | None = None):
        self.source = source
        self.position = position
        if source is not None and position is not None:
            caret = " " * position + "^"
            message = f"{message} at position {position}\n  {source}\n  {caret}"
        super().__init__(message)


class UnsupportedError(SpecError):
    """The spec is well-formed but uses a construct we cannot enforce exactly (e.g. a regex backreference)."""


class CompileLimitError(ConstraintError):
    """Compiling or matching would exceed a bound (DFA states, per-step work); raised instead of hanging."""


class VocabularyError(ConstraintError):
    """A vocabulary that cannot be built or used: empty, inconsistent, or of an unknown token encoding."""


class TokenOutOfRangeError(VocabularyError):
    """A token id outside `[0, vocab_size)` was given to a matcher or vocabulary."""


class BitmaskError(ConstraintError):
    """A bitmask of the wrong dtype, shape or device (the ABI is int32, `(batch, ceil(V/32))`)."""


class NoAllowedTokenError(ConstraintError):
    """A row's mask allows no token at all, so nothing can be sampled for it."""


class IndexFormatError(ConstraintError):
    """An index file that is corrupt, truncated, of an unknown version, or fails its checksum."""
