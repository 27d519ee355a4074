"""`FMIndex`: an FM-index over a corpus of token-id documents, searched left to right.

The corpus `d0, d1, ...` is laid out as the text `T = # d0 # d1 # ... # d_last #` (`#` a separator symbol that
no span contains) and the index is built over `reverse(T) + $`. Extending a span to the right is then one
backward-search step, the rows of a span's occurrences form one suffix-array range, and the tokens that can
follow the span are the distinct BWT symbols in that range. Spans that must start a document are searched as
`# + span`. Tokens are remapped to a dense alphabet of the ids that occur (plus `$` = 0 and `#` = 1), so the
wavelet matrix has `ceil(log2(distinct + 2))` levels rather than `log2(vocab_size)`.

With `sentence_starts`, the index also keeps the forward text and a sparse suffix array of the sentence-start
positions (and of every document start), sorted by suffix, for spans that must begin a sentence.

`save(path)` writes a folder of `.npy` files plus `fm.json` (format version, shapes, dtypes, CRC-32 of every
array); `load(path)` memory-maps the arrays and raises `IndexFormatError` naming the file on any mismatch.
See `docs/fm_index.md` for the design.
"""

from __future__ import annotations

import hashlib
import json
import operator
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from constrain.errors import ConstraintError, IndexFormatError, TokenOutOfRangeError

from .fm_kernels import backward_step, locate_rows, sparse_step
from .suffix_array import MAX_TEXT_LENGTH, suffix_array
from .wavelet import RankBits, WaveletMatrix

StartMode = Literal["any", "document", "sentence"]
START_MODES = ("any", "document", "sentence")
SENTINEL, SEPARATOR, FIRST_TOKEN_SYMBOL = 0, 1, 2

FORMAT_NAME = "constrain-fm-index"
FORMAT_VERSION = 1
HEADER_FILE = "fm.json"

# Arrays that every index has, then the ones that only an index with sentence starts has.
_CORE_ARRAYS = (
    "wm_words",
    "wm_block_rank",
    "wm_zeros",
    "lf_offset",
    "tokens",
    "sample_words",
    "sample_block_rank",
    "samples",
    "doc_starts",
)
_SENTENCE_ARRAYS = ("text", "sentence_suffixes")


class FMIndex:
    """An FM-index over token-id documents (build with `FMIndex.build`, or `FMIndex.load` a saved one).

    Attributes: `vocab_size` (ids are in `[0, vocab_size)`), `n_documents`, `n_tokens` (corpus tokens),
    `sample_rate` (one suffix-array sample per this many text positions), `has_sentences`, `fingerprint`
    (a content hash), `nbytes` (bytes of all arrays), `memory_mapped` (loaded with `load`).
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, vocab_size: int, sample_rate: int, fingerprint: str):
        self.memory_mapped = any(isinstance(a, np.memmap) for a in arrays.values())
        # Plain ndarray views of the same memory: numba unboxes np.memmap arguments ~10x slower.
        arrays = {name: np.asarray(a) for name, a in arrays.items()}
        self._arrays = arrays
        self.vocab_size = int(vocab_size)
        self.sample_rate = int(sample_rate)
        self.fingerprint = fingerprint
        self.wm_words = arrays["wm_words"]
        self.wm_block_rank = arrays["wm_block_rank"]
        self.wm_zeros = arrays["wm_zeros"]
        self.lf_offset = arrays["lf_offset"]
        self.tokens = arrays["tokens"]  # symbol s >= 2 is token tokens[s - 2]; sorted ascending
        self.sample_words = arrays["sample_words"]
        self.sample_block_rank = arrays["sample_block_rank"]
        self.samples = arrays["samples"]
        self.doc_starts = arrays["doc_starts"]  # forward-text position of each document, then len(T)
        self.text = arrays.get("text")  # forward text T + $ (symbols), only with sentence starts
        self.sentence_suffixes = arrays.get("sentence_suffixes")
        self.n_documents = int(self.doc_starts.shape[0] - 1)
        self.text_length = int(self.doc_starts[-1])  # len(T), separators included
        self.n_rows = self.text_length + 1
        self.n_tokens = self.text_length - self.n_documents - 1
        # token id -> symbol, for the per-token `accept` path (numpy's scalar searchsorted costs microseconds)
        self._symbol_of = {int(t): i + FIRST_TOKEN_SYMBOL for i, t in enumerate(self.tokens.tolist())}

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        documents: Iterable[Sequence[int]],
        *,
        vocab_size: int,
        sentence_starts: Iterable[Iterable[int]] | None = None,
        sample_rate: int = 32,
    ) -> FMIndex:
        """Index `documents` (each a sequence of token ids in `[0, vocab_size)`).

        `sentence_starts`, if given, has one entry per document: the token offsets where its sentences start
        (offset 0 of a non-empty document is always one). `sample_rate` trades locate speed (at most
        `sample_rate - 1` LF steps per occurrence) for space (4 / sample_rate bytes per token).

        Raises `ConstraintError` for an empty corpus, a bad `vocab_size`/`sample_rate`, sentence starts that
        do not match the documents, or a corpus too long for int32 positions; `TokenOutOfRangeError` names
        the document and offset of an id outside `[0, vocab_size)`.
        """
        vocab_size = _positive_int(vocab_size, "vocab_size")
        sample_rate = _positive_int(sample_rate, "sample_rate")
        docs = [_document_array(doc, d, vocab_size) for d, doc in enumerate(documents)]
        if not docs or not any(len(doc) for doc in docs):
            raise ConstraintError("FMIndex.build: the corpus has no tokens (no documents or only empty ones)")
        lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
        text_length = int(lengths.sum()) + len(docs) + 1
        if text_length + 1 > MAX_TEXT_LENGTH:
            raise ConstraintError(f"FMIndex.build: corpus of {text_length} symbols exceeds {MAX_TEXT_LENGTH}")
        tokens = np.unique(np.concatenate(docs))
        # Forward text T = # d0 # d1 # ... #, as symbols.
        doc_starts = np.empty(len(docs) + 1, dtype=np.int64)
        doc_starts[0] = 1
        np.cumsum(lengths + 1, out=doc_starts[1:])
        doc_starts[1:] += 1  # the last entry is len(T)
        positions = (
            None if sentence_starts is None else _sentence_positions(sentence_starts, docs, doc_starts)
        )
        forward = np.full(text_length, SEPARATOR, dtype=np.int64)
        for start, doc in zip(doc_starts[:-1], docs, strict=True):
            forward[start : start + len(doc)] = np.searchsorted(tokens, doc) + FIRST_TOKEN_SYMBOL
        sigma = len(tokens) + FIRST_TOKEN_SYMBOL

        # FM-index of reverse(T) + $.
        reversed_text = np.append(forward[::-1], SENTINEL)
        sa = suffix_array(reversed_text)
        bwt = reversed_text[sa - 1]  # sa == 0 wraps to the sentinel
        wm = WaveletMatrix.build(bwt, sigma)
        counts = np.bincount(reversed_text, minlength=sigma)
        c_array = np.concatenate([[0], np.cumsum(counts)[:-1]])
        marked = (sa % sample_rate) == 0
        sample_bits = RankBits.build(marked)
        arrays = {
            "wm_words": wm.words,
            "wm_block_rank": wm.block_rank,
            "wm_zeros": wm.zeros,
            "lf_offset": (c_array - wm.bottom_start).astype(np.int64),
            "tokens": tokens.astype(np.int32),
            "sample_words": sample_bits.words,
            "sample_block_rank": sample_bits.block_rank,
            "samples": sa[marked].astype(np.int32),
            "doc_starts": doc_starts,
        }
        digest = hashlib.sha256(f"{FORMAT_VERSION}|{vocab_size}|{sample_rate}|".encode())
        digest.update(tokens.astype("<i8").tobytes() + b"|" + forward.astype("<i8").tobytes())
        if positions is not None:
            text = np.append(forward, SENTINEL)
            forward_sa = suffix_array(text)
            is_start = np.zeros(text.shape[0], dtype=bool)
            is_start[positions] = True
            # Symbols are < sigma, so most corpora fit the forward text in 2 bytes per token.
            arrays["text"] = text.astype(np.uint16 if sigma <= 1 << 16 else np.int32)
            arrays["sentence_suffixes"] = forward_sa[is_start[forward_sa]].astype(np.int32)
            digest.update(b"sentences|" + positions.astype("<i8").tobytes())
        return cls(
            arrays, vocab_size=vocab_size, sample_rate=sample_rate, fingerprint=digest.hexdigest()[:32]
        )

    # -- queries -----------------------------------------------------------------------------------------
    @property
    def has_sentences(self) -> bool:
        """True if the index was built with `sentence_starts` (needed for `start="sentence"`)."""
        return self.sentence_suffixes is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays (on disk or in memory)."""
        return int(sum(a.nbytes for a in self._arrays.values()))

    def symbol(self, token: int) -> int:
        """The index's symbol for a token id, or -1 if the corpus never contains it.

        Raises `TokenOutOfRangeError` for ids outside `[0, vocab_size)`.
        """
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise TokenOutOfRangeError(
                f"token id {token} out of range [0, {self.vocab_size}) for the FM-index"
            )
        return self._symbol_of.get(token, -1)

    def start_range(self, start: StartMode = "any") -> tuple[int, int]:
        """The range that stands for the empty span: rows of the FM-index (any, document), or entries of the
        sentence suffix array (sentence)."""
        _check_start(start)
        if start == "any":
            return 0, self.n_rows
        if start == "document":  # rows of the suffixes that start with the separator
            return 1, 1 + self.n_documents + 1
        if not self.has_sentences:
            raise ConstraintError('start="sentence" needs an index built with sentence_starts')
        return 0, int(self.sentence_suffixes.shape[0])

    def extend(
        self, span_range: tuple[int, int], depth: int, symbol: int, start: StartMode
    ) -> tuple[int, int]:
        """The range of the span extended by `symbol` (a symbol from `symbol()`); empty if it never occurs.

        `depth` is the span's length so far (used by the sentence suffix array).
        """
        lo, hi = span_range
        if start == "sentence":
            a, b = sparse_step(self.text, self.sentence_suffixes, lo, hi, depth, symbol)
        else:
            a, b = backward_step(
                self.wm_words, self.wm_block_rank, self.wm_zeros, self.lf_offset, lo, hi, symbol
            )
        return int(a), int(b)

    def search(self, pattern: Sequence[int], start: StartMode = "any") -> tuple[int, int]:
        """The range of `pattern`'s occurrences, searched from scratch (one step per token).

        Raises `TokenOutOfRangeError` for an id outside `[0, vocab_size)` (naming its position in `pattern`).
        """
        lo, hi = self.start_range(start)
        for depth, token in enumerate(pattern):
            try:
                symbol = self.symbol(token)
            except TokenOutOfRangeError as exc:
                raise TokenOutOfRangeError(f"pattern position {depth}: {exc}") from None
            if symbol < 0:
                return lo, lo
            lo, hi = self.extend((lo, hi), depth, symbol, start)
            if lo >= hi:
                return lo, lo
        return lo, hi

    def count(self, pattern: Sequence[int], *, start: StartMode = "any") -> int:
        """Number of occurrences of `pattern` (a non-empty token sequence) in the corpus.

        With `start="document"` / `"sentence"` only occurrences at a document / sentence start count.
        Raises `ConstraintError` for an empty pattern, `TokenOutOfRangeError` for a bad id.
        """
        pattern = _check_pattern(pattern)
        lo, hi = self.search(pattern, start)
        return hi - lo

    def locate(
        self, pattern: Sequence[int], *, start: StartMode = "any", limit: int | None = None
    ) -> list[tuple[int, int]]:
        """The occurrences of `pattern` as sorted `(document, token offset)` pairs.

        Each occurrence costs at most `sample_rate - 1` LF steps; `limit` caps how many are located (which
        ones is unspecified, the result is still sorted). Raises as `count` does.
        """
        pattern = _check_pattern(pattern)
        lo, hi = self.search(pattern, start)
        if limit is not None:
            hi = min(hi, lo + max(0, int(limit)))
        if hi <= lo:
            return []
        if start == "sentence":
            positions = np.asarray(self.sentence_suffixes[lo:hi], dtype=np.int64)
        else:
            ends = locate_rows(
                self.wm_words,
                self.wm_block_rank,
                self.wm_zeros,
                self.lf_offset,
                self.sample_words,
                self.sample_block_rank,
                self.samples,
                lo,
                hi,
            )
            # A reversed span starting at j covers forward positions [N - j - m, N - j).
            positions = self.text_length - ends - len(pattern)
        return self.positions_to_documents(positions)

    def positions_to_documents(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """Map forward-text positions to sorted `(document, offset)` pairs."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        docs = np.searchsorted(self.doc_starts, positions, side="right") - 1
        offsets = positions - self.doc_starts[docs]
        return list(zip(docs.tolist(), offsets.tolist(), strict=True))

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the index to the folder `path` (created if needed): one `.npy` per array plus `fm.json`.

        The header is written last, so a folder whose save was interrupted fails to load.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / HEADER_FILE).unlink(missing_ok=True)
        entries = {}
        for name, array in self._arrays.items():
            array = np.ascontiguousarray(array)
            np.save(folder / f"{name}.npy", array, allow_pickle=False)
            entries[name] = {
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "crc32": zlib.crc32(memoryview(array).cast("B")),
            }
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "sample_rate": self.sample_rate,
            "fingerprint": self.fingerprint,
            "arrays": entries,
        }
        (folder / HEADER_FILE).write_text(json.dumps(header, indent=1))

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> FMIndex:
        """Memory-map an index written by `save`.

        Checks the format name and version, every array's file size, dtype and shape, and (with `verify`,
        which reads every page once) its CRC-32. Raises `IndexFormatError` naming the file on any mismatch.
        `verify=False` trusts the arrays' contents: only use it on files you wrote.
        """
        folder = Path(path)
        header_path = folder / HEADER_FILE
        try:
            header = json.loads(header_path.read_text())
        except FileNotFoundError:
            raise IndexFormatError(
                f"{header_path}: missing (not an FM-index folder, or an unfinished save)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{header_path}: unreadable header ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise IndexFormatError(f"{header_path}: not a {FORMAT_NAME} header")
        if header.get("version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{header_path}: format version {header.get('version')!r}, this code reads {FORMAT_VERSION}"
            )
        try:
            entries = dict(header["arrays"])
            vocab_size = int(header["vocab_size"])
            sample_rate = int(header["sample_rate"])
            fingerprint = str(header["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{header_path}: malformed header field {exc}") from None
        names = list(_CORE_ARRAYS) + [n for n in _SENTENCE_ARRAYS if n in entries]
        unknown = set(entries) - set(_CORE_ARRAYS) - set(_SENTENCE_ARRAYS)
        if unknown or any(n not in entries for n in _CORE_ARRAYS) or (len(names) - len(_CORE_ARRAYS)) == 1:
            raise IndexFormatError(f"{header_path}: unexpected set of arrays {sorted(entries)}")
        arrays = {name: _load_array(folder / f"{name}.npy", entries[name], verify) for name in names}
        _check_structure(arrays, header_path, vocab_size, sample_rate)
        return cls(arrays, vocab_size=vocab_size, sample_rate=sample_rate, fingerprint=fingerprint)

    def __repr__(self) -> str:
        return (
            f"FMIndex({self.n_documents} documents, {self.n_tokens} tokens, "
            f"{self.tokens.shape[0]} distinct ids, "
            f"vocab_size {self.vocab_size}, {self.nbytes / max(1, self.n_tokens):.2f} bytes/token"
            f"{', sentences' if self.has_sentences else ''})"
        )


# -- helpers ------------------------------------------------------------------------------------------------
def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise ConstraintError(f"FMIndex.build: {name} must be a positive integer, got {value!r}")
    return int(value)


def _check_start(start: str) -> None:
    if start not in START_MODES:
        raise ConstraintError(f"start must be one of {START_MODES}, got {start!r}")


def _check_pattern(pattern: Sequence[int]) -> list[int]:
    try:
        pattern = [operator.index(t) for t in pattern]
    except TypeError:
        raise ConstraintError(
            f"FM-index pattern must be a sequence of int token ids, got {pattern!r:.80}"
        ) from None
    if not pattern:
        raise ConstraintError("FM-index pattern is empty: give at least one token id")
    return pattern


def _document_array(doc: Sequence[int], d: int, vocab_size: int) -> np.ndarray:
    """Document `d` as an int64 array, checking that it is a 1-D sequence of ids in `[0, vocab_size)`."""
    try:
        array = np.asarray(doc)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"document {d}: not a sequence of token ids ({exc})") from None
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConstraintError(
            f"document {d}: expected a 1-D sequence of int token ids, got {array.dtype} {array.shape}"
        )
    array = array.astype(np.int64)
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise TokenOutOfRangeError(
            f"document {d}, offset {i}: token id {int(array[i])} out of range [0, {vocab_size})"
        )
    return array


def _sentence_positions(
    sentence_starts: Iterable[Iterable[int]], docs: list[np.ndarray], doc_starts: np.ndarray
) -> np.ndarray:
    """Forward-text positions of all sentence starts (document starts included), checked per document."""
    per_doc = list(sentence_starts)
    if len(per_doc) != len(docs):
        raise ConstraintError(f"sentence_starts has {len(per_doc)} entries for {len(docs)} documents")
    positions = []
    for d, (offsets, doc) in enumerate(zip(per_doc, docs, strict=True)):
        offsets = np.asarray(list(offsets), dtype=np.int64)
        bad = offsets[(offsets < 0) | (offsets >= len(doc))]
        if bad.size:
            raise ConstraintError(
                f"sentence_starts[{d}]: offset {int(bad[0])} outside document {d} of {len(doc)} tokens"
            )
        if len(doc):
            positions.append(doc_starts[d] + np.union1d(offsets, [0]))
    return np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)


def _load_array(path: Path, entry: object, verify: bool) -> np.ndarray:
    """Memory-map one `.npy` file and check it against its header entry."""
    try:
        dtype = np.dtype(entry["dtype"])  # type: ignore[index]
        shape = tuple(int(x) for x in entry["shape"])  # type: ignore[index]
        crc = int(entry["crc32"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: malformed header entry ({exc})") from None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise IndexFormatError(f"{path}: corrupt or truncated .npy file ({exc})") from None
    if array.dtype != dtype or array.shape != shape:
        raise IndexFormatError(f"{path}: has {array.dtype} {array.shape}, the header says {dtype} {shape}")
    expected = array.offset + array.nbytes if isinstance(array, np.memmap) else None
    if expected is not None and path.stat().st_size != expected:
        raise IndexFormatError(f"{path}: {path.stat().st_size} bytes, expected {expected}")
    if verify and zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B")) != crc:
        raise IndexFormatError(f"{path}: CRC-32 mismatch (the file is corrupt)")
    return array


def _check_structure(arrays: dict[str, np.ndarray], where: Path, vocab_size: int, sample_rate: int) -> None:
    """Cheap consistency checks between arrays, so the numba kernels never index out of bounds."""

    def fail(message: str) -> None:
        raise IndexFormatError(f"{where}: inconsistent index ({message})")

    if vocab_size < 1 or sample_rate < 1:
        fail(f"vocab_size {vocab_size}, sample_rate {sample_rate}")
    doc_starts = arrays["doc_starts"]
    if (
        doc_starts.ndim != 1
        or doc_starts.shape[0] < 2
        or np.any(np.diff(doc_starts) < 1)
        or doc_starts[0] != 1
    ):
        fail("document starts are not increasing from 1")
    n_rows = int(doc_starts[-1]) + 1
    words, block_rank, zeros = arrays["wm_words"], arrays["wm_block_rank"], arrays["wm_zeros"]
    n_blocks = n_rows // 512 + 1
    if words.ndim != 2 or words.shape[1] != 8 * n_blocks or block_rank.shape != (words.shape[0], n_blocks):
        fail(f"wavelet matrix of shape {words.shape} for {n_rows} rows")
    if zeros.shape != (words.shape[0],) or np.any(zeros < 0) or np.any(zeros > n_rows):
        fail("wavelet matrix zero counts")
    tokens, lf_offset = arrays["tokens"], arrays["lf_offset"]
    sigma = tokens.shape[0] + FIRST_TOKEN_SYMBOL
    if lf_offset.shape != (sigma,) or sigma > 1 << words.shape[0]:
        fail(f"alphabet of {sigma} symbols for {words.shape[0]} levels")
    if tokens.shape[0] and (tokens[0] < 0 or tokens[-1] >= vocab_size or np.any(np.diff(tokens) <= 0)):
        fail("token table not sorted within [0, vocab_size)")
    if arrays["sample_words"].shape != (8 * n_blocks,) or arrays["sample_block_rank"].shape != (n_blocks,):
        fail("sample marks")
    if arrays["samples"].shape != (-(-n_rows // sample_rate),):
        fail(f"{arrays['samples'].shape[0]} suffix-array samples for {n_rows} rows at rate {sample_rate}")
    if "text" in arrays:
        text, suffixes = arrays["text"], arrays["sentence_suffixes"]
        if text.shape != (n_rows,) or text.dtype not in (np.uint16, np.int32) or suffixes.ndim != 1:
            fail("forward text / sentence suffixes")
