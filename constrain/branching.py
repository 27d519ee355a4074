"""Best-of-N and beam search on the shared-prefix KV cache: the prompt is prefilled and stored once.

    best = generate_n(model, tok, "Name a prime:", regex(r" \\d+"), n=8, max_new_tokens=8, seed=0)
    best.best.text, [b.score for b in best.branches]

    beams = beam_search(model, tok, "Translate ...", num_beams=4, max_new_tokens=32)
    beams.beams[0].text, beams.beams[0].score

Both open the model through `constrain.kvcache.open_branches`: the prompt runs once at batch 1 (a stored
prefix of it is reused across requests), the branches read its KV from one shared level, and only the
branches' own tokens are per branch. Beam search reorders the own levels only, never the prompt. Every branch
has its own constraint matcher; beams fork their parent's. Models the shared cache does not support fall back
to a per-branch copy of the prompt's KV with a warning (`share_prefix=True` makes that an error).

`beam_search` is transformers' beam search (v5: top `max(2, 1 + #EOS) * K` candidates per step, length
penalty, `early_stopping` heuristics) re-implemented step for step on this cache, so with the same settings it
returns the same beams as `model.generate(num_beams=K)`; a constraint masks the log-probabilities after the
log-softmax, as transformers' `prefix_allowed_tokens_fn` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .bitmask import allocate_bitmask, bitmask_to_bool, bitmask_words
from .constraint import Matcher, fill_bitmasks
from .errors import ConstraintError, VocabularyError
from .generate import Generation, encode_prompts, make_matchers, model_vocabulary
from .kvcache import KVMemory, PrefixStore, context_length, default_store, open_branches
from .vocab import Vocabulary

# transformers' beam search marks impossible scores with this instead of -inf (kept for identical arithmetic).
_NEG = -1.0e9


@dataclass
class Branch(Generation):
    """One branch's result: a `Generation` plus its `score` and its `index` among the branches.

    Best-of-N: `score` is the sum of `logprobs` (each the log-probability of the token under the masked
    distribution at temperature 1, as `masked_sample` reports it). Beam search: `score` is transformers'
    `sequences_scores` (sum of log-probabilities divided by `length ** length_penalty`), and `logprobs` the
    per-token log-softmax values that sum adds up.
    """

    score: float = 0.0
    index: int = 0


@dataclass
class BestOfN:
    """All N branches (in branch order), the `best` by score (ties: lowest index), and how the run went:
    `shared` (the shared-prefix cache ran, else the per-branch copy), `reused_prompt_tokens` (served by the
    prefix store), the KV `memory` at the end, and `graph_steps` (decode steps replayed from a CUDA graph)."""

    branches: list[Branch]
    best: Branch
    shared: bool
    reused_prompt_tokens: int
    memory: KVMemory
    graph_steps: int = 0


@dataclass
class BeamSearchResult:
    """The returned beams, best first; `dropped`: beams a constraint ended (`no_allowed_token`), best first;
    `shared`, `reused_prompt_tokens`, `memory` and `graph_steps` as for `BestOfN`."""

    beams: list[Branch]
    dropped: list[Branch]
    shared: bool
    reused_prompt_tokens: int
    memory: KVMemory
    graph_steps: int = 0


# -- shared set-up -------------------------------------------------------------------------------------------
def _setup(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    constraint: Any,
    rows: int,
    max_new_tokens: int,
    vocab: Vocabulary | None,
    chat: bool | None,
) -> tuple[Vocabulary, list[int], list[Matcher | None]]:
    """Validate before any compute: the vocabulary, the prompt's ids, one matcher per row, the context."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConstraintError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if vocab is None:
        if tokenizer is None:
            raise ConstraintError("give a tokenizer or a vocab")
        vocab = model_vocabulary(model, tokenizer)
    width = getattr(model.config, "vocab_size", None)
    if width is not None and vocab.vocab_size != width:
        raise VocabularyError(
            f"the vocabulary's logits width {vocab.vocab_size} differs from the model's {width}"
        )
    if isinstance(prompt, str) and tokenizer is None:
        raise ConstraintError("a text prompt needs a tokenizer (or pass token ids)")
    if not isinstance(prompt, str) and not isinstance(prompt, Sequence):
        raise ConstraintError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    [ids] = encode_prompts(tokenizer, [prompt], vocab, chat)
    limit = context_length(model)
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ConstraintError(
            f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}: "
            f"{len(ids) + max_new_tokens} positions, more than the model's context of {limit}"
        )
    matchers = make_matchers(constraint, rows, vocab)
    return vocab, ids, matchers


def _check_count(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConstraintError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _store(reuse_prefix: bool | PrefixStore | None, model: Any) -> PrefixStore | None:
    if isinstance(reuse_prefix, PrefixStore):
        return reuse_prefix
    if reuse_prefix:
        return default_store(model)
    return None


def _text(vocab: Vocabulary, tokens: Sequence[int]) -> str:
    return vocab.decode([t for t in tokens if t not in vocab.special_ids])


class _Masks:
    """Bitmasks for a batch of matchers on the host, and as a bool mask or bitmask on the device.

    With no constraint at all, one device-resident unconstrained bitmask is reused every step.
    """

    def __init__(self, rows: int, vocab: Vocabulary, device: torch.device, constrained: bool):
        self.vocab = vocab
        self.device = device
        self.constrained = constrained
        self.host = allocate_bitmask(rows, vocab.vocab_size)
        eos = np.zeros(bitmask_words(vocab.vocab_size), dtype=np.uint32)
        for t in vocab.eos_ids:
            eos[t >> 5] |= np.uint32(1 << (t & 31))
        self.not_eos = ~eos
        self.free: torch.Tensor | None = None
        if not constrained:
            fill_bitmasks([None] * rows, self.host, vocab)
            self.free = self.host.to(device)

    def fill(self, matchers: Sequence[Matcher | None]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The device bitmask for `matchers`, and per row: any token allowed, any token but EOS allowed."""
        n = len(matchers)
        if self.free is not None:
            ones = np.ones(n, dtype=bool)
            return self.free[:n], ones, ones
        host = self.host[:n]
        fill_bitmasks(matchers, host, self.vocab)
        words = host.numpy().view(np.uint32)
        any_allowed = words.any(axis=1)
        any_but_eos = (words & self.not_eos).any(axis=1)
        return host.to(self.device), any_allowed, any_but_eos


# -- best-of-N -----------------------------------------------------------------------------------------------
def generate_n(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    constraint: Any = None,
    *,
    n: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    vocab: Vocabulary | None = None,
    stop_at_eos: bool = True,
    share_prefix: bool | None = None,
    reuse_prefix: bool | PrefixStore | None = True,
    cuda_graph: bool = False,
) -> BestOfN:
    """Sample `n` continuations of one prompt (best-of-N / parallel sampling), the prompt prefilled once.

    Args:
        model, tokenizer: a transformers causal LM (eval mode) and its tokenizer (None if `prompt` is token
            ids and `vocab` is given).
        prompt: text (through the chat template when `chat`, as `constrain.generate` does) or token ids.
        constraint: None, one Constraint / compiled constraint / Matcher for every branch (forked per branch),
            or a list of `n` of those (one per branch).
        n: the number of branches (>= 1).
        max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_at_eos: as `constrain.generate`
            (temperature 0 is greedy: every branch under the same constraint then gives the same text).
        share_prefix: None = the shared cache where supported, else a per-branch copy with a
            `SharedPrefixFallbackWarning`; True = required (raises if unsupported); False = copy.
        reuse_prefix: True = the model's default `PrefixStore` (a prompt prefix seen before is not prefilled
            again), a `PrefixStore`, or False/None = none.
        cuda_graph: replay decode steps from a CUDA graph while no branch has ended (see
            `constrain.kvcache.SharedKV`); on the CPU the same fixed-buffer step runs eagerly.

    Returns a `BestOfN`: every branch with its tokens, text, per-token logprobs, score (sum of logprobs) and
    finish reason ("eos", "length", "constraint_complete", or "no_allowed_token" when its constraint left it
    no token: that ends the branch, not the batch), and the best branch.

    Raises `ConstraintError` (before any compute) for n < 1, bad sampling parameters, a prompt that does not
    fit the model's context with `max_new_tokens`, constraints that do not fit; `SharedPrefixUnsupportedError`
    if `share_prefix=True` and the model is not supported.
    """
    from .sampling import masked_sample

    n = _check_count("n", n)
    if temperature < 0:
        raise ConstraintError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    vocab, ids, matchers = _setup(model, tokenizer, prompt, constraint, n, max_new_tokens, vocab, chat)
    kv = open_branches(
        model,
        share_prefix=share_prefix,
        store=_store(reuse_prefix, model),
        capacity=max_new_tokens,
        cuda_graph=cuda_graph,
    )
    device = kv.forward.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    masks = _Masks(n, vocab, device, any(m is not None for m in matchers))
    eos_ids = vocab.eos_ids

    tokens_of: list[list[int]] = [[] for _ in range(n)]
    logprobs_of: list[list[float]] = [[] for _ in range(n)]
    reason_of: list[str | None] = [None] * n
    alive = list(range(n))  # branch ids of the rows of the current batch, in row order
    with torch.inference_mode():
        logits = kv.prefill(ids)
        kv.fork(n)
        first = True
        while alive:
            live_matchers = [matchers[b] for b in alive]
            bitmask, any_allowed, any_but_eos = masks.fill(live_matchers)
            for row, b in enumerate(alive):
                if matchers[b] is not None and not any_allowed[row]:
                    reason_of[b] = "no_allowed_token"
                elif matchers[b] is not None and not any_but_eos[row]:
                    reason_of[b] = "constraint_complete"
            keep = [row for row, b in enumerate(alive) if reason_of[b] is None]
            if len(keep) < len(alive):  # rows ended by their constraint leave the batch before sampling
                if not keep:
                    break
                bitmask = bitmask[torch.tensor(keep, device=bitmask.device)]
                if not first:
                    rows = torch.tensor(keep, device=logits.device)
                    logits = logits[rows]
                    kv.reorder(rows)
                alive = [alive[row] for row in keep]
            indices = torch.zeros(len(alive), dtype=torch.long, device=device) if first else None
            tokens, logprobs = masked_sample(
                logits.float(),
                bitmask,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                generator=generator,
                indices=indices,
                return_logprobs=True,
                on_empty="return",
            )
            tokens_list, logprobs_list = tokens.tolist(), logprobs.tolist()
            still: list[int] = []
            for row, b in enumerate(alive):
                token = tokens_list[row]
                if token < 0:  # nothing allowed with a finite logit
                    reason_of[b] = "no_allowed_token"
                    continue
                matcher = matchers[b]
                if matcher is not None and not matcher.accept(token):
                    raise ConstraintError(
                        f"branch {b}: token {token} passed the matcher's own mask but accept() refused it"
                    )
                tokens_of[b].append(token)
                logprobs_of[b].append(logprobs_list[row])
                if token in eos_ids and (matcher is not None or stop_at_eos):
                    reason_of[b] = "eos"
                elif len(tokens_of[b]) >= max_new_tokens:
                    reason_of[b] = "length"
                else:
                    still.append(row)
            if not still:
                break
            if first:
                if len(still) < len(alive) or len(alive) < n:
                    kv.fork(len(still))  # fresh branches: nothing of theirs is cached yet
            elif len(still) < len(alive):
                kv.reorder(torch.tensor(still))
            feed = tokens[torch.tensor(still, device=tokens.device)]
            alive = [alive[row] for row in still]
            logits = kv.step(feed)
            first = False

    branches = [
        Branch(
            text=_text(vocab, tokens_of[b]),
            token_ids=tokens_of[b],
            finish_reason=reason_of[b] or "length",
            prompt_tokens=len(ids),
            logprobs=logprobs_of[b],
            score=float(sum(logprobs_of[b])),
            index=b,
        )
        for b in range(n)
    ]
    best = max(branches, key=lambda br: (br.score, -br.index))
    return BestOfN(branches, best, kv.shared, kv.reused_tokens, kv.memory(), getattr(kv, "graph_steps", 0))


# -- beam search ---------------------------------------------------------------------------------------------
class _Dead:
    """A matcher stand-in for a placeholder beam whose token its matcher refused: allows nothing."""


_DEAD = _Dead()


def beam_search(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    constraint: Any = None,
    *,
    num_beams: int,
    max_new_tokens: int = 64,
    num_return_sequences: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    chat: bool | None = None,
    vocab: Vocabulary | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    share_prefix: bool | None = None,
    reuse_prefix: bool | PrefixStore | None = True,
    share_common_after: int | None = 32,
    cuda_graph: bool = False,
) -> BeamSearchResult:
    """Beam search with `num_beams` beams on the shared-prefix cache (transformers' algorithm, step for step).

    Args:
        num_beams: beams K (>= 1); num_return_sequences: how many finished beams to return (default K).
        length_penalty, early_stopping: as transformers (`True`, `False` or "never").
        constraint: as `generate_n` with one entry per beam at most: None, or one constraint whose matcher
            every beam forks as it branches.
        eos_token_id: the ids that end a beam (default: the vocabulary's EOS ids); pass transformers the same.
        share_common_after: once every beam has agreed on this many more generated tokens, move them into a
            shared level (the beams' tree then shares them as it shares the prompt); None = never.
        max_new_tokens, chat, vocab, share_prefix, reuse_prefix, cuda_graph: as `generate_n` (a promotion
            ends the CUDA-graph replay).

    Returns a `BeamSearchResult`: finished beams best first, each with tokens, text, score
    (`sum logprobs / len ** length_penalty`), finish reason ("eos" or "length"); beams a constraint left with
    no allowed token are in `dropped` (reason "no_allowed_token") and fill the returned list only if fewer
    beams finished than asked for.

    Raises `ConstraintError` (before any compute) for num_beams < 1, num_return_sequences outside [1, K], a
    prompt too long for the context; `SharedPrefixUnsupportedError` as `generate_n`.
    """
    k = _check_count("num_beams", num_beams)
    returned = (
        k if num_return_sequences is None else _check_count("num_return_sequences", num_return_sequences)
    )
    if returned > k:
        raise ConstraintError(f"num_return_sequences ({returned}) must be <= num_beams ({k})")
    if early_stopping not in (True, False, "never"):
        raise ConstraintError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    vocab, ids, root_matchers = _setup(model, tokenizer, prompt, constraint, 1, max_new_tokens, vocab, chat)
    if eos_token_id is None:
        eos = sorted(vocab.eos_ids)
    else:
        eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]
    kv = open_branches(
        model,
        share_prefix=share_prefix,
        store=_store(reuse_prefix, model),
        capacity=max_new_tokens,
        cuda_graph=cuda_graph,
    )
    device = kv.forward.device
    root = root_matchers[0]
    masks = _Masks(k, vocab, device, root is not None)
    width = vocab.vocab_size
    prompt_len = len(ids)
    max_length = prompt_len + max_new_tokens
    beams_to_keep = max(2, 1 + len(eos)) * k
    top_k_mask = torch.arange(beams_to_keep) < k
    eos_t = torch.tensor(eos, dtype=torch.long)

    # Running beams (generated tokens, per-token logprobs, matcher) and finished hypotheses, as transformers.
    run_tokens: list[list[int]] = [[] for _ in range(k)]
    run_logprobs: list[list[float]] = [[] for _ in range(k)]
    run_matchers: list[Any] = [root] * k  # identical at the start; forked when beams branch
    run_scores = torch.full((k,), _NEG)
    run_scores[0] = 0.0
    fin: list[tuple[list[int], list[float]]] = [([], [])] * k
    fin_scores = torch.full((k,), _NEG)
    fin_done = torch.zeros(k, dtype=torch.bool)
    improvable = True
    dropped: list[Branch] = []
    promoted = 0
    cur_len = prompt_len

    with torch.inference_mode():
        logits = kv.prefill(ids)
        kv.fork(k)
        while True:
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            if logp.shape[0] == 1:
                logp = logp.expand(k, width)
            if root is not None:
                matchers = [None if m is _DEAD else m for m in run_matchers]
                bitmask, any_allowed, _ = masks.fill(matchers)
                allowed = bitmask_to_bool(bitmask.cpu(), width)
                for j, m in enumerate(run_matchers):
                    if m is _DEAD:
                        allowed[j] = False
                    elif not any_allowed[j] and run_scores[j] > _NEG / 2:  # a real beam, not a placeholder
                        dropped.append(
                            _branch(
                                vocab,
                                run_tokens[j],
                                run_logprobs[j],
                                float(run_scores[j]),
                                "no_allowed_token",
                                prompt_len,
                                j,
                            )
                        )
                logp = logp.masked_fill(~allowed, float("-inf"))
            scores = (logp + run_scores[:, None]).reshape(-1)
            top_scores, top_idx = torch.topk(scores, beams_to_keep)
            parents = top_idx // width
            top_tokens = top_idx % width
            hits = torch.isin(top_tokens, eos_t) | (cur_len + 1 >= max_length)

            # Finished hypotheses (the top K candidates that just hit EOS or the length limit).
            norm = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
            if bool(fin_done.all()) and early_stopping is True:
                norm = norm + _NEG
            if not improvable:
                norm = norm + _NEG
            norm = norm + (~(hits & top_k_mask)).float() * _NEG
            merged = torch.cat([fin_scores, norm])
            merged_done = torch.cat([fin_done, hits & top_k_mask])
            order = torch.topk(merged, k).indices.tolist()
            candidates = [
                _extend(run_tokens, run_logprobs, logp, int(parents[c]), int(top_tokens[c]))
                for c in range(beams_to_keep)
            ]
            fin = [fin[i] if i < k else candidates[i - k] for i in order]
            fin_scores, fin_done = merged[order], merged_done[order]

            # Running beams for the next step: the best K candidates that did not finish.
            running = top_scores + hits.float() * _NEG
            next_idx = torch.topk(running, k).indices
            run_scores = running[next_idx]
            chosen = next_idx.tolist()
            new_parents = [int(parents[c]) for c in chosen]
            run_tokens = [candidates[c][0] for c in chosen]
            run_logprobs = [candidates[c][1] for c in chosen]
            if root is not None:
                run_matchers = _advance(run_matchers, new_parents, [int(top_tokens[c]) for c in chosen])

            cur_len += 1
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_length - prompt_len
            else:
                best_len = cur_len - prompt_len
            best_possible = run_scores[0] / (best_len**length_penalty)
            worst_finished = torch.where(fin_done, fin_scores.min(), torch.full_like(fin_scores, _NEG))
            improvable = improvable and bool((best_possible > worst_finished).any())
            open_beam = not (bool(fin_done.all()) and early_stopping is True)
            if not (improvable and open_beam and not bool(hits.all())):
                break
            if cur_len - prompt_len > 1:  # after the first step no beam has cached tokens of its own yet
                kv.reorder(torch.tensor(new_parents))
            logits = kv.step(torch.tensor([t[-1] for t in run_tokens]))
            if share_common_after and kv.shared:
                common = _common_length(run_tokens)  # every token of a running beam is cached by now
                if common - promoted >= share_common_after:
                    kv.promote(common - promoted)
                    promoted = common

    beams: list[Branch] = []
    for i in range(k):
        if bool(fin_done[i]):
            tokens, logprobs = fin[i]
            reason = "eos" if tokens and tokens[-1] in eos else "length"
            beams.append(_branch(vocab, tokens, logprobs, float(fin_scores[i]), reason, prompt_len, i))
    dropped.sort(key=lambda br: -br.score)
    beams = (beams + dropped)[:returned]
    graph_steps = getattr(kv, "graph_steps", 0)
    return BeamSearchResult(beams, dropped, kv.shared, kv.reused_tokens, kv.memory(), graph_steps)


def _extend(
    run_tokens: list[list[int]], run_logprobs: list[list[float]], logp: torch.Tensor, parent: int, token: int
) -> tuple[list[int], list[float]]:
    return run_tokens[parent] + [token], run_logprobs[parent] + [float(logp[parent, token])]


def _advance(matchers: list[Any], parents: list[int], tokens: list[int]) -> list[Any]:
    """Each new beam's matcher: a fork of its parent's advanced by its token (a placeholder beam whose token
    its matcher refuses gets `_DEAD`)."""
    out: list[Any] = []
    for p, t in zip(parents, tokens, strict=True):
        parent = matchers[p]
        if parent is _DEAD or parent is None:
            out.append(parent)
            continue
        matcher = parent.fork()
        out.append(matcher if matcher.accept(t) else _DEAD)
    return out


def _common_length(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    i = 0
    while i < n and all(s[i] == first[i] for s in seqs):
        i += 1
    return i


def _branch(
    vocab: Vocabulary,
    tokens: list[int],
    logprobs: list[float],
    score: float,
    reason: str,
    prompt_len: int,
    index: int,
) -> Branch:
    return Branch(
        text=_text(vocab, tokens),
        token_ids=list(tokens),
        finish_reason=reason,
        prompt_tokens=prompt_len,
        logprobs=list(logprobs),
        score=score,
        index=index,
    )
