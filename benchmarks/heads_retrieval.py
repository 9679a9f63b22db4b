"""Retrieval-head scoring cost vs context length on a tiny random-init Llama with GQA (4 query / 2 KV heads).

Modes, each (mode, length) in a fresh subprocess:

- ``streaming``: ``retrieval_scores`` as shipped: greedy decoding under a capture that keeps only the top-1 key of
  the current query per step (``stats=("topk",), rows="last:1"``).
- ``plain``: the same ``generate`` without any capture (the model's own activation memory, linear in n).
- ``patterns``: the naive alternative, ``capture(patterns=True)`` around the same ``generate``: the prefill record
  holds every layer's full ``[head, n, n]`` probabilities (what scoring from full eager patterns needs).

Peak memory = growth of the process's max RSS over the baseline taken after the model is built and a short warm-up
decode has run. ``pattern_mb`` is the analytic size of full float32 patterns, ``layers * heads * n^2 * 4`` bytes.
Usage: ``python benchmarks/heads_retrieval.py [--lengths 256 512 1024 2048 4096] [--out results/x.json]``.
``--quick`` (CI smoke run): every mode at 64 tokens, all in one worker subprocess, one thread;
exits 1 when any mode fails.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LAYERS, HEADS, KV_HEADS, NEW_TOKENS = 4, 8, 2, 8


def build_model():
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(mode: str, length: int) -> dict:
    import torch

    import attnscope
    from attnscope.circuits.retrieval_heads import retrieval_scores
    from attnscope.datasets import needle_tokens

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = build_model()
    suite = needle_tokens(1, seq_len=length, vocab_size=512, needle_len=NEW_TOKENS + 1, cue_len=1, depth=0.5,
                          seed=0)
    warm = needle_tokens(1, seq_len=64, vocab_size=512, needle_len=4, seed=1)
    retrieval_scores(model, warm, rouge_threshold=None, progress=False)  # imports, kernels, allocator warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_before = _rss_mb()
    start = time.perf_counter()
    ids = torch.tensor([suite[0].ids])
    if mode == "streaming":
        retrieval_scores(model, suite, rouge_threshold=None, progress=False)
    elif mode == "plain":
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    else:
        with attnscope.capture(model, patterns=True) as cap:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        assert cap.trace is not None
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "length": length, "seconds": round(seconds, 3),
            "peak_growth_mb": round(max(peak - base, 0.0), 1), "rss_before_mb": round(rss_before, 1),
            "pattern_mb": round(LAYERS * HEADS * length ** 2 * 4 / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--modes", nargs="+", default=["plain", "streaming", "patterns"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: every mode at 64 tokens, in one worker")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)  # MODE[,MODE...]
    args = parser.parse_args()
    if args.worker:
        modes = args.worker[0].split(",")
        rows = [run_one(mode, int(args.worker[1])) for mode in modes]
        print(json.dumps(rows if len(modes) > 1 else rows[0]))
        return
    if args.quick:
        args.lengths = [64]
        os.environ.setdefault("BENCH_THREADS", "1")  # the worker's: steadier than 2 on busy cores
    groups = [args.modes] if args.quick else [[mode] for mode in args.modes]  # modes per worker process
    rows, failed = [], []
    print(f"{'mode':10s} {'length':>6s} {'seconds':>8s} {'peak MB':>8s} {'n^2 MB':>8s}")
    for length in args.lengths:
        for group in groups:
            mode = ",".join(group)
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(length)], capture_output=True,
                                  text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                print(f"{mode:10s} {length:6d} failed: {proc.stderr.strip().splitlines()[-1:]}")
                failed.append(mode)
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            for row in out if isinstance(out, list) else [out]:
                rows.append(row)
                print(f"{row['mode']:10s} {length:6d} {row['seconds']:8.2f} {row['peak_growth_mb']:8.1f} "
                      f"{row['pattern_mb']:8.1f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    if args.quick and failed:
        sys.exit(f"quick run: failed: {failed}")


if __name__ == "__main__":
    main()
