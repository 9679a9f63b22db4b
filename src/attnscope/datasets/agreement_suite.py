"""A synthetic classification task whose label is set by one marked earlier token, for attribution checks.

Sequence: ``[CLS] x_1 ... x_n`` of random filler tokens; exactly one position holds ``marker_id`` and the next one
a class token; ``label`` = that class token's class. Class tokens also appear elsewhere as distractors (never
after a marker), so the model must find the marker. The true evidence sits at ``marker_position`` and
``class_position`` (metadata); rollout, flow and relevance from [CLS] should point there.

Vocabulary layout (defaults): 0 pad, 1 [CLS], 2 marker, then ``n_classes * tokens_per_class`` class tokens
(class ``c`` owns ``tokens_per_class`` consecutive ids), then filler up to ``vocab_size``.

Example:
    >>> from attnscope.datasets import agreement
    >>> suite = agreement(2, seq_len=16, vocab_size=32, seed=0)
    >>> item = suite[0]; m = item.metadata["marker_position"]
    >>> item.ids[0] == suite.params["cls_id"] and item.ids[m] == suite.params["marker_id"]
    True
    >>> suite.metadata["class_of_token"][str(item.ids[m + 1])] == item.label
    True
"""

import numpy as np

from ..errors import InputError
from .suite import PromptItem, PromptSuite


def agreement(n_items: int, seq_len: int = 32, vocab_size: int = 64, seed: int = 0, *, n_classes: int = 2,
              tokens_per_class: int = 4, distractor_rate: float = 0.15, min_len: int | None = None,
              pad_id: int = 0, cls_id: int | None = 1, marker_id: int = 2, first_class_token: int = 3,
              name: str = "agreement") -> PromptSuite:
    """Items of length ``seq_len`` (or drawn in ``[min_len, seq_len]``) with one marker + class token each."""
    n_class_tokens = n_classes * tokens_per_class
    first_filler = first_class_token + n_class_tokens
    if n_classes < 2 or tokens_per_class < 1:
        raise InputError("bad class layout", expected="n_classes >= 2, tokens_per_class >= 1",
                         got=(n_classes, tokens_per_class))
    if first_filler >= vocab_size:
        raise InputError("vocabulary too small", expected=f"vocab_size > {first_filler}", got=vocab_size)
    lo = int(min_len) if min_len is not None else int(seq_len)
    start = 0 if cls_id is None else 1
    if not start + 2 <= lo <= seq_len:
        raise InputError("bad sequence length", expected=f"{start + 2} <= min_len <= seq_len", got=(lo, seq_len))
    if not 0.0 <= distractor_rate < 1.0:
        raise InputError("bad distractor rate", expected="0 <= rate < 1", got=distractor_rate)
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(int(n_items)):
        length = int(rng.integers(lo, seq_len + 1))
        body = rng.integers(first_filler, vocab_size, size=length - start)
        distract = rng.random(length - start) < distractor_rate
        body[distract] = rng.integers(first_class_token, first_filler, size=int(distract.sum()))
        marker = int(rng.integers(start, length - 1))
        label = int(rng.integers(n_classes))
        class_token = first_class_token + label * tokens_per_class + int(rng.integers(tokens_per_class))
        ids = ([] if cls_id is None else [int(cls_id)]) + [int(t) for t in body]
        ids[marker], ids[marker + 1] = int(marker_id), int(class_token)
        items.append(PromptItem(ids=ids, label=label, metadata={
            "marker_position": marker, "class_position": marker + 1, "class_token": int(class_token)}))
    class_of = {str(first_class_token + c * tokens_per_class + j): c
                for c in range(n_classes) for j in range(tokens_per_class)}
    params = {"n_items": int(n_items), "seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "n_classes": int(n_classes), "tokens_per_class": int(tokens_per_class),
              "distractor_rate": float(distractor_rate), "min_len": lo, "pad_id": int(pad_id), "cls_id": cls_id,
              "marker_id": int(marker_id), "first_class_token": int(first_class_token)}
    return PromptSuite(name, items, seed=seed, generator="agreement", params=params,
                       metadata={"task": "classify by the class token after the marker", "class_of_token": class_of})
