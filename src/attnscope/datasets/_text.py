"""A small built-in natural-language sentence generator (word lists + templates), for haystacks and names.

Example:
    >>> import numpy as np
    >>> from attnscope.datasets._text import sentence
    >>> s = sentence(np.random.default_rng(0))
    >>> s.endswith(".") and s[0].isupper()
    True
"""

import numpy as np

ADJECTIVES = ("quiet", "old", "muddy", "small", "bright", "heavy", "narrow", "warm", "distant", "gentle", "busy",
              "empty", "tall", "soft", "early", "wooden", "silver", "crowded", "calm", "rough")
NOUNS = ("farmer", "teacher", "river", "village", "garden", "market", "painter", "child", "train", "library",
         "sailor", "forest", "kitchen", "doctor", "bridge", "student", "window", "mountain", "baker", "letter")
VERBS = ("watched", "crossed", "painted", "visited", "followed", "carried", "found", "cleaned", "opened", "passed",
         "described", "remembered", "repaired", "measured", "admired", "ignored", "counted", "shared")
PLACES = ("near the harbor", "after the storm", "in the morning", "before dinner", "along the road",
          "behind the school", "during the festival", "under the old tree", "at the station", "by the lake",
          "on a cold day", "without a word", "in the evening", "across the square")
TEMPLATES = (
    "The {a1} {n1} {v} the {a2} {n2} {p}.",
    "A {a1} {n1} {v} a {n2} {p}.",
    "{P}, the {n1} {v} the {a2} {n2}.",
    "Nobody knew why the {a1} {n1} {v} the {n2} {p}.",
    "Every {n1} {v} the {a2} {n2} {p}.",
)
COLORS = ("blue", "red", "green", "yellow", "white", "black", "orange", "purple", "golden", "grey")
OBJECTS = ("door", "box", "gate", "safe", "locker", "chest", "vault", "drawer", "cabinet", "case")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def sentence(rng: np.random.Generator) -> str:
    """One grammatical filler sentence drawn from the word lists."""
    template = _pick(rng, TEMPLATES)
    place = _pick(rng, PLACES)
    text = template.format(a1=_pick(rng, ADJECTIVES), n1=_pick(rng, NOUNS), v=_pick(rng, VERBS),
                           a2=_pick(rng, ADJECTIVES), n2=_pick(rng, NOUNS), p=place, P=place.capitalize())
    return text[0].upper() + text[1:]


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [sentence(rng) for _ in range(int(n))]
