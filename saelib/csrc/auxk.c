/* AuxK's sparse code on the CPU, compiled by saelib/native.py: the top-k of each token's dead
 * pre-activations, the decode of the kept latents and its whole backward, one pass each.
 *
 * A token keeps k of the r dead latents (AuxK: 288 of 4608 at 25% dead, n 18432). The products
 * are bound by memory: each kept entry reads a 4 * d byte weight or token row. So the entries are
 * grouped by latent within blocks of T tokens, and each pass keeps one latent's rows in L1 while
 * the block's token rows stay in L2; the backward reads each token row once for all three of its
 * products (torch's ops read them three times, after sorting the entries twice).
 *
 *   saelib_select:   idx[b] = the k largest of pre[b, 0:r] (increasing columns), val = ReLU of them
 *   saelib_group:    per token block, the entries with val > 0 by latent (a counting sort)
 *   saelib_decode:   out[b] = sum of val * W[rows[idx]] over b's entries
 *   saelib_backward: dz = (W_dec[row] . g[b]) over the entries; adds val * g[b] into G_dec[row],
 *                    dz * xc[b] into G_enc[row] and dz into gb[row]
 *
 * saelib_select, saelib_group and saelib_backward return -1 when their scratch memory cannot be had
 * (what they write is then not to be read), which native.py turns into a MemoryError.
 *
 * Shapes: pre (B, ld) fp32 or bf16, of which the first r columns are the dead latents; idx (B, k)
 * int64 in [0, r); val, dz (B, k); rows (r,) int64, the latent of each column; W, G (n, d);
 * g, xc, out (B, d); gb (n,). Everything fp32 unless said, row-major and contiguous.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* ---- threads ------------------------------------------------------------------------------ */

#define MAX_THREADS 64

typedef struct {
    void (*fn)(void *ctx, int64_t lo, int64_t hi);
    void *ctx;
    int64_t lo, hi;
} task_t;

static void *run_task(void *arg) {
    task_t *t = (task_t *)arg;
    t->fn(t->ctx, t->lo, t->hi);
    return NULL;
}

/* fn over [0, n) in nthreads ranges: bounds[t] .. bounds[t + 1] when given, else equal ones */
static void parallel_for(int nthreads, int64_t n, const int64_t *bounds, void (*fn)(void *, int64_t, int64_t),
                         void *ctx) {
    nthreads = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    if (!bounds && n < nthreads) nthreads = n > 0 ? (int)n : 1; /* bounds may leave ranges empty */
    task_t tasks[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < nthreads; t++) {
        tasks[t] = (task_t){fn, ctx, bounds ? bounds[t] : n * t / nthreads, bounds ? bounds[t + 1] : n * (t + 1) / nthreads};
    }
    for (int t = 1; t < nthreads; t++) started[t] = pthread_create(&threads[t], NULL, run_task, &tasks[t]) == 0;
    run_task(&tasks[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(threads[t], NULL);
        else run_task(&tasks[t]); /* no thread to be had: run its share here */
    }
}

/* ---- select ------------------------------------------------------------------------------- */

/* the k-th largest of a[0:n] (1 <= k <= n; no NaN in a): a radix select over the order-preserving
 * integer keys of the floats, 11 + 11 + 10 bits, with no data-dependent branch. After fewer than
 * 3 passes: a value at most the k-th largest, within 2^-(passes * 11 - 9) of it relatively. */
static inline uint32_t key_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

static float kth_largest(const float *a, int64_t n, int64_t k, int passes) {
    static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    uint32_t prefix = 0, mask = 0, counts[1 << 11];
    int64_t need = k;
    for (int pass = 0; pass < passes; pass++) {
        const int shift = shifts[pass], bins = 1 << widths[pass];
        memset(counts, 0, sizeof(uint32_t) * bins);
        uint32_t top = 0;  /* the highest bin counted: the search down starts there */
        for (int64_t i = 0; i < n; i++) {
            const uint32_t key = key_of(a[i]), bin = (key >> shift) & (bins - 1), match = (key & mask) == prefix;
            counts[bin] += match;
            top = match && bin > top ? bin : top;
        }
        int bin = (int)top;
        for (; bin > 0 && counts[bin] < need; bin--) need -= counts[bin];
        prefix |= (uint32_t)bin << shift;
        mask |= (uint32_t)(bins - 1) << shift;
    }
    const uint32_t u = prefix ^ ((prefix & 0x80000000u) ? 0x80000000u : 0xFFFFFFFFu);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a bf16 row as fp32 */
static void widen(const uint16_t *p, int64_t r, float *out) {
    uint32_t *u = (uint32_t *)out;
    for (int64_t i = 0; i < r; i++) u[i] = (uint32_t)p[i] << 16;
}

/* every column of row[0:r] with its value, NaN as -inf */
static int64_t every_column(const float *row, int64_t r, float *vals, int32_t *cols) {
    for (int64_t i = 0; i < r; i++) {
        vals[i] = row[i] == row[i] ? row[i] : -INFINITY;
        cols[i] = (int32_t)i;
    }
    return r;
}

/* the columns of row[0:r] at or above thresh, in increasing order, with their values (never a NaN) */
static int64_t at_least(const float *row, int64_t r, float thresh, float *vals, int32_t *cols) {
    int64_t n = 0, i = 0;
#ifdef __AVX512F__
    const __m512 t = _mm512_set1_ps(thresh);
    __m512i c = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; i + 16 <= r; i += 16) {
        __m512 v = _mm512_loadu_ps(row + i);
        __mmask16 keep = _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ);
        /* compressed in registers, stored whole (a masked compress to memory is slow): up to 15 lanes
         * past the kept ones are scratch, which the buffers leave room for */
        _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(keep, v));
        _mm512_storeu_si512(cols + n, _mm512_maskz_compress_epi32(keep, c));
        n += __builtin_popcount(keep);
        c = _mm512_add_epi32(c, sixteen);
    }
#endif
    for (; i < r; i++) {
        vals[n] = row[i];
        cols[n] = (int32_t)i;
        n += row[i] >= thresh;
    }
    return n;
}

#define SAMPLE 512

typedef struct {
    const void *pre;
    int bf16;
    int64_t ld, r, k;
    int64_t *idx;
    float *val;
    int failed; /* set by a thread whose scratch memory could not be had */
} select_t;

static void select_rows(void *arg, int64_t lo, int64_t hi) {
    select_t *s = (select_t *)arg;
    const int64_t r = s->r, k = s->k;
    float *wide = malloc(sizeof(float) * (2 * r + 16 + SAMPLE));
    int32_t *cols = malloc(sizeof(int32_t) * (r + 16));
    int64_t *kept_idx = malloc(sizeof(int64_t) * (k + 1));  /* + 1: the branch-free loop writes one past */
    float *kept_val = malloc(sizeof(float) * (k + 1));
    if (!wide || !cols || !kept_idx || !kept_val) {
        __atomic_store_n(&s->failed, 1, __ATOMIC_RELAXED);
        free(wide);
        free(cols);
        free(kept_idx);
        free(kept_val);
        return;
    }
    float *vals = wide + r, *sample = vals + r + 16;
    /* a threshold from every step-th column: the sample's value of this rank leaves about
     * k + 3 standard deviations of the row's values at or above it */
    const int64_t step = (r + SAMPLE - 1) / SAMPLE, m = r / step; /* m <= SAMPLE */
    const double mean = (double)k * m / r;
    const int64_t rank = (int64_t)(mean + 3 * sqrt(mean)) + 1;
    for (int64_t b = lo; b < hi; b++) {
        const float *row = wide;
        if (s->bf16) widen((const uint16_t *)s->pre + b * s->ld, r, wide);
        else row = (const float *)s->pre + b * s->ld;
        int64_t n = 0;
        if (rank < m) {
            for (int64_t i = 0; i < m; i++) sample[i] = row[i * step] == row[i * step] ? row[i * step] : -INFINITY;
            n = at_least(row, r, kth_largest(sample, m, rank, 2), vals, cols);
        }
        if (n < k) n = every_column(row, r, vals, cols); /* the sample misled */
        /* keep the candidates above the k-th largest, then as many equal to it as fit */
        const float kth = kth_largest(vals, n, k, 3);
        int64_t ties = k, j = 0;
        for (int64_t i = 0; i < n; i++) ties -= vals[i] > kth;
        for (int64_t i = 0; i < n; i++) {  /* without branches: whether a value is kept is a coin toss */
            const int64_t tie = vals[i] == kth && ties > 0, keep = vals[i] > kth || tie;
            ties -= tie;
            kept_idx[j] = cols[i];
            kept_val[j] = vals[i] > 0 ? vals[i] : 0;
            j += keep;
        }
        memcpy(s->idx + b * k, kept_idx, sizeof(int64_t) * k);
        memcpy(s->val + b * k, kept_val, sizeof(float) * k);
    }
    free(wide);
    free(cols);
    free(kept_idx);
    free(kept_val);
}

int64_t saelib_select(const void *pre, int bf16, int64_t B, int64_t ld, int64_t r, int64_t k, int64_t *idx,
                      float *val, int nthreads) {
    select_t s = {pre, bf16, ld, r, k, idx, val, 0};
    parallel_for(nthreads, B, NULL, select_rows, &s);
    return s.failed ? -1 : 0;
}

/* ---- group -------------------------------------------------------------------------------- */

typedef struct {
    const int64_t *idx;
    const float *val;
    int64_t B, k, r, T;
    int32_t *start, *entries;
    const int64_t *offset;
    int failed; /* set by a thread whose scratch memory could not be had */
} group_t;

static void group_blocks(void *arg, int64_t lo, int64_t hi) {
    group_t *g = (group_t *)arg;
    const int64_t k = g->k, r = g->r;
    int32_t *fill = malloc(sizeof(int32_t) * r);
    if (!fill) {
        __atomic_store_n(&g->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int64_t blk = lo; blk < hi; blk++) {
        const int64_t p0 = blk * g->T * k, p1 = (blk + 1) * g->T < g->B ? (blk + 1) * g->T * k : g->B * k;
        int32_t *start = g->start + blk * (r + 1), *out = g->entries + g->offset[blk];
        memset(start, 0, sizeof(int32_t) * (r + 1));
        for (int64_t p = p0; p < p1; p++) start[g->idx[p] + 1] += g->val[p] > 0;
        for (int64_t i = 0; i < r; i++) start[i + 1] += start[i];
        memcpy(fill, start, sizeof(int32_t) * r);
        for (int64_t p = p0; p < p1; p++)
            if (g->val[p] > 0) out[fill[g->idx[p]]++] = (int32_t)(p - p0);
    }
    free(fill);
}

/* Per block of T tokens (blk): the entries of latent i are entries[offset[blk] + start[blk * (r + 1) + i]]
 * up to the next start, as positions b * k + j from the block's first token, b increasing; only the
 * entries with val > 0 (the others add nothing). start: n_blocks * (r + 1) slots, offset:
 * n_blocks + 1, entries: B * k. Returns the number of entries kept (-1: no scratch memory). */
int64_t saelib_group(const int64_t *idx, const float *val, int64_t B, int64_t k, int64_t r, int64_t T, int32_t *start,
                     int32_t *entries, int64_t *offset, int nthreads) {
    const int64_t n_blocks = (B + T - 1) / T;
    offset[0] = 0;
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        const int64_t p1 = (blk + 1) * T < B ? (blk + 1) * T * k : B * k;
        int64_t n = 0;
        for (int64_t p = blk * T * k; p < p1; p++) n += val[p] > 0;
        offset[blk + 1] = offset[blk] + n;
    }
    group_t g = {idx, val, B, k, r, T, start, entries, offset, 0};
    parallel_for(nthreads, n_blocks, NULL, group_blocks, &g);
    return g.failed ? -1 : offset[n_blocks];
}

/* ---- decode ------------------------------------------------------------------------------- */

typedef struct {
    const float *val, *W;
    const int64_t *rows;
    int64_t B, k, r, T, d;
    const int32_t *start, *entries;
    const int64_t *offset;
    float *out;
} decode_t;

static void decode_blocks(void *arg, int64_t lo, int64_t hi) {
    const decode_t *s = (const decode_t *)arg;
    const int64_t d = s->d, k = s->k;
    for (int64_t blk = lo; blk < hi; blk++) {
        const int64_t b0 = blk * s->T, b1 = b0 + s->T < s->B ? b0 + s->T : s->B;
        const int32_t *start = s->start + blk * (s->r + 1), *entries = s->entries + s->offset[blk];
        const float *val = s->val + b0 * k;
        float *out = s->out + b0 * d;
        memset(out, 0, sizeof(float) * (b1 - b0) * d);
        for (int64_t i = 0; i < s->r; i++) {
            const float *w = s->W + s->rows[i] * d;
            for (int32_t e = start[i]; e < start[i + 1]; e++) {
                const int32_t p = entries[e];
                const float v = val[p];
                float *o = out + (p / k) * d;
#pragma omp simd
                for (int64_t t = 0; t < d; t++) o[t] += v * w[t];
            }
        }
    }
}

/* out (B, d), overwritten: sum over the grouped entries of val * W[rows[idx]] */
void saelib_decode(const float *val, const float *W, const int64_t *rows, int64_t B, int64_t k, int64_t r, int64_t T,
                   int64_t d, const int32_t *start, const int32_t *entries, const int64_t *offset, float *out,
                   int nthreads) {
    decode_t s = {val, W, rows, B, k, r, T, d, start, entries, offset, out};
    parallel_for(nthreads, (B + T - 1) / T, NULL, decode_blocks, &s);
}

/* ---- backward ----------------------------------------------------------------------------- */

typedef struct {
    const float *val, *W_dec, *g, *xc;
    const int64_t *rows;
    int64_t B, k, r, T, d;
    const int32_t *start, *entries;
    const int64_t *offset;
    float *dz, *G_dec, *G_enc, *gb;
} backward_t;

static void backward_latents(void *arg, int64_t lo, int64_t hi) {
    const backward_t *s = (const backward_t *)arg;
    const int64_t d = s->d, k = s->k, n_blocks = (s->B + s->T - 1) / s->T;
    for (int64_t blk = 0; blk < n_blocks; blk++) {
        const int64_t b0 = blk * s->T;
        const int32_t *start = s->start + blk * (s->r + 1), *entries = s->entries + s->offset[blk];
        const float *val = s->val + b0 * k, *g = s->g + b0 * d, *xc = s->xc + b0 * d;
        float *dz = s->dz + b0 * k;
        for (int64_t i = lo; i < hi; i++) {
            if (start[i] == start[i + 1]) continue;
            const int64_t row = s->rows[i];
            const float *w = s->W_dec + row * d;
            float *gd = s->G_dec + row * d, *ge = s->G_enc + row * d, bias = 0;
            for (int32_t e = start[i]; e < start[i + 1]; e++) {
                const int32_t p = entries[e];
                const float *gr = g + (p / k) * d, *xr = xc + (p / k) * d, v = val[p];
                float dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int64_t t = 0; t < d; t++) {
                    dot += w[t] * gr[t];
                    gd[t] += v * gr[t];
                }
#pragma omp simd
                for (int64_t t = 0; t < d; t++) ge[t] += dot * xr[t];
                dz[p] = dot;
                bias += dot;
            }
            s->gb[row] += bias;
        }
    }
}

/* dz (B, k): the gradients of the grouped entries' values (the others are left as they are); adds
 * into the rows rows[i] of G_dec, G_enc and gb. Each thread owns a range of latents with about
 * equal entries, so no two write one row. */
int64_t saelib_backward(const float *val, const float *W_dec, const float *g, const float *xc, const int64_t *rows,
                        int64_t B, int64_t k, int64_t r, int64_t T, int64_t d, const int32_t *start,
                        const int32_t *entries, const int64_t *offset, float *dz, float *G_dec, float *G_enc,
                        float *gb, int nthreads) {
    backward_t s = {val, W_dec, g, xc, rows, B, k, r, T, d, start, entries, offset, dz, G_dec, G_enc, gb};
    nthreads = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    const int64_t n_blocks = (B + T - 1) / T, total = offset[n_blocks];
    int64_t bounds[MAX_THREADS + 1], t = 1, seen = 0;
    int64_t *count = calloc(r + 1, sizeof(int64_t));
    if (!count) return -1;
    for (int64_t blk = 0; blk < n_blocks; blk++)
        for (int64_t i = 0; i < r; i++) count[i] += start[blk * (r + 1) + i + 1] - start[blk * (r + 1) + i];
    bounds[0] = 0;
    for (int64_t i = 0; i < r && t < nthreads; i++) {
        seen += count[i];
        while (t < nthreads && seen * nthreads >= total * t) bounds[t++] = i + 1;
    }
    while (t <= nthreads) bounds[t++] = r;
    free(count);
    parallel_for(nthreads, r, bounds, backward_latents, &s);
    return 0;
}
