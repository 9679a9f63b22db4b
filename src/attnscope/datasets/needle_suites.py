"""Needle-in-a-haystack suites: token level (for tokenizer-less organisms) and text level (for real LMs).

Token level: ``[bos] haystack[:k] needle haystack[k:] [sep] needle[:cue_len]``; the answer is
``needle[cue_len:]``. Needle tokens come from their own vocabulary range (no collision with the haystack) and
are distinct, so the cue points at exactly one place.

Text level: generated filler sentences, one needle sentence ("The secret code of the blue door is 4821.") put at
a sentence boundary near a depth fraction, then a question whose answer is the code. ``needle_grid`` builds the
retrieval-head paper's grid of context lengths x depths.

Example:
    >>> from attnscope.datasets import needle_tokens, needle_text
    >>> item = needle_tokens(1, seq_len=32, vocab_size=64, needle_len=4, cue_len=1, seed=0)[0]
    >>> s, e = item.metadata["needle_span"]
    >>> item.ids[s:e] == item.metadata["needle"] and item.answer_ids == item.metadata["needle"][1:]
    True
    >>> t = needle_text(1, context_length=60, depth=0.5, seed=0)[0]
    >>> a, b = t.metadata["needle_span_chars"]; t.text[a:b] == t.metadata["needle_text"]
    True
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ._text import COLORS, OBJECTS, sentence
from ._tokenize import encode_with_spans
from .suite import PromptItem, PromptSuite


def _ranges(vocab_size: int, first_token: int, haystack_range: Sequence[int] | None,
            needle_range: Sequence[int] | None) -> tuple[tuple[int, int], tuple[int, int]]:
    mid = first_token + (vocab_size - first_token) // 2
    hay = tuple(int(v) for v in haystack_range) if haystack_range is not None else (first_token, mid)
    ned = tuple(int(v) for v in needle_range) if needle_range is not None else (mid, vocab_size)
    for label, (lo, hi) in (("haystack_range", hay), ("needle_range", ned)):
        if not 0 <= lo < hi <= vocab_size:
            raise InputError(f"bad {label}", expected=f"0 <= lo < hi <= {vocab_size}", got=(lo, hi))
    return hay, ned  # type: ignore[return-value]


def _depth(rng: np.random.Generator, depth: float | None) -> float:
    if depth is None:
        return float(rng.random())
    if not 0.0 <= float(depth) <= 1.0:
        raise InputError("depth must be a fraction", expected="0 <= depth <= 1", got=depth)
    return float(depth)


def needle_tokens(n_items: int, seq_len: int = 64, vocab_size: int = 128, seed: int = 0, *, needle_len: int = 4,
                  cue_len: int = 1, depth: float | None = None, first_token: int = 0,
                  haystack_range: Sequence[int] | None = None, needle_range: Sequence[int] | None = None,
                  bos_id: int | None = None, sep_id: int | None = None, name: str = "needle_tokens") -> PromptSuite:
    """Token-level needles: random haystack, a random distinct-token needle at ``depth`` (random if None).

    The prompt ends with the needle's first ``cue_len`` tokens; ``answer_ids`` is the rest of the needle.
    Metadata: ``needle_span``, ``answer_span`` (where the answer tokens sit in the context), ``depth``.
    """
    hay, ned = _ranges(vocab_size, first_token, haystack_range, needle_range)
    if not 1 <= cue_len < needle_len <= ned[1] - ned[0]:
        raise InputError("bad needle/cue length", expected=f"1 <= cue_len < needle_len <= {ned[1] - ned[0]}",
                         got=(cue_len, needle_len))
    n_hay = seq_len - needle_len - cue_len - (bos_id is not None) - (sep_id is not None)
    if n_hay < 1:
        raise InputError("sequence too short for the needle", expected=f"seq_len > {seq_len - n_hay}", got=seq_len)
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(int(n_items)):
        d = _depth(rng, depth)
        k = int(round(d * n_hay))
        haystack = rng.integers(hay[0], hay[1], size=n_hay).tolist()
        needle = rng.choice(np.arange(ned[0], ned[1]), size=needle_len, replace=False).tolist()
        head = [] if bos_id is None else [int(bos_id)]
        tail = ([] if sep_id is None else [int(sep_id)]) + needle[:cue_len]
        ids = head + haystack[:k] + needle + haystack[k:] + tail
        start = len(head) + k
        items.append(PromptItem(ids=ids, answer_ids=needle[cue_len:], metadata={
            "needle": needle, "needle_span": [start, start + needle_len],
            "answer_span": [start + cue_len, start + needle_len], "cue_span": [len(ids) - cue_len, len(ids)],
            "depth": d}))
    params = {"n_items": int(n_items), "seq_len": int(seq_len), "vocab_size": int(vocab_size),
              "needle_len": int(needle_len), "cue_len": int(cue_len), "depth": depth, "first_token": int(first_token),
              "haystack_range": list(hay), "needle_range": list(ned), "bos_id": bos_id, "sep_id": sep_id}
    return PromptSuite(name, items, seed=seed, generator="needle_tokens", params=params,
                       metadata={"task": "continue the needle after its cue"})


def _needle_sentence(rng: np.random.Generator) -> tuple[str, str, str]:
    color, obj = COLORS[int(rng.integers(len(COLORS)))], OBJECTS[int(rng.integers(len(OBJECTS)))]
    code = str(int(rng.integers(1000, 10000)))
    subject = f"the secret code of the {color} {obj}"
    return f"The secret code of the {color} {obj} is {code}.", subject, code


def _haystack(rng: np.random.Generator, context_length: int, unit: str, tokenizer: Any) -> list[str]:
    """Sentences until the context holds ``context_length`` words (or tokens)."""
    out: list[str] = []
    used = 0
    while True:
        s = sentence(rng)
        size = len(s.split()) if unit == "words" else len(tokenizer(" " + s, add_special_tokens=False)["input_ids"])
        if out and used + size > context_length:
            return out
        out.append(s)
        used += size


def _text_item(rng: np.random.Generator, context_length: int, depth: float | None, unit: str,
               tokenizer: Any) -> PromptItem:
    d = _depth(rng, depth)
    hay = _haystack(rng, context_length, unit, tokenizer)
    needle, subject, code = _needle_sentence(rng)
    k = int(round(d * len(hay)))
    before = " ".join(hay[:k])
    start = len(before) + (1 if before else 0)
    context = " ".join(hay[:k] + [needle] + hay[k:])
    question = f"\n\nQuestion: What is {subject}?\nAnswer: {subject[0].upper() + subject[1:]} is"
    text = context + question
    meta: dict[str, Any] = {"needle_text": needle, "needle_span_chars": [start, start + len(needle)],
                            "answer_span_chars": [start + needle.index(code), start + needle.index(code) + len(code)],
                            "depth": d, "actual_depth": k / max(1, len(hay)), "context_length": int(context_length),
                            "unit": unit, "n_sentences": len(hay) + 1}
    item = PromptItem(text=text, answer_text=" " + code, metadata=meta)
    if tokenizer is not None:
        ids, spans = encode_with_spans(tokenizer, text, {"needle_span": tuple(meta["needle_span_chars"]),
                                                         "answer_span": tuple(meta["answer_span_chars"])})
        item.ids = ids
        item.answer_ids = list(tokenizer(" " + code, add_special_tokens=False)["input_ids"])
        item.metadata.update(spans)
    return item


def needle_text(n_items: int, context_length: int = 200, depth: float | None = 0.5, seed: int = 0, *,
                unit: str = "words", tokenizer: Any = None, name: str = "needle_text") -> PromptSuite:
    """Text needles in generated prose; ``context_length`` counts words (or tokens with ``unit="tokens"``).

    With a tokenizer, items also carry ``ids``, ``answer_ids`` and token spans ``needle_span``/``answer_span``.
    """
    return needle_grid([context_length], [depth], n_per_cell=n_items, seed=seed, unit=unit, tokenizer=tokenizer,
                       name=name, _generator="needle_text")


def needle_grid(lengths: Sequence[int], depths: Sequence[float | None], n_per_cell: int = 1, seed: int = 0, *,
                unit: str = "words", tokenizer: Any = None, name: str = "needle_grid",
                _generator: str = "needle_grid") -> PromptSuite:
    """Text needles over a grid of context lengths x depth fractions (as in the retrieval-head paper).

    Items are ordered by length, then depth, then repeat; each records ``context_length`` and ``depth``.
    """
    if unit not in ("words", "tokens"):
        raise InputError("bad length unit", expected="'words' or 'tokens'", got=repr(unit))
    if unit == "tokens" and tokenizer is None:
        raise InputError("token lengths need a tokenizer", expected="tokenizer=...", got=None,
                         fix="pass the tokenizer or use unit='words'")
    if not lengths or not depths:
        raise InputError("empty grid", expected="at least one length and one depth", got=(lengths, depths))
    rng = np.random.default_rng(seed)
    items = [_text_item(rng, int(length), depth, unit, tokenizer)
             for length in lengths for depth in depths for _ in range(int(n_per_cell))]
    params = {"lengths": [int(v) for v in lengths], "depths": [None if d is None else float(d) for d in depths],
              "n_per_cell": int(n_per_cell), "unit": unit,
              "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None}
    return PromptSuite(name, items, seed=seed, generator=_generator, params=params,
                       metadata={"task": "answer the question with the code from the needle sentence"})


def needle(n_items: int, *args: Any, form: str = "tokens", **kwargs: Any) -> PromptSuite:
    """``needle_tokens`` (``form="tokens"``) or ``needle_text`` (``form="text"``) with the same arguments."""
    if form == "tokens":
        return needle_tokens(n_items, *args, **kwargs)
    if form == "text":
        return needle_text(n_items, *args, **kwargs)
    raise InputError("unknown needle form", expected="'tokens' or 'text'", got=repr(form))
