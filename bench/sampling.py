"""Fused masked sampling: time per call of the Triton kernel beside torch eager and XGrammar, and the floor.

For each vocabulary V and batch B, logits `(B, V)` (N(0, 3^2), like a real LM head's spread) and a random
int32 bitmask (half the tokens allowed), the median time per call of:

  ours        `masked_sample_triton`, plain sampling (temperature 1), and with top-k 50 + top-p 0.9
  torch       eager torch: mask, softmax, sort-based top-p 0.9, multinomial
  xgrammar    XGrammar's `apply_token_bitmask_inplace` + softmax + `torch.multinomial` (if importable)
  mask only   `apply_bitmask_triton_` and XGrammar's kernel alone, for reference
  floor       B * (V * bytes_per_logit + V / 8) / (device-to-device copy bandwidth measured in this run)

Eager times come from `triton.testing.do_bench` (median; it flushes L2 before every call) cycling through
enough input sets to exceed twice the L2 size, so large batches are not flattered by the cache; they include
Python launch overhead. "graph" times replay a CUDA graph of up to 32 calls over the rotating inputs (GPU
time without the launch overhead; small inputs may then sit in L2, as they would right after the LM head).

    python bench/sampling.py --out bench/results/sampling.json   # CUDA: full grid, table on stdout
    python bench/sampling.py --quick                             # reduced sizes; runs on a CPU-only machine
    python bench/sampling.py --plot bench/results/sampling.json  # PNG plots from a JSON (matplotlib)

Without CUDA the kernel runs through Triton's interpreter (slow: use --quick); times are then wall-clock.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from constrain.kernels.torch_sampling import unpack_bitmask  # noqa: E402
from constrain.kernels.triton_sampling import (  # noqa: E402
    apply_bitmask_triton_,
    masked_sample_triton,
    sample_with_flags,
    with_config,
)


@triton.jit
def _read_and_philox_kernel(logits_ptr, seed_ptr, out_ptr, V, TILE: tl.constexpr):
    """Diagnostic: read a row slice and draw one Philox-4x32-10 word per token, nothing else (RNG cost)."""
    row = tl.program_id(0)
    start = tl.program_id(1) * TILE
    tok = start + tl.arange(0, TILE)
    x = tl.load(logits_ptr + row.to(tl.int64) * V + tok, mask=tok < V, other=0.0).to(tl.float32)
    zero = tl.zeros_like(tok)
    bits, _, _, _ = tl.philox(tl.load(seed_ptr + row), tok, zero, zero, zero)
    tl.store(
        out_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.max(x + (bits >> 9).to(tl.float32), axis=0)
    )


def read_and_philox(logits: torch.Tensor, seeds: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    tile = 2048
    grid = (logits.shape[0], triton.cdiv(logits.shape[1], tile))
    _read_and_philox_kernel[grid](logits, seeds, out, logits.shape[1], TILE=tile, num_warps=8)
    return out


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


def graph_time_us(make_call, sets: int, calls: int = 32, replays: int = 20) -> float:
    """Median GPU time per call from replaying a CUDA graph of `calls` calls cycling over `sets` inputs."""
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

    vocabs = args.vocab or ([4096] if args.quick else VOCABS)
    batches = args.batch or ([1, 4] if args.quick else BATCHES)
    for dtype_name, vocab, batch in itertools.product(args.dtype, vocabs, batches):
        sets = make_sets(batch, vocab, DTYPES[dtype_name], device, l2_bytes, seed=vocab + batch)
        row = dict(vocab=vocab, batch=batch, dtype=dtype_name, sets=len(sets))
        row["floor_us"] = batch * (vocab * sets[0][0].element_size() + vocab / 8) / (bw * 1e9) * 1e6
        row.update(measure(sets, xgr, baselines=dtype_name == "fp32" or args.quick))
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


def save(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def sweep(device: str, l2_bytes: int) -> list[dict]:
    """Graph times of plain and filtered sampling under a few launch configurations (V 128256, B 64, 1024)."""
    results = []
    for batch in (64, 1024):
        sets = make_sets(batch, 128256, torch.float32, device, l2_bytes, seed=batch)
        for tile, warps in ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)):
            for name, params in (("plain", {}), ("filtered", FILTERS)):
                us = sweep_point(sets, with_config(tile=tile, num_warps=warps), params)
                results.append(dict(batch=batch, tile=tile, num_warps=warps, variant=name, graph_us=us))
                print(f"sweep B={batch} tile={tile} warps={warps} {name}: {us:.1f} us", flush=True)
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
    }
    _, _, flags = sample_with_flags(sets[0][0], sets[0][1], seeds=seeds, **FILTERS)
    row["fallback_rows"] = int(flags.sum().item())
    if CUDA:
        row["ours_plain_graph_us"] = graph_time_us(ours, len(sets))
        row["ours_filtered_graph_us"] = graph_time_us(lambda i: ours(i, **FILTERS), len(sets))
        # Diagnostics: greedy (the pass without the race) and a kernel that only reads and draws Philox words.
        row["ours_greedy_graph_us"] = graph_time_us(lambda i: ours(i, temperature=0.0), len(sets))
        out = torch.empty(batch * triton.cdiv(sets[0][0].shape[1], 2048), device=seeds.device)
        row["read_philox_graph_us"] = graph_time_us(
            lambda i: lambda: read_and_philox(sets[i][0], seeds, out), len(sets)
        )
    if baselines:
        row["torch_us"] = timed(torch_eager)
        row["ours_mask_only_us"] = timed(apply_bitmask_triton_)
        if xgr is not None:
            row["xgrammar_us"] = timed(lambda lg, bm: xgrammar_sample(xgr, lg, bm))
            row["xgrammar_mask_only_us"] = timed(xgr.apply_token_bitmask_inplace)
    return row


COLUMNS = [
    ("floor_us", "floor"),
    ("ours_plain_us", "ours"),
    ("ours_plain_graph_us", "ours(graph)"),
    ("ours_filtered_us", "ours k50p.9"),
    ("ours_filtered_graph_us", "k50p.9(graph)"),
    ("torch_us", "torch eager"),
    ("xgrammar_us", "xgr+multinom"),
    ("ours_mask_only_us", "mask ours"),
    ("xgrammar_mask_only_us", "mask xgr"),
    ("ours_greedy_graph_us", "greedy(graph)"),
    ("read_philox_graph_us", "read+philox(graph)"),
]


def format_row(row: dict) -> str:
    cells = [f"{row['dtype']:>4} V={row['vocab']:>6} B={row['batch']:>4}"]
    for key, name in COLUMNS:
        if key in row:
            cells.append(f"{name} {row[key]:9.1f}")
    cells.append(f"fallback {row['fallback_rows']}/{row['batch']}")
    return " | ".join(cells)


def markdown_table(report: dict) -> str:
    """The results as a markdown table (microseconds per call, medians) with the ratios the goals name."""
    keys = [k for k, _ in COLUMNS if any(k in r for r in report["rows"])]
    head = ["dtype", "V", "B"] + [dict(COLUMNS)[k] for k in keys]
    head += ["ours/floor", "torch/ours k50p.9", "xgr/ours", "fallback rows"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["dtype"], str(r["vocab"]), str(r["batch"])]
        cells += [(f"{r[k]:.2f}" if r[k] < 10 else f"{r[k]:.1f}") if k in r else "" for k in keys]
        best_ours = r.get("ours_plain_graph_us", r["ours_plain_us"])
        cells.append(f"{best_ours / r['floor_us']:.2f}")
        cells.append(f"{r['torch_us'] / r['ours_filtered_us']:.1f}" if "torch_us" in r else "")
        cells.append(f"{r['xgrammar_us'] / r['ours_plain_us']:.1f}" if "xgrammar_us" in r else "")
        cells.append(f"{r['fallback_rows']}/{r['batch']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, out_dir: Path) -> list[Path]:
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
        path = out_dir / f"sampling_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced sizes (V 4096, B 1 and 4)")
    parser.add_argument("--vocab", type=int, nargs="*", help="vocabulary sizes (default 32000 128256 151936)")
    parser.add_argument("--batch", type=int, nargs="*", help="batch sizes (default 1 8 64 256 1024)")
    parser.add_argument("--dtype", nargs="*", default=["fp32"], choices=sorted(DTYPES), help="logits dtypes")
    parser.add_argument("--no-xgrammar", action="store_true", help="skip XGrammar even if importable")
    parser.add_argument("--sweep", action="store_true", help="CUDA: also time a few launch configurations")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--plot", type=Path, help="only plot this JSON report (PNGs beside bench/sampling.py)"
    )
    args = parser.parse_args()
    if args.plot:
        report = json.loads(args.plot.read_text())
        for path in plot(report, Path(__file__).resolve().parent):
            print(path)
        print(markdown_table(report))
        return
    report = run(args)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
