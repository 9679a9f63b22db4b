"""Attention flow: attnscope's exact solver against networkx (preflow-push per pair, the reference library) and a
scipy dinic per-pair loop (``scipy.sparse.csgraph.maximum_flow`` on capacities scaled by 1e9 and floored: int32).

All three get the same residual-augmented, head-mean attention ``A_hat`` (built by attnscope) from peaked random
attention (``softmax(8 * N(0, 1))``, 4 heads); every layer's flow values are computed (``L * n**2`` pairs).

Timing: attnscope computes all pairs of all layers (for large ``n``, a random sample of sinks, i.e. input tokens,
for every source and layer, extrapolated linearly: a sink's values only depend on that sink). The baselines solve
sampled pairs, a few per layer, with networkx's and scipy's graphs of layers <= l built beforehand (not timed); the
per-pair time of unsampled layers is interpolated linearly in the layer, and the total is sum_l n**2 * t(l).
Max |diff| compares raw (unnormalised) values on the sampled pairs. Speed ratios use wall time; attnscope runs on
numba threads (all cores by default), the baselines on one. CPU seconds are reported too.

Usage: ``python benchmarks/flow.py [--quick] [--out results/bench_flow.json]``
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def peaked_attention(n_layers: int, n: int, heads: int = 4, temp: float = 8.0, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((n_layers, heads, n, n)) * temp
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def run_attnscope(attn: np.ndarray, sinks: np.ndarray | None) -> dict:
    """All layers' raw values for all (or the given) sinks, with wall/CPU time extrapolated to all sinks."""
    from attnscope.circuits._flow_layers import flow_values
    from attnscope.circuits.flow import attention_flow
    from attnscope.circuits.attention_rollout import augmented_layers

    n_layers, n = attn.shape[0], attn.shape[-1]
    wall, cpu = time.perf_counter(), time.process_time()
    stats: dict = {}
    if sinks is None:
        raw = attention_flow(attn, normalize=False, stats=stats)
        sinks = np.arange(n)
    else:  # the library's own pipeline restricted to some sinks
        a_hat = augmented_layers(attn)[0][:, 0]
        raw = flow_values(a_hat, n_layers, stats, sinks=sinks) / stats["quantum"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    scale = n / len(sinks)
    return {"raw": raw, "sinks": sinks, "wall_s": wall * scale, "cpu_s": cpu * scale, "extrapolated": scale > 1,
            "sinks_timed": int(len(sinks)), "settled": stats["settled"], "solved": stats["solved"]}


def layer_order(n_layers: int) -> list[int]:
    """Layers to sample, spread out first: L, 1, L/2, then the rest by bisection."""
    order = [n_layers, 1]
    for frac in (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875):
        order.append(max(1, round(frac * n_layers)))
    order += range(1, n_layers + 1)
    return list(dict.fromkeys(order))


def run_baseline(name: str, a_hat: np.ndarray, ours: dict, per_layer: int, budget_s: float, seed: int) -> dict:
    """Solve sampled pairs with networkx or scipy; estimate the all-pairs time; max |diff| against attnscope."""
    n_layers, n = a_hat.shape[0], a_hat.shape[-1]
    rng = np.random.default_rng(seed)
    per_pair, diff, pairs, spent = {}, 0.0, 0, 0.0
    for layer in layer_order(n_layers):
        if spent > budget_s and len(per_pair) >= 2:
            break
        solve = _networkx_solver(a_hat, layer) if name == "networkx" else _scipy_solver(a_hat, layer)
        times = []
        for _ in range(per_layer):
            i, col = int(rng.integers(n)), int(rng.integers(len(ours["sinks"])))
            start = time.perf_counter()
            value = solve(i, int(ours["sinks"][col]))
            times.append(time.perf_counter() - start)
            diff = max(diff, abs(value - float(ours["raw"][layer - 1, i, col])))
            pairs += 1
            if spent + sum(times) > budget_s and len(per_pair) >= 1:
                break
        per_pair[layer] = float(np.mean(times))
        spent += sum(times)
    known = sorted(per_pair)
    total = sum(n * n * float(np.interp(layer, known, [per_pair[k] for k in known]))
                for layer in range(1, n_layers + 1))
    return {"est_total_s": total, "pairs_solved": pairs, "layers_sampled": known, "max_abs_diff": diff,
            "per_pair_s": {str(k): v for k, v in per_pair.items()}}


def _networkx_solver(a_hat: np.ndarray, top: int):
    import networkx as nx
    from networkx.algorithms.flow import preflow_push

    graph = nx.DiGraph()
    for layer in range(1, top + 1):
        rows, cols = np.nonzero(a_hat[layer - 1])
        graph.add_edges_from(((layer, int(i)), (layer - 1, int(j)), {"capacity": float(a_hat[layer - 1, i, j])})
                             for i, j in zip(rows, cols))
    return lambda i, j: nx.maximum_flow_value(graph, (top, i), (0, j), flow_func=preflow_push)


def _scipy_solver(a_hat: np.ndarray, top: int, scale: float = 1e9):
    import scipy.sparse as sp
    from scipy.sparse.csgraph import maximum_flow

    n = a_hat.shape[-1]
    rows, cols, caps = [], [], []
    for layer in range(1, top + 1):
        u, v = np.nonzero(a_hat[layer - 1])
        rows.append(layer * n + u)
        cols.append((layer - 1) * n + v)
        caps.append(np.floor(a_hat[layer - 1, u, v] * scale).astype(np.int32))
    size = (top + 1) * n
    graph = sp.csr_matrix((np.concatenate(caps), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))
    return lambda i, j: maximum_flow(graph, top * n + i, j, method="dinic").flow_value / scale


def bench_one(n_layers: int, n: int, args: argparse.Namespace) -> dict:
    from attnscope.circuits.attention_rollout import augmented_layers

    attn = peaked_attention(n_layers, n, temp=args.temp, seed=args.seed)
    a_hat = augmented_layers(attn)[0][:, 0]
    sinks = None
    if n > args.full_up_to:
        sinks = np.sort(np.random.default_rng(args.seed).choice(n, args.sample_sinks, replace=False))
    ours = run_attnscope(attn, sinks)
    row = {"layers": n_layers, "tokens": n, "pairs": n_layers * n * n,
           "attnscope": {k: v for k, v in ours.items() if k not in ("raw", "sinks")}}
    row["networkx"] = run_baseline("networkx", a_hat, ours, args.nx_pairs, args.nx_budget, args.seed)
    row["scipy_dinic"] = run_baseline("scipy", a_hat, ours, args.scipy_pairs, args.scipy_budget, args.seed)
    for name in ("networkx", "scipy_dinic"):
        row[name]["speedup_wall"] = row[name]["est_total_s"] / ours["wall_s"]
        row[name]["speedup_cpu"] = row[name]["est_total_s"] / ours["cpu_s"]
    return row


def print_row(row: dict) -> None:
    ours, nx_, sc = row["attnscope"], row["networkx"], row["scipy_dinic"]
    mark = "*" if ours["extrapolated"] else " "
    print(f"{row['layers']:>3} {row['tokens']:>4} {row['pairs']:>8}  {ours['wall_s']:9.2f}{mark} {ours['cpu_s']:9.2f}"
          f" {100 * ours['settled'] / (ours['settled'] + ours['solved']):6.1f}%  {nx_['est_total_s']:11.1f}"
          f" {nx_['speedup_wall']:9.0f}x {nx_['max_abs_diff']:9.1e}  {sc['est_total_s']:9.1f}"
          f" {sc['speedup_wall']:7.1f}x {sc['max_abs_diff']:9.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run (L=3,6; n=16,32; sinks of n=32 sampled and extrapolated)")
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 12])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--temp", type=float, default=8.0, help="logit scale of the peaked attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-up-to", type=int, default=128, help="attnscope times every sink up to this n")
    parser.add_argument("--sample-sinks", type=int, default=8, help="sinks timed (then extrapolated) beyond that")
    parser.add_argument("--nx-pairs", type=int, default=2, help="networkx pairs per sampled layer")
    parser.add_argument("--nx-budget", type=float, default=20.0, help="networkx seconds per configuration")
    parser.add_argument("--scipy-pairs", type=int, default=5, help="scipy pairs per sampled layer")
    parser.add_argument("--scipy-budget", type=float, default=10.0, help="scipy seconds per configuration")
    parser.add_argument("--out", default="results/bench_flow.json")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.tokens, args.nx_budget, args.scipy_budget = [3, 6], [16, 32], 3.0, 2.0
        args.full_up_to = 16  # n=32: the sampled-sinks path (timed on --sample-sinks sinks, extrapolated)
    import numba

    from attnscope.circuits.flow import attention_flow

    attention_flow(peaked_attention(3, 8))  # compile (or load) the solver first
    print(f"attnscope flow benchmark: numba threads {numba.get_num_threads()}, cpus {os.cpu_count()}, peaked "
          f"attention temp {args.temp}; * = timed on {args.sample_sinks} sinks and extrapolated; baselines are "
          "sampled pairs extrapolated to all pairs")
    print("  L    n    pairs   ours_wall  ours_cpu settled   networkx_s   vs_nx   |d|_nx    scipy_s vs_scipy |d|_scipy")
    rows = []
    for n_layers in args.layers:
        for n in args.tokens:
            rows.append(bench_one(n_layers, n, args))
            print_row(rows[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"numba_threads": numba.get_num_threads(), "cpus": os.cpu_count(), "temp": args.temp, "seed": args.seed,
            "timing": "attnscope: all pairs (or sampled sinks, extrapolated); baselines: sampled pairs, per-layer "
                      "mean time interpolated over layers, times n**2 per layer; graph construction not timed"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    if args.quick:  # values, not times: networkx agrees to rounding, scipy to its 1e-9 capacity quantum
        worst = {name: max(r[name]["max_abs_diff"] for r in rows) for name in ("networkx", "scipy_dinic")}
        if not (worst["networkx"] <= 1e-9 and worst["scipy_dinic"] <= 1e-5):
            raise SystemExit(f"quick run: flow values disagree with the baselines: {worst}")


if __name__ == "__main__":
    main()
