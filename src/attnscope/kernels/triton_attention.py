"""Triton kernels: FlashAttention-style forward with per-head interventions and online row statistics, and a
second pass that turns selected query rows into probabilities with the forward's log-sum-exp.

Every ``@triton.jit`` function of attnscope lives in this one module, so that ``launch.py`` can load a second,
interpreted copy of it (``TRITON_INTERPRET`` semantics) for CPU tensors without touching the compiled one.
Host code, configs and launchers are in ``launch.py``; conventions in ``problem.py``.

Forward, per (query block, batch*head) program, tiles over keys with an online softmax (no ``[query, key]``
matrix in memory), fp32 accumulation, in base 2 (``exp2``; logits carry a factor log2(e), undone at the end):

- logits ``s = scale_row * q.k`` (+ bias); uniform heads and dead rows use ``scale_row = 0``;
- two loops as in FlashAttention: key tiles every row of the block may fully see skip all masking; the causal
  diagonal, the ragged last tile and every tile of a keep-masked problem apply masks;
- output ``acc += exp(s - m) @ v``, times the head's gate at the end; ``lse = m + log l``;
- entropy ``H = log l - t / l`` with ``t = sum exp(s - m) (s - m)``, rescaled with ``m`` like ``l``;
- span mass ``sum_{j in span} exp(s_j - m) / l`` per span (only tiles that meet a span do work);
- top-k (k <= 8): a per-row running set in registers, merged (k unrolled rounds at most) only when a tile holds a
  logit above the row's current k-th value; ties keep the lower key index.
"""

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _masked_logits(q, K, k_base, skn, skd, offs_m, offs_n, offs_d, row_ok, rs, bias_on, dead, M, N,
                   Keep, keep_base, s_kpm, s_kpn, Bias, bias_base, s_bm, s_bn,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   HAS_KEEP: tl.constexpr, KEEP_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BIAS_PER_ROW: tl.constexpr, HAS_DEAD: tl.constexpr, DOT_PREC: tl.constexpr,
                   DOT_F32: tl.constexpr, APPLY_MASK: tl.constexpr):
    """fp32 logits (log2 units) of one [rows, keys] tile; with APPLY_MASK every mask is applied (-inf)."""
    n_ok = offs_n < N
    k_ptrs = K + k_base + offs_n[:, None] * skn + offs_d[None, :] * skd
    if APPLY_MASK:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:  # the interpreter cannot multiply bf16 tiles: exact upcast, same products and fp32 sums
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * rs[:, None]
    if HAS_BIAS:
        if BIAS_PER_ROW:
            bias = tl.load(Bias + bias_base + offs_m.to(tl.int64)[:, None] * s_bm + offs_n[None, :] * s_bn,
                           mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            s = s + bias * bias_on[:, None]
        else:
            bias = tl.load(Bias + bias_base + offs_n * s_bn, mask=n_ok, other=0.0)
            s = s + bias[None, :] * bias_on[:, None]
    if APPLY_MASK:
        allowed = n_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (N - M))
        if HAS_KEEP:
            if KEEP_PER_ROW:
                kp = tl.load(Keep + keep_base + offs_m.to(tl.int64)[:, None] * s_kpm + offs_n[None, :] * s_kpn,
                             mask=row_ok[:, None] & n_ok[None, :], other=0)
                allowed = allowed & (kp != 0)
            else:
                kp = tl.load(Keep + keep_base + offs_n * s_kpn, mask=n_ok, other=0)
                allowed = allowed & (kp != 0)[None, :]
        if HAS_DEAD:
            allowed = allowed | (dead[:, None] & n_ok[None, :])
        s = tl.where(allowed, s, float("-inf"))
    return s


@triton.jit
def _fwd_tile(m_i, l_i, t_i, acc, mass, topv, topi, start_n,
              q, K, k_base, skn, skd, V, v_base, svn, svd, offs_m, offs_nb, offs_d, offs_dv, row_ok, rs, bias_on,
              dead, M, N, Keep, keep_base, s_kpm, s_kpn, Bias, bias_base, s_bm, s_bn, Spans, scols, kcols,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, KEEP_PER_ROW: tl.constexpr,
              HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr, HAS_DEAD: tl.constexpr, WANT_OUT: tl.constexpr,
              WANT_ENT: tl.constexpr, N_SPANS: tl.constexpr, TOPK: tl.constexpr, DOT_PREC: tl.constexpr,
              DOT_F32: tl.constexpr, APPLY_MASK: tl.constexpr):
    """One key tile of the online softmax: output, normaliser, entropy, span mass and top-k state updated."""
    offs_n = start_n + offs_nb
    s = _masked_logits(q, K, k_base, skn, skd, offs_m, offs_n, offs_d, row_ok, rs, bias_on, dead, M, N,
                       Keep, keep_base, s_kpm, s_kpn, Bias, bias_base, s_bm, s_bn,
                       HEAD_DIM, BLOCK_D, IS_CAUSAL, HAS_KEEP, KEEP_PER_ROW, HAS_BIAS, BIAS_PER_ROW, HAS_DEAD,
                       DOT_PREC, DOT_F32, APPLY_MASK)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at l = 0
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s - m_ref[:, None])
    if WANT_ENT:
        shift = tl.where(l_i > 0, m_i - m_ref, 0.0)
        t_i = alpha * (t_i + shift * l_i) + tl.sum(tl.where(p > 0, p * (s - m_ref[:, None]), 0.0), 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    if WANT_OUT:
        v_ptrs = V + v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd
        if APPLY_MASK:
            if BLOCK_DV == HEAD_DIM_V:
                v = tl.load(v_ptrs, mask=(offs_n < N)[:, None], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=(offs_n < N)[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        else:
            if BLOCK_DV == HEAD_DIM_V:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=(offs_dv < HEAD_DIM_V)[None, :], other=0.0)
        if DOT_F32:  # round p to the value dtype as the tensor-core path does, then multiply in fp32
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None],
                         input_precision=DOT_PREC)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    if N_SPANS > 0:
        mass = mass * alpha[:, None]
        for si in tl.static_range(N_SPANS):
            a = tl.load(Spans + 2 * si)
            e = tl.load(Spans + 2 * si + 1)
            if (a < start_n + BLOCK_N) & (e > start_n):
                inside = (offs_n >= a) & (offs_n < e)
                part = tl.sum(tl.where(inside[None, :], p, 0.0), 1)
                mass = tl.where(scols[None, :] == si, mass + part[:, None], mass)
    if TOPK > 0:
        # A tile adds at most TOPK keys to a row's set: TOPK unrolled rounds, each skipped once no row holds a
        # logit above its current k-th value (a dynamic while loop here would stop Triton pipelining the loads).
        kth = tl.min(topv, 1)
        cand = tl.where(s > kth[:, None], s, float("-inf"))
        best = tl.max(cand, 1)
        todo = tl.max((best > kth).to(tl.int32), 0)
        for _ in tl.static_range(TOPK):
            if todo > 0:
                j = tl.argmax(cand, 1)
                better = best > kth
                victim = tl.argmax(tl.where(topv == kth[:, None], topi, -2), 1)  # the latest of the k-th values
                hit = (kcols[None, :] == victim[:, None]) & better[:, None]
                topv = tl.where(hit, best[:, None], topv)
                topi = tl.where(hit, (start_n + j)[:, None], topi)
                kth = tl.min(topv, 1)
                cand = tl.where((offs_nb[None, :] == j[:, None]) | (cand <= kth[:, None]), float("-inf"), cand)
                best = tl.max(cand, 1)
                todo = tl.max((best > kth).to(tl.int32), 0)
    return m_new, l_i, t_i, acc, mass, topv, topi


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, Out, Lse, Ent, Mass, TopW, TopI, KvIdx, Gate, Unif, Keep, Bias, Dead, Spans,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        s_gb, s_gh, s_ub, s_uh, s_kpb, s_kph, s_kpm, s_kpn, s_bb, s_bh, s_bm, s_bn, s_db, s_dh, s_dm,
        H, M, N, scale, M_BUCKET, N_BUCKET,
        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
        KEEP_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr, HAS_DEAD: tl.constexpr,
        HAS_GATE: tl.constexpr, HAS_UNIF: tl.constexpr, WANT_OUT: tl.constexpr, WANT_ENT: tl.constexpr,
        N_SPANS: tl.constexpr, SPAN_PAD: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = tl.load(KvIdx + h).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_nb = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    rs = tl.full([BLOCK_M], 1.0, tl.float32) * (scale * _LOG2E)
    bias_on = tl.full([BLOCK_M], _LOG2E, tl.float32)
    if HAS_UNIF:
        uni = tl.load(Unif + b * s_ub + h * s_uh) != 0
        rs = tl.where(uni, 0.0, rs)
        bias_on = tl.where(uni, 0.0, bias_on)
    dead = offs_m < 0
    hi = tl.program_id(0) * 0 + N
    n_full = (N // BLOCK_N) * BLOCK_N  # key tiles with no ragged end
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(hi, start_m + BLOCK_M + N - M), 0)
        n_full = tl.maximum(tl.minimum(n_full, ((start_m + N - M + 1) // BLOCK_N) * BLOCK_N), 0)
    if HAS_KEEP:
        n_full = n_full * 0
    if HAS_DEAD:
        dead = tl.load(Dead + b * s_db + h * s_dh + offs_m * s_dm, mask=row_ok, other=0) != 0
        rs = tl.where(dead, 0.0, rs)
        bias_on = tl.where(dead, 0.0, bias_on)
        if tl.max(dead.to(tl.int32), 0) > 0:  # a dead row attends to every key
            hi = tl.program_id(0) * 0 + N
    keep_base = b * s_kpb + h * s_kph
    bias_base = b * s_bb + h * s_bh
    k_base = b * skb + kvh * skh
    v_base = b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    scols = tl.arange(0, SPAN_PAD)
    mass = tl.zeros([BLOCK_M, SPAN_PAD], tl.float32)
    kcols = tl.arange(0, TOPK_PAD)
    topv = tl.where(kcols[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, TOPK_PAD], tl.float32)
    topi = tl.full([BLOCK_M, TOPK_PAD], -1, tl.int32)

    for start_n in range(0, n_full, BLOCK_N):  # every row of the block sees the whole tile: no masks
        m_i, l_i, t_i, acc, mass, topv, topi = _fwd_tile(
            m_i, l_i, t_i, acc, mass, topv, topi, start_n, q, K, k_base, skn, skd, V, v_base, svn, svd, offs_m,
            offs_nb, offs_d, offs_dv, row_ok, rs, bias_on, dead, M, N, Keep, keep_base, s_kpm, s_kpn, Bias,
            bias_base, s_bm, s_bn, Spans, scols, kcols, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, IS_CAUSAL,
            HAS_KEEP, KEEP_PER_ROW, HAS_BIAS, BIAS_PER_ROW, HAS_DEAD, WANT_OUT, WANT_ENT, N_SPANS, TOPK, DOT_PREC,
            DOT_F32, False)
    for start_n in range(n_full, hi, BLOCK_N):  # causal diagonal, ragged end, keep masks, dead rows
        m_i, l_i, t_i, acc, mass, topv, topi = _fwd_tile(
            m_i, l_i, t_i, acc, mass, topv, topi, start_n, q, K, k_base, skn, skd, V, v_base, svn, svd, offs_m,
            offs_nb, offs_d, offs_dv, row_ok, rs, bias_on, dead, M, N, Keep, keep_base, s_kpm, s_kpn, Bias,
            bias_base, s_bm, s_bn, Spans, scols, kcols, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, IS_CAUSAL,
            HAS_KEEP, KEEP_PER_ROW, HAS_BIAS, BIAS_PER_ROW, HAS_DEAD, WANT_OUT, WANT_ENT, N_SPANS, TOPK, DOT_PREC,
            DOT_F32, True)

    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    log2_l = tl.math.log2(l_safe)
    lse = tl.where(l_i > 0, (m_fin + log2_l) * _LN2, float("-inf"))
    stat_row = (b * H + h) * M + offs_m
    tl.store(Lse + stat_row, lse, mask=row_ok)
    if WANT_OUT:
        o = acc / l_safe[:, None]
        if HAS_GATE:
            o = o * tl.load(Gate + b * s_gb + h * s_gh)
        o_ptrs = Out + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * som + offs_dv[None, :] * sod
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])
    if WANT_ENT:
        tl.store(Ent + stat_row, tl.maximum((log2_l - t_i / l_safe) * _LN2, 0.0), mask=row_ok)
    if N_SPANS > 0:
        tl.store(Mass + stat_row[:, None] * N_SPANS + scols[None, :], mass / l_safe[:, None],
                 mask=row_ok[:, None] & (scols < N_SPANS)[None, :])
    if TOPK > 0:
        kmask = row_ok[:, None] & (kcols < TOPK)[None, :]  # natural-log logits: the host sorts them into weights
        tl.store(TopW + stat_row[:, None] * TOPK + kcols[None, :], topv * _LN2, mask=kmask)
        tl.store(TopI + stat_row[:, None] * TOPK + kcols[None, :], topi, mask=kmask)


@triton.jit
def _row_probs_kernel(
        Q, K, Lse, Rows, P, KvIdx, Unif, Keep, Bias, Dead,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, s_ub, s_uh,
        s_kpb, s_kph, s_kpm, s_kpn, s_bb, s_bh, s_bm, s_bn, s_db, s_dh, s_dm,
        H, M, N, R, scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, KEEP_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
        BIAS_PER_ROW: tl.constexpr, HAS_DEAD: tl.constexpr, HAS_UNIF: tl.constexpr, DOT_PREC: tl.constexpr,
        DOT_F32: tl.constexpr):
    """P[b, h, r, n] = exp(s[rows[r], n] - lse[rows[r]]): the probabilities of selected query rows."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = tl.load(KvIdx + h).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    rows = tl.load(Rows + offs_r, mask=r_ok, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    rs = tl.full([BLOCK_R], 1.0, tl.float32) * (scale * _LOG2E)
    bias_on = tl.full([BLOCK_R], _LOG2E, tl.float32)
    if HAS_UNIF:
        uni = tl.load(Unif + b * s_ub + h * s_uh) != 0
        rs = tl.where(uni, 0.0, rs)
        bias_on = tl.where(uni, 0.0, bias_on)
    dead = offs_r < 0
    if HAS_DEAD:
        dead = tl.load(Dead + b * s_db + h * s_dh + rows * s_dm, mask=r_ok, other=0) != 0
        rs = tl.where(dead, 0.0, rs)
        bias_on = tl.where(dead, 0.0, bias_on)
    s = _masked_logits(q, K, b * skb + kvh * skh, skn, skd, rows, offs_n, offs_d, r_ok, rs, bias_on, dead, M, N,
                       Keep, b * s_kpb + h * s_kph, s_kpm, s_kpn, Bias, b * s_bb + h * s_bh, s_bm, s_bn,
                       HEAD_DIM, BLOCK_D, IS_CAUSAL, HAS_KEEP, KEEP_PER_ROW, HAS_BIAS, BIAS_PER_ROW, HAS_DEAD,
                       DOT_PREC, DOT_F32, True)
    lse = tl.load(Lse + (b * H + h) * M + rows, mask=r_ok, other=0.0)
    p = tl.math.exp2(s - lse[:, None] * _LOG2E)
    out_row = (b * H + h) * R + offs_r
    tl.store(P + out_row.to(tl.int64)[:, None] * N + offs_n[None, :], p, mask=r_ok[:, None] & (offs_n < N)[None, :])
