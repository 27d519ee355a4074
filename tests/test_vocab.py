"""Vocabulary: exact token bytes for five real vocabularies, specials, EOS, logits width, byte trie."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import TokenOutOfRangeError, Vocabulary, VocabularyError
from constrain.vocab import gpt2_unicode_to_byte

REAL_VOCABS = ("smollm2", "llama3", "qwen3", "gpt2", "mistral-sp")

EXPECTED_SIZES = {"smollm2": 49152, "llama3": 128256, "qwen3": 151669, "gpt2": 50257, "mistral-sp": 32000}
EXPECTED_EOS = {
    "smollm2": {"<|im_end|>", "<|endoftext|>"},
    "llama3": {"<|eot_id|>", "<|end_of_text|>"},
    "qwen3": {"<|im_end|>", "<|endoftext|>"},
    "gpt2": {"<|endoftext|>"},
    "mistral-sp": {"</s>"},
}

# Text that exercises multi-byte UTF-8, emoji, whitespace runs, code and JSON punctuation.
texts = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(list(' \n\t{}[]":,0123456789éß日本🎉👍🏽')),
    ),
    min_size=1,
    max_size=40,
)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _ours_vs_theirs(name: str, vocab: Vocabulary, tok, ids: list[int]) -> tuple[str, str]:
    ours = vocab.decode(ids)
    theirs = tok.decode(ids, clean_up_tokenization_spaces=False)
    if name == "mistral-sp":
        # SentencePiece encodes a dummy prefix space ("▁") that its decoder drops; our bytes keep it exactly.
        ours = ours.removeprefix(" ")
    return ours, theirs


@pytest.mark.parametrize("name", REAL_VOCABS)
def test_real_vocabulary_sizes_specials_and_eos(name, vocabularies):
    vocab = vocabularies(name)
    assert vocab.n_tokens == EXPECTED_SIZES[name] == vocab.vocab_size
    assert {vocab.token_bytes[i].decode() for i in vocab.eos_ids} == EXPECTED_EOS[name]
    assert vocab.eos_ids <= vocab.special_ids
    trie = vocab.trie
    # Every ordinary token is in the trie exactly once; no special token is.
    assert sorted(trie.token_ids.tolist()) == vocab.ordinary_ids.tolist()
    assert not set(trie.token_ids.tolist()) & vocab.special_ids


@pytest.mark.parametrize("name", REAL_VOCABS)
@SETTINGS
@given(text=texts)
def test_encoded_text_decodes_to_the_tokenizers_decode(name, text, tokenizers, vocabularies):
    """For any text, the concatenated token bytes of its tokenization decode exactly as the tokenizer does."""
    tok, vocab = tokenizers(name), vocabularies(name)
    ids = tok.encode(text, add_special_tokens=False)
    ours, theirs = _ours_vs_theirs(name, vocab, tok, ids)
    assert ours == theirs
    single_bytes = {b[0] for b in vocab.token_bytes if len(b) == 1}
    if name != "mistral-sp" and set(text.encode()) <= single_bytes:
        # Byte-level BPE is lossless wherever every byte has a token (SmolLM2 lacks 21 single bytes).
        assert vocab.decode_bytes(ids) == text.encode()


@pytest.mark.parametrize("name", REAL_VOCABS)
@SETTINGS
@given(data=st.data())
def test_any_token_sequence_decodes_like_the_tokenizer(name, data, tokenizers, vocabularies):
    """For any sequence of ordinary token ids, our bytes decode (bad UTF-8 replaced) as the tokenizer's."""
    tok, vocab = tokenizers(name), vocabularies(name)
    ordinary = vocab.ordinary_ids
    picks = data.draw(st.lists(st.integers(0, len(ordinary) - 1), min_size=1, max_size=12))
    ids = [int(ordinary[i]) for i in picks]
    if name == "mistral-sp":
        # Keep to whole-character tokens: SentencePiece's decoder joins byte-fallback runs differently
        # from a plain UTF-8 decode when they are invalid, which is a display choice, not a byte difference.
        ids = [i for i in ids if not tok.convert_ids_to_tokens(i).startswith("<0x")] or [ordinary[-1]]
        ids = [int(i) for i in ids]
    ours, theirs = _ours_vs_theirs(name, vocab, tok, ids)
    if name == "mistral-sp":
        theirs = theirs.removeprefix(" ")
        ours = ours.removeprefix(" ")
    assert ours == theirs


def test_sentencepiece_byte_fallback_and_space_marker(tokenizers, vocabularies):
    tok, vocab = tokenizers("mistral-sp"), vocabularies("mistral-sp")
    escape = tok.convert_tokens_to_ids("<0x1B>")
    assert vocab.token_bytes[escape] == b"\x1b"
    hello = tok.convert_tokens_to_ids("▁Hello")
    assert vocab.token_bytes[hello] == b" Hello"
    ids = tok.encode("日本 ok", add_special_tokens=False)
    assert vocab.decode_bytes(ids) == " 日本 ok".encode()


def test_gpt2_byte_map_is_a_bijection_over_all_bytes():
    table = gpt2_unicode_to_byte()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A


def test_trie_preorder_arrays_spell_every_token():
    vocab = Vocabulary([b"a", b"ab", b"abc", b"b", b"", b"ab", b"<s>"], special_ids=[6], eos_ids=[6])
    trie = vocab.trie
    spelled: dict[int, bytes] = {}
    path: list[int] = []
    for i in range(1, trie.n_nodes):
        depth = int(trie.node_depth[i])
        del path[depth - 1 :]
        path.append(int(trie.node_byte[i]))
        for t in trie.token_ids[trie.token_start[i] : trie.token_start[i + 1]]:
            spelled[int(t)] = bytes(path)
        # node_end marks the end of the subtree: every node inside is deeper.
        assert all(trie.node_depth[j] > depth for j in range(i + 1, trie.node_end[i]))
    assert spelled == {0: b"a", 1: b"ab", 2: b"abc", 3: b"b", 5: b"ab"}
    assert trie.max_depth == 3


def test_logits_width_beyond_the_tokenizer_is_padding():
    vocab = Vocabulary([b"a", b"b"], vocab_size=64, eos_ids=[])
    assert vocab.n_tokens == 2 and vocab.vocab_size == 64
    assert vocab.token_to_bytes(40) == b""
    with pytest.raises(TokenOutOfRangeError, match="64"):
        vocab.check_token(64)
    with pytest.raises(TokenOutOfRangeError):
        vocab.decode([-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"token_bytes": []}, "empty vocabulary"),
        ({"token_bytes": [b"", b""]}, "no ordinary token"),
        ({"token_bytes": [b"x"], "special_ids": [0]}, "no ordinary token"),
        ({"token_bytes": [b"a", b"b"], "vocab_size": 1}, "below the tokenizer"),
        ({"token_bytes": [b"a"], "eos_ids": [5]}, "eos id"),
    ],
)
def test_bad_vocabularies_raise_vocabulary_error(kwargs, message):
    with pytest.raises(VocabularyError, match=message):
        Vocabulary(**kwargs)


def test_fingerprint_distinguishes_width_and_content():
    a = Vocabulary([b"a", b"b"])
    assert a == Vocabulary([b"a", b"b"])
    assert a != Vocabulary([b"a", b"b"], vocab_size=3)
    assert a != Vocabulary([b"a", b"c"])
    assert len({a, Vocabulary([b"a", b"b"])}) == 1


def test_from_tokenizer_width_matches_a_padded_model(tokenizers):
    vocab = Vocabulary.from_tokenizer(tokenizers("smollm2"), vocab_size=49152 + 64)
    assert vocab.vocab_size == 49216 and vocab.n_tokens == 49152
    assert np.all(vocab.trie.token_ids < vocab.n_tokens)


def test_tiktoken_file_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(b"YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(VocabularyError, match=r"bad.tiktoken:2"):
        Vocabulary.from_tiktoken_file(str(path))
