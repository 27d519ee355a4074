"""A PostgreSQL backend for the token trie (`TrieStore`), so many inference servers share one index.

    store = upload_trie("kb/", "postgresql://user@db:5432/facts?table=airports")   # once, with COPY
    store = PostgresTrieStore("postgresql://user@db:5432/facts?table=airports")    # on every server
    constraint = trie_constraint(store)                                             # the usual matcher

Layout (ReFactX keeps one row per token prefix, keyed by the prefix; here, one row per node of the
path-compressed tree that `build_trie` lays out, keyed by its breadth-first id, so a base of F facts has at
most 2F + 1 rows and no prefix is stored twice):

    TABLE <name>        id bigint PRIMARY KEY   node c (0 = root), breadth first
                        label int4[]            tokens on the edge into c (empty for the root)
                        child_start bigint      c's children are the ids child_start .. child_start + n - 1
                        child_tokens int4[]     the first label token of each child, ascending (n of them)
                        leaf_count bigint       facts at or below c
                        terminal boolean        a fact ends at c
    TABLE <name>_meta   one row: format, version, build_id, n_facts, n_nodes, max_len, meta (jsonb),
                        tokens (int4[]: every token id that occurs)

Node ids are those of `TrieIndex` (`pack_node(c, k)`: k tokens of c's label consumed), so a PostgreSQL store
and the memory-mapped index it was uploaded from give the same ids and the same masks. Reads go through a
bounded LRU cache of rows (`cache_size`); a miss fetches the node and its descendants breadth first down to
`prefetch_depth` levels (at most `prefetch_rows` rows) in one recursive query, so a matcher walking down a
fact usually finds the next node cached. See docs/qa.md.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from constrain.errors import ConstraintError, IndexFormatError

from .trie import FORMAT, VERSION, TrieIndex, TrieStore, build_trie, pack_node, set_token_bits, unpack_node

DEFAULT_TABLE = "constrain_trie"
DEFAULT_CACHE_SIZE = 1 << 16
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,49}$")
_SCHEMES = ("postgresql", "postgres")


class PostgresStoreError(ConstraintError):
    """A PostgreSQL trie store that cannot be used: a bad URL, an unreachable server, a missing table."""


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        raise PostgresStoreError(
            "the PostgreSQL backend needs psycopg 3: pip install 'psycopg[binary]'"
        ) from exc
    return psycopg


def is_postgres_url(text: str | os.PathLike) -> bool:
    """True if `text` is a postgresql:// (or postgres://) URL."""
    return isinstance(text, str) and text.split("://", 1)[0].lower() in _SCHEMES and "://" in text


def parse_url(url: str, table: str | None = None) -> tuple[str, str, str]:
    """(libpq connection URL, table name, the URL without its password for messages) of a store URL.

    The table comes from `table`, else the URL's `?table=NAME` parameter, else `constrain_trie`; it must be a
    plain identifier (letters, digits, underscore; at most 50 characters). A `connect_timeout` of 10 s is
    added unless the URL sets one, so an unreachable server fails instead of hanging. Raises
    `PostgresStoreError` for another scheme or a bad table name.
    """
    if not isinstance(url, str) or not is_postgres_url(url):
        shown = url if isinstance(url, str) else type(url).__name__
        raise PostgresStoreError(
            f"not a PostgreSQL URL: {shown!r} (expected postgresql://user@host:port/database?table=NAME)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise PostgresStoreError(f"bad PostgreSQL URL {url!r}: {exc}") from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    name = table if table is not None else query.pop("table", DEFAULT_TABLE)
    query.pop("table", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PostgresStoreError(
            f"bad table name {name!r} in {parts.scheme}://{parts.hostname}{parts.path}: use letters, digits "
            "and underscores (at most 50, not starting with a digit)"
        )
    query.setdefault("connect_timeout", "10")
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
    host = parts.hostname or "localhost"
    where = f"{parts.scheme}://{parts.username + '@' if parts.username else ''}{host}"
    where += f"{':' + str(parts.port) if parts.port else ''}{parts.path}?table={name}"
    return conninfo, name, where


def _connect(conninfo: str, where: str) -> Any:
    psycopg = _psycopg()
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split())
        raise PostgresStoreError(f"cannot connect to PostgreSQL at {where}: {detail}") from None


@dataclass(frozen=True)
class _Node:
    """One row: a compressed node."""

    label: np.ndarray  # int32
    child_start: int
    child_tokens: np.ndarray  # int32, ascending
    leaf_count: int
    terminal: bool


class PostgresTrieStore(TrieStore):
    """A token trie read from a PostgreSQL table written by `upload_trie` (see the module docstring).

    Args:
        url: `postgresql://user:password@host:port/database?table=NAME` (libpq URL; `table` defaults to
            `constrain_trie`).
        table: overrides the URL's table.
        cache_size: the most rows kept in the client-side LRU cache (>= 1).
        prefetch_depth: levels of descendants fetched with a missing node (0 = the node alone).
        prefetch_rows: the most rows one fetch returns (>= 1).

    Thread-safe: one connection, used under a lock. Raises `PostgresStoreError` for a bad URL, a server that
    cannot be reached, or a missing table; `IndexFormatError` for a table of another format or version, or
    rows that contradict the layout.
    """

    def __init__(
        self,
        url: str,
        *,
        table: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        prefetch_depth: int = 2,
        prefetch_rows: int = 256,
    ):
        for name, value, low in (
            ("cache_size", cache_size, 1),
            ("prefetch_depth", prefetch_depth, 0),
            ("prefetch_rows", prefetch_rows, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise PostgresStoreError(f"{name} must be an int >= {low}, got {value!r}")
        self.conninfo, self.table, self.where = parse_url(url, table)
        self.cache_size = cache_size
        self.prefetch_depth = prefetch_depth
        self.prefetch_rows = prefetch_rows
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, _Node] = OrderedDict()
        self.hits = self.misses = self.queries = self.rows_fetched = 0
        self._conn = _connect(self.conninfo, self.where)
        try:
            self._read_meta()
        except BaseException:
            self._conn.close()
            raise
        sql = _psycopg().sql
        self._fetch_sql = sql.SQL(
            """WITH RECURSIVE sub AS (
                 SELECT id, label, child_start, child_tokens, leaf_count, terminal, 0 AS depth
                   FROM {t} WHERE id = %(id)s
               UNION ALL
                 SELECT n.id, n.label, n.child_start, n.child_tokens, n.leaf_count, n.terminal, sub.depth + 1
                   FROM sub JOIN {t} n ON n.id >= sub.child_start
                                      AND n.id < sub.child_start + cardinality(sub.child_tokens)
                  WHERE sub.depth < %(depth)s)
               SELECT id, label, child_start, child_tokens, leaf_count, terminal FROM sub LIMIT %(limit)s"""
        ).format(t=sql.Identifier(self.table))

    # -- metadata ---------------------------------------------------------------------------------------
    def _read_meta(self) -> None:
        psycopg = _psycopg()
        sql = psycopg.sql
        query = sql.SQL(
            "SELECT format, version, build_id, n_facts, n_nodes, max_len, meta, tokens FROM {}"
        ).format(sql.Identifier(self.table + "_meta"))
        try:
            rows = self._conn.execute(query).fetchall()
        except psycopg.errors.UndefinedTable:
            raise PostgresStoreError(
                f"no trie table at {self.where}: table {self.table + '_meta'!r} does not exist (upload an "
                "index first: constrain.index.postgres.upload_trie(index, url))"
            ) from None
        except psycopg.Error as exc:
            raise PostgresStoreError(f"cannot read {self.table}_meta at {self.where}: {exc}") from None
        if len(rows) != 1:
            raise IndexFormatError(f"{self.where}: {self.table}_meta has {len(rows)} rows, expected 1")
        fmt, version, build_id, n_facts, n_nodes, max_len, meta, tokens = rows[0]
        if fmt != FORMAT or version != VERSION:
            raise IndexFormatError(
                f"{self.where}: table holds format {fmt!r} version {version}, expected {FORMAT!r} version "
                f"{VERSION} (upload the index again)"
            )
        self.build_id = str(build_id)
        self._n_facts = int(n_facts)
        self.n_nodes = int(n_nodes)
        self.max_len = int(max_len)
        self.meta: dict[str, Any] = dict(meta or {})
        self._tokens = np.asarray(sorted(tokens or ()), dtype=np.int64)

    # -- TrieStore --------------------------------------------------------------------------------------
    @property
    def n_facts(self) -> int:
        return self._n_facts

    @property
    def store_id(self) -> str:
        return f"postgres:{self.build_id}"

    def distinct_tokens(self) -> np.ndarray:
        return self._tokens

    def _decode(self, node: int) -> tuple[int, int, _Node]:
        node = int(node)
        c, k = unpack_node(node)
        if node < 0 or not 0 <= c < self.n_nodes or (k == 0 and c != 0):
            raise ConstraintError(f"node id {node} is not a node of {self.where}")
        row = self._row(c)
        if k > len(row.label):
            raise ConstraintError(f"node id {node} is not a node of {self.where}")
        return c, k, row

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        c, k, row = self._decode(node)
        if k < len(row.label):
            return row.label[k : k + 1].copy(), np.array([int(node) + 1], dtype=np.int64)
        ids = (np.arange(len(row.child_tokens), dtype=np.int64) + row.child_start) << 32 | 1
        return row.child_tokens.copy(), ids

    def child(self, node: int, token: int) -> int:
        c, k, row = self._decode(node)
        if k < len(row.label):
            return int(node) + 1 if int(row.label[k]) == int(token) else -1
        i = int(np.searchsorted(row.child_tokens, token))
        if i < len(row.child_tokens) and int(row.child_tokens[i]) == int(token):
            return pack_node(row.child_start + i, 1)
        return -1

    def leaf_count(self, node: int) -> int:
        return self._decode(node)[2].leaf_count

    def is_terminal(self, node: int) -> bool:
        _, k, row = self._decode(node)
        return k == len(row.label) and row.terminal

    def fill_children(self, node: int, words: np.ndarray) -> None:
        c, k, row = self._decode(node)
        set_token_bits(words, row.label[k : k + 1] if k < len(row.label) else row.child_tokens)

    # -- the cache --------------------------------------------------------------------------------------
    def _row(self, c: int) -> _Node:
        with self._lock:
            row = self._cache.get(c)
            if row is not None:
                self._cache.move_to_end(c)
                self.hits += 1
                return row
            self.misses += 1
            fetched = self._fetch(c)
            if c not in fetched:
                raise IndexFormatError(f"{self.where}: node {c} is missing from table {self.table!r}")
            for node_id, node_row in fetched.items():  # the asked-for row last: it is the most recent
                if node_id != c:
                    self._put(node_id, node_row)
            self._put(c, fetched[c])
            return fetched[c]

    def _put(self, c: int, row: _Node) -> None:
        self._cache[c] = row
        self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _fetch(self, c: int) -> dict[int, _Node]:
        psycopg = _psycopg()
        params = {"id": c, "depth": self.prefetch_depth, "limit": self.prefetch_rows}
        try:
            rows = self._conn.execute(self._fetch_sql, params, prepare=True).fetchall()
        except psycopg.Error as exc:
            raise PostgresStoreError(f"reading node {c} from {self.where} failed: {exc}") from None
        self.queries += 1
        self.rows_fetched += len(rows)
        out = {}
        for node_id, label, child_start, child_tokens, leaf_count, terminal in rows:
            if node_id in self._cache and node_id != c:
                continue  # keep the cached copy; do not refresh its recency for a prefetch
            out[int(node_id)] = self._check_row(
                int(node_id), label, child_start, child_tokens, leaf_count, terminal
            )
        return out

    def _check_row(self, c, label, child_start, child_tokens, leaf_count, terminal) -> _Node:
        label_a = np.asarray(label if label is not None else (), dtype=np.int32)
        tokens_a = np.asarray(child_tokens if child_tokens is not None else (), dtype=np.int32)
        ok = (
            label_a.ndim == 1
            and tokens_a.ndim == 1
            and (len(label_a) > 0) == (c != 0)
            and (tokens_a.size == 0 or (child_start > c and bool(np.all(np.diff(tokens_a) > 0))))
            and child_start + len(tokens_a) <= self.n_nodes
            and leaf_count is not None
            and leaf_count >= 1
            and (tokens_a.size > 0 or terminal)
        )
        if not ok:
            raise IndexFormatError(
                f"{self.where}: row {c} of table {self.table!r} contradicts the trie layout"
            )
        return _Node(label_a, int(child_start), tokens_a, int(leaf_count), bool(terminal))

    def cache_info(self) -> dict[str, int]:
        """Cache statistics: rows cached now, the bound, hits, misses, queries sent, rows fetched."""
        with self._lock:
            return {
                "cached": len(self._cache),
                "cache_size": self.cache_size,
                "hits": self.hits,
                "misses": self.misses,
                "queries": self.queries,
                "rows_fetched": self.rows_fetched,
            }

    def clear_cache(self) -> None:
        """Forget every cached row (the statistics are kept)."""
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        """Close the connection (further reads of uncached rows fail)."""
        self._conn.close()

    def __enter__(self) -> PostgresTrieStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresTrieStore({self.where}: {self.n_facts} facts, {self.n_nodes} nodes)"


# ======================================================================================================
# upload
# ======================================================================================================
def _rows(index: TrieIndex):
    """The table rows of an index, in id order (Python objects for COPY)."""
    a = index.arrays
    label_start = np.asarray(a.label_start, dtype=np.int64)
    child_start = np.asarray(a.child_start, dtype=np.int64)
    labels = np.asarray(a.labels)
    first = labels[label_start[1:-1]] if index.n_nodes > 1 else np.zeros(0, dtype=np.int32)
    leaf = np.asarray(a.leaf_count, dtype=np.int64)
    terminal = np.asarray(a.terminal)
    for c in range(index.n_nodes):
        cs, ce = int(child_start[c]), int(child_start[c + 1])
        yield (
            c,
            labels[label_start[c] : label_start[c + 1]].tolist(),
            cs,
            first[cs - 1 : ce - 1].tolist() if ce > cs else [],  # first[i] is node i + 1's first token
            int(leaf[c]),
            bool(terminal[c]),
        )


def upload_trie(
    index: TrieIndex | str | os.PathLike,
    url: str,
    *,
    table: str | None = None,
    overwrite: bool = False,
    **store_options: Any,
) -> PostgresTrieStore:
    """Copy a token trie (a `TrieIndex` or its folder) into PostgreSQL with COPY; returns a store on it.

    Everything happens in one transaction (tables created, rows copied, primary key built, metadata
    written), so readers see the old index or the new one, never a half-written one. Raises
    `PostgresStoreError` if the table exists and `overwrite` is False, or for a bad URL / server;
    `IndexFormatError` for a corrupt index folder. `store_options` go to `PostgresTrieStore`.
    """
    if not isinstance(index, TrieIndex):
        index = TrieIndex.load(index)
    conninfo, name, where = parse_url(url, table)
    psycopg = _psycopg()
    sql = psycopg.sql
    nodes, meta_table = sql.Identifier(name), sql.Identifier(name + "_meta")
    with _connect(conninfo, where) as conn:
        conn.autocommit = False
        try:
            with conn.transaction():
                exists = conn.execute(
                    "SELECT count(*) FROM pg_tables "
                    "WHERE schemaname = current_schema() AND tablename IN (%s, %s)",
                    (name, name + "_meta"),
                ).fetchone()[0]
                if exists and not overwrite:
                    raise PostgresStoreError(
                        f"table {name!r} already exists at {where}: pass overwrite=True to replace it"
                    )
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(nodes, meta_table))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (id bigint NOT NULL, label int4[] NOT NULL, "
                        "child_start bigint NOT NULL, child_tokens int4[] NOT NULL, "
                        "leaf_count bigint NOT NULL, terminal boolean NOT NULL)"
                    ).format(nodes)
                )
                copy_sql = sql.SQL(
                    "COPY {} (id, label, child_start, child_tokens, leaf_count, terminal) FROM STDIN "
                    "(FORMAT BINARY)"
                ).format(nodes)
                with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                    copy.set_types(["int8", "int4[]", "int8", "int4[]", "int8", "bool"])
                    for row in _rows(index):
                        copy.write_row(row)
                conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(nodes))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (format text, version int, build_id text, n_facts bigint, "
                        "n_nodes bigint, max_len int, meta jsonb, tokens int4[])"
                    ).format(meta_table)
                )
                conn.execute(
                    sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(meta_table),
                    (
                        FORMAT,
                        VERSION,
                        index.files.build_id,
                        index.n_facts,
                        index.n_nodes,
                        index.max_len,
                        json.dumps(index.meta),
                        index.distinct_tokens().tolist(),
                    ),
                )
        except psycopg.Error as exc:
            raise PostgresStoreError(f"uploading to {where} failed: {' '.join(str(exc).split())}") from None
    return PostgresTrieStore(url, table=table, **store_options)


def upload_facts(
    sequences: Any,
    url: str,
    *,
    vocab: Any = None,
    meta: dict[str, Any] | None = None,
    table: str | None = None,
    overwrite: bool = False,
    **store_options: Any,
) -> PostgresTrieStore:
    """Build a trie from token sequences (as `build_trie`, in a temporary folder) and upload it."""
    index = build_trie(sequences, None, vocab=vocab, meta=meta, progress=False)
    return upload_trie(index, url, table=table, overwrite=overwrite, **store_options)


def open_trie_store(source: str | os.PathLike | TrieStore, **options: Any) -> TrieStore:
    """A `TrieStore` from an index folder (memory-mapped `TrieIndex`) or a postgresql:// URL
    (`PostgresTrieStore`, with `options`); a store is returned as is."""
    if isinstance(source, TrieStore):
        return source
    if is_postgres_url(str(source)):
        return PostgresTrieStore(str(source), **options)
    if not Path(source).exists():
        raise ConstraintError(f"no index at {source}: give an index folder or a postgresql:// URL")
    return TrieIndex.load(source)


__all__ = [
    "DEFAULT_TABLE",
    "PostgresStoreError",
    "PostgresTrieStore",
    "is_postgres_url",
    "open_trie_store",
    "parse_url",
    "upload_facts",
    "upload_trie",
]
