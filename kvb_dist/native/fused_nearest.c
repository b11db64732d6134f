/* Nearest keys (means) fused: for every query the index of the best key(s) and the squared distance
 * |q|^2 + |m|^2 - 2 q.m, without writing the [queries, keys] score matrix that a GEMM would (for
 * narrow heads, dim 14 or 16, the GEMM's output traffic and the row arg-min after it cost more than
 * the arithmetic). Two entry points share the inner loop:
 *   kvb_nearest_means: k-means assignment of one codebook, optionally accumulating counts and sums;
 *   kvb_nearest_keys:  the bottleneck's lookup over many codebooks, top-1 or top-t.
 *
 * Queries go in blocks of one SIMD vector (transposed on the fly), two blocks at a time for the
 * nearest key (each key weight loaded feeds two FMAs); keys go KEYS_PER_STEP at a time so that
 * enough independent FMA chains are in flight. Plain C with GCC/Clang vector extensions;
 * kvb_dist/native/build.py compiles it with -O3 -march=native on first use and caches the library.
 *
 * Ties go to the smallest index, as torch.argmin: keys are visited in increasing order and only a
 * strictly smaller score replaces (or, for top-t, goes before) one found earlier.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
#define KEYS_PER_STEP 8

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));

/* Half scores half_sq[j] - w[j] . q = (|q - w[j]|^2 - |q|^2) / 2 of `count` (<= KEYS_PER_STEP) keys from
 * j on, for the LANES queries of block_t[d * LANES + lane]: one FMA per key and dim, |w|^2 / 2 as
 * the start of each chain. */
static inline void score_keys(const float *block_t, int64_t dim, const float *w, const float *half_sq, int64_t j,
                              int count, vfloat *score) {
    if (count == KEYS_PER_STEP) {
        for (int u = 0; u < KEYS_PER_STEP; u++) score[u] = (vfloat){} + half_sq[j + u];
        for (int64_t d = 0; d < dim; d++) {
            vfloat q;
            memcpy(&q, block_t + d * LANES, sizeof q);
            for (int u = 0; u < KEYS_PER_STEP; u++) score[u] -= w[(j + u) * dim + d] * q;
        }
        return;
    }
    for (int u = 0; u < count; u++) score[u] = (vfloat){} + half_sq[j + u];
    for (int64_t d = 0; d < dim; d++) {
        vfloat q;
        memcpy(&q, block_t + d * LANES, sizeof q);
        for (int u = 0; u < count; u++) score[u] -= w[(j + u) * dim + d] * q;
    }
}

static inline void keep_better(vfloat score, int32_t index, vfloat *best, vint *best_index) {
    vint better = score < *best; /* all ones where strictly better: an earlier key keeps a tie */
    *best = (vfloat)(((vint)*best & ~better) | ((vint)score & better));
    *best_index = (*best_index & ~better) | (((vint){} + index) & better);
}

static inline vfloat lane_min(vfloat a, vfloat b) {
#if defined(__AVX512F__)
    return (vfloat)_mm512_min_ps((__m512)a, (__m512)b);
#elif defined(__AVX2__)
    return (vfloat)_mm256_min_ps((__m256)a, (__m256)b);
#else
    vint a_less = a < b;
    return (vfloat)(((vint)a & a_less) | ((vint)b & ~a_less));
#endif
}

/* Whether any lane of a is strictly below b. */
static inline int any_less(vfloat a, vfloat b) {
#if defined(__AVX512F__)
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_LT_OQ) != 0;
#elif defined(__AVX2__)
    return _mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_LT_OQ)) != 0;
#else
    vint less = a < b;
    int any = 0;
    for (int lane = 0; lane < LANES; lane++) any |= less[lane];
    return any;
#endif
}

/* keep_better for a full step of keys j .. j + KEYS_PER_STEP - 1. Their scores are first reduced
 * to their lane-wise minimum (7 min, 1 compare): after the first keys a step rarely improves any
 * lane, and only then are the indices updated key by key (in key order, so ties still go to the
 * smaller index). */
_Static_assert(KEYS_PER_STEP == 8, "keep_better_of_step reduces 8 scores");
static inline void keep_better_of_step(const vfloat *score, int64_t j, vfloat *best, vint *best_index) {
    vfloat low = lane_min(lane_min(lane_min(score[0], score[1]), lane_min(score[2], score[3])),
                          lane_min(lane_min(score[4], score[5]), lane_min(score[6], score[7])));
    if (!any_less(low, *best)) return;
    for (int u = 0; u < KEYS_PER_STEP; u++) keep_better(score[u], (int32_t)(j + u), best, best_index);
}

/* The best key of every query in a block: best[lane] (half score) and best_index[lane]. */
static void nearest_in_block(const float *block_t, int64_t dim, const float *w, const float *half_sq,
                             int64_t num_keys, vfloat *best, vint *best_index) {
    *best = (vfloat){} + INFINITY;
    *best_index = (vint){};
    vfloat score[KEYS_PER_STEP];
    for (int64_t j = 0; j < num_keys; j += KEYS_PER_STEP) {
        int count = num_keys - j < KEYS_PER_STEP ? (int)(num_keys - j) : KEYS_PER_STEP;
        score_keys(block_t, dim, w, half_sq, j, count, score);
        if (count == KEYS_PER_STEP) {
            keep_better_of_step(score, j, best, best_index);
            continue;
        }
        for (int u = 0; u < count; u++) keep_better(score[u], (int32_t)(j + u), best, best_index);
    }
}

/* nearest_in_block for two blocks at once (2 x LANES queries: block_t and block_t + dim * LANES):
 * every key weight loaded feeds two FMAs, half the loads and loop overhead per FMA of one block. */
static void nearest_in_two_blocks(const float *block_t, int64_t dim, const float *w, const float *half_sq,
                                  int64_t num_keys, vfloat best[2], vint best_index[2]) {
    const float *block2_t = block_t + dim * LANES;
    best[0] = best[1] = (vfloat){} + INFINITY;
    best_index[0] = best_index[1] = (vint){};
    int64_t full = num_keys - num_keys % KEYS_PER_STEP;
    for (int64_t j = 0; j < full; j += KEYS_PER_STEP) {
        vfloat a[KEYS_PER_STEP], b[KEYS_PER_STEP];
        for (int u = 0; u < KEYS_PER_STEP; u++) a[u] = b[u] = (vfloat){} + half_sq[j + u];
        for (int64_t d = 0; d < dim; d++) {
            vfloat qa, qb;
            memcpy(&qa, block_t + d * LANES, sizeof qa);
            memcpy(&qb, block2_t + d * LANES, sizeof qb);
            for (int u = 0; u < KEYS_PER_STEP; u++) {
                a[u] -= w[(j + u) * dim + d] * qa;
                b[u] -= w[(j + u) * dim + d] * qb;
            }
        }
        keep_better_of_step(a, j, &best[0], &best_index[0]);
        keep_better_of_step(b, j, &best[1], &best_index[1]);
    }
    if (full < num_keys) {
        vfloat score[KEYS_PER_STEP];
        int count = (int)(num_keys - full);
        for (int half = 0; half < 2; half++) {
            score_keys(half ? block2_t : block_t, dim, w, half_sq, full, count, score);
            for (int u = 0; u < count; u++) keep_better(score[u], (int32_t)(full + u), &best[half], &best_index[half]);
        }
    }
}

/* The t best keys of every query in a block, ascending by score: top[lane * t + r], top_index alike.
 * A key enters only where it beats a lane's t-th best (rare after the first keys), by insertion. */
static void topk_in_block(const float *block_t, int64_t dim, const float *w, const float *half_sq,
                          int64_t num_keys, int64_t t, float *top, int64_t *top_index) {
    vfloat worst = (vfloat){} + INFINITY;
    for (int64_t r = 0; r < LANES * t; r++) top[r] = INFINITY, top_index[r] = 0;
    vfloat score[KEYS_PER_STEP];
    for (int64_t j = 0; j < num_keys; j += KEYS_PER_STEP) {
        int count = num_keys - j < KEYS_PER_STEP ? (int)(num_keys - j) : KEYS_PER_STEP;
        score_keys(block_t, dim, w, half_sq, j, count, score);
        for (int u = 0; u < count; u++) {
            vint enters = score[u] < worst;
            vint any = enters;
            int entered = 0;
            for (int lane = 0; lane < LANES; lane++) entered |= any[lane];
            if (!entered) continue;
            for (int lane = 0; lane < LANES; lane++) {
                if (!enters[lane]) continue;
                float s = score[u][lane];
                float *row = top + lane * t;
                int64_t *row_index = top_index + lane * t;
                int64_t p = t - 1;
                while (p > 0 && s < row[p - 1]) { /* equal scores stay ahead: smaller index first */
                    row[p] = row[p - 1];
                    row_index[p] = row_index[p - 1];
                    p--;
                }
                row[p] = s;
                row_index[p] = j + u;
                worst[lane] = row[t - 1];
            }
        }
    }
}

/* Transposes up to LANES rows of dim floats (row i at rows + i * row_stride) into block_t, zero padded;
 * their squared norms into query_sq. */
static void load_block(const float *rows, int64_t count, int64_t dim, int64_t row_stride, float *block_t,
                       float *query_sq) {
    for (int lane = 0; lane < LANES; lane++) query_sq[lane] = 0.0f;
    for (int64_t d = 0; d < dim; d++)
        for (int lane = 0; lane < LANES; lane++) {
            float x = lane < count ? rows[lane * row_stride + d] : 0.0f;
            block_t[d * LANES + lane] = x;
            query_sq[lane] += x * x;
        }
}

/* The nearest key of `count` (<= 2 x LANES) rows (row r at rows + r * row_stride): index[r], and the
 * squared distance distance[r]. Two full blocks go through nearest_in_two_blocks; block_t holds
 * 2 x LANES x dim floats. */
static void nearest_of_rows(const float *rows, int64_t count, int64_t dim, int64_t row_stride, const float *w,
                            const float *half_sq, int64_t num_keys, float *block_t, int64_t *index, float *distance) {
    float query_sq[2 * LANES];
    vfloat best[2];
    vint best_index[2];
    if (count == 2 * LANES) {
        load_block(rows, LANES, dim, row_stride, block_t, query_sq);
        load_block(rows + LANES * row_stride, LANES, dim, row_stride, block_t + dim * LANES, query_sq + LANES);
        nearest_in_two_blocks(block_t, dim, w, half_sq, num_keys, best, best_index);
    } else {
        for (int b = 0; b * LANES < count; b++) {
            int64_t in_block = count - b * LANES < LANES ? count - b * LANES : LANES;
            load_block(rows + b * LANES * row_stride, in_block, dim, row_stride, block_t, query_sq + b * LANES);
            nearest_in_block(block_t, dim, w, half_sq, num_keys, &best[b], &best_index[b]);
        }
    }
    for (int64_t r = 0; r < count; r++) {
        index[r] = best_index[r / LANES][r % LANES];
        distance[r] = query_sq[r] + 2.0f * best[r / LANES][r % LANES];
    }
}

/* Half squared norms [num_keys] of keys [num_keys, dim], +inf where excluded[j] (if not NULL). */
static void half_norms(const float *keys, int64_t num_keys, int64_t dim, const uint8_t *excluded, float *half_sq) {
    for (int64_t j = 0; j < num_keys; j++) {
        float norm = 0.0f;
        for (int64_t d = 0; d < dim; d++) norm += keys[j * dim + d] * keys[j * dim + d];
        half_sq[j] = excluded != NULL && excluded[j] ? INFINITY : 0.5f * norm;
    }
}

/* queries: n rows of dim float32, row i at queries + i * row_stride; means [num_means, dim] float32
 * row-major (their norms are computed here: 1 / n of the distance work, and no [num_means, dim]
 * copy such as -2 x means for the caller to make per batch).
 * Writes, where the pointer is not NULL: index [n] (int64) and distance [n] of every query's nearest
 * mean. Adds, where counts is not NULL (sums and sse then too): 1 to counts [num_means], the query
 * to sums [num_means, dim] and its distance (clamped at 0: it may round below) to *sse, in double.
 * Returns 0, or -1 when out of memory. */
int kvb_nearest_means(const float *queries, int64_t n, int64_t dim, int64_t row_stride, const float *means,
                      int64_t num_means, int64_t *index, float *distance, double *counts, double *sums, double *sse) {
    float *block_t = malloc(sizeof(float) * 2 * LANES * (size_t)dim);
    float *sq = malloc(sizeof(float) * (size_t)num_means);
    if (block_t == NULL || sq == NULL) {
        free(block_t), free(sq);
        return -1;
    }
    half_norms(means, num_means, dim, NULL, sq);
    for (int64_t i0 = 0; i0 < n; i0 += 2 * LANES) {
        int64_t rows = n - i0 < 2 * LANES ? n - i0 : 2 * LANES;
        int64_t nearest[2 * LANES];
        float squared[2 * LANES];
        nearest_of_rows(queries + i0 * row_stride, rows, dim, row_stride, means, sq, num_means, block_t, nearest, squared);
        for (int64_t r = 0; r < rows; r++) {
            int64_t j = nearest[r];
            if (index != NULL) index[i0 + r] = j;
            if (distance != NULL) distance[i0 + r] = squared[r];
            if (counts != NULL) {
                const float *query = queries + (i0 + r) * row_stride;
                counts[j] += 1.0;
                for (int64_t d = 0; d < dim; d++) sums[j * dim + d] += query[d];
                *sse += squared[r] > 0.0f ? squared[r] : 0.0f;
            }
        }
    }
    free(block_t), free(sq);
    return 0;
}

/* The bottleneck's lookup for codebooks 0 .. num_codebooks - 1: query i of codebook c at
 * queries + c * codebook_stride + i * row_stride (dim contiguous floats); keys [c, num_keys, dim]
 * contiguous; excluded [c, num_keys] (bytes, 1 = never fetch; NULL: none). Their squared norms are
 * computed here, per codebook: 1 / n of the distance work, and one pass over the keys fewer.
 * Writes the t nearest keys of every query, nearest first: index [c, n, t] (int64) and squared
 * distance [c, n, t]. Returns 0, or -1 when out of memory. */
int kvb_nearest_keys(const float *queries, int64_t num_codebooks, int64_t n, int64_t dim, int64_t codebook_stride,
                     int64_t row_stride, const float *keys, const uint8_t *excluded, int64_t num_keys, int64_t t,
                     int64_t *index, float *distance) {
    float *block_t = malloc(sizeof(float) * 2 * LANES * (size_t)dim);
    float *sq = malloc(sizeof(float) * (size_t)num_keys);
    float *top = t > 1 ? malloc(sizeof(float) * LANES * (size_t)t) : NULL;
    int64_t *top_index = t > 1 ? malloc(sizeof(int64_t) * LANES * (size_t)t) : NULL;
    if (block_t == NULL || sq == NULL || (t > 1 && (top == NULL || top_index == NULL))) {
        free(block_t), free(sq), free(top), free(top_index);
        return -1;
    }
    for (int64_t c = 0; c < num_codebooks; c++) {
        const float *w = keys + c * num_keys * dim;
        const float *codebook_queries = queries + c * codebook_stride;
        half_norms(w, num_keys, dim, excluded == NULL ? NULL : excluded + c * num_keys, sq);
        if (t == 1) {
            for (int64_t i0 = 0; i0 < n; i0 += 2 * LANES)
                nearest_of_rows(codebook_queries + i0 * row_stride, n - i0 < 2 * LANES ? n - i0 : 2 * LANES, dim,
                                row_stride, w, sq, num_keys, block_t, index + c * n + i0, distance + c * n + i0);
            continue;
        }
        for (int64_t i0 = 0; i0 < n; i0 += LANES) {
            int64_t rows = n - i0 < LANES ? n - i0 : LANES;
            float query_sq[LANES];
            load_block(codebook_queries + i0 * row_stride, rows, dim, row_stride, block_t, query_sq);
            int64_t *out_index = index + (c * n + i0) * t;
            float *out_distance = distance + (c * n + i0) * t;
            topk_in_block(block_t, dim, w, sq, num_keys, t, top, top_index);
            for (int lane = 0; lane < rows; lane++)
                for (int64_t r = 0; r < t; r++) {
                    out_index[lane * t + r] = top_index[lane * t + r];
                    out_distance[lane * t + r] = query_sq[lane] + 2.0f * top[lane * t + r];
                }
        }
    }
    free(block_t), free(sq), free(top), free(top_index);
    return 0;
}
