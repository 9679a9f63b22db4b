"""Repeated random tokens for induction heads, with the period drawn at random per item.

Each sequence is ``[bos] + prefix + segment + segment + segment[:...]`` cut at ``seq_len``: a random prefix of
random length, then a random segment of random length ``period`` repeated to the end. A fixed period lets a model
solve the task with a positional shortcut, so the period varies per item (and the prefix shifts the repeats).

Ground truth in each item's metadata: ``repeat_span = [start, end)`` is the repeated region; for every position
``t`` in it, ``ids[t] == ids[t - period]``. An induction head at query ``t`` (in the span) attends to key
``t - period + 1``, the token after the earlier occurrence of ``ids[t]`` (with several repeats, to any of the
tokens after its earlier occurrences), and a model can predict ``ids[t]`` from position ``t - 1`` for every
``t`` in ``(start, end)``; the first repeated token is not predictable, its predecessor was never seen before.

Example:
    >>> from attnscope.datasets import induction
    >>> suite = induction(3, seq_len=24, vocab_size=64, seed=0)
    >>> item = suite[0]
    >>> p = item.metadata["period"]; start, end = item.metadata["repeat_span"]
    >>> all(item.ids[t] == item.ids[t - p] for t in range(start, end))
    True
"""

import numpy as np

from ..errors import InputError
from .suite import PromptItem, PromptSuite


def _check_induction(seq_len: int, vocab_size: int, lo: int, hi: int, first_token: int, bos: int | None) -> None:
    body = seq_len - (1 if bos is not None else 0)
    if not 1 <= lo <= hi:
        raise InputError("bad period range", expected="1 <= min_period <= max_period", got=(lo, hi))
    if 2 * hi > body:
        raise InputError("period too long for the sequence", expected=f"2 * max_period <= {body}", got=2 * hi,
                         fix="lower max_period or raise seq_len")
    if not 0 <= first_token < vocab_size:
        raise InputError("first_token outside the vocabulary", expected=f"0 <= first_token < {vocab_size}",
                         got=first_token)


def induction_ids(rng: np.random.Generator, seq_len: int, vocab_size: int, period: int, *, prefix_len: int = 0,
                  first_token: int = 0, bos_id: int | None = None, distinct: bool = True) -> list[int]:
    """One sequence: ``[bos] + prefix + segment`` repeated, length ``seq_len`` (tokens in ``[first_token, V)``)."""
    choices = np.arange(first_token, vocab_size)
    if bos_id is not None:
        choices = choices[choices != bos_id]
    fresh = prefix_len + period
    if distinct and fresh <= len(choices):
        body = rng.choice(choices, size=fresh, replace=False)
    else:
        body = rng.choice(choices, size=fresh, replace=True)
    prefix, segment = body[:prefix_len], body[prefix_len:]
    head = [] if bos_id is None else [int(bos_id)]
    remaining = seq_len - len(head) - prefix_len
    repeats = np.resize(segment, remaining)
    return head + [int(t) for t in prefix] + [int(t) for t in repeats]


def induction(n_items: int, seq_len: int = 64, vocab_size: int = 128, seed: int = 0, *,
              min_period: int | None = None, max_period: int | None = None, max_prefix: int | None = None,
              first_token: int = 0, bos_id: int | None = None, distinct: bool = True,
              name: str = "induction") -> PromptSuite:
    """Random-token sequences with a repeated segment whose period is drawn per item.

    Args:
        n_items: number of sequences.
        seq_len: tokens per sequence (all items have this length, BOS included).
        vocab_size: tokens are drawn from ``[first_token, vocab_size)`` (minus ``bos_id``).
        seed: seed of ``numpy.random.default_rng``.
        min_period, max_period: period range (default ``seq_len // 8`` .. ``seq_len // 2`` of the body).
        max_prefix: longest random unrepeated prefix before the segment (default ``body // 8``; never more than
            leaves one full repeat).
        first_token: lowest token id used (reserve ids below it for specials).
        bos_id: token prepended at position 0, if any.
        distinct: draw the prefix and segment without replacement (no ambiguous repeats) when the range allows.
    """
    body = seq_len - (1 if bos_id is not None else 0)
    lo = int(min_period) if min_period is not None else max(2, body // 8)
    hi = int(max_period) if max_period is not None else body // 2
    _check_induction(seq_len, vocab_size, lo, hi, first_token, bos_id)
    cap = body // 8 if max_prefix is None else int(max_prefix)
    rng = np.random.default_rng(seed)
    items = []
    offset = 1 if bos_id is not None else 0
    for _ in range(int(n_items)):
        period = int(rng.integers(lo, hi + 1))
        room = body - 2 * period
        prefix_len = int(rng.integers(0, min(room, cap) + 1))
        ids = induction_ids(rng, seq_len, vocab_size, period, prefix_len=prefix_len, first_token=first_token,
                            bos_id=bos_id, distinct=distinct)
        seg_start = offset + prefix_len
        items.append(PromptItem(ids=ids, metadata={
            "period": period, "prefix_len": prefix_len, "segment_span": [seg_start, seg_start + period],
            "repeat_span": [seg_start + period, seq_len]}))
    params = {"n_items": int(n_items), "seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "min_period": lo, "max_period": hi, "max_prefix": cap, "first_token": int(first_token),
              "bos_id": bos_id, "distinct": bool(distinct)}
    return PromptSuite(name, items, seed=seed, generator="induction", params=params,
                       metadata={"task": "next-token prediction on the repeated span"})
