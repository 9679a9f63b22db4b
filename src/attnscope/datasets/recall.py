"""Multi-query associative recall (MQAR, as in Zoology): key-value pairs, then queried keys.

Layout: ``[bos] k1 v1 k2 v2 ... kn vn [sep] q1 a1 q2 a2 ... qm`` where each ``q`` is one of the keys and ``a`` its
value. Earlier answers are given (teacher forcing), the prompt ends with the last query key and
``answer_ids == [a_m]``. Keys come from ``key_range`` and values from ``value_range`` (disjoint by default); keys are
distinct, and values too when ``distinct_values``.

Ground truth per query (``metadata["queries"]``): the position of the query key in the prompt (where the value
should be predicted), the answer, and ``value_position``: where that value sits among the pairs. A retrieval head
puts its top-1 attention from the query position on ``value_position``.

Example:
    >>> from attnscope.datasets import associative_recall
    >>> item = associative_recall(1, n_pairs=4, vocab_size=64, seed=0)[0]
    >>> q = item.metadata["queries"][-1]
    >>> item.ids[q["position"]] == q["key"] and item.ids[q["value_position"]] == item.answer_ids[0] == q["answer"]
    True
"""

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .suite import PromptItem, PromptSuite


def _recall_ranges(vocab_size: int, first_token: int, key_range: Sequence[int] | None,
                   value_range: Sequence[int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    mid = first_token + (vocab_size - first_token) // 2
    keys = tuple(int(v) for v in key_range) if key_range is not None else (first_token, mid)
    vals = tuple(int(v) for v in value_range) if value_range is not None else (mid, vocab_size)
    for label, (lo, hi) in (("key_range", keys), ("value_range", vals)):
        if not 0 <= lo < hi <= vocab_size:
            raise InputError(f"bad {label}", expected=f"0 <= lo < hi <= {vocab_size}", got=(lo, hi))
    return keys, vals  # type: ignore[return-value]


def recall_item(rng: np.random.Generator, n_pairs: int, n_queries: int, keys_rng: tuple[int, int],
                vals_rng: tuple[int, int], *, bos_id: int | None = None, sep_id: int | None = None,
                distinct_values: bool = True) -> PromptItem:
    """One MQAR item with ``n_pairs`` pairs and ``n_queries`` distinct queried keys."""
    keys = rng.choice(np.arange(*keys_rng), size=n_pairs, replace=False)
    replace = not (distinct_values and n_pairs <= vals_rng[1] - vals_rng[0])
    values = rng.choice(np.arange(*vals_rng), size=n_pairs, replace=replace)
    ids = [] if bos_id is None else [int(bos_id)]
    kv_start = len(ids)
    for k, v in zip(keys, values):
        ids += [int(k), int(v)]
    kv_end = len(ids)
    if sep_id is not None:
        ids.append(int(sep_id))
    order = rng.choice(n_pairs, size=n_queries, replace=False)
    queries = []
    for j, pair in enumerate(order):
        queries.append({"position": len(ids), "key": int(keys[pair]), "answer": int(values[pair]),
                        "key_position": kv_start + 2 * int(pair), "value_position": kv_start + 2 * int(pair) + 1})
        ids.append(int(keys[pair]))
        if j < n_queries - 1:
            ids.append(int(values[pair]))
    return PromptItem(ids=ids, answer_ids=[int(values[order[-1]])], metadata={
        "pairs": [[int(k), int(v)] for k, v in zip(keys, values)], "kv_span": [kv_start, kv_end],
        "queries": queries, "n_pairs": int(n_pairs)})


def associative_recall(n_items: int, n_pairs: int = 8, vocab_size: int = 128, seed: int = 0, *,
                       n_queries: int | None = None, min_pairs: int | None = None, first_token: int = 0,
                       key_range: Sequence[int] | None = None, value_range: Sequence[int] | None = None,
                       bos_id: int | None = None, sep_id: int | None = None, distinct_values: bool = True,
                       name: str = "associative_recall") -> PromptSuite:
    """MQAR items; with ``min_pairs`` the number of pairs is drawn per item in ``[min_pairs, n_pairs]``.

    ``n_queries`` (default: every key) keys are queried in random order; they are capped at the item's pairs.
    """
    keys_rng, vals_rng = _recall_ranges(vocab_size, first_token, key_range, value_range)
    lo = int(min_pairs) if min_pairs is not None else int(n_pairs)
    if not 1 <= lo <= n_pairs <= keys_rng[1] - keys_rng[0]:
        raise InputError("bad number of pairs", expected=f"1 <= min_pairs <= n_pairs <= {keys_rng[1] - keys_rng[0]}",
                         got=(lo, n_pairs), fix="widen key_range or use fewer pairs")
    if n_queries is not None and int(n_queries) < 1:
        raise InputError("bad number of queries", expected=">= 1", got=n_queries)
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(int(n_items)):
        n = int(rng.integers(lo, int(n_pairs) + 1))
        m = n if n_queries is None else min(int(n_queries), n)
        items.append(recall_item(rng, n, m, keys_rng, vals_rng, bos_id=bos_id, sep_id=sep_id,
                                 distinct_values=distinct_values))
    params = {"n_items": int(n_items), "n_pairs": int(n_pairs), "vocab_size": int(vocab_size),
              "n_queries": n_queries, "min_pairs": lo, "first_token": int(first_token), "key_range": list(keys_rng),
              "value_range": list(vals_rng), "bos_id": bos_id, "sep_id": sep_id,
              "distinct_values": bool(distinct_values)}
    return PromptSuite(name, items, seed=seed, generator="associative_recall", params=params,
                       metadata={"task": "predict the value of each queried key"})
