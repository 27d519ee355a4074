"""Shared-prefix KV cache vs transformers' `generate(num_return_sequences=N)`: KV memory and time.

For N branches sampled from one prompt of P tokens (64 new tokens each, no early stop), in the same process
and on the same random-weight Llama:

- ours: `constrain.branching.generate_n(..., share_prefix=True)`: the prompt is prefilled once at batch 1 and
  stored once; each branch stores only its own tokens. `--graph` adds a run with `cuda_graph=True` (decode
  steps replayed from a CUDA graph; GPU only).
- transformers: `model.generate(prompt, do_sample=True, top_k=0, num_return_sequences=N, max_new_tokens=64)`,
  which repeats the prompt N times before the prefill and keeps N copies of its KV.

Reported per (N, P): wall time of the whole call (prefill included; CUDA synchronised), generated tokens per
second, KV bytes at the end (ours: shared + per-branch buffers; transformers: its DynamicCache), the ratio of
the two against the ideal `(P + N*S) / (N*(P + S))` with S the generated tokens stored, and on CUDA the peak
memory of the call. An out-of-memory error is recorded as such, not hidden. Before timing, ours is checked
against an uncached forward (max |logit difference|) so a wrong fast path cannot produce a fast number.

    .venv/bin/python bench/prefix.py --device cpu --out bench/prefix_cpu.json
    python3 bench/prefix.py --device cuda --model llama-1b --dtype bf16 --graph --out $OUT/prefix_gpu.json
    .venv/bin/python bench/prefix.py --plot bench/prefix_cpu.json bench/prefix_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _ensure_package() -> None:
    """In an uninstalled checkout `constrain.kernels` is the folder `kernels/` beside `constrain/` (pyproject
    maps it at install time): make it importable the same way."""
    import importlib.util

    if importlib.util.find_spec("constrain.kernels") is None:
        import constrain

        constrain.__path__.append(str(ROOT))


_ensure_package()

MODELS = {
    # A small Llama for the CPU (2 shared cores): 2 layers, GQA 4 query heads over 2 KV heads, head dim 32.
    "llama-small": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32000,
    ),
    # The shape of Llama-3.2-1B (1.24 B parameters): 16 layers, 32 query heads over 8 KV heads, head dim 64.
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
    ),
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(name: str, dtype: torch.dtype, device: str, max_positions: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **MODELS[name],
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn):
    """(result or the OOM message, seconds, peak CUDA bytes of the call or None)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    try:
        result = fn()
        sync(device)
    except torch.OutOfMemoryError as error:
        result = f"OOM: {str(error).splitlines()[0][:160]}"
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return result, seconds, peak


def run_ours(model, vocab, prompt, n, new, graph, sample):
    from constrain.branching import generate_n

    result = generate_n(
        model, None, prompt, n=n, max_new_tokens=new, temperature=1.0 if sample == "random" else 0.0, seed=0,
        vocab=vocab, stop_at_eos=False, share_prefix=True, reuse_prefix=False, cuda_graph=graph,
    )  # fmt: skip
    assert all(len(b.token_ids) == new for b in result.branches)
    return result


def run_hf(model, prompt, n, new, device, sample):
    ids = torch.tensor([prompt], device=device)
    # transformers returns N sequences only when sampling; top_k=1 makes its sampling greedy.
    with torch.inference_mode():
        out = model.generate(
            ids, do_sample=True, top_k=0 if sample == "random" else 1, top_p=1.0, temperature=1.0,
            num_return_sequences=n, max_new_tokens=new, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.sequences.shape == (n, len(prompt) + new)
    return out


def greedy_agreement(model, vocab, prompt, device) -> float:
    """Fraction of positions where ours (greedy, 4 branches, 32 tokens) picks transformers' greedy token."""
    ours = run_ours(model, vocab, prompt, 4, 32, False, "greedy")
    theirs = run_hf(model, prompt, 4, 32, device, "greedy").sequences[:, len(prompt) :].tolist()
    pairs = [
        pair
        for br, row in zip(ours.branches, theirs, strict=True)
        for pair in zip(br.token_ids, row, strict=True)
    ]
    same = sum(a == b for a, b in pairs)
    return same / (4 * 32)


def result_vocab_size(model) -> int:
    return model.config.vocab_size


def sampler_seconds(vocab_size: int, n: int, steps: int, device: str, sample: str) -> float:
    """Seconds `constrain.sampling.masked_sample` alone takes for `steps` steps of N rows: the sampler's share
    of our time (transformers samples with its own, cheaper-on-CPU multinomial)."""
    from constrain.bitmask import allocate_bitmask
    from constrain.sampling import masked_sample

    logits = torch.randn(n, vocab_size, device=device)
    mask = allocate_bitmask(n, vocab_size).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    temperature = 1.0 if sample == "random" else 0.0
    masked_sample(logits, mask, temperature=temperature, generator=gen, return_logprobs=True)
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        masked_sample(logits, mask, temperature=temperature, generator=gen, return_logprobs=True)
    sync(device)
    return (time.perf_counter() - start) / 3 * steps


def check_exactness(model, prompt, device) -> float:
    """Max |logit| difference between 4 shared-cache branches and an uncached forward (8 steps)."""
    from constrain.kvcache import SharedKV

    gen = torch.Generator().manual_seed(1)
    fed = torch.randint(3, model.config.vocab_size, (4, 8), generator=gen).to(device)
    kv = SharedKV(model, capacity=8)
    with torch.inference_mode():
        kv.prefill(prompt)
        kv.fork(4)
        steps = [kv.step(fed[:, t]).float() for t in range(fed.shape[1])]
        full = torch.tensor(prompt, device=device).expand(4, -1)
        ref = model(torch.cat([full, fed], dim=1), use_cache=False).logits.float()[:, len(prompt) :]
    return max(float((s - ref[:, t]).abs().max()) for t, s in enumerate(steps))


def device_checks(device: str) -> dict:
    """Correctness of the device paths before any timing: the fused cascade attention against the float32
    reference at the 1B shapes in bf16, and a tiny fp32 Llama's shared-cache logits (eager and CUDA graph)
    against an uncached forward. Failing fused paths are switched off (and said so), not timed."""
    from constrain.kernels import prefix_attention as pa
    from constrain.kvcache import SharedKV

    checks: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    q, kp, vp, ko, vo = (
        rand(16, 32, 1, 64),
        rand(1, 8, 2048, 64),
        rand(1, 8, 2048, 64),
        rand(16, 8, 40, 64),
        None,
    )
    vo = rand(16, 8, 40, 64)
    levels = [pa.KVLevel(kp, vp), pa.KVLevel(ko, vo, causal=True)]
    full_k, full_v = (
        torch.cat([kp.expand(16, -1, -1, -1), ko], 2),
        torch.cat([vp.expand(16, -1, -1, -1), vo], 2),
    )
    ref = pa.reference_attention(q.float(), full_k.float(), full_v.float(), 0.125)
    try:
        out = pa.cascade_attention(q, levels, 0.125)
        checks["fused_bf16_rel_error"] = float((out.float() - ref).norm() / ref.norm())
    except Exception as error:  # noqa: BLE001 - recorded, and the reference path is used instead
        checks["fused_error"] = repr(error)[:300]
        pa._fused_applies = lambda *a, **k: False
    out = pa.cascade_attention(q, levels, 0.125, fused=False)
    checks["reference_bf16_rel_error"] = float((out.float() - ref).norm() / ref.norm())

    tiny = build_model("llama-small", torch.float32, device, 256)
    prompt = torch.randint(3, 32000, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    fed = torch.randint(3, 32000, (4, 8), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.inference_mode():
        expected = tiny(torch.cat([torch.tensor(prompt, device=device).expand(4, -1), fed], 1)).logits.float()
    for graph in (False, True):
        kv = SharedKV(tiny, capacity=8, cuda_graph=graph)
        with torch.inference_mode():
            kv.prefill(prompt)
            kv.fork(4)
            steps = [kv.step(fed[:, t]).float() for t in range(8)]
        diff = max(float((s - expected[:, len(prompt) + t]).abs().max()) for t, s in enumerate(steps))
        checks[f"tiny_fp32_max_abs_logit_diff{'_graph' if graph else ''}"] = diff
        if graph:
            checks["tiny_graph_steps_replayed"] = kv.graph_steps
    return checks


def bench(args) -> dict:
    from constrain.vocab import Vocabulary

    device, dtype = args.device, DTYPES[args.dtype]
    if device == "cpu":
        torch.set_num_threads(args.threads)
    max_p = max(args.p)
    model = build_model(args.model, dtype, device, max_positions=max_p + args.new + 8)
    vocab_size = model.config.vocab_size
    vocab = Vocabulary([b"t%d" % i for i in range(vocab_size)])  # random weights: any byte strings do
    gen = torch.Generator().manual_seed(0)
    prompts = {p: torch.randint(3, vocab_size, (p,), generator=gen).tolist() for p in args.p}
    checks = device_checks(device) if device == "cuda" else {}
    info = {
        "checks": checks,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": args.model,
        "config": MODELS[args.model],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": args.dtype,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "new_tokens": args.new,
        "sample": args.sample,
        "exactness_max_abs_logit_diff": check_exactness(model, prompts[min(args.p)][:256], device),
    }
    print(json.dumps(info), flush=True)
    methods = ["ours"] + (["ours_graph"] if args.graph else []) + ["transformers"]
    # Warm-up (kernels, allocator, CUDA graph capture code paths) on the smallest case.
    warm = prompts[min(args.p)][:64]
    for method in methods:
        if method == "transformers":
            run_hf(model, warm, 2, 4, device, args.sample)
            continue
        try:
            run_ours(model, vocab, warm, 2, 4, method == "ours_graph", args.sample)
        except Exception as error:  # the fused sampler failed here: time the torch reference sampler instead
            import constrain.kernels

            info["sampler_fallback"] = repr(error)[:300]
            constrain.kernels._triton_sampling = lambda: None
            run_ours(model, vocab, warm, 2, 4, method == "ours_graph", args.sample)
    if device == "cuda":
        import constrain.kernels

        info["sampler_backend"] = constrain.kernels.backend(device)
        info["tokens_equal_transformers_greedy"] = greedy_agreement(
            model, vocab, prompts[min(args.p)], device
        )
    print(json.dumps(info), flush=True)
    rows = []
    for p in args.p:
        for n in args.n:
            for method in methods:
                if method == "transformers":
                    call = functools.partial(run_hf, model, prompts[p], n, args.new, device, args.sample)
                else:
                    graph = method == "ours_graph"
                    call = functools.partial(
                        run_ours, model, vocab, prompts[p], n, args.new, graph, args.sample
                    )
                result, seconds, peak = timed(device, call)
                row = {"method": method, "n": n, "p": p, "seconds": seconds, "peak_bytes": peak}
                if isinstance(result, str):
                    row["error"] = result
                elif method == "transformers":
                    row["kv_bytes"] = cache_bytes(result.past_key_values)
                    row["stored_new"] = result.past_key_values.get_seq_length() - p
                else:
                    row["kv_bytes"] = result.memory.used_bytes
                    row["kv_allocated_bytes"] = result.memory.allocated_bytes
                    row["stored_new"] = args.new - 1
                    row["graph_steps"] = result.graph_steps
                    row["sampler_seconds"] = sampler_seconds(
                        result_vocab_size(model), n, args.new, device, args.sample
                    )
                if "error" not in row:
                    row["tokens_per_second"] = n * args.new / seconds
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:  # after every row, so a run stopped early keeps what it measured
                    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
                del result
    summarise(rows)
    return {"info": info, "rows": rows}


def summarise(rows: list[dict]) -> None:
    """Print one line per (N, P): times, speed-up and KV ratio against the ideal."""
    by_key = {(r["method"], r["n"], r["p"]): r for r in rows}
    head = ("P", "N", "hf s", "ours s", "graph s", "speedup", "kv ratio", "ideal")
    print(" ".join(f"{h:>8}" for h in head))
    for (method, n, p), hf in sorted(by_key.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if method != "transformers":
            continue
        ours, graph = by_key.get(("ours", n, p)), by_key.get(("ours_graph", n, p))
        best = min(
            (r for r in (ours, graph) if r and "error" not in r), key=lambda r: r["seconds"], default=None
        )
        hf_s = "OOM" if "error" in hf else f"{hf['seconds']:.3f}"
        speed = f"{hf['seconds'] / best['seconds']:.1f}x" if best and "error" not in hf else "-"
        s = (best or {}).get("stored_new", 0)
        ideal = (p + n * s) / (n * (p + s))
        ratio = f"{best['kv_bytes'] / hf['kv_bytes']:.4f}" if best and "error" not in hf else "-"
        o = f"{ours['seconds']:.3f}" if ours and "error" not in ours else "-"
        g = f"{graph['seconds']:.3f}" if graph and "error" not in graph else "-"
        print(" ".join(f"{v:>8}" for v in (p, n, hf_s, o, g, speed, ratio, f"{ideal:.4f}")))


def plot(paths: list[str]) -> None:
    """One PNG per JSON file: time per call and KV memory, ours vs transformers, by N and P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in paths:
        data = json.loads(Path(path).read_text())
        rows, info = data["rows"], data["info"]
        ps = sorted({r["p"] for r in rows})
        fig, axes = plt.subplots(2, len(ps), figsize=(4.2 * len(ps), 7), squeeze=False)
        styles = {
            "transformers": ("tab:red", "o"),
            "ours": ("tab:blue", "s"),
            "ours_graph": ("tab:green", "^"),
        }
        for col, p in enumerate(ps):
            for method, (color, marker) in styles.items():
                sel = [r for r in rows if r["p"] == p and r["method"] == method]
                if not sel:
                    continue
                ok = [r for r in sel if "error" not in r]
                label = {"ours_graph": "ours + CUDA graph"}.get(method, method)
                ns = [r["n"] for r in ok]
                axes[0][col].plot(ns, [r["seconds"] for r in ok], marker=marker, color=color, label=label)
                axes[1][col].plot(
                    ns, [r["kv_bytes"] / 2**20 for r in ok], marker=marker, color=color, label=label
                )
                for r in sel:
                    if "error" in r:
                        axes[0][col].annotate("OOM", (r["n"], 0), color=color, ha="center")
            axes[0][col].set_title(f"P = {p} prompt tokens")
            axes[0][col].set_ylabel("seconds per call (64 new tokens)")
            axes[1][col].set_ylabel("KV cache MiB at the end")
            for row in (0, 1):
                axes[row][col].set_xscale("log", base=2)
                axes[row][col].set_yscale("log")
                axes[row][col].set_xlabel("N branches")
                axes[row][col].grid(alpha=0.3)
            axes[0][col].legend(fontsize=8)
        fig.suptitle(
            f"best-of-N, shared prefix vs transformers: {info['model']} {info['dtype']} on {info['device']}"
        )
        fig.tight_layout()
        out = Path("bench") / f"prefix_{Path(path).stem.removeprefix('prefix_')}.png"
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="llama-small", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--n", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--p", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument(
        "--sample",
        default="greedy",
        choices=["greedy", "random"],
        help="greedy: both sides pick the top token; random: both sample at temperature 1",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    parser.add_argument("--graph", action="store_true", help="also run ours with CUDA graphs (GPU)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", nargs="+", metavar="JSON", help="only plot these result files")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    results = bench(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
