"""The shared-prefix KV cache: cascade attention against plain attention, the transformers Cache against a
full forward (Llama, Qwen2, Qwen3, GPT-2), branch reordering and promotion, the prefix store, the fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constrain.errors import ConstraintError
from constrain.kernels.prefix_attention import (
    KVLevel,
    attention_with_lse,
    cascade_attention,
    merge_attention_states,
    reference_attention,
    reference_level_attention,
)
from constrain.kvcache import (
    ATTENTION_NAME,
    CopiedKV,
    KVSegment,
    PrefixStore,
    SharedKV,
    SharedPrefixFallbackWarning,
    SharedPrefixUnsupportedError,
    open_branches,
    shared_prefix_support,
)

VOCAB = 300
FAMILIES = ("llama", "qwen2", "qwen3", "gpt2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(family: str, seed: int = 0, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A seeded random model of the family, with weights large enough that its distributions are peaked."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0, initializer_range=0.2
    )
    if family == "llama":
        config = tf.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=256,
            **common,
        )
        cls = tf.Qwen3ForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(config).eval()


def full_logits(model: torch.nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """Logits of every position of equal-length token rows by one uncached forward (the plain path)."""
    with torch.inference_mode():
        return model(torch.tensor(rows), use_cache=False).logits.float()


# -- cascade attention ---------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    branches=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    dim=st.sampled_from([8, 16]),
    prefix=st.integers(0, 40),
    middle=st.integers(0, 6),
    own=st.integers(1, 9),
    new=st.integers(1, 3),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cascade_attention_equals_attention_over_the_concatenated_kv(
    branches, kv_heads, group, dim, prefix, middle, own, new, fused, seed
):
    """For any GQA shape, a shared prefix (1 row), a level shared by subsets of branches (row map) and each
    branch's own causal level give the same output as plain causal attention over each branch's full KV."""
    new = min(new, own)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    q = rand(branches, kv_heads * group, new, dim)
    kp, vp = rand(1, kv_heads, prefix, dim), rand(1, kv_heads, prefix, dim)
    km, vm = rand(2, kv_heads, middle, dim), rand(2, kv_heads, middle, dim)
    rows = torch.randint(0, 2, (branches,), generator=gen)
    ko, vo = rand(branches, kv_heads, own, dim), rand(branches, kv_heads, own, dim)
    levels = [KVLevel(kp, vp), KVLevel(km, vm, rows=rows), KVLevel(ko, vo, causal=True)]
    out = cascade_attention(q, levels, dim**-0.5, fused=fused)
    keys = torch.cat([kp.expand(branches, -1, -1, -1), km[rows], ko], dim=2)
    values = torch.cat([vp.expand(branches, -1, -1, -1), vm[rows], vo], dim=2)
    expected = reference_attention(q, keys, values, dim**-0.5, causal=True)
    assert out.shape == q.shape
    torch.testing.assert_close(out.float(), expected, atol=2e-5, rtol=2e-5)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(2, 50), split=st.data(), queries=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_merging_two_key_blocks_by_log_sum_exp_is_exact(length, split, queries, seed):
    """Attention over keys [0, s) and [s, L) merged by their log-sum-exp equals attention over [0, L), and the
    merged log-sum-exp equals the full one."""
    s = split.draw(st.integers(1, length - 1))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (queries, length, length))
    full_out, full_lse = reference_level_attention(q, k, v, 0.3)
    parts = [reference_level_attention(q, k[:, :, a:b], v[:, :, a:b], 0.3) for a, b in ((0, s), (s, length))]
    out, lse = merge_attention_states(parts)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_fused_kernels_return_the_reference_log_sum_exp():
    """The fused (flash) path and the explicit-softmax reference agree on output and log-sum-exp."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 16, generator=gen), torch.randn(2, 4, 9, 16, generator=gen), None
    v = torch.randn(2, 4, 9, 16, generator=gen)
    out_f, lse_f = attention_with_lse(q, k, v, 0.25, fused=True)
    out_r, lse_r = attention_with_lse(q, k, v, 0.25, fused=False)
    torch.testing.assert_close(out_f.float(), out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f, lse_r, atol=1e-5, rtol=1e-5)
    causal_q = torch.randn(1, 4, 9, 16, generator=gen)
    out_f, lse_f = attention_with_lse(causal_q, k[:1], v[:1], 0.25, causal=True, fused=True)
    out_r, lse_r = attention_with_lse(causal_q, k[:1], v[:1], 0.25, causal=True, fused=False)
    torch.testing.assert_close(out_f.float(), out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_f, lse_r, atol=1e-5, rtol=1e-5)


def test_queries_that_see_no_key_get_zeros_and_minus_infinity():
    empty = torch.empty(1, 1, 0, 4)
    out, lse = reference_level_attention(torch.randn(1, 1, 2, 4), empty, empty, 1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    merged, total = merge_attention_states([(out, lse), (out, lse)])
    assert torch.equal(merged, torch.zeros_like(merged)) and torch.isneginf(total).all()


# -- the cache against a full forward ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_cache_logits_equal_a_full_forward_of_every_branch(family):
    """Prefill once, fork 3 branches, feed each its own tokens: every step's logits equal those of an uncached
    forward over that branch's whole sequence (fp32 tolerance), for the copied (plain) path, the shared cache,
    and the shared cache's fixed-buffer (CUDA-graph) step, which runs out of room after 4 steps and goes on
    growing its buffers."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, VOCAB, (17,), generator=gen).tolist()
    fed = torch.randint(3, VOCAB, (3, 6), generator=gen)
    expected = full_logits(model, [prompt + row for row in fed.tolist()])
    for kv in (SharedKV(model, capacity=4), SharedKV(model, capacity=4, cuda_graph=True), CopiedKV(model)):
        with torch.inference_mode():
            first = kv.prefill(prompt)
            kv.fork(3)
            steps = [kv.step(fed[:, t]) for t in range(fed.shape[1])]
        torch.testing.assert_close(first[0].float(), expected[0, len(prompt) - 1], atol=1e-5, rtol=1e-5)
        for t, logits in enumerate(steps):
            torch.testing.assert_close(logits.float(), expected[:, len(prompt) + t], atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation != ATTENTION_NAME  # restored after every forward


@pytest.mark.parametrize("static", [False, True])
def test_reorder_copies_branch_rows_only_and_keeps_logits_exact(static):
    """Beam-style reordering (branches duplicated and permuted, then dropped and added) leaves the prompt's
    KV tensors untouched and every later step's logits equal a full forward of the reordered histories; the
    fixed-buffer step reorders in place while the number of branches stays, then leaves that mode."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(3, VOCAB, (9,), generator=gen).tolist()
    kv = SharedKV(model, capacity=8, cuda_graph=static)
    histories = [[] for _ in range(4)]
    with torch.inference_mode():
        kv.prefill(prompt)
        kv.fork(4)
        prefix_ptrs = [k.data_ptr() for k in kv.cache.segments[0].keys]
        for step, parents in enumerate([None, [0, 0, 2, 3], [3, 1, 1, 0], [2, 2], [1, 0, 1]]):
            if parents is not None:
                kv.reorder(torch.tensor(parents))
                histories = [list(histories[p]) for p in parents]
            feed = torch.randint(3, VOCAB, (len(histories),), generator=gen)
            for h, t in zip(histories, feed.tolist(), strict=True):
                h.append(t)
            logits = kv.step(feed)
            assert kv.cache.static == (static and step < 3)
            expected = full_logits(model, [prompt + h for h in histories])[:, -1]
            torch.testing.assert_close(logits.float(), expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert [k.data_ptr() for k in kv.cache.segments[0].keys] == prefix_ptrs
    assert kv.cache.batch == 3 and kv.cache.own_length == 5


def test_kv_memory_is_the_prompt_once_plus_each_branch_suffix():
    """KV bytes: shared = P positions once, per-branch = N * S; the copied path holds N * (P + S)."""
    model = tiny_model("llama")
    prompt, n, steps = list(range(3, 43)), 5, 7
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (K, V) * kv heads * head dim * fp32 bytes
    results = {}
    for kv in (SharedKV(model, capacity=steps), CopiedKV(model)):
        with torch.inference_mode():
            kv.prefill(prompt)
            kv.fork(n)
            for t in range(steps):
                kv.step(torch.full((n,), 5 + t))
        results[kv.shared] = kv.memory()
    shared, copied = results[True], results[False]
    assert shared.shared_bytes == len(prompt) * per_token
    assert shared.branch_bytes == n * steps * per_token
    assert shared.allocated_bytes == shared.used_bytes  # capacity = steps: nothing preallocated in vain
    assert copied.used_bytes == n * (len(prompt) + steps) * per_token
    expected_ratio = (len(prompt) + n * steps) / (n * (len(prompt) + steps))
    assert shared.used_bytes / copied.used_bytes == pytest.approx(expected_ratio)


def test_promoting_tokens_every_branch_shares_keeps_logits_exact():
    """Moving the branches' common generated tokens into a shared level frees their copies and changes no
    logit: the beam tree's shared level is read like the prompt's."""
    model = tiny_model("qwen3")
    prompt = list(range(10, 30))
    kv = SharedKV(model)
    common, tails = [7, 8, 9], [[4, 5], [6, 4], [5, 5]]
    with torch.inference_mode():
        kv.prefill(prompt)
        kv.fork(3)
        for t in common:
            kv.step(torch.full((3,), t))
        before = kv.memory()
        kv.promote(len(common))
        after = kv.memory()
        outs = [kv.step(torch.tensor([tail[i] for tail in tails])) for i in range(2)]
    assert kv.cache.own_length == 2 and len(kv.cache.segments) == 2
    assert after.branch_bytes < before.branch_bytes and after.shared_bytes > before.shared_bytes
    expected = full_logits(model, [prompt + common + tail for tail in tails])
    for i, logits in enumerate(outs):
        torch.testing.assert_close(logits, expected[:, len(prompt) + len(common) + i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConstraintError, match="promote"):
        kv.promote(5)


# -- prefix store --------------------------------------------------------------------------------------------
def token_segment(tokens: list[int], start: int) -> KVSegment:
    """A fake one-layer segment whose positions hold (token, absolute position): what a match returns."""
    data = torch.tensor([[t, start + i] for i, t in enumerate(tokens)], dtype=torch.float32).view(1, 1, -1, 2)
    return KVSegment([data.clone()], [data.clone()])


def joined(segments: list[KVSegment]) -> list[list[int]]:
    if not segments:
        return []
    return torch.cat([s.keys[0] for s in segments], dim=2)[0, 0].long().tolist()


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=8),
    probe=st.lists(st.integers(0, 3), max_size=10),
)
def test_store_match_returns_the_longest_stored_prefix_with_its_kv(prompts, probe):
    """After inserting prompts (no eviction), matching any token list returns exactly its longest common
    prefix with an inserted prompt, and the KV positions returned hold those tokens at those positions."""
    owner = object.__new__(torch.nn.Module)  # any weak-referenceable object stands for the model
    store = PrefixStore(max_bytes=1 << 30)
    for tokens in prompts:
        segments, have = store.match(owner, tokens)
        assert joined(segments) == [[t, i] for i, t in enumerate(tokens[:have])]
        store.insert(owner, tokens, token_segment(tokens[have:], have), have)
    for tokens in [probe, *prompts]:
        segments, have = store.match(owner, tokens)
        best = max(_lcp(tokens, p) for p in prompts)
        assert have == best
        assert joined(segments) == [[t, i] for i, t in enumerate(tokens[:have])]


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_store_evicts_least_recently_used_prefixes_beyond_its_bound():
    owner = object.__new__(torch.nn.Module)
    per_token = token_segment([1], 0).nbytes
    store = PrefixStore(max_bytes=12 * per_token)  # room for three 4-token prompts
    for first in (1, 2, 3):
        tokens = [first] * 4
        store.insert(owner, tokens, token_segment(tokens, 0), 0)
    store.match(owner, [1, 1, 1, 1])  # touch prompt 1: prompt 2 is now the least recently used
    store.insert(owner, [4] * 4, token_segment([4] * 4, 0), 0)
    assert store.nbytes == 12 * per_token
    assert store.match(owner, [2] * 4)[1] == 0
    assert [store.match(owner, [t] * 4)[1] for t in (1, 3, 4)] == [4, 4, 4]
    with pytest.raises(ConstraintError, match="another model"):
        store.match(object.__new__(torch.nn.Module), [1])


def test_a_stored_system_prompt_is_not_prefilled_again():
    """Two requests that share a system prompt: the second runs only its own tail through the model, and its
    logits equal a fresh full computation."""
    model = tiny_model("gpt2")
    store = PrefixStore()
    system = list(range(20, 60))
    first, second = system + [7, 8, 9], system + [11, 12]
    calls: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with torch.inference_mode():
            SharedKV(model, store=store).prefill(first)
            kv = SharedKV(model, store=store)
            logits = kv.prefill(second)
    finally:
        hook.remove()
    assert calls == [len(first), len(second) - len(system)]
    assert kv.reused_tokens == len(system)
    torch.testing.assert_close(logits[0], full_logits(model, [second])[0, -1], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # the very same prompt again: all but its last token come from the store
        again = SharedKV(model, store=store)
        again.prefill(first)
    assert again.reused_tokens == len(first) - 1


# -- support and fallback ------------------------------------------------------------------------------------
def tiny_bloom() -> torch.nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()


def test_unsupported_attention_falls_back_to_copied_kv_with_a_warning():
    model = tiny_bloom()
    assert "bloom" in shared_prefix_support(model)
    with pytest.warns(SharedPrefixFallbackWarning, match="not used"):
        kv = open_branches(model)
    assert isinstance(kv, CopiedKV)
    with pytest.raises(SharedPrefixUnsupportedError, match="share_prefix=True"):
        open_branches(model, share_prefix=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(open_branches(model, share_prefix=False), CopiedKV)


def test_sliding_window_models_are_not_shared():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    reason = shared_prefix_support(Qwen2ForCausalLM(config).eval())
    assert reason is not None and "sliding" in reason


def test_plain_forwards_are_unaffected_by_the_registered_attention():
    """Our attention function without an attached cache is SDPA: a padded batch gives transformers' logits."""
    model = tiny_model("llama")
    with torch.inference_mode():
        SharedKV(model).prefill([5, 6, 7])  # registers the function
        ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 5, 6, 7]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        expected = model(ids, attention_mask=mask).logits
        model.config._attn_implementation = ATTENTION_NAME
        try:
            got = model(ids, attention_mask=mask).logits
        finally:
            model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(got, expected)
