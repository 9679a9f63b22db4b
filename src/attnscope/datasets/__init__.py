"""attnscope.datasets: prompt suites and seeded synthetic generators with per-item ground truth.

Every generator is deterministic given its seed (``numpy.random.default_rng``) and returns a ``PromptSuite``
whose items record where the behaviour should happen (needle span, repeated span, marked position ...).

Example:
    >>> from attnscope.datasets import associative_recall, PromptSuite
    >>> suite = associative_recall(4, n_pairs=3, vocab_size=32, seed=1)
    >>> PromptSuite.from_json(suite.to_json()) == suite
    True
"""

from .agreement_suite import agreement
from .backcopy import bigram_backcopy, bigram_transitions
from .induction_suite import induction
from .ioi_suite import ioi
from .needle_suites import needle, needle_grid, needle_text, needle_tokens
from .recall import associative_recall
from .sentence_suite import sentences
from .shapes import ShapesScene, scene_of, shapes_scenes, shapes_vqa
from .shapes_vlm_suite import ShapesVLMSuite, shapes_vlm_examples
from .suite import PromptBatch, PromptItem, PromptSuite, pad_ids
from .vlm_example_batches import VLMExample, vlm_examples

__all__ = [
    "PromptBatch",
    "PromptItem",
    "PromptSuite",
    "ShapesScene",
    "ShapesVLMSuite",
    "VLMExample",
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
    "scene_of",
    "sentences",
    "shapes_scenes",
    "shapes_vlm_examples",
    "shapes_vqa",
    "vlm_examples",
]
