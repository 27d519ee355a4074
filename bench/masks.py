"""Per-token mask time and compile time for regex constraints: constrain vs outlines-core vs llguidance.

MaskBench's method, on regexes: for each pattern, time the compile (until the first mask is available),
then walk the Llama-3 tokenization of valid instances, asking each engine for the full next-token mask
before each token.
All engines run single-threaded in the same process, side by side.

    .venv/bin/python bench/masks.py                 # table on stdout, JSON + PNG under bench/results/
    .venv/bin/python bench/masks.py --repeat 3      # 3 walks per instance (later ones hit cached states)

Peers are optional: `make bench-deps` installs them; a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from constrain import allocate_bitmask, compile
from constrain.assets import load_tokenizer, load_vocabulary
from constrain.grammars.regex import regex

# (name, pattern, valid instances) — typical structured-output fields.
CASES: list[tuple[str, str, list[str]]] = [
    ("iso_date", r"\d{4}-\d{2}-\d{2}", ["1989-11-09", "2026-02-28"]),
    ("email", r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}", ["ada.lovelace@example.org", "x_y+z@mail.co.uk"]),
    ("phone", r"\+?\d{1,3}[ -]?\(?\d{3}\)?[ -]?\d{3}[ -]?\d{4}", ["+1 (555) 123-4567", "44 020 794 6095"]),
    ("ipv4", r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", ["192.168.0.1", "8.8.4.4"]),
    ("float", r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?", ["3.14159", "-0.5e-10", "42"]),
    (
        "uuid",
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        ["123e4567-e89b-12d3-a456-426614174000"],
    ),
    (
        "json_string",
        r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"',
        ['"hello, world"', '"tab\\there \\u00e9"'],
    ),
    ("identifier_list", r"[A-Za-z_]\w*(, [A-Za-z_]\w*)*", ["alpha, beta_2, Gamma", "x"]),
    ("sentence", r"[A-Z][a-z]+( [a-z]+){2,12}\.", ["The quick brown fox jumps over the lazy dog."]),
    ("label_choice", r"(positive|negative|neutral|mixed)", ["positive", "neutral"]),
    ("url", r"https?://[a-z0-9.-]+(/[A-Za-z0-9._~-]*)*", ["https://example.com/a/b.html", "http://x.org/"]),
    ("free_text", r"[^\n]{1,200}", ["Anything at all, even émojis 🎉 and symbols #$%!"]),
]


class Ours:
    name = "constrain"

    def __init__(self, vocab):
        self.vocab = vocab
        self.mask = allocate_bitmask(1, vocab.vocab_size)

    def compile(self, pattern):
        m = compile(regex(pattern), self.vocab).matcher()
        m.fill_bitmask(self.mask, 0)
        return m

    def fill(self, m):
        m.fill_bitmask(self.mask, 0)

    def accept(self, m, token):
        assert m.accept(token), "constrain refused a valid token"

    def fresh_compile_cache(self):
        from constrain.constraint import clear_compile_cache

        clear_compile_cache()  # also clears the regex -> DFA cache


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab):
        import outlines_core as oc

        self.oc = oc
        eos = min(vocab.eos_ids)
        tokens: dict[bytes, list[int]] = {}
        for i in vocab.ordinary_ids.tolist():
            tokens.setdefault(vocab.token_bytes[i], []).append(i)
        self.ovocab = oc.Vocabulary(eos, tokens)
        self.mask = torch.zeros((vocab.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, pattern):
        guide = self.oc.Guide(self.oc.Index(pattern, self.ovocab))
        self.fill(guide)
        return guide

    def fill(self, guide):
        guide.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)

    def accept(self, guide, token):
        guide.advance(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab):
        import llguidance
        import llguidance.torch as lltorch

        from constrain.assets import CL100K_PATTERN, read_quicktok

        ranks, specials = read_quicktok("llama3")
        self.ll = llguidance
        self.lltorch = lltorch
        self.tok = llguidance.LLTokenizer.from_tiktoken(
            encoder=ranks,
            special_tokens=specials,
            pattern=CL100K_PATTERN,
            eos_token=128009,
            n_vocab=vocab.vocab_size,
        )
        self.mask = lltorch.allocate_token_bitmask(1, vocab.vocab_size)

    def compile(self, pattern):
        grammar = self.ll.grammar_from("regex", pattern)
        m = self.ll.LLMatcher(self.tok, grammar)
        if m.is_error():
            raise RuntimeError(m.get_error())
        self.fill(m)
        return m

    def fill(self, m):
        self.lltorch.fill_next_token_bitmask(m, self.mask, 0)

    def accept(self, m, token):
        assert m.consume_token(token), m.get_error()


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run(repeat: int, out_dir: Path) -> dict:
    vocab = load_vocabulary("llama3")
    tokenizer = load_tokenizer("llama3")
    _ = vocab.trie  # built once per process for every engine of ours; not part of any compile
    engines = [Ours(vocab)]
    for cls in (OutlinesCore, LLGuidance):
        try:
            engines.append(cls(vocab))
        except ImportError as exc:
            print(f"skipping {cls.name}: {exc} (install with `make bench-deps`)")
    results: dict[str, dict] = {
        e.name: {"compile_ms": {}, "mask_us": [], "mask_us_first_walk": [], "valid_refused": []}
        for e in engines
    }
    gc.disable()
    for name, pattern, instances in CASES:
        token_lists = [tokenizer.encode(s, add_special_tokens=False) for s in instances]
        for engine in engines:
            if isinstance(engine, Ours):
                engine.fresh_compile_cache()  # time a cold compile, as the peers' are
            start = time.perf_counter()
            try:
                engine.compile(pattern)
            except Exception as exc:  # noqa: BLE001 - a peer's refusal is a result, recorded as such
                results[engine.name]["compile_ms"][name] = f"error: {exc}"[:80]
                continue
            results[engine.name]["compile_ms"][name] = (time.perf_counter() - start) * 1e3
            for walk in range(repeat):
                for tokens in token_lists:
                    state = engine.compile(pattern)  # a new matcher (ours: from the compile cache)
                    for token in tokens:
                        t0 = time.perf_counter_ns()
                        engine.fill(state)
                        elapsed = (time.perf_counter_ns() - t0) / 1e3
                        results[engine.name]["mask_us_first_walk" if walk == 0 else "mask_us"].append(elapsed)
                        try:
                            engine.accept(state, token)
                        except Exception:  # noqa: BLE001 - a wrong verdict on a valid instance is a result
                            if walk == 0:
                                results[engine.name]["valid_refused"].append(
                                    f"{name}: {instances[token_lists.index(tokens)]!r}"
                                )
                            break
    gc.enable()
    summary = {}
    for engine_name, r in results.items():
        compiles = [v for v in r["compile_ms"].values() if isinstance(v, float)]
        all_masks = r["mask_us_first_walk"] + r["mask_us"]
        summary[engine_name] = {
            "patterns_compiled": len(compiles),
            "compile_ms_p50": statistics.median(compiles) if compiles else None,
            "compile_ms_max": max(compiles) if compiles else None,
            "mask_us_p50": _percentile(all_masks, 50),
            "mask_us_p99": _percentile(all_masks, 99),
            "mask_us_mean": float(np.mean(all_masks)) if all_masks else None,
            "cached_mask_us_p50": _percentile(r["mask_us"], 50),
            "cached_mask_us_p99": _percentile(r["mask_us"], 99),
            "masks": len(all_masks),
            "valid_refused": r["valid_refused"],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "masks.json").write_text(json.dumps({"summary": summary, "raw": results}, indent=1))
    _plot(results, out_dir / "masks_latency.png")
    return summary


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        values = np.sort(np.asarray(r["mask_us_first_walk"] + r["mask_us"]))
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("time to fill one next-token mask (µs, log scale)")
    ax.set_ylabel("fraction of masks")
    ax.set_title("Regex masks, Llama-3 vocabulary (128,256 tokens), single thread")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="walks over each instance (first walk is cold)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    summary = run(args.repeat, args.out)
    header = (
        "| engine | patterns compiled | compile p50 (ms) | compile max (ms) | mask p50 (µs) "
        "| mask p99 (µs) | mask mean (µs) | cached p50 (µs) | cached p99 (µs) | masks "
        "| valid instances refused |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, s in summary.items():
        print(
            f"| {name} | {s['patterns_compiled']}/{len(CASES)} | {s['compile_ms_p50']:.2f} "
            f"| {s['compile_ms_max']:.2f} "
            f"| {s['mask_us_p50']:.1f} | {s['mask_us_p99']:.1f} | {s['mask_us_mean']:.1f} "
            f"| {s['cached_mask_us_p50']:.1f} | {s['cached_mask_us_p99']:.1f} | {s['masks']} "
            f"| {len(s['valid_refused'])} {'; '.join(s['valid_refused'])} |"
        )


if __name__ == "__main__":
    main()
