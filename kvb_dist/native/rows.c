/* The dense gradient of the bottleneck's values: zeros [num_rows, row_len] plus the fetched rows'
 * gradients.
 *
 * The dense gradient of the values is a fresh [c * j, v] tensor every step (42 MB at the paper's
 * size) of which only the batch's rows are not zero. Filling it costs more than the arithmetic:
 * a fresh allocation of that size is new memory from the kernel, one page fault per 4 KiB on first
 * touch. On Linux the buffer is first advised to use transparent huge pages (one fault per 2 MiB,
 * where the system allows it); the rows are then added in batch order, as index_add_ does, so the
 * result is the same bit for bit, and deterministic.
 */
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Zeroes out [num_rows, row_len], a fresh buffer not touched yet. */
void kvb_zero_fresh(float *out, int64_t num_rows, int64_t row_len) {
    size_t bytes = sizeof(float) * (size_t)num_rows * (size_t)row_len;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t first = ((uintptr_t)out + huge - 1) & ~(huge - 1), last = ((uintptr_t)out + bytes) & ~(huge - 1);
    if (last > first) madvise((void *)first, last - first, MADV_HUGEPAGE); /* advice: a refusal changes nothing */
#endif
    memset(out, 0, bytes);
}

/* out[indices[r]] += rows[r] for r = 0 .. n - 1, in that order. */
void kvb_add_rows(float *out, int64_t row_len, const int64_t *indices, const float *rows, int64_t n) {
    for (int64_t r = 0; r < n; r++) {
        float *target = out + indices[r] * row_len;
        const float *row = rows + r * row_len;
        for (int64_t d = 0; d < row_len; d++) target[d] += row[d];
    }
}
