/* The EMA step of a slice of codebooks in one pass over its state, dead-pair replacement included:
 * what kvb_dist.codebook's ema_update_ + reset_pairs_ do in torch with five passes over [c, j, k]
 * tensors plus masked gathers and writes (at the paper's size and dead-pair threshold, 70 % of the
 * pairs are replaced every step, and those passes cost more than the lookup).
 *
 * Per codebook, with hits given as (flat pair id, count, sum of the queries) rows sorted by id:
 *   cluster_size <- decay * cluster_size + (1 - decay) * count
 *   keys_avg     <- decay * keys_avg     + (1 - decay) * sum
 *   keys          = keys_avg / smoothed(cluster_size),  smoothed = (n + eps) / (N + J eps) * N
 * then every pair whose new cluster_size is below the threshold gets the head of query
 * wanted = (hash(seed, codebook, pair) >> 1) % num_queries of the global batch as its key, keys_avg
 * = key * threshold and cluster_size = threshold: the same counter-based draw as codebook.py's
 * counter_randint (splitmix64), so any split of codebooks over processes draws the same queries.
 */
#include <stdint.h>

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
 * keys, keys_avg [c, num_pairs, dim], cluster_size [c, num_pairs]. Hits: num_hits rows with flat
 * ids (c * num_pairs + pair) in ascending order (repeats allowed), hit_counts [num_hits], hit_sums
 * [num_hits, dim]; keep = 1 - decay (rounded once, by the caller, as torch's alpha). Replacement (threshold > 0): query q of codebook c at queries + q * query_stride +
 * c * codebook_stride. Returns the number of pairs replaced. */
int64_t kvb_ema_step(float *keys, float *keys_avg, float *cluster_size, int64_t num_codebooks, int64_t num_pairs,
                     int64_t dim, const int64_t *hit_ids, const float *hit_counts, const float *hit_sums,
                     int64_t num_hits, float decay, float keep, float eps, float threshold, int64_t replace_seed,
                     int64_t first_codebook, const float *queries, int64_t num_queries, int64_t query_stride,
                     int64_t codebook_stride) {
    int64_t replaced = 0, h = 0;
    float hit_sum[dim > 0 ? dim : 1];
    for (int64_t c = 0; c < num_codebooks; c++) {
        float *size = cluster_size + c * num_pairs;
        const int64_t first_hit = h, end = (c + 1) * num_pairs;
        while (h < num_hits && hit_ids[h] < end) h++;
        /* Rows of one pair are summed first (in order), then scaled: as a dense sum of the rows would be. */
        for (int64_t j = 0, next = first_hit; j < num_pairs; j++) {
            float count = 0.0f;
            for (; next < h && hit_ids[next] == c * num_pairs + j; next++) count += hit_counts[next];
            size[j] = size[j] * decay + keep * count;
        }
        double total = 0.0;
        for (int64_t j = 0; j < num_pairs; j++) total += size[j];
        const float norm = (float)(total / (total + num_pairs * (double)eps));
        for (int64_t j = 0, next = first_hit; j < num_pairs; j++) {
            float *avg = keys_avg + (c * num_pairs + j) * dim, *key = keys + (c * num_pairs + j) * dim;
            for (int64_t d = 0; d < dim; d++) hit_sum[d] = 0.0f;
            for (; next < h && hit_ids[next] == c * num_pairs + j; next++)
                for (int64_t d = 0; d < dim; d++) hit_sum[d] += hit_sums[next * dim + d];
            for (int64_t d = 0; d < dim; d++) avg[d] = avg[d] * decay + keep * hit_sum[d];
            if (threshold > 0.0f && size[j] < threshold) {
                uint64_t wanted = (pair_hash((uint64_t)replace_seed, (uint64_t)(first_codebook + c), (uint64_t)j) >> 1) %
                                  (uint64_t)num_queries;
                const float *query = queries + (int64_t)wanted * query_stride + c * codebook_stride;
                for (int64_t d = 0; d < dim; d++) key[d] = query[d], avg[d] = query[d] * threshold;
                size[j] = threshold;
                replaced++;
            } else {
                const float inverse = 1.0f / ((size[j] + eps) * norm);
                for (int64_t d = 0; d < dim; d++) key[d] = avg[d] * inverse;
            }
        }
    }
    return replaced;
}
