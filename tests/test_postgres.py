"""PostgreSQL trie store against a real PostgreSQL server started for the session: the same masks and node ids
as the memory-mapped index along random paths, the cache bound, sharing, and errors for bad URLs / tables."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constrain import ConstraintError, IndexFormatError, Vocabulary
from constrain.index.postgres import (
    PostgresStoreError,
    PostgresTrieStore,
    open_trie_store,
    parse_url,
    upload_facts,
    upload_trie,
)
from constrain.index.trie import ROOT, TrieIndex, build_trie, trie_constraint

# -- a real server ------------------------------------------------------------------------------------------
_INSTALL_TRIED = False


def _server_bin() -> Path | None:
    """The folder holding initdb / pg_ctl / postgres (Debian's versioned folders, PATH, or pg_config)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    )
    for folder in candidates:
        if all(os.access(Path(folder) / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    return None


def _install_postgres() -> str:
    """Try `apt-get install -y postgresql` once (as root, with apt-get; after `apt-get update` if the first
    attempt fails); returns what happened, for the skip message."""
    global _INSTALL_TRIED
    if _INSTALL_TRIED:
        return "installation already tried"
    _INSTALL_TRIED = True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get, so it cannot be installed here"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def apt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=900)

    try:
        done = apt("install", "-y", "-q", "postgresql")
        if done.returncode:
            apt("update", "-q")
            done = apt("install", "-y", "-q", "postgresql")
    except subprocess.TimeoutExpired:
        return "apt-get timed out"
    return "installed" if done.returncode == 0 else f"apt-get install postgresql failed: {done.stderr[-300:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server in a temporary folder on a free loopback port, for the whole session.

    As root the server runs as the `postgres` user (created if missing), since PostgreSQL refuses to run as
    root. Installs Debian's `postgresql` package if the binaries are missing; skips only if that fails.
    """
    folder = _server_bin()
    if folder is None:
        what = _install_postgres()
        folder = _server_bin()
        if folder is None:
            pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {what}")
    root = os.geteuid() == 0
    if root:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [str(folder / args[0]), *args[1:]]
        if root:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    tmp = Path(tempfile.mkdtemp(prefix="constrain-pg-"))
    data = tmp / "data"
    if root:
        shutil.chown(tmp, "postgres")
    port = _free_port()
    try:
        done = run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        if done.returncode:
            pytest.fail(f"initdb failed: {done.stderr}")
        options = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        done = run(
            "pg_ctl", "-D", str(data), "-o", options, "-l", str(tmp / "log"), "-w", "-t", "60", "start"
        )
        if done.returncode:
            log = (tmp / "log").read_text() if (tmp / "log").exists() else ""
            pytest.fail(f"pg_ctl start failed: {done.stderr}\n{log[-2000:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


_tables = iter(range(1_000_000))


def fresh_table() -> str:
    return f"t{next(_tables)}_{os.getpid()}"


# -- the tiny vocabulary of tests/test_trie.py ---------------------------------------------------------------
N_ORDINARY = 24
EOS = 24
VOCAB = Vocabulary(
    [bytes([97 + i]) for i in range(N_ORDINARY)] + [b"<eos>", b"<sep>"],
    vocab_size=40,
    special_ids=[EOS, 25],
    eos_ids=[EOS],
    name="tiny",
)
token = st.integers(0, 3) | st.integers(0, N_ORDINARY - 1)
facts_strategy = st.lists(st.lists(token, min_size=1, max_size=7).map(tuple), min_size=1, max_size=30)


def masks_along(matcher, path):
    """The allowed-token sets before each token of `path` and after the last, accepting as it goes."""
    out = [set(matcher.allowed_tokens().tolist())]
    for t in path:
        assert matcher.accept(t)
        out.append(set(matcher.allowed_tokens().tolist()))
    return out


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(facts_strategy, st.data())
def test_postgres_store_gives_the_mmap_stores_masks_and_ids_along_random_paths(postgres_url, facts, data):
    """For random fact sets and random paths (prefixes of facts, continued by random allowed tokens), the
    matcher over the PostgreSQL store writes the same masks as over the memory-mapped index, and the store
    answers children / leaf_count / is_terminal with the same node ids and values."""
    index = build_trie([list(f) for f in facts], None, vocab=VOCAB)
    store = upload_trie(
        index, postgres_url, table=fresh_table(), cache_size=8, prefetch_depth=1, prefetch_rows=4
    )
    with store:
        assert store.n_facts == index.n_facts and store.store_id == f"postgres:{index.files.build_id}"
        assert np.array_equal(store.distinct_tokens(), index.distinct_tokens())
        for no_repeat in (False, True):
            local = trie_constraint(index, no_repeat=no_repeat).compile(VOCAB).matcher()
            remote = trie_constraint(store, no_repeat=no_repeat).compile(VOCAB).matcher()
            for _ in range(3):
                # A random walk by allowed tokens; end_fact at complete facts, as trigger mode does.
                for _step in range(12):
                    allowed = sorted(local.allowed_tokens().tolist())
                    assert set(remote.allowed_tokens().tolist()) == set(allowed)
                    node = local.node
                    assert remote.node == node
                    assert store.children(node)[0].tolist() == index.children(node)[0].tolist()
                    assert store.children(node)[1].tolist() == index.children(node)[1].tolist()
                    assert store.leaf_count(node) == index.leaf_count(node)
                    assert store.is_terminal(node) == index.is_terminal(node)
                    if not allowed:
                        break
                    t = data.draw(st.sampled_from(allowed))
                    if t == EOS:
                        local.end_fact()
                        remote.end_fact()
                        continue
                    assert local.accept(t) and remote.accept(t)
            assert remote.completed_facts() == local.completed_facts()
        for f in facts:
            node = ROOT
            for t in f:
                expected = index.child(node, t)
                node = store.child(node, t)
                assert node == expected >= 0
            assert store.is_terminal(node)


def test_store_walks_every_fact_and_rejects_others(postgres_url):
    """Every fact is a path ending at a terminal node in the store; a token that no fact continues is -1."""
    facts = [(1, 2, 3), (1, 2), (1, 5, 6, 7), (4,), (2, 2, 2, 2, 2, 2)]
    index = build_trie([list(f) for f in facts], None, vocab=VOCAB)
    with upload_trie(index, postgres_url, table=fresh_table()) as store:
        for f in facts:
            node = ROOT
            for t in f:
                node_local = index.child(node, t)
                node = store.child(node, t)
                assert node == node_local and node >= 0
            assert store.is_terminal(node)
        assert store.child(ROOT, 9) == -1
        assert store.child(store.child(ROOT, 1), 9) == -1
        with pytest.raises(ConstraintError, match="not a node"):
            store.children(12345 << 32 | 1)


def test_cache_holds_at_most_cache_size_rows(postgres_url):
    """Walking all facts of a base with ~60 nodes through a store with cache_size=5: the cache never holds
    more than 5 rows, rows are fetched again after eviction, and the answers stay right."""
    rng = np.random.default_rng(0)
    facts = {tuple(rng.integers(0, N_ORDINARY, size=rng.integers(1, 6)).tolist()) for _ in range(40)}
    index = build_trie([list(f) for f in facts], None, vocab=VOCAB)
    table = fresh_table()
    upload_trie(index, postgres_url, table=table).close()
    with PostgresTrieStore(
        postgres_url, table=table, cache_size=5, prefetch_depth=2, prefetch_rows=16
    ) as store:
        for f in sorted(facts):
            node = ROOT
            for t in f:
                expected = index.child(node, t)
                node = store.child(node, t)
                assert node == expected >= 0
                assert store.cache_info()["cached"] <= 5
            assert store.is_terminal(node)
            assert node == _walk(index, f)
        info = store.cache_info()
        assert info["cached"] <= 5 and info["misses"] > 5 and info["queries"] == info["misses"]
        assert info["rows_fetched"] >= info["queries"]


def _walk(index: TrieIndex, fact) -> int:
    node = ROOT
    for t in fact:
        node = index.child(node, t)
    return node


def test_prefetch_fetches_a_subtree_in_one_query(postgres_url):
    """With prefetch_depth=3 a walk down one 4-token fact (a chain of single-child nodes below the root's
    children) costs one query: the root's row brings its descendants along."""
    facts = [(1, 2, 3, 4), (1, 2, 5, 6), (7, 8)]
    index = build_trie([list(f) for f in facts], None, vocab=VOCAB)
    table = fresh_table()
    upload_trie(index, postgres_url, table=table).close()
    with PostgresTrieStore(postgres_url, table=table, prefetch_depth=3, prefetch_rows=100) as store:
        node = ROOT
        for t in facts[0]:
            node = store.child(node, t)
            store.children(node)
        assert store.is_terminal(node)
        assert store.cache_info()["queries"] == 1
        assert store.cache_info()["cached"] == index.n_nodes


def test_two_servers_share_one_table(postgres_url):
    """Two stores (as two inference servers would open) read the same table and give the same masks; an
    upload with overwrite=True replaces it atomically for new readers."""
    facts = [[1, 2, 3], [1, 4], [5]]
    index = build_trie(facts, None, vocab=VOCAB)
    table = fresh_table()
    upload_trie(index, postgres_url, table=table).close()
    url = f"{postgres_url}?table={table}"
    with PostgresTrieStore(url) as a, PostgresTrieStore(url) as b:
        ma = trie_constraint(a).compile(VOCAB).matcher()
        mb = trie_constraint(b).compile(VOCAB).matcher()
        for t in (1, 4):
            assert set(ma.allowed_tokens().tolist()) == set(mb.allowed_tokens().tolist())
            assert ma.accept(t) and mb.accept(t)
        assert ma.is_accepting() and mb.is_accepting()
    other = build_trie([[7, 7]], None, vocab=VOCAB)
    with pytest.raises(PostgresStoreError, match="already exists"):
        upload_trie(other, url)
    with upload_trie(other, url, overwrite=True) as c:
        assert c.n_facts == 1 and c.child(ROOT, 7) > 0 and c.child(ROOT, 1) == -1


def test_upload_facts_builds_and_uploads_and_open_trie_store_dispatches(postgres_url, tmp_path):
    """upload_facts builds from token sequences; open_trie_store opens a URL as a PostgresTrieStore and a
    folder as a TrieIndex."""
    table = fresh_table()
    store = upload_facts([[3, 1], [3, 2]], postgres_url, vocab=VOCAB, table=table, meta={"source": "test"})
    assert store.meta["source"] == "test" and store.meta["vocab_fingerprint"] == VOCAB.fingerprint
    store.close()
    opened = open_trie_store(f"{postgres_url}?table={table}")
    assert isinstance(opened, PostgresTrieStore) and opened.n_facts == 2
    opened.close()
    build_trie([[1]], tmp_path / "kb", vocab=VOCAB)
    assert isinstance(open_trie_store(tmp_path / "kb"), TrieIndex)
    with pytest.raises(ConstraintError, match="no index at"):
        open_trie_store(tmp_path / "missing")


def test_real_vocabulary_facts_round_trip(postgres_url, tokenizers, vocabularies):
    """Airport facts tokenized with SmolLM2: the PostgreSQL store and the mmap index allow the same tokens
    along every fact."""
    from constrain.index.facts import build_fact_index

    triples = [
        ("Heathrow Airport", "is located in the country", "United Kingdom"),
        ("Heathrow Airport", "has the IATA code", "LHR"),
        ("Charles de Gaulle Airport", "is located in the country", "France"),
        ("Haneda Airport", "is located in the country", "Japan"),
    ]
    vocab = vocabularies("smollm2")
    index = build_fact_index(triples, None, tokenizer="smollm2", progress=False)
    with upload_trie(index, postgres_url, table=fresh_table()) as store:
        local = trie_constraint(index).compile(vocab)
        remote = trie_constraint(store).compile(vocab)
        for fact in index.facts():
            a, b = local.matcher(), remote.matcher()
            for t in fact:
                assert np.array_equal(a.allowed_tokens(), b.allowed_tokens())
                assert a.accept(t) and b.accept(t)
            assert a.is_accepting() and b.is_accepting()


# -- errors -------------------------------------------------------------------------------------------------
def test_missing_table_raises_a_clear_error(postgres_url):
    with pytest.raises(PostgresStoreError, match=r"no trie table .*does not exist.*upload"):
        PostgresTrieStore(postgres_url, table="no_such_table")


def test_bad_urls_raise_constraint_errors(postgres_url):
    with pytest.raises(PostgresStoreError, match="not a PostgreSQL URL"):
        PostgresTrieStore("mysql://localhost/db")
    with pytest.raises(PostgresStoreError, match="bad table name"):
        PostgresTrieStore(postgres_url + "?table=drop;table")
    with pytest.raises(PostgresStoreError, match="bad PostgreSQL URL"):
        PostgresTrieStore("postgresql://localhost:notaport/db")
    port = _free_port()  # nothing listens there
    with pytest.raises(PostgresStoreError, match=f"cannot connect to PostgreSQL at .*127.0.0.1:{port}"):
        PostgresTrieStore(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    with pytest.raises(PostgresStoreError, match="cannot connect"):
        PostgresTrieStore(postgres_url.rsplit("/", 1)[0] + "/no_such_database")
    with pytest.raises(PostgresStoreError, match="cache_size"):
        PostgresTrieStore(postgres_url, cache_size=0)
    assert issubclass(PostgresStoreError, ConstraintError)


def test_password_is_not_shown_in_messages():
    conninfo, table, where = parse_url("postgresql://bob:secret@db.example:5432/kb?table=airports")
    assert table == "airports" and "secret" not in where and "table=" not in conninfo
    assert "connect_timeout=10" in conninfo and where == "postgresql://bob@db.example:5432/kb?table=airports"


def test_corrupt_rows_and_wrong_versions_raise_index_format_errors(postgres_url):
    index = build_trie([[1, 2], [1, 3], [4]], None, vocab=VOCAB)
    table = fresh_table()
    upload_trie(index, postgres_url, table=table).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET child_tokens = '{{3, 2}}' WHERE cardinality(child_tokens) = 2")
    with (
        PostgresTrieStore(postgres_url, table=table) as store,
        pytest.raises(IndexFormatError, match="contradicts"),
    ):
        store.children(store.child(ROOT, 1))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"UPDATE {table}_meta SET version = 99")
    with pytest.raises(IndexFormatError, match="version 99"):
        PostgresTrieStore(postgres_url, table=table)


@pytest.mark.slow
def test_qa_over_postgres_writes_the_same_answer_as_over_the_index_folder(postgres_url):
    """Greedy QA with SmolLM2 and the trie read from PostgreSQL writes the same text, and states the same
    facts (all in the base), as with the memory-mapped index it was uploaded from."""
    from constrain.assets import load_model
    from constrain.index.facts import build_fact_index
    from constrain.index.qa import answer_batch

    triples = [
        ("London Heathrow Airport", "is located in the country", "United Kingdom"),
        ("LHR", "is the IATA code of", "London Heathrow Airport"),
        ("JFK", "is the IATA code of", "John F Kennedy International Airport"),
        ("John F Kennedy International Airport", "is located in the country", "United States"),
    ]
    index = build_fact_index(triples, None, tokenizer="smollm2", progress=False)
    model, tokenizer = load_model("smollm2")
    question = ["Which country is the airport LHR in?"]
    with upload_trie(index, postgres_url, table=fresh_table()) as store:
        remote = answer_batch(question, store, model, tokenizer, max_new_tokens=32)[0]
        assert store.cache_info()["queries"] >= 1
    local = answer_batch(question, index, model, tokenizer, max_new_tokens=32)[0]
    assert remote.text == local.text and remote.facts == local.facts
    assert remote.stated and remote.all_in_base
