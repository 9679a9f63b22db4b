"""Exact activation patching vs attribution patching (AtP, AtP*) of every head: time and agreement.

Per configuration: the exact per-head patching effects (``activation_patching``, noising, batched, prefix sharing),
the AtP and AtP* estimates (``attribution_patching``), their wall times, and their agreement with the exact effects:
Spearman of magnitudes (|estimate| vs |exact|; AtP* is a magnitude), Spearman of signed values (AtP), and the
fraction of the heads with |exact| > 10% of the largest that the estimate ranks in its top max(10, their number).
The exact sweep is also compared with its prefix-sharing bound (``prefix_bound``: what the sweep would cost if
each patched chunk paid only for the blocks after its patch point), and each estimate's time is given in forward-pass
equivalents (one forward over every clean input). Each method runs once after a warm-up call (a machine shared with others: expect noise). Configurations:

- the zoo organisms: ``induction-2l`` (induction pairs: fresh random tokens; logit of the right token),
  ``recall-llama`` (GQA; values rotated; logit difference), ``sink-lm`` (bigram-backcopy sequences against fresh
  random tokens; logit of the next token), ``agreement-enc`` (BERT classifier; the class token after the marker
  swapped for another class's; logit difference of the two labels);
- the real ``minilm`` (all-MiniLM-L6-v2) on IOI pairs (ABC corruption) with the sentence embedding projected on the
  clean-minus-corrupted direction as the metric;
- a 12-layer GPT-2-class model with GPT-2 small's shape (12 x 12 heads, d_model 768, vocab 50257), *random init*,
  at 128 and 1024 tokens (random tokens, a quarter of them replaced; logit difference of two tokens at the end).

Usage: ``python benchmarks/patching.py [--configs ...] [--threads 2] [--out results/bench_patching.json]``;
``--quick`` (CI smoke run): every configuration at toy sizes (2-4 pairs, GPT-2 of width 64 at 16 and 32 tokens).
"""

import argparse
import json
import os
import time
from pathlib import Path

CONFIGS = {
    "induction-2l": {"kind": "zoo", "n": 32},
    "recall-llama": {"kind": "zoo", "n": 32},
    "sink-lm": {"kind": "zoo", "n": 32},
    "agreement-enc": {"kind": "zoo", "n": 32},
    "minilm-ioi": {"kind": "minilm", "n": 16},
    "gpt2-12l-128": {"kind": "gpt2", "n": 8, "seq_len": 128},
    "gpt2-12l-1024": {"kind": "gpt2", "n": 2, "seq_len": 1024},
}


def fresh_token_pairs(suite, vocab: int, seed: int = 0):
    """Every token after the first replaced by fresh random ones; every position predicts the clean next token."""
    import numpy as np

    from attnscope.circuits.patch_pairs import PatchPairs

    rng = np.random.default_rng(seed)
    clean = [list(item.ids) for item in suite]
    corrupt = [c[:1] + [int(t) for t in rng.integers(1, vocab, len(c) - 1)] for c in clean]
    return PatchPairs(clean, corrupt, [list(range(len(c) - 1)) for c in clean], [c[1:] for c in clean],
                      name=f"{suite.name} vs fresh tokens")


def agreement_setup(model, n: int):
    """Agreement pairs: the class token after the marker replaced by a token of the next class."""
    import torch

    from attnscope.circuits.patch_pairs import FunctionMetric, PatchPairs
    from attnscope.tasks import build_suite

    suite = build_suite("default", model, n_items=n)
    of = {int(k): v for k, v in suite.metadata["class_of_token"].items()}
    by_class: dict[int, list[int]] = {}
    for token, label in of.items():
        by_class.setdefault(label, []).append(token)
    n_classes = len(by_class)
    clean, corrupt, labels, other = [], [], [], []
    for item in suite:
        pos, label = item.metadata["class_position"], int(item.label)
        swapped = (label + 1) % n_classes
        cor = list(item.ids)
        cor[pos] = by_class[swapped][0]
        clean.append(list(item.ids))
        corrupt.append(cor)
        labels.append([label])
        other.append([swapped])
    pairs = PatchPairs(clean, corrupt, [[0]] * len(clean), labels, other, pad_id=0, name=suite.name)

    def label_logit_diff(output, batch):
        logits = output.logits
        return (logits.gather(1, batch.answers[:, :1]) - logits.gather(1, batch.wrong[:, :1]))[:, 0]
    return pairs, FunctionMetric(label_logit_diff, "label_logit_diff"), torch


def minilm_setup(model, n: int):
    import torch

    from attnscope.circuits.patch_pairs import FunctionMetric, PatchPairs
    from attnscope.circuits.task_metrics import mean_pool
    from attnscope.datasets import ioi

    pairs = PatchPairs.from_suite(ioi(n, seed=0, tokenizer=model.tokenizer), model.tokenizer)
    pooled = {}
    with torch.no_grad():
        for side in ("clean", "corrupt"):
            rows = [mean_pool(model.module(input_ids=b.ids(side), attention_mask=b.attention_mask), b.attention_mask)
                    for b in pairs.batches(16)]
            pooled[side] = torch.cat(rows).mean(0)
    direction = pooled["clean"] - pooled["corrupt"]

    def embedding_along_clean_direction(output, batch):
        return mean_pool(output, batch.attention_mask) @ direction
    return pairs, FunctionMetric(embedding_along_clean_direction, "embedding_direction")


def gpt2_setup(n: int, seq_len: int, quick: bool):
    import torch
    import transformers

    from attnscope.circuits.patch_pairs import PatchPairs

    torch.manual_seed(0)
    width, vocab = (64, 512) if quick else (768, 50257)
    cfg = transformers.GPT2Config(n_layer=12, n_head=4 if quick else 12, n_embd=width, n_positions=max(seq_len, 64),
                                  vocab_size=vocab, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (n, seq_len), generator=g)
    corrupt = clean.clone()
    swap = torch.rand(n, seq_len, generator=g) < 0.25
    corrupt[swap] = torch.randint(0, vocab, (int(swap.sum()),), generator=g)
    pairs = PatchPairs.from_ids(clean.tolist(), corrupt.tolist(), answers=[[11]] * n, wrong=[[17]] * n,
                                name=f"random tokens ({seq_len})")
    return model, pairs, "logit_diff"


def build(name: str, cfg: dict, quick: bool):
    import attnscope
    from attnscope.circuits.patch_pairs import induction_pairs, recall_pairs
    from attnscope.tasks import build_suite

    n = min(cfg["n"], 4) if quick else cfg["n"]
    if cfg["kind"] == "gpt2":
        return gpt2_setup(min(n, 2), min(cfg["seq_len"], 16 if cfg["seq_len"] < 1024 else 32), quick) if quick \
            else gpt2_setup(n, cfg["seq_len"], quick)
    if cfg["kind"] == "minilm":
        model = attnscope.load("minilm")
        pairs, metric = minilm_setup(model, min(n, 2) if quick else n)
        return model, pairs, metric
    model = attnscope.load(f"zoo:{name}")
    if name == "agreement-enc":
        pairs, metric, _ = agreement_setup(model, n)
        return model, pairs, metric
    suite = build_suite("default", model, n_items=n)
    if name == "induction-2l":
        return model, induction_pairs(suite, seed=0), "logit"
    if name == "recall-llama":
        return model, recall_pairs(suite), "logit_diff"
    return model, fresh_token_pairs(suite, int(model.module.config.vocab_size)), "logit"


def agreement(exact, estimate, signed: bool) -> dict:
    import numpy as np
    from scipy.stats import spearmanr

    e, a = np.asarray(exact, float), np.asarray(estimate, float)
    out = {"spearman_abs": float(spearmanr(np.abs(e), np.abs(a)).statistic)}
    if signed:
        out["spearman_signed"] = float(spearmanr(e, a).statistic)
    big = set(np.flatnonzero(np.abs(e) > 0.1 * np.abs(e).max()))
    top = set(np.argsort(-np.abs(a), kind="stable")[:max(10, len(big))])
    out["large_heads_in_top10"] = len(big & top) / max(len(big), 1)
    out["n_large_heads"] = len(big)
    return out


def _timed_forward(module, batch, side: str, task, n: int, blocks, attentions) -> dict:
    """One forward of ``batch`` replicated ``n`` times; per-block and per-attention seconds and the tail after the
    last block (final norm, unembedding at the scored positions, the metric), the fastest of 3 runs each."""
    import torch

    from attnscope.circuits.patch_pairs import run_model

    best: dict = {}
    for _ in range(3):
        stamps: dict = {}
        hooks = []
        for kind, mods in (("block", blocks), ("attn", attentions)):
            for i, m in enumerate(mods):
                hooks.append(m.register_forward_pre_hook(lambda *a, _k=(kind, i): stamps.__setitem__(_k + ("in",),
                                                                                                   time.perf_counter())))
                hooks.append(m.register_forward_hook(lambda *a, _k=(kind, i): stamps.__setitem__(_k + ("out",),
                                                                                               time.perf_counter())))
        try:
            with torch.no_grad():
                start = time.perf_counter()
                run_model(module, batch.ids(side).repeat(n, 1), batch.attention_mask.repeat(n, 1),
                          batch.replicate(n), task)
                end = time.perf_counter()
        finally:
            for h in hooks:
                h.remove()
        got = {"all": end - start, "tail": end - stamps[("block", len(blocks) - 1, "out")] if blocks else 0.0}
        for kind, mods in (("block", blocks), ("attn", attentions)):
            got[kind] = [stamps[(kind, i, "out")] - stamps[(kind, i, "in")] for i in range(len(mods))]
        for key, value in got.items():
            best[key] = value if key not in best else (min(best[key], value) if not isinstance(value, list)
                                                       else [min(a, b) for a, b in zip(best[key], value)])
    return best


def prefix_bound(model, pairs, metric, batch_size: int = 16) -> float:
    """Seconds the exact sweep would take if each patched chunk paid only for what prefix sharing cannot skip:
    per batch, the base and source forwards, and per chunk of ``c`` units of layer ``l`` (the sweep's own chunk
    size) the rest of block ``l`` without its attention (replayed), blocks ``l+1..L-1`` and the tail, measured on a
    forward of the same replicated size and scaled by ``c``. A lower bound: it ignores the replay's own work."""
    from attnscope.circuits.head_ablation import layer_blocks
    from attnscope.circuits.patch_pairs import metric_from
    from attnscope.circuits.patching import _units_per_pass, sides
    from attnscope.probes.head_slices import output_projections

    module = getattr(model, "module", model)
    projections = output_projections(module)
    blocks = layer_blocks(module, projections)
    task = metric_from(metric)
    base_side, source_side = sides("noise")
    n_units = sum(p.n_heads for p in projections)
    bound = 0.0
    for batch in pairs.batches(batch_size):
        per = _units_per_pass(module, batch, None, n_units)
        one = {side: _timed_forward(module, batch, side, task, 1, blocks, [])["all"] for side in (base_side,
                                                                                              source_side)}
        t = _timed_forward(module, batch, base_side, task, per, blocks, [p.attention for p in projections])
        bound += sum(one.values())
        for layer, proj in enumerate(projections):
            suffix = t["block"][layer] - t["attn"][layer] + sum(t["block"][layer + 1:]) + t["tail"]
            for start in range(0, proj.n_heads, per):
                bound += suffix * min(per, proj.n_heads - start) / per
    return bound


def forward_seconds(model, pairs, metric, batch_size: int = 16) -> float:
    """One forward pass over every clean input (batches of ``batch_size``): the unit of "forward-pass equivalents"."""
    from attnscope.circuits.patch_pairs import metric_from

    module = getattr(model, "module", model)
    task = metric_from(metric)
    return sum(_timed_forward(module, batch, "clean", task, 1, [], [])["all"] for batch in pairs.batches(batch_size))


def run(name: str, cfg: dict, quick: bool) -> dict:
    from attnscope.circuits.gradient_patching import attribution_patching
    from attnscope.circuits.patch_pairs import PatchPairs
    from attnscope.circuits.patching import activation_patching
    from attnscope.probes.head_slices import output_projections
    from attnscope.probes.heads import HeadSet

    model, pairs, metric = build(name, cfg, quick)
    projections = output_projections(getattr(model, "module", model))
    seq = max(len(c) for c in pairs.clean)
    warm = PatchPairs(pairs.clean[:1], pairs.corrupt[:1], pairs.positions[:1], pairs.answers[:1],
                      pairs.wrong[:1] if pairs.wrong is not None else None, pairs.pad_id)
    activation_patching(model, warm, metric, heads=HeadSet([(0, 0)]))
    attribution_patching(model, warm, metric, method="atp*")
    start = time.perf_counter()
    exact = activation_patching(model, pairs, metric, batch_size=16)
    t_exact = time.perf_counter() - start
    bound = prefix_bound(model, pairs, metric, batch_size=16)
    forward = forward_seconds(model, pairs, metric, batch_size=16)
    result = {"config": name, "pairs": len(pairs), "tokens": seq, "layers": len(projections),
              "heads": sum(p.n_heads for p in projections), "metric": exact.provenance["metric"],
              "forward_s": forward, "exact_s": t_exact, "prefix_bound_s": bound, "exact_over_bound": t_exact / bound,
              "exact_forward_passes": exact.provenance["forward_passes"],
              "clean_metric": exact.provenance["clean_metric"], "corrupt_metric": exact.provenance["corrupt_metric"],
              "max_abs_exact": float(exact.df["effect"].abs().max())}
    for method in ("atp", "atp*"):
        start = time.perf_counter()
        est = attribution_patching(model, pairs, metric, method=method)
        result[f"{method}_s"] = time.perf_counter() - start
        result[f"{method}_forward_equivalents"] = result[f"{method}_s"] / forward
        result[f"exact_over_{method}"] = t_exact / result[f"{method}_s"]
        result[f"{method}_pairs_per_batch"] = est.provenance["pairs_per_batch"]
        for key, value in agreement(exact.df["effect"], est.df["value"], signed=method == "atp").items():
            result[f"{method}_{key}"] = value
    return result


def print_table(rows: list[dict]) -> None:
    print(f"\n{'config':15s} {'heads':>5s} {'pairs':>5s} {'tok':>5s} {'exact s':>8s} {'bound s':>8s} {'AtP s':>7s} "
          f"{'AtP* s':>7s} "
          f"{'rho AtP':>8s} {'rho AtP*':>8s} {'rho sgn':>8s} {'large':>5s} {'top10 AtP':>9s} {'top10 AtP*':>10s}")
    for r in rows:
        print(f"{r['config']:15s} {r['heads']:5d} {r['pairs']:5d} {r['tokens']:5d} {r['exact_s']:8.2f} "
              f"{r['prefix_bound_s']:8.2f} "
              f"{r['atp_s']:7.2f} {r['atp*_s']:7.2f} {r['atp_spearman_abs']:8.3f} {r['atp*_spearman_abs']:8.3f} "
              f"{r['atp_spearman_signed']:8.3f} {r['atp_n_large_heads']:5d} {r['atp_large_heads_in_top10']:9.2f} "
              f"{r['atp*_large_heads_in_top10']:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    parser.add_argument("--out", default="results/bench_patching.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: toy sizes")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        row = run(name, CONFIGS[name], args.quick)
        row["threads"] = args.threads
        print(f"{name}: exact {row['exact_s']:.2f} s, AtP {row['atp_s']:.2f} s, AtP* {row['atp*_s']:.2f} s", flush=True)
        rows.append(row)
        out.write_text(json.dumps(rows, indent=1))  # after every configuration: a long run keeps what it measured
    print_table(rows)


if __name__ == "__main__":
    main()
