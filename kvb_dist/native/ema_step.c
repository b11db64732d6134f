/* The EMA step of a slice of codebooks, one codebook at a time (its state stays in the cache
 * between the passes over it), dead-pair replacement included:
 * what kvb_dist.codebook's ema_update_ + reset_pairs_ do in torch with five passes over [c, j, k]
 * tensors plus masked gathers and writes (at the paper's size and dead-pair threshold, 70 % of the
 * pairs are replaced every step, and those passes cost more than the lookup).
 *
 * Per codebook, with count and sum the number and the sum of the batch's queries that chose a pair:
 *   cluster_size <- decay * cluster_size + (1 - decay) * count
 *   keys_avg     <- decay * keys_avg     + (1 - decay) * sum
 *   keys          = keys_avg / smoothed(cluster_size),  smoothed = (n + eps) / (N + J eps) * N
 * then every pair whose new cluster_size is below the threshold gets the head of query
 * wanted = (hash(seed, codebook, pair) >> 1) % num_queries of the global batch as its key, keys_avg
 * = key * threshold and cluster_size = threshold: the same counter-based draw as codebook.py's
 * counter_randint (splitmix64), so any split of codebooks over processes draws the same queries.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ull, MIX1 = 0xBF58476D1CE4E5B9ull, MIX2 = 0x94D049BB133111EBull;
static const uint64_t STRIDE0 = 0xD6E8FEB86659FD93ull, STRIDE1 = 0xA0761D6478BD642Full;

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= MIX1;
    x ^= x >> 27;
    x *= MIX2;
    return x ^ (x >> 31);
}

/* codebook.counter_hash(seed, codebook, pair) */
static inline uint64_t pair_hash(uint64_t seed, uint64_t codebook, uint64_t pair) {
    uint64_t x = mix64(seed + GOLDEN);
    x = mix64(x + codebook * STRIDE0);
    return mix64(x + pair * STRIDE1);
}

/* State of codebooks 0 .. num_codebooks - 1 (global ids first_codebook ..), contiguous:
 * keys, keys_avg [c, num_pairs, dim], cluster_size [c, num_pairs]. The global batch: query i of
 * codebook c (dim contiguous floats) at queries + i * query_stride + c * query_codebook_stride, the
 * pair it chose at indices[i * index_stride + c * index_codebook_stride]. keep = 1 - decay (rounded
 * once, by the caller, as torch's alpha). A pair's queries are summed in batch order, so any split
 * of the batch over processes, gathered in order, gives the same sums bit for bit. Replacement:
 * threshold > 0. Returns the number of pairs replaced, or -1 when out of memory. */
int64_t kvb_ema_step(float *keys, float *keys_avg, float *cluster_size, int64_t num_codebooks, int64_t num_pairs,
                     int64_t dim, const float *queries, int64_t num_queries, int64_t query_stride,
                     int64_t query_codebook_stride, const int64_t *indices, int64_t index_stride,
                     int64_t index_codebook_stride, float decay, float keep, float eps, float threshold,
                     int64_t replace_seed, int64_t first_codebook) {
    /* One codebook's statistics, dense ([pairs] counts, [pairs, dim] sums; then per pair the
     * 1 / smoothed size in count, and in wanted the query a dead pair takes, or -1), so that the
     * passes over its state are plain loops over contiguous floats. */
    float *count = malloc(sizeof(float) * (size_t)num_pairs);
    float *sum = malloc(sizeof(float) * (size_t)(num_pairs * dim));
    int64_t *wanted = malloc(sizeof(int64_t) * (size_t)num_pairs);
    if (count == NULL || sum == NULL || wanted == NULL) {
        free(count), free(sum), free(wanted);
        return -1;
    }
    const int64_t width = num_pairs * dim;
    int64_t replaced = 0;
    for (int64_t c = 0; c < num_codebooks; c++) {
        float *size = cluster_size + c * num_pairs, *avg = keys_avg + c * width, *key = keys + c * width;
        const float *codebook_queries = queries + c * query_codebook_stride;
        memset(count, 0, sizeof(float) * (size_t)num_pairs);
        memset(sum, 0, sizeof(float) * (size_t)width);
        for (int64_t i = 0; i < num_queries; i++) {
            const int64_t j = indices[i * index_stride + c * index_codebook_stride];
            const float *query = codebook_queries + i * query_stride;
            count[j] += 1.0f;
            for (int64_t d = 0; d < dim; d++) sum[j * dim + d] += query[d];
        }
        double total = 0.0;
        for (int64_t j = 0; j < num_pairs; j++) {
            size[j] = size[j] * decay + keep * count[j];
            total += size[j];
        }
        const float norm = (float)(total / (total + num_pairs * (double)eps));
        for (int64_t j = 0; j < num_pairs; j++) {
            wanted[j] = -1;
            count[j] = 1.0f / ((size[j] + eps) * norm);
            if (threshold > 0.0f && size[j] < threshold) {
                uint64_t hash = pair_hash((uint64_t)replace_seed, (uint64_t)(first_codebook + c), (uint64_t)j);
                wanted[j] = (int64_t)((hash >> 1) % (uint64_t)num_queries);
                size[j] = threshold;
                replaced++;
            }
        }
        /* keys_avg, then keys: one stream of the large state at a time, as flat loops (they
         * vectorize); dead pairs are fixed up right after each, in lines still in the cache.
         * Both streams in one loop over the pairs ran 5x slower where the two tensors lie a
         * multiple of 256 MiB apart (measured here). */
        for (int64_t e = 0; e < width; e++) avg[e] = avg[e] * decay + keep * sum[e];
        for (int64_t j = 0; j < num_pairs; j++) {
            if (wanted[j] < 0) continue;
            const float *query = codebook_queries + wanted[j] * query_stride;
            for (int64_t d = 0; d < dim; d++) avg[j * dim + d] = query[d] * threshold;
        }
        for (int64_t j = 0; j < num_pairs; j++)
            for (int64_t d = 0; d < dim; d++) sum[j * dim + d] = count[j]; /* 1 / smoothed size, per element */
        for (int64_t e = 0; e < width; e++) key[e] = avg[e] * sum[e];
        for (int64_t j = 0; j < num_pairs; j++) {
            if (wanted[j] < 0) continue;
            const float *query = codebook_queries + wanted[j] * query_stride;
            for (int64_t d = 0; d < dim; d++) key[j * dim + d] = query[d];
        }
    }
    free(count), free(sum), free(wanted);
    return replaced;
}
