"""Exact max-flow from one node ``(l, i)`` to one input node ``(0, j)`` of the layered attention graph (numba).

The graph: nodes ``(m, u)`` for layers ``m = 0..l`` and tokens ``u``; an arc ``(m, u) -> (m-1, v)`` of integer
capacity ``C[m, u, v]`` (the quantised residual-augmented attention). Everything is stored densely: capacity and
flow of the arc ``(m, u) -> (m-1, v)`` live at flat index ``(m*n + u)*n + v`` of ``C`` and ``F``.

Algorithm: Dinic's phases (a BFS gives levels in the residual graph; a blocking flow on the level graph; repeat
until the sink is unreachable), with the blocking flow found by Tarjan's wave method (Karzanov's preflow): nodes push
their whole excess forward in level order, nodes that cannot are blocked and return the excess, deepest first,
along the arcs it came in on. Pushes move aggregated excess, so an arc carrying many tiny path flows is updated
once per pass instead of once per augmenting path. Specialisations for dense layered graphs:

- the BFS scans, for each node, only the still-unvisited nodes of the layer below (a dense graph's BFS costs
  O(nodes + saturated arcs) rather than O(arcs)); reverse arcs come from per-node lists of senders;
- forward candidates of a node are its ``HEAVY`` largest arcs, then the nodes of the next level of the layer below
  (a contiguous slice of that layer's BFS order) with blocked nodes skipped by path-halving union-find;
- active and blocked nodes are kept in per-level lists, so a pass touches only nodes with excess;
- the caller passes an upper bound; the solve stops as soon as the flow reaches it (the value is then proven).

Capacities are integers (int64), so the result is the exact max-flow of the integer graph: no rounding inside.
Only phase one (the flow value) is computed, never a full flow decomposition.
"""

import numpy as np
from numba import njit
from numba.core import cgutils
from numba.extending import intrinsic

INF = 1 << 40  # "unlevelled"
BIG = 1 << 62  # larger than any capacity sum
HEAVY = 4  # a node tries its HEAVY largest arcs first
# fields of a node's row in ND (QUE is the BFS queue, indexed by position)
(LEV, CUR, SLO, SHI, INC, POS, QUE, EX, BLK, HEAD, ANX, INA, BNX, INB) = range(14)
ND_ROWS = 14
LAY, NXT, UNV = range(3)  # per-layer lists: BFS order, union-find over it, unvisited nodes (count in the last slot)
RFROM, RARC, RSIGN, RAMT, RNEXT = range(5)  # fields of a push record
S_ARCS, S_RECS, S_SUNK = range(3)  # counters: arcs that got a sender, push records, flow into the sink


@intrinsic
def borrow(typingctx, arr):
    """The same array without an owner, so numba's reference counting on it is a no-op.

    Only for arrays whose owner outlives the call (the solver's workspace): it removes atomic refcount traffic
    that numba otherwise emits around inlined helpers in the hot loops (about 40% of the run time)."""
    def codegen(context, builder, signature, args):
        src = context.make_array(arr)(context, builder, value=args[0])
        dst = context.make_array(arr)(context, builder)
        for name in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(dst, name, getattr(src, name))
        dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
        dst.parent = cgutils.get_null_value(dst.parent.type)
        return dst._getvalue()
    return arr(arr), codegen


@njit(cache=True)
def new_workspace(n_layers, n, sh):
    """Scratch arrays for one thread; ``maxflow`` leaves them clean (all flows zero) after every call."""
    nn, e = (n_layers + 1) << sh, (n_layers + 1) * n * n
    return (np.zeros(e, np.int64), np.zeros(e, np.int8), np.zeros(e, np.int64), np.full(e, -1, np.int64),
            np.zeros((nn + 1, n), np.int32), np.zeros((nn + 1, ND_ROWS), np.int64),
            np.zeros((3, n_layers + 1, n + 2), np.int64), np.zeros((e + 1, 5), np.int64),
            np.full((2, nn + 2), -1, np.int64), np.zeros(4, np.int64))


@njit(cache=True, inline="always")
def _visit(ND, LY, qt, m, k, x, level):
    """Level node x (slot k of layer m's unvisited list) and enqueue it."""
    ND[x, LEV] = level
    ND[qt, QUE] = x
    c = LY[UNV, m, -1] - 1
    LY[UNV, m, -1] = c
    LY[UNV, m, k] = LY[UNV, m, c]
    return qt + 1


@njit(cache=True, inline="always")
def _bfs(C, F, INL, ND, LY, l, n, sh, i, j):
    """Levels from the source in the residual graph: (sink level or INF, number of levelled nodes)."""
    for m in range(1, l):
        LY[UNV, m, -1], LY[LAY, m, -1] = n, 0
        for u in range(n):
            LY[UNV, m, u] = u
            ND[(m << sh) | u, LEV] = INF
    qh, qt, tl = 0, 0, INF
    k, row = 0, (l * n + i) * n
    while k < LY[UNV, l - 1, -1]:
        v = LY[UNV, l - 1, k]
        if C[row + v] > F[row + v]:
            qt = _visit(ND, LY, qt, l - 1, k, ((l - 1) << sh) | v, 1)
        else:
            k += 1
    while qh < qt and ND[ND[qh, QUE], LEV] < tl:
        x = ND[qh, QUE]
        qh += 1
        lx, m, u = ND[x, LEV], x >> sh, x & ((1 << sh) - 1)
        c = LY[LAY, m, -1]
        ND[x, POS], LY[LAY, m, c], LY[LAY, m, -1] = c, u, c + 1
        if m == 1 and tl == INF and C[(n + u) * n + j] > F[(n + u) * n + j]:
            tl = lx + 1
        if lx + 1 >= tl:
            continue
        k, row = 0, (m * n + u) * n
        while m > 1 and k < LY[UNV, m - 1, -1]:
            v = LY[UNV, m - 1, k]
            if C[row + v] > F[row + v]:
                qt = _visit(ND, LY, qt, m - 1, k, ((m - 1) << sh) | v, lx + 1)
            else:
                k += 1
        for q in range(ND[x, INC] if m + 1 < l else 0):
            w = INL[x, q]
            if ND[((m + 1) << sh) | w, LEV] == INF and F[((m + 1) * n + w) * n + u] > 0:
                for k in range(LY[UNV, m + 1, -1]):
                    if LY[UNV, m + 1, k] == w:
                        qt = _visit(ND, LY, qt, m + 1, k, ((m + 1) << sh) | w, lx + 1)
                        break
    for k in range(qh, qt):  # discovered at the sink's level: useless in this phase
        ND[ND[k, QUE], LEV] = INF
    return tl, qh


@njit(cache=True, inline="always")
def _slice(ND, LY, sh, m, target):
    """[lo, hi) of layer m's BFS order holding the nodes at level ``target`` (levels are sorted there)."""
    lo, hi = 0, LY[LAY, m, -1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if ND[(m << sh) | LY[LAY, m, mid], LEV] < target:
            lo = mid + 1
        else:
            hi = mid
    first, hi = lo, LY[LAY, m, -1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if ND[(m << sh) | LY[LAY, m, mid], LEV] <= target:
            lo = mid + 1
        else:
            hi = mid
    return first, lo


@njit(cache=True, inline="always")
def _start_phase(ND, LY, LH, l, sh, i, nq, tl):
    """Reset per-phase node state; give every levelled node its slice of candidates in the layer below."""
    for q in range(-1, nq):
        x = (l << sh) | i if q < 0 else ND[q, QUE]
        m = x >> sh
        ND[x, CUR], ND[x, EX], ND[x, BLK], ND[x, HEAD], ND[x, INA], ND[x, INB] = 0, 0, 0, -1, 0, 0
        if m >= 2:
            ND[x, SLO], ND[x, SHI] = _slice(ND, LY, sh, m - 1, 1 if q < 0 else ND[x, LEV] + 1)
    for m in range(1, l):
        for p in range(LY[LAY, m, -1] + 1):
            LY[NXT, m, p] = p
    for level in range(tl + 2):
        LH[0, level], LH[1, level] = -1, -1


@njit(cache=True, inline="always")
def _find(LY, m, p):
    """First unblocked position >= p in layer m's BFS order (path halving)."""
    while LY[NXT, m, p] != p:
        LY[NXT, m, p] = LY[NXT, m, LY[NXT, m, p]]
        p = LY[NXT, m, p]
    return p


@njit(cache=True, inline="always")
def _candidate(C, F, ORDX, INL, ND, LY, l, n, sh, j, x, tl):
    """Next admissible arc of x from its current-arc pointer: (target, arc, sign, residual).

    target -2 is the sink, -1 means none is left in this phase; sign +1 is a forward arc, -1 a reverse arc."""
    m, u = x >> sh, x & ((1 << sh) - 1)
    lx, row = (0 if m == l else ND[x, LEV]), (m * n + u) * n
    kh, seg = 1, 0
    if m == 1:
        if ND[x, CUR] == 0:
            if lx + 1 == tl and C[row + j] > F[row + j]:
                return -2, row + j, 1, C[row + j] - F[row + j]
            ND[x, CUR] = 1
    elif lx + 1 < tl:
        kh, seg = min(HEAVY, ORDX[m * n + u, n]), ND[x, SHI] - ND[x, SLO]
        while ND[x, CUR] < kh:
            v = ORDX[m * n + u, ND[x, CUR]]
            y = ((m - 1) << sh) | v
            if ND[y, LEV] == lx + 1 and ND[y, BLK] == 0 and C[row + v] > F[row + v]:
                return y, row + v, 1, C[row + v] - F[row + v]
            ND[x, CUR] += 1
        while ND[x, CUR] < kh + seg:
            p = _find(LY, m - 1, ND[x, SLO] + ND[x, CUR] - kh)
            ND[x, CUR] = kh + min(p, ND[x, SHI]) - ND[x, SLO]
            if p < ND[x, SHI]:
                v = LY[LAY, m - 1, p]
                if C[row + v] > F[row + v]:
                    return ((m - 1) << sh) | v, row + v, 1, C[row + v] - F[row + v]
                ND[x, CUR] += 1
    if m >= l - 1 or lx + 1 >= tl:
        return -1, 0, 0, 0
    while ND[x, CUR] < kh + seg + ND[x, INC]:
        w = INL[x, ND[x, CUR] - kh - seg]
        y, a = ((m + 1) << sh) | w, ((m + 1) * n + w) * n + u
        if ND[y, LEV] == lx + 1 and ND[y, BLK] == 0 and F[a] > 0:
            return y, a, -1, F[a]
        ND[x, CUR] += 1
    return -1, 0, 0, 0


@njit(cache=True, inline="always")
def _push(F, INM, TARC, RIDX, INL, ND, REC, LH, ST, sh, x, y, a, s, d):
    """Move d units along the residual arc x -> y (arc a, sign s), record it for returns, activate y."""
    F[a] += s * d
    if s > 0 and INM[a] == 0:  # y gets a new sender: remember it for y's reverse arcs
        INM[a], TARC[ST[S_ARCS]] = 1, a
        ST[S_ARCS] += 1
        INL[y, ND[y, INC]] = x & ((1 << sh) - 1)
        ND[y, INC] += 1
    ND[y, EX] += d
    r = RIDX[a]
    if r < 0:
        r = ST[S_RECS]
        ST[S_RECS] += 1
        RIDX[a] = r
        REC[r, RFROM], REC[r, RARC], REC[r, RSIGN], REC[r, RAMT], REC[r, RNEXT] = x, a, s, 0, ND[y, HEAD]
        ND[y, HEAD] = r
    REC[r, RAMT] += d
    if ND[y, INA] == 0:
        level = ND[y, LEV]
        ND[y, INA], ND[y, ANX], LH[0, level] = 1, LH[0, level], y


@njit(cache=True, inline="always")
def _discharge(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, j, x, tl, ex, ub):
    """Push up to ``ex`` units out of x along admissible arcs; returns what is left."""
    while ex > 0 and ST[S_SUNK] < ub:
        y, a, s, r = _candidate(C, F, ORDX, INL, ND, LY, l, n, sh, j, x, tl)
        if y == -1:
            break
        d = min(ex, r)
        ex -= d
        if y == -2:
            F[a] += d
            ST[S_SUNK] += d
        else:
            _push(F, INM, TARC, RIDX, INL, ND, REC, LH, ST, sh, x, y, a, s, d)
        if d == r:
            ND[x, CUR] += 1
    return ex


@njit(cache=True, inline="always")
def _advance_pass(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, j, tl, ub):
    """Forward wave in level order; nodes left with excess are blocked. Returns the number blocked."""
    blocked = 0
    for level in range(1, tl):
        while LH[0, level] >= 0 and ST[S_SUNK] < ub:
            x = LH[0, level]
            LH[0, level], ND[x, INA] = ND[x, ANX], 0
            if ND[x, BLK] != 0 or ND[x, EX] == 0:
                continue
            ex = _discharge(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, j, x, tl, ND[x, EX], ub)
            ND[x, EX] = ex
            if ex > 0 and ST[S_SUNK] < ub:
                ND[x, BLK] = 1
                LY[NXT, x >> sh, ND[x, POS]] = ND[x, POS] + 1
                ND[x, INB], ND[x, BNX], LH[1, level] = 1, LH[1, level], x
                blocked += 1
    return blocked


@njit(cache=True, inline="always")
def _balance_pass(F, RIDX, ND, REC, LH, source, tl):
    """Backward wave, deepest level first: blocked nodes return their excess along their incoming records."""
    for level in range(tl - 1, 0, -1):
        while LH[1, level] >= 0:
            x = LH[1, level]
            LH[1, level], ND[x, INB] = ND[x, BNX], 0
            while ND[x, EX] > 0:
                r = ND[x, HEAD]
                d = min(ND[x, EX], REC[r, RAMT])
                F[REC[r, RARC]] -= REC[r, RSIGN] * d
                REC[r, RAMT] -= d
                ND[x, EX] -= d
                p = REC[r, RFROM]
                if REC[r, RAMT] == 0:
                    ND[x, HEAD], RIDX[REC[r, RARC]] = REC[r, RNEXT], -1
                if p == source:
                    continue
                ND[p, EX] += d
                lists = 1 if ND[p, BLK] != 0 else 0
                flag = INB if lists == 1 else INA
                if ND[p, flag] == 0:
                    link = BNX if lists == 1 else ANX
                    ND[p, flag], ND[p, link], LH[lists, level - 1] = 1, LH[lists, level - 1], p


@njit(cache=True, inline="always")
def _phase(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, i, j, tl, ub):
    """One blocking flow on the current level graph (stops early once the total reaches ``ub``)."""
    source = (l << sh) | i
    ST[S_RECS] = 0
    ND[source, CUR] = 0
    _discharge(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, j, source, tl, BIG, BIG)
    while ST[S_SUNK] < ub:
        if _advance_pass(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, j, tl, ub) == 0:
            break
        _balance_pass(F, RIDX, ND, REC, LH, source, tl)
    for r in range(ST[S_RECS]):
        RIDX[REC[r, RARC]] = -1


@njit(cache=True)
def maxflow(C, ORDX, ws, l, n, sh, i, j, ub):
    """Max-flow value from (l, i) to (0, j), or ``ub`` as soon as the flow reaches it (ub must be >= max-flow).

    C: flat int64 capacities; ORDX[(m*n + u)]: arcs of (m, u) by decreasing capacity, then their count."""
    F, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST = ws
    F, INM, TARC, RIDX, INL = borrow(F), borrow(INM), borrow(TARC), borrow(RIDX), borrow(INL)
    ND, LY, REC, LH, ST, C, ORDX = borrow(ND), borrow(LY), borrow(REC), borrow(LH), borrow(ST), borrow(C), borrow(ORDX)
    ST[S_ARCS], ST[S_SUNK] = 0, 0
    while ST[S_SUNK] < ub:
        tl, nq = _bfs(C, F, INL, ND, LY, l, n, sh, i, j)
        if tl >= INF:
            break
        _start_phase(ND, LY, LH, l, sh, i, nq, tl)
        _phase(C, F, ORDX, INM, TARC, RIDX, INL, ND, LY, REC, LH, ST, l, n, sh, i, j, tl, ub)
    for k in range(ST[S_ARCS]):
        F[TARC[k]], INM[TARC[k]] = 0, 0
    for u in range(n):
        F[(n + u) * n + j] = 0
    for m in range(1, l):
        for u in range(n):
            ND[(m << sh) | u, INC] = 0
    return min(ST[S_SUNK], ub)
