"""The decode loop: constrained generation over any transformers causal LM with a KV cache.

    model, tok = constrain.assets.load_model("smollm2")
    [g] = generate(model, tok, "When did the Berlin Wall fall?", regex(r"\\d{4}-\\d{2}-\\d{2}"))
    g.text, g.finish_reason        # '1989-11-09', 'constraint_complete'

One step for a batch of rows: the matchers write the allowed-token bitmask, `constrain.sampling.masked_sample`
masks the logits and picks a token per row, each matcher accepts its row's token, and the model runs one
forward on the new tokens with the KV cache. The bitmask for step t+1 is filled by a worker thread while the
main thread runs the forward for step t (see docs/generate.md). A row ends with one of `FINISH_REASONS`; the
batch goes on until every row has ended.
"""

from __future__ import annotations

import codecs
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bitmask import allocate_bitmask, bitmask_words
from .constraint import CompiledConstraint, Constraint, Matcher, compile, fill_unconstrained
from .errors import ConstraintError, VocabularyError
from .sampling import masked_sample
from .vocab import Vocabulary

FINISH_REASONS = ("eos", "length", "constraint_complete", "no_allowed_token")
"""Why a row ended: it sampled an EOS token; it reached `max_new_tokens`; its matcher allows nothing but EOS
(the text is complete and cannot go on, so no EOS token is spent); its matcher allows no token at all."""

ConstraintLike = Constraint | CompiledConstraint | Matcher | None


@dataclass
class Generation:
    """One row's result.

    `token_ids` are the generated ids (an EOS that ended the row included); `text` is the UTF-8 text of the
    non-special ones (invalid or incomplete byte sequences become U+FFFD); `logprobs[i]` is the natural-log
    probability of `token_ids[i]` under the masked distribution at temperature 1 before top-k/top-p/min-p
    (what `masked_sample` reports); `prompt_tokens` counts the prompt's tokens (chat template included,
    padding excluded).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StreamEvent:
    """One event of `generate_stream`.

    A token event has `token_id` and `logprob` set and `text` = the text it completes (may be "" while a
    multi-byte character is still incomplete, and is "" for special tokens). A row's last event has
    `token_id=None`, `text` = whatever was held back, and `generation` set.
    """

    row: int
    text: str
    token_id: int | None = None
    logprob: float | None = None
    generation: Generation | None = None


class Utf8Stream:
    """Turns a stream of byte chunks into text, holding back bytes that do not yet form a whole character.

    The concatenation of everything `push` and `close` return equals `b"".join(chunks).decode("utf-8",
    errors="replace")`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        """Add bytes; return the text they complete ("" if they only start a character)."""
        return self._decoder.decode(data, final=False)

    def close(self) -> str:
        """Flush: return the rest (U+FFFD for a trailing incomplete character)."""
        return self._decoder.decode(b"", final=True)


# -- vocabulary per (tokenizer, logits width), cached ----------------------------------------------------
_vocab_cache: weakref.WeakKeyDictionary[Any, dict[int, Vocabulary]] = weakref.WeakKeyDictionary()


def logits_width(model: Any) -> int:
    """The model's logits width (`config.vocab_size`, of the text config for multimodal models)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "vocab_size", None)
    if not isinstance(width, int) or width < 1:
        raise VocabularyError(f"{type(model).__name__}.config has no usable vocab_size ({width!r})")
    return width


def model_vocabulary(model: Any, tokenizer: Any) -> Vocabulary:
    """The `Vocabulary` of `tokenizer` at `model`'s logits width, built once per tokenizer and width.

    Raises `VocabularyError` if the tokenizer has more tokens than the model has logits.
    """
    width = logits_width(model)
    try:
        per_tokenizer = _vocab_cache.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: build without caching
        per_tokenizer = {}
    vocab = per_tokenizer.get(width)
    if vocab is None:
        vocab = per_tokenizer[width] = Vocabulary.from_tokenizer(tokenizer, vocab_size=width)
    return vocab


# -- inputs ------------------------------------------------------------------------------------------------
def _as_prompt_list(prompts: Any) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        raise ConstraintError(
            "prompts: got a flat list of ints; pass token ids as a list of lists ([[1, 2, 3]])"
        )
    if not isinstance(prompts, Sequence):
        raise ConstraintError(
            f"prompts must be a string or a list of strings/token-id lists, got {type(prompts)}"
        )
    return list(prompts)


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str | Sequence[int]], vocab: Vocabulary, chat: bool | None
) -> list[list[int]]:
    """Token ids of each prompt: a string goes through the chat template (when `chat`) or the tokenizer;
    a list of ints is used as given.

    `chat=None` means: use the chat template if the tokenizer has one. Raises `ConstraintError` for an empty
    prompt, a prompt of another type, or `chat=True` without a template; `TokenOutOfRangeError` for bad ids.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    elif chat and not has_template:
        raise ConstraintError("chat=True, but the tokenizer has no chat template (pass chat=False)")
    encoded: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, Sequence) and all(isinstance(t, int | np.integer) for t in prompt):
            ids = [vocab.check_token(t) for t in prompt]
        else:
            raise ConstraintError(
                f"prompt {i}: expected a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise ConstraintError(f"prompt {i} is empty after tokenization (give it some text or token ids)")
        encoded.append([int(t) for t in ids])
    return encoded


def make_matchers(constraints: Any, batch: int, vocab: Vocabulary) -> list[Matcher | None]:
    """One matcher (or None = unconstrained) per row from a constraint spec, compiled constraint, matcher or
    None, or a list of those with one entry per row.

    A single value applies to every row; a matcher given for several rows is forked so rows never share state.
    Raises `ConstraintError` for a list of the wrong length or an unknown type, `VocabularyError` for a
    compiled constraint or matcher built for another vocabulary.
    """
    if constraints is None or isinstance(constraints, Constraint | CompiledConstraint | Matcher):
        items = [constraints] * batch
    elif isinstance(constraints, Sequence) and not isinstance(constraints, str | bytes):
        items = list(constraints)
        if len(items) != batch:
            raise ConstraintError(f"constraints: got {len(items)} for {batch} prompt(s); give one per prompt")
    else:
        raise ConstraintError(
            f"constraints: expected a Constraint, compiled constraint, Matcher, None or a list of them, got "
            f"{type(constraints).__name__} (for a regex string use constrain.grammars.regex.regex(pattern))"
        )
    matchers: list[Matcher | None] = []
    used: set[int] = set()
    for row, item in enumerate(items):
        if item is None:
            matchers.append(None)
            continue
        if isinstance(item, Constraint):
            matcher = compile(item, vocab).matcher()
        elif isinstance(item, CompiledConstraint):
            _check_vocab(item.vocab, vocab, f"constraint of row {row}")
            matcher = item.matcher()
        elif isinstance(item, Matcher):
            _check_vocab(item.vocab, vocab, f"matcher of row {row}")
            matcher = item.fork() if id(item) in used else item
            used.add(id(item))
        else:
            raise ConstraintError(
                f"constraints[{row}]: expected a Constraint, Matcher or None, got {type(item).__name__}"
            )
        matchers.append(matcher)
    return matchers


def _check_vocab(theirs: Vocabulary, ours: Vocabulary, what: str) -> None:
    if theirs is not ours and theirs != ours:
        raise VocabularyError(
            f"the {what} was compiled for another vocabulary ({theirs!r}) than the model's ({ours!r})"
        )


def _check_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConstraintError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ConstraintError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConstraintError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConstraintError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ConstraintError(f"min_p must be in [0, 1], got {min_p}")


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


# -- the loop ------------------------------------------------------------------------------------------------
_ROW_OK, _ROW_EMPTY, _ROW_EOS_ONLY = 0, 1, 2


class _MaskFiller:
    """Fills the step's bitmask from the matchers and classifies constrained rows (empty / EOS only).

    Mask row `j` belongs to the `j`-th live row of the model's batch (rows that ended are dropped from it).
    On CUDA the host buffer is pinned and copied to the device on a side stream, so the copy overlaps the
    forward; the main thread makes its stream wait for the copy before sampling. One buffer suffices: each
    step reads the sampled tokens back to the host, which waits for every use of the previous mask.
    """

    def __init__(self, matchers: list[Matcher | None], vocab: Vocabulary, device: torch.device):
        self.matchers = matchers
        self.vocab = vocab
        self.cuda = device.type == "cuda"
        self.host = allocate_bitmask(len(matchers), vocab.vocab_size, pin_memory=self.cuda)
        self.host_np = self.host.numpy().view(np.uint32)
        self.device_mask = self.host.to(device) if self.cuda else self.host
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied = torch.cuda.Event() if self.cuda else None
        self.live = 0
        eos = np.zeros(bitmask_words(vocab.vocab_size), dtype=np.uint32)
        for t in vocab.eos_ids:
            eos[t >> 5] |= np.uint32(1 << (t & 31))
        self.not_eos = ~eos

    def fill(self, live: list[int], active: list[bool]) -> list[int]:
        """Fill mask row `j` for row `live[j]` and return a status per live row. A row that has ended but is
        still in the batch gets the unconstrained mask, so the sampler never sees it empty. Runs in the
        worker thread when overlapping."""
        self.live = len(live)
        constrained = []
        for j, i in enumerate(live):
            matcher = self.matchers[i]
            if matcher is None or not active[i]:
                fill_unconstrained(self.host, j, self.vocab)
            else:
                matcher.fill_bitmask(self.host, j)
                constrained.append(j)
        status = [_ROW_OK] * len(live)
        if constrained:
            for j, row_status in zip(constrained, self._classify(self.host_np[constrained]), strict=True):
                status[j] = row_status
        if self.cuda:
            with torch.cuda.stream(self.stream), torch.inference_mode():
                self.device_mask[: self.live].copy_(self.host[: self.live], non_blocking=True)
                self.copied.record(self.stream)
        return status

    def _classify(self, words: np.ndarray) -> list[int]:
        any_allowed = words.any(axis=1)
        any_but_eos = (words & self.not_eos).any(axis=1)
        return [
            _ROW_EMPTY if not allowed else _ROW_EOS_ONLY if not other else _ROW_OK
            for allowed, other in zip(any_allowed.tolist(), any_but_eos.tolist(), strict=True)
        ]

    def is_complete(self, matcher: Matcher) -> bool:
        """True if `matcher` allows EOS and nothing else (its text is complete and cannot go on)."""
        scratch = np.zeros((1, self.host_np.shape[1]), dtype=np.int32)
        matcher.fill_bitmask(scratch, 0)
        return self._classify(scratch.view(np.uint32))[0] == _ROW_EOS_ONLY

    def ready(self) -> torch.Tensor:
        """The mask for sampling, on the model's device (makes the current stream wait for the copy)."""
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.copied)
        return self.device_mask[: self.live]


class _Row:
    """Per-row bookkeeping: tokens, log-probabilities, the streamed text."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pieces: list[str] = []
        self.utf8 = Utf8Stream()

    def add(self, token: int, logprob: float, data: bytes) -> str:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        text = self.utf8.push(data) if data else ""
        self.pieces.append(text)
        return text

    def finish(self, reason: str) -> tuple[str, Generation]:
        rest = self.utf8.close()
        self.pieces.append(rest)
        generation = Generation(
            text="".join(self.pieces),
            token_ids=self.tokens,
            finish_reason=reason,
            prompt_tokens=self.prompt_tokens,
            logprobs=self.logprobs,
        )
        return rest, generation


class _Immediate:
    """A finished future (the no-overlap mode runs the fill synchronously)."""

    def __init__(self, value: Any):
        self._value = value

    def result(self) -> Any:
        return self._value


def generate_stream(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str | Sequence[int]],
    constraints: Any = None,
    *,
    vocab: Vocabulary | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    stop_at_eos: bool = True,
    overlap: bool = True,
    jump_forward: bool = True,
) -> Iterator[StreamEvent]:
    """Generate like `generate`, as an iterator of `StreamEvent`s: one per token, then one final event per row
    (carrying its `Generation`), in decode order (row by row within a step).

    The arguments are checked here, before the first event; raises as `generate` does.
    """
    prompt_list = _as_prompt_list(prompts)
    _check_params(max_new_tokens, temperature, top_k, top_p, min_p)
    if not prompt_list:
        return iter(())
    vocab = vocab if vocab is not None else model_vocabulary(model, tokenizer)
    width = logits_width(model)
    if vocab.vocab_size != width:
        raise VocabularyError(
            f"the vocabulary's logits width {vocab.vocab_size} differs from the model's {width} "
            "(build it with Vocabulary.from_tokenizer(tok, vocab_size=model.config.vocab_size))"
        )
    matchers = make_matchers(constraints, len(prompt_list), vocab)
    encoded = encode_prompts(tokenizer, prompt_list, vocab, chat)
    pad_id = next((int(t) for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = _model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
    return _decode(
        model,
        encoded,
        matchers,
        vocab,
        device,
        pad_id,
        max_new_tokens,
        sampling,
        stop_at_eos,
        overlap,
        jump_forward,
    )


def _left_pad(
    encoded: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each `(batch, longest)`: every row's last prompt token sits
    in the last column, so each step feeds one column; positions count only real tokens (as transformers)."""
    batch, longest = len(encoded), max(len(ids) for ids in encoded)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, longest), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[i, longest - len(ids) :] = 1
    positions = (attention.cumsum(-1) - 1).masked_fill_(attention == 0, 1)
    return input_ids.to(device), attention.to(device), positions.to(device)


def _jump_forward(
    matcher: Matcher, row: _Row, max_new_tokens: int, events: list[StreamEvent], i: int, token_bytes: list
) -> list[int]:
    """Accept the tokens `matcher` forces next (its `forced_tokens()`, if it has one) into `row`, within the
    token budget; returns them. They are not sampled, so they carry log-probability 0.0."""
    forced_tokens = getattr(matcher, "forced_tokens", None)
    room = max_new_tokens - len(row.tokens)
    if forced_tokens is None or room <= 0:
        return []
    tokens = forced_tokens()[:room]
    for token in tokens:
        if not matcher.accept(token):
            raise ConstraintError(f"row {i}: the matcher forced token {token} but refused it (a matcher bug)")
        text = row.add(token, 0.0, token_bytes[token])
        events.append(StreamEvent(row=i, text=text, token_id=token, logprob=0.0))
    return tokens


def _decode(
    model: Any,
    encoded: list[list[int]],
    matchers: list[Matcher | None],
    vocab: Vocabulary,
    device: torch.device,
    pad_id: int,
    max_new_tokens: int,
    sampling: dict[str, Any],
    stop_at_eos: bool,
    overlap: bool,
    jump_forward: bool = True,
) -> Iterator[StreamEvent]:
    """The loop itself (see the module docstring and docs/generate.md)."""
    batch = len(encoded)
    input_ids, attention, positions = _left_pad(encoded, pad_id, device)
    next_position = attention.sum(-1, keepdim=True)
    rows = [_Row(len(ids)) for ids in encoded]
    active = [True] * batch
    live = list(range(batch))  # the original rows still in the model's batch, in batch order
    filler = _MaskFiller(matchers, vocab, device)
    eos_ids, special, token_bytes, n_tokens = (
        vocab.eos_ids,
        vocab.special_ids,
        vocab.token_bytes,
        vocab.n_tokens,
    )
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def finish(i: int, reason: str) -> StreamEvent:
        active[i] = False
        rest, generation = rows[i].finish(reason)
        return StreamEvent(row=i, text=rest, generation=generation)

    with torch.inference_mode(), ThreadPoolExecutor(1, thread_name_prefix="constrain-mask") as pool:

        def launch_fill() -> Future | _Immediate:
            args = (list(live), list(active))
            return pool.submit(filler.fill, *args) if overlap else _Immediate(filler.fill(*args))

        pending = launch_fill()  # the first mask is filled while the prompt runs
        extra = {"logits_to_keep": 1} if keep_last else {}
        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **extra
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        if logits.shape[-1] != vocab.vocab_size:
            raise VocabularyError(
                f"the model returned {logits.shape[-1]} logits per token, but its config and the vocabulary "
                f"say {vocab.vocab_size}"
            )
        forced: dict[int, list[int]] = {}  # row -> jump-forward tokens to feed with this step's token
        for step in range(max_new_tokens):
            # 1. The mask decides rows that cannot go on.
            status = pending.result()
            ended: list[StreamEvent] = []
            for j, i in enumerate(live):
                if active[i] and status[j] == _ROW_EMPTY:
                    ended.append(finish(i, "no_allowed_token"))
                elif active[i] and status[j] == _ROW_EOS_ONLY:
                    ended.append(finish(i, "constraint_complete"))
            yield from ended
            if not any(active):
                break
            # 2. Masked sampling, then each matcher follows its row's token.
            tokens, logprobs = masked_sample(
                logits.float(), filler.ready(), **sampling, return_logprobs=True, on_empty="return"
            )
            tokens_list = tokens.tolist()
            logprobs_list = logprobs.float().tolist()
            events: list[StreamEvent] = []
            for j, i in enumerate(live):
                if not active[i]:
                    continue
                token = tokens_list[j]
                if token < 0:  # only reachable if a matcher's mask and status disagree; end the row honestly
                    events.append(finish(i, "no_allowed_token"))
                    continue
                matcher = matchers[i]
                if matcher is not None and not matcher.accept(token):
                    raise ConstraintError(
                        f"row {i}, step {step}: the sampler chose token {token}, which the matcher's own "
                        "mask allowed but accept() rejected (a matcher bug)"
                    )
                data = token_bytes[token] if token < n_tokens and token not in special else b""
                text = rows[i].add(token, logprobs_list[j], data)
                events.append(StreamEvent(row=i, text=text, token_id=token, logprob=logprobs_list[j]))
                if token in eos_ids and (matcher is not None or stop_at_eos):
                    events.append(finish(i, "eos"))
                    continue
                if jump_forward and matcher is not None:
                    forced[i] = _jump_forward(matcher, rows[i], max_new_tokens, events, i, token_bytes)
                if len(rows[i].tokens) >= max_new_tokens:
                    # A text that is complete exactly at the limit was not cut: say so.
                    complete = matcher is not None and filler.is_complete(matcher)
                    events.append(finish(i, "constraint_complete" if complete else "length"))
            yield from events
            if not any(active):
                break
            # 3. Ended rows leave the batch (KV cache included), so the forward stops paying for them.
            feed = [
                [tokens_list[j], *forced.get(i, ())] if active[i] else [pad_id] for j, i in enumerate(live)
            ]
            forced.clear()
            keep = [j for j, i in enumerate(live) if active[i]]
            if len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                attention, next_position = attention[index], next_position[index]
                live = [live[j] for j in keep]
                feed = [feed[j] for j in keep]
            # 4. Overlap: the worker fills the next mask while this thread runs the forward.
            pending = launch_fill()
            # Jump-forward rows feed their forced tokens in the same forward: the chunk is right-padded to
            # the longest row, padding masked out of attention (now and in every later step).
            lengths = torch.tensor([len(f) for f in feed], device=device).view(-1, 1)
            width = int(lengths.max())
            chunk = torch.full((len(live), width), pad_id, dtype=torch.long)
            for j, f in enumerate(feed):
                chunk[j, : len(f)] = torch.tensor(f, dtype=torch.long)
            columns = torch.arange(width, device=device).view(1, -1)
            attention = torch.cat([attention, (columns < lengths).to(attention.dtype)], dim=-1)
            out = model(
                input_ids=chunk.to(device),
                attention_mask=attention,
                position_ids=next_position + columns,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[torch.arange(len(live), device=device), lengths.view(-1) - 1, :]
            next_position = next_position + lengths
        pending.result()  # never leave a fill running past the loop


def generate(
    model: Any,
    tokenizer: Any,
    prompts: str | Sequence[str | Sequence[int]],
    constraints: Any = None,
    *,
    vocab: Vocabulary | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    stream: Callable[[int, str], None] | None = None,
    stop_at_eos: bool = True,
    overlap: bool = True,
    jump_forward: bool = True,
    n: int = 1,
    num_beams: int = 1,
) -> list[Any]:
    """Generate for a batch of prompts, each row under its own constraint; one `Generation` per prompt.

    With `n > 1` (best-of-N) or `num_beams > 1` (beam search) each prompt is prefilled once and its branches
    share the prompt's KV cache (`constrain.branching`); the result per prompt is then a `BestOfN` (all N
    branches with scores, and `.best`) or a `BeamSearchResult` (`.beams`, best first).

    Args:
        model: a transformers causal LM with a KV cache (`model(input_ids, attention_mask, position_ids,
            past_key_values, use_cache=True)`), on CPU or CUDA.
        tokenizer: its tokenizer.
        prompts: a string, or a list of strings and/or token-id lists (token ids are used as given).
        constraints: None (unconstrained), one Constraint / compiled constraint / Matcher for every row, or a
            list with one of those (or None) per prompt. A given Matcher is advanced in place.
        vocab: the vocabulary the constraints are compiled against; default: built from `tokenizer` at the
            model's logits width (cached).
        max_new_tokens: the most tokens generated per row (>= 1).
        temperature: 0 for greedy (masked argmax), else the sampling temperature.
        top_k, top_p, min_p: sampling filters applied after the mask (0 / 1.0 / 0.0 = off).
        seed: seeds a `torch.Generator` for reproducible sampling.
        chat: apply the tokenizer's chat template to string prompts (None: when it has one).
        stream: called as `stream(row, text)` with each piece of new text (never splitting a character).
        stop_at_eos: an unconstrained row ends at any EOS id of the vocabulary; False lets it run to
            `max_new_tokens`. A constrained row always ends at EOS (its matcher has terminated).
        overlap: fill the next bitmask in a worker thread during the forward (False: fill in line).
        jump_forward: where a row's constraint forces the next bytes (e.g. `"name": "` in a JSON object), its
            matcher's `forced_tokens()` are appended without sampling and fed to the model together with the
            sampled token in one forward. They count toward `max_new_tokens` and carry log-probability 0.0.
            The last token of a forced run is left to the model (a longer token may span the boundary).
        n: branches per prompt for best-of-N / parallel sampling (1 = plain decoding).
        num_beams: beams per prompt for beam search (1 = plain decoding); not together with `n`.

    Raises:
        ConstraintError: bad arguments, constraints that do not fit the batch, an empty prompt.
        VocabularyError: a vocabulary whose logits width is not the model's.
    """
    if n != 1 or num_beams != 1:
        return _generate_branches(
            model,
            tokenizer,
            prompts,
            constraints,
            n=n,
            num_beams=num_beams,
            vocab=vocab,
            max_new_tokens=max_new_tokens,
            chat=chat,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop_at_eos=stop_at_eos,
        )
    results: dict[int, Generation] = {}
    for event in generate_stream(
        model,
        tokenizer,
        prompts,
        constraints,
        vocab=vocab,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        chat=chat,
        stop_at_eos=stop_at_eos,
        overlap=overlap,
        jump_forward=jump_forward,
    ):
        if stream is not None and event.text:
            stream(event.row, event.text)
        if event.generation is not None:
            results[event.row] = event.generation
    return [results[row] for row in sorted(results)]


def _generate_branches(
    model,
    tokenizer,
    prompts,
    constraints,
    *,
    n,
    num_beams,
    vocab,
    max_new_tokens,
    chat,
    temperature,
    top_k,
    top_p,
    min_p,
    seed,
    stop_at_eos,
) -> list[Any]:
    """Best-of-N or beam search per prompt, on the shared-prefix KV cache."""
    from .branching import beam_search, generate_n

    if n != 1 and num_beams != 1:
        raise ConstraintError("give n (best-of-N) or num_beams (beam search), not both")
    prompt_list = _as_prompt_list(prompts)
    per_prompt = constraints if isinstance(constraints, list) else [constraints] * len(prompt_list)
    if len(per_prompt) != len(prompt_list):
        raise ConstraintError(f"{len(per_prompt)} constraints for {len(prompt_list)} prompts")
    common = dict(vocab=vocab, max_new_tokens=max_new_tokens, chat=chat)
    if num_beams != 1:
        return [
            beam_search(model, tokenizer, p, c, num_beams=num_beams, **common)
            for p, c in zip(prompt_list, per_prompt, strict=True)
        ]
    return [
        generate_n(
            model,
            tokenizer,
            p,
            c,
            n=n,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop_at_eos=stop_at_eos,
            **common,
        )
        for p, c in zip(prompt_list, per_prompt, strict=True)
    ]
