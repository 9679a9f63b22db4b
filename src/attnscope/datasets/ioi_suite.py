"""Indirect-object identification (IOI) prompts with clean/corrupt pairs, text level (Wang et al. 2022).

Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (IO = Mary, S = John). Orders:
ABBA (IO named first) and BABA (S named first). Corruptions:

- ``"abc"``: the paper's ABC distribution: the three name slots get three new distinct names, so no name repeats.
- ``"swap"``: the second subject mention becomes the IO ("..., Mary gave a drink to"), flipping the answer to S.

Metadata: ``io``, ``s``, ``order``, ``template``, character spans ``io_chars``, ``s1_chars``, ``s2_chars``; the
counterfactual answer (``corrupt_answer_text`` for "swap"); with a tokenizer also ids, answer ids and the token
positions ``io_pos``, ``s1_pos``, ``s2_pos``, ``end_pos``.

Example:
    >>> from attnscope.datasets import ioi
    >>> item = ioi(1, seed=0)[0]
    >>> item.text.endswith(" to") and item.answer_text == " " + item.metadata["io"]
    True
"""

from typing import Any

import numpy as np

from ..errors import InputError
from ._tokenize import encode_with_spans
from .suite import PromptItem, PromptSuite

NAMES = ("Mary", "John", "Tom", "James", "Dan", "Sarah", "Paul", "Anne", "Mark", "Lisa", "David", "Laura",
         "Michael", "Kate", "Peter", "Emma", "Alex", "Rose", "Jack", "Lucy")
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("drink", "book", "ring", "snack", "bone", "basketball", "computer", "necklace")
TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {C} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {C} gave it to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {C} decided to give it to",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {C} gave it to",
)
CORRUPTIONS = ("abc", "swap")


def _fill(template: str, a: str, b: str, c: str, place: str, obj: str) -> tuple[str, dict[str, list[int]]]:
    """Fill the template, returning the text and the character spans of the three name slots."""
    text, spans, rest = "", {}, template
    slots = {"{A}": ("a", a), "{B}": ("b", b), "{C}": ("c", c)}
    rest = rest.replace("{PLACE}", place).replace("{OBJECT}", obj)
    while True:
        found = [(rest.find(k), k) for k in slots if rest.find(k) >= 0]
        if not found:
            return text + rest, spans
        pos, key = min(found)
        text += rest[:pos]
        label, name = slots[key]
        spans[label] = [len(text), len(text) + len(name)]
        text += name
        rest = rest[pos + len(key):]


def _ioi_item(rng: np.random.Generator, corrupt: str, order: str | None, tokenizer: Any) -> PromptItem:
    t = int(rng.integers(len(TEMPLATES)))
    io, s, x, y, z = (NAMES[i] for i in rng.choice(len(NAMES), size=5, replace=False))
    place, obj = PLACES[int(rng.integers(len(PLACES)))], OBJECTS[int(rng.integers(len(OBJECTS)))]
    order = order or ("ABBA" if rng.random() < 0.5 else "BABA")
    a, b = (io, s) if order == "ABBA" else (s, io)
    text, spans = _fill(TEMPLATES[t], a, b, s, place, obj)
    io_key, s1_key = ("a", "b") if order == "ABBA" else ("b", "a")
    meta: dict[str, Any] = {"io": io, "s": s, "order": order, "template": t, "place": place, "object": obj,
                            "io_chars": spans[io_key], "s1_chars": spans[s1_key], "s2_chars": spans["c"],
                            "wrong_answer_text": " " + s, "corruption": corrupt}
    if corrupt == "abc":
        corrupt_text, _ = _fill(TEMPLATES[t], x, y, z, place, obj)
        meta["corrupt_names"] = [x, y, z]
    else:
        corrupt_text, _ = _fill(TEMPLATES[t], a, b, io, place, obj)
        meta["corrupt_answer_text"] = " " + s
    item = PromptItem(text=text, answer_text=" " + io, corrupt_text=corrupt_text, label=order, metadata=meta)
    if tokenizer is not None:
        ids, tok = encode_with_spans(tokenizer, text, {k: tuple(meta[f"{k}_chars"]) for k in ("io", "s1", "s2")})
        item.ids = ids
        item.corrupt_ids = list(tokenizer(corrupt_text, add_special_tokens=False)["input_ids"])
        item.answer_ids = list(tokenizer(" " + io, add_special_tokens=False)["input_ids"])
        item.metadata.update({"io_pos": tok["io"][0], "s1_pos": tok["s1"][0], "s2_pos": tok["s2"][0],
                              "end_pos": len(ids) - 1,
                              "wrong_answer_ids": list(tokenizer(" " + s, add_special_tokens=False)["input_ids"])})
    return item


def ioi(n_items: int, seed: int = 0, *, corrupt: str = "abc", order: str | None = None, tokenizer: Any = None,
        name: str = "ioi") -> PromptSuite:
    """IOI prompts; ``order`` fixes "ABBA"/"BABA" (default: random per item); ``corrupt`` is "abc" or "swap"."""
    if corrupt not in CORRUPTIONS:
        raise InputError("unknown IOI corruption", expected=" or ".join(CORRUPTIONS), got=repr(corrupt))
    if order not in (None, "ABBA", "BABA"):
        raise InputError("unknown IOI order", expected="'ABBA', 'BABA' or None", got=repr(order))
    rng = np.random.default_rng(seed)
    items = [_ioi_item(rng, corrupt, order, tokenizer) for _ in range(int(n_items))]
    params = {"n_items": int(n_items), "corrupt": corrupt, "order": order,
              "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    return PromptSuite(name, items, seed=seed, generator="ioi", params=params,
                       metadata={"task": "complete with the indirect object",
                                 "metric": "logit(answer) - logit(wrong_answer)"})
