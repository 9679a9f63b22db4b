"""Sweep throughput: cells per minute with 1 and 2 Ray workers, and Ray's overhead per cell against the same cells
run in a plain loop in one process.

Cells: a 4-layer Llama-class model (GQA) x interventions, each running ``head-stats`` over an induction suite
(about 1-3 s per cell on one core). Each worker gets one CPU (Ray sets ``OMP_NUM_THREADS=1``); the plain loop uses
one torch thread too. For each worker count:

- ``ray.init`` time (a local instance) is measured on its own;
- ``cold``: the first sweep on that instance (includes starting the worker processes, importing torch in them and
  loading the model once per worker);
- ``warm``: the same cells again into a fresh folder on the same instance (workers and model cache warm);
- overhead per cell = (Ray wall / cells) - (loop wall / cells) for 1 worker, where the loop reuses the model too;
- the last column, wall x workers / cells - mean in-cell time, is the time a worker slot spends per cell outside
  the cell (scheduling, serialisation, result transfer, the atomic write, idle): the same period's numbers, so
  less sensitive to other jobs than the loop comparison.

The load average is printed: on a shared machine, numbers move with other people's jobs.
Usage: ``python benchmarks/sweep.py [--cells 8] [--out results/bench_sweep.json]``.
``--quick`` (CI smoke run): 2 cells of 4 items x 32 tokens, every phase (loop, 1 and 2 Ray workers, cold and warm).
"""

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path


def build_models(root: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(root / "llama")
    return root / "llama"


def make_spec(model_dir: Path, n_cells: int, n_items: int, seq_len: int):
    from attnscope.sweeps import parse_spec

    interventions = ["none"] + [{"heads": f"L{i % 4}H{i % 8}", "mode": "zero"} for i in range(n_cells - 1)]
    return parse_spec({"name": "bench", "resources": {"num_cpus": 1}, "models": [str(model_dir)],
                       "suites": [{"generator": "induction", "n_items": n_items, "seq_len": seq_len,
                                   "vocab_size": 512}],
                       "analyses": [{"name": "head-stats", "options": {"batch_size": 8}}],
                       "interventions": interventions})


def plain_loop(spec) -> dict:
    import torch

    from attnscope.sweeps.cells import run_cell
    from attnscope.tasks import clear_model_cache

    torch.set_num_threads(1)
    clear_model_cache()
    start = time.perf_counter()
    seconds = [run_cell(cell.to_dict(), spec.imports)["seconds"] for cell in spec.cells()]
    wall = time.perf_counter() - start
    return {"wall_s": wall, "cell_s": seconds}


def on_ray(spec, workers: int, tmp: Path) -> dict:
    import ray

    from attnscope.sweeps import run_sweep

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    init = time.perf_counter() - start
    try:
        runs = {}
        for phase in ("cold", "warm"):
            start = time.perf_counter()
            report = run_sweep(spec, tmp / f"w{workers}-{phase}", progress=False)
            wall = time.perf_counter() - start
            assert report.ok, report.failed
            runs[phase] = {"wall_s": wall, "cell_s": list(report.cell_seconds.values())}
    finally:
        ray.shutdown()
    return {"init_s": init, **runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--out", default="results/bench_sweep.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 cells of 4 items x 32 tokens")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.items, args.seq_len = 2, 4, 32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        spec = make_spec(build_models(tmp), args.cells, args.items, args.seq_len)
        load_before = os.getloadavg()
        loop = plain_loop(spec)
        ray1 = on_ray(spec, 1, tmp)
        ray2 = on_ray(spec, 2, tmp)
        load_after = os.getloadavg()
    n = len(spec.cells())
    per_min = lambda wall: 60.0 * n / wall  # noqa: E731
    rows = [("plain loop (1 process)", "-", loop["wall_s"], per_min(loop["wall_s"]),
             sum(loop["cell_s"]) / n)]
    for workers, run in ((1, ray1), (2, ray2)):
        for phase in ("cold", "warm"):
            r = run[phase]
            rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''}, {phase}", f"{run['init_s']:.1f}",
                         r["wall_s"], per_min(r["wall_s"]), sum(r["cell_s"]) / n))
    overhead = {phase: (ray1[phase]["wall_s"] - loop["wall_s"]) / n for phase in ("cold", "warm")}
    print(f"{n} cells, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          f"({os.cpu_count()} cores)")
    print("| run | ray.init s | wall s | cells/min | mean in-cell s | wall x workers / cells - in-cell s |\n"
          "|---|---|---|---|---|---|")
    for (name, init, wall, rate, cell), workers in zip(rows, (1, 1, 1, 2, 2)):
        print(f"| {name} | {init} | {wall:.1f} | {rate:.1f} | {cell:.2f} | {wall * workers / n - cell:+.2f} |")
    print(f"Ray overhead per cell (1 worker vs loop): cold {overhead['cold']:+.2f} s, warm {overhead['warm']:+.2f} s "
          f"(ray.init once: {ray1['init_s']:.1f} s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cells": n, "loop": loop, "ray1": ray1, "ray2": ray2,
                                          "overhead_per_cell_s": overhead, "loadavg": [load_before, load_after]},
                                         indent=1))


if __name__ == "__main__":
    main()
