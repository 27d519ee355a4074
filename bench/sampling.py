"""Fused masked sampling: time per call of the Triton kernel beside torch eager and XGrammar, and the floor.

For each vocabulary V and batch B, logits `(B, V)` (N(0, 3^2), like a real LM head's spread) and a random
int32 bitmask (half the tokens allowed), the median time per call of:

  ours        `masked_sample_triton`, plain sampling (temperature 1), and with top-k 50 + top-p 0.9
  public      `constrain.sampling.masked_sample` (plain): ours plus the input checks and its one read-back
  torch       eager torch: mask, softmax, sort-based top-p 0.9, multinomial
  xgrammar    XGrammar's `apply_token_bitmask_inplace` + softmax + `torch.multinomial` (if importable)
  mask only   `apply_bitmask_triton_` and XGrammar's kernel alone, for reference
  floor       B * (V * bytes_per_logit + V / 8) / (device-to-device copy bandwidth measured in this run)

Eager times come from `triton.testing.do_bench` (median; it flushes L2 before every call) cycling through
enough input sets to exceed twice the L2 size, so large batches are not flattered by the cache; they include
Python launch overhead. "graph" times replay a CUDA graph of up to 32 calls over the rotating inputs (GPU
time without the launch overhead; small inputs may then sit in L2, as they would right after the LM head);
ours, torch and XGrammar each get one. Diagnostics (graph): greedy (the pass without the race), and kernels
that only read the logits and draw the noise, one Philox call per 4 tokens (the reference's noise) or per
token (the noise of the kernel's v1/v2, for comparison with bench/gpu_notes.md).

    python bench/sampling.py                     # CUDA: the issue's grid (~5 min); writes bench/results/
                                                 #   sampling.json, sampling.md and sampling_fp32.png
    python bench/sampling.py --dry-run           # CPU: tiny sizes through Triton's interpreter, to a temp dir
    python bench/sampling.py --plot FILE.json    # table and PNG again from a JSON report
    python bench/sampling.py --registers         # CPU: registers per kernel variant, compiled for sm_90

Without CUDA the kernel runs through Triton's interpreter (slow: use --dry-run); times are then wall-clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA and "--registers" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from constrain.kernels import triton_sampling  # noqa: E402
from constrain.kernels.torch_sampling import unpack_bitmask  # noqa: E402
from constrain.kernels.triton_sampling import (  # noqa: E402
    _group_bits,
    apply_bitmask_triton_,
    masked_sample_triton,
    sample_with_flags,
    with_config,
)
from constrain.sampling import masked_sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@triton.jit
def _read_and_philox_kernel(logits_ptr, seed_ptr, out_ptr, V, TILE: tl.constexpr, PER_TOKEN: tl.constexpr):
    """Diagnostic: read a row slice and draw its noise words, nothing else (the RNG's cost).

    PER_TOKEN: one Philox-4x32-10 call per token (word 0; the noise before the 4-words-per-call change);
    otherwise one call per 4 tokens, as the kernels do now (`_group_bits`).
    """
    row = tl.program_id(0)
    G: tl.constexpr = TILE // 32
    gid = tl.program_id(1) * G + tl.arange(0, G)
    tok = gid[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(logits_ptr + row.to(tl.int64) * V + tok, mask=tok < V, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    if PER_TOKEN:
        zero = tl.zeros_like(tok)
        bits, _, _, _ = tl.philox(seed, tok, zero, zero, zero)
    else:
        bits = _group_bits(seed, gid)
    best = tl.max(tl.max(x + (bits >> 9).to(tl.float32), axis=1), axis=0)
    tl.store(out_ptr + row * tl.num_programs(1) + tl.program_id(1), best)


def read_and_philox(logits: torch.Tensor, seeds: torch.Tensor, out: torch.Tensor, per_token: bool) -> None:
    tile = 2048
    grid = (logits.shape[0], triton.cdiv(logits.shape[1], tile))
    _read_and_philox_kernel[grid](
        logits, seeds, out, logits.shape[1], TILE=tile, PER_TOKEN=per_token, num_warps=8
    )


VOCABS = [32000, 128256, 151936]
BATCHES = [1, 8, 64, 256, 1024]
FILTERS = dict(top_k=50, top_p=0.9)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_eager(logits: torch.Tensor, bitmask: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Mask, softmax, sort-based top-p, multinomial: the usual eager-torch sampler."""
    x = logits.float().masked_fill(~unpack_bitmask(bitmask, logits.shape[1]), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_p, dim=-1)
    sorted_p = sorted_p.masked_fill(cumulative - sorted_p > top_p, 0.0)
    return order.gather(1, torch.multinomial(sorted_p, 1)).squeeze(1)


def load_xgrammar():
    """XGrammar's module, or None (reported) when it cannot be imported."""
    try:
        import xgrammar

        return xgrammar
    except Exception as error:  # any failure to import means "peer not available", reported below
        print(f"xgrammar not available: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def xgrammar_sample(xgr, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """XGrammar's in-place masking kernel, then softmax and torch.multinomial."""
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1).squeeze(1)


# ----------------------------------------------------------------------------------------------- timing


def median_time_us(fn, *, cuda: bool, reps: int = 3) -> float:
    """Median time of one call in microseconds: do_bench on CUDA, wall clock on the CPU."""
    if cuda:
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def graph_time_us(
    make_call, sets: int, calls: int = 32, replays: int = 20, eager_us: float | None = None
) -> float:
    """Median GPU time per call from replaying a CUDA graph of `calls` calls cycling over `sets` inputs.

    With `eager_us` (a call's eager time), slow methods get fewer calls per graph and fewer replays (a
    replay of about 2 ms or more), so that the whole grid stays within minutes.
    """
    if eager_us is not None:
        calls = max(1, min(calls, math.ceil(2000.0 / max(eager_us, 1.0))))
        replays = 10 if eager_us > 2000 else replays
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, sets)):  # warm up outside the graph (compiles, allocator)
            make_call(i % sets)()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            make_call(i % sets)()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    n = (1 << 28) if device == "cuda" else (1 << 24)  # 1 GiB of float32 on CUDA
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    us = median_time_us(lambda: dst.copy_(src), cuda=device == "cuda", reps=5)
    return 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------------------------- inputs


def make_sets(batch: int, vocab: int, dtype: torch.dtype, device: str, l2_bytes: int, seed: int):
    """Enough (logits, bitmask) input sets to cover twice the L2 size (at most 64)."""
    words = (vocab + 31) // 32
    per_set = batch * (vocab * torch.empty((), dtype=dtype).element_size() + 4 * words)
    count = max(1, min(64, math.ceil(2 * l2_bytes / per_set))) if device == "cuda" else 1
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        logits = (3.0 * torch.randn(batch, vocab, device=device, generator=gen)).to(dtype)
        bits = torch.randint(-(2**31), 2**31, (batch, words), device=device, generator=gen, dtype=torch.int64)
        bitmask = bits.to(torch.int32)
        bitmask[:, 0] |= 1  # token 0 always allowed: no empty row
        sets.append((logits, bitmask))
    return sets


# ----------------------------------------------------------------------------------------------- main


def run(args) -> dict:
    device = "cuda" if CUDA else "cpu"
    props = torch.cuda.get_device_properties(0) if CUDA else None
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) if CUDA else 0
    report = {
        "device": torch.cuda.get_device_name(0) if CUDA else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "l2_bytes": l2_bytes,
        "rows": [],
    }
    bw = copy_bandwidth_gbps(device)
    report["copy_bandwidth_gbps"] = bw
    print(f"device: {report['device']}, copy bandwidth {bw:.0f} GB/s (read + write), L2 {l2_bytes >> 20} MiB")
    xgr = load_xgrammar() if (CUDA and not args.no_xgrammar) else None
    report["xgrammar"] = getattr(xgr, "__version__", None)

    vocabs = args.vocab or ([1000] if args.dry_run else VOCABS)
    batches = args.batch or ([1, 3] if args.dry_run else BATCHES)
    for dtype_name, vocab, batch in itertools.product(args.dtype, vocabs, batches):
        sets = make_sets(batch, vocab, DTYPES[dtype_name], device, l2_bytes, seed=vocab + batch)
        row = dict(vocab=vocab, batch=batch, dtype=dtype_name, sets=len(sets))
        row["floor_us"] = batch * (vocab * sets[0][0].element_size() + vocab / 8) / (bw * 1e9) * 1e6
        row.update(measure(sets, xgr, baselines=dtype_name == "fp32" or args.dry_run))
        report["rows"].append(row)
        print(format_row(row), flush=True)
        save(report, args.out)  # after every size: a run cut short keeps what it measured
        del sets
        if CUDA:
            torch.cuda.empty_cache()
    if CUDA and args.sweep:
        report["sweep"] = sweep(device, l2_bytes)
        save(report, args.out)
    return report


def save(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def write_outputs(report: dict, json_path: Path) -> list[Path]:
    """The markdown table (`<stem>.md`) and one PNG per dtype (`<stem>_<dtype>.png`) beside the JSON."""
    md = json_path.with_suffix(".md")
    md.write_text(markdown_table(report) + "\n")
    return [md, *plot(report, json_path.parent, json_path.stem)]


# ------------------------------------------------------------------------------------------- registers


def registers() -> list[str]:
    """Registers / stack / shared / local bytes of each kernel variant compiled offline for sm_90 (no GPU).

    Uses `triton.compile` with `GPUTarget("cuda", 90, 32)` and the cuobjdump that ships with triton, with the
    specialisations a real launch gets (16-byte aligned pointers, row stride and V divisible by 16).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    ts = triton_sampling
    common = dict(
        logits_ptr="*fp32", stride_l="i32", mask_ptr="*i32", idx_ptr="*i64", seed_ptr="*i64", B="i32",
        V="i32", W="i32", temp_ptr="*fp32", temp_val="fp32", ws_ptr="*i32", S="i32",
    )  # fmt: skip
    pass_types = dict(common, TPS="i32")
    finish_types = dict(
        common, topk_ptr="*i64", topk_val="i64", topp_ptr="*fp32", topp_val="fp32", minp_ptr="*fp32",
        minp_val="fp32", out_tok_ptr="*i64", out_lp_ptr="*fp32", NT_FB="i32",
    )  # fmt: skip
    flags = dict(HAS_IDX=False, TEMP_PER_ROW=False, LOGPROBS=False)
    variants = [
        (ts._pass_kernel, pass_types, dict(TILE=tile, KG=16, FILTER=filt, **flags), warps)
        for tile, warps in ((2048, 8), (2048, 4), (1024, 8), (1024, 4), (512, 4))
        for filt in (False, True)
    ]
    finish_flags = dict(TOPK_PER_ROW=False, TOPP_PER_ROW=False, MINP_PER_ROW=False, FORCE_FALLBACK=False)
    for filt in (False, True):
        ce = dict(SP=16, KG=16, KG2=64, TILE_FB=512, PIVOTS=16, FILTER=filt, **flags, **finish_flags)
        variants.append((ts._finish_kernel, finish_types, ce, 8 if filt else 4))
    lines = [f"triton {triton.__version__}, sm_90: kernel, constexprs, warps: REG STACK SHARED LOCAL"]
    for fn, types, constexprs, warps in variants:
        names = fn.arg_names
        signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
        aligned = [n for n in names if n not in constexprs and (types[n][0] == "*" or n in ("stride_l", "V"))]
        source = ASTSource(
            fn=fn,
            signature=signature,
            constexprs={(names.index(k),): v for k, v in constexprs.items()},
            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
        )
        kernel = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False)
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True)
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
        shown = {k: v for k, v in constexprs.items() if k in ("TILE", "FILTER")}
        lines.append(
            f"{fn.__name__} {shown} warps={warps}: " + (" ".join(found.groups()) if found else usage.stdout)
        )
        print(lines[-1], flush=True)
    return lines


def sweep(device: str, l2_bytes: int) -> list[dict]:
    """Graph times under a few launch configurations (V 128256, B 64 and 1024): tile x warps for plain and
    filtered sampling, and for the filtered pass alone (`filter_tile`, `filter_num_warps`), whose FILTER
    variant needs far more registers (`--registers`)."""
    results = []
    points = [
        (dict(tile=t, num_warps=w), name, params)
        for t, w in ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8))
        for name, params in (("plain", {}), ("filtered", FILTERS))
    ]
    points += [
        (dict(filter_tile=t, filter_num_warps=w), "filtered", FILTERS)
        for t, w in ((1024, 4), (512, 4), (512, 2))
    ]
    for batch in (64, 1024):
        sets = make_sets(batch, 128256, torch.float32, device, l2_bytes, seed=batch)
        for changes, name, params in points:
            us = sweep_point(sets, with_config(**changes), params)
            results.append(dict(batch=batch, variant=name, graph_us=us, **changes))
            print(f"sweep B={batch} {changes} {name}: {us:.1f} us", flush=True)
        del sets
        torch.cuda.empty_cache()
    return results


def sweep_point(sets: list, config, params: dict) -> float:
    seeds = torch.arange(sets[0][0].shape[0], device=sets[0][0].device)

    def call(i: int):
        return lambda: masked_sample_triton(sets[i][0], sets[i][1], seeds=seeds, config=config, **params)

    return graph_time_us(call, len(sets))


def measure(sets: list, xgr, baselines: bool) -> dict:
    """Times (µs) of every method on one size, cycling through the input sets; the fallback row count."""
    batch = sets[0][0].shape[0]
    seeds = torch.arange(batch, device=sets[0][0].device) * 7919
    cycle = itertools.cycle(range(len(sets)))

    def ours(i: int, **params):
        return lambda: masked_sample_triton(sets[i][0], sets[i][1], seeds=seeds, **params)

    def timed(method) -> float:
        return median_time_us(lambda: method(*sets[next(cycle)]), cuda=CUDA)

    row = {
        "ours_plain_us": timed(lambda lg, bm: masked_sample_triton(lg, bm, seeds=seeds)),
        "ours_filtered_us": timed(lambda lg, bm: masked_sample_triton(lg, bm, seeds=seeds, **FILTERS)),
        "public_plain_us": timed(lambda lg, bm: masked_sample(lg, bm, seeds=seeds)),
    }
    _, _, flags = sample_with_flags(sets[0][0], sets[0][1], seeds=seeds, **FILTERS)
    row["fallback_rows"] = int(flags.sum().item())
    if CUDA:
        row["ours_plain_graph_us"] = graph_time_us(ours, len(sets))
        row["ours_filtered_graph_us"] = graph_time_us(lambda i: ours(i, **FILTERS), len(sets))
        # Diagnostics: greedy (the pass without the race) and kernels that only read and draw the noise.
        row["ours_greedy_graph_us"] = graph_time_us(lambda i: ours(i, temperature=0.0), len(sets))
        out = torch.empty(batch * triton.cdiv(sets[0][0].shape[1], 2048), device=seeds.device)
        for key, per_token in (("read_philox_graph_us", False), ("read_philox_per_token_graph_us", True)):
            row[key] = graph_time_us(
                lambda i, p=per_token: lambda: read_and_philox(sets[i][0], seeds, out, p), len(sets)
            )
    if baselines:
        row["torch_us"] = timed(torch_eager)
        row["ours_mask_only_us"] = timed(apply_bitmask_triton_)
        if xgr is not None:
            row["xgrammar_us"] = timed(lambda lg, bm: xgrammar_sample(xgr, lg, bm))
            row["xgrammar_mask_only_us"] = timed(xgr.apply_token_bitmask_inplace)
        if CUDA:  # the baselines in CUDA graphs too (a capture that fails is reported, not fatal)
            peers = [("torch_graph_us", torch_eager, row["torch_us"])]
            if xgr is not None:
                peers.append(
                    ("xgrammar_graph_us", lambda lg, bm: xgrammar_sample(xgr, lg, bm), row["xgrammar_us"])
                )
            for key, method, eager_us in peers:
                try:
                    row[key] = graph_time_us(
                        lambda i, m=method: lambda: m(*sets[i]), len(sets), eager_us=eager_us
                    )
                except Exception as error:  # reported in the JSON: that peer cannot be captured
                    row[key.replace("_us", "_error")] = f"{type(error).__name__}: {error}"[:300]
                    torch.cuda.synchronize()
    return row


COLUMNS = [
    ("floor_us", "floor"),
    ("ours_plain_us", "ours"),
    ("ours_plain_graph_us", "ours(graph)"),
    ("public_plain_us", "public"),
    ("ours_filtered_us", "ours k50p.9"),
    ("ours_filtered_graph_us", "k50p.9(graph)"),
    ("torch_us", "torch eager"),
    ("torch_graph_us", "torch(graph)"),
    ("xgrammar_us", "xgr+multinom"),
    ("xgrammar_graph_us", "xgr(graph)"),
    ("ours_mask_only_us", "mask ours"),
    ("xgrammar_mask_only_us", "mask xgr"),
    ("ours_greedy_graph_us", "greedy(graph)"),
    ("read_philox_graph_us", "read+philox/4(graph)"),
    ("read_philox_per_token_graph_us", "read+philox/1(graph)"),
]


def format_row(row: dict) -> str:
    cells = [f"{row['dtype']:>4} V={row['vocab']:>6} B={row['batch']:>4}"]
    for key, name in COLUMNS:
        if key in row:
            cells.append(f"{name} {row[key]:9.1f}")
    cells.append(f"fallback {row['fallback_rows']}/{row['batch']}")
    return " | ".join(cells)


def _ratio(row: dict, num: str, den: str) -> str:
    return f"{row[num] / row[den]:.1f}" if num in row and den in row else ""


def markdown_table(report: dict) -> str:
    """The results as a markdown table (microseconds per call, medians) with the ratios the goals name.

    ours/floor uses ours(graph); torch/k50p.9 compares the filtered variant with torch's top-p sampler, and
    xgr/ours the plain one with XGrammar + multinomial, each eager to eager ("e") and graph to graph ("g").
    """
    keys = [k for k, _ in COLUMNS if any(k in r for r in report["rows"])]
    head = ["dtype", "V", "B"] + [dict(COLUMNS)[k] for k in keys]
    head += ["ours/floor", "torch/k50p.9 e", "torch/k50p.9 g", "xgr/ours e", "xgr/ours g", "fallback rows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["dtype"], str(r["vocab"]), str(r["batch"])]
        cells += [(f"{r[k]:.2f}" if r[k] < 10 else f"{r[k]:.1f}") if k in r else "" for k in keys]
        best_ours = r.get("ours_plain_graph_us", r["ours_plain_us"])
        cells.append(f"{best_ours / r['floor_us']:.2f}")
        cells.append(_ratio(r, "torch_us", "ours_filtered_us"))
        cells.append(_ratio(r, "torch_graph_us", "ours_filtered_graph_us"))
        cells.append(_ratio(r, "xgrammar_us", "ours_plain_us"))
        cells.append(_ratio(r, "xgrammar_graph_us", "ours_plain_graph_us"))
        cells.append(f"{r['fallback_rows']}/{r['batch']}")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [
        f"* {r['vocab']} x {r['batch']}: {k}: {v}"
        for r in report["rows"]
        for k, v in r.items()
        if k.endswith("_error")
    ]
    header = [
        f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}, "
        f"xgrammar {report.get('xgrammar')}; copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s "
        f"(read + write). Command: `{report['command']}`. Medians in µs per call.",
        "",
    ]
    return "\n".join(header + lines + ([""] + errors if errors else []))


def plot(report: dict, out_dir: Path, stem: str = "sampling") -> list[Path]:
    """One PNG per dtype: time per call vs batch, one panel per vocabulary (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20")
    written = []
    for dtype in sorted({r["dtype"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["dtype"] == dtype]
        vocabs = sorted({r["vocab"] for r in rows})
        fig, axes = plt.subplots(1, len(vocabs), figsize=(5 * len(vocabs), 4), squeeze=False)
        for ax, vocab in zip(axes[0], vocabs, strict=True):
            sel = sorted((r for r in rows if r["vocab"] == vocab), key=lambda r: r["batch"])
            for n, (key, name) in enumerate(COLUMNS):
                if any(key in r for r in sel):
                    pts = [(r["batch"], r[key]) for r in sel if key in r]
                    style = dict(color="black", linewidth=2.5) if key == "floor_us" else dict(color=colors(n))
                    style["linestyle"] = "--" if "graph" in key else "-"
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name, **style)
            ax.set(xscale="log", yscale="log", xlabel="batch B", ylabel="µs per call", title=f"V = {vocab}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Masked sampling, {dtype} logits, {report['device']} (dashed: CUDA graph replay)")
        fig.tight_layout()
        path = out_dir / f"{stem}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", "--quick", action="store_true", help="tiny sizes (V 1000, B 1 and 3)")
    parser.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default 32000 128256 151936)")
    parser.add_argument("--batch", type=int, nargs="*", help="batch sizes (default 1 8 64 256 1024)")
    parser.add_argument("--dtype", nargs="*", default=["fp32"], choices=sorted(DTYPES), help="logits dtypes")
    parser.add_argument("--no-xgrammar", action="store_true", help="skip XGrammar even if importable")
    parser.add_argument("--sweep", action="store_true", help="CUDA: also time a few launch configurations")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON report (default bench/results/sampling.json; with --dry-run a temporary directory); the "
        "markdown table and PNGs go beside it",
    )
    parser.add_argument("--plot", type=Path, help="only write the table and PNGs again from this JSON report")
    parser.add_argument("--registers", action="store_true", help="only list registers per kernel (offline)")
    args = parser.parse_args()
    if args.registers:
        registers()
        return
    if args.plot:
        report = json.loads(args.plot.read_text())
        for path in write_outputs(report, args.plot):
            print(path)
        print(markdown_table(report))
        return
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="sampling-")) / "sampling.json"
            if args.dry_run
            else RESULTS / "sampling.json"
        )
    start = time.perf_counter()
    report = run(args)
    report["wall_s"] = time.perf_counter() - start
    save(report, args.out)
    print(markdown_table(report))
    for path in [args.out, *write_outputs(report, args.out)]:
        print(path)


if __name__ == "__main__":
    main()
