"""MaskBench-style evaluation of JSON-schema engines: ours, llguidance, outlines-core and xgrammar, same run.

Each input file (the JSONSchemaBench / MaskBench format) holds a `schema` and `tests: [{valid, data}]`. Per
schema and engine: compile time = time to the first mask (compile + first fill); then, for every test
instance,
the instance is serialised (`json.dumps(data, ensure_ascii=False)`, i.e. ", " and ": " separators), tokenized
with the Llama-3 tokenizer, and walked token by token, asking for the full mask before each token (timed) and
checking that the token is allowed; at the end EOS must be allowed. A valid instance must pass every step, an
invalid one must be refused at some step. A schema passes if it compiles and every instance gets the right
verdict. Each engine runs in its own worker process; a schema that takes longer than `--timeout` seconds
(compile and instances) is a timeout, and the worker is restarted.

    .venv/bin/python bench/maskbench.py /work/shared/data/maskbench-dev --engines ours,llguidance
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ENGINES = ("ours", "llguidance", "outlines", "xgrammar")
# Object property order ours enforces: "schema" (llguidance 1.9 also enforces the schema's order: it refuses
# {"b": 2, "a": 1} for properties a, b) or "any". Set by --property-order; spawned workers read it here.
PROPERTY_ORDER = os.environ.get("MASKBENCH_PROPERTY_ORDER", "schema")


# -- engines: each returns (first-mask function, step function) per schema ----------------------------------
class Engine:
    name = "?"

    def __init__(self, tokenizer, vocab):
        self.tok = tokenizer
        self.vocab = vocab
        self.n_vocab = vocab.vocab_size
        self.eos = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def compile(self, schema: dict):
        """Return a fresh matcher object for `schema` (raise on unsupported)."""
        raise NotImplementedError

    def mask(self, m) -> np.ndarray:
        """Fill and return the mask (int32 words) for matcher `m`."""
        raise NotImplementedError

    def allowed(self, mask: np.ndarray, token: int) -> bool:
        return bool((int(mask[token >> 5]) >> (token & 31)) & 1)

    def accept(self, m, token: int) -> bool:
        raise NotImplementedError


class Ours(Engine):
    name = "ours"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import constrain
        from constrain.grammars.json_schema import json_schema

        self.constrain = constrain
        self.json_schema = json_schema
        self.buf = np.zeros((1, (self.n_vocab + 31) // 32), dtype=np.int32)
        # Tokenizer-level preparation, outside the timings as the peers' tokenizer set-up is: the vocabulary
        # trie, and the numba kernels' first load.
        _ = vocab.trie
        self.mask(self.compile({"type": "string"}))

    def compile(self, schema):
        return self.json_schema(schema, property_order=PROPERTY_ORDER).compile(self.vocab).matcher()

    def mask(self, m):
        m.fill_bitmask(self.buf, 0)
        return self.buf[0]

    def accept(self, m, token):
        return m.accept(token)


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.n_vocab)
        self.buf = llguidance.torch.allocate_token_bitmask(1, self.n_vocab)
        self.fill = llguidance.torch.fill_next_token_bitmask

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": True}
        )
        m = self.ll.LLMatcher(self.lltok, grammar)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def mask(self, m):
        self.fill(m, self.buf, 0)
        return self.buf[0].numpy()

    def accept(self, m, token):
        ok = m.consume_token(token)
        return bool(ok) and not m.is_error()


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import xgrammar

        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.n_vocab, stop_token_ids=[self.eos]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.buf = xgrammar.allocate_token_bitmask(1, self.n_vocab)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=True, strict_mode=False
        )
        return self.xg.GrammarMatcher(compiled)

    def mask(self, m):
        m.fill_next_token_bitmask(self.buf, 0)
        return self.buf[0].numpy()

    def accept(self, m, token):
        return bool(m.accept_token(token))


class Outlines(Engine):
    name = "outlines"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import outlines_core

        self.oc = outlines_core
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and i not in vocab.special_ids:
                mapping.setdefault(b, []).append(i)
        self.ocvocab = outlines_core.Vocabulary(self.eos, mapping)
        self.words = (self.n_vocab + 31) // 32

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        index = self.oc.Index(regex, self.ocvocab)
        return self.oc.Guide(index)

    def mask(self, m):
        out = np.zeros(self.words, dtype=np.int32)
        ids = np.asarray(m.get_tokens(), dtype=np.int64)
        ids = ids[ids < self.n_vocab]
        np.bitwise_or.at(out.view(np.uint32), ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
        return out

    def accept(self, m, token):
        if token == self.eos:  # outlines' advance() raises on EOS even where it is allowed: end of text
            return self.eos in m.get_tokens()
        try:
            m.advance(token)
            return True
        except Exception:  # noqa: BLE001 - outlines raises on a disallowed token
            return False


ENGINE_CLASSES = {"ours": Ours, "llguidance": LLGuidance, "xgrammar": XGrammar, "outlines": Outlines}


def run_schema(engine: Engine, data: dict) -> dict:
    """Compile and walk every instance; returns the per-schema record."""
    rec = {
        "compile_s": None,
        "error": None,
        "valid_refused": 0,
        "invalid_accepted": 0,
        "masks_us": [],
        "n": 0,
    }
    t0 = time.perf_counter()
    try:
        m0 = engine.compile(data["schema"])
        engine.mask(m0)
    except Exception as exc:  # noqa: BLE001 - an engine refusing a schema is a result, not a crash
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return rec
    rec["compile_s"] = time.perf_counter() - t0
    for test in data["tests"]:
        text = json.dumps(test["data"], ensure_ascii=False)
        tokens = engine.tok.encode(text, add_special_tokens=False) + [engine.eos]
        m = engine.compile(data["schema"])
        ok = True
        for t in tokens:
            t0 = time.perf_counter()
            mask = engine.mask(m)
            rec["masks_us"].append((time.perf_counter() - t0) * 1e6)
            if not engine.allowed(mask, t) or not engine.accept(m, t):
                ok = False
                break
        rec["n"] += 1
        if ok and not test["valid"]:
            rec["invalid_accepted"] += 1
        if not ok and test["valid"]:
            rec["valid_refused"] += 1
    return rec


def worker(engine_name: str, files: list[str], start: int, queue) -> None:
    from constrain.assets import load_tokenizer, load_vocabulary

    try:
        engine = ENGINE_CLASSES[engine_name](load_tokenizer("llama3"), load_vocabulary("llama3"))
    except Exception as exc:  # noqa: BLE001
        queue.put(("fatal", -1, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    for i in range(start, len(files)):
        queue.put(("start", i, None))
        data = json.loads(Path(files[i]).read_text())
        queue.put(("done", i, run_schema(engine, data)))
    queue.put(("end", len(files), None))


def run_engine(engine_name: str, files: list[str], timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    results: dict[int, dict] = {}
    start = 0
    while start < len(files):
        queue = ctx.Queue()
        proc = ctx.Process(target=worker, args=(engine_name, files, start, queue), daemon=True)
        proc.start()
        current, started = None, None
        while True:
            wait = 600.0 if current is None else max(0.1, started + timeout - time.time())
            try:
                kind, i, payload = queue.get(timeout=wait)
            except Exception:  # noqa: BLE001 - queue.Empty: the current schema ran out of time
                if current is None:
                    results[start] = {"error": "worker did not start", "timeout": True}
                    current = start
                else:
                    results[current] = {"error": "timeout", "timeout": True}
                proc.kill()
                proc.join()
                start = current + 1
                break
            if kind == "fatal":
                print(f"{engine_name}: cannot start: {payload}", file=sys.stderr)
                proc.join()
                return {"unavailable": payload.splitlines()[0]}
            if kind == "start":
                current, started = i, time.time()
            elif kind == "done":
                results[i] = payload
                current = None
            elif kind == "end":
                proc.join()
                start = len(files)
                break
    return {"per_schema": results}


def summarize(name: str, out: dict, n_files: int) -> dict:
    if "unavailable" in out:
        return {"engine": name, "unavailable": out["unavailable"]}
    recs = out["per_schema"]
    masks = np.asarray([x for r in recs.values() for x in r.get("masks_us", [])] or [np.nan])
    compiles = np.asarray(
        [r["compile_s"] for r in recs.values() if r.get("compile_s") is not None] or [np.nan]
    )
    timeouts = sum(1 for r in recs.values() if r.get("timeout"))
    errors = sum(1 for r in recs.values() if r.get("error") and not r.get("timeout"))
    passed = sum(
        1
        for r in recs.values()
        if not r.get("error") and r.get("valid_refused") == 0 and r.get("invalid_accepted") == 0
    )
    return {
        "engine": name,
        "schemas": n_files,
        "passed": passed,
        "compile_errors": errors,
        "timeouts": timeouts,
        "valid_refused": sum(r.get("valid_refused", 0) for r in recs.values()),
        "invalid_accepted": sum(r.get("invalid_accepted", 0) for r in recs.values()),
        "instances": sum(r.get("n", 0) for r in recs.values()),
        "masks": int(np.isfinite(masks).sum()),
        "mask_p50_us": float(np.nanpercentile(masks, 50)),
        "mask_p99_us": float(np.nanpercentile(masks, 99)),
        "mask_p999_us": float(np.nanpercentile(masks, 99.9)),
        "mask_mean_us": float(np.nanmean(masks)),
        "compile_p50_ms": float(np.nanpercentile(compiles, 50) * 1e3),
        "compile_p99_ms": float(np.nanpercentile(compiles, 99) * 1e3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of MaskBench/JSONSchemaBench json files")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--limit", type=int, default=0, help="only the first N files (sorted)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per schema (compile + instances)")
    ap.add_argument("--json", help="write the summaries and per-schema errors here")
    ap.add_argument("--plot", help="write a PNG of the mask and compile time distributions (CDFs) here")
    ap.add_argument(
        "--property-order",
        choices=("schema", "any"),
        default="schema",
        help="object property order ours enforces (default: the schema's, as llguidance does)",
    )
    args = ap.parse_args(argv)
    os.environ["MASKBENCH_PROPERTY_ORDER"] = args.property_order
    files = sorted(str(p) for p in Path(args.folder).glob("*.json"))
    if args.limit:
        files = files[: args.limit]
    summaries, details, timings = [], {}, {}
    for name in args.engines.split(","):
        t0 = time.time()
        out = run_engine(name, files, args.timeout)
        recs = out.get("per_schema", {}).values()
        timings[name] = (
            [x for r in recs for x in r.get("masks_us", [])],
            [r["compile_s"] * 1e3 for r in recs if r.get("compile_s") is not None],
        )
        s = summarize(name, out, len(files))
        s["wall_s"] = round(time.time() - t0, 1)
        summaries.append(s)
        details[name] = {
            Path(files[i]).name: {k: v for k, v in r.items() if k != "masks_us"}
            for i, r in out.get("per_schema", {}).items()
        }
        print(json.dumps(s), flush=True)
    cols = [
        "engine",
        "passed",
        "compile_errors",
        "timeouts",
        "valid_refused",
        "invalid_accepted",
        "mask_p50_us",
        "mask_mean_us",
        "mask_p99_us",
        "mask_p999_us",
        "compile_p50_ms",
        "compile_p99_ms",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for s in summaries:
        if "unavailable" in s:
            print(f"| {s['engine']} | unavailable: {s['unavailable'][:80]} |")
            continue
        cells = [f"{s[c]:.1f}" if isinstance(s[c], float) else str(s[c]) for c in cols]
        cells[1] = f"{s['passed']}/{s['schemas']}"
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "details": details}, indent=1))
    if args.plot:
        plot_cdfs(timings, args.plot)


def plot_cdfs(timings: dict[str, tuple[list[float], list[float]]], path: str) -> None:
    """Two panels: the CDF of mask times (us) and of compile times (ms) per engine, log-scaled x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, k, unit in ((axes[0], 0, "mask time (µs)"), (axes[1], 1, "compile time, to first mask (ms)")):
        for name, values in timings.items():
            v = np.sort(np.asarray(values[k], dtype=float))
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=f"{name} (n={v.size})")
        ax.set_xscale("log")
        ax.set_xlabel(unit)
        ax.set_ylabel("fraction ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle("MaskBench: time distributions per engine (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
