"""Every single-head zero ablation of a model on one suite, three ways, timed:

(a) attnscope's batched sweep (``single_head_sweep``: the suite batch replicated, one head per block of rows,
    chunked to a memory budget), (b) a loop of attnscope ``apply_plan`` single-head ablations (one forward per head
    and batch), (c) a loop of TransformerLens ``run_with_hooks`` calls zeroing ``blocks.{l}.attn.hook_z[:, :, h]``
    on a ``TransformerBridge`` booted offline around a copy of the same HF model.

The metric is the answer loss (mean cross-entropy on the induction positions) per head; the three agree to 1e-6.
Configurations (``CONFIGS``): the zoo organism ``zoo:induction-2l`` (a random GPT-2 of its shape when the
checkpoint is missing) with 64 and with 8 prompts, a random 6 x 8-head GPT-2 on induction (every position
scored; compute-bound) and with a vocabulary of 8192 on a last-token recall metric.
Methods run interleaved ``--repeats`` times (the machine is shared) and the minimum is reported. Usage:
``python benchmarks/heads_sweep.py [--configs organism organism-8 gpt2-random gpt2-last-token] [--repeats 3]
[--threads 1] [--out results/bench_heads_sweep.json]``.

``--quick`` (CI smoke run): every configuration with at most 17 tokens, batches of 2 (4 items for the organism, 2
for the GPT-2s), one repeat; exits 1 when the three methods disagree by more than 1e-4.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path


def build_model(name: str, seq_len: int):
    import torch
    import transformers

    if name.startswith("zoo:"):
        import attnscope

        return attnscope.load(name).module
    torch.manual_seed(0)
    if name == "organism-random":
        cfg = transformers.GPT2Config(vocab_size=128, n_positions=max(seq_len, 32), n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=None, eos_token_id=None)
    else:
        vocab = 8192 if name.endswith("-8k") else 1024
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=max(seq_len, 64), n_embd=256, n_layer=6,
                                      n_head=8, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(cfg).eval()


def tl_loop(bridge, batches, metric, n_layers: int, n_heads: int) -> dict:
    """Zero each head through TransformerLens hooks; per head the metric over all batches."""
    import torch

    out = {}
    for layer in range(n_layers):
        for head in range(n_heads):
            def zero(z, hook, h=head):
                z[:, :, h, :] = 0.0
                return z
            totals = torch.zeros(2, dtype=torch.float64)
            for batch in batches:
                with torch.no_grad():
                    logits = bridge.run_with_hooks(batch.input_ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
                totals += metric.item_stats(logits, batch).sum(0)
            out[(layer, head)] = metric.reduce(totals)
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


CONFIGS = {
    # the zoo organism (2 layers x 4 heads, d_model 64, 32 tokens), a 64-prompt suite in one batch
    "organism": {"model": "zoo:induction-2l", "suite": "induction", "n_items": 64, "seq_len": 32, "batch_size": 64},
    # the same organism probed with 8 prompts: per-forward overhead dominates
    "organism-8": {"model": "zoo:induction-2l", "suite": "induction", "n_items": 8, "seq_len": 32, "batch_size": 8},
    # a wider random GPT-2 (6 x 8 heads, d_model 256, vocab 1024), every repeated position scored: compute-bound
    "gpt2-random": {"model": "gpt2-random", "suite": "induction", "n_items": 16, "seq_len": 64, "batch_size": 16},
    # 6 x 8 heads, d_model 256, vocab 8192 (LM head ~ 30% of the FLOPs, as in GPT-2 small), last-token metric
    "gpt2-last-token": {"model": "gpt2-random-8k", "suite": "recall", "n_items": 16, "seq_len": 49,
                        "batch_size": 16},
}


def make_suite(kind: str, n_items: int, seq_len: int, vocab: int):
    from attnscope.datasets import associative_recall, induction

    if kind == "recall":  # one query at the end: one scored position per item
        return associative_recall(n_items, n_pairs=(seq_len - 1) // 2, n_queries=1, vocab_size=vocab, seed=0)
    return induction(n_items, seq_len=seq_len, vocab_size=vocab, seed=0)


def run_config(model_name: str, suite_kind: str, n_items: int, seq_len: int, batch_size: int,
               memory_mb: float | None, repeats: int) -> dict:
    import statistics

    import torch

    from attnscope.circuits.head_ablation import ablation_loop, single_head_sweep
    from attnscope.circuits.task_metrics import AnswerLoss, eval_batches
    from attnscope.probes.adapters.tl_bridge import boot_bridge, tiny_word_tokenizer
    from attnscope.probes.head_slices import output_projections

    model = build_model(model_name, seq_len)
    vocab = int(model.config.vocab_size)
    seq_len = min(seq_len, int(model.config.n_positions))
    suite = make_suite(suite_kind, n_items, seq_len, vocab)
    batches, metric = eval_batches(suite, batch_size=batch_size), AnswerLoss()
    projections = output_projections(model)
    n_layers, n_heads = len(projections), projections[0].n_heads
    bridge = boot_bridge(copy.deepcopy(model), tiny_word_tokenizer(vocab))
    methods = {
        "attnscope batched sweep": lambda: single_head_sweep(model, batches, metric, memory_mb=memory_mb),
        "attnscope batched sweep, no prefix sharing": lambda: single_head_sweep(
            model, batches, metric, memory_mb=memory_mb, share_prefix=False),
        "attnscope loop of apply_plan": lambda: ablation_loop(model, batches, metric),
        "TransformerLens run_with_hooks loop": lambda: tl_loop(bridge, batches, metric, n_layers, n_heads),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    single_head_sweep(model, batches[:1], metric, memory_mb=memory_mb)  # warm-up
    with torch.no_grad():
        bridge(batches[0].input_ids)
    for _ in range(repeats):  # interleaved, so load from other processes hits every method alike
        for name, fn in methods.items():
            results[name], seconds = timed(fn)
            times[name].append(seconds)
    sweep = {(int(r.layer), int(r.head)): float(r.value) for r in results["attnscope batched sweep"].df.itertuples()}
    diffs = {"loop": max(abs(sweep[k] - results["attnscope loop of apply_plan"][k]) for k in sweep),
             "tl": max(abs(sweep[k] - results["TransformerLens run_with_hooks loop"][k]) for k in sweep)}
    t_tl = min(times["TransformerLens run_with_hooks loop"])
    rows = [{"method": name, "min_s": min(ts), "median_s": statistics.median(ts), "speedup_vs_tl": t_tl / min(ts)}
            for name, ts in times.items()]
    return {"model": model_name, "suite": suite_kind, "layers": n_layers, "heads": n_heads, "items": n_items,
            "seq_len": seq_len, "batch_size": batch_size, "memory_mb": memory_mb, "repeats": repeats,
            "sweep_passes": results["attnscope batched sweep"].provenance["forward_passes"],
            "loop_passes": n_layers * n_heads * len(batches), "max_abs_diff_vs_loop": diffs["loop"],
            "max_abs_diff_vs_tl": diffs["tl"], "rows": rows,
            "most_damaging_head": "L{}H{}".format(*max(sweep, key=sweep.get))}


def print_result(r: dict) -> None:
    print(f"\n[{r['config']}] {r['model']} ({r['suite']}): {r['layers']}x{r['heads']} heads, {r['items']} items x "
          f"{r['seq_len']} tokens, batch "
          f"{r['batch_size']}; sweep {r['sweep_passes']} ablated passes vs {r['loop_passes']} in the loops; "
          f"min of {r['repeats']} interleaved runs")
    print(f"{'method':45s} {'min s':>8s} {'median s':>9s} {'vs TL':>7s}")
    for row in r["rows"]:
        print(f"{row['method']:45s} {row['min_s']:8.2f} {row['median_s']:9.2f} {row['speedup_vs_tl']:6.1f}x")
    print(f"max |sweep - loop| = {r['max_abs_diff_vs_loop']:.1e}, max |sweep - TL| = {r['max_abs_diff_vs_tl']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-mb", type=float, default=None, help="pass budget (default: the sweep's own)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    parser.add_argument("--out", default="results/bench_heads_sweep.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2-4 items of <= 17 tokens, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1

    import torch

    torch.set_num_threads(args.threads)
    results = []
    for name in args.configs:
        cfg = dict(CONFIGS[name])
        if args.quick:
            cfg.update(n_items=4 if cfg["model"].startswith("zoo:") else 2, seq_len=min(cfg["seq_len"], 17),
                       batch_size=2)
        if cfg["model"].startswith("zoo:"):
            from attnscope import zoo
            from attnscope.errors import ModelNotFoundError

            try:
                config = json.loads((zoo.checkpoint_path(cfg["model"][4:]) / "config.json").read_text())
                unscaled = config.get("scale_attn_weights") is False
            except ModelNotFoundError:
                unscaled = True
            if unscaled:  # no checkpoint, or attention TransformerLens cannot reproduce (scale_attn_weights=False)
                cfg["model"] = "organism-random"  # same architecture and cost, random weights
        r = run_config(cfg["model"], cfg["suite"], cfg["n_items"], cfg["seq_len"], cfg["batch_size"],
                       args.memory_mb, args.repeats)
        r["config"] = name
        r["threads"] = args.threads
        print_result(r)
        results.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    worst = max(max(r["max_abs_diff_vs_loop"], r["max_abs_diff_vs_tl"]) for r in results)
    if args.quick and not worst <= 1e-4:
        raise SystemExit(f"quick run: the methods disagree by {worst:.1e}")


if __name__ == "__main__":
    main()
