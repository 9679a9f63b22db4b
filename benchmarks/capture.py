"""Capture cost on a tiny Llama-class model with GQA: time and peak memory of

(a) plain SDPA forward, (b) eager with output_attentions, (c) TransformerLens run_with_cache of patterns,
(d) attnscope full-pattern capture, (e) attnscope streaming statistics (mass on token 0, entropy, top-5),
(f) the same without top-k (mass on token 0, entropy).

Two model shapes: ``--shape tiny`` (hidden 256, 8 heads of 32, attention is about half of a 4096-token forward:
the worst case for capture overhead) and ``--shape wide`` (hidden 1024, 16 heads of 64, GQA 4 KV heads).

Each (mode, length) runs in a fresh subprocess (``--rounds`` of them, interleaved across modes); each process keeps
its fastest call, and the table gives the fastest and the median process (at 512 tokens eager's fastest call
varies by up to 25% from one process to the next); peak memory is the growth of the process's max RSS over the model-built baseline. Usage:
``BENCH_THREADS=1 python benchmarks/capture.py [--shape tiny] [--lengths 512 4096] [--rounds 3]
[--out results/bench_capture.json]``.

``--quick`` (CI smoke run, a few seconds after imports): every mode at 32 tokens, one timed call, all modes in one
worker subprocess with one thread (so the numbers mean nothing); exits 1 when any mode fails.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["sdpa", "eager", "transformer_lens", "attnscope_patterns", "attnscope_stats", "attnscope_mass_entropy"]
SHAPES = {"tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2),
          "wide": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4)}


def build_model(shape: str = "tiny"):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, num_hidden_layers=4, max_position_embeddings=8192, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _tl_bridge(model):
    """A TransformerBridge around the same HF model, booted offline."""
    from attnscope.probes.adapters.tl_bridge import boot_bridge, tiny_word_tokenizer

    return boot_bridge(model, tiny_word_tokenizer(model.config.vocab_size))


def run_one(mode: str, length: int, repeats: int, shape: str = "tiny") -> dict:
    import torch

    import attnscope

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build_model(shape)
    ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(0))
    if mode == "transformer_lens":
        bridge = _tl_bridge(model)
        fn = lambda: bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))  # noqa: E731
    elif mode == "eager":
        model.set_attn_implementation("eager")
        fn = lambda: model(ids, output_attentions=True)  # noqa: E731
    elif mode == "sdpa":
        fn = lambda: model(ids)  # noqa: E731
    elif mode == "attnscope_patterns":
        fn = lambda: attnscope.capture(model, ids)  # noqa: E731
    elif mode == "attnscope_mass_entropy":
        fn = lambda: attnscope.capture(model, ids, stats=("mass", "entropy"))  # noqa: E731
    else:
        fn = lambda: attnscope.capture(model, ids, stats=("mass", "entropy", "topk"), topk=5)  # noqa: E731
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
            del result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "length": length, "shape": shape, "seconds": min(times[1:]) if repeats else times[0],
            "peak_mb": (peak - base_rss) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per process after one warm-up (default: 10 up to 1024 tokens, else 2)")
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per mode, interleaved; min is kept")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", default="results/bench_capture.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: every mode at 32 tokens, in one worker")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # MODE[,MODE...] LENGTH: a worker
    args = parser.parse_args()
    if args.one:
        modes = args.one[0].split(",")
        rows = [run_one(mode, int(args.one[1]), 2 if args.repeats is None else args.repeats, args.shape)
                for mode in modes]
        print(json.dumps(rows if len(modes) > 1 else rows[0]))
        return
    if args.quick:
        args.lengths, args.repeats, args.rounds = [32], 1, 1
        os.environ.setdefault("BENCH_THREADS", "1")  # the workers': steadier than 2 on busy cores
    groups = [args.modes] if args.quick else [[mode] for mode in args.modes]  # modes per worker process
    rows = []
    for length in args.lengths:
        repeats = args.repeats if args.repeats is not None else (10 if length <= 1024 else 2)
        runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for _ in range(args.rounds):  # modes interleaved: slow drift of the machine hits every mode alike
            for group in groups:
                proc = subprocess.run([sys.executable, __file__, "--one", ",".join(group), str(length), "--repeats",
                                       str(repeats), "--shape", args.shape], capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200]
                    got = [{"mode": mode, "length": length, "error": tail} for mode in group]
                else:
                    out = json.loads(proc.stdout.strip().splitlines()[-1])
                    got = out if isinstance(out, list) else [out]
                for row in got:
                    print(row, flush=True)
                    runs[row["mode"]].append(row)
        for mode in args.modes:
            timed = [r for r in runs[mode] if "seconds" in r]
            if not timed:
                rows.append(runs[mode][-1])
                continue
            best = dict(min(timed, key=lambda r: r["seconds"]))
            best["median_seconds"] = statistics.median(r["seconds"] for r in timed)  # over the fresh processes
            best["processes"] = len(timed)
            rows.append(best)
    base = {r["length"]: r for r in rows if r["mode"] == "sdpa" and "seconds" in r}
    print(f"\n{'length':>6} {'mode':>22} {'min s':>8} {'x sdpa':>7} {'median s':>9} {'x sdpa':>7} {'peak MB':>8}")
    for r in rows:
        if "seconds" in r:
            b = base.get(r["length"])
            ratio = r["seconds"] / b["seconds"] if b else float("nan")
            median_ratio = r["median_seconds"] / b["median_seconds"] if b else float("nan")
            print(f"{r['length']:>6} {r['mode']:>22} {r['seconds']:>8.3f} {ratio:>7.2f} {r['median_seconds']:>9.3f} "
                  f"{median_ratio:>7.2f} {r['peak_mb']:>8.1f}")
        else:
            print(f"{r['length']:>6} {r['mode']:>22} error: {r['error']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.quick and any("error" in r for r in rows):
        sys.exit("quick run: some modes failed")


if __name__ == "__main__":
    main()
