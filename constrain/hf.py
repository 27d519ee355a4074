"""`ConstrainedLogitsProcessor`: our constraints inside transformers' own `model.generate`.

    proc = ConstrainedLogitsProcessor(regex(r"\\d{4}-\\d{2}-\\d{2}"), vocab)
    model.generate(**inputs, logits_processor=[proc], eos_token_id=sorted(vocab.eos_ids))

transformers calls the processor once per step with the whole `input_ids` (prompt + generated) and the scores
of the next token. The processor keeps one matcher per distinct generated prefix, keyed by
`(constraint group, generated tokens)`: each step a row's key extends a key of the previous step by one
token, so its matcher is the parent's advanced by that token (forked when several rows share a parent, as in
beam search and `num_return_sequences`). Rows may be reordered between steps (beam search), and that is fine
because nothing is keyed by row position. Disallowed tokens get a score of -inf.

EOS: a matcher allows every EOS id of the vocabulary when its text is complete; pass
`eos_token_id=sorted(vocab.eos_ids)` to `generate` so that transformers stops on any of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from .bitmask import bitmask_to_bool, bitmask_words, row_view
from .constraint import CompiledConstraint, Constraint, Matcher, compile, fill_unconstrained
from .errors import ConstraintError, NoAllowedTokenError, VocabularyError
from .vocab import Vocabulary


class _Ended:
    """The state of a row after its matcher accepted EOS (transformers pads finished rows from then on), or
    after a token the matcher rejected (only beam search picks -inf tokens, when too few are allowed)."""

    def __init__(self, dead: bool):
        self.dead = dead


_FINISHED = _Ended(dead=False)
_DEAD = _Ended(dead=True)
State = Matcher | _Ended | None


def _fresh(template: Matcher | None) -> Matcher | None:
    """A copy of a template matcher to advance (templates stay at the start for the next generation)."""
    return None if template is None else template.fork()


class ConstrainedLogitsProcessor(LogitsProcessor):
    """A transformers `LogitsProcessor` that masks the scores with our constraints.

    Args:
        constraints: one Constraint / compiled constraint / Matcher / None for every row, or a list with one
            per prompt of the batch. transformers repeats each prompt's row `k` times for
            `num_return_sequences` or `num_beams`; the processor sees `len(list) * k` rows and gives row `r`
            the constraint `r // k`. A given Matcher is used as a template (forked, never advanced).
        vocab: the vocabulary the constraints are compiled against; its `vocab_size` must equal the width of
            the scores.

    One processor serves one `generate` call at a time; a new call (different prompt or batch) is detected
    and restarts it, and `reset()` does so explicitly.

    Raises (when called): `VocabularyError` for scores of another width, `ConstraintError` for a batch that is
    not a multiple of the constraints or tokens that do not extend the previous step's,
    `NoAllowedTokenError` when a constrained row can continue with no token at all.
    """

    def __init__(self, constraints: Any, vocab: Vocabulary):
        if not isinstance(vocab, Vocabulary):
            raise ConstraintError(
                f"ConstrainedLogitsProcessor needs a Vocabulary, got {type(vocab).__name__}"
            )
        self.vocab = vocab
        if constraints is None or isinstance(constraints, Constraint | CompiledConstraint | Matcher):
            specs = [constraints]
            self._broadcast = True
        elif isinstance(constraints, Sequence) and not isinstance(constraints, str | bytes) and constraints:
            specs = list(constraints)
            self._broadcast = False
        else:
            raise ConstraintError(
                "constraints: expected a Constraint, compiled constraint, Matcher, None or a non-empty list "
                f"of them, got {constraints!r:.80}"
            )
        self._templates = [self._template(i, spec) for i, spec in enumerate(specs)]
        self.reset()

    def _template(self, i: int, spec: Any) -> Matcher | None:
        if spec is None:
            return None
        if isinstance(spec, Constraint):
            return compile(spec, self.vocab).matcher()
        if isinstance(spec, CompiledConstraint):
            self._check_vocab(spec.vocab, i)
            return spec.matcher()
        if isinstance(spec, Matcher):
            self._check_vocab(spec.vocab, i)
            return spec.fork()
        raise ConstraintError(
            f"constraints[{i}]: expected a Constraint, Matcher or None, got {type(spec).__name__}"
        )

    def _check_vocab(self, theirs: Vocabulary, i: int) -> None:
        if theirs is not self.vocab and theirs != self.vocab:
            raise VocabularyError(f"constraints[{i}] was compiled for another vocabulary ({theirs!r})")

    def reset(self) -> None:
        """Forget the current generation; the next call starts from the prompt."""
        self._prompt: torch.Tensor | None = None
        self._last_len = -1
        self._states: dict[tuple[int, tuple[int, ...]], State] = {}
        self._mask: torch.Tensor | None = None

    # -- per step ---------------------------------------------------------------------------------------
    def _group_size(self, rows: int) -> int:
        if self._broadcast:
            return rows  # one group: every row has the same constraint
        groups = len(self._templates)
        if rows % groups:
            raise ConstraintError(
                f"the batch has {rows} rows, not a multiple of the {groups} constraints given "
                "(give one constraint per prompt)"
            )
        return rows // groups

    def _is_new_generation(self, input_ids: torch.Tensor) -> bool:
        if self._prompt is None or input_ids.shape[1] != self._last_len + 1:
            return True
        if input_ids.shape[0] != self._prompt.shape[0]:
            return True
        # Beam search reorders rows only within a prompt's group, whose prompt rows are identical.
        return not torch.equal(input_ids[:, : self._prompt.shape[1]], self._prompt)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Return `scores` with every token the row's constraint forbids set to -inf."""
        rows, width = scores.shape
        if width != self.vocab.vocab_size:
            raise VocabularyError(
                f"scores have {width} columns but the vocabulary's logits width is {self.vocab.vocab_size}"
            )
        group_size = self._group_size(rows)
        if self._is_new_generation(input_ids):
            self._prompt = input_ids.clone()
            self._states = {(g, ()): _fresh(t) for g, t in enumerate(self._templates)}
        self._last_len = input_ids.shape[1]
        prompt_len = self._prompt.shape[1]
        generated = input_ids[:, prompt_len:].tolist()
        keys = [(0 if self._broadcast else r // group_size, tuple(generated[r])) for r in range(rows)]
        self._states = self._advance(keys)
        return self._mask_scores(keys, scores)

    def _advance(self, keys: list[tuple[int, tuple[int, ...]]]) -> dict[tuple[int, tuple[int, ...]], State]:
        """Each distinct key's state: its parent's (previous step) advanced by its last token."""
        children = Counter(key[:1] + (key[1][:-1],) for key in set(keys) if key[1])
        states: dict[tuple[int, tuple[int, ...]], State] = {}
        for key in keys:
            if key in states:
                continue
            group, tokens = key
            if not tokens:  # the first call
                states[key] = self._states[key]
                continue
            parent_key = (group, tokens[:-1])
            if parent_key not in self._states:
                raise ConstraintError(
                    f"generated tokens {list(tokens[-8:])} do not extend any sequence of the previous step "
                    "(one processor per generate call, or call reset())"
                )
            parent = self._states[parent_key]
            if parent is None or isinstance(parent, _Ended):
                states[key] = parent
                continue
            # Advance in place when this is the parent's only child (greedy, sampling); fork otherwise.
            matcher = parent if children[parent_key] == 1 else parent.fork()
            if not matcher.accept(tokens[-1]):
                states[key] = _DEAD
            elif matcher.is_terminated():
                states[key] = _FINISHED
            else:
                states[key] = matcher
        return states

    def _mask_scores(self, keys: list[tuple[int, tuple[int, ...]]], scores: torch.Tensor) -> torch.Tensor:
        rows = len(keys)
        words = bitmask_words(self.vocab.vocab_size)
        if self._mask is None or self._mask.shape[0] != rows:
            self._mask = torch.empty((rows, words), dtype=torch.int32)
        mask = self._mask
        mask_np = mask.numpy()
        filled: dict[tuple[int, tuple[int, ...]], int] = {}
        for r, key in enumerate(keys):
            state = self._states[key]
            if key in filled:  # rows with the same prefix share a mask
                mask_np[r] = mask_np[filled[key]]
            elif state is None or state is _FINISHED:
                fill_unconstrained(mask, r, self.vocab)
            elif state is _DEAD:
                words_r = row_view(mask, r, self.vocab.vocab_size)
                words_r[:] = 0
                for t in self.vocab.eos_ids:  # end the row; its score is already -inf
                    words_r[t >> 5] |= np.uint32(1 << (t & 31))
            else:
                state.fill_bitmask(mask, r)
                if not mask_np[r].any():
                    raise NoAllowedTokenError(
                        f"row {r}: the constraint allows no token after {len(key[1])} generated token(s) "
                        f"{list(key[1][-8:])}"
                    )
            filled.setdefault(key, r)
        allowed = bitmask_to_bool(mask.to(scores.device), self.vocab.vocab_size)
        return scores.masked_fill(~allowed, float("-inf"))
