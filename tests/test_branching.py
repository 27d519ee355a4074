"""Best-of-N and beam search on the shared-prefix cache against transformers' own `generate` (same tokens,
same scores), with constraints in every branch, dead-end branches, prefix reuse, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kvcache import FAMILIES, VOCAB, tiny_bloom, tiny_model

from constrain.bitmask import row_view
from constrain.branching import beam_search, generate_n
from constrain.constraint import Matcher
from constrain.errors import ConstraintError
from constrain.kvcache import PrefixStore, SharedPrefixFallbackWarning, SharedPrefixUnsupportedError
from constrain.vocab import Vocabulary

EOS = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    """A byte vocabulary for the tiny models: id i is byte i % 256 (ids past 255 get a suffix), EOS = 2."""
    tokens = [bytes([i % 256]) + (b"+" if i >= 256 else b"") for i in range(VOCAB)]
    return Vocabulary(tokens, eos_ids=[EOS], special_ids=[0, 1, EOS])


class RuleMatcher(Matcher):
    """A test constraint: after the generated tokens `h`, exactly the ids `rule(h)` are allowed (EOS among
    them means the text may end). Written against the Matcher protocol only, so it doubles as the oracle
    for transformers' `prefix_allowed_tokens_fn`."""

    def __init__(self, vocab: Vocabulary, rule, history=()):
        self.vocab = vocab
        self.rule = rule
        self.history = list(history)

    def allowed(self) -> set[int]:
        if self.is_terminated():
            return {EOS}
        return set(self.rule(tuple(self.history)))

    def fill_bitmask(self, bitmask, row=0):
        words = row_view(bitmask, row, self.vocab.vocab_size)
        words[:] = 0
        for t in self.allowed():
            words[t >> 5] |= np.uint32(1 << (t & 31))

    def accept(self, token):
        token = self.vocab.check_token(token)
        if token not in self.allowed():
            return False
        self.history.append(token)
        return True

    def rollback(self, n=1):
        self._check_rollback(n, len(self.history))
        del self.history[len(self.history) - n :]

    def fork(self):
        return RuleMatcher(self.vocab, self.rule, self.history)

    def is_accepting(self):
        return EOS in self.allowed()

    def is_terminated(self):
        return bool(self.history) and self.history[-1] == EOS


def prefix_fn(rule, prompt_len: int):
    """transformers' `prefix_allowed_tokens_fn` for `rule` (it sees the prompt plus the generated tokens)."""

    def allowed(batch_id, input_ids):
        generated = tuple(input_ids[prompt_len:].tolist())
        if generated and generated[-1] == EOS:
            return [EOS]
        return sorted(rule(generated))

    return allowed


def hf_beams(model, prompt, k, max_new_tokens, rule=None, **kwargs):
    """transformers' beam search: (generated ids of each returned beam, padding stripped, and its score)."""
    extra = {"prefix_allowed_tokens_fn": prefix_fn(rule, len(prompt))} if rule else {}
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            num_beams=k,
            num_return_sequences=k,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            **extra,
            **kwargs,
        )
    beams = []
    for seq in out.sequences[:, len(prompt) :].tolist():
        if EOS in seq:
            seq = seq[: seq.index(EOS) + 1]
        beams.append(seq)
    return beams, out.sequences_scores.tolist()


def random_prompt(seed: int, length: int = 12) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# A constraint used below: only even ids at first; from the 4th token on, EOS or one of three ids.
def evens_then_sevens(h):
    return range(4, VOCAB, 2) if len(h) < 3 else [EOS, 7, 14, 21]


# -- exactness against transformers --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 4])
def test_beam_search_returns_transformers_beams_and_scores(family, k, vocab):
    model = tiny_model(family, seed=k)
    prompt = random_prompt(k)
    ours = beam_search(model, None, prompt, num_beams=k, max_new_tokens=8, vocab=vocab, reuse_prefix=False)
    tokens, scores = hf_beams(model, prompt, k, 8)
    assert ours.shared
    assert [b.token_ids for b in ours.beams] == tokens
    assert [b.score for b in ours.beams] == pytest.approx(scores, abs=1e-5)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_constrained_beam_search_equals_transformers_prefix_allowed_tokens(early_stopping, vocab):
    """Beams fork their matchers; the constraint masks log-probabilities exactly as transformers'
    `prefix_allowed_tokens_fn` does, EOS ends beams, and all three early-stopping rules agree."""
    model = tiny_model("llama", seed=5)
    prompt = random_prompt(5)
    ours = beam_search(
        model,
        None,
        prompt,
        RuleMatcher(vocab, evens_then_sevens),
        num_beams=3,
        max_new_tokens=10,
        vocab=vocab,
        early_stopping=early_stopping,
        length_penalty=0.7,
        reuse_prefix=False,
    )
    tokens, scores = hf_beams(
        model, prompt, 3, 10, evens_then_sevens, early_stopping=early_stopping, length_penalty=0.7
    )
    assert [b.token_ids for b in ours.beams] == tokens
    assert [b.score for b in ours.beams] == pytest.approx(scores, abs=1e-5)
    assert any(b.finish_reason == "eos" for b in ours.beams)
    for beam in ours.beams:  # every beam satisfies the constraint, token by token
        probe = RuleMatcher(vocab, evens_then_sevens)
        assert all(probe.accept(t) for t in beam.token_ids)


def test_greedy_best_of_n_equals_transformers_num_return_sequences(vocab):
    """temperature 0: every branch is transformers' greedy continuation (top_k=1 sampling, N sequences)."""
    model = tiny_model("qwen2", seed=1)
    prompt = random_prompt(1)
    ours = generate_n(
        model, None, prompt, n=4, max_new_tokens=10, temperature=0, vocab=vocab, reuse_prefix=False
    )
    with torch.inference_mode():
        hf = model.generate(
            torch.tensor([prompt]),
            do_sample=True,
            top_k=1,
            num_return_sequences=4,
            max_new_tokens=10,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    assert [b.token_ids for b in ours.branches] == hf[:, len(prompt) :].tolist()
    assert ours.shared and ours.best.index == 0


def test_each_branch_follows_its_own_constraint_like_a_separate_greedy_run(vocab):
    """Best-of-N with a different constraint per branch: branch i equals transformers' greedy generation under
    constraint i alone (ids congruent to i mod 3, EOS allowed from the 5th token)."""
    model = tiny_model("gpt2", seed=2)
    prompt = random_prompt(2)

    def rule(i):
        return lambda h: [t for t in range(3, VOCAB) if t % 3 == i] + ([EOS] if len(h) >= 4 else [])

    matchers = [RuleMatcher(vocab, rule(i)) for i in range(3)]
    ours = generate_n(model, None, prompt, matchers, n=3, max_new_tokens=9, temperature=0, vocab=vocab)
    for i, branch in enumerate(ours.branches):
        with torch.inference_mode():
            hf = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=9,
                eos_token_id=EOS,
                pad_token_id=0,
                prefix_allowed_tokens_fn=prefix_fn(rule(i), len(prompt)),
            )
        expected = hf[0, len(prompt) :].tolist()
        assert branch.token_ids == expected[: len(branch.token_ids)]
        assert branch.finish_reason == ("eos" if EOS in branch.token_ids else "length")


def test_sampled_branches_report_the_logprobs_a_full_forward_gives(vocab):
    """Sampling 6 constrained branches from one shared prompt: each token is allowed by its branch's matcher,
    and each reported logprob equals the log-softmax of the masked logits of an uncached full forward."""
    model = tiny_model("qwen3", seed=3)
    prompt = random_prompt(3, length=20)
    result = generate_n(
        model,
        None,
        prompt,
        RuleMatcher(vocab, evens_then_sevens),
        n=6,
        max_new_tokens=8,
        temperature=1.0,
        seed=0,
        vocab=vocab,
        reuse_prefix=False,
    )
    assert len({tuple(b.token_ids) for b in result.branches}) > 1  # the branches did diverge
    for branch in result.branches:
        probe = RuleMatcher(vocab, evens_then_sevens)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + branch.token_ids])).logits[0].float()
        for i, (token, logprob) in enumerate(zip(branch.token_ids, branch.logprobs, strict=True)):
            allowed = torch.zeros(VOCAB, dtype=torch.bool)
            allowed[sorted(probe.allowed())] = True
            expected = logits[len(prompt) - 1 + i].masked_fill(~allowed, float("-inf")).log_softmax(-1)[token]
            assert logprob == pytest.approx(float(expected), abs=1e-4)
            assert probe.accept(token)
        assert branch.score == pytest.approx(sum(branch.logprobs))
    assert result.best.score == max(b.score for b in result.branches)


def test_seeded_sampling_is_reproducible_and_equal_on_the_copied_path(vocab):
    """The same seed gives the same branches on the shared cache and on the per-branch copy."""
    model = tiny_model("llama", seed=4)
    prompt = random_prompt(4)
    runs = [
        generate_n(model, None, prompt, n=5, max_new_tokens=6, seed=9, vocab=vocab, share_prefix=share)
        for share in (True, False)
    ]
    assert runs[0].shared and not runs[1].shared
    assert [b.token_ids for b in runs[0].branches] == [b.token_ids for b in runs[1].branches]
    for a, b in zip(runs[0].branches, runs[1].branches, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert runs[0].memory.used_bytes < runs[1].memory.used_bytes


# -- constraints that end branches ---------------------------------------------------------------------------
def test_a_branch_left_without_allowed_tokens_ends_alone(vocab):
    """Branches whose first token is a multiple of 4 have nothing allowed next: they end with
    `no_allowed_token`, the others run to the length limit."""

    def rule(h):
        if len(h) == 1 and h[0] % 4 == 0:
            return []
        return range(4, 40, 2)

    result = generate_n(
        tiny_model("llama"),
        None,
        random_prompt(0),
        RuleMatcher(vocab, rule),
        n=12,
        max_new_tokens=5,
        seed=1,
        vocab=vocab,
        reuse_prefix=False,
    )
    reasons = {b.finish_reason for b in result.branches}
    assert reasons == {"no_allowed_token", "length"}
    for branch in result.branches:
        dead = branch.token_ids[0] % 4 == 0
        assert (branch.finish_reason == "no_allowed_token") == dead
        assert len(branch.token_ids) == (1 if dead else 5)


def test_a_finished_constraint_ends_its_branch_without_spending_eos(vocab):
    """When the constraint allows only EOS, the branch ends as `constraint_complete`."""
    result = generate_n(
        tiny_model("gpt2"),
        None,
        random_prompt(6),
        RuleMatcher(vocab, lambda h: [EOS] if len(h) == 3 else [5, 6]),
        n=3,
        max_new_tokens=8,
        seed=0,
        vocab=vocab,
    )
    assert [len(b.token_ids) for b in result.branches] == [3, 3, 3]
    assert {b.finish_reason for b in result.branches} == {"constraint_complete"}


def test_beam_search_drops_dead_beams_and_keeps_searching(vocab):
    """Beams whose second token is a multiple of 4 die and are listed in `dropped`; live beams finish."""

    def rule(h):
        if len(h) == 2 and h[1] % 4 == 0:
            return []
        return range(4, 60, 2) if len(h) < 5 else [EOS]

    result = beam_search(
        tiny_model("qwen2", seed=8),
        None,
        random_prompt(8),
        RuleMatcher(vocab, rule),
        num_beams=4,
        max_new_tokens=8,
        vocab=vocab,
        reuse_prefix=False,
    )
    assert result.dropped and all(b.finish_reason == "no_allowed_token" for b in result.dropped)
    assert all(b.token_ids[1] % 4 == 0 for b in result.dropped)
    assert result.beams and all(b.finish_reason == "eos" and len(b.token_ids) == 6 for b in result.beams)


def test_sharing_the_beams_common_tokens_changes_nothing(vocab):
    """Promoting the tokens all beams agree on into a shared level gives the same beams and scores."""
    model = tiny_model("llama", seed=6)
    prompt = random_prompt(6)
    kw = dict(num_beams=3, max_new_tokens=12, vocab=vocab, reuse_prefix=False)
    rule = lambda h: [10, 12] if len(h) < 4 else range(3, 99)  # noqa: E731
    plain = beam_search(model, None, prompt, RuleMatcher(vocab, rule), share_common_after=None, **kw)
    shared = beam_search(model, None, prompt, RuleMatcher(vocab, rule), share_common_after=1, **kw)
    assert [b.token_ids for b in shared.beams] == [b.token_ids for b in plain.beams]
    assert [b.score for b in shared.beams] == pytest.approx([b.score for b in plain.beams], abs=1e-5)


def test_fixed_buffer_decoding_gives_the_same_beams_and_branches(vocab):
    """The CUDA-graph-ready step (fixed buffers, in-place beam reorder; run eagerly on the CPU) changes no
    beam, no score and no sampled token; a branch ending early takes it back to growing buffers."""
    model = tiny_model("qwen2", seed=12)
    prompt = random_prompt(12)
    kw = dict(num_beams=3, max_new_tokens=9, vocab=vocab, reuse_prefix=False, share_common_after=None)
    plain, fixed = (beam_search(model, None, prompt, cuda_graph=g, **kw) for g in (False, True))
    assert [b.token_ids for b in fixed.beams] == [b.token_ids for b in plain.beams]
    assert [b.score for b in fixed.beams] == pytest.approx([b.score for b in plain.beams], abs=1e-5)
    rule = lambda h: [EOS, 20, 40] if len(h) >= 2 else range(4, 90, 2)  # noqa: E731
    kw = dict(n=6, max_new_tokens=8, seed=3, vocab=vocab, reuse_prefix=False)
    plain, fixed = (
        generate_n(model, None, prompt, RuleMatcher(vocab, rule), cuda_graph=graph, **kw)
        for graph in (False, True)
    )
    assert [b.token_ids for b in fixed.branches] == [b.token_ids for b in plain.branches]
    assert {b.finish_reason for b in fixed.branches} == {"eos", "length"}


# -- prefix reuse, fallback, bad input -----------------------------------------------------------------------
def test_a_second_request_reuses_the_stored_prompt_prefix(vocab):
    model = tiny_model("qwen3", seed=9)
    store = PrefixStore()
    system = random_prompt(9, length=30)
    kw = dict(n=2, max_new_tokens=5, temperature=0, vocab=vocab)
    first = generate_n(model, None, system + [40, 41], reuse_prefix=store, **kw)
    second = generate_n(model, None, system + [50, 51, 52], reuse_prefix=store, **kw)
    fresh = generate_n(model, None, system + [50, 51, 52], reuse_prefix=False, **kw)
    assert first.reused_prompt_tokens == 0 and second.reused_prompt_tokens == len(system)
    assert [b.token_ids for b in second.branches] == [b.token_ids for b in fresh.branches]


def test_unsupported_model_falls_back_with_a_warning_and_same_tokens(vocab):
    model = tiny_bloom()
    prompt = random_prompt(10)
    with pytest.warns(SharedPrefixFallbackWarning):
        result = beam_search(model, None, prompt, num_beams=2, max_new_tokens=5, vocab=vocab)
    tokens, _ = hf_beams(model, prompt, 2, 5)
    assert not result.shared and [b.token_ids for b in result.beams] == tokens
    with pytest.raises(SharedPrefixUnsupportedError):
        generate_n(model, None, prompt, n=2, max_new_tokens=5, vocab=vocab, share_prefix=True)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, v: generate_n(m, None, [5, 6], n=0, vocab=v), "n must be"),
        (lambda m, v: generate_n(m, None, [5, 6], n=2.0, vocab=v), "n must be"),
        (lambda m, v: beam_search(m, None, [5, 6], num_beams=0, vocab=v), "num_beams must be"),
        (
            lambda m, v: beam_search(m, None, [5, 6], num_beams=2, num_return_sequences=3, vocab=v),
            "<= num_beams",
        ),
        (lambda m, v: generate_n(m, None, [5] * 250, n=2, max_new_tokens=7, vocab=v), "context of 256"),
        (lambda m, v: beam_search(m, None, [5] * 300, num_beams=2, vocab=v), "context of 256"),
        (lambda m, v: generate_n(m, None, [5, 6], n=2, max_new_tokens=0, vocab=v), "max_new_tokens"),
        (lambda m, v: generate_n(m, None, [5, 6], n=2, temperature=-1, vocab=v), "temperature"),
        (lambda m, v: generate_n(m, None, [], n=2, vocab=v), "empty"),
        (lambda m, v: generate_n(m, None, [5, VOCAB], n=2, vocab=v), "out of range"),
        (lambda m, v: generate_n(m, None, [5], [None, None], n=3, vocab=v), "one per"),
    ],
)
def test_bad_input_raises_before_any_compute(call, message, vocab):
    model = tiny_model("llama")
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConstraintError, match=message):
            call(model, vocab)
    finally:
        hook.remove()
    assert calls == []


# -- the real model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from constrain.assets import load_model

    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_beam_search_and_greedy_best_of_n_equal_transformers(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name a color."}], tokenize=True, add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    eos = [tok.eos_token_id]
    beams = beam_search(
        model, tok, prompt, num_beams=3, max_new_tokens=10, eos_token_id=eos, reuse_prefix=False
    )
    with torch.inference_mode():
        hf = model.generate(
            torch.tensor([prompt]),
            num_beams=3,
            num_return_sequences=3,
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
        )
    expected = [s[len(prompt) :].tolist() for s in hf.sequences]
    assert [b.token_ids for b in beams.beams] == [
        e[: len(b.token_ids)] for b, e in zip(beams.beams, expected, strict=True)
    ]
    assert [b.score for b in beams.beams] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-4)
    greedy = generate_n(model, tok, prompt, n=3, max_new_tokens=10, temperature=0, reuse_prefix=False)
    with torch.inference_mode():
        plain = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, eos_token_id=eos)
    reference = plain[0, len(prompt) :].tolist()
    assert all(b.token_ids == reference[: len(b.token_ids)] for b in greedy.branches)


@pytest.mark.slow
def test_smollm2_regex_constrained_beams_hold_the_constraint_and_match_transformers(smollm2):
    """A regex constraint on a real model: every beam is a full match, and the beams are transformers' beams
    under `prefix_allowed_tokens_fn` fed from a fresh matcher replaying each beam's tokens."""
    from constrain import compile
    from constrain.generate import model_vocabulary
    from constrain.grammars.regex import regex

    model, tok = smollm2
    vocab = model_vocabulary(model, tok)
    compiled = compile(regex(r" (Paris|Lyon|Marseille|Nice)\."), vocab)
    prompt = tok("The largest city in France is")["input_ids"]
    eos = sorted(vocab.eos_ids)
    ours = beam_search(
        model, tok, prompt, compiled, num_beams=3, max_new_tokens=8, eos_token_id=eos, reuse_prefix=False
    )

    def allowed(batch_id, input_ids):
        matcher = compiled.matcher()
        for t in input_ids[len(prompt) :].tolist():
            if matcher.is_terminated():
                return eos
            matcher.accept(t)
        return matcher.allowed_tokens().tolist()

    with torch.inference_mode():
        hf = model.generate(
            torch.tensor([prompt]),
            num_beams=3,
            num_return_sequences=3,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            prefix_allowed_tokens_fn=allowed,
            return_dict_in_generate=True,
            output_scores=True,
            pad_token_id=eos[0],
        )
    for beam, seq in zip(ours.beams, hf.sequences[:, len(prompt) :].tolist(), strict=True):
        assert beam.token_ids == seq[: len(beam.token_ids)]
        assert beam.finish_reason == "eos"
        assert beam.text in (" Paris.", " Lyon.", " Marseille.", " Nice.")
    assert [b.score for b in ours.beams] == pytest.approx(hf.sequences_scores.tolist(), abs=1e-4)
