"""``PromptSuite``: a named, seeded list of prompts with per-item ground truth, saved as JSON (never pickle).

Items hold token ids (for tokenizer-less organisms) or text (for real tokenizers), an expected answer, an optional
clean/corrupt pair, a label, and free-form metadata such as the needle span ``[start, end)``. The suite keeps the
generator's name, seed and parameters (calling the generator again with them rebuilds it exactly).

Example:
    >>> from attnscope.datasets import PromptItem, PromptSuite
    >>> suite = PromptSuite("demo", [PromptItem(ids=[5, 6, 7], answer_ids=[8]), PromptItem(ids=[5, 6])], seed=0)
    >>> PromptSuite.from_json(suite.to_json()) == suite
    True
    >>> batch = next(suite.batches(2, pad_id=0))
    >>> batch.input_ids.tolist(), batch.attention_mask.tolist()
    ([[5, 6, 7], [5, 6, 0]], [[1, 1, 1], [1, 1, 0]])
"""

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write_text, read_text
from ..errors import CorruptResultError, InputError

SUITE_FORMAT = "attnscope.prompt_suite/1"


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON types (tuples become lists, numpy scalars become Python numbers).

    Raises InputError for values JSON cannot hold (objects, non-string keys, NaN/inf floats).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise InputError("non-finite number in suite metadata", expected="a finite float", got=value,
                             fix="store NaN/inf as None or a string")
        return float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError("non-string key in suite metadata", expected="str keys (JSON objects)",
                                 got=repr(key), fix="convert keys with str()")
            out[key] = jsonable(item)
        return out
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(item) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
    raise InputError("value cannot be stored in a JSON suite", expected="None, bool, int, float, str, list, dict",
                     got=type(value).__name__, fix="convert it to plain Python types")


def _ids(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a sequence of token ids", expected="list[int]",
                         got=type(value).__name__, fix=f"write {name} as a list of integers") from None


@dataclass
class PromptItem:
    """One prompt: ``ids`` and/or ``text``, the expected answer, an optional corrupted twin, a label, metadata.

    Spans in ``metadata`` are half-open ``[start, end]`` lists of token positions in ``ids`` (or character
    offsets in ``text`` when the key ends in ``_chars``).
    """

    ids: list[int] | None = None
    text: str | None = None
    answer_ids: list[int] | None = None
    answer_text: str | None = None
    label: int | str | None = None
    corrupt_ids: list[int] | None = None
    corrupt_text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids is None and self.text is None:
            raise InputError("a prompt item needs ids or text", expected="ids=[...] or text='...'", got="neither",
                             fix="give each item ids or text")
        self.ids = _ids(self.ids, "ids")
        self.answer_ids = _ids(self.answer_ids, "answer_ids")
        self.corrupt_ids = _ids(self.corrupt_ids, "corrupt_ids")
        if isinstance(self.label, (np.integer,)):
            self.label = int(self.label)
        self.metadata = jsonable(dict(self.metadata))

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None and value != {}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptItem":
        known = {"ids", "text", "answer_ids", "answer_text", "label", "corrupt_ids", "corrupt_text", "metadata"}
        unknown = set(data) - known
        if unknown:
            raise CorruptResultError("unknown prompt item fields", expected=sorted(known), got=sorted(unknown),
                                     fix="write the file with PromptSuite.to_json")
        return cls(**data)


@dataclass
class PromptBatch:
    """One padded batch: ``input_ids`` and ``attention_mask`` ``[batch, seq]``, the items, their suite indices."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    items: list[PromptItem]
    indices: list[int]
    lengths: list[int]

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, ready for ``model(**batch.inputs)``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad_ids(sequences: Sequence[Sequence[int]], pad_id: int = 0,
            padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to ``[batch, max_len]``; returns ``(input_ids, attention_mask)`` as int64 tensors."""
    if padding_side not in ("right", "left"):
        raise InputError("bad padding side", expected="'right' or 'left'", got=repr(padding_side))
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


@dataclass
class PromptSuite:
    """A named list of ``PromptItem`` plus the seed and generator parameters that produced it."""

    name: str
    items: list[PromptItem]
    seed: int | None = None
    generator: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.items = list(self.items)
        self.params = jsonable(dict(self.params))
        self.metadata = jsonable(dict(self.metadata))
        if self.seed is not None:
            self.seed = int(self.seed)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> PromptItem:
        return self.items[index]

    # ---- JSON -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": SUITE_FORMAT, "name": self.name, "seed": self.seed, "generator": self.generator,
                "params": self.params, "metadata": self.metadata, "items": [it.to_dict() for it in self.items]}

    def to_json(self, path: str | Path | None = None, indent: int | None = None) -> str:
        """Serialise to a JSON string; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> "PromptSuite":
        """Load from a JSON string or a path to a ``.json`` file written by ``to_json``."""
        text = source
        fix = "write the file with PromptSuite.to_json"
        if isinstance(source, bytes):
            try:
                text = source.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptResultError("suite is not UTF-8 text", expected="UTF-8 JSON", got="undecodable bytes",
                                         fix=fix) from None
        elif isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            text = read_text(source, "suite file", "a PromptSuite JSON file (UTF-8)", error=CorruptResultError)
        elif not isinstance(source, str):
            raise InputError("bad suite source", expected="a JSON string or a path", got=type(source).__name__,
                             fix="pass PromptSuite.from_json('suite.json')")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise CorruptResultError("suite is not valid JSON", expected="PromptSuite.to_json output",
                                     got=str(exc)[:200], fix=fix) from None
        if not isinstance(data, dict) or data.get("format") != SUITE_FORMAT:
            raise CorruptResultError("not an attnscope prompt suite", expected=SUITE_FORMAT,
                                     got=data.get("format") if isinstance(data, dict) else type(data).__name__,
                                     fix=fix)
        missing = [k for k in ("name", "items") if k not in data]
        if missing or not isinstance(data["items"], list) or not all(isinstance(i, dict) for i in data["items"]):
            raise CorruptResultError("incomplete prompt suite", expected="'name' and a list of item objects",
                                     got=f"missing {missing}" if missing else type(data["items"]).__name__, fix=fix)
        try:
            return cls(name=str(data["name"]), items=[PromptItem.from_dict(it) for it in data["items"]],
                       seed=data.get("seed"), generator=data.get("generator"), params=data.get("params") or {},
                       metadata=data.get("metadata") or {})
        except (TypeError, ValueError) as exc:
            raise CorruptResultError("malformed prompt suite", expected="PromptSuite.to_json output",
                                     got=f"{type(exc).__name__}: {exc}"[:200], fix=fix) from None

    # ---- batching ---------------------------------------------------------------------------------------------
    def batches(self, batch_size: int, *, pad_id: int | None = None, padding_side: str = "right",
                tokenizer: Any = None, use: str = "clean") -> Iterator[PromptBatch]:
        """Yield ``PromptBatch`` es of up to ``batch_size`` items, padded with ``pad_id``.

        ``use="corrupt"`` batches the corrupted twins. Items without ids are tokenised with ``tokenizer``
        (required then); ``pad_id`` defaults to the tokenizer's pad id, else the suite's ``pad_id`` metadata, else 0.
        """
        if int(batch_size) < 1:
            raise InputError("batch size must be positive", expected=">= 1", got=batch_size)
        if use not in ("clean", "corrupt"):
            raise InputError("bad batch field", expected="'clean' or 'corrupt'", got=repr(use))
        pad = self._pad_id(pad_id, tokenizer)
        for start in range(0, len(self.items), int(batch_size)):
            chunk = self.items[start:start + int(batch_size)]
            seqs = [self.item_ids(item, tokenizer, use) for item in chunk]
            ids, mask = pad_ids(seqs, pad, padding_side)
            yield PromptBatch(ids, mask, chunk, list(range(start, start + len(chunk))), [len(s) for s in seqs])

    def _pad_id(self, pad_id: int | None, tokenizer: Any) -> int:
        if pad_id is not None:
            return int(pad_id)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            return int(tokenizer.pad_token_id)
        return int(self.params.get("pad_id", self.metadata.get("pad_id", 0)))

    @staticmethod
    def item_ids(item: PromptItem, tokenizer: Any, use: str = "clean") -> list[int]:
        """The token ids of ``item`` (``use``: ``clean`` or ``corrupt``), tokenizing its text when it has no ids."""
        ids, text = (item.ids, item.text) if use == "clean" else (item.corrupt_ids, item.corrupt_text)
        if ids is not None:
            return ids
        if text is None:
            raise InputError("item has no corrupted twin", expected="corrupt_ids or corrupt_text", got=None,
                             fix="batch with use='clean' or build the suite with corrupt pairs")
        if tokenizer is None:
            raise InputError("text items need a tokenizer to batch", expected="tokenizer=...", got=None,
                             fix="pass the model's tokenizer to batches()")
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
