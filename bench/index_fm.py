"""FM-index corpus constraint: build time, size, and per-step mask time on real token corpora.

Corpus: the Python standard library's own source files (`*.py` under `sysconfig`'s stdlib folder, sorted by
path, one document per file), tokenized with the Llama-3 tokenizer (`constrain.assets`), cut at ~100k and ~1M
tokens. Sentence starts for `start="sentence"` are line starts (the token after one that contains a newline).

Per-step timing follows "quoting" walks, as a model that copies from the corpus would: each walk starts at a
random admissible start (any token, a document start, or a line start), then accepts the corpus's own next
tokens for up to 32 steps, timing `matcher.fill_bitmask(bitmask, 0)` on a CPU torch int32 bitmask (the ABI)
before every step. Step 0 (the empty span) copies the precomputed start mask; step 1 usually has the widest
range (thousands of occurrences), so it is also reported on its own. Each mode runs twice: with the wide-range
mask cache off (every mask computed), then on (starting empty, warmed only by the walks themselves).
`kernel` times `CompiledFM.fill_words` alone (no cache, no bitmask checks; the kernel writes the whole row).

    .venv/bin/python bench/index_fm.py                 # ~100k and ~1M tokens
    .venv/bin/python bench/index_fm.py --sizes 100000 --walks 100
"""

from __future__ import annotations

import argparse
import os
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from constrain import allocate_bitmask, compile  # noqa: E402
from constrain.assets import load_tokenizer, load_vocabulary  # noqa: E402
from constrain.index.fm import WIDE_RANGE, FMIndex, fm_constraint  # noqa: E402


def stdlib_corpus(tokenizer, target: int) -> list[list[int]]:
    """Whole stdlib source files, tokenized in path order, until `target` tokens are reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[list[int]] = []
    total = 0
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    for start in range(0, len(files), 64):
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files[start : start + 64]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if total >= target:
                return docs
            docs.append(ids)
            total += len(ids)
    return docs


def line_starts(tokenizer, docs: list[list[int]]) -> list[list[int]]:
    newline = {t for t in {t for d in docs for t in d} if "\n" in tokenizer.decode([t])}
    return [[i + 1 for i, t in enumerate(d[:-1]) if t in newline] for d in docs]


def percentiles(values_us: list[float]) -> str:
    a = np.asarray(values_us)
    return f"{np.percentile(a, 50):.1f} / {np.percentile(a, 99):.1f} / {a.mean():.1f}"


def walk_times(compiled, docs, starts, mode: str, walks: int, rng: np.random.Generator):
    """Fill and accept times (µs) along quoting walks; returns (all fills, step-1 fills, kernel, accepts)."""
    flat = [(d, i) for d, doc in enumerate(docs) for i in range(len(doc))]
    if mode == "document":
        begins = [(d, 0) for d, doc in enumerate(docs) if doc]
    elif mode == "sentence":
        begins = [(d, i) for d, doc in enumerate(docs) if doc for i in sorted(set(starts[d]) | {0})]
    else:
        begins = flat
    bitmask = allocate_bitmask(1, compiled.vocab.vocab_size)
    scratch = np.zeros(bitmask.shape[1], dtype=np.uint32)
    fills, first, kernel, accepts = [], [], [], []
    for _ in range(walks):
        d, i = begins[int(rng.integers(len(begins)))]
        doc = docs[d]
        matcher = compiled.matcher()
        for step in range(min(32, len(doc) - i) + 1):
            t0 = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            t1 = time.perf_counter()
            fills.append((t1 - t0) * 1e6)
            if step == 1:
                first.append((t1 - t0) * 1e6)
            if step:
                t0 = time.perf_counter()
                compiled.fill_words(matcher.span_range(), step, scratch)
                kernel.append((time.perf_counter() - t0) * 1e6)
            if step == min(32, len(doc) - i):
                break
            t0 = time.perf_counter()
            ok = matcher.accept(doc[i + step])
            accepts.append((time.perf_counter() - t0) * 1e6)
            if not ok:  # a special token inside the file: the quote ends there
                break
    return fills, first, kernel, accepts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--walks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = load_tokenizer("llama3")
    vocab = load_vocabulary("llama3")
    print(
        f"# FM-index benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, vocabulary llama3 ({vocab.vocab_size} ids), "
        f"load average (1 min) {os.getloadavg()[0]:.2f}"
    )
    print(
        "\n| corpus tokens | docs | distinct ids | build (s) any/doc | build (s) +sentences | bytes/token "
        "| bytes/token +sentences | save (ms) | load+verify (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    # Warm-up outside the timings: numba loads its cached kernels, the vocabulary builds its id tables.
    warm = compile(fm_constraint(FMIndex.build([[1, 2, 3]], vocab_size=vocab.vocab_size)), vocab).matcher()
    warm.accept(1)
    warm.fill_bitmask(allocate_bitmask(1, vocab.vocab_size), 0)
    results = []
    for size in args.sizes:
        docs = stdlib_corpus(tokenizer, size)
        starts = line_starts(tokenizer, docs)
        t0 = time.perf_counter()
        index = FMIndex.build(docs, vocab_size=vocab.vocab_size)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        with_sentences = FMIndex.build(docs, vocab_size=vocab.vocab_size, sentence_starts=starts)
        build_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with_sentences.save(tmp)
            save = time.perf_counter() - t0
            t0 = time.perf_counter()
            FMIndex.load(tmp)
            load = time.perf_counter() - t0
        n = index.n_tokens
        print(
            f"| {n:,} | {index.n_documents} | {index.tokens.shape[0]:,} | {build:.2f} | {build_s:.2f} "
            f"| {index.nbytes / n:.2f} | {with_sentences.nbytes / n:.2f} "
            f"| {save * 1e3:.0f} | {load * 1e3:.0f} |"
        )
        results.append((n, index, with_sentences, docs, starts))

    print(
        "\nPer-step `fill_bitmask` in µs, p50 / p99 / mean (quoting walks, "
        f"{args.walks} per row; accept = one incremental step):\n"
    )
    print(
        "| corpus tokens | start | mask cache | compile (ms) | steps | fill, all steps | fill, step 1 "
        "| kernel only | accept |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, index, with_sentences, docs, starts in results:
        for mode in ("any", "document", "sentence"):
            source = with_sentences if mode == "sentence" else index
            t0 = time.perf_counter()
            compiled = compile(fm_constraint(source, start=mode), vocab)
            comp = (time.perf_counter() - t0) * 1e3
            for cache in ("off", "on"):
                compiled.wide_range = WIDE_RANGE if cache == "on" else n + 2  # no range is that wide
                rng = np.random.default_rng(args.seed)  # the same walks both times
                fills, first, kernel, accepts = walk_times(compiled, docs, starts, mode, args.walks, rng)
                print(
                    f"| {n:,} | {mode} | {cache} | {comp:.0f} | {len(fills)} | {percentiles(fills)} "
                    f"| {percentiles(first)} | {percentiles(kernel)} | {percentiles(accepts)} |"
                )
    print(
        "\nThe widest ranges (spans of one token, cache off): fill_bitmask, best of 20 calls, so scheduler "
        "preemption does not count:\n"
    )
    print("| corpus tokens | start | token | occurrences | allowed next | best fill (µs) |")
    print("|---|---|---|---|---|---|")
    bitmask = allocate_bitmask(1, vocab.vocab_size)
    for n, index, with_sentences, docs, starts in results:
        for mode in ("any", "sentence"):
            source = with_sentences if mode == "sentence" else index
            compiled = compile(fm_constraint(source, start=mode), vocab)
            compiled.wide_range = n + 2
            if mode == "any":
                firsts = np.concatenate([np.asarray(d) for d in docs])
            else:
                firsts = np.asarray([d[i] for d, s in zip(docs, starts, strict=True) if d for i in {0, *s}])
            ids, counts = np.unique(firsts, return_counts=True)
            for token in ids[np.argsort(-counts, kind="stable")[:5]]:
                matcher = compiled.matcher()
                matcher.accept(int(token))
                best = min(_timed(matcher.fill_bitmask, bitmask, 0) for _ in range(20))
                lo, hi = matcher.span_range()
                allowed = len(set(matcher.allowed_tokens().tolist()) - vocab.eos_ids)
                name = tokenizer.decode([int(token)])
                print(f"| {n:,} | {mode} | `{name!r}` | {hi - lo:,} | {allowed:,} | {best:.0f} |")
            compiled.wide_range = WIDE_RANGE
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e6


if __name__ == "__main__":
    main()
