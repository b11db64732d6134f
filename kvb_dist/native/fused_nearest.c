/* The k-means assignment for narrow heads, fused: for every query the nearest mean and the squared
 * distance |q|^2 + |m|^2 - 2 q.m to it, without writing the [queries, means] score matrix that a
 * GEMM would (for heads of dim 16 the GEMM's output traffic and the row argmin after it cost more
 * than the arithmetic).
 *
 * Queries go in blocks of one SIMD vector (transposed on the fly); means go KEYS_PER_STEP at a time
 * so that enough independent FMA chains are in flight. Plain C with GCC/Clang vector extensions;
 * kvb_dist/native/build.py compiles it with -O3 -march=native on first use and caches the library.
 *
 * Ties go to the smallest index, as torch.argmin: means are visited in increasing order and only a
 * strictly smaller score replaces the best so far.
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

static inline void keep_better(vfloat score, int32_t index, vfloat *best, vint *best_index) {
    vint better = score < *best;  /* all ones where strictly better */
    *best = (vfloat)(((vint)*best & ~better) | ((vint)score & better));
    *best_index = (*best_index & ~better) | (((vint){} + index) & better);
}

/* One block of LANES queries, transposed: block_t[d * LANES + lane]. */
static void nearest_in_block(const float *block_t, int64_t dim, const float *minus_two_means,
                             const float *means_sq, int64_t num_means, vfloat *best, vint *best_index) {
    *best = (vfloat){} + INFINITY;
    *best_index = (vint){};
    int64_t j = 0;
    for (; j + KEYS_PER_STEP <= num_means; j += KEYS_PER_STEP) {
        vfloat score[KEYS_PER_STEP];
        for (int u = 0; u < KEYS_PER_STEP; u++) score[u] = (vfloat){} + means_sq[j + u];
        for (int64_t d = 0; d < dim; d++) {
            vfloat q;
            memcpy(&q, block_t + d * LANES, sizeof q);
            for (int u = 0; u < KEYS_PER_STEP; u++) score[u] += minus_two_means[(j + u) * dim + d] * q;
        }
        for (int u = 0; u < KEYS_PER_STEP; u++) keep_better(score[u], (int32_t)(j + u), best, best_index);
    }
    for (; j < num_means; j++) {
        vfloat score = (vfloat){} + means_sq[j];
        for (int64_t d = 0; d < dim; d++) {
            vfloat q;
            memcpy(&q, block_t + d * LANES, sizeof q);
            score += minus_two_means[j * dim + d] * q;
        }
        keep_better(score, (int32_t)j, best, best_index);
    }
}

/* queries: n rows of dim float32, row i at queries + i * row_stride; minus_two_means [num_means, dim]
 * (-2 x the means) and means_sq [num_means] (their squared norms), float32 row-major.
 * Writes, where the pointer is not NULL: index [n] (int64) and distance [n] of every query's nearest
 * mean. Adds, where counts is not NULL (sums and sse then too): 1 to counts [num_means], the query
 * to sums [num_means, dim] and its distance (clamped at 0: it may round below) to *sse, in double.
 * Returns 0, or -1 when out of memory. */
int kvb_nearest_means(const float *queries, int64_t n, int64_t dim, int64_t row_stride,
                      const float *minus_two_means, const float *means_sq, int64_t num_means,
                      int64_t *index, float *distance, double *counts, double *sums, double *sse) {
    float *block_t = malloc(sizeof(float) * LANES * (size_t)dim);
    if (block_t == NULL) return -1;
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        int64_t rows = n - i0 < LANES ? n - i0 : LANES;
        float query_sq[LANES] = {0};
        for (int64_t d = 0; d < dim; d++)
            for (int lane = 0; lane < LANES; lane++) {
                float x = lane < rows ? queries[(i0 + lane) * row_stride + d] : 0.0f;
                block_t[d * LANES + lane] = x;
                query_sq[lane] += x * x;
            }
        vfloat best;
        vint best_index;
        nearest_in_block(block_t, dim, minus_two_means, means_sq, num_means, &best, &best_index);
        for (int lane = 0; lane < rows; lane++) {
            int64_t j = best_index[lane];
            float squared = query_sq[lane] + best[lane];
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
    free(block_t);
    return 0;
}
