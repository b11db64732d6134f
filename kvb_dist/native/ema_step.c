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
 *
 * kvb_ema_step takes the pairs the global batch chose; kvb_lookup_ema_step, for a process that
 * holds the whole batch of its codebooks, finds them itself (kvb_nearest_keys, top-1) right before
 * each codebook's EMA step, which then writes keys that the lookup has just brought into the cache.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static const uint64_t GOLDEN = 0x9E3779B97F4A7C15ull, MIX1 = 0xBF58476D1CE4E5B9ull, MIX2 = 0x94D049BB133111EBull;
static const uint64_t STRIDE0 = 0xD6E8FEB86659FD93ull, STRIDE1 = 0xA0761D6478BD642Full;

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= MIX1;
    x ^= x >> 27;
    x *= MIX2;
    return x ^ (x >> 31);
}

/* codebook.counter_hash(seed, codebook, pair) = pair_hash(codebook_hash(seed, codebook), pair): the
 * first two rounds are the same for all pairs of a codebook. */
static inline uint64_t codebook_hash(uint64_t seed, uint64_t codebook) {
    return mix64(mix64(seed + GOLDEN) + codebook * STRIDE0);
}

static inline uint64_t pair_hash(uint64_t codebook_hash, uint64_t pair) { return mix64(codebook_hash + pair * STRIDE1); }

/* dst[d] = src[d] * factor for d < dim: a pair's key from its keys_avg row (rows of dim floats
 * are not aligned to vectors; AVX-512 masks the tail instead of a scalar loop). */
static inline void scale_row(float *dst, const float *src, float factor, int64_t dim) {
#if defined(__AVX512F__)
    const __m512 f = _mm512_set1_ps(factor);
    for (int64_t d = 0; d < dim; d += 16) {
        const __mmask16 m = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
        _mm512_mask_storeu_ps(dst + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + d), f));
    }
#else
    for (int64_t d = 0; d < dim; d++) dst[d] = src[d] * factor;
#endif
}

/* One codebook's workspace. The batch touches at most num_queries of the pairs, so its sums are
 * kept per touched pair (slot[j]: the row of pair j in sum, or -1; pair[s]: the pair of row s):
 * no pass over [pairs, dim] zeroes them. count [pairs] holds the batch's counts, then per pair
 * the 1 / smoothed size; wanted [pairs] the query a dead pair takes, or -1. */
typedef struct {
    float *count, *sum;
    int64_t *slot, *pair, *wanted;
} workspace;

static void workspace_free(workspace *w) { free(w->count), free(w->sum), free(w->slot), free(w->pair), free(w->wanted); }

/* 0 when out of memory (nothing left allocated). */
static int workspace_alloc(workspace *w, int64_t num_pairs, int64_t dim, int64_t num_queries) {
    const int64_t rows = num_queries < num_pairs ? num_queries : num_pairs;
    w->count = malloc(sizeof(float) * (size_t)num_pairs);
    w->sum = malloc(sizeof(float) * (size_t)(rows * dim + 1));
    w->slot = malloc(sizeof(int64_t) * (size_t)num_pairs);
    w->pair = malloc(sizeof(int64_t) * (size_t)(rows + 1));
    w->wanted = malloc(sizeof(int64_t) * (size_t)num_pairs);
    if (w->count == NULL || w->sum == NULL || w->slot == NULL || w->pair == NULL || w->wanted == NULL) {
        workspace_free(w);
        return 0;
    }
    for (int64_t j = 0; j < num_pairs; j++) w->slot[j] = -1;
    return 1;
}

/* The EMA step of one codebook (global id codebook_id): state key, avg [num_pairs, dim] and size
 * [num_pairs]; query i at queries + i * query_stride, the pair it chose at indices[i * index_stride].
 * Returns the number of pairs replaced. */
static int64_t ema_codebook(float *key, float *avg, float *size, int64_t num_pairs, int64_t dim, const float *queries,
                            int64_t num_queries, int64_t query_stride, const int64_t *indices, int64_t index_stride,
                            float decay, float keep, float eps, float threshold, int64_t replace_seed,
                            int64_t codebook_id, workspace *w) {
    float *count = w->count, *sum = w->sum;
    int64_t *slot = w->slot, *pair = w->pair, *wanted = w->wanted;
    int64_t touched = 0, replaced = 0;
    memset(count, 0, sizeof(float) * (size_t)num_pairs);
    for (int64_t i = 0; i < num_queries; i++) {
        const int64_t j = indices[i * index_stride];
        const float *query = queries + i * query_stride;
        if (slot[j] < 0) {
            slot[j] = touched, pair[touched] = j;
            memset(sum + touched * dim, 0, sizeof(float) * (size_t)dim);
            touched++;
        }
        float *row = sum + slot[j] * dim;
        count[j] += 1.0f;
        for (int64_t d = 0; d < dim; d++) row[d] += query[d];
    }
    double total = 0.0;
    for (int64_t j = 0; j < num_pairs; j++) {
        size[j] = size[j] * decay + keep * count[j];
        total += size[j];
    }
    const float norm = (float)(total / (total + num_pairs * (double)eps));
    const uint64_t hash_of_codebook = codebook_hash((uint64_t)replace_seed, (uint64_t)codebook_id);
    const int power_of_two = (num_queries & (num_queries - 1)) == 0;
    for (int64_t j = 0; j < num_pairs; j++) {
        wanted[j] = -1;
        count[j] = 1.0f / ((size[j] + eps) * norm);
        if (threshold > 0.0f && num_queries > 0 && size[j] < threshold) { /* no heads: nothing to take */
            const uint64_t draw = pair_hash(hash_of_codebook, (uint64_t)j) >> 1;
            wanted[j] = (int64_t)(power_of_two ? draw & (uint64_t)(num_queries - 1) : draw % (uint64_t)num_queries);
            size[j] = threshold;
            replaced++;
        }
    }
    /* keys_avg <- decay keys_avg + keep sum: the touched rows first (into their sum rows), then one
     * flat pass (it vectorizes) with a zero sum, then the touched rows back and the dead rows. */
    for (int64_t s = 0; s < touched; s++) {
        const float *old = avg + pair[s] * dim;
        float *row = sum + s * dim;
        for (int64_t d = 0; d < dim; d++) row[d] = old[d] * decay + keep * row[d];
    }
    const int64_t width = num_pairs * dim;
    const float no_sum = 0.0f;
    for (int64_t e = 0; e < width; e++) avg[e] = avg[e] * decay + keep * no_sum;
    for (int64_t s = 0; s < touched; s++) {
        memcpy(avg + pair[s] * dim, sum + s * dim, sizeof(float) * (size_t)dim);
        slot[pair[s]] = -1;
    }
    for (int64_t j = 0; j < num_pairs; j++) {
        if (wanted[j] < 0) continue;
        const float *query = queries + wanted[j] * query_stride;
        for (int64_t d = 0; d < dim; d++) avg[j * dim + d] = query[d] * threshold;
    }
    /* keys = keys_avg / smoothed size, the head itself for a dead pair: a second stream, after the
     * first (both streams in one loop ran 5x slower where the two tensors lie a multiple of
     * 256 MiB apart, measured here). */
    for (int64_t j = 0; j < num_pairs; j++) {
        if (wanted[j] < 0)
            scale_row(key + j * dim, avg + j * dim, count[j], dim);
        else
            memcpy(key + j * dim, queries + wanted[j] * query_stride, sizeof(float) * (size_t)dim);
    }
    return replaced;
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
    workspace w;
    if (!workspace_alloc(&w, num_pairs, dim, num_queries)) return -1;
    const int64_t width = num_pairs * dim;
    int64_t replaced = 0;
    for (int64_t c = 0; c < num_codebooks; c++)
        replaced += ema_codebook(keys + c * width, keys_avg + c * width, cluster_size + c * num_pairs, num_pairs, dim,
                                 queries + c * query_codebook_stride, num_queries, query_stride,
                                 indices + c * index_codebook_stride, index_stride, decay, keep, eps, threshold,
                                 replace_seed, first_codebook + c, &w);
    workspace_free(&w);
    return replaced;
}

int kvb_nearest_keys(const float *queries, int64_t num_codebooks, int64_t n, int64_t dim, int64_t codebook_stride,
                     int64_t row_stride, const float *keys, const uint8_t *excluded, int64_t num_keys, int64_t t,
                     int64_t *index, float *distance);

/* The lookup (top-1, nothing excluded) and then the EMA step, codebook by codebook, where the
 * queries of these codebooks are the whole global batch (one holder): the EMA then finds the
 * codebook's keys in the cache, where the lookup left them, instead of streaming all keys twice.
 * Arguments as kvb_ema_step's; writes index [c, num_queries] (int64) and distance [c, num_queries]
 * (squared) as kvb_nearest_keys does. Returns the number of pairs replaced, or -1 when out of memory. */
int64_t kvb_lookup_ema_step(float *keys, float *keys_avg, float *cluster_size, int64_t num_codebooks,
                            int64_t num_pairs, int64_t dim, const float *queries, int64_t num_queries,
                            int64_t query_stride, int64_t query_codebook_stride, int64_t *index, float *distance,
                            float decay, float keep, float eps, float threshold, int64_t replace_seed,
                            int64_t first_codebook) {
    workspace w;
    if (!workspace_alloc(&w, num_pairs, dim, num_queries)) return -1;
    const int64_t width = num_pairs * dim;
    int64_t replaced = 0;
    for (int64_t c = 0; c < num_codebooks; c++) {
        const float *codebook_queries = queries + c * query_codebook_stride;
        if (kvb_nearest_keys(codebook_queries, 1, num_queries, dim, query_codebook_stride, query_stride,
                             keys + c * width, NULL, num_pairs, 1, index + c * num_queries,
                             distance + c * num_queries) != 0) {
            replaced = -1;
            break;
        }
        replaced += ema_codebook(keys + c * width, keys_avg + c * width, cluster_size + c * num_pairs, num_pairs, dim,
                                 codebook_queries, num_queries, query_stride, index + c * num_queries, 1, decay,
                                 keep, eps, threshold, replace_seed, first_codebook + c, &w);
    }
    workspace_free(&w);
    return replaced;
}
