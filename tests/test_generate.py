"""The decode loop (`constrain.generate`) and the transformers adapter (`constrain.hf`).

Oracles: a brute-force masked argmax computed here without our loop (a full forward on prompt + tokens at
every step, no KV cache, no padding), `re.fullmatch` on the output text, and a test-double matcher that allows
a fixed set of token sequences (so the allowed set at every step is known independently of any compiler).
Models: tiny random Llama models built here (fast), and the real SmolLM2-135M-Instruct for end-to-end checks.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrain import ConstraintError, Matcher, VocabularyError
from constrain.bitmask import row_view
from constrain.generate import Generation, Utf8Stream, generate, generate_stream, model_vocabulary
from constrain.grammars.regex import choice, regex
from constrain.vocab import Vocabulary

# -- test doubles ------------------------------------------------------------------------------------------


class SequencesMatcher(Matcher):
    """A Matcher that allows exactly a fixed set of token sequences (a test double of the protocol).

    Next tokens: those that extend the history along some sequence; EOS when the history is a whole sequence
    (and `complete`). With `complete=False` a finished sequence is a dead end: nothing is allowed after it.
    """

    def __init__(self, vocab: Vocabulary, sequences: Sequence[Sequence[int]], *, complete: bool = True):
        self.vocab = vocab
        self.sequences = [tuple(s) for s in sequences]
        self.complete = complete
        self.history: list[int] = []
        self.terminated = False
        self.fill_threads: list[str] = []

    def allowed(self) -> set[int]:
        if self.terminated:
            return set(self.vocab.eos_ids)
        n = len(self.history)
        prefix = tuple(self.history)
        nxt = {s[n] for s in self.sequences if len(s) > n and s[:n] == prefix}
        return nxt | set(self.vocab.eos_ids) if self.is_accepting() else nxt

    def fill_bitmask(self, bitmask, row: int = 0) -> None:
        self.fill_threads.append(threading.current_thread().name)
        words = row_view(bitmask, row, self.vocab.vocab_size)
        words[:] = 0
        for t in self.allowed():
            words[t >> 5] |= np.uint32(1 << (t & 31))

    def accept(self, token: int) -> bool:
        token = self.vocab.check_token(token)
        if token not in self.allowed():
            return False
        if self.terminated:
            return True
        self.history.append(token)
        self.terminated = token in self.vocab.eos_ids
        return True

    def rollback(self, n: int = 1) -> None:
        self._check_rollback(n, len(self.history))
        for _ in range(n):
            self.history.pop()
        self.terminated = bool(self.history) and self.history[-1] in self.vocab.eos_ids

    def fork(self) -> SequencesMatcher:
        copy = SequencesMatcher(self.vocab, self.sequences, complete=self.complete)
        copy.history = list(self.history)
        copy.terminated = self.terminated
        return copy

    def is_accepting(self) -> bool:
        return self.complete and not self.terminated and tuple(self.history) in self.sequences

    def is_terminated(self) -> bool:
        return self.terminated


class BiasedLM(torch.nn.Module):
    """Wraps a causal LM and adds a fixed bias to its logits: a test double that steers greedy choices.

    Its `forward(**kwargs)` takes no `logits_to_keep`, so it also covers models without that argument.
    """

    def __init__(self, inner: torch.nn.Module, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.register_buffer("bias", bias)
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.on_forward: Callable[[], None] | None = None

    def forward(self, **kwargs):
        self.calls += 1
        self.batch_sizes.append(kwargs["input_ids"].shape[0])
        if self.on_forward is not None:
            self.on_forward()
        out = self.inner(**kwargs)
        out.logits = out.logits + self.bias
        return out


# -- fixtures ------------------------------------------------------------------------------------------------


def tiny_llama(vocab_size: int, seed: int = 0):
    """A random 2-layer Llama; a large init spreads the logits, so greedy choices have clear margins."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other work, torch's default of 2 spinning OpenMP
    threads measured 5-10x slower for these small models (the outputs do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tokenizers):
    return tokenizers("smollm2")


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def vocab(tiny, tok):
    return model_vocabulary(tiny, tok)


@pytest.fixture(scope="module")
def smollm2():
    from constrain.assets import load_model

    return load_model("smollm2")


def regex_module():
    import constrain.grammars.regex

    return constrain.grammars.regex


# -- the oracle ----------------------------------------------------------------------------------------------


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits after `ids`: one full forward, no KV cache, no padding."""
    with torch.inference_mode():
        device = next(model.parameters()).device
        return (
            model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float().cpu()
        )


def brute_force_greedy(model, prompt: list[int], fresh: Callable[[], Matcher | None], vocab, max_new: int):
    """Greedy masked argmax step by step with full forwards; returns (tokens, finish_reason) like our loop."""
    matcher = fresh()
    tokens: list[int] = []
    while True:
        if matcher is not None:
            allowed = matcher.allowed_tokens()
            if allowed.size == 0:
                return tokens, "no_allowed_token"
            if set(allowed.tolist()) <= vocab.eos_ids:
                return tokens, "constraint_complete"
        logits = full_logits(model, prompt + tokens)
        if matcher is not None:
            masked = torch.full_like(logits, float("-inf"))
            masked[allowed] = logits[allowed]
            logits = masked
        token = int(logits.argmax())
        tokens.append(token)
        if matcher is not None:
            assert matcher.accept(token)
        if token in vocab.eos_ids:
            return tokens, "eos"
        if len(tokens) == max_new:
            return tokens, "length"


def assert_masked_argmax_path(
    model, prompt: list[int], g: Generation, fresh: Callable[[], Matcher | None], vocab
):
    """Teacher-forced check: every generated token is allowed and its logit is the best allowed one (up to
    float noise between cached/padded and full forwards), and the finish reason is what the mask says."""
    matcher = fresh()
    for k, token in enumerate(g.token_ids):
        logits = full_logits(model, prompt + g.token_ids[:k])
        allowed = matcher.allowed_tokens() if matcher is not None else np.arange(vocab.n_tokens)
        assert token in set(allowed.tolist()), f"step {k}: token {token} not allowed"
        best = float(logits[torch.as_tensor(allowed)].max())
        assert float(logits[token]) >= best - 1e-3, f"step {k}: token {token} is not the masked argmax"
        if matcher is not None:
            assert matcher.accept(token)
    if g.finish_reason == "constraint_complete":
        assert set(matcher.allowed_tokens().tolist()) <= vocab.eos_ids
    elif g.finish_reason == "eos":
        assert g.token_ids[-1] in vocab.eos_ids
    elif g.finish_reason == "no_allowed_token":
        assert matcher.allowed_tokens().size == 0


def encoded(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


# -- greedy = brute-force masked argmax ----------------------------------------------------------------------


def test_greedy_with_sequence_constraint_equals_brute_force_masked_argmax(tiny, tok, vocab):
    prompt = encoded(tok, "Pick one of the sequences:")
    seqs = [[100, 200, 300], [100, 201], [100, 200, 301, 400], [5000, 6000]]
    fresh = lambda: SequencesMatcher(vocab, seqs)  # noqa: E731
    [g] = generate(tiny, tok, [prompt], fresh(), max_new_tokens=8)
    tokens, reason = brute_force_greedy(tiny, prompt, fresh, vocab, 8)
    assert (g.token_ids, g.finish_reason) == (tokens, reason)
    assert tuple(t for t in g.token_ids if t not in vocab.eos_ids) in {tuple(s) for s in seqs}


def test_batch_with_mixed_constraints_follows_masked_argmax_in_every_row(tiny, tok, vocab):
    """Rows of different prompt lengths (left padding) and constraints: each row is the masked argmax path
    of its own prompt computed without padding or cache."""
    prompts = [
        encoded(tok, "a short one"),
        encoded(tok, "a much longer prompt than the others, with words"),
        [7],
    ]
    seqs = [[10, 11, 12, 13], [10, 11, 14], [20]]
    constraints = [SequencesMatcher(vocab, seqs), None, SequencesMatcher(vocab, [[30, 31, 32, 33, 34, 35]])]
    fresh = [
        lambda: SequencesMatcher(vocab, seqs),
        lambda: None,
        lambda: SequencesMatcher(vocab, [[30, 31, 32, 33, 34, 35]]),
    ]
    gens = generate(tiny, tok, prompts, constraints, max_new_tokens=6)
    assert [g.prompt_tokens for g in gens] == [len(p) for p in prompts]
    for prompt, g, f in zip(prompts, gens, fresh, strict=True):
        assert_masked_argmax_path(tiny, prompt, g, f, vocab)
    assert gens[1].finish_reason in ("length", "eos")
    assert (gens[2].token_ids, gens[2].finish_reason) == ([30, 31, 32, 33, 34, 35], "constraint_complete")


def test_smollm2_greedy_regex_equals_brute_force_and_transformers_with_the_processor(smollm2):
    """The real model: our greedy constrained output fullmatches the regex, equals the brute-force masked
    argmax, and equals transformers' own generate with ConstrainedLogitsProcessor."""
    rx = regex_module()
    from constrain.hf import ConstrainedLogitsProcessor

    model, tok = smollm2
    vocab = model_vocabulary(model, tok)
    pattern = r"\d{4}-\d{2}-\d{2}"
    question = "When did the Berlin Wall fall? Answer with the date."
    compiled = rx.regex(pattern).compile(vocab)
    [g] = generate(model, tok, question, compiled, max_new_tokens=16)
    assert re.fullmatch(pattern, g.text), g.text
    assert g.finish_reason == "constraint_complete"
    templated = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt = tok(templated, add_special_tokens=False)["input_ids"]
    assert g.prompt_tokens == len(prompt)
    tokens, reason = brute_force_greedy(model, prompt, compiled.matcher, vocab, 16)
    assert (g.token_ids, g.finish_reason) == (tokens, reason)
    processor = ConstrainedLogitsProcessor(rx.regex(pattern), vocab)
    [theirs] = hf_greedy(model, [prompt], processor, vocab, 16, do_sample=False)
    assert without_eos(theirs, vocab) == g.token_ids


def test_smollm2_choice_and_regex_rows_in_one_batch_fullmatch(smollm2):
    rx = regex_module()
    model, tok = smollm2
    labels = ["positive", "negative", "neutral"]
    prompts = [
        "Review: 'Terrible battery, it died in a day.' Sentiment?",
        "Give me a US phone number.",
        "Say something.",
    ]
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    gens = generate(model, tok, prompts, [rx.choice(labels), rx.regex(phone), None], max_new_tokens=14)
    assert gens[0].text in labels
    assert re.fullmatch(phone, gens[1].text), gens[1].text
    assert gens[0].finish_reason in ("eos", "constraint_complete")
    assert gens[1].finish_reason == "constraint_complete"
    assert gens[2].finish_reason in ("eos", "length") and gens[2].text


# -- finish reasons ------------------------------------------------------------------------------------------


def biased(tiny, vocab, tokens, amount: float) -> BiasedLM:
    bias = torch.zeros(vocab.vocab_size)
    bias[sorted(tokens)] = amount
    return BiasedLM(tiny, bias).eval()


def test_unconstrained_row_stops_at_eos_and_runs_on_without_stop_at_eos(tiny, tok, vocab):
    eos = tok.eos_token_id
    model = biased(tiny, vocab, [eos], 100.0)
    [g] = generate(model, tok, [[5, 6]], max_new_tokens=5)
    assert (g.token_ids, g.finish_reason, g.text) == ([eos], "eos", "")
    [g] = generate(model, tok, [[5, 6]], max_new_tokens=5, stop_at_eos=False)
    assert (g.token_ids, g.finish_reason, g.text) == ([eos] * 5, "length", "")


def test_constrained_row_ends_with_eos_only_where_the_matcher_accepts(tiny, tok, vocab):
    eos = tok.eos_token_id
    seqs = [[100, 200, 300], [100]]
    # EOS favoured: it is taken as soon as the matcher allows it (after [100]), not before.
    [g] = generate(biased(tiny, vocab, [eos], 100.0), tok, [[5]], SequencesMatcher(vocab, seqs))
    assert (g.token_ids, g.finish_reason) == ([100, eos], "eos")
    # EOS disfavoured: the row runs to the end of the longest sequence and stops without spending an EOS.
    [g] = generate(biased(tiny, vocab, vocab.eos_ids, -100.0), tok, [[5]], SequencesMatcher(vocab, seqs))
    assert (g.token_ids, g.finish_reason) == ([100, 200, 300], "constraint_complete")


def test_rows_end_for_different_reasons_and_leave_the_batch_while_it_goes_on(tiny, tok, vocab):
    def constraints():
        return [
            SequencesMatcher(vocab, [[40, 41]], complete=False),  # dead end after two tokens
            SequencesMatcher(vocab, []),  # nothing allowed at all
            SequencesMatcher(vocab, [[50]]),  # complete after one token
            SequencesMatcher(vocab, [[60, 61, 62, 63, 64, 65, 66]]),  # longer than max_new_tokens
            None,
        ]

    model = biased(tiny, vocab, vocab.eos_ids, -100.0)
    gens = generate(model, tok, [[5]] * 5, constraints(), max_new_tokens=4)
    assert [(g.token_ids, g.finish_reason) for g in gens[:4]] == [
        ([40, 41], "no_allowed_token"),
        ([], "no_allowed_token"),
        ([50], "constraint_complete"),
        ([60, 61, 62, 63], "length"),
    ]
    assert gens[4].finish_reason == "length" and len(gens[4].token_ids) == 4
    assert all(len(g.logprobs) == len(g.token_ids) for g in gens)
    assert model.batch_sizes == [5, 4, 3, 2]  # ended rows leave the model's batch (and its KV cache)
    for i, constraint in enumerate(constraints()):  # each row alone gives what it gave in the batch
        [alone] = generate(model, tok, [[5]], constraint, max_new_tokens=4)
        assert (alone.token_ids, alone.finish_reason) == (gens[i].token_ids, gens[i].finish_reason)


def test_logprobs_are_the_masked_log_softmax_of_the_chosen_tokens(tiny, tok, vocab):
    seqs = [[100, 200], [100, 201], [300]]
    [g] = generate(tiny, tok, [[5, 6, 7]], SequencesMatcher(vocab, seqs), max_new_tokens=4)
    matcher = SequencesMatcher(vocab, seqs)
    for k, token in enumerate(g.token_ids):
        logits = full_logits(tiny, [5, 6, 7] + g.token_ids[:k])
        allowed = torch.as_tensor(matcher.allowed_tokens())
        expected = torch.log_softmax(logits[allowed], -1)[(allowed == token).nonzero()[0, 0]]
        assert g.logprobs[k] == pytest.approx(float(expected), abs=1e-4)
        matcher.accept(token)


# -- streaming -----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=6), max_size=12))
def test_utf8_stream_concatenation_equals_one_shot_decode(chunks):
    """For any split of any bytes into chunks, the pieces Utf8Stream returns concatenate to the one-shot
    decode with replacement characters."""
    stream = Utf8Stream()
    pieces = [stream.push(c) for c in chunks] + [stream.close()]
    assert "".join(pieces) == b"".join(chunks).decode("utf-8", errors="replace")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=8), st.data())
def test_utf8_stream_never_emits_part_of_a_valid_character(text, data):
    """Valid UTF-8 split anywhere: no piece contains a replacement character, and every character comes out
    as soon as its last byte is pushed."""
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    stream = Utf8Stream()
    seen, emitted = b"", ""
    for chunk in chunks:
        seen += chunk
        emitted += stream.push(chunk)
        assert emitted == seen.decode("utf-8", errors="ignore")  # all whole characters, nothing partial
    assert stream.close() == ""


def byte_tokens(vocab: Vocabulary, data: bytes) -> list[int]:
    return [vocab.token_id(bytes([b])) for b in data]


def test_stream_deltas_concatenate_to_text_with_characters_split_across_tokens(tiny, tok, vocab):
    text = "é日🙂!"
    seq = byte_tokens(vocab, text.encode())  # one token per byte: every multi-byte character is split
    deltas: list[tuple[int, str]] = []
    gens = generate(
        tiny,
        tok,
        [[5], [6]],
        [SequencesMatcher(vocab, [seq]), SequencesMatcher(vocab, [byte_tokens(vocab, b"ok")])],
        max_new_tokens=20,
        stream=lambda row, delta: deltas.append((row, delta)),
    )
    assert gens[0].text == text and gens[1].text == "ok"
    assert [d for r, d in deltas if r == 0] == ["é", "日", "🙂", "!"]  # each as soon as it is whole
    assert "".join(d for r, d in deltas if r == 1) == "ok"


def test_stream_iterator_yields_token_events_then_one_final_event_per_row(tiny, tok, vocab):
    seq = byte_tokens(vocab, "ü".encode()) + [vocab.token_id(b"\xe2")]  # ends inside a character
    events = list(generate_stream(tiny, tok, [[5]], SequencesMatcher(vocab, [seq]), max_new_tokens=10))
    token_events = [e for e in events if e.token_id is not None]
    assert [e.token_id for e in token_events] == seq
    assert [e.text for e in token_events] == ["", "ü", ""]
    final = events[-1]
    assert final.generation is not None and final.token_id is None
    assert final.text == "\ufffd"  # the incomplete trailing byte, flushed as a replacement character
    assert "".join(e.text for e in events) == final.generation.text == "ü\ufffd"


# -- overlap -------------------------------------------------------------------------------------------------


def test_overlap_on_and_off_give_identical_sampled_outputs(tiny, tok, vocab):
    prompts = [[5, 6, 7], encoded(tok, "hello there"), [9]]
    seqs = [[10, 11, 12], [10, 13], [14, 15, 16, 17], [14, 18]]

    def run(overlap: bool):
        constraints = [SequencesMatcher(vocab, seqs), None, SequencesMatcher(vocab, seqs)]
        return generate(
            tiny,
            tok,
            prompts,
            constraints,
            max_new_tokens=6,
            temperature=1.3,
            top_k=20,
            top_p=0.95,
            seed=11,
            overlap=overlap,
        )

    on, off = run(True), run(False)
    assert on == off
    assert run(True) == on  # and the seed makes it reproducible


def test_overlap_fills_the_next_mask_while_the_forward_runs(tiny, tok, vocab):
    """Every fill meets a forward at a barrier: it can pass only if both are in progress at the same time."""
    barrier = threading.Barrier(2, timeout=5)
    broken: list[str] = []

    class RendezvousMatcher(SequencesMatcher):
        def fill_bitmask(self, bitmask, row=0):
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                broken.append("fill")
                barrier.reset()
            super().fill_bitmask(bitmask, row)

        def fork(self):
            return self

    model = biased(tiny, vocab, vocab.eos_ids, -100.0)

    def meet():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            broken.append("forward")
            barrier.reset()

    model.on_forward = meet
    matcher = RendezvousMatcher(vocab, [[10, 11, 12, 13, 14]])
    [g] = generate(model, tok, [[5]], matcher, max_new_tokens=8, overlap=True)
    assert (g.token_ids, g.finish_reason) == ([10, 11, 12, 13, 14], "constraint_complete")
    assert model.calls == 6 and not broken  # prefill + 5 steps, each overlapped with a fill
    assert all(name != threading.current_thread().name for name in matcher.fill_threads)

    plain = SequencesMatcher(vocab, [[10, 11, 12]])
    model.on_forward = None
    generate(model, tok, [[5]], plain, max_new_tokens=5, overlap=False)
    assert plain.fill_threads and set(plain.fill_threads) == {threading.current_thread().name}


# -- inputs and errors ---------------------------------------------------------------------------------------


def test_chat_template_is_applied_by_default_and_can_be_turned_off(tiny, tok):
    [with_chat] = generate(tiny, tok, "Hi", max_new_tokens=1)
    [without] = generate(tiny, tok, "Hi", max_new_tokens=1, chat=False)
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert with_chat.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
    assert without.prompt_tokens == len(tok("Hi")["input_ids"])


def test_a_single_constraint_applies_to_every_row_with_its_own_state(tiny, tok, vocab):
    shared = SequencesMatcher(vocab, [[10, 11], [12]])
    gens = generate(tiny, tok, [[5], [6], [7]], shared, max_new_tokens=4)
    for prompt, g in zip([[5], [6], [7]], gens, strict=True):
        assert_masked_argmax_path(tiny, prompt, g, lambda: SequencesMatcher(vocab, [[10, 11], [12]]), vocab)


def test_bad_arguments_raise_constraint_errors_that_name_the_problem(tiny, tok, vocab):
    m = SequencesMatcher(vocab, [[1]])
    with pytest.raises(ConstraintError, match="2 for 3 prompt"):
        generate(tiny, tok, [[5], [6], [7]], [m, None])
    with pytest.raises(ConstraintError, match="max_new_tokens"):
        generate(tiny, tok, [[5]], max_new_tokens=0)
    with pytest.raises(ConstraintError, match="max_new_tokens"):
        generate_stream(tiny, tok, [[5]], max_new_tokens=0)  # raised at the call, before any iteration
    with pytest.raises(ConstraintError, match="temperature"):
        generate(tiny, tok, [[5]], temperature=-1)
    with pytest.raises(ConstraintError, match="top_p"):
        generate(tiny, tok, [[5]], top_p=0)
    with pytest.raises(ConstraintError, match="regex"):
        generate(tiny, tok, [[5]], r"\d+")
    with pytest.raises(ConstraintError, match="prompt 1 is empty"):
        generate(tiny, tok, [[5], []])
    with pytest.raises(ConstraintError, match="list of lists"):
        generate(tiny, tok, [5, 6])
    with pytest.raises(VocabularyError, match="out of range"):
        generate(tiny, tok, [[len(tok) + 5]])


def test_vocabulary_of_another_width_is_refused(tiny, tok, vocab):
    narrow = Vocabulary(vocab.token_bytes, vocab_size=vocab.vocab_size + 64, eos_ids=vocab.eos_ids)
    with pytest.raises(VocabularyError, match="logits width"):
        generate(tiny, tok, [[5]], vocab=narrow)
    other = SequencesMatcher(narrow, [[1]])
    with pytest.raises(VocabularyError, match="another vocabulary"):
        generate(tiny, tok, [[5]], other)


def test_model_vocabulary_is_built_once_per_tokenizer_and_width(tiny, tok):
    assert model_vocabulary(tiny, tok) is model_vocabulary(tiny, tok)
    assert model_vocabulary(tiny, tok).vocab_size == tiny.config.vocab_size


def test_empty_prompt_list_gives_no_generations(tiny, tok):
    assert generate(tiny, tok, []) == []


# -- the transformers LogitsProcessor ------------------------------------------------------------------------


def hf_greedy(model, prompts: list[list[int]], processor, vocab, max_new: int, **kwargs) -> list[list[int]]:
    """transformers' own generate on left-padded prompts; the generated ids per row, padding removed."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            logits_processor=[processor],
            max_new_tokens=max_new,
            eos_token_id=sorted(vocab.eos_ids),
            pad_token_id=2,
            **kwargs,
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in vocab.eos_ids), len(row))
        rows.append(row[:cut])
    return rows


def without_eos(tokens: list[int], vocab) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in vocab.eos_ids else tokens


def test_logits_processor_greedy_equals_our_generate(tiny, tok, vocab):
    from constrain.hf import ConstrainedLogitsProcessor

    prompts = [[5, 6, 7, 8], [9], encoded(tok, "some words here")]
    seqs = [[10, 11, 12], [10, 13], [14, 15, 16, 17]]
    constraints = [SequencesMatcher(vocab, seqs), None, SequencesMatcher(vocab, seqs)]
    ours = generate(tiny, tok, prompts, [c.fork() if c else None for c in constraints], max_new_tokens=6)
    processor = ConstrainedLogitsProcessor(constraints, vocab)
    theirs = hf_greedy(tiny, prompts, processor, vocab, 6, do_sample=False)
    for g, t in zip(ours, theirs, strict=True):
        assert without_eos(g.token_ids, vocab) == without_eos(t, vocab)
    # The processor can be reused: a new generate call restarts it.
    assert hf_greedy(tiny, prompts, processor, vocab, 6, do_sample=False) == theirs


def test_logits_processor_keeps_every_beam_and_sample_inside_the_constraint(tiny, vocab):
    from constrain.hf import ConstrainedLogitsProcessor

    seqs = [[10, 11, 12], [10, 13], [14, 15, 16, 17], [14, 15, 18], [19]]
    valid = {tuple(s) for s in seqs}
    prompts = [[5, 6], [7]]
    processor = ConstrainedLogitsProcessor(
        [SequencesMatcher(vocab, seqs), SequencesMatcher(vocab, seqs)], vocab
    )
    beams = hf_greedy(
        tiny, prompts, processor, vocab, 6, num_beams=4, num_return_sequences=4, do_sample=False
    )
    assert len(beams) == 8
    for row in beams:
        assert tuple(without_eos(row, vocab)) in valid and row[-1] in vocab.eos_ids
    torch.manual_seed(0)
    samples = hf_greedy(
        tiny, prompts, processor, vocab, 6, do_sample=True, num_return_sequences=5, temperature=2.0
    )
    assert len(samples) == 10
    for row in samples:
        assert tuple(without_eos(row, vocab)) in valid
    assert len({tuple(r) for r in samples}) > 1  # the rows really were sampled independently


def test_logits_processor_refuses_mismatched_batches_and_widths(vocab):
    from constrain.hf import ConstrainedLogitsProcessor

    processor = ConstrainedLogitsProcessor([None, None], vocab)
    with pytest.raises(ConstraintError, match="not a multiple"):
        processor(torch.zeros((3, 4), dtype=torch.long), torch.zeros((3, vocab.vocab_size)))
    with pytest.raises(VocabularyError, match="columns"):
        processor(torch.zeros((2, 4), dtype=torch.long), torch.zeros((2, vocab.vocab_size + 1)))
    with pytest.raises(ConstraintError, match="expected a Constraint"):
        ConstrainedLogitsProcessor("not a constraint", vocab)


# -- CUDA (run where a GPU is present; skipped elsewhere) ------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_greedy_follows_masked_argmax_with_pinned_mask_copies(tok, vocab):
    """On CUDA (mask filled in pinned memory, copied on a side stream): each row is the masked argmax path,
    and overlap on/off give the same tokens."""
    rx = regex_module()
    model = tiny_llama(len(tok)).to("cuda")
    prompts = [[5, 6, 7], encoded(tok, "a longer prompt with more words"), [9, 10]]
    seqs = [[10, 11, 12], [10, 13], [14, 15, 16, 17]]
    pattern = r"[a-z]{2,6}-\d{2}"

    def constraints():
        return [SequencesMatcher(vocab, seqs), rx.regex(pattern).compile(vocab).matcher(), None]

    on = generate(model, tok, prompts, constraints(), max_new_tokens=10, overlap=True)
    off = generate(model, tok, prompts, constraints(), max_new_tokens=10, overlap=False)
    assert on == off
    assert re.fullmatch(pattern, on[1].text) or on[1].finish_reason == "length"
    fresh = [lambda: SequencesMatcher(vocab, seqs), rx.regex(pattern).compile(vocab).matcher, lambda: None]
    for prompt, g, f in zip(prompts, on, fresh, strict=True):
        assert_masked_argmax_path(model, prompt, g, f, vocab)


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_is_reproducible_and_overlap_independent(tok, vocab):
    model = tiny_llama(len(tok)).to("cuda")
    seqs = [[10, 11, 12], [10, 13], [14, 15, 16, 17], [14, 18]]

    def run(overlap: bool):
        constraints = [SequencesMatcher(vocab, seqs), None, SequencesMatcher(vocab, seqs), None]
        return generate(
            model,
            tok,
            [[5], [6, 7], [8], [9]],
            constraints,
            max_new_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=3,
            overlap=overlap,
        )

    on = run(True)
    assert on == run(False) == run(True)
    for g in (on[0], on[2]):
        assert tuple(without_eos(g.token_ids, vocab)) in {tuple(s) for s in seqs}


# -- best-of-N and beam search through generate() ------------------------------------------------------------
def test_generate_with_n_returns_n_branches_that_each_match_the_regex(smollm2):
    from constrain.branching import BestOfN

    model, tok = smollm2
    pattern = r"\d{4}-\d{2}-\d{2}"
    (result,) = generate(
        model,
        tok,
        "When did the Berlin Wall fall?",
        regex(pattern),
        n=3,
        temperature=0.8,
        seed=1,
        # \d also matches non-ASCII digits (about a quarter of SmolLM2's sampled first tokens here), up to 4
        # byte tokens each: 8 x 4 + 2 hyphens = 34 tokens always complete the date, whatever the noise.
        max_new_tokens=40,
    )
    assert isinstance(result, BestOfN) and len(result.branches) == 3
    assert all(re.fullmatch(pattern, b.text) for b in result.branches)
    assert result.best.score == max(b.score for b in result.branches)


def test_generate_with_num_beams_returns_beams_best_first(smollm2):
    model, tok = smollm2
    (result,) = generate(
        model,
        tok,
        "Is 'I loved it' positive or negative?",
        choice(["positive", "negative"]),
        num_beams=2,
        max_new_tokens=4,
    )
    assert {b.text for b in result.beams} == {"positive", "negative"}
    assert result.beams[0].score >= result.beams[1].score


def test_generate_refuses_n_and_num_beams_together(smollm2):
    model, tok = smollm2
    with pytest.raises(ConstraintError, match="not both"):
        generate(model, tok, "hi", n=2, num_beams=2)


# -- jump-forward --------------------------------------------------------------------------------------------


def brute_force_greedy_jump_forward(model, prompt: list[int], matcher, vocab, max_new: int) -> list[int]:
    """Greedy masked argmax with full forwards, appending `matcher.forced_tokens()` after each token."""
    tokens: list[int] = []
    while len(tokens) < max_new:
        allowed = matcher.allowed_tokens()
        if set(allowed.tolist()) <= vocab.eos_ids:
            break  # generate ends the row as constraint_complete without sampling EOS
        logits = full_logits(model, prompt + tokens)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        token = int(masked.argmax())
        tokens.append(token)
        assert matcher.accept(token)
        if token in vocab.eos_ids:
            break
        for forced in matcher.forced_tokens()[: max_new - len(tokens)]:
            assert matcher.accept(forced)
            tokens.append(forced)
    return tokens


def test_jump_forward_appends_forced_tokens_in_one_forward_and_equals_the_brute_force(tiny, tok, vocab):
    """A batch of JSON-schema rows of different prompt lengths plus an unconstrained row: with jump-forward,
    each constrained row equals greedy masked argmax with the forced tokens appended (full forwards, no
    padding), uses fewer forwards than tokens, and the forced tokens carry log-probability 0."""
    from constrain.grammars.json_schema import json_schema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 6}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    constraint = json_schema(schema, whitespace="compact").compile(vocab)
    prompts = [encoded(tok, "Some JSON:"), encoded(tok, "A much longer prompt, then some JSON please:"), [7]]
    counting = BiasedLM(tiny, torch.zeros(vocab.vocab_size))
    gens = generate(counting, tok, prompts, [constraint, constraint, None], max_new_tokens=24, vocab=vocab)
    for prompt, g in zip(prompts[:2], gens[:2], strict=True):
        expected = brute_force_greedy_jump_forward(tiny, prompt, constraint.matcher(), vocab, 24)
        assert g.token_ids == expected
        assert g.text.startswith('{"name":"')
        assert 0.0 in g.logprobs
    assert_masked_argmax_path(tiny, prompts[2], gens[2], lambda: None, vocab)
    counting.calls = 0
    [alone] = generate(counting, tok, prompts[:1], constraint, max_new_tokens=24, vocab=vocab)
    assert alone.token_ids == gens[0].token_ids
    assert counting.calls < len(alone.token_ids)  # forced tokens cost no forward of their own
    [plain] = generate(tiny, tok, prompts[:1], constraint, max_new_tokens=24, vocab=vocab, jump_forward=False)
    assert plain.text.startswith('{"')
