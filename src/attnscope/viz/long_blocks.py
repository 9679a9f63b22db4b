"""``BlockAccumulator``: block means or maxima of a pattern fed row chunk by row chunk, and its strongest links.

A mean counts every cell inside the pattern part (masked cells as 0, as ``pool_pattern`` does); a chunk may stop
before the last key (causal rows: the keys after are zeros, which change no sum and no maximum). Links: per row the
largest weight outside the skipped keys (the sink) and the band ``|query - key| < min_distance``, ranked by lift =
weight x keys the query sees (how many times above uniform attention), so early causal rows, which see few keys,
do not crowd out long-range links. With ``top_k=1`` a chunk costs one ``amax`` pass; the key of each of the final
``n_links`` rows is found afterwards from that row alone (``row_of``).

Example:
    >>> import torch
    >>> from attnscope.viz.long_blocks import BlockAccumulator
    >>> acc = BlockAccumulator((0, 4), (0, 4), block=2, how="mean", top_k=0)
    >>> acc.add(torch.eye(4)[:3], 0); acc.add(torch.eye(4)[3:], 3)          # any chunking
    >>> acc.result()[0].tolist()
    [[0.5, 0.0], [0.0, 0.5]]
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

HOWS = ("mean", "max")


class BlockAccumulator:
    """Block aggregates of ``query_range x key_range`` in blocks of ``block x block``, fed by ``add``."""

    def __init__(self, query_range: tuple[int, int], key_range: tuple[int, int], block: int, how: str = "mean",
                 top_k: int = 1, skip_keys: Sequence[int] = (0,), min_distance: int = 0,
                 row_of: Callable[[int], Tensor] | None = None):
        if how not in HOWS:
            raise InputError("unknown block aggregate", expected=HOWS, got=how)
        self.q0, self.q1 = query_range
        self.k0, self.k1 = key_range
        self.block, self.how, self.top_k = max(1, int(block)), how, max(0, int(top_k))
        self.skip, self.min_distance = [k - self.k0 for k in skip_keys if self.k0 <= k < self.k1], int(min_distance)
        self.row_of = row_of  # query -> its row over the key range (for the deferred argmax of top_k=1)
        self.n_qb = math.ceil((self.q1 - self.q0) / self.block)
        self.n_kb = math.ceil((self.k1 - self.k0) / self.block)
        self.acc = torch.zeros(self.n_qb, self.n_kb, dtype=torch.float64 if how == "mean" else torch.float32)
        self.links: list[Tensor] = []  # rows of (query, key or -1, weight, lift)

    def add(self, rows: "Tensor | np.ndarray", start: int, visible: "Tensor | None" = None) -> None:
        """Fold in query rows ``start .. start + len(rows)`` over keys ``k0 .. k0 + width`` (width <= the range).
        ``visible``: keys each row sees in the whole pattern (default: its non-zero entries here), for the lift."""
        rows = torch.as_tensor(rows).float()
        r, width = rows.shape
        if width > self.k1 - self.k0 or not self.q0 <= start <= start + r <= self.q1:
            raise InputError("row chunk does not fit the ranges", expected=f"rows inside {self.q0}:{self.q1} with "
                             f"<= {self.k1 - self.k0} keys", got=f"rows {start}:{start + r} with {width} keys")
        if width == 0 or r == 0:
            return
        per_row = self._reduce_keys(rows)
        self._fold_rows(per_row, start)
        if self.top_k:
            seen = rows.gt(0).sum(-1, dtype=torch.int32) if visible is None else torch.as_tensor(visible)
            self._keep_links(rows, start, seen)

    def _reduce(self, x: Tensor, dim: int) -> Tensor:
        return x.sum(dim) if self.how == "mean" else x.amax(dim)

    def _reduce_keys(self, rows: Tensor) -> Tensor:
        r, width = rows.shape
        full = width // self.block
        parts = [self._reduce(rows[:, :full * self.block].reshape(r, full, self.block), -1)] if full else []
        if width % self.block:
            parts.append(self._reduce(rows[:, full * self.block:], -1)[:, None])
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def _fold_rows(self, per_row: Tensor, start: int) -> None:
        r, n_kb = per_row.shape
        offset = start - self.q0
        if offset % self.block == 0 and (r % self.block == 0 or start + r == self.q1):  # whole query blocks
            first, n_qb = offset // self.block, -(-r // self.block)
            if r != n_qb * self.block:
                per_row = torch.nn.functional.pad(per_row, (0, 0, 0, n_qb * self.block - r))
            blocks = self._reduce(per_row.view(n_qb, self.block, n_kb), 1)
            target = self.acc[first:first + n_qb, :n_kb]
            if self.how == "mean":
                target += blocks.double()
            else:
                torch.maximum(target, blocks, out=target)
            return
        index = (torch.arange(start, start + r) - self.q0) // self.block
        if self.how == "mean":
            self.acc[:, :n_kb].index_add_(0, index, per_row.double())
        else:
            self.acc[:, :n_kb].scatter_reduce_(0, index[:, None].expand(-1, n_kb), per_row, "amax")

    def _exclude(self, rows: Tensor, start: int) -> Callable[[], None]:
        """Set the skipped keys and the near band of ``rows`` to -1; returns the function that restores them."""
        r, d, width = len(rows), self.min_distance, rows.shape[1]
        lo = min(width, max(self.k0, start - d + 1) - self.k0) if d > 0 else 0
        hi = min(width, start + r + d - 1 - self.k0) if d > 0 else 0
        band = rows[:, lo:hi].clone() if hi > lo else None
        skip = [k for k in self.skip if k < width]
        skipped = rows[:, skip].clone() if skip else None
        if band is not None:
            near = (torch.arange(start, start + r)[:, None] - torch.arange(lo, hi)[None, :] - self.k0).abs() < d
            rows[:, lo:hi].masked_fill_(near, -1.0)
        if skipped is not None:
            rows[:, skip] = -1.0

        def restore() -> None:
            if skipped is not None:
                rows[:, skip] = skipped
            if band is not None:
                rows[:, lo:hi] = band
        return restore

    def _keep_links(self, rows: Tensor, start: int, visible: Tensor) -> None:
        restore = self._exclude(rows, start)
        k = min(self.top_k, rows.shape[1])
        if k == 1 and self.row_of is not None:  # one cheap pass; the key is found later for the rows kept
            weight = rows.amax(-1, keepdim=True)
            index = torch.full_like(weight, -1 - self.k0, dtype=torch.long)
        else:
            weight, index = rows.topk(k, dim=-1)
        restore()
        query = torch.arange(start, start + len(rows))[:, None].expand(-1, k)
        keep = weight > 0
        lift = weight * visible.to(weight.dtype)[:, None]
        self.links.append(torch.stack([query[keep].double(), (index[keep] + self.k0).double(),
                                       weight[keep].double(), lift[keep].double()], -1))

    def _key_of(self, query: int) -> int:
        row = torch.as_tensor(self.row_of(query)).float().clone()[None]
        self._exclude(row, query)
        return int(row[0].argmax()) + self.k0

    def result(self, n_links: int = 150) -> tuple[np.ndarray, np.ndarray]:
        """(block values ``[query blocks, key blocks]`` float32, the ``n_links`` links of most lift ``[n, 4]``)."""
        values = self.acc
        if self.how == "mean":
            rows = torch.clamp(self.q1 - self.q0 - torch.arange(self.n_qb) * self.block, max=self.block)
            cols = torch.clamp(self.k1 - self.k0 - torch.arange(self.n_kb) * self.block, max=self.block)
            values = values / (rows[:, None] * cols[None, :]).double()
        links = torch.cat(self.links) if self.links else torch.zeros(0, 4, dtype=torch.float64)
        links = links[links[:, 3].argsort(descending=True)[:max(0, n_links)]]
        for i in torch.nonzero(links[:, 1] < 0).flatten().tolist():
            links[i, 1] = self._key_of(int(links[i, 0]))
        return values.float().numpy(), links.numpy()


__all__ = ["HOWS", "BlockAccumulator"]
