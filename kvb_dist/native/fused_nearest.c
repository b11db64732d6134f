/* Nearest keys (means) fused: for every query the index of the best key(s) and the squared distance
 * |q|^2 + |m|^2 - 2 q.m, without writing the [queries, keys] score matrix that a GEMM would (for
 * narrow heads, dim 14 or 16, the GEMM's output traffic and the row arg-min after it cost more than
 * the arithmetic). Two entry points share the inner loop:
 *   kvb_nearest_means: k-means assignment of one codebook, optionally accumulating counts and sums;
 *   kvb_nearest_keys:  the bottleneck's lookup over many codebooks, top-1 or top-t.
 *
 * Queries go in blocks of one SIMD vector (transposed on the fly); keys go KEYS_PER_STEP at a time
 * so that enough independent FMA chains are in flight. Plain C with GCC/Clang vector extensions;
 * kvb_dist/native/build.py compiles it with -O3 -march=native on first use and caches the library.
 *
 * Ties go to the smallest index, as torch.argmin: keys are visited in increasing order and only a
 * strictly smaller score replaces (or, for top-t, goes before) one found earlier.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* The best key of every query in a block: best[lane] (half score) and best_index[lane]. */
static void nearest_in_block(const float *block_t, int64_t dim, const float *w, const float *half_sq,
                             int64_t num_keys, vfloat *best, vint *best_index) {
    *best = (vfloat){} + INFINITY;
    *best_index = (vint){};
    vfloat score[KEYS_PER_STEP];
    for (int64_t j = 0; j < num_keys; j += KEYS_PER_STEP) {
        int count = num_keys - j < KEYS_PER_STEP ? (int)(num_keys - j) : KEYS_PER_STEP;
        score_keys(block_t, dim, w, half_sq, j, count, score);
        for (int u = 0; u < count; u++) keep_better(score[u], (int32_t)(j + u), best, best_index);
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
    float *block_t = malloc(sizeof(float) * LANES * (size_t)dim);
    float *sq = malloc(sizeof(float) * (size_t)num_means);
    if (block_t == NULL || sq == NULL) {
        free(block_t), free(sq);
        return -1;
    }
    half_norms(means, num_means, dim, NULL, sq);
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        int64_t rows = n - i0 < LANES ? n - i0 : LANES;
        float query_sq[LANES];
        load_block(queries + i0 * row_stride, rows, dim, row_stride, block_t, query_sq);
        vfloat best;
        vint best_index;
        nearest_in_block(block_t, dim, means, sq, num_means, &best, &best_index);
        for (int lane = 0; lane < rows; lane++) {
            int64_t j = best_index[lane];
            float squared = query_sq[lane] + 2.0f * best[lane];
            if (index != NULL) index[i0 + lane] = j;
            if (distance != NULL) distance[i0 + lane] = squared;
            if (counts != NULL) {
                const float *query = queries + (i0 + lane) * row_stride;
                counts[j] += 1.0;
                for (int64_t d = 0; d < dim; d++) sums[j * dim + d] += query[d];
                *sse += squared > 0.0f ? squared : 0.0f;
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
    float *block_t = malloc(sizeof(float) * LANES * (size_t)dim);
    float *sq = malloc(sizeof(float) * (size_t)num_keys);
    float *top = t > 1 ? malloc(sizeof(float) * LANES * (size_t)t) : NULL;
    int64_t *top_index = t > 1 ? malloc(sizeof(int64_t) * LANES * (size_t)t) : NULL;
    if (block_t == NULL || sq == NULL || (t > 1 && (top == NULL || top_index == NULL))) {
        free(block_t), free(sq), free(top), free(top_index);
        return -1;
    }
    for (int64_t c = 0; c < num_codebooks; c++) {
        const float *w = keys + c * num_keys * dim;
        half_norms(w, num_keys, dim, excluded == NULL ? NULL : excluded + c * num_keys, sq);
        for (int64_t i0 = 0; i0 < n; i0 += LANES) {
            int64_t rows = n - i0 < LANES ? n - i0 : LANES;
            float query_sq[LANES];
            load_block(queries + c * codebook_stride + i0 * row_stride, rows, dim, row_stride, block_t, query_sq);
            int64_t *out_index = index + (c * n + i0) * t;
            float *out_distance = distance + (c * n + i0) * t;
            if (t == 1) {
                vfloat best;
                vint best_index;
                nearest_in_block(block_t, dim, w, sq, num_keys, &best, &best_index);
                for (int lane = 0; lane < rows; lane++) {
                    out_index[lane] = best_index[lane];
                    out_distance[lane] = query_sq[lane] + 2.0f * best[lane];
                }
            } else {
                topk_in_block(block_t, dim, w, sq, num_keys, t, top, top_index);
                for (int lane = 0; lane < rows; lane++)
                    for (int64_t r = 0; r < t; r++) {
                        out_index[lane * t + r] = top_index[lane * t + r];
                        out_distance[lane * t + r] = query_sq[lane] + 2.0f * top[lane * t + r];
                    }
            }
        }
    }
    free(block_t), free(sq), free(top), free(top_index);
    return 0;
}
