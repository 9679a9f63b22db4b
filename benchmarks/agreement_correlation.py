"""Abnar & Zuidema's check on the `agreement-enc` organism: Spearman correlation of raw attention, rollout and flow
(the [CLS] row at each layer) with blank-out importance (drop in the predicted class probability when a token is
replaced by padding), averaged over held-out items. Usage: ``python benchmarks/agreement_correlation.py [--n 100]``.
"""

import argparse
import json

import numpy as np
import torch
from scipy.stats import spearmanr

import attnscope
from attnscope import zoo
from attnscope.circuits.flow import attention_flow
from attnscope.circuits.rollout import rollout
from attnscope.datasets import agreement


def blank_out(model, ids: torch.Tensor, pad_id: int) -> np.ndarray:
    """Importance of each non-[CLS] token: predicted-class probability drop when it is replaced by padding."""
    with torch.no_grad():
        probs = model(input_ids=ids[None]).logits.softmax(-1)[0]
        label = int(probs.argmax())
        variants = ids.repeat(len(ids) - 1, 1)
        variants[torch.arange(len(ids) - 1), torch.arange(1, len(ids))] = pad_id
        blanked = model(input_ids=variants).logits.softmax(-1)[:, label]
    return (probs[label] - blanked).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--out", default="results/bench_agreement_correlation.json")
    args = parser.parse_args()
    model = attnscope.load("zoo:agreement-enc")
    params = dict(zoo.load_card("agreement-enc")["data"]["params"], n_items=args.n)
    suite = agreement(seed=args.seed, **params)
    scores: dict[str, list[list[float]]] = {"raw": [], "rollout": [], "flow": []}
    for item in suite.items:
        ids = torch.tensor(item.ids)
        attn = attnscope.capture(model, ids[None]).stack()[:, 0]  # [layer, head, query, key]
        target = blank_out(model.module, ids, params["pad_id"])
        views = {"raw": attn.mean(1), "rollout": rollout(attn), "flow": attention_flow(attn)}
        for name, joint in views.items():
            row = np.asarray(joint)[:, 0, 1:]  # [CLS] row, non-[CLS] keys
            scores[name].append([spearmanr(row[l], target).correlation for l in range(row.shape[0])])
    table = {name: np.nanmean(np.array(v), axis=0).round(3).tolist() for name, v in scores.items()}
    print(f"Spearman correlation with blank-out importance, mean over {args.n} items, per layer (L1..L{len(table['raw'])}):")
    for name, values in table.items():
        print(f"  {name:8s} " + "  ".join(f"{v:+.3f}" for v in values))
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
