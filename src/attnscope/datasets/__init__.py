"""attnscope.datasets: prompt suites and seeded synthetic generators with per-item ground truth.

Every generator is deterministic given its seed (``numpy.random.default_rng``) and returns a ``PromptSuite``
whose items record where the behaviour should happen (needle span, repeated span, marked position ...).

Example:
    >>> from attnscope.datasets import associative_recall, PromptSuite
    >>> suite = associative_recall(4, n_pairs=3, vocab_size=32, seed=1)
    >>> PromptSuite.from_json(suite.to_json()) == suite
    True
"""

from .agreement import agreement
from .backcopy import bigram_backcopy, bigram_transitions
from .induction import induction
from .ioi import ioi
from .needle import needle, needle_grid, needle_text, needle_tokens
from .recall import associative_recall
from .shapes import ShapesScene, shapes_scenes, shapes_vqa
from .suite import PromptBatch, PromptItem, PromptSuite, pad_ids

__all__ = [
    "PromptBatch",
    "PromptItem",
    "PromptSuite",
    "ShapesScene",
    "agreement",
    "associative_recall",
    "bigram_backcopy",
    "bigram_transitions",
    "induction",
    "ioi",
    "needle",
    "needle_grid",
    "needle_text",
    "needle_tokens",
    "pad_ids",
    "shapes_scenes",
    "shapes_vqa",
]
