"""constrain: constrained decoding for LLMs.

A constraint (regex, grammar, JSON schema, knowledge index) is compiled once against a model's vocabulary;
at every decode step its matcher writes an allowed-token bitmask, and a fused kernel masks the logits and
samples.
"""

from .bitmask import allocate_bitmask, bitmask_to_bool, bitmask_words, bool_to_bitmask, check_bitmask
from .constraint import CompiledConstraint, Constraint, Matcher, compile, fill_bitmasks
from .errors import (
    BitmaskError,
    CompileLimitError,
    ConstraintError,
    IndexFormatError,
    NoAllowedTokenError,
    SpecError,
    TokenOutOfRangeError,
    UnsupportedError,
    VocabularyError,
)
from .vocab import Vocabulary


def __getattr__(name: str):
    # `constrain.regex(...)` / `constrain.choice(...)` without importing the grammar layer (numba) at
    # `import constrain` time.
    if name in ("regex", "choice"):
        import importlib

        return getattr(importlib.import_module("constrain.grammars.regex"), name)
    raise AttributeError(f"module 'constrain' has no attribute {name!r}")


__all__ = [
    "BitmaskError",
    "CompileLimitError",
    "CompiledConstraint",
    "Constraint",
    "ConstraintError",
    "IndexFormatError",
    "Matcher",
    "NoAllowedTokenError",
    "SpecError",
    "TokenOutOfRangeError",
    "UnsupportedError",
    "Vocabulary",
    "VocabularyError",
    "allocate_bitmask",
    "bitmask_to_bool",
    "bitmask_words",
    "bool_to_bitmask",
    "check_bitmask",
    "choice",
    "compile",
    "fill_bitmasks",
    "regex",
]
