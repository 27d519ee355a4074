"""Token trie over a fact base: exact masks against a set-of-facts oracle; no_repeat; storage; errors."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import BitmaskError, ConstraintError, IndexFormatError, TokenOutOfRangeError, Vocabulary
from constrain.bitmask import allowed_ids, bitmask_words
from constrain.constraint import fill_bitmasks
from constrain.index import storage
from constrain.index.storage import FileSetWriter
from constrain.index.trie import (
    ROOT,
    CompiledTrie,
    TokenBatch,
    TrieIndex,
    TrieStore,
    build_trie,
    set_token_bits,
    trie_constraint,
)

# -- a tiny vocabulary: ids 0..23 ordinary, 24 EOS (special), 25 another special, 26..39 padding ----------
N_ORDINARY = 24
EOS = 24
OTHER_SPECIAL = 25
VOCAB = Vocabulary(
    [bytes([97 + i]) for i in range(N_ORDINARY)] + [b"<eos>", b"<sep>"],
    vocab_size=40,
    special_ids=[EOS, OTHER_SPECIAL],
    eos_ids=[EOS],
    name="tiny",
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Small alphabets give deep shared prefixes (facts that are prefixes of others, long compressed labels).
token = st.integers(0, 3) | st.integers(0, N_ORDINARY - 1)
fact = st.lists(token, min_size=1, max_size=7).map(tuple)
fact_sets = st.lists(fact, min_size=1, max_size=25)


# -- the oracle: a plain set of facts --------------------------------------------------------------------
def oracle_allowed(
    facts: set[tuple[int, ...]], prefix: tuple[int, ...], done: frozenset = frozenset()
) -> set[int]:
    """Tokens that continue `prefix` towards a fact not in `done`, plus EOS if `prefix` is such a fact."""
    n = len(prefix)
    live = [f for f in facts if f not in done and f[:n] == prefix]
    allowed = {f[n] for f in live if len(f) > n}
    if prefix in live:
        allowed.add(EOS)
    return allowed


def allowed(matcher) -> set[int]:
    return {int(t) for t in matcher.allowed_tokens()}


def build(facts, **kwargs) -> TrieIndex:
    return build_trie([list(f) for f in facts], None, vocab=VOCAB, progress=False, **kwargs)


# -- exact masks -------------------------------------------------------------------------------------------
@SETTINGS
@given(fact_sets)
def test_every_fact_is_accepted_with_exact_masks_and_eos_at_its_end(facts):
    """Completeness (and exactness): along every fact of the base, each step's mask equals the oracle's set of
    continuations, the fact's next token is allowed and accepted, and EOS is allowed at its end."""
    base = set(facts)
    compiled = trie_constraint(build(facts)).compile(VOCAB)
    for f in base:
        m = compiled.matcher()
        for i, t in enumerate(f):
            assert allowed(m) == oracle_allowed(base, f[:i])
            assert m.accept(t)
        assert allowed(m) == oracle_allowed(base, f) and EOS in allowed(m)
        assert m.is_accepting()
        assert m.accept(EOS) and m.is_terminated()
        assert allowed(m) == {EOS}


@SETTINGS
@given(fact_sets, st.data())
def test_random_walks_over_allowed_tokens_only_spell_facts(facts, data):
    """Soundness: a walk that picks any allowed token at each step ends (at EOS) on a fact of the base, and
    never meets a mask with special or padding ids, or an empty mask before EOS."""
    base = set(facts)
    m = trie_constraint(build(facts)).compile(VOCAB).matcher()
    walked: list[int] = []
    while True:
        options = sorted(allowed(m))
        assert options, "a walk reached a dead end"
        assert all(t < N_ORDINARY or t == EOS for t in options)
        t = data.draw(st.sampled_from(options))
        assert m.accept(t)
        if t == EOS:
            break
        walked.append(t)
    assert tuple(walked) in base


@SETTINGS
@given(fact_sets, st.lists(token, max_size=8))
def test_tokens_off_the_trie_are_rejected_and_leave_the_state(facts, probe):
    """accept() returns True exactly for the oracle's allowed tokens; a rejected token changes nothing."""
    base = set(facts)
    m = trie_constraint(build(facts)).compile(VOCAB).matcher()
    prefix: tuple[int, ...] = ()
    for t in probe:
        ok = t in oracle_allowed(base, prefix)
        assert m.accept(t) == ok
        if ok:
            prefix += (t,)
        assert allowed(m) == oracle_allowed(base, prefix)


@SETTINGS
@given(fact_sets)
def test_store_protocol_matches_the_oracle(facts):
    """children / leaf_count / is_terminal / child describe exactly the set of facts' prefixes."""
    base = set(facts)
    index = build(facts)
    prefixes = {f[:i] for f in base for i in range(len(f) + 1)}
    for prefix in prefixes:
        node = ROOT
        for t in prefix:
            node = index.child(node, t)
        tokens, nodes = index.children(node)
        assert list(tokens) == sorted(oracle_allowed(base, prefix) - {EOS})
        assert all(index.child(node, int(t)) == int(n) for t, n in zip(tokens, nodes, strict=True))
        assert index.leaf_count(node) == sum(1 for f in base if f[: len(prefix)] == prefix)
        assert index.is_terminal(node) == (prefix in base)
    assert sorted(index.facts()) == sorted(base)
    assert all(f in index for f in base)
    assert index.n_facts == len(base)


# -- a second store implementation, as a PostgreSQL backend would be ---------------------------------------
class DictStore(TrieStore):
    """An uncompressed trie in Python dicts, implementing only the abstract part of the protocol."""

    def __init__(self, facts):
        self.kids: list[dict[int, int]] = [{}]
        self.count = [0]
        self.term = [False]
        for f in set(facts):
            node = 0
            self.count[0] += 1
            for t in f:
                if t not in self.kids[node]:
                    self.kids[node][t] = len(self.kids)
                    self.kids.append({})
                    self.count.append(0)
                    self.term.append(False)
                node = self.kids[node][t]
                self.count[node] += 1
            self.term[node] = True
        self.tokens = sorted({t for f in facts for t in f})

    n_facts = property(lambda self: self.count[0])
    store_id = property(lambda self: "dict")

    def children(self, node):
        items = sorted(self.kids[node].items())
        return np.array([t for t, _ in items], dtype=np.int32), np.array(
            [n for _, n in items], dtype=np.int64
        )

    def leaf_count(self, node):
        return self.count[node]

    def is_terminal(self, node):
        return self.term[node]

    def distinct_tokens(self):
        return np.array(self.tokens, dtype=np.int64)


@SETTINGS
@given(fact_sets, st.data(), st.booleans())
def test_any_trie_store_drives_the_same_matcher(facts, data, no_repeat):
    """A matcher over a generic TrieStore (dict-based) writes the same masks as over the array trie."""
    fast = trie_constraint(build(facts), no_repeat=no_repeat).compile(VOCAB).matcher()
    slow = trie_constraint(DictStore(facts), no_repeat=no_repeat).compile(VOCAB).matcher()
    for _ in range(30):
        options = sorted(allowed(fast))
        assert options == sorted(allowed(slow))
        if not options:
            break
        t = data.draw(st.sampled_from(options))
        if t == EOS and data.draw(st.booleans()):
            fast.end_fact()
            slow.end_fact()
            continue
        assert fast.accept(t) and slow.accept(t)
        if t == EOS:
            break


@SETTINGS
@given(fact_sets, st.data(), st.booleans())
def test_precomputed_rows_of_wide_nodes_give_the_same_masks(facts, data, no_repeat):
    """With every branching node's row precomputed (threshold 1), masks equal those set bit by bit."""
    from constrain.index import trie

    index = build(facts)
    plain = trie.CompiledTrie(index, VOCAB, no_repeat=no_repeat)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trie, "WIDE_FANOUT", 1)
        cached = trie.CompiledTrie(index, VOCAB, no_repeat=no_repeat)
    assert len(cached.wide) == min(trie.MAX_WIDE_ROWS, int((np.diff(index.arrays.child_start) >= 1).sum()))
    assert not plain.wide
    a, b = plain.matcher(), cached.matcher()
    for _ in range(30):
        options = sorted(allowed(a))
        assert options == sorted(allowed(b))
        if not options:
            break
        t = data.draw(st.sampled_from(options))
        if t == EOS:
            a.end_fact()
            b.end_fact()
        else:
            assert a.accept(t) and b.accept(t)


def test_a_wide_root_over_a_real_vocabulary_has_exact_masks():
    """5,000 short facts over Llama-3 ids: the root's precomputed row is exactly their first tokens."""
    from constrain.assets import load_vocabulary

    vocab = load_vocabulary("llama3")
    rng = np.random.default_rng(0)
    ordinary = vocab.ordinary_ids
    facts = {tuple(int(t) for t in rng.choice(ordinary, size=int(rng.integers(1, 4)))) for _ in range(5000)}
    index = build_trie([list(f) for f in facts], None, vocab=vocab, progress=False)
    compiled = trie_constraint(index).compile(vocab)
    assert ROOT in compiled.wide
    m = compiled.matcher()
    assert set(m.allowed_tokens().tolist()) == {f[0] for f in facts}
    f = max(facts, key=len)
    assert m.accepts(f) and m.accept(f[0])
    assert set(m.allowed_tokens().tolist()) == {g[1] for g in facts if g[0] == f[0] and len(g) > 1} | (
        set(vocab.eos_ids) if (f[0],) in facts else set()
    )


# -- no_repeat -------------------------------------------------------------------------------------------
@SETTINGS
@given(fact_sets, st.data())
def test_no_repeat_masks_subtract_the_facts_already_written(facts, data):
    """no_repeat: after each end_fact(), masks equal the oracle over the facts not yet written; no fact is
    written twice, and once all are written nothing is allowed at the root."""
    base = set(facts)
    m = trie_constraint(build(facts), no_repeat=True).compile(VOCAB).matcher()
    done: list[tuple[int, ...]] = []
    prefix: tuple[int, ...] = ()
    for _ in range(200):
        expected = oracle_allowed(base, prefix, frozenset(done))
        assert allowed(m) == expected
        if not expected:
            break
        t = data.draw(st.sampled_from(sorted(expected)))
        if t == EOS:
            m.end_fact()
            assert prefix not in done
            done.append(prefix)
            prefix = ()
        else:
            assert m.accept(t)
            prefix += (t,)
    assert m.completed_facts() == done
    assert len(set(done)) == len(done) and set(done) <= base
    if set(done) == base:
        assert allowed(m) == set()


def test_without_no_repeat_a_fact_can_be_written_again():
    m = trie_constraint(build([(1, 2), (1, 3)])).compile(VOCAB).matcher()
    for _ in range(2):
        assert m.accept(1) and m.accept(2)
        m.end_fact()
    assert allowed(m) == {1}
    assert m.completed_facts() == [(1, 2), (1, 2)]


def test_no_repeat_blocks_a_shared_prefix_only_when_everything_below_is_written():
    m = trie_constraint(build([(1, 2), (1, 3), (4,)]), no_repeat=True).compile(VOCAB).matcher()
    assert m.accept(1) and m.accept(2)
    m.end_fact()
    assert allowed(m) == {1, 4}  # (1, 3) is still left below 1
    assert m.accept(1) and allowed(m) == {3}
    assert not m.accept(2)
    assert m.accept(3)
    m.end_fact()
    assert allowed(m) == {4}
    assert m.accept(4) and allowed(m) == {EOS}


@SETTINGS
@given(fact_sets, st.data())
def test_rollback_and_fork_restore_the_state_of_a_replay(facts, data):
    """After any mix of accept / end_fact / rollback (no_repeat on), the mask equals that of a fresh matcher
    replaying the surviving operations; a fork taken earlier is unaffected by later changes."""
    compiled = trie_constraint(build(facts), no_repeat=True).compile(VOCAB)
    m = compiled.matcher()
    ops: list[tuple[str, int]] = []  # ("t", token) or ("end", 0); an end belongs to the token before it
    for _ in range(25):
        options = sorted(allowed(m))
        action = data.draw(st.sampled_from(["accept", "accept", "rollback", "fork"]))
        n_tokens = sum(1 for op in ops if op[0] == "t")
        if action == "rollback" and n_tokens:
            n = data.draw(st.integers(1, n_tokens))
            m.rollback(n)
            while n:  # drop the last n tokens and the end_fact() calls made after the first of them
                if ops.pop()[0] == "t":
                    n -= 1
        elif action == "fork":
            before = allowed(m)
            twin = m.fork()
            if options and options != [EOS]:
                t = next(t for t in options if t != EOS)
                assert twin.accept(t)
            assert allowed(m) == before
        elif options:
            t = data.draw(st.sampled_from(options))
            if t == EOS:
                m.end_fact()
                ops.append(("end", 0))
            else:
                assert m.accept(t)
                ops.append(("t", t))
        replay = compiled.matcher()
        for kind, t in ops:
            if kind == "t":
                assert replay.accept(t)
            else:
                replay.end_fact()
        assert allowed(m) == allowed(replay)
        assert m.completed_facts() == replay.completed_facts()


# -- matcher API and errors ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_index() -> TrieIndex:
    return build([(1, 2, 3), (1, 2), (4,), (4, 5, 6, 7)])


def test_out_of_range_ids_raise_and_padding_or_special_ids_are_rejected(small_index):
    m = trie_constraint(small_index).compile(VOCAB).matcher()
    for bad in (-1, 40, 10**9):
        with pytest.raises(TokenOutOfRangeError):
            m.accept(bad)
    assert not m.accept(30)  # padding
    assert not m.accept(OTHER_SPECIAL)
    assert not m.accept(EOS)  # nothing written yet
    assert m.node == ROOT


def test_rollback_past_the_start_and_end_fact_mid_fact_raise(small_index):
    m = trie_constraint(small_index).compile(VOCAB).matcher()
    assert m.accept(1)
    with pytest.raises(ConstraintError, match="roll back 2"):
        m.rollback(2)
    with pytest.raises(ConstraintError, match="end_fact"):
        m.end_fact()
    m.rollback(1)
    assert m.node == ROOT


def test_fill_writes_only_its_row_in_numpy_and_torch_bitmasks(small_index):
    compiled = trie_constraint(small_index).compile(VOCAB)
    matchers = [compiled.matcher() for _ in range(3)]
    matchers[1].accept(4)
    matchers[2].accept(1)
    matchers[2].accept(2)
    words = bitmask_words(VOCAB.vocab_size)
    as_numpy = np.full((4, words), -1, dtype=np.int32)
    as_torch = torch.full((4, words), -1, dtype=torch.int32)
    for i, m in enumerate(matchers):
        m.fill_bitmask(as_numpy, i)
        m.fill_bitmask(as_torch, i)
        m.fill_bitmask(as_torch, i)  # the cached torch view is reused
    assert np.array_equal(as_numpy, as_torch.numpy())
    assert [list(allowed_ids(as_numpy[i], 40)) for i in range(3)] == [[1, 4], [5, EOS], [3, EOS]]
    assert (as_numpy[3] == -1).all()
    batch = torch.zeros((3, words), dtype=torch.int32)
    fill_bitmasks(matchers, batch, VOCAB)
    assert np.array_equal(batch.numpy(), as_numpy[:3])
    with pytest.raises(BitmaskError):
        matchers[0].fill_bitmask(np.zeros((1, words + 1), dtype=np.int32), 0)
    with pytest.raises(BitmaskError):
        matchers[0].fill_bitmask(np.zeros((1, words), dtype=np.int64), 0)
    with pytest.raises(BitmaskError):
        matchers[0].fill_bitmask(torch.zeros((2, words), dtype=torch.int32), 5)


def test_set_token_bits_matches_allowed_ids():
    rng = np.random.default_rng(0)
    tokens = np.unique(rng.integers(0, 1000, 200)).astype(np.int32)
    words = np.zeros(bitmask_words(1000), dtype=np.int32)
    set_token_bits(words, tokens)
    assert np.array_equal(allowed_ids(words, 1000), tokens)


def test_compile_rejects_indexes_with_special_padding_or_foreign_ids():
    raw = build_trie([[1, 2], [EOS, 3]], None, progress=False)  # no vocab given at build
    with pytest.raises(ConstraintError, match="special, EOS or padding"):
        trie_constraint(raw).compile(VOCAB)
    raw = build_trie([[1, 2], [30]], None, progress=False)
    with pytest.raises(ConstraintError, match="special, EOS or padding"):
        trie_constraint(raw).compile(VOCAB)
    other = Vocabulary(
        [bytes([65 + i]) for i in range(N_ORDINARY)] + [b"<eos>", b"<sep>"],
        vocab_size=40,
        special_ids=[EOS, OTHER_SPECIAL],
        eos_ids=[EOS],
        name="other",
    )
    with pytest.raises(ConstraintError, match="built for vocabulary 'tiny'"):
        trie_constraint(build([(1, 2)])).compile(other)


def test_build_rejects_empty_input_empty_facts_and_bad_ids(tmp_path):
    with pytest.raises(ConstraintError, match="empty"):
        build_trie([], tmp_path / "a", progress=False)
    with pytest.raises(ConstraintError, match="fact #2: empty"):
        build_trie([[1], [2], []], tmp_path / "b", progress=False)
    with pytest.raises(ConstraintError, match="fact #1: token id 99"):
        build_trie([[1], [2, 99]], tmp_path / "c", vocab=VOCAB, progress=False)
    with pytest.raises(ConstraintError, match=f"fact #0: token id {OTHER_SPECIAL}"):
        build_trie([[OTHER_SPECIAL]], tmp_path / "d", vocab=VOCAB, progress=False)
    with pytest.raises(ConstraintError, match="token id -3"):
        build_trie([[-3]], tmp_path / "e", progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written


# -- build: chunks, merge, dedupe -------------------------------------------------------------------------
@SETTINGS
@given(st.lists(fact, min_size=1, max_size=60), st.integers(1, 12))
def test_spilled_and_merged_build_equals_a_single_chunk_build(facts, chunk):
    """External sort: chunks of `chunk` tokens (many runs, duplicates across runs) give the same arrays as
    one in-memory chunk, and both hold each distinct fact once."""
    one = build(facts)
    many = build(facts, chunk_tokens=chunk, chunk_facts=3)
    for name in ("label_start", "labels", "child_start", "leaf_count", "terminal", "tokens_present"):
        assert np.array_equal(getattr(one.arrays, name), getattr(many.arrays, name)), name
    assert sorted(many.facts()) == sorted(set(facts))
    assert many.meta["n_input"] == len(facts) and many.n_facts == len(set(facts))


def test_token_batches_and_plain_sequences_build_the_same_trie():
    facts = [[3, 1], [1, 2, 3], [1, 2], [3, 1]]
    batch = TokenBatch.from_sequences(facts)
    a = build_trie(facts, None, progress=False)
    b = build_trie([batch], None, progress=False)
    assert np.array_equal(a.arrays.labels, b.arrays.labels) and a.n_facts == b.n_facts == 3


def test_the_compressed_layout_is_breadth_first_with_sorted_children(small_index):
    a = small_index.arrays
    # root -> [1 2] (terminal) -> [3] ; root -> [4] (terminal) -> [5 6 7]
    assert list(a.child_start) == [1, 3, 4, 5, 5, 5]
    assert list(a.labels) == [1, 2, 4, 3, 5, 6, 7]
    assert list(a.leaf_count) == [4, 2, 2, 1, 1]
    assert list(a.terminal) == [0, 1, 1, 1, 1]


# -- storage: round trip, corruption, truncation, versions --------------------------------------------------
FACTS = [(1, 2, 3), (1, 2), (4,), (4, 5, 6, 7), (9, 9, 9, 1)]


@pytest.fixture
def saved(tmp_path) -> Path:
    build_trie([list(f) for f in FACTS], tmp_path / "kb", vocab=VOCAB, progress=False)
    return tmp_path / "kb"


def test_save_and_load_round_trip_through_memory_maps(saved):
    loaded = TrieIndex.load(saved)
    assert isinstance(loaded.files.arrays["labels"], np.memmap)
    in_memory = TrieIndex.load(saved, mmap=False)
    assert not isinstance(in_memory.files.arrays["labels"], np.memmap)
    for name in ("label_start", "labels", "child_start", "leaf_count", "terminal"):
        assert np.array_equal(getattr(loaded.arrays, name), getattr(in_memory.arrays, name))
    assert sorted(loaded.facts()) == sorted(FACTS)
    a = trie_constraint(saved).compile(VOCAB).matcher()
    b = trie_constraint(in_memory).compile(VOCAB).matcher()
    for t in (4, 5, 6, 7):
        assert allowed(a) == allowed(b)
        assert a.accept(t) and b.accept(t)
    assert a.is_accepting()
    assert loaded.stats()["facts"] == len(FACTS)


def test_a_flipped_byte_fails_the_checksum(saved):
    file = saved / "labels.npy"
    raw = bytearray(file.read_bytes())
    raw[len(raw) - np.load(file).nbytes] ^= 0x01  # the first data byte
    file.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match=r"labels\.npy: checksum mismatch"):
        TrieIndex.load(saved)  # small index: checksums are verified on load by default
    with pytest.raises(IndexFormatError, match="checksum"):
        TrieIndex.load(saved, verify=True)
    TrieIndex.load(saved, verify=False)  # opt-out: sizes only


def test_a_truncated_file_is_caught_even_without_checksums(saved):
    file = saved / "child_start.npy"
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(IndexFormatError, match=r"child_start\.npy: .* bytes, the header records"):
        TrieIndex.load(saved, verify=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(version=99), "version 99 is not supported"),
        (lambda h: h.update(format="something.else"), "expected 'constrain.trie'"),
        (lambda h: h["arrays"].pop("labels"), r"arrays \['labels'\] missing"),
        (lambda h: h["arrays"]["labels"].update(dtype="<f8"), r"labels\.npy: holds <i4"),
        (lambda h: h["meta"].pop("n_facts"), "meta.n_facts"),
    ],
)
def test_a_wrong_header_is_an_index_format_error(saved, edit, message):
    header = json.loads((saved / "header.json").read_text())
    edit(header)
    (saved / "header.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match=message):
        TrieIndex.load(saved)


def test_missing_or_unreadable_headers_and_folders(saved, tmp_path):
    (saved / "header.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable header"):
        TrieIndex.load(saved)
    (saved / "header.json").unlink()
    with pytest.raises(IndexFormatError, match="header.json: missing"):
        TrieIndex.load(saved)
    with pytest.raises(IndexFormatError, match="no index here"):
        TrieIndex.load(tmp_path / "nowhere")


def test_corrupt_values_in_an_unverified_index_raise_instead_of_crashing(saved):
    """Without checksums, a damaged child range is caught by the kernels' bounds checks."""
    file = saved / "child_start.npy"
    array = np.load(file)
    array[1] = len(array) + 3  # root's children would run past the node array
    np.save(file, array)
    index = TrieIndex.load(saved, verify=False)
    m = trie_constraint(index).compile(VOCAB).matcher()
    with pytest.raises(IndexFormatError, match="corrupt trie"):
        m.fill_bitmask(np.zeros((1, bitmask_words(40)), dtype=np.int32), 0)
    with pytest.raises(IndexFormatError, match="corrupt trie"):
        m.accept(9)
    with pytest.raises(IndexFormatError):
        index.verify()
    array[1] = 10**6  # so wide that compiling precomputes its row, and finds the damage there
    np.save(file, array)
    with pytest.raises(IndexFormatError, match="corrupt trie near node 0"):
        CompiledTrie(TrieIndex.load(saved, verify=False), VOCAB)


def test_a_structurally_bad_trie_with_valid_checksums_fails_verification(tmp_path):
    # Two children of the root in the wrong order: checksums are fine, the structure is not.
    with FileSetWriter(tmp_path / "bad", kind="constrain.trie", version=1) as w:
        w.save("label_start", np.array([0, 0, 1, 2], dtype=np.int32))
        w.save("labels", np.array([5, 3], dtype=np.int32))
        w.save("child_start", np.array([1, 3, 3, 3], dtype=np.int32))
        w.save("leaf_count", np.array([2, 1, 1], dtype=np.int32))
        w.save("terminal", np.array([0, 1, 1], dtype=np.uint8))
        w.save("tokens_present", np.isin(np.arange(6), [3, 5]))
        w.commit({"n_facts": 2, "max_len": 1, "n_tokens": 2})
    with pytest.raises(IndexFormatError, match="not sorted"):
        TrieIndex.load(tmp_path / "bad", verify=True)


# -- atomic build ---------------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_exception_mid_build_leaves_nothing_loadable(tmp_path):
    def facts():
        for i in range(50):
            yield [i % 7, i % 5, 1]
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        build_trie(facts(), tmp_path / "kb", chunk_tokens=20, chunk_facts=5, progress=False)
    assert _leftovers(tmp_path) == []
    with pytest.raises(IndexFormatError):
        TrieIndex.load(tmp_path / "kb")


def test_a_failure_while_writing_leaves_nothing_loadable(tmp_path, monkeypatch):
    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "file_sha256", broken)
    with pytest.raises(OSError, match="disk full"):
        build_trie([[1, 2], [3]], tmp_path / "kb", progress=False)
    assert _leftovers(tmp_path) == []


def test_an_existing_index_is_kept_unless_overwrite(saved):
    before = TrieIndex.load(saved)
    with pytest.raises(ConstraintError, match="already exists"):
        build_trie([[7]], saved, progress=False)
    assert TrieIndex.load(saved).files.build_id == before.files.build_id
    after = build_trie([[7]], saved, overwrite=True, progress=False)
    assert sorted(after.facts()) == [(7,)] and after.files.build_id != before.files.build_id
    assert _leftovers(saved.parent) == ["kb"]


def test_compile_cache_tells_rebuilt_indexes_apart(saved):
    first = trie_constraint(saved).compile(VOCAB)
    assert trie_constraint(saved).compile(VOCAB) is first
    build_trie([[7]], saved, overwrite=True, progress=False)
    second = trie_constraint(saved).compile(VOCAB)
    assert second is not first and second.matcher().allowed_tokens().tolist() == [7]
    assert trie_constraint(saved, no_repeat=True).compile(VOCAB) is not second


# -- the real SmolLM2 tokenizer on the airports fact base ---------------------------------------------------
@pytest.fixture(scope="module")
def airports(tmp_path_factory):
    from constrain.assets import load_vocabulary
    from constrain.index.facts import airport_triples, build_fact_index, verbalize

    triples = list(
        itertools.islice(airport_triples(), 20000)
    )  # ~2,300 airports: a slice keeps the test quick
    out = tmp_path_factory.mktemp("airports") / "kb"
    index = build_fact_index(triples, out, tokenizer="smollm2", progress=False)
    vocab = load_vocabulary("smollm2")
    texts = {(" " + verbalize(t)).encode() for t in triples}
    return index, vocab, texts


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_airport_facts_real_tokenizer_walks_spell_stored_facts(airports, data):
    """Soundness on real data: a random walk over allowed SmolLM2 tokens decodes to a verbalized fact."""
    index, vocab, texts = airports
    m = trie_constraint(index).compile(vocab).matcher()
    walked: list[int] = []
    for _ in range(index.max_len + 1):
        options = m.allowed_tokens()
        assert options.size and options.max() < vocab.n_tokens
        t = int(data.draw(st.sampled_from(options.tolist())))
        assert m.accept(t)
        if t in vocab.eos_ids:
            break
        walked.append(t)
    assert m.is_terminated()
    assert vocab.decode_bytes(walked) in texts


@pytest.mark.slow
def test_airport_facts_real_tokenizer_every_sampled_fact_is_accepted(airports):
    """Completeness on real data: 500 random stored facts are accepted token by token, then EOS."""
    index, vocab, texts = airports
    facts = list(index.facts())
    assert len(facts) == len(texts)
    compiled = trie_constraint(index).compile(vocab)
    for f in random.Random(0).sample(facts, 500):
        m = compiled.matcher()
        for t in f:
            assert m.is_allowed(t) and m.accept(t)
        assert m.is_accepting() and all(m.is_allowed(e) for e in vocab.eos_ids)
        assert vocab.decode_bytes(f) in texts
