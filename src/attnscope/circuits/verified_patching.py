"""Verified top-k: estimate every head with attribution patching, re-check the top ``k`` and a random control set by
exact activation patching, and bound the false negatives among the heads left unverified.

Rows: one estimate row per head (``method`` = the estimator, ``is_estimate=True``) and one exact row per verified
head (``method="exact"``, ``is_estimate=False``), with ``role`` = ``top`` / ``control`` / ``unverified``,
``rank`` (by ``|estimate|``), and on estimate rows ``exact`` (NaN where unverified). One summary row
(``layer = head = -1``, ``metric="false_negative_rate_upper"``) holds the bound.

The bound. Kramar et al. (2024, Sec. 3.3 as we read it) bound the remaining false negatives of AtP* from exact
verification of nodes sampled at random among the unverified ones. We compute that idea as a distribution-free
statement: the controls are a uniform random sample (without replacement) of the unverified heads; with ``x`` of
``m`` controls having ``|exact| > threshold`` (default: 10% of the largest verified ``|exact|``), the one-sided
Clopper-Pearson upper bound at ``confidence`` on the *fraction* of unverified heads above the threshold is
``beta.ppf(confidence, x + 1, m - x)`` (1 when ``x = m``); times the number of unverified heads it bounds their
count. It is a statement about the fraction, not about any single head, and it is conservative (sampling without
replacement only tightens it). Also reported (heuristic, not a bound): the largest unverified estimate and the
largest ``|exact| / |estimate|`` among verified heads.

Example:
    >>> import transformers
    >>> from attnscope.circuits.patch_pairs import PatchPairs
    >>> from attnscope.circuits.verified_patching import verified_top_k
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=16, n_positions=8)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> pairs = PatchPairs.from_ids([[1, 2, 3, 4]], [[1, 5, 3, 4]], answers=[[6]], wrong=[[7]])
    >>> t = verified_top_k(model, pairs, k=2, n_random=3)
    >>> sorted(t.df[t.df["head"] >= 0].groupby("method").size().to_dict().items())
    [('atp*', 8), ('exact', 5)]
"""

import math
from typing import Any

import numpy as np

from ..errors import InputError
from ..probes.adapter import ModelLike, module_of, tokenizer_of
from ..probes.head_slices import output_projections
from ..probes.heads import HeadSet
from ..results import ResultTable
from .gradient_patching import attribution_patching
from .patch_pairs import PatchPairs, induction_pairs, recall_pairs
from .patching import activation_patching
from .registry import register_analysis


def clopper_pearson_upper(x: int, m: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound on a binomial proportion with ``x`` successes in ``m`` trials."""
    from scipy.stats import beta

    if m <= 0:
        return 1.0
    return 1.0 if x >= m else float(beta.ppf(confidence, x + 1, m - x))


def verified_top_k(model: ModelLike, pairs: PatchPairs, metric: Any = "logit_diff", *, k: int = 20, n_random: int = 10,
                   method: str = "atp*", direction: str = "noise", threshold: float | None = None,
                   confidence: float = 0.95, seed: int = 0, batch_size: int = 16, memory_mb: float | None = None,
                   progress: bool = False) -> ResultTable:
    """AtP* (or ``method``) for every head, exact patching of the top ``k`` by ``|estimate|`` and of ``n_random``
    random other heads, and the false-negative bound (module docstring)."""
    if k < 0 or n_random < 0:
        raise InputError("k and n_random must be >= 0", expected=">= 0", got=(k, n_random))
    estimate = attribution_patching(model, pairs, metric, method=method, direction=direction, memory_mb=memory_mb)
    df = estimate.df.assign(abs_estimate=estimate.df["value"].abs())
    df = df.sort_values("abs_estimate", ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    heads = [(int(r.layer), int(r.head)) for r in df.itertuples()]
    top = heads[:k]
    rest = heads[k:]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(rest), size=min(n_random, len(rest)), replace=False) if rest else []
    controls = [rest[int(i)] for i in sorted(picks)]
    verified = top + controls
    exact_rows: dict[tuple[int, int], dict] = {}
    exact_prov: dict = {}
    if verified:
        exact = activation_patching(model, pairs, metric, direction=direction, heads=HeadSet(verified),
                                    batch_size=batch_size, memory_mb=memory_mb, progress=progress)
        exact_rows = {(int(r["layer"]), int(r["head"])): r for r in exact.df.to_dict("records")}
        exact_prov = exact.provenance
    role = {h: "top" for h in top} | {h: "control" for h in controls}
    largest = max((abs(r["effect"]) for r in exact_rows.values()), default=0.0)
    theta = float(threshold) if threshold is not None else 0.1 * largest
    over = sum(abs(exact_rows[h]["effect"]) > theta for h in controls)
    unverified = len(heads) - len(verified)
    upper = clopper_pearson_upper(over, len(controls), confidence) if unverified else 0.0
    records = []
    for row in df.to_dict("records"):
        h = (int(row["layer"]), int(row["head"]))
        ex = exact_rows.get(h)
        row.update({"analysis": "verified_patching", "role": role.get(h, "unverified"), "verified": ex is not None,
                    "exact": ex["effect"] if ex is not None else math.nan})
        records.append(row)
        if ex is not None:
            records.append({**ex, "analysis": "verified_patching", "role": role[h], "verified": True,
                            "rank": row["rank"], "estimate": row["value"], "exact": ex["effect"],
                            "value": ex["effect"]})
    ratios = [abs(r["exact"]) / abs(r["value"]) for r in records if r["method"] != "exact" and r["verified"]
              and abs(r["value"]) > 0]
    unverified_max = max((abs(r["value"]) for r in records if r["role"] == "unverified"), default=0.0)
    records.append({"analysis": "verified_patching", "layer": -1, "head": -1, "metric": "false_negative_rate_upper",
                    "value": upper, "method": "clopper_pearson_controls", "is_estimate": True, "role": "bound",
                    "threshold": theta, "controls_over_threshold": int(over), "n_controls": len(controls),
                    "n_unverified": unverified, "max_unverified_heads_over_threshold": upper * unverified})
    provenance = {**{f"estimate_{k_}": v for k_, v in estimate.provenance.items()},
                  **{f"exact_{k_}": v for k_, v in exact_prov.items()},
                  "analysis": "verified_patching", "method": method, "direction": direction, "k": k,
                  "n_random": len(controls), "seed": seed, "threshold": theta, "confidence": confidence,
                  "false_negative_rate_upper": upper, "false_negative_bound": "Clopper-Pearson upper bound on the "
                  "fraction of unverified heads with |exact| > threshold, from the random controls",
                  "max_unverified_estimate": unverified_max, "max_exact_over_estimate": max(ratios, default=None),
                  "model": estimate.provenance.get("model"), "suite": pairs.name,
                  "metric": estimate.provenance["metric"]}
    return ResultTable.from_records(records, provenance=provenance)


def pairs_for(model: ModelLike, suite: Any) -> PatchPairs:
    """Clean/corrupted pairs of a suite: its own corrupted twins, fresh-token corruptions (induction) or rotated
    values (associative recall)."""
    if all(it.corrupt_ids is not None or it.corrupt_text is not None for it in suite):
        return PatchPairs.from_suite(suite, tokenizer_of(model))
    if getattr(suite, "generator", None) == "induction":
        vocab = getattr(getattr(module_of(model), "config", None), "vocab_size", None)
        return induction_pairs(suite, vocab_size=suite.params.get("vocab_size") or vocab, seed=int(suite.seed or 0))
    if getattr(suite, "generator", None) == "associative_recall":
        return recall_pairs(suite)
    raise InputError("the suite has no clean/corrupted pairs", expected="ioi, induction, recall, or items with "
                     "corrupt_ids",
                     got=getattr(suite, "name", suite), fix="use --suite ioi / induction or --pairs FILE.json")


@register_analysis("patching", takes="model",
                   description="activation patching (exact), AtP or AtP* of every head between clean/corrupted pairs")
def patching_analysis(model: ModelLike, suite: Any, *, method: str = "exact", direction: str = "noise",
                      metric: Any = None, granularity: str = "head", normalize: bool = False, verify_top: int = 0,
                      n_random: int = 10, batch_size: int = 16, seed: int = 0, heads: Any = None,
                      progress: bool = False, pairs: PatchPairs | None = None, **_: Any) -> ResultTable:
    """Analysis entry point: ``model`` a model handle (``attnscope.load``), ``suite`` a PromptSuite (or ``pairs``). ``metric`` defaults
    to ``logit_diff`` when every pair has a wrong token, else ``logit``; ``verify_top > 0`` runs
    ``verified_top_k`` with ``method`` as the estimator."""
    pairs = pairs if pairs is not None else pairs_for(model, suite)
    metric = metric or ("logit_diff" if pairs.wrong is not None else "logit")
    if isinstance(heads, str):
        projections = output_projections(module_of(model))
        limit = max(p.n_kv_heads if granularity == "kv_head" else p.n_heads for p in projections)
        heads = HeadSet.parse(heads, n_layers=len(projections), n_heads=limit)
    if verify_top:
        if method == "exact":
            raise InputError("verification needs an estimator", expected="--method atp or atp*", got=method)
        table = verified_top_k(model, pairs, metric, k=verify_top, n_random=n_random, method=method,
                               direction=direction, seed=seed, batch_size=batch_size, progress=progress)
    elif method == "exact":
        table = activation_patching(model, pairs, metric, direction=direction, granularity=granularity, heads=heads,
                                    normalize=normalize, batch_size=batch_size, progress=progress)
    else:
        table = attribution_patching(model, pairs, metric, method=method, direction=direction,
                                     granularity=granularity, heads=heads)
    table.provenance.setdefault("suite", getattr(suite, "name", pairs.name))
    table.provenance["main_metric"] = table.provenance.get("metric")
    return table


__all__ = ["clopper_pearson_upper", "pairs_for", "patching_analysis", "verified_top_k"]
