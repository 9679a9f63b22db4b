"""Map character spans of a generated text to token spans, for any HF tokenizer (fast or slow)."""

from typing import Any

from ..errors import InputError


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_with_spans(tokenizer: Any, text: str,
                      char_spans: dict[str, tuple[int, int]]) -> tuple[list[int], dict[str, list[int]]]:
    """Tokenise ``text`` and turn each ``[start, end)`` character span into the token span covering it.

    A token belongs to a span when its characters overlap the span. Uses offset mappings when the tokenizer
    offers them, else tokenises prefixes (exact for tokenizers that split at the span boundaries).
    """
    if tokenizer is None:
        raise InputError("no tokenizer given", expected="a HF tokenizer", got=None)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        ids = list(enc["input_ids"])
    except (NotImplementedError, KeyError, TypeError, ValueError):
        offsets = None
        ids = _encode(tokenizer, text)
    spans: dict[str, list[int]] = {}
    for key, (start, end) in char_spans.items():
        if offsets is not None:
            hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
            spans[key] = [hits[0], hits[-1] + 1] if hits else [len(ids), len(ids)]
        else:
            # BPE tokenizers glue a space to the word after it: count the prefix without its trailing spaces
            spans[key] = [len(_encode(tokenizer, text[:start].rstrip(" "))), len(_encode(tokenizer, text[:end]))]
    return ids, spans
