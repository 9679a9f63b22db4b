/* Streaming attention statistics of rows of base-2 logits, in one fused pass per row (the CPU path of capture).

   For every row s[0:n] (n = the row's extent): m = max s, P = 2^(s - m), Z = sum P, and
     entropy (nats)   = ln 2 * (log2 Z - sum P (s - m) / Z)
     mass of [a, b)   = sum_{a <= j < b} P_j / Z
     top-k            = the k largest s (earliest index first among ties), with weights 2^(s - m) / Z.
   Masked logits are large negative numbers (-1e30): 2^(s - m) is exactly 0 for them.
   Two entry points: row_statistics reads logits computed elsewhere (masked attention); qk_row_statistics computes
   them from queries and keys, 8 rows at a time, into a scratch that stays in cache (attention without a mask).
   Built at first use by attnscope.kernels.cpu_rows with -O3 -march=native -ffast-math, so the loops below
   vectorise (logits must be finite). exp2 is a degree-5 polynomial after range reduction (relative error 2.5e-7). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define LANES 256 /* at most this many strided lanes in the top-k bar search */
#define MAX_K 256 /* attnscope.kernels.cpu_rows.MAX_K */
#define LOWEST (-3.0e38f) /* below every logit (compiled with -ffast-math: no infinities here) */

static inline float exp2_nonpositive(float x) {
    /* 2^x for x <= 0; exactly 0 below -126 (masked keys) */
    float clamped = x < -126.0f ? -126.0f : x;
    float whole = rintf(clamped);
    float f = clamped - whole; /* [-0.5, 0.5] */
    float p = 1.3400433e-3f;
    p = p * f + 9.6760374e-3f;
    p = p * f + 5.5503272e-2f;
    p = p * f + 2.4022107e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0000001f;
    int32_t bits = ((int32_t)whole + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -126.0f ? 0.0f : p * scale;
}

static float row_max(const float *s, int64_t n) {
    float m = LOWEST;
    for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    return m;
}

/* (v, j) ranks above (top[i], index[i]): a larger logit, or an equal one at an earlier key (an empty slot has -1) */
static inline int ranks_above(float v, int32_t j, const float *top, const int32_t *index, int32_t i) {
    return index[i] < 0 || v > top[i] || (v == top[i] && j < index[i]);
}

/* put (v, j), which ranks above the last of the k, in its place */
static void insert_top(float v, int32_t j, float *top, int32_t *index, int32_t k) {
    int32_t pos = k - 1;
    while (pos > 0 && ranks_above(v, j, top, index, pos - 1)) {
        top[pos] = top[pos - 1];
        index[pos] = index[pos - 1];
        pos--;
    }
    top[pos] = v;
    index[pos] = j;
}

/* The k-th largest of v[0:n] (LOWEST when n < k), without branches that depend on the data: the largest value is
   taken out k times (all its copies at once), by whole-vector passes. v is overwritten. */
static float kth_largest(float *v, int64_t n, int32_t k) {
    int64_t left = k;
    for (int32_t round = 0; round < k; round++) {
        float m = row_max(v, n);
        int64_t copies = 0;
        for (int64_t l = 0; l < n; l++) copies += v[l] == m;
        if (copies >= left) return m;
        left -= copies;
        for (int64_t l = 0; l < n; l++) v[l] = v[l] == m ? LOWEST : v[l];
    }
    return LOWEST;
}

/* The k-th largest of v[0:32]: the largest value with at least k values at or above it (counted in two vectors);
   the largest of them into *maximum */
static float kth_of_32(const float *v, int32_t k, float *maximum) {
#if defined(__AVX512F__)
    __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    __m512i at_least_a = _mm512_setzero_si512(), at_least_b = at_least_a, one = _mm512_set1_epi32(1);
    for (int j = 0; j < 32; j++) {
        __m512 level = _mm512_set1_ps(v[j]);
        at_least_a = _mm512_mask_add_epi32(at_least_a, _mm512_cmp_ps_mask(a, level, _CMP_LE_OQ), at_least_a, one);
        at_least_b = _mm512_mask_add_epi32(at_least_b, _mm512_cmp_ps_mask(b, level, _CMP_LE_OQ), at_least_b, one);
    }
    __m512i kk = _mm512_set1_epi32(k);
    __m512 low = _mm512_set1_ps(LOWEST);
    __m512 keep_a = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(at_least_a, kk), low, a);
    __m512 keep_b = _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(at_least_b, kk), low, b);
    *maximum = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
    return _mm512_reduce_max_ps(_mm512_max_ps(keep_a, keep_b));
#else
    float copy[32];
    memcpy(copy, v, sizeof copy);
    *maximum = row_max(v, 32);
    return kth_largest(copy, 32, k);
#endif
}

static inline void consider(const float *s, int64_t j, int32_t k, float *top, int32_t *index) {
    if (ranks_above(s[j], (int32_t)j, top, index, k - 1)) insert_top(s[j], (int32_t)j, top, index, k);
}

/* Insert every key at or above the bar, in key order; a vector compare finds the few that are. */
static void scan_from_bar(const float *s, int64_t n, float bar, int32_t k, float *top, int32_t *index) {
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 level = _mm512_set1_ps(bar);
    for (; j + 64 <= n; j += 64) { /* one branch per 64 keys: hits are rare */
        __mmask16 a = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), level, _CMP_GE_OQ);
        __mmask16 b = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j + 16), level, _CMP_GE_OQ);
        __mmask16 c = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j + 32), level, _CMP_GE_OQ);
        __mmask16 d = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j + 48), level, _CMP_GE_OQ);
        if (!(a | b | c | d)) continue;
        for (uint64_t hit = a | (uint64_t)b << 16 | (uint64_t)c << 32 | (uint64_t)d << 48; hit; hit &= hit - 1)
            consider(s, j + __builtin_ctzll(hit), k, top, index);
    }
    for (; j + 16 <= n; j += 16)
        for (__mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), level, _CMP_GE_OQ); hit; hit &= hit - 1)
            consider(s, j + __builtin_ctz(hit), k, top, index);
#elif defined(__AVX2__)
    __m256 level = _mm256_set1_ps(bar);
    for (; j + 8 <= n; j += 8)
        for (int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j), level, _CMP_GE_OQ)); hit;
             hit &= hit - 1)
            consider(s, j + __builtin_ctz(hit), k, top, index);
#endif
    for (; j < n; j++)
        if (s[j] >= bar) consider(s, j, k, top, index);
}

#if defined(__AVX512F__)
#define CANDIDATES 128 /* more keys at the bar than this (ties) take the insertion path */

/* append the keys of v (at j..j+15) marked in hit to the candidate list; returns the new count */
static inline int64_t append_hits(__m512 v, __mmask16 hit, int64_t j, float *value, int32_t *key, int64_t count) {
    __m512i at = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                  _mm512_set1_epi32((int32_t)j));
    _mm512_storeu_ps(value + count, _mm512_maskz_compress_ps(hit, v));
    _mm512_storeu_si512(key + count, _mm512_maskz_compress_epi32(hit, at));
    return count + __builtin_popcount(hit);
}

/* Top-k (k <= 16) of the keys at or above the bar, without the insertion's mispredicted branches: the candidates are
   compressed into a list, then each one's rank (keys above it: larger, or equal and earlier) is counted by vector
   compares and it goes straight to its slot. Returns 0 when there are too many candidates. */
static int gather_and_rank(const float *s, int64_t n, float bar, int32_t k, float *top, int32_t *index) {
    float value[CANDIDATES + 64];
    int32_t key[CANDIDATES + 64];
    int64_t count = 0, j = 0;
    __m512 level = _mm512_set1_ps(bar);
    for (; j + 64 <= n; j += 64) { /* one branch per 64 keys: hits are rare */
        __m512 v0 = _mm512_loadu_ps(s + j), v1 = _mm512_loadu_ps(s + j + 16);
        __m512 v2 = _mm512_loadu_ps(s + j + 32), v3 = _mm512_loadu_ps(s + j + 48);
        __mmask16 h0 = _mm512_cmp_ps_mask(v0, level, _CMP_GE_OQ), h1 = _mm512_cmp_ps_mask(v1, level, _CMP_GE_OQ);
        __mmask16 h2 = _mm512_cmp_ps_mask(v2, level, _CMP_GE_OQ), h3 = _mm512_cmp_ps_mask(v3, level, _CMP_GE_OQ);
        if (!(h0 | h1 | h2 | h3)) continue;
        count = append_hits(v0, h0, j, value, key, count);
        count = append_hits(v1, h1, j + 16, value, key, count);
        count = append_hits(v2, h2, j + 32, value, key, count);
        count = append_hits(v3, h3, j + 48, value, key, count);
        if (count > CANDIDATES) return 0;
    }
    for (; j < n; j += 16) {
        __mmask16 valid = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(valid, s + j);
        count = append_hits(v, _mm512_mask_cmp_ps_mask(valid, v, level, _CMP_GE_OQ), j, value, key, count);
    }
    if (count > CANDIDATES) return 0;
    for (int32_t i = 0; i < k; i++) {
        top[i] = LOWEST;
        index[i] = -1;
    }
    for (int64_t i = 0; i < count; i++) {
        __m512 vi = _mm512_set1_ps(value[i]);
        __m512i ki = _mm512_set1_epi32(key[i]);
        int rank = 0;
        for (int64_t c = 0; c < count; c += 16) {
            __mmask16 in = count - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (count - c)) - 1u);
            __m512 vc = _mm512_loadu_ps(value + c);
            __mmask16 above = _mm512_mask_cmp_ps_mask(in, vc, vi, _CMP_GT_OQ) |
                              (_mm512_mask_cmp_ps_mask(in, vc, vi, _CMP_EQ_OQ) &
                               _mm512_cmplt_epi32_mask(_mm512_loadu_si512(key + c), ki));
            rank += __builtin_popcount(above);
        }
        if (rank < k) {
            top[rank] = value[i];
            index[rank] = key[i];
        }
    }
    return 1;
}
#endif

/* Top-k of s[0:n], sorted, earliest key first among ties; returns the row maximum. The keys are dealt into strided
   lanes (key j into lane j % lanes), whose maxima cost one vectorised pass. k lanes reach the k-th largest
   lane maximum (the bar), so the k-th largest key does too: only keys at or above the bar can be in the top-k. */
static float row_top(const float *s, int64_t n, int32_t k, float *top, int32_t *index) {
    float lane[LANES];
    int64_t lanes = 32; /* measured best for k = 5 at 300 to 4096 keys; more lanes for larger k keep the bar high */
    while (lanes < LANES && lanes < 4 * (int64_t)k) lanes *= 2;
    for (int l = 0; l < lanes; l++) lane[l] = LOWEST;
    int64_t whole = n - n % lanes;
    for (int64_t j = 0; j < whole; j += lanes)
        for (int l = 0; l < lanes; l++) lane[l] = s[j + l] > lane[l] ? s[j + l] : lane[l];
    for (int64_t j = whole; j < n; j++) lane[j - whole] = s[j] > lane[j - whole] ? s[j] : lane[j - whole];
    float maximum, bar, ranked[LANES];
    if (lanes == 32) {
        bar = kth_of_32(lane, k, &maximum);
    } else {
        maximum = row_max(lane, lanes);
        memcpy(ranked, lane, sizeof(float) * (size_t)lanes);
        bar = kth_largest(ranked, lanes, k);
    }
    for (int32_t i = 0; i < k; i++) {
        top[i] = LOWEST;
        index[i] = -1;
    }
#if defined(__AVX512F__)
    if (k <= 16 && gather_and_rank(s, n, bar, k, top, index)) return maximum;
#endif
    scan_from_bar(s, n, bar, k, top, index);
    return maximum;
}

static float span_sum(const float *s, int64_t a, int64_t b, float m) {
    float total = 0.0f;
    for (int64_t j = a; j < b; j++) total += exp2_nonpositive(s[j] - m);
    return total;
}

/* The statistics of one row s[0:n] into row r of the outputs (each may be NULL when not asked). */
static void one_row(const float *s, int64_t n, int64_t r, const int64_t *spans, int32_t n_spans, int32_t k,
                    float *entropy, float *mass, float *top_weight, int32_t *top_index) {
    float top[MAX_K];
    int32_t index[MAX_K];
    float m = k > 0 ? row_top(s, n, k, top, index) : row_max(s, n);
    float z = 0.0f, spread = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float x = s[j] - m;
        float p = exp2_nonpositive(x);
        z += p;
        spread += p * x;
    }
    if (entropy) {
        float h = 0.69314718f * (log2f(z) - spread / z);
        entropy[r] = h > 0.0f ? h : 0.0f;
    }
    for (int32_t i = 0; mass && i < n_spans; i++) {
        int64_t a = spans[2 * i] < 0 ? 0 : spans[2 * i], b = spans[2 * i + 1] < n ? spans[2 * i + 1] : n;
        mass[r * n_spans + i] = a < b ? span_sum(s, a, b, m) / z : 0.0f;
    }
    for (int32_t i = 0; i < k; i++) {
        top_weight[r * k + i] = exp2_nonpositive(top[i] - m) / z;
        top_index[r * k + i] = index[i];
    }
}

/* Rows [first, last) of a [rows, stride] logits array. Row r reads extent[r % period] keys (extent NULL: width).
   Outputs may be NULL when not asked: entropy [rows], mass [rows, n_spans], top_weight and top_index [rows, k]. */
void row_statistics(const float *logits, int64_t first, int64_t last, int64_t stride, int64_t width,
                    const int32_t *extent, int64_t period, const int64_t *spans, int32_t n_spans, int32_t k,
                    float *entropy, float *mass, float *top_weight, int32_t *top_index) {
    for (int64_t r = first; r < last; r++)
        one_row(logits + r * stride, extent ? extent[r % period] : width, r, spans, n_spans, k, entropy, mass,
                top_weight, top_index);
}

#define BLOCK 8 /* query rows whose logits are computed together (they share every loaded key vector) */
#define MASKED (-1.0e30f)

/* out[i][0:w] = q[i] . kt[:, 0:w] for the BLOCK rows (kt is [d, ld]); every row takes the same operations in the
   same order whatever the block, so a row's logits do not depend on how rows were split across calls. */
static void block_logits(const float *const q[BLOCK], int64_t d, const float *kt, int64_t ld, int64_t w,
                         float *const out[BLOCK]) {
#if defined(__AVX512F__)
    for (int64_t j = 0; j < w; j += 32) { /* two vectors of 16 keys: each broadcast query value feeds two FMAs */
        __mmask16 lo = w - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (w - j)) - 1u);
        __mmask16 hi = w - j >= 32 ? (__mmask16)0xFFFF : w - j <= 16 ? 0 : (__mmask16)((1u << (w - j - 16)) - 1u);
        __m512 a[BLOCK], b[BLOCK];
        for (int i = 0; i < BLOCK; i++) a[i] = b[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c++) {
            __m512 k0 = _mm512_maskz_loadu_ps(lo, kt + c * ld + j);
            __m512 k1 = _mm512_maskz_loadu_ps(hi, kt + c * ld + j + 16);
            for (int i = 0; i < BLOCK; i++) {
                __m512 qc = _mm512_set1_ps(q[i][c]);
                a[i] = _mm512_fmadd_ps(qc, k0, a[i]);
                b[i] = _mm512_fmadd_ps(qc, k1, b[i]);
            }
        }
        for (int i = 0; i < BLOCK; i++) {
            _mm512_mask_storeu_ps(out[i] + j, lo, a[i]);
            _mm512_mask_storeu_ps(out[i] + j + 16, hi, b[i]);
        }
    }
#else
    for (int i = 0; i < BLOCK; i++) {
        float *o = out[i];
        for (int64_t j = 0; j < w; j++) o[j] = 0.0f;
        for (int64_t c = 0; c < d; c++) {
            const float qc = q[i][c], *key = kt + c * ld;
            for (int64_t j = 0; j < w; j++) o[j] = fmaf(qc, key[j], o[j]);
        }
    }
#endif
}

/* The statistics of rows [first, last) of q ([heads * n_query, d], base-2 scaled) against kt ([heads / group, d,
   n_key]: query head h reads key head h / group, grouped-query attention), with no mask (causal: query i sees keys
   <= i + n_key - n_query); the logits are computed BLOCK rows at a time into a cache-resident scratch and never
   stored. A row that sees fewer than k keys (at least one) reads k, the
   extra ones masked; a row that sees none attends uniformly to every key. Returns 0, or -1 when out of memory. */
int qk_row_statistics(const float *q, const float *kt, int64_t first, int64_t last, int64_t n_query, int64_t n_key,
                      int64_t d, int64_t group, int32_t causal, const int64_t *spans, int32_t n_spans, int32_t k,
                      float *entropy, float *mass, float *top_weight, int32_t *top_index) {
    int64_t ld = (n_key + 15) / 16 * 16;
    float *scratch = malloc(sizeof(float) * (size_t)(ld * (BLOCK + 1)));
    if (!scratch) return -1;
    float *spare = scratch + BLOCK * ld; /* where the rows past the end of a partial block go */
    int64_t least = k > 1 ? (k < n_key ? k : n_key) : 1; /* keys read by a row that sees at least one */
    int64_t offset = n_key - n_query;
    for (int64_t r = first; r < last;) {
        int64_t head = r / n_query, row = r % n_query;
        int64_t rows = n_query - row < last - r ? n_query - row : last - r;
        rows = rows < BLOCK ? rows : BLOCK;
        const float *qs[BLOCK];
        float *outs[BLOCK];
        int64_t width = 0, seen[BLOCK], extent[BLOCK];
        for (int i = 0; i < BLOCK; i++) {
            int64_t at = i < rows ? i : rows - 1;
            qs[i] = q + (r + at) * d;
            outs[i] = i < rows ? scratch + i * ld : spare;
            seen[i] = causal ? row + at + offset + 1 : n_key;
            seen[i] = seen[i] > n_key ? n_key : seen[i];
            extent[i] = seen[i] < 1 ? n_key : (seen[i] > least ? seen[i] : least);
            width = extent[i] > width ? extent[i] : width;
        }
        block_logits(qs, d, kt + head / group * d * n_key, n_key, width, outs);
        for (int64_t i = 0; i < rows; i++) {
            float *s = outs[i];
            for (int64_t j = seen[i] > 0 ? seen[i] : 0; j < extent[i]; j++) s[j] = MASKED;
            one_row(s, extent[i], r + i, spans, n_spans, k, entropy, mass, top_weight, top_index);
        }
        r += rows;
    }
    free(scratch);
    return 0;
}
