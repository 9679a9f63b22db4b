"""Attention kernels on a CUDA GPU (H100/H200 class): time, throughput and peak memory of one attention layer.

Shapes: heads 32 / KV heads 8 (GQA), head dim 128, bf16, causal; lengths 4k, 16k, 32k, 128k; batch 1 to 8.
Modes per (length, batch):

- ``sdpa``: ``F.scaled_dot_product_attention`` on the flash backend, output only (the floor we compare against);
- ``ours_out``: our Triton forward, output only (no statistics);
- ``ours_stats``: our forward with output and statistics (entropy, mass on the first token, top-5 keys);
- ``ours_stats_only``: statistics without values (what capture runs per layer);
- ``eager``: eager attention keeping the probabilities (``output_attentions``); out-of-memory is caught and reported.

Then an all-heads ablation sweep (every head of the layer ablated in turn, ``zero`` and ``uniform``): 32 launches
vs one launch with a ``[batch*32, head]`` gate. Correctness is checked on a small slice against the torch reference
before anything is timed. Times are medians of CUDA-event timings after warm-up (the first call also autotunes).

Usage::

    python benchmarks/bench_kernels.py             # full grid; prints a table, writes results/bench_kernels.json
    python benchmarks/bench_kernels.py --lengths 4096 --batches 1 --repeats 3 --sweep-lengths
    python benchmarks/bench_kernels.py --aot       # no GPU needed: compile for sm_90, report registers/spills
    python benchmarks/bench_kernels.py --quick --out /tmp/k.json   # smoke run on CPU, a few seconds (CI)

Without a CUDA device it prints why and exits 0 (``--aot`` and ``--quick`` still work).

``--quick`` runs every code path at tiny sizes (4 heads / 2 KV heads of dim 16, length 32, batch 1, every mode, the
ablation sweep, the correctness check) on CPU, where ``backend="triton"`` runs the kernels in Triton's interpreter
(as CI tests them; ``TRITON_INTERPRET=1`` or not), and meanwhile ``--aot`` for one config per variant in a
subprocess (ahead-of-time compiles do not work under ``TRITON_INTERPRET=1``). Its numbers mean nothing (no peak
memory on CPU); it exits 1 when any step fails. ``--quick --device cuda`` is the same smoke run on the GPU.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["sdpa", "ours_out", "ours_stats", "ours_stats_only", "eager"]
STATS = ("entropy", "mass", "topk")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (fewer for runs over a second)")
    p.add_argument("--sweep-lengths", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--no-autotune", action="store_true", help="use the default config (ATTNSCOPE_TRITON_AUTOTUNE=0)")
    p.add_argument("--check-length", type=int, default=1024, help="length of the correctness check's inputs")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda (cpu with --quick: Triton's interpreter)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny shapes, every mode, on CPU by default; one AOT config per variant")
    p.add_argument("--aot", action="store_true", help="compile for Hopper and report resources; no GPU needed")
    p.add_argument("--out", default="results/bench_kernels.json")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.quick else "cuda"
    if args.quick:
        args.lengths, args.batches, args.heads, args.kv_heads, args.head_dim = [32], [1], 4, 2, 16
        args.modes, args.repeats, args.sweep_lengths, args.check_length = MODES, 1, [32], 32
    return args


# ---- helpers ------------------------------------------------------------------------------------------------------

def _time(fn, repeats: int, device: str = "cuda") -> float:
    """Median seconds of ``fn`` over CUDA events (CPU: wall clock), after one warm-up call (fewer repeats for long
    calls)."""
    import torch

    fn()
    if device != "cuda":  # CPU (--quick): wall clock, no probing call
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - start
    n = max(1, min(repeats, int(10.0 / max(once, 1e-6))))
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _peak(fn, device: str = "cuda") -> float | None:
    """Peak device memory (GiB) allocated by ``fn`` above what was allocated before it (None on CPU)."""
    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**30


def _causal_flops(b: int, h: int, n: int, d: int, with_values: bool) -> float:
    per_matmul = 2.0 * b * h * n * n * d / 2  # causal: half the square
    return per_matmul * (2 if with_values else 1)


def _matmul_ceiling(device: str = "cuda", size: int = 8192) -> float:
    """Measured bf16 matmul TFLOP/s (``size``^3), the ceiling the attention numbers are read against."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    t = _time(lambda: a @ b, 20, device)
    return 2 * size**3 / t / 1e12


def _inputs(b, h, hkv, n, d, seed=0, device="cuda"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    shape_q, shape_kv = (b, n, h, d), (b, n, hkv, d)  # HF layout: [batch, seq, head, d] viewed as [b, h, seq, d]
    q = torch.randn(shape_q, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
    return q, k, v


def _mode_fn(mode, q, k, v):
    import torch
    import torch.nn.functional as F

    from attnscope.kernels import attention_with_interventions, streaming_statistics_cuda

    scale = q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    if mode == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        expanded = []

        def run():  # GQA inside the flash kernel where this torch supports it, else KV expanded once
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                if not expanded:
                    try:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    except RuntimeError:
                        expanded.append((k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
                return F.scaled_dot_product_attention(q, *expanded[0], is_causal=True)
        return run
    if mode == "ours_out":
        return lambda: attention_with_interventions(q, k, v, is_causal=True, scaling=scale, backend="triton")
    if mode == "ours_stats":
        return lambda: attention_with_interventions(q, k, v, is_causal=True, scaling=scale, stats=STATS, topk=5,
                                                    backend="triton")
    if mode == "ours_stats_only":
        return lambda: streaming_statistics_cuda(q, k, None, scaling=scale, is_causal=True, stats=STATS, topk=5,
                                                 backend="triton")

    def eager():  # what HF eager attention does with output_attentions=True, weights kept
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        w = torch.matmul(q, ke.transpose(-1, -2)) * scale
        n_q, n_k = w.shape[-2:]
        w = w.masked_fill(torch.ones(n_q, n_k, dtype=torch.bool, device=w.device).triu(n_k - n_q + 1), -math.inf)
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, ve), w
    return eager


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---- checks and measurements --------------------------------------------------------------------------------------

def check_correctness(args) -> dict:
    """Our kernel vs the torch reference on a small slice of the benchmark shapes (fresh random inputs)."""
    import torch

    from attnscope.kernels import attention_with_interventions, head_interventions

    q, k, v = _inputs(2, args.heads, args.kv_heads, args.check_length, args.head_dim, seed=1, device=args.device)
    gate, uni = head_interventions(args.heads, zero=[0], rescale={1: 0.5}, uniform=[2])
    kw = dict(is_causal=True, gate=gate, uniform=uni, stats=STATS, topk=5)
    got = attention_with_interventions(q, k, v, backend="triton", **kw)
    ref = attention_with_interventions(q, k, v, backend="torch", **kw)
    errs = {}
    for name in ("out", "lse", "entropy", "mass", "topk_weight"):
        a, b = got[name].double(), ref[name].double()
        errs[name] = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if not torch.isfinite(a).all():
            errs[name] = float("nan")
    ok = errs["out"] < 1e-2 and all(errs[n] < 1e-4 for n in errs if n != "out")
    return {"ok": ok, "relative_errors": errs}


def measure(args, n: int, b: int, mode: str) -> dict:
    import torch

    row = {"mode": mode, "length": n, "batch": b}
    q = k = v = None
    try:
        q, k, v = _inputs(b, args.heads, args.kv_heads, n, args.head_dim, device=args.device)
        fn = _mode_fn(mode, q, k, v)
        row["peak_gib"] = _peak(fn, args.device)
        row["seconds"] = _time(fn, args.repeats, args.device)
        flops = _causal_flops(b, args.heads, n, args.head_dim, with_values=mode != "ours_stats_only")
        row["tflops"] = flops / row["seconds"] / 1e12
        row["tokens_per_s"] = b * n / row["seconds"]
    except Exception as err:  # noqa: BLE001 - report and go on
        row["error"] = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {str(err)[:160]}"
    finally:
        del q, k, v
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def ablation_sweep(args, n: int) -> list[dict]:
    """Every head ablated in turn: H launches with one gate each, vs one launch over a [H, head] gate batch."""
    import torch

    from attnscope.kernels import attention_with_interventions

    h = args.heads
    q, k, v = _inputs(1, h, args.kv_heads, n, args.head_dim, seed=2, device=args.device)
    eye = torch.eye(h, device=args.device, dtype=torch.bool)
    rows = []
    for mode in ("zero", "uniform"):
        def one_by_one():
            for head in range(h):
                gate = (~eye[head]).float() if mode == "zero" else None
                uni = eye[head] if mode == "uniform" else None
                attention_with_interventions(q, k, v, is_causal=True, gate=gate, uniform=uni, backend="triton")

        qb, kb, vb = (t.expand(h, -1, -1, -1) for t in (q, k, v))  # batch item i ablates head i (no copies)

        def batched():
            return attention_with_interventions(qb, kb, vb, is_causal=True, backend="triton",
                                                gate=(~eye).float() if mode == "zero" else None,
                                                uniform=eye if mode == "uniform" else None)
        for how, fn in (("one_by_one", one_by_one), ("batched", batched)):
            row = {"sweep": mode, "how": how, "length": n, "heads": h}
            try:
                row["seconds"] = _time(fn, 3 if args.device == "cuda" else args.repeats, args.device)
                row["per_head_ms"] = row["seconds"] / h * 1e3
            except Exception as err:  # noqa: BLE001
                row["error"] = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {str(err)[:160]}"
            rows.append(row)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def aot_report(args) -> list[dict]:
    """Compile the main variants for sm_90 with every autotune config; no GPU needed."""
    import torch

    from attnscope.kernels import launch
    from attnscope.kernels.aot import compile_forward

    variants = {"out": dict(stats=()), "out+stats": dict(stats=STATS), "stats_only": dict(stats=STATS, want_out=False),
                "out+stats+padding": dict(stats=STATS, mask_kind="padding")}
    rows = []
    for i, (name, kw) in enumerate(variants.items()):
        configs = launch.hopper_configs()
        for cfg in configs[i % len(configs):][:1] if args.quick else configs:  # quick: one config per variant
            c = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            m = 1 if c["BLOCK_M"] <= 32 else 4096
            try:
                rep = compile_forward(dtype=torch.bfloat16, heads=args.heads, kv_heads=args.kv_heads,
                                      head_dim=args.head_dim, n_query=m, config=c, **kw)
                rows.append({"variant": name, **c, **{k: rep[k] for k in ("registers", "stack", "local",
                                                                             "shared_bytes", "hgmma", "hmma")}})
            except Exception as err:  # noqa: BLE001
                rows.append({"variant": name, **c, "error": f"{type(err).__name__}: {str(err)[:160]}"})
            print(rows[-1], flush=True)
    return rows


def _print_table(rows: list[dict], sweep: list[dict], ceiling: float | None) -> None:
    print(f"\nbf16 matmul ceiling: {ceiling:.0f} TFLOP/s" if ceiling else "")
    print(f"{'length':>7} {'batch':>5} {'mode':>16} {'ms':>10} {'TFLOP/s':>8} {'%ceil':>6} {'Mtok/s':>8} "
          f"{'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['length']:>7} {r['batch']:>5} {r['mode']:>16}  {r['error']}")
            continue
        pct = 100 * r["tflops"] / ceiling if ceiling else float("nan")
        peak = float("nan") if r["peak_gib"] is None else r["peak_gib"]  # None: not measured (CPU)
        print(f"{r['length']:>7} {r['batch']:>5} {r['mode']:>16} {r['seconds'] * 1e3:>10.2f} {r['tflops']:>8.1f} "
              f"{pct:>6.1f} {r['tokens_per_s'] / 1e6:>8.2f} {peak:>9.2f}")
    for r in sweep:
        tail = r.get("error") or f"{r['seconds'] * 1e3:.1f} ms total, {r['per_head_ms']:.2f} ms per head"
        print(f"sweep {r['sweep']:>7} {r['how']:>10} length {r['length']}: {tail}")


def _start_quick_aot(args) -> tuple[subprocess.Popen, Path]:
    """Start ``--aot --quick`` in a subprocess without ``TRITON_INTERPRET`` (it compiles): (process, its output)."""
    out = Path(args.out).with_suffix(".quick-aot.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, __file__, "--aot", "--quick", "--out", str(out)], env=env)
    return proc, out.with_suffix(".aot.json")


def _finish_quick_aot(proc: subprocess.Popen, aot_out: Path) -> list[dict]:
    code = proc.wait()
    if code != 0 or not aot_out.exists():
        return [{"error": f"--aot --quick exited {code}"}]
    rows = json.loads(aot_out.read_text())
    aot_out.unlink()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_autotune:
        os.environ["ATTNSCOPE_TRITON_AUTOTUNE"] = "0"
    if args.aot:
        os.environ.pop("TRITON_INTERPRET", None)  # compiles for sm_90: the interpreter's @jit cannot compile
        rows = aot_report(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".aot.json").write_text(json.dumps(rows, indent=2))
        return 1 if args.quick and any("error" in r for r in rows) else 0
    aot = _start_quick_aot(args) if args.quick else None  # compiles on another core meanwhile
    try:
        return run(args, aot)
    finally:
        if aot is not None and aot[0].poll() is None:  # failed before collecting it
            aot[0].kill()
            aot[0].wait()


def run(args, aot: tuple[subprocess.Popen, Path] | None = None) -> int:
    import torch

    if args.quick:
        torch.set_num_threads(1)  # tiny shapes; the AOT compile runs beside it

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/bench_kernels.py: no CUDA device here; nothing to measure (this benchmark needs an "
              "H100-class GPU; `--aot` compiles the kernels for sm_90 without one, `--quick` runs them on CPU).")
        return 1 if args.quick else 0
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {device}", flush=True)
    check = check_correctness(args)
    print(f"correctness vs torch reference (relative errors): {check}", flush=True)
    if not check["ok"]:
        print("kernel disagrees with the reference: not timing it", file=sys.stderr)
        return 1
    ceiling = _matmul_ceiling(args.device, 256 if args.quick else 8192)
    rows = []
    for n in args.lengths:
        for b in args.batches:
            for mode in args.modes:
                rows.append(measure(args, n, b, mode))
                print(rows[-1], flush=True)
    sweep = [r for n in args.sweep_lengths for r in ablation_sweep(args, n)]
    for r in sweep:
        print(r, flush=True)
    result = {"device": device, "matmul_tflops": ceiling, "check": check, "rows": rows, "sweep": sweep,
              "args": vars(args)}
    if aot is not None:
        result["aot"] = _finish_quick_aot(*aot)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print_table(rows, sweep, ceiling)
    failed = [r for r in rows + sweep + result.get("aot", []) if "error" in r]
    if args.quick and failed:
        print(f"quick run: {len(failed)} step(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
