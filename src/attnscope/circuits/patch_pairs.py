"""Clean/corrupted prompt pairs and the metrics that activation and attribution patching score them with.

A ``PatchPairs`` holds, per pair, equally long clean and corrupted token ids and the scored positions: position
``t`` predicts ``answers[t]`` (and, for a logit difference, against ``wrong[t]``); both runs are scored with the
clean answers. Build it from a list of id pairs, from a suite with corrupted twins (``from_suite``: IOI pairs, any
suite JSON with ``corrupt_ids``), from an induction suite (``induction_pairs``: fresh random tokens, nothing
repeats) or from an associative-recall suite (``recall_pairs``: the values rotated among the keys).

Metrics (``PatchMetric``), per scored position, pooled over all pairs (sum / count, so batching does not change
them): ``logit_diff`` = logit(answer) - logit(wrong), ``logit``, ``prob`` = softmax(answer), ``loss`` = -log p
(lower is better), or any ``fn(output, batch) -> [batch]`` (one value per pair, differentiable for the attribution
methods; ``FunctionMetric``).

Example:
    >>> from attnscope.circuits.patch_pairs import PatchPairs, metric_from
    >>> pairs = PatchPairs.from_ids([[5, 6, 7, 8]], [[5, 9, 7, 8]], answers=[[3]], wrong=[[4]])
    >>> b = pairs.batches(8)[0]
    >>> b.clean_ids.tolist(), b.positions.tolist(), metric_from("logit_diff").name
    ([[5, 6, 7, 8]], [[3]], 'logit_diff')
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import AnalysisError, InputError
from .task_metrics import _encode, decoder_reads_input

METRICS = ("logit_diff", "logit", "prob", "loss")


@dataclass
class PatchBatch:
    """Right-padded ``[batch, seq]`` clean and corrupted ids with their mask, scored ``positions``/``answers``/
    ``wrong`` ``[batch, P]`` (``-1`` pads), and the pairs' indices."""

    clean_ids: Tensor
    corrupt_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    answers: Tensor
    wrong: Tensor
    indices: Tensor

    def __len__(self) -> int:
        return int(self.clean_ids.shape[0])

    def ids(self, which: str) -> Tensor:
        return self.clean_ids if which == "clean" else self.corrupt_ids

    def replicate(self, n: int) -> "PatchBatch":
        """``n`` copies along the batch (block ``i`` = rows ``[i*B, (i+1)*B)``)."""
        return PatchBatch(*(t.repeat(n, *([1] * (t.ndim - 1))) for t in self._fields()))

    def to(self, device: Any) -> "PatchBatch":
        return PatchBatch(*(t.to(device) for t in self._fields()))

    def _fields(self) -> tuple[Tensor, ...]:
        return (self.clean_ids, self.corrupt_ids, self.attention_mask, self.positions, self.answers, self.wrong,
                self.indices)


@dataclass
class PatchPairs:
    """Equal-length clean/corrupted id pairs with their scored positions (see the module docstring)."""

    clean: list[list[int]]
    corrupt: list[list[int]]
    positions: list[list[int]]
    answers: list[list[int]]
    wrong: list[list[int]] | None = None
    pad_id: int = 0
    name: str = "pairs"
    dropped: int = 0

    def __post_init__(self) -> None:
        n = len(self.clean)
        if n == 0 or len(self.corrupt) != n or len(self.positions) != n or len(self.answers) != n:
            raise InputError("clean, corrupt, positions and answers must be non-empty and of one length",
                             expected="one entry per pair", got=[len(self.clean), len(self.corrupt),
                                                                 len(self.positions), len(self.answers)])
        for i, (c, x, p, a) in enumerate(zip(self.clean, self.corrupt, self.positions, self.answers)):
            if len(c) != len(x):
                raise InputError("a clean/corrupted pair differs in length", expected="equally long token ids",
                                 got=f"pair {i}: {len(c)} vs {len(x)} tokens",
                                 fix="drop or re-tokenise the pair (patching aligns positions)")
            if not p or len(p) != len(a) or not all(0 <= int(t) < len(c) for t in p):
                raise InputError("bad scored positions", expected="positions inside the pair, one answer each",
                                 got=f"pair {i}: positions {p}, answers {a}, length {len(c)}")
            if self.wrong is not None and len(self.wrong[i]) != len(p):
                raise InputError("one wrong token per scored position", expected=len(p), got=len(self.wrong[i]))

    def __len__(self) -> int:
        return len(self.clean)

    @classmethod
    def from_ids(cls, clean: Sequence[Sequence[int]], corrupt: Sequence[Sequence[int]], *,
                 answers: Sequence[Sequence[int]], wrong: Sequence[Sequence[int]] | None = None,
                 positions: Sequence[Sequence[int]] | None = None, pad_id: int = 0, name: str = "pairs"
                 ) -> "PatchPairs":
        """Pairs from id lists; ``positions`` default to the last position (one answer per pair)."""
        clean = [[int(t) for t in s] for s in clean]
        pos = [[int(t) for t in p] for p in positions] if positions is not None else [[len(s) - 1] for s in clean]
        return cls(clean, [[int(t) for t in s] for s in corrupt], pos, [[int(t) for t in a] for a in answers],
                   [[int(t) for t in w] for w in wrong] if wrong is not None else None, int(pad_id), name)

    @classmethod
    def from_suite(cls, suite: Any, tokenizer: Any = None, *, pad_id: int | None = None) -> "PatchPairs":
        """Pairs from a suite whose items have corrupted twins (``corrupt_ids`` or ``corrupt_text``).

        The last position predicts the first answer token (``answer_ids`` / ``answer_text``); ``wrong`` is the
        item's ``metadata["wrong_answer_ids"][0]`` (IOI: the subject) where every item has one. Pairs whose two
        sides tokenise to different lengths are dropped (counted in ``dropped``).
        """
        clean, corrupt, answers, wrong, dropped = [], [], [], [], 0
        for item in suite:
            ids = list(item.ids) if item.ids is not None else _encode(tokenizer, item.text, False)
            bad = item.corrupt_ids is None and item.corrupt_text is None
            if bad:
                raise InputError("suite item has no corrupted twin", expected="corrupt_ids or corrupt_text",
                                 got=suite.name, fix="use an IOI suite, induction_pairs(...), or --pairs FILE")
            cor = list(item.corrupt_ids) if item.corrupt_ids is not None else _encode(tokenizer, item.corrupt_text,
                                                                                     False)
            answer = item.answer_ids or (_encode(tokenizer, item.answer_text, False) if item.answer_text else None)
            if not answer:
                raise InputError("suite item has no answer", expected="answer_ids or answer_text", got=None)
            if len(ids) != len(cor):
                dropped += 1
                continue
            clean.append(ids)
            corrupt.append(cor)
            answers.append([int(answer[0])])
            w = item.metadata.get("wrong_answer_ids")
            wrong.append([int(w[0])] if w else None)
        if not clean:
            raise InputError("no pair of equal length in the suite", expected="clean and corrupted prompts of "
                             "equal token length", got=f"{dropped} unequal pairs",
                             fix="use another tokenizer or build PatchPairs.from_ids yourself")
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None) or 0
        pairs = cls(clean, corrupt, [[len(c) - 1] for c in clean], answers,
                    wrong if all(w is not None for w in wrong) else None, int(pad), getattr(suite, "name", "suite"))
        pairs.dropped = dropped
        return pairs

    def batches(self, batch_size: int) -> list[PatchBatch]:
        """Right-padded batches (positions, answers and wrong tokens padded with -1)."""
        if int(batch_size) < 1:
            raise InputError("batch size must be positive", expected=">= 1", got=batch_size)
        out = []
        for start in range(0, len(self), int(batch_size)):
            rows = range(start, min(start + int(batch_size), len(self)))
            width = max(len(self.clean[i]) for i in rows)
            n_pos = max(len(self.positions[i]) for i in rows)
            t = {k: torch.full((len(rows), w), v, dtype=torch.long) for k, w, v in
                 (("clean", width, self.pad_id), ("corrupt", width, self.pad_id), ("mask", width, 0),
                  ("pos", n_pos, -1), ("ans", n_pos, -1), ("wrong", n_pos, -1))}
            for r, i in enumerate(rows):
                n, p = len(self.clean[i]), len(self.positions[i])
                t["clean"][r, :n] = torch.tensor(self.clean[i])
                t["corrupt"][r, :n] = torch.tensor(self.corrupt[i])
                t["mask"][r, :n] = 1
                t["pos"][r, :p] = torch.tensor(self.positions[i])
                t["ans"][r, :p] = torch.tensor(self.answers[i])
                if self.wrong is not None:
                    t["wrong"][r, :p] = torch.tensor(self.wrong[i])
            out.append(PatchBatch(t["clean"], t["corrupt"], t["mask"], t["pos"], t["ans"], t["wrong"],
                                  torch.arange(start, start + len(rows))))
        return out


def induction_pairs(suite: Any, *, vocab_size: int | None = None, seed: int = 0) -> PatchPairs:
    """Pairs from an induction suite: the corrupted twin is a sequence of distinct fresh random tokens (none of the
    clean ones; a leading ``bos_id`` kept), so no token repeats and nothing can be copied. Scored: every position
    ``t - 1`` of the repeat span predicting the clean token ``ids[t]`` (as ``task_metrics`` scores it).
    """
    rng = np.random.default_rng(seed)
    vocab = int(vocab_size or suite.params.get("vocab_size", 128))
    first = int(suite.params.get("first_token", 0) or 0)
    bos = suite.params.get("bos_id")
    clean, corrupt, positions, answers = [], [], [], []
    for item in suite:
        span = item.metadata.get("repeat_span")
        if not span or item.ids is None:
            raise InputError("not an induction item", expected="ids with repeat_span metadata",
                             got=sorted(item.metadata), fix="build the suite with attnscope.datasets.induction_suite")
        ids = list(item.ids)
        start, end = int(span[0]), min(int(span[1]), len(ids))
        keep = 1 if bos is not None and ids[0] == bos else 0
        fresh = np.array(sorted(set(range(first, vocab)) - set(ids) - ({int(bos)} if bos is not None else set())))
        n = len(ids) - keep
        cor = ids[:keep] + [int(t) for t in rng.choice(fresh, size=n, replace=len(fresh) < n)]
        scored = [(t - 1, ids[t]) for t in range(max(start + 1, 1), end)]
        clean.append(ids)
        corrupt.append(cor)
        positions.append([p for p, _ in scored])
        answers.append([a for _, a in scored])
    return PatchPairs(clean, corrupt, positions, answers, None, int(suite.params.get("pad_id") or 0),
                      f"{getattr(suite, 'name', 'induction')} (corrupted: fresh random tokens)")


def recall_pairs(suite: Any) -> PatchPairs:
    """Pairs from an associative-recall suite: the corrupted twin binds every key of the key-value span to the next
    pair's value (values rotated), so each query's answer changes. Scored: every query position predicting the
    clean value, against the value the corrupted run binds (``wrong``: a logit difference).
    """
    clean, corrupt, positions, answers, wrong = [], [], [], [], []
    for item in suite:
        queries, pairs = item.metadata.get("queries"), item.metadata.get("pairs")
        if not queries or not pairs or item.ids is None or len(pairs) < 2:
            raise InputError("not an associative-recall item", expected="ids with pairs and queries metadata "
                             "(at least two pairs)", got=sorted(item.metadata),
                             fix="build the suite with attnscope.datasets.associative_recall")
        ids, cor = list(item.ids), list(item.ids)
        rotated = {int(k): int(pairs[(i + 1) % len(pairs)][1]) for i, (k, _) in enumerate(pairs)}
        for q in queries:
            cor[int(q["value_position"])] = rotated[int(q["key"])]
        scored = [q for q in queries if int(q["position"]) < len(ids)]
        clean.append(ids)
        corrupt.append(cor)
        positions.append([int(q["position"]) for q in scored])
        answers.append([int(q["answer"]) for q in scored])
        wrong.append([rotated[int(q["key"])] for q in scored])
    return PatchPairs(clean, corrupt, positions, answers, wrong, int(suite.params.get("pad_id") or 0),
                      f"{getattr(suite, 'name', 'recall')} (corrupted: values rotated)")


# ---- metrics ------------------------------------------------------------------------------------------------------

def _logits(output: Any) -> Tensor:
    logits = output if torch.is_tensor(output) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if logits is None or logits.ndim != 3:
        raise AnalysisError("the metric needs token logits", expected="[batch, seq, vocab] logits",
                            got=type(output).__name__, fix="use a model with an LM head, or metric=fn(output, batch)")
    return logits


class PatchMetric:
    """Per-pair ``(sum, count)`` statistics ``[batch, 2]``; differentiable in the sum."""

    name = "metric"
    higher_is_better = True
    keeps_positions = True  # the model may compute logits only at the scored positions

    def row_stats(self, output: Any, batch: PatchBatch, keep: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def reduce(totals: Tensor) -> float:
        return float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")


class TokenMetric(PatchMetric):
    """``logit_diff``, ``logit``, ``prob`` or ``loss`` at the scored positions."""

    def __init__(self, kind: str):
        if kind not in METRICS:
            raise InputError("unknown patching metric", expected=", ".join(METRICS) + " or a function", got=kind)
        self.name, self.higher_is_better = kind, kind != "loss"

    def row_stats(self, output: Any, batch: PatchBatch, keep: Tensor | None = None) -> Tensor:
        logits = _logits(output)
        valid = batch.positions >= 0
        pos = batch.positions.clamp_min(0)
        if keep is not None:  # logits exist only at the kept positions: map positions to their index in keep
            pos = torch.searchsorted(keep.to(pos.device), pos)
        rows = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [batch, P, vocab]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        answer = rows.gather(-1, batch.answers.clamp_min(0)[..., None])[..., 0]
        if self.name == "logit_diff":
            if bool((batch.wrong[valid] < 0).any()):
                raise InputError("logit_diff needs a wrong token per scored position", expected="wrong ids",
                                 got="none", fix="use metric 'logit', 'prob' or 'loss'")
            value = answer - rows.gather(-1, batch.wrong.clamp_min(0)[..., None])[..., 0]
        elif self.name == "logit":
            value = answer
        else:
            logp = answer - torch.logsumexp(rows, -1)
            value = logp.exp() if self.name == "prob" else -logp
        value = torch.where(valid, value, torch.zeros_like(value))
        return torch.stack([value.sum(1), valid.sum(1).to(value.dtype)], 1)


class FunctionMetric(PatchMetric):
    """A user metric ``fn(output, batch) -> [batch]`` (one value per pair; the metric is their mean)."""

    keeps_positions = False

    def __init__(self, fn: Callable[[Any, PatchBatch], Tensor], name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "user_metric")

    def row_stats(self, output: Any, batch: PatchBatch, keep: Tensor | None = None) -> Tensor:
        value = self.fn(output, batch)
        if not torch.is_tensor(value) or value.shape != (len(batch),):
            raise InputError("a metric function must return one value per pair",
                             expected=f"a tensor of shape ({len(batch)},)",
                             got=tuple(value.shape) if torch.is_tensor(value) else type(value).__name__)
        value = value.to(torch.promote_types(value.dtype, torch.float32))
        return torch.stack([value, torch.ones_like(value)], 1)


def metric_from(metric: "str | PatchMetric | Callable") -> PatchMetric:
    """A ``PatchMetric`` from a name, an instance, or a function ``fn(output, batch) -> [batch]``."""
    if isinstance(metric, PatchMetric):
        return metric
    if isinstance(metric, str):
        return TokenMetric(metric)
    if callable(metric):
        return FunctionMetric(metric)
    raise InputError("bad metric", expected=", ".join(METRICS) + ", a PatchMetric or a function",
                     got=type(metric).__name__)


def run_model(module: torch.nn.Module, ids: Tensor, mask: Tensor, batch: PatchBatch, metric: PatchMetric
              ) -> Tensor:
    """Forward (no KV cache; logits only at the scored positions where the model takes ``logits_to_keep``) and the
    metric's ``[batch, 2]`` statistics."""
    import inspect

    params = inspect.signature(module.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    keep = None
    if metric.keeps_positions and "logits_to_keep" in params:
        keep = torch.unique(batch.positions[batch.positions >= 0])
        if len(keep) < ids.shape[1]:
            kwargs["logits_to_keep"] = keep
        else:
            keep = None
    return metric.row_stats(module(**decoder_reads_input(module, kwargs)), batch, keep)


__all__ = ["METRICS", "FunctionMetric", "PatchBatch", "PatchMetric", "PatchPairs", "TokenMetric", "induction_pairs",
           "metric_from", "recall_pairs", "run_model"]
