/* The keep rule (mobile/moe/rule.py) in one call, for a MoE layer on a CPU device.
 *
 * rule.py's torch ops are the definition, and they run everywhere else: on a GPU, inside the
 * segment's CUDA graph, and under torch.compile, fused. Run eagerly on a CPU, the same rule is
 * about twenty small ops, each paying torch's per-op overhead for a few dozen numbers, twice per
 * MoE layer and token (the plan's status, the op's pairs). Here it is one pass over the routes.
 *
 * The numbers are rule.py's, bit for bit (tests/test_keep_rule_kernel.py): a token's prefix sums
 * accumulate in double and round to float, as torch's CPU cumsum does; a token's total is its last
 * prefix sum (rule.py defines it so, since torch's sum adds in an order of its own); shares are
 * float divisions compared with tau as a float. Compiled with -ffp-contract=off: no fused
 * multiply-add changes a rounding.
 *
 * weights [T, K] float32, ids [T, K] int64 (a token's big set, in selection order), slot_map [E]
 * int64 (-1: not on the device). All contiguous. An id outside [0, E) is refused (-1), never read.
 */
#include <stdint.h>

enum { TOP = 0, SWITCH = 1, PREFIX = 2 };
enum { UNUSED = 0, FREE = 1, CACHED = 2, MISSING = 3 };

typedef struct {
    int32_t kind, n, cached, rescale;
    float tau;
} rule_t; /* RuleStruct in mobile/moe/rule_kernel.py */

/* One token's prefix sums of w [K] into cum [K]: double accumulation, float results. */
static void prefix_sums(const float *w, int K, float *cum) {
    double acc = 0.0;
    for (int k = 0; k < K; k++) {
        acc += w[k];
        cum[k] = (float)acc;
    }
}

/* keep [K] for one token, before the cached rule adds what the device holds (KeepRule.keep). */
static void keep_row(const rule_t *r, const float *w, int K, uint8_t *keep) {
    if (r->kind == TOP) {
        for (int k = 0; k < K; k++) keep[k] = k < r->n;
        return;
    }
    float cum[K];
    prefix_sums(w, K, cum);
    float total = cum[K - 1];
    if (r->kind == PREFIX) { /* up to the first rank whose share reaches tau (a NaN share never does) */
        int short_of = 0;
        for (int k = 0; k < K; k++) short_of += cum[k] / total < r->tau;
        for (int k = 0; k < K; k++) keep[k] = k < r->n || k <= short_of;
        return;
    }
    /* switch: the little set when its share reaches tau, else all K (an empty little set never
     * does; one of K or more is all K anyway) */
    int all = r->n < 1 || r->n > K || !(cum[r->n - 1] / total >= r->tau);
    for (int k = 0; k < K; k++) keep[k] = k < r->n || all;
}

static int ids_in_range(const int64_t *ids, int64_t n, int E) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= E) return 0;
    return 1;
}

/* KeepRule.status: each routed expert's highest code over the step's pairs, as entries code * E +
 * expert, descending, the first min(E, T*K) of them (unrouted experts are 0). Returns that count. */
int mobile_keep_status(const rule_t *r, const float *weights, const int64_t *ids, const int64_t *slot_map, int T,
                       int K, int E, int32_t *out) {
    if (!ids_in_range(ids, (int64_t)T * K, E)) return -1;
    int8_t code[E];
    for (int e = 0; e < E; e++) code[e] = -1; /* not routed */
    uint8_t keep[K];
    for (int t = 0; t < T; t++) {
        const float *w = weights + (int64_t)t * K;
        const int64_t *id = ids + (int64_t)t * K;
        keep_row(r, w, K, keep);
        for (int k = 0; k < K; k++) {
            int present = slot_map[id[k]] >= 0;
            int c = keep[k] ? MISSING - present : (r->cached ? present : UNUSED);
            if (c > code[id[k]]) code[id[k]] = (int8_t)c;
        }
    }
    /* entries of one code lie in [code * E, code * E + E): walking codes and experts downwards
     * lists them in descending order without a sort */
    int m = T * K < E ? T * K : E, i = 0;
    for (int c = MISSING; c >= UNUSED && i < m; c--)
        for (int e = E - 1; e >= 0 && i < m; e--)
            if (code[e] == c && c * E + e > 0) out[i++] = c * E + e;
    while (i < m) out[i++] = 0;
    return m;
}

/* KeepRule.pairs: the kept weights [T, K] (0 where dropped; rescale: the kept carry the big set's
 * total) and their slots [T, K] (-1 where dropped). */
int mobile_keep_pairs(const rule_t *r, const float *weights, const int64_t *ids, const int64_t *slot_map, int T,
                      int K, int E, float *kept, int64_t *slots) {
    if (!ids_in_range(ids, (int64_t)T * K, E)) return -1;
    uint8_t keep[K];
    float cum[K];
    for (int t = 0; t < T; t++) {
        const float *w = weights + (int64_t)t * K;
        const int64_t *id = ids + (int64_t)t * K;
        float *kw = kept + (int64_t)t * K;
        int64_t *ks = slots + (int64_t)t * K;
        keep_row(r, w, K, keep);
        for (int k = 0; k < K; k++) {
            int64_t slot = slot_map[id[k]];
            int kept_k = keep[k] || (r->cached && slot >= 0);
            kw[k] = kept_k ? w[k] : 0.0f;
            ks[k] = kept_k ? slot : -1;
        }
        if (r->rescale) {
            prefix_sums(w, K, cum);
            float total = cum[K - 1];
            prefix_sums(kw, K, cum);
            float factor = total / cum[K - 1];
            for (int k = 0; k < K; k++) kw[k] = kw[k] * factor;
        }
    }
    return 0;
}
