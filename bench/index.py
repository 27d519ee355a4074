"""Token-trie fact index: build time, size per fact and per-step mask latency at 100k / 1M / 10M facts,
beside marisa-trie and a Python dict trie (GENRE's two approaches) on the same facts in the same run.

Facts are synthetic but made of real Llama-3 tokens: entities are 1-4 capitalised word pieces of the
vocabulary (" Kar" " Wood" ...), relations are 24 phrases tokenized with the real Llama-3 tokenizer, and a
fact is `entity relation entity .` (subjects have ~5 facts each, objects are entities). Token sequences are
generated directly in numpy, so the 10M build measures the index, not the tokenizer.

Per-step latency: for 2,000 random stored facts, a matcher walks the fact token by token; each step's
`fill_bitmask` into a (1, 4008) int32 torch bitmask (the ABI every decode loop passes) is timed with
perf_counter_ns. Peers are timed on the same walks doing GENRE's `get(prefix)` plus writing the same
bitmask row from the list (memset + set bits). Each size runs in a fresh subprocess (clean peak RSS).

    .venv/bin/python bench/index.py                          # 100k and 1M, all three engines
    .venv/bin/python bench/index.py --sizes 10M --peers marisa    # the 10M point
    .venv/bin/python bench/index.py --json bench/results/index.json

Peers: `pip install marisa-trie` (a missing one is reported and skipped). The dict trie needs ~1.5 KB of
RAM per fact, so it is not run at 10M on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from constrain.assets import load_tokenizer, load_vocabulary
from constrain.bitmask import bitmask_words
from constrain.index.trie import TokenBatch, TrieIndex, build_trie, set_token_bits, trie_constraint

RELATIONS = [
    "is located in", "was born in", "is the capital of", "has the capital", "is a member of",
    "was founded by", "is married to", "works for", "is part of", "has the currency", "borders",
    "is the author of", "was directed by", "plays for", "is headquartered in", "speaks",
    "is a subsidiary of", "studied at", "has the official language", "is named after",
    "won the award", "is the mayor of", "flows into", "was designed by",
]  # fmt: skip
FACTS_PER_SUBJECT = 5
WALKS = 2000


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


# -- synthetic facts over the Llama-3 vocabulary -------------------------------------------------------------
class FactGenerator:
    """Batches of facts `entity relation entity .` as real Llama-3 token ids (deterministic per seed)."""

    def __init__(self, n_facts: int, seed: int = 0):
        vocab = load_vocabulary("llama3")
        tokenizer = load_tokenizer("llama3")
        pieces = [
            i
            for i, b in enumerate(vocab.token_bytes)
            if i not in vocab.special_ids
            and len(b) >= 4
            and b[:1] == b" "
            and b[1:2].isupper()
            and b[2:].isalpha()
        ]
        self.pieces = np.asarray(pieces, dtype=np.int32)
        encoded = [tokenizer.encode(" " + r, add_special_tokens=False) for r in RELATIONS]
        width = max(len(e) for e in encoded)
        self.relations = np.full((len(encoded), width), -1, dtype=np.int32)
        for i, e in enumerate(encoded):
            self.relations[i, : len(e)] = e
        self.dot = tokenizer.encode(".", add_special_tokens=False)
        assert len(self.dot) == 1
        self.n_facts = n_facts
        self.n_entities = max(n_facts // FACTS_PER_SUBJECT, 1)
        rng = np.random.default_rng(seed)
        lengths = rng.choice([1, 2, 3, 4], p=[0.15, 0.45, 0.3, 0.1], size=self.n_entities)
        self.entities = rng.choice(self.pieces, size=(self.n_entities, 4)).astype(np.int32)
        self.entities[np.arange(4)[None, :] >= lengths[:, None]] = -1
        self.seed = seed

    def batches(self, batch: int = 1_000_000):
        rng = np.random.default_rng(self.seed + 1)
        for start in range(0, self.n_facts, batch):
            n = min(batch, self.n_facts - start)
            subject = rng.integers(0, self.n_entities, n)
            relation = rng.integers(0, len(self.relations), n)
            obj = rng.integers(0, self.n_entities, n)
            rows = np.concatenate(
                [self.entities[subject], self.relations[relation], self.entities[obj],
                 np.full((n, 1), self.dot[0], dtype=np.int32)], axis=1,
            )  # fmt: skip
            keep = rows >= 0
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(keep.sum(axis=1), out=offsets[1:])
            yield TokenBatch(rows[keep], offsets)


def sample_walks(index: TrieIndex, n: int, seed: int = 0) -> list[list[int]]:
    """n stored facts drawn uniformly: descend the trie, picking children in proportion to leaf counts."""
    rng = np.random.default_rng(seed)
    a = index.arrays
    walks = []
    for _ in range(n):
        c, fact = 0, []
        while True:
            fact.extend(int(t) for t in a.labels[a.label_start[c] : a.label_start[c + 1]])
            cs, ce = int(a.child_start[c]), int(a.child_start[c + 1])
            weights = np.cumsum(a.leaf_count[cs:ce], dtype=np.int64)
            end = int(a.terminal[c])
            pick = int(rng.integers(0, end + (int(weights[-1]) if ce > cs else 0)))
            if pick < end:
                break
            c = cs + int(np.searchsorted(weights, pick - end, side="right"))
        walks.append(fact)
    return walks


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean()), "steps": int(a.size)}  # fmt: skip


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- peers: GENRE's two tries (genre/trie.py), faithfully ---------------------------------------------
class DictTrie:
    """GENRE's `Trie`: nested dicts; `get(prefix)` walks from the root and lists the children's keys."""

    def __init__(self, sequences):
        self.trie_dict: dict = {}
        for sequence in sequences:
            node = self.trie_dict
            for t in sequence:
                node = node.setdefault(t, {})

    def get(self, prefix):
        node = self.trie_dict
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node.keys())


class MarisaTrie:
    """GENRE's `MarisaTrie`: sequences as strings of one char per token in a marisa trie; `get(prefix)` lists
    the keys under the prefix and collects the next char of each (the first branch is cached)."""

    OFFSET = 0x10000  # past the surrogates, so every token id maps to a valid code point

    def __init__(self, sequences):
        import marisa_trie

        first = set()
        keys = []
        for s in sequences:
            first.add(s[0])
            keys.append("".join(chr(t + self.OFFSET) for t in s))
        self.zero_iter = sorted(first)
        self.trie = marisa_trie.Trie(keys)

    def get(self, prefix):
        if not prefix:
            return self.zero_iter
        key = "".join(chr(t + self.OFFSET) for t in prefix)
        n = len(key)
        return list({ord(e[n]) - self.OFFSET for e in self.trie.keys(key) if len(e) > n})


def time_peer(peer, walks, words: np.ndarray) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for fact in walks:
        for i in range(len(fact)):
            start = clock()
            allowed = peer.get(fact[:i])
            words[:] = 0
            set_token_bits(words, np.asarray(allowed, dtype=np.int64))
            samples.append(clock() - start)
            assert fact[i] in allowed
    return samples


# -- one size, in its own process -------------------------------------------------------------------
def run_one(n_facts: int, peers: list[str], workdir: Path) -> dict:
    vocab = load_vocabulary("llama3")
    result: dict = {"facts_requested": n_facts, "vocab": "llama3", "vocab_size": vocab.vocab_size}
    gen = FactGenerator(n_facts)
    t0 = time.perf_counter()
    batches = list(gen.batches())
    result["generate_s"] = time.perf_counter() - t0
    warm = FactGenerator(2000, seed=1)  # compile (or load cached) numba kernels outside the timing
    build_trie(list(warm.batches()), workdir / "warm-up", vocab=vocab, progress=False)
    out = workdir / f"trie-{n_facts}"
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = build_trie(batches, out, vocab=vocab, progress=False)
    build_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = index.stats()
    result["constrain"] = {
        "build_s": build_s,
        "facts_per_min": s["facts"] / build_s * 60,
        "facts": s["facts"],
        "nodes": s["nodes"],
        "tokens": s["fact_tokens"],
        "mean_tokens_per_fact": s["mean_depth"],
        "bytes": s["bytes"],
        "bytes_per_fact": s["bytes_per_fact"],
        "vs_int32_token_ids": s["bytes_vs_int32_tokens"],
        "peak_rss_mb_process": peak,
        "rss_before_build_mb": rss0,
    }
    walks = sample_walks(index, WALKS)
    compiled = trie_constraint(index).compile(vocab)
    mask = torch.zeros((1, bitmask_words(vocab.vocab_size)), dtype=torch.int32)
    clock = time.perf_counter_ns
    for _ in range(2):  # the first pass warms numba and the page cache
        samples, root = [], []
        for fact in walks:
            m = compiled.matcher()
            for i, t in enumerate(fact):
                start = clock()
                m.fill_bitmask(mask, 0)
                elapsed = clock() - start
                samples.append(elapsed)
                if i == 0:
                    root.append(elapsed)
                if not m.accept(t):
                    raise AssertionError("a stored fact was rejected")
            assert m.is_accepting()
    result["constrain"]["fill"] = percentiles(samples)
    result["constrain"]["fill_root_step"] = percentiles(root)
    del batches
    gc.collect()

    sequences = None
    words = np.zeros(bitmask_words(vocab.vocab_size), dtype=np.int32)
    for name in peers:
        if sequences is None:
            sequences = [list(map(int, f)) for f in index.facts()]
        cls = {"dict": DictTrie, "marisa": MarisaTrie}[name]
        try:
            rss0 = rss_mb()
            t0 = time.perf_counter()
            peer = cls(sequences)
            build_s = time.perf_counter() - t0
        except ImportError as exc:
            result[name] = {"skipped": str(exc)}
            continue
        info: dict = {"build_s": build_s, "facts_per_min": len(sequences) / build_s * 60,
                      "rss_growth_mb": rss_mb() - rss0}  # fmt: skip
        if name == "marisa":
            path = workdir / "marisa.bin"
            peer.trie.save(str(path))
            info["bytes"] = path.stat().st_size
            info["bytes_per_fact"] = info["bytes"] / len(sequences)
        else:
            info["bytes_per_fact_rss"] = info["rss_growth_mb"] * 2**20 / len(sequences)
        time_peer(peer, walks[:200], words)  # warm-up
        info["fill"] = percentiles(time_peer(peer, walks, words))
        result[name] = info
        del peer
        gc.collect()
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100k,1M", help="comma-separated fact counts (e.g. 100k,1M,10M)")
    parser.add_argument("--peers", default="marisa,dict", help="peers to run: marisa, dict (or 'none')")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder)")
    args = parser.parse_args()
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    if args.one is not None:
        work = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir))
        try:
            print(json.dumps(run_one(args.one, peers, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    results = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(size), "--peers", ",".join(peers) or "none"]
        if args.workdir:
            cmd += ["--workdir", str(args.workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {size} failed")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print_table(results[-1:])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


def print_table(results: list[dict]) -> None:
    """Markdown tables of one or more sizes."""
    head = [
        "engine",
        "build s",
        "facts/min",
        "bytes/fact",
        "vs int32 ids",
        "fill p50 us",
        "fill p99 us",
        "mean us",
    ]
    for r in results:
        c = r["constrain"]
        print(f"\n{c['facts']:,} facts ({c['tokens']:,} tokens, {c['mean_tokens_per_fact']:.1f} per fact; "
              f"generated in {r['generate_s']:.1f} s)\n")  # fmt: skip
        rows = [head, ["---"] * len(head)]
        f = c["fill"]
        rows.append(["constrain trie", f"{c['build_s']:.1f}", f"{c['facts_per_min'] / 1e6:.2f}M",
                     f"{c['bytes_per_fact']:.1f}", f"{c['vs_int32_token_ids']:.2f}x", f"{f['p50_us']:.2f}",
                     f"{f['p99_us']:.2f}", f"{f['mean_us']:.2f}"])  # fmt: skip
        for name, label in (("marisa", "marisa-trie (GENRE)"), ("dict", "dict trie (GENRE)")):
            p = r.get(name)
            if p is None:
                continue
            if "skipped" in p:
                rows.append([label, f"skipped: {p['skipped']}"] + [""] * 6)
                continue
            size = (
                f"{p['bytes_per_fact']:.1f}"
                if "bytes_per_fact" in p
                else f"{p['bytes_per_fact_rss']:.0f} (RSS)"
            )
            g = p["fill"]
            rows.append([label, f"{p['build_s']:.1f}", f"{p['facts_per_min'] / 1e6:.2f}M", size, "",
                         f"{g['p50_us']:.2f}", f"{g['p99_us']:.2f}", f"{g['mean_us']:.2f}"])  # fmt: skip
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))
        root = c["fill_root_step"]
        print(f"\nconstrain: first step (root) p50 {root['p50_us']:.1f} us, p99 {root['p99_us']:.1f} us; "
              f"{c['nodes']:,} nodes; peak RSS {c['peak_rss_mb_process']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
