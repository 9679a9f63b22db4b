"""Abnar & Zuidema's check (issue #4) on the `agreement-enc` organism: per held-out item, the Spearman correlation
between the [CLS] attribution row at each layer (raw = that layer's head-mean attention, rollout, flow) and
blank-out importance over the non-[CLS] input tokens, then the mean over items with its standard error, a
bootstrap 95% interval, and the paired difference rollout/flow - raw.

Blank-out importance of token ``j`` = p(correct class | item) - p(correct class | token ``j`` blanked), as in the
paper (PAPERS.md 2.1: "replace token by UNK"). ``--blank pad`` (default) puts the padding id in place of the token
and still attends to it (the vocabulary has no UNK; padding is the token the model never learned to use, as UNK
for a rare word); ``--blank mask`` removes the token with the attention mask instead. ``--target predicted`` uses
the predicted class instead of the label. Raw attention of layer ``l`` is row 0 of ``mean_h A[l, h]``; rollout
and flow use ``A_hat = rownorm(w * I + (1 - w) * mean_h A)`` with ``w = --residual-weight`` (0.5: the paper).

Usage: ``python benchmarks/agreement_correlation.py [--n 200] [--blank pad|mask] [--residual-weight 0.5]``.
``--quick`` (CI smoke run): 4 items, and 4 more with the other ``--blank`` and ``--target`` (under ``"quick_variant"``
in the output).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import attnscope
from attnscope import zoo
from attnscope.circuits.flow import attention_flow
from attnscope.circuits.attention_rollout import rollout
from attnscope.datasets import agreement

VIEWS = ("raw", "rollout", "flow")


@torch.no_grad()
def blank_out(model, ids: torch.Tensor, label: int, *, blank: str = "pad", pad_id: int = 0) -> np.ndarray:
    """Drop in p(``label``) when each non-[CLS] token is blanked (``pad``: replaced by ``pad_id``; ``mask``:
    removed with the attention mask), ``[n_tokens - 1]``."""
    n = len(ids)
    clean = model(input_ids=ids[None]).logits.softmax(-1)[0, label]
    rows, cols = torch.arange(n - 1), torch.arange(1, n)
    variants, mask = ids.repeat(n - 1, 1), torch.ones(n - 1, n, dtype=torch.long)
    if blank == "pad":
        variants[rows, cols] = pad_id
    else:
        mask[rows, cols] = 0
    blanked = model(input_ids=variants, attention_mask=mask).logits.softmax(-1)[:, label]
    return (clean - blanked).numpy()


def item_correlations(model, ids: torch.Tensor, target: np.ndarray, residual_weight: float) -> dict[str, list]:
    """Per view, the Spearman correlation of the [CLS] row (non-[CLS] keys) of every layer with ``target``."""
    attn = attnscope.capture(model, ids[None]).stack()[:, 0]  # [layer, head, query, key]
    joint = {"raw": attn.mean(1), "rollout": rollout(attn, residual_weight=residual_weight),
             "flow": attention_flow(attn, residual_weight=residual_weight, threads=1)}
    out = {}
    for name, values in joint.items():
        row = np.asarray(values)[:, 0, 1:]
        out[name] = [float(spearmanr(r, target).statistic) if np.ptp(r) > 0 else float("nan") for r in row]
    return out


def summarize(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, list]:
    """``values`` ``[item, layer]`` -> per layer mean, standard error, bootstrap 95% interval, NaN count (a constant
    attribution row has no rank correlation; such items are left out of that layer's mean)."""
    rng = np.random.default_rng(seed)
    mean, se, lo, hi = [], [], [], []
    for column in values.T:
        x = column[~np.isnan(column)]
        boot = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(1) if len(x) else np.full(1, np.nan)
        mean.append(float(x.mean()) if len(x) else float("nan"))
        se.append(float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan"))
        lo.append(float(np.quantile(boot, 0.025)))
        hi.append(float(np.quantile(boot, 0.975)))
    return {"mean": mean, "se": se, "ci95": [lo, hi], "nan": np.isnan(values).sum(0).tolist()}


def run(n: int, seed: int, blank: str, target: str, residual_weight: float,
        source: str = "zoo:agreement-enc") -> dict:
    model = attnscope.load(source)
    params = dict(zoo.load_card("agreement-enc")["data"]["params"], n_items=n)
    suite = agreement(seed=seed, **params)
    scores: dict[str, list] = {name: [] for name in VIEWS}
    for item in suite.items:
        ids = torch.tensor(item.ids)
        label = item.label
        if target == "predicted":
            with torch.no_grad():
                label = int(model.module(input_ids=ids[None]).logits.argmax(-1))
        importance = blank_out(model.module, ids, label, blank=blank, pad_id=params["pad_id"])
        for name, values in item_correlations(model, ids, importance, residual_weight).items():
            scores[name].append(values)
    arrays = {name: np.array(v, dtype=float) for name, v in scores.items()}
    table = {name: summarize(a) for name, a in arrays.items()}
    for name in ("rollout", "flow"):  # paired over items; NaN raw (constant row) counts as no correlation
        table[f"{name} - raw"] = summarize(arrays[name] - np.nan_to_num(arrays["raw"]))
    settings = {"model": source, "n": n, "seed": seed, "blank": blank, "target": target,
                "residual_weight": residual_weight, "head_fusion": "mean",
                "readout": "[CLS] row, non-[CLS] keys", "statistic": "Spearman per item"}
    return {"settings": settings, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--blank", choices=("pad", "mask"), default="pad")
    parser.add_argument("--target", choices=("label", "predicted"), default="label")
    parser.add_argument("--residual-weight", type=float, default=0.5)
    parser.add_argument("--model", default="zoo:agreement-enc", help="a checkpoint folder (data as in the zoo card)")
    parser.add_argument("--out", default="results/bench_agreement_correlation.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 items, plus 4 with the other options")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.n = 4
    result = run(args.n, args.seed, args.blank, args.target, args.residual_weight, args.model)
    if args.quick:  # the other branch of each option
        other = {"pad": "mask", "mask": "pad"}[args.blank], {"label": "predicted", "predicted": "label"}[args.target]
        result["quick_variant"] = run(args.n, args.seed, *other, args.residual_weight, args.model)
    table = result["table"]
    n_layers = len(table["raw"]["mean"])
    print(f"Spearman with blank-out importance, {result['settings']}")
    print(" " * 17 + "  ".join(f"{f'L{l + 1}':>12s}" for l in range(n_layers)))
    for name, row in table.items():
        print(f"  {name:15s}" + "  ".join(f"{m:+.3f}±{s:.3f}" for m, s in zip(row["mean"], row["se"])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
