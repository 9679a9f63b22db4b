"""``sentences``: generated English text items (word lists and templates), the one sentence suite of attnscope.

Used for attention statistics on natural text (sinks, entropy) and for sentence-embedding metrics.

Example:
    >>> from attnscope.datasets import sentences
    >>> suite = sentences(4, seed=1, sentences_per_item=2)
    >>> len(suite), suite.generator, suite.items[0].text.count(".")
    (4, 'sentences', 2)
"""

import numpy as np

from ..errors import InputError
from ._text import sentence
from .suite import PromptItem, PromptSuite


def sentences(n_items: int, seed: int = 0, *, sentences_per_item: int = 3) -> PromptSuite:
    """``n_items`` text items of ``sentences_per_item`` generated sentences each (seeded)."""
    if int(n_items) < 1 or int(sentences_per_item) < 1:
        raise InputError("sentences needs positive sizes", expected="n_items >= 1, sentences_per_item >= 1",
                         got={"n_items": n_items, "sentences_per_item": sentences_per_item})
    rng = np.random.default_rng(seed)
    items = [PromptItem(text=" ".join(sentence(rng) for _ in range(int(sentences_per_item))))
             for _ in range(int(n_items))]
    return PromptSuite("sentences", items, seed=seed, generator="sentences",
                       params={"n_items": int(n_items), "sentences_per_item": int(sentences_per_item)},
                       metadata={"task": "natural text"})
