"""The draw of ``resample`` edits: which reference row each input row takes its head outputs from.

Row ``b`` of a forward draws with ``numpy.random.default_rng([seed, b])`` uniformly among the reference rows at
least as long as the row (token lengths from the attention masks; every row when the references have no mask),
else among the longest, and among those not identical to the row when there are any. Text-aligned layers give
positions past the drawn reference's length that reference's token mean; every other layer needs as many
positions on the reference as on the input (``check_positions``). An attention batch that folds windows into
the rows batch-first (Swin: row ``b``, window ``w`` at ``b * windows + w``) takes the drawn row's windows; one that
packs every row into one attention row (Qwen2-VL's vision tower: image ``b``'s patches at ``[b * P, (b + 1) * P)``)
takes the drawn images' segments, packed the same way.

Example:
    >>> import torch
    >>> from attnscope.probes.reference_inputs import ReferenceOutputs
    >>> from attnscope.probes.resampling import Draw
    >>> outs = {0: torch.arange(8.).reshape(2, 2, 1, 2)}  # 2 reference rows, 2 positions, 1 head, d_head 2
    >>> draw = Draw(ReferenceOutputs(outs, {0: None}, None, [{}, {}]), seed=0)
    >>> draw.choose({"pixel_values": torch.zeros(3, 1)}, 3)
    >>> len(draw.rows), draw.values_of(0, [0])(torch.zeros(3, 2, 1, 2)).shape
    (3, torch.Size([3, 2, 1, 2]))
"""

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ReferenceMismatchError
from .reference_inputs import ReferenceOutputs, batch_size, check_positions, row_tensors, same_row


class Draw:
    """Per input row, the reference row of a ``resample`` edit, and the head outputs it serves per layer."""

    def __init__(self, refs: ReferenceOutputs, seed: int):
        self.refs, self.seed = refs, int(seed)
        self.rows: Tensor | None = None

    def _lengths(self, named: dict[str, Any], batch: int) -> list["int | None"]:
        ids, mask = named.get("input_ids"), named.get("attention_mask")
        if self.refs.lengths is None:
            return [None] * batch
        if torch.is_tensor(mask) and mask.ndim == 2:
            return [int(n) for n in mask.sum(1).tolist()]
        if torch.is_tensor(ids) and ids.ndim == 2:
            return [int(ids.shape[1])] * batch
        return [None] * batch

    def choose(self, named: dict[str, Any], batch: int) -> None:
        """Draw the rows of one forward (``batch`` rows) from its named inputs."""
        mine = row_tensors(named, batch)
        n_ref, lengths = len(self.refs.rows), self.refs.lengths
        rows = []
        for b, length in enumerate(self._lengths(named, batch)):
            rng = np.random.default_rng([self.seed, b])
            ok = list(range(n_ref)) if length is None else [i for i, n in enumerate(lengths) if n >= length]
            if not ok:  # no reference is long enough: the longest ones (later positions get their token mean)
                ok = [i for i, n in enumerate(lengths) if n == max(lengths)]
            distinct = [i for i in ok if not same_row(self.refs.rows[i], mine[b], length)] or ok
            rows.append(distinct[int(rng.integers(len(distinct)))])
        self.rows = torch.tensor(rows, dtype=torch.long)

    def values_of(self, layer: int, heads: list[int]) -> Callable[[Tensor], Tensor]:
        """``x [batch, seq, head, d] -> [batch, seq, len(heads), d]``: the drawn rows' outputs of ``heads``."""
        source = self.refs.outs[layer][:, :, heads]  # [ref, P, h, d]
        valid = self.refs.valid[layer]
        if valid is not None:
            weights = valid[..., None, None].to(source.dtype)
            token_mean = (source * weights).sum(1) / weights.sum(1).clamp_min(1)  # [ref, h, d]

        def values(x: Tensor) -> Tensor:
            if valid is None and self._packed(x.shape, source.shape):
                per = x.shape[1] // len(self.rows)
                segments = source.reshape(len(self.refs.rows), per, *source.shape[2:])
                return segments.index_select(0, self.rows.to(source.device)).reshape(1, -1, *source.shape[2:])
            rows = self._folded(x.shape[0], source.shape[0]).to(source.device)
            picked = source.index_select(0, rows)
            if valid is None:
                check_positions(layer, x.shape[1], picked.shape[1])
                return picked
            ok, seq = valid.to(source.device).index_select(0, rows), x.shape[1]
            if seq > picked.shape[1]:
                extra = seq - picked.shape[1]
                picked = torch.cat([picked, picked.new_zeros(len(rows), extra, *picked.shape[2:])], 1)
                ok = torch.cat([ok, ok.new_zeros(len(rows), extra)], 1)
            picked, ok = picked[:, :seq], ok[:, :seq]
            return torch.where(ok[..., None, None], picked, token_mean.index_select(0, rows)[:, None])
        return values

    def _packed(self, run: torch.Size, source: torch.Size) -> bool:
        """Whether the layer packs every input row into one attention row, in order and of one length each (a
        Qwen2-VL vision tower: image ``b``'s patches at ``[b * P, (b + 1) * P)``), and the references alike."""
        n_rows, n_ref = (0 if self.rows is None else len(self.rows)), len(self.refs.rows)
        if run[0] != 1 or not n_rows or run[1] % n_rows or (n_rows == 1 and source[0] == n_ref):
            return False
        return source[0] * source[1] == n_ref * (run[1] // n_rows)

    def _folded(self, n_run: int, n_source: int) -> Tensor:
        """Attention-batch indices into the reference outputs: the drawn rows, each with its folded windows."""
        n_rows, n_ref = (0 if self.rows is None else len(self.rows)), len(self.refs.rows)
        fold = n_run // n_rows if n_rows and n_run % n_rows == 0 else 0
        if not fold or n_source != fold * n_ref:
            raise ReferenceMismatchError(
                "resample could not match the attention batch to the input rows", expected=f"{n_run} attention "
                f"rows = input rows ({n_rows}) x windows, and {n_source} reference rows = {n_ref} x the same",
                got=f"{n_rows} input rows", fix="run the model (or its denoiser) itself inside apply_plan, one "
                "forward per batch, with reference inputs of the input's shape")
        return (self.rows[:, None] * fold + torch.arange(fold)[None]).flatten()


def input_hook(target: nn.Module, draw: Draw) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs=True``) on ``target`` that draws the rows of each forward."""
    try:
        signature = inspect.signature(target.forward)
    except (TypeError, ValueError):
        signature = None

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        named = dict(kwargs)
        if signature is not None:
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            for name, value in bound.items():
                kind = signature.parameters[name].kind
                if kind == inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                elif kind != inspect.Parameter.VAR_POSITIONAL:
                    named[name] = value
        elif args and torch.is_tensor(args[0]):
            named.setdefault("input_ids", args[0])
        draw.choose(named, batch_size(target, named))
    return hook


__all__ = ["Draw", "input_hook"]
