"""`Vocabulary`: token id -> exact bytes, special and EOS ids, the logits width, and a byte trie for numba.

Three token encodings are understood:

* byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2): each token string is bytes mapped through GPT-2's
  byte<->unicode table;
* SentencePiece with byte fallback (Llama-2, Mistral): `▁` is a space and `<0x1B>` is the byte 0x1B;
* tiktoken-style files, which store the bytes themselves.

Special tokens (control tokens such as `<|im_end|>`) keep their text in `token_bytes` for display, but they
are not in the trie, so no constraint allows them unless it says so. Ids from the tokenizer's size up to the
model's logits width (`vocab_size`) are padding: never allowed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from .errors import TokenOutOfRangeError, VocabularyError

# Names that mark the end of a turn or of the text; any of them that is a special token counts as EOS.
COMMON_EOS_NAMES = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "</s>",
    "<|end|>",
)

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's map from the printable stand-in character of each byte back to the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, chars, strict=True)}


@dataclass(frozen=True)
class VocabTrie:
    """The vocabulary's ordinary tokens as a byte trie, flattened in preorder for numba walks.

    Node 0 is the root (no byte). For node `i > 0`: `node_byte[i]` is the byte on the edge from its parent,
    `node_depth[i]` its depth (root = 0), `node_end[i]` the index just past its subtree (so a walk skips a
    dead subtree with `i = node_end[i]`), and the tokens whose bytes end exactly here are
    `token_ids[token_start[i]:token_start[i + 1]]` (several ids can share bytes, e.g. `A` and `<0x41>`).
    """

    node_byte: np.ndarray  # uint8 (n_nodes,)
    node_depth: np.ndarray  # int32 (n_nodes,)
    node_end: np.ndarray  # int32 (n_nodes,)
    token_start: np.ndarray  # int32 (n_nodes + 1,)
    token_ids: np.ndarray  # int32 (n_tokens_in_trie,)
    max_depth: int

    @property
    def n_nodes(self) -> int:
        return int(self.node_byte.shape[0])

    @property
    def walk_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """`(node_byte, node_depth, node_end, token_start, token_ids, max_depth)`: the arguments every numba
        trie walk takes, in this order (pass them as `*trie.walk_arrays`)."""
        return (
            self.node_byte,
            self.node_depth,
            self.node_end,
            self.token_start,
            self.token_ids,
            self.max_depth,
        )


def _build_trie(token_bytes: Sequence[bytes | None], excluded: frozenset[int]) -> VocabTrie:
    entries = sorted((b, i) for i, b in enumerate(token_bytes) if b and i not in excluded)
    node_byte = [0]
    node_depth = [0]
    node_end = [0]
    node_tokens: list[list[int]] = [[]]
    path = [0]  # node ids along the current path, root first
    prev = b""
    for data, token in entries:
        common = 0
        limit = min(len(prev), len(data))
        while common < limit and prev[common] == data[common]:
            common += 1
        while len(path) > common + 1:  # close the subtrees we are leaving
            node_end[path.pop()] = len(node_byte)
        for depth in range(common + 1, len(data) + 1):
            path.append(len(node_byte))
            node_byte.append(data[depth - 1])
            node_depth.append(depth)
            node_end.append(0)
            node_tokens.append([])
        node_tokens[path[-1]].append(token)
        prev = data
    while path:
        node_end[path.pop()] = len(node_byte)
    counts = np.fromiter((len(t) for t in node_tokens), dtype=np.int64, count=len(node_tokens))
    token_start = np.zeros(len(node_tokens) + 1, dtype=np.int32)
    np.cumsum(counts, out=token_start[1:])
    flat = [t for tokens in node_tokens for t in tokens]
    return VocabTrie(
        node_byte=np.asarray(node_byte, dtype=np.uint8),
        node_depth=np.asarray(node_depth, dtype=np.int32),
        node_end=np.asarray(node_end, dtype=np.int32),
        token_start=token_start,
        token_ids=np.asarray(flat, dtype=np.int32),
        max_depth=max((len(b) for b, _ in entries), default=0),
    )


class Vocabulary:
    """A model's vocabulary as bytes: what every constraint is compiled against.

    Args:
        token_bytes: the bytes of each token id `0..n-1` (`None` or `b""` for ids with no text, e.g. unused).
        vocab_size: the model's logits width (>= `len(token_bytes)`); defaults to `len(token_bytes)`.
        special_ids: control tokens; kept out of the trie, so constraints never allow them by default.
        eos_ids: ids that end generation (a subset of the vocabulary; usually special).
        name: a label for messages and benchmarks.

    Raises:
        VocabularyError: an empty vocabulary, a logits width below the tokenizer's size, ids out of range.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        *,
        vocab_size: int | None = None,
        special_ids: Iterable[int] = (),
        eos_ids: Iterable[int] = (),
        name: str = "",
    ):
        tokens = [bytes(b) if b is not None else b"" for b in token_bytes]
        if not tokens:
            raise VocabularyError("empty vocabulary: no tokens given")
        n = len(tokens)
        vocab_size = n if vocab_size is None else int(vocab_size)
        if vocab_size < n:
            raise VocabularyError(f"logits width vocab_size={vocab_size} is below the tokenizer's {n} tokens")
        special = frozenset(int(i) for i in special_ids)
        eos = frozenset(int(i) for i in eos_ids)
        for label, ids in (("special", special), ("eos", eos)):
            bad = sorted(i for i in ids if not 0 <= i < n)
            if bad:
                raise VocabularyError(f"{label} id(s) {bad[:5]} out of range for a vocabulary of {n} tokens")
        if not any(tokens[i] for i in range(n) if i not in special):
            raise VocabularyError("empty vocabulary: no ordinary token has any bytes")
        self._tokens = tokens
        self.vocab_size = vocab_size
        self.special_ids = special
        self.eos_ids = eos
        self.name = name

    # -- basic queries -------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """The tokenizer's size (ids at or past it, up to `vocab_size`, are padding)."""
        return len(self._tokens)

    @property
    def token_bytes(self) -> list[bytes]:
        """The bytes of each token id (a list; do not mutate)."""
        return self._tokens

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"Vocabulary({self.name or 'unnamed'}: {self.n_tokens} tokens, logits width {self.vocab_size}, "
            f"{len(self.special_ids)} special, eos={sorted(self.eos_ids)})"
        )

    def check_token(self, token: int) -> int:
        """Return `token` as int, or raise `TokenOutOfRangeError` if it is outside `[0, vocab_size)`."""
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise TokenOutOfRangeError(
                f"token id {token} out of range [0, {self.vocab_size}) for {self.name or 'vocab'}"
            )
        return token

    def token_to_bytes(self, token: int) -> bytes:
        """The bytes of one token (`b""` for padding ids)."""
        token = self.check_token(token)
        return self._tokens[token] if token < self.n_tokens else b""

    def decode_bytes(self, tokens: Iterable[int], *, skip_special: bool = False) -> bytes:
        """Concatenate the bytes of `tokens` (optionally dropping special tokens)."""
        out = []
        for token in tokens:
            token = self.check_token(token)
            if skip_special and token in self.special_ids:
                continue
            if token < self.n_tokens:
                out.append(self._tokens[token])
        return b"".join(out)

    def decode(self, tokens: Iterable[int], *, skip_special: bool = False) -> str:
        """Decode `tokens` to text (UTF-8, invalid sequences replaced)."""
        return self.decode_bytes(tokens, skip_special=skip_special).decode("utf-8", errors="replace")

    @cached_property
    def fingerprint(self) -> str:
        """A content hash: equal for vocabularies with the same tokens, specials, EOS ids and width."""
        h = hashlib.sha256()
        h.update(f"{self.vocab_size}|{sorted(self.special_ids)}|{sorted(self.eos_ids)}|".encode())
        for b in self._tokens:
            h.update(len(b).to_bytes(4, "little"))
            h.update(b)
        return h.hexdigest()[:32]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @cached_property
    def trie(self) -> VocabTrie:
        """The byte trie of all ordinary (non-special, non-empty) tokens; built once, on first use."""
        return _build_trie(self._tokens, self.special_ids)

    @cached_property
    def eos_array(self) -> np.ndarray:
        """EOS ids as a sorted int32 array (for numba)."""
        return np.asarray(sorted(self.eos_ids), dtype=np.int32)

    @cached_property
    def ordinary_ids(self) -> np.ndarray:
        """Ids that are neither special nor empty, sorted (int32)."""
        return np.asarray(
            [i for i, b in enumerate(self._tokens) if b and i not in self.special_ids], dtype=np.int32
        )

    def token_id(self, text: str | bytes) -> int:
        """The id of the token whose bytes are exactly `text` (the lowest id if several); KeyError if none."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        index = self._index
        if data not in index:
            raise KeyError(f"no token with bytes {data!r}")
        return index[data]

    @cached_property
    def _index(self) -> dict[bytes, int]:
        index: dict[bytes, int] = {}
        for i, b in enumerate(self._tokens):
            index.setdefault(b, i)
        return index

    # -- constructors --------------------------------------------------------------------------------
    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        eos_ids: Iterable[int] | None = None,
        name: str | None = None,
    ) -> Vocabulary:
        """Build from a transformers tokenizer (fast or slow, byte-level BPE or SentencePiece).

        `vocab_size` is the model's logits width (`model.config.vocab_size`); defaults to `len(tokenizer)`.
        `eos_ids` defaults to the tokenizer's EOS id plus any special token named like an end marker.
        Raises `VocabularyError` if the token encoding cannot be recognised.
        """
        n = len(tokenizer)
        if n == 0:
            raise VocabularyError("empty vocabulary: the tokenizer has no tokens")
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        special = _special_ids(tokenizer, n)
        kind = _detect_encoding(tokenizer, pieces, special)
        token_bytes: list[bytes | None] = []
        for i, piece in enumerate(pieces):
            if piece is None:
                token_bytes.append(None)
            elif i in special:
                token_bytes.append(piece.encode("utf-8"))
            else:
                token_bytes.append(_piece_to_bytes(piece, kind))
        if eos_ids is None:
            eos_ids = set()
            if tokenizer.eos_token_id is not None:
                eos_ids.add(int(tokenizer.eos_token_id))
            for i in special:
                if pieces[i] in COMMON_EOS_NAMES:
                    eos_ids.add(i)
        return cls(
            token_bytes,
            vocab_size=vocab_size,
            special_ids=special,
            eos_ids=eos_ids,
            name=name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        )

    @classmethod
    def from_tiktoken(
        cls,
        ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        *,
        vocab_size: int | None = None,
        eos_ids: Iterable[int] | None = None,
        name: str = "tiktoken",
    ) -> Vocabulary:
        """Build from tiktoken-style mergeable ranks (bytes -> id) and special tokens (text -> id)."""
        special_tokens = dict(special_tokens or {})
        if not ranks:
            raise VocabularyError("empty vocabulary: no mergeable ranks given")
        n = max(max(ranks.values()), max(special_tokens.values(), default=-1)) + 1
        token_bytes: list[bytes | None] = [None] * n
        for data, rank in ranks.items():
            token_bytes[rank] = data
        for text, rank in special_tokens.items():
            token_bytes[rank] = text.encode("utf-8")
        if eos_ids is None:
            eos_ids = [i for t, i in special_tokens.items() if t in COMMON_EOS_NAMES]
        return cls(
            token_bytes,
            vocab_size=vocab_size,
            special_ids=special_tokens.values(),
            eos_ids=eos_ids,
            name=name,
        )

    @classmethod
    def from_tiktoken_file(
        cls, path: str, special_tokens: dict[str, int] | None = None, **kwargs: Any
    ) -> Vocabulary:
        """Build from a `.tiktoken` file (one `base64-token rank` per line)."""
        return cls.from_tiktoken(read_tiktoken_file(path), special_tokens, **kwargs)


def read_tiktoken_file(path: str) -> dict[bytes, int]:
    """Read a `.tiktoken` file into {token bytes: rank}; raises `VocabularyError` on a malformed line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise VocabularyError(f"{path}:{lineno}: malformed tiktoken line {line[:60]!r}") from exc
    return ranks


def _special_ids(tokenizer: Any, n: int) -> frozenset[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None and 0 <= i < n}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for i, token in added.items():
        if getattr(token, "special", False) and 0 <= int(i) < n:
            ids.add(int(i))
    return frozenset(ids)


def _decoder_state(tokenizer: Any) -> str:
    """The JSON of a fast tokenizer's decoder, or '' for tokenizers without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return ""
    try:
        state = decoder.__getstate__()
        return state.decode() if isinstance(state, bytes) else json.dumps(state)
    except Exception:  # noqa: BLE001 - an exotic decoder: fall back to the heuristics
        return ""


def _detect_encoding(tokenizer: Any, pieces: Sequence[str | None], special: frozenset[int]) -> str:
    """'byte_level', 'sentencepiece' or 'raw' (token strings are the UTF-8 text itself)."""
    decoder = _decoder_state(tokenizer)
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "▁" in decoder:
        return "sentencepiece"
    if hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    if hasattr(tokenizer, "byte_encoder"):
        return "byte_level"
    ordinary = [p for i, p in enumerate(pieces) if p and i not in special]
    if sum(1 for p in ordinary if _BYTE_FALLBACK.match(p)) >= 256:
        return "sentencepiece"
    table = gpt2_unicode_to_byte()
    if ordinary and all(all(ch in table for ch in p) for p in ordinary):
        return "byte_level"
    raise VocabularyError(
        f"cannot tell how {type(tokenizer).__name__} encodes bytes in its tokens (not byte-level BPE, "
        "not SentencePiece); build the Vocabulary from token bytes directly"
    )


def _piece_to_bytes(piece: str, kind: str) -> bytes:
    if kind == "byte_level":
        table = gpt2_unicode_to_byte()
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:
            return piece.encode("utf-8")  # an added non-special token stored as plain text
    if kind == "sentencepiece":
        m = _BYTE_FALLBACK.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")
