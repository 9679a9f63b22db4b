"""Attention flow of every node of one layer to every input token, from the layer below's values (numba).

Layer ``l`` reuses layer ``l-1``'s exact values ``g[k, j] = maxflow((l-1, k) -> (0, j))``. For a source
``(l, i)`` with arc capacities ``c = C[l, i, :]``, max-flow/min-cut gives ``F = min_K c(V \\ K) + h(K)`` where
``h(K)`` is the max-flow from the node set ``K`` of layer ``l-1`` to the sink. ``h`` is monotone and subadditive with
``h({k}) = g[k, j]`` and ``h(K) <= colsum`` (the sink's in-capacity), hence

    LB = min(c(V), min_t [c({k: g_k > g_t}) + g_t])  <=  F  <=  UB = min(sum_k min(c_k, g_k), colsum).

All quantities are integers, so ``LB == UB`` settles the pair exactly; deep layers, where attention has mixed,
settle almost entirely this way. Other pairs run the max-flow solver, which stops once it reaches ``UB``.
Layer 1 is ``C[1]`` itself and layer 2 is exactly ``UB`` (``h`` is additive over layer-1 nodes).
"""

import numpy as np
from numba import get_num_threads, njit, prange

from ._flow_solver import maxflow, new_workspace


@njit(cache=True, inline="always")
def _bounds(C, row, g, order, colsum, n):
    """(LB, UB) of the max-flow from the node whose arcs start at ``C[row]`` (see the module docstring)."""
    total, ub = 0, 0
    for k in range(n):
        total += C[row + k]
        ub += min(C[row + k], g[k])
    lb, before, p = total, 0, 0
    while p < n:
        gv = g[order[p]]
        lb = min(lb, before + gv)
        while p < n and g[order[p]] == gv:
            before += C[row + order[p]]
            p += 1
    return lb, min(ub, colsum)


@njit(cache=True, parallel=True)
def flow_layer(C, ORDX, prev, colsum, sinks, l, n, sh, out, counts):
    """Values of layer ``l >= 2``: ``out[i, s] = maxflow((l, i) -> (0, sinks[s]))`` from ``prev[k, s]`` (layer l-1).

    A sink's column only needs the same sink's column below, so any subset of sinks can be computed.
    counts[chunk] = (pairs settled by the bounds, pairs solved); sinks are dealt to chunks round-robin, one
    workspace per chunk."""
    chunks = counts.shape[0]
    for chunk in prange(chunks):
        ws = new_workspace(l, n, sh)
        g = np.empty(n, np.int64)
        for s in range(chunk, len(sinks), chunks):
            j = sinks[s]
            for k in range(n):
                g[k] = prev[k, s]
            order = np.argsort(-g)
            for i in range(n):
                lb, ub = _bounds(C, (l * n + i) * n, g, order, colsum[j], n)
                if lb == ub or l == 2:
                    out[i, s] = ub
                    counts[chunk, 0] += 1
                else:
                    out[i, s] = maxflow(C, ORDX, ws, l, n, sh, i, j, ub)
                    counts[chunk, 1] += 1


def quantum(n: int) -> int:
    """Capacity scale: every capacity and partial sum (at most (n + 2) units of one) stays below 2**62."""
    return 1 << (61 - int(n + 2).bit_length())


def quantise(a_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer capacities floor(a_hat * Q) laid out for the solver, arcs sorted by capacity, and Q.

    a_hat: ``[layer, n, n]`` float64 residual-augmented attention (row ``i`` of layer ``l`` = arcs of (l+1, i))."""
    n_layers, n, _ = a_hat.shape
    q = quantum(n)
    cap = np.zeros((n_layers + 1, n, n), np.int64)
    cap[1:] = np.floor(a_hat * float(q)).astype(np.int64)
    ordx = np.empty((n_layers + 1, n, n + 1), np.int64)
    ordx[..., :n] = np.argsort(-cap, axis=-1, kind="stable")
    ordx[..., n] = (cap > 0).sum(-1)
    return cap.reshape(-1), ordx.reshape((n_layers + 1) * n, n + 1), q


def flow_values(a_hat: np.ndarray, top: int, stats: dict | None = None,
                sinks: np.ndarray | None = None) -> np.ndarray:
    """Exact integer max-flow values ``[top, n(source), n(sink)]`` for DAG layers 1..top, in units of 1/Q.

    sinks: compute only these input tokens (columns), e.g. to time a sample. ``stats`` (optional) receives the
    numbers of pairs settled by the bounds (layers 1-2 included) and solved by max-flow, and Q."""
    n = a_hat.shape[-1]
    cap, ordx, q = quantise(np.ascontiguousarray(a_hat[:top], dtype=np.float64))
    sinks = np.arange(n, dtype=np.int64) if sinks is None else np.asarray(sinks, dtype=np.int64)
    sh = max(1, int(n - 1).bit_length())
    c3 = cap.reshape(top + 1, n, n)
    values = np.empty((top, n, len(sinks)), np.int64)
    values[0] = c3[1][:, sinks]
    counts = np.zeros((max(1, min(len(sinks), 4 * get_num_threads())), 2), np.int64)
    for l in range(2, top + 1):
        flow_layer(cap, ordx, values[l - 2], c3[1].sum(0), sinks, l, n, sh, values[l - 1], counts)
    if stats is not None:
        stats.update(settled=int(counts[:, 0].sum()) + n * len(sinks), solved=int(counts[:, 1].sum()), quantum=q)
    return values
