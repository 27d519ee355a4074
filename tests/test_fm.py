"""FM-index over a token corpus as a constraint (issue 4, part 2).

The oracle everywhere is a brute-force scan of the documents as Python lists: the occurrences of the span that
respect the start mode, and the tokens that follow them inside their document.
"""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import (
    BitmaskError,
    ConstraintError,
    IndexFormatError,
    TokenOutOfRangeError,
    Vocabulary,
    allocate_bitmask,
    bitmask_to_bool,
    compile,
    fill_bitmasks,
)
from constrain.bitmask import bitmask_words
from constrain.index.fm import FMIndex, fm_constraint
from constrain.index.fm_kernels import room_at_least, room_summaries, wm_distinct, wm_follow_pair
from constrain.index.suffix_array import suffix_array
from constrain.index.wavelet import WaveletMatrix

# -- a small vocabulary with every kind of id -----------------------------------------------------------
K = 4  # ordinary tokens 0..3
BOS, EOS, EMPTY = K, K + 1, K + 2  # a special, the (special) EOS, an id with no bytes
VOCAB_SIZE = K + 5  # two padding ids: K + 3, K + 4
SMALL = Vocabulary(
    [b"a", b"b", b"c", b"d", b"<s>", b"</s>", b""],
    vocab_size=VOCAB_SIZE,
    special_ids=[BOS, EOS],
    eos_ids=[EOS],
    name="small",
)
ORDINARY = frozenset(range(K))  # the only ids a span may contain

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Corpora: mostly ordinary tokens over a tiny alphabet (many repeats), sometimes a special/empty/padding id.
token_ids = st.one_of(
    st.integers(0, K - 1), st.integers(0, K - 1), st.integers(0, K - 1), st.integers(K, VOCAB_SIZE - 1)
)
documents = st.lists(st.lists(token_ids, max_size=12), min_size=1, max_size=6).filter(lambda ds: any(ds))


@st.composite
def corpora(draw):
    """Documents plus per-document sentence starts (offsets inside each document)."""
    docs = draw(documents)
    starts = [draw(st.lists(st.integers(0, len(d) - 1), max_size=3)) if d else [] for d in docs]
    return docs, starts


# -- the brute-force oracle ------------------------------------------------------------------------------
def start_offsets(docs, sentence_starts, start):
    """Per document, the offsets where a span may begin."""
    if start == "any":
        return [range(len(d)) for d in docs]
    if start == "document":
        return [[0] if d else [] for d in docs]
    return [sorted(set(s) | {0}) if d else [] for d, s in zip(docs, sentence_starts, strict=True)]


def occurrences(docs, offsets, span):
    """(document, offset) of every occurrence of `span` that begins at an allowed offset."""
    m = len(span)
    return sorted(
        (d, i)
        for d, doc in enumerate(docs)
        for i in offsets[d]
        if i + m <= len(doc) and doc[i : i + m] == list(span)
    )


def expected_allowed(docs, offsets, span, min_tokens, ok=ORDINARY, eos=(EOS,)):
    """Tokens that follow an occurrence of `span` and leave room to reach `min_tokens` (plus EOS if done)."""
    m = len(span)
    need = max(0, min_tokens - m - 1)
    allowed = set()
    for d, i in occurrences(docs, offsets, span):
        doc = docs[d]
        if i + m < len(doc) and doc[i + m] in ok:
            tail = doc[i + m + 1 : i + m + 1 + need]
            if len(tail) == need and all(t in ok for t in tail):
                allowed.add(doc[i + m])
    if m >= min_tokens:
        allowed |= set(eos)
    return allowed


def allowed_set(matcher) -> set[int]:
    return set(matcher.allowed_tokens().tolist())


# -- building blocks ---------------------------------------------------------------------------------------
@FAST
@given(st.lists(st.integers(1, 6), max_size=40))
def test_suffix_array_sorts_suffixes_like_python(body):
    """Property: the suffix array lists the suffixes of text + [0] in Python's lexicographic order."""
    text = np.asarray(body + [0])
    expected = sorted(range(len(text)), key=lambda i: text[i:].tolist())
    assert suffix_array(text).tolist() == expected


def test_suffix_array_rejects_a_text_without_sentinel():
    with pytest.raises(ConstraintError, match="sentinel"):
        suffix_array(np.asarray([2, 1, 3]))


@FAST
@given(st.integers(1, 300), st.lists(st.integers(0, 10**6), min_size=1, max_size=1200), st.data())
def test_wavelet_matrix_rank_and_distinct_match_numpy(sigma, raw, data):
    """Property: rank_c at two positions and the distinct symbols of a range (with their counts and ranks)
    equal a numpy scan of the sequence."""
    values = np.asarray(raw) % sigma
    n = values.shape[0]
    wm = WaveletMatrix.build(values, sigma)
    s = data.draw(st.integers(0, n))
    e = data.draw(st.integers(s, n))
    c = data.draw(st.integers(0, sigma - 1))
    a, b = wm_follow_pair(wm.words, wm.block_rank, wm.zeros, c, s, e)
    assert a - wm.bottom_start[c] == np.count_nonzero(values[:s] == c)
    assert b - wm.bottom_start[c] == np.count_nonzero(values[:e] == c)
    size = max(1, min(e - s, sigma))
    syms, lo, hi = (np.empty(size, dtype=np.int64) for _ in range(3))
    k = wm_distinct(wm.words, wm.block_rank, wm.zeros, s, e, syms, lo, hi)
    expect, counts = np.unique(values[s:e], return_counts=True)
    assert syms[:k].tolist() == expect.tolist()
    assert (hi[:k] - lo[:k]).tolist() == counts.tolist()
    assert [int(lo[j] - wm.bottom_start[syms[j]]) for j in range(k)] == [
        int(np.count_nonzero(values[:s] == x)) for x in expect
    ]


@FAST
@given(st.integers(1, 20000), st.integers(0, 2**32 - 1))
def test_room_at_least_equals_the_maximum_of_the_range(size, seed):
    """Property: room_at_least(a, b, need) is True iff max(room[a:b]) >= need (block maxima included)."""
    rng = np.random.default_rng(seed)
    room = rng.integers(0, 8, size).astype(np.uint8)  # mostly small, a few peaks anywhere
    peaks = rng.integers(0, size, rng.integers(0, 6))
    room[peaks] = rng.integers(8, 256, peaks.shape[0])
    block_max, super_max = room_summaries(room)
    for _ in range(30):
        a, b = sorted(rng.integers(0, size + 1, 2).tolist())
        top = int(room[a:b].max()) if b > a else 0
        for need in {1, max(1, top), min(255, top + 1), int(rng.integers(1, 256))}:
            expect = b > a and top >= need
            assert room_at_least(room, block_max, super_max, a, b, need) == expect, (a, b, need)


# -- count / locate ----------------------------------------------------------------------------------------
@FAST
@given(
    corpora(),
    st.sampled_from([1, 2, 3, 32]),
    st.lists(st.lists(token_ids, min_size=1, max_size=4), max_size=6),
)
def test_count_and_locate_equal_a_brute_force_scan(corpus, sample_rate, extra_patterns):
    """Property: for every start mode, count() and locate() of substrings of the corpus (and of arbitrary
    patterns, which may cross documents or be absent) equal the brute-force occurrence list."""
    docs, sentence_starts = corpus
    index = FMIndex.build(
        docs, vocab_size=VOCAB_SIZE, sentence_starts=sentence_starts, sample_rate=sample_rate
    )
    assert index.n_tokens == sum(map(len, docs)) and index.n_documents == len(docs)
    patterns = [
        doc[i : i + m] for doc in docs for i in range(len(doc)) for m in (1, 2, 3) if i + m <= len(doc)
    ]
    patterns += extra_patterns
    for start in ("any", "document", "sentence"):
        offsets = start_offsets(docs, sentence_starts, start)
        for pattern in patterns:
            expect = occurrences(docs, offsets, pattern)
            assert index.count(pattern, start=start) == len(expect), (start, pattern)
            assert index.locate(pattern, start=start) == expect, (start, pattern)


def test_locate_limit_caps_the_number_of_occurrences():
    index = FMIndex.build([[1, 2, 1, 2, 1]], vocab_size=VOCAB_SIZE)
    assert index.locate([1]) == [(0, 0), (0, 2), (0, 4)]
    located = index.locate([1], limit=2)
    assert len(located) == 2 and set(located) <= {(0, 0), (0, 2), (0, 4)} and located == sorted(located)


# -- the constraint: random walks against the oracle --------------------------------------------------------
def check_step(index, compiled, matcher, docs, offsets, start, min_tokens):
    """Compare one matcher state with the oracle: mask, accept(), incremental range, occurrences."""
    span = matcher.span
    expect = expected_allowed(docs, offsets, span, min_tokens)
    got = allowed_set(matcher)
    assert got == expect, (start, min_tokens, span)
    for token in range(
        VOCAB_SIZE
    ):  # accept() agrees with the mask for every id, specials and padding included
        assert matcher.fork().accept(token) == (token in expect), (span, token)
    assert matcher.is_accepting() == (len(span) >= min_tokens)
    if span:
        assert matcher.span_range() == index.search(span, start)  # incremental == from scratch
        assert matcher.occurrences() == occurrences(docs, offsets, span)
    return expect


@FAST
@given(
    corpora(),
    st.sampled_from(["any", "document", "sentence"]),
    st.sampled_from([1, 1, 2, 3, 5]),
    st.randoms(use_true_random=False),
)
def test_allowed_tokens_equal_the_tokens_that_follow_the_span_in_the_corpus(corpus, start, min_tokens, rnd):
    """Property: at every step of a random walk, the mask equals the brute-force set of tokens that follow
    an occurrence of the span (right start, same document, room for min_tokens), EOS iff len >= min_tokens;
    accept() agrees with the mask; the incrementally kept range equals a search from scratch; rollback and
    fork give the same masks as a matcher fed the shorter span. Half the runs send every range through the
    wide-range mask cache."""
    docs, sentence_starts = corpus
    index = FMIndex.build(docs, vocab_size=VOCAB_SIZE, sentence_starts=sentence_starts, sample_rate=2)
    compiled = fm_constraint(index, start=start, min_tokens=min_tokens)._compile(SMALL)
    compiled.wide_range = rnd.choice([1, compiled.wide_range])
    offsets = start_offsets(docs, sentence_starts, start)
    matcher = compiled.matcher()
    for _ in range(10):
        expect = check_step(index, compiled, matcher, docs, offsets, start, min_tokens)
        choices = sorted(expect - {EOS})
        if matcher.span and rnd.random() < 0.2:  # roll back and compare with a fresh matcher
            n = rnd.randint(1, len(matcher.span))
            matcher.rollback(n)
            fresh = compiled.matcher()
            assert all(fresh.accept(t) for t in matcher.span)
            assert allowed_set(fresh) == allowed_set(matcher)
            continue
        if not choices:
            break
        token = rnd.choice(choices)
        before = matcher.fork()
        assert matcher.accept(token)
        assert before.span == matcher.span[:-1]  # the fork did not move
    if matcher.is_accepting():
        assert matcher.accept(EOS) and matcher.is_terminated()
        assert allowed_set(matcher) == {EOS}


@settings(max_examples=40, deadline=None)
@given(corpora(), st.sampled_from(["any", "document", "sentence"]), st.randoms(use_true_random=False))
def test_saved_and_loaded_index_gives_the_same_masks(tmp_path_factory, corpus, start, rnd):
    """Property: a saved, memory-mapped index has the original's fingerprint, occurrences and masks."""
    docs, sentence_starts = corpus
    index = FMIndex.build(docs, vocab_size=VOCAB_SIZE, sentence_starts=sentence_starts, sample_rate=3)
    folder = tmp_path_factory.mktemp("fm")
    index.save(folder)
    loaded = FMIndex.load(folder)
    assert loaded.memory_mapped and not index.memory_mapped
    assert loaded.fingerprint == index.fingerprint and loaded.nbytes == index.nbytes
    a = fm_constraint(index, start=start)._compile(SMALL).matcher()  # bypass the cache: two real compiles
    b = fm_constraint(loaded, start=start)._compile(SMALL).matcher()
    for _ in range(6):
        assert allowed_set(a) == allowed_set(b)
        assert a.occurrences() == b.occurrences()
        choices = sorted(allowed_set(a) - {EOS})
        if not choices:
            break
        token = rnd.choice(choices)
        assert a.accept(token) and b.accept(token)


ZIPF_VOCAB = Vocabulary(
    [f"t{i}".encode() for i in range(400)] + [b"</s>"], vocab_size=405, special_ids=[400], eos_ids=[400]
)


@pytest.mark.parametrize("start", ["any", "document", "sentence"])
def test_zipf_corpus_of_40k_tokens_masks_equal_a_scan_at_every_step(start):
    """Large occurrence ranges (thousands of rows, several rank blocks, room checks over 4096-entry blocks):
    masks, counts and occurrences equal an incremental scan of the flat corpus."""
    rng = np.random.default_rng(7)
    docs = [((rng.zipf(1.3, int(rng.integers(0, 1300))) - 1) % 405).tolist() for _ in range(60)]
    starts = [sorted(rng.choice(len(d), min(len(d), 20), replace=False).tolist()) if d else [] for d in docs]
    index = FMIndex.build(docs, vocab_size=405, sentence_starts=starts, sample_rate=8)
    # The flat text with -1 between documents, and each document's first position in it.
    flat = np.concatenate([np.append(d, -1) for d in docs] + [np.full(300, -1)]).astype(np.int64)
    firsts = np.cumsum([0] + [len(d) + 1 for d in docs])[:-1]
    ok = np.zeros(406, dtype=bool)
    ok[:400] = True
    run = np.zeros(flat.shape[0] + 1, dtype=np.int64)  # run[p]: allowed tokens in a row from p
    for p in range(flat.shape[0] - 1, -1, -1):
        run[p] = run[p + 1] + 1 if ok[flat[p]] else 0
    begins = {
        "any": np.flatnonzero(flat >= 0),
        "document": np.asarray([f for f, d in zip(firsts, docs, strict=True) if d]),
        "sentence": np.asarray(
            [f + o for f, d, s in zip(firsts, docs, starts, strict=True) if d for o in set(s) | {0}]
        ),
    }[start]
    for min_tokens in (1, 4):
        compiled = compile(fm_constraint(index, start=start, min_tokens=min_tokens), ZIPF_VOCAB)
        for _ in range(12):
            matcher, cands = compiled.matcher(), np.sort(begins)
            for depth in range(8):
                following = flat[cands + depth]
                good = ok[following] & (run[cands + depth + 1] >= max(0, min_tokens - depth - 1))
                expect = set(following[good].tolist()) | ({400} if depth >= min_tokens else set())
                assert allowed_set(matcher) == expect, (start, min_tokens, matcher.span)
                if depth:
                    lo, hi = matcher.span_range()
                    assert hi - lo == len(cands)
                    if len(cands) < 500:
                        doc_of = np.searchsorted(firsts, cands, side="right") - 1
                        assert matcher.occurrences() == list(
                            zip(doc_of.tolist(), (cands - firsts[doc_of]).tolist(), strict=True)
                        )
                choices = sorted(expect - {400})
                if not choices:
                    break
                if rng.random() < 0.7:  # mostly the most frequent continuation, to keep ranges large
                    values, counts = np.unique(following[good], return_counts=True)
                    token = int(values[np.argmax(counts)])
                else:
                    token = int(rng.choice(choices))
                assert matcher.accept(token)
                cands = cands[following == token]


def test_more_than_65536_distinct_ids_work_in_every_mode():
    vocab = Vocabulary([b"x%d" % i for i in range(70000)], name="wide")
    docs = [list(range(70000)), [69999, 5, 6]]
    index = FMIndex.build(docs, vocab_size=70000, sentence_starts=[[65540], [1]])
    assert index.text.dtype == np.int32  # 70,002 symbols do not fit the 2-byte text
    expected_start = {"any": set(range(70000)), "document": {0, 69999}, "sentence": {0, 65540, 69999, 5}}
    for start, allowed in expected_start.items():
        matcher = compile(fm_constraint(index, start=start), vocab).matcher()
        assert allowed_set(matcher) == allowed
    matcher = compile(fm_constraint(index, start="sentence"), vocab).matcher()
    assert matcher.accept(65540) and allowed_set(matcher) == {65541}
    assert matcher.occurrences() == [(0, 65540)]
    assert index.locate([69999, 5]) == [(1, 0)] and index.count([69999]) == 2


# -- matcher protocol details -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def abc_index():
    # doc 0 "a b c a b", doc 1 "b c d" (sentence at 1), doc 2 empty, doc 3 "a <s> a" (a special in the middle)
    docs = [[0, 1, 2, 0, 1], [1, 2, 3], [], [0, BOS, 0, 8]]
    return FMIndex.build(docs, vocab_size=VOCAB_SIZE, sentence_starts=[[3], [1], [], []])


def test_special_empty_and_padding_ids_in_the_corpus_are_never_allowed(abc_index):
    matcher = compile(fm_constraint(abc_index), SMALL).matcher()
    assert allowed_set(matcher) == {0, 1, 2, 3}  # BOS and the padding id 8 occur but are never allowed
    assert not matcher.accept(BOS) and not matcher.accept(8)
    assert matcher.accept(0)
    assert allowed_set(matcher) == {1, EOS}  # "a <s>" does not continue


def test_document_and_sentence_modes_restrict_where_the_span_starts(abc_index):
    doc_mode = compile(fm_constraint(abc_index, start="document"), SMALL).matcher()
    sentence_mode = compile(fm_constraint(abc_index, start="sentence"), SMALL).matcher()
    assert allowed_set(doc_mode) == {0, 1}
    assert allowed_set(sentence_mode) == {0, 1, 2}  # "c d" starts a sentence in doc 1
    assert not doc_mode.accept(2) and sentence_mode.accept(2)
    assert sentence_mode.occurrences() == [(1, 1)]


def test_eos_terminates_and_a_terminated_matcher_allows_only_eos(abc_index):
    matcher = compile(fm_constraint(abc_index, min_tokens=2), SMALL).matcher()
    assert not matcher.accept(EOS)  # the empty span is not accepting
    assert matcher.accept(0) and not matcher.is_accepting() and not matcher.accept(EOS)
    assert matcher.accept(1) and matcher.is_accepting()
    assert matcher.accept(EOS) and matcher.is_terminated()
    assert allowed_set(matcher) == {EOS} and not matcher.accept(2)
    matcher.rollback(1)
    assert not matcher.is_terminated() and allowed_set(matcher) == {2, EOS}


def test_fill_writes_the_requested_row_of_a_torch_batch_and_leaves_others(abc_index):
    compiled = compile(fm_constraint(abc_index), SMALL)
    matchers = [compiled.matcher() for _ in range(5)]
    for i, m in enumerate(matchers):
        m.accept(i % 2)  # a / b
    bitmask = allocate_bitmask(5, VOCAB_SIZE)
    fill_bitmasks(matchers, bitmask, SMALL, threads=2)
    allowed = bitmask_to_bool(bitmask, VOCAB_SIZE)
    for i, m in enumerate(matchers):
        assert set(torch.nonzero(allowed[i]).flatten().tolist()) == allowed_set(m)


def test_matchers_in_threads_give_the_same_masks_as_sequentially(abc_index):
    compiled = compile(fm_constraint(abc_index), SMALL)
    spans = [[0], [0, 1], [1], [1, 2], [2, 3], [0, 1, 2]]
    expected = {}
    for span in spans:
        m = compiled.matcher()
        assert all(m.accept(t) for t in span)
        expected[tuple(span)] = allowed_set(m)
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(200):
            span = rnd.choice(spans)
            m = compiled.matcher()
            for t in span:
                m.accept(t)
            if allowed_set(m) != expected[tuple(span)]:
                errors.append(span)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# -- errors ------------------------------------------------------------------------------------------------
def test_build_rejects_out_of_range_ids_naming_document_and_offset():
    with pytest.raises(TokenOutOfRangeError, match=r"document 1, offset 2: token id 9"):
        FMIndex.build([[0, 1], [1, 1, 9]], vocab_size=9)
    with pytest.raises(TokenOutOfRangeError, match=r"document 0, offset 0: token id -1"):
        FMIndex.build([[-1]], vocab_size=9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"documents": [], "vocab_size": 5}, "no tokens"),
        ({"documents": [[], []], "vocab_size": 5}, "no tokens"),
        ({"documents": [[0.5, 1.0]], "vocab_size": 5}, "document 0: expected a 1-D sequence of int"),
        ({"documents": [[[0, 1]]], "vocab_size": 5}, "document 0: expected a 1-D sequence"),
        ({"documents": [[0]], "vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"documents": [[0]], "vocab_size": 5, "sample_rate": 0}, "sample_rate must be a positive integer"),
        ({"documents": [[0], [1]], "vocab_size": 5, "sentence_starts": [[0]]}, "1 entries for 2 documents"),
        (
            {"documents": [[0, 1]], "vocab_size": 5, "sentence_starts": [[2]]},
            r"sentence_starts\[0\]: offset 2",
        ),
    ],
)
def test_build_rejects_bad_input_with_a_message_naming_the_place(kwargs, message):
    documents = kwargs.pop("documents")
    with pytest.raises(ConstraintError, match=message):
        FMIndex.build(documents, **kwargs)


def test_constraint_options_and_queries_are_checked(abc_index):
    plain = FMIndex.build([[0, 1]], vocab_size=VOCAB_SIZE)
    with pytest.raises(ConstraintError, match="start must be one of"):
        fm_constraint(plain, start="paragraph")
    with pytest.raises(ConstraintError, match="needs an index built with sentence_starts"):
        fm_constraint(plain, start="sentence")
    for bad in (0, 256, True, 1.5):
        with pytest.raises(ConstraintError, match="min_tokens"):
            fm_constraint(plain, min_tokens=bad)
    with pytest.raises(ConstraintError, match="expects an FMIndex"):
        fm_constraint([[0, 1]])
    with pytest.raises(ConstraintError, match="pattern is empty"):
        plain.count([])
    with pytest.raises(ConstraintError, match="sequence of int token ids"):
        plain.count([0.5])
    with pytest.raises(TokenOutOfRangeError, match="pattern position 1"):
        plain.locate([0, VOCAB_SIZE])
    with pytest.raises(ConstraintError, match="needs an index built with sentence_starts"):
        plain.count([0], start="sentence")


def test_compile_rejects_a_vocabulary_narrower_than_the_index():
    index = FMIndex.build([[0, 1]], vocab_size=VOCAB_SIZE + 10)
    with pytest.raises(ConstraintError, match=f"vocab_size {VOCAB_SIZE + 10}"):
        compile(fm_constraint(index), SMALL)


def test_matcher_rejects_bad_tokens_rollbacks_and_bitmasks(abc_index):
    matcher = compile(fm_constraint(abc_index), SMALL).matcher()
    with pytest.raises(TokenOutOfRangeError):
        matcher.accept(VOCAB_SIZE)
    with pytest.raises(TokenOutOfRangeError):
        matcher.accept(-1)
    with pytest.raises(ConstraintError, match="cannot roll back 1"):
        matcher.rollback(1)
    with pytest.raises(BitmaskError):
        matcher.fill_bitmask(np.zeros((1, bitmask_words(VOCAB_SIZE) + 1), dtype=np.int32), 0)
    with pytest.raises(BitmaskError):
        matcher.fill_bitmask(np.zeros((1, bitmask_words(VOCAB_SIZE)), dtype=np.int32), 1)


# -- persistence errors --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, abc_index):
    abc_index.save(tmp_path)
    return tmp_path


ARRAY_FILES = [
    "wm_words.npy",
    "wm_block_rank.npy",
    "wm_zeros.npy",
    "lf_offset.npy",
    "tokens.npy",
    "sample_words.npy",
    "sample_block_rank.npy",
    "samples.npy",
    "doc_starts.npy",
    "text.npy",
    "sentence_suffixes.npy",
]


@pytest.mark.parametrize("name", ARRAY_FILES)
def test_truncated_array_file_raises_index_format_error_naming_it(saved, name):
    path = saved / name
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(IndexFormatError, match=name):
        FMIndex.load(saved, verify=False)  # caught by the size check even without the checksum


@pytest.mark.parametrize("name", ARRAY_FILES)
def test_flipped_byte_in_an_array_raises_a_checksum_error_naming_it(saved, name):
    path = saved / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match=f"{name}: CRC-32 mismatch"):
        FMIndex.load(saved)


def test_extra_bytes_after_an_array_raise_index_format_error(saved):
    with open(saved / "samples.npy", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IndexFormatError, match="samples.npy"):
        FMIndex.load(saved)


def test_missing_or_garbled_header_raises_index_format_error(saved):
    header = saved / "fm.json"
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    with pytest.raises(IndexFormatError, match="fm.json: unreadable header"):
        FMIndex.load(saved)
    header.unlink()
    with pytest.raises(IndexFormatError, match="fm.json: missing"):
        FMIndex.load(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.update(version=99), "format version 99"),
        (lambda h: h.update(format="something-else"), "not a constrain-fm-index header"),
        (lambda h: h["arrays"]["samples"].update(shape=[3]), "samples.npy: has int32"),
        (lambda h: h["arrays"]["tokens"].update(dtype="<i8"), "tokens.npy: has int32"),
        (lambda h: h["arrays"].pop("text"), "unexpected set of arrays"),
        (lambda h: h.pop("vocab_size"), "malformed header field"),
        (lambda h: h.update(sample_rate=7), "suffix-array samples"),
        (lambda h: h.update(vocab_size=2), "token table not sorted within"),
    ],
)
def test_inconsistent_header_raises_index_format_error(saved, edit, message):
    header = json.loads((saved / "fm.json").read_text())
    edit(header)
    (saved / "fm.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match=message):
        FMIndex.load(saved)


def test_missing_array_file_raises_index_format_error_naming_it(saved):
    (saved / "doc_starts.npy").unlink()
    with pytest.raises(IndexFormatError, match="doc_starts.npy: missing"):
        FMIndex.load(saved)


# -- real tokenizers -----------------------------------------------------------------------------------
PARAGRAPHS = [
    "The FM-index is a compressed full-text index based on the Burrows-Wheeler transform. It allows counting "
    "and locating the occurrences of a pattern. It was proposed by Ferragina and Manzini in 2000.",
    "Constrained decoding restricts a language model to outputs that satisfy a constraint. A corpus "
    "constraint keeps the output a substring of the corpus. The model cannot invent a quotation.",
    "Paris is the capital of France. Berlin is the capital of Germany. The capital of Italy is Rome.",
    "def count(pattern):\n    lo, hi = 0, n\n    for token in reversed(pattern):\n"
    "        lo, hi = step(lo, hi)\n    return hi - lo\n",
]


def sentence_offsets(tokenizer, ids):
    """Offsets of the tokens that follow a token ending in '. ' / '.' (a crude sentence splitter)."""
    return [i + 1 for i, t in enumerate(ids[:-1]) if tokenizer.decode([t]).rstrip().endswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_real_tokenizer_corpus_masks_equal_the_brute_force_scan(name):
    from constrain.assets import load_tokenizer, load_vocabulary

    tokenizer = load_tokenizer(name)
    vocab = load_vocabulary(name)
    docs = [tokenizer.encode(p, add_special_tokens=False) for p in PARAGRAPHS]
    docs.append([*docs[2][:5], sorted(vocab.special_ids)[0], *docs[2][5:9]])  # a special inside a document
    starts = [sentence_offsets(tokenizer, d) for d in docs]
    index = FMIndex.build(docs, vocab_size=vocab.vocab_size, sentence_starts=starts, sample_rate=4)
    ok = frozenset(vocab.ordinary_ids.tolist()) - vocab.eos_ids
    rnd = random.Random(0)
    for start in ("any", "document", "sentence"):
        for min_tokens in (1, 3):
            compiled = compile(fm_constraint(index, start=start, min_tokens=min_tokens), vocab)
            offsets = start_offsets(docs, starts, start)
            for _ in range(8):
                matcher = compiled.matcher()
                for _ in range(12):
                    expect = expected_allowed(
                        docs, offsets, matcher.span, min_tokens, ok=ok, eos=vocab.eos_ids
                    )
                    assert allowed_set(matcher) == expect, (name, start, matcher.span)
                    if matcher.span:
                        assert matcher.span_range() == index.search(matcher.span, start)
                        assert matcher.occurrences() == occurrences(docs, offsets, matcher.span)
                    choices = sorted(expect - vocab.eos_ids)
                    if not choices:
                        break
                    assert matcher.accept(rnd.choice(choices))
    # A generated span maps back to its document: "the capital of" occurs in document 2 only.
    span = tokenizer.encode(" capital of France", add_special_tokens=False)
    assert index.locate(span) == [(2, docs[2].index(span[0]))]
