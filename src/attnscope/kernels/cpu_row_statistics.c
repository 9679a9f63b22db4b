/* Streaming attention statistics of rows of base-2 logits, in one fused pass per row (the CPU path of capture).

   For every row s[0:n] (n = the row's extent): m = max s, P = 2^(s - m), Z = sum P, and
     entropy (nats)   = ln 2 * (log2 Z - sum P (s - m) / Z)
     mass of [a, b)   = sum_{a <= j < b} P_j / Z
     top-k            = the k largest s (earliest index first among ties), with weights 2^(s - m) / Z.
   Masked logits are large negative numbers (-1e30): 2^(s - m) is exactly 0 for them.
   Built at first use by attnscope.kernels.cpu_rows with -O3 -march=native -ffast-math, so the loops below
   vectorise (logits must be finite). exp2 is a degree-5 polynomial after range reduction (relative error 2.5e-7). */

#include <math.h>
#include <stdint.h>
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
    float ranked[LANES];
    memcpy(ranked, lane, sizeof(float) * (size_t)lanes);
    float maximum = row_max(lane, lanes), bar = kth_largest(ranked, lanes, k);
    for (int32_t i = 0; i < k; i++) {
        top[i] = LOWEST;
        index[i] = -1;
    }
    scan_from_bar(s, n, bar, k, top, index);
    return maximum;
}

static float span_sum(const float *s, int64_t a, int64_t b, float m) {
    float total = 0.0f;
    for (int64_t j = a; j < b; j++) total += exp2_nonpositive(s[j] - m);
    return total;
}

/* Rows [first, last) of a [rows, stride] logits array. Row r reads extent[r % period] keys (extent NULL: width).
   Outputs may be NULL when not asked: entropy [rows], mass [rows, n_spans], top_weight and top_index [rows, k]. */
void row_statistics(const float *logits, int64_t first, int64_t last, int64_t stride, int64_t width,
                    const int32_t *extent, int64_t period, const int64_t *spans, int32_t n_spans, int32_t k,
                    float *entropy, float *mass, float *top_weight, int32_t *top_index) {
    float top[MAX_K];
    int32_t index[MAX_K];
    for (int64_t r = first; r < last; r++) {
        const float *s = logits + r * stride;
        int64_t n = extent ? extent[r % period] : width;
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
}
