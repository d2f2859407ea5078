/* The host expert kernel: a MoE layer's host-placed (token, expert) pairs, computed on the CPU
 * straight from the host store's rows, with no dequantized copy in memory.
 *
 * A row is mobile's expert row (mobile/moe/quant.py): gate_up [H, 2I] then down [I, H], input-
 * major, native (float32 or bfloat16) or packed (int8: q * scale; int4: (q - zero) * scale, two
 * input rows per byte, low nibble first; float16 scale and zero per group of G input rows and
 * output column), biases after the matrices where the experts have them.
 *
 * Input-major rows are read in memory order: y[o] = sum_i x[i] * W[i, o] goes down the input rows,
 * each row adding x[i] times it to the sums of all output columns, which stay in L1. A packed group
 * is summed with the raw codes and scaled once: y[o] += scale[g, o] * (sum_i x[i] * q[i, o] -
 * zero[g, o] * sum_i x[i]), so the inner loop is a widen, a convert and an FMA per eight weights.
 * Activations stay float32: quantizing them (as llama.cpp's integer dot products do) would no
 * longer give the device's numbers.
 *
 * One call does a layer's pairs: gate_up for every pair, the activation, down for every pair, then
 * each token's weighted sum in its pairs' order. Each matrix is cut into chunks of input rows
 * (contiguous bytes), shared out over OpenMP threads, and the chunks' partial sums are added in
 * order. AVX2, FMA and F16C; mobile/moe/host.py compiles it on first use.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };
enum { SWIGLU = 0, CLAMPED_SWIGLU = 1, GEGLU = 2 };
enum { GU_Q, GU_SCALE, GU_ZERO, D_Q, D_SCALE, D_ZERO, GU_BIAS, D_BIAS, SECTIONS };

#ifndef CHUNK
#define CHUNK 256 /* input rows per work item, rounded up to whole groups */
#endif

typedef struct {
    int32_t fmt, hidden, inter, group, bias, act;
    float alpha, limit;
    int64_t offset[SECTIONS]; /* bytes from the row's start; native rows: matrices and biases */
} layout_t;

typedef struct {
    const uint8_t *q;      /* the matrix (packed codes or native values) */
    const uint16_t *scale; /* float16 [groups, out]; packed only */
    const uint16_t *zero;  /* float16 [groups, out]; int4 only */
    int fmt, rows, cols, group;
} matrix_t;

static float bf16_to_f32(uint16_t v) {
    uint32_t b = (uint32_t)v << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* One weight, for the columns past the last whole vector (a width not a multiple of W). */
static float weight_at(const matrix_t *m, int i, int o) {
    int64_t k = (int64_t)i * m->cols + o;
    if (m->fmt == F32) return ((const float *)m->q)[k];
    if (m->fmt == BF16) return bf16_to_f32(((const uint16_t *)m->q)[k]);
    int64_t sg = (int64_t)(i / (m->group ? m->group : m->rows)) * m->cols + o;
    float scale = _cvtsh_ss(m->scale[sg]);
    if (m->fmt == INT8) return ((const int8_t *)m->q)[k] * scale;
    uint8_t b = m->q[(int64_t)(i / 2) * m->cols + o];
    return ((i & 1 ? b >> 4 : b & 0xF) - _cvtsh_ss(m->zero[sg])) * scale;
}

/* W float lanes: AVX-512 where the compiler targets it (-march=native on such a CPU: twice the
 * weights per instruction, which the int4 loop needs to keep up with DRAM), else AVX2. */
#ifdef __AVX512F__
#define W 16
typedef __m512 vf;
typedef __m512i vi;
#define VSET1 _mm512_set1_ps
#define VSET1I _mm512_set1_epi32
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VFMA _mm512_fmadd_ps
#define VFNMA _mm512_fnmadd_ps
#define VAND _mm512_and_si512
#define VSRLI _mm512_srli_epi32
#define VSLLI _mm512_slli_epi32
#define VCVT _mm512_cvtepi32_ps
#define VCAST _mm512_castsi512_ps
#define U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define I8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define U16(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#else
#define W 8
typedef __m256 vf;
typedef __m256i vi;
#define VSET1 _mm256_set1_ps
#define VSET1I _mm256_set1_epi32
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VFMA _mm256_fmadd_ps
#define VFNMA _mm256_fnmadd_ps
#define VAND _mm256_and_si256
#define VSRLI _mm256_srli_epi32
#define VSLLI _mm256_slli_epi32
#define VCVT _mm256_cvtepi32_ps
#define VCAST _mm256_castsi256_ps
#define U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define I8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define U16(p) _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif

/* Rows are streamed in memory order, but the hardware prefetcher alone leaves the int4 loop
 * waiting on DRAM: measured here, one expert from DRAM took 1.6x as long as from cache without
 * this, 1.1x with it. Bytes ahead of the row being read. */
#define AHEAD 8192
#define PREFETCH(p, c) \
    if (!((c) & 63)) _mm_prefetch((const char *)(p) + AHEAD + (c), _MM_HINT_T0)

static vf load_native(const matrix_t *m, int64_t k) { /* W native weights from element k, as float32 */
    if (m->fmt == F32) return VLOAD((const float *)m->q + k);
    return VCAST(VSLLI(U16((const uint16_t *)m->q + k), 16));
}

/* y[0:cols] = x[r0:r1] @ W[r0:r1, :], streaming the rows in memory order: the sums live in y (L1),
 * four input rows per pass over it. */
static void rows_native(const matrix_t *m, const float *x, int r0, int r1, float *y) {
    const int n = m->cols, whole = n & ~(W - 1), size = m->fmt == F32 ? 4 : 2;
    int i = r0, c;
    memset(y, 0, sizeof(float) * n);
    for (; i + 4 <= r1; i += 4) {
        vf x0 = VSET1(x[i]), x1 = VSET1(x[i + 1]), x2 = VSET1(x[i + 2]), x3 = VSET1(x[i + 3]);
        int64_t k = (int64_t)i * n;
        for (c = 0; c < whole; c += W) {
            PREFETCH(m->q + (k + 4 * n) * size, c * size);
            vf a = VLOAD(y + c);
            a = VFMA(x0, load_native(m, k + c), a);
            a = VFMA(x1, load_native(m, k + n + c), a);
            a = VFMA(x2, load_native(m, k + 2 * n + c), a);
            a = VFMA(x3, load_native(m, k + 3 * n + c), a);
            VSTORE(y + c, a);
        }
    }
    for (; i < r1; i++) {
        vf xi = VSET1(x[i]);
        for (c = 0; c < whole; c += W) VSTORE(y + c, VFMA(xi, load_native(m, (int64_t)i * n + c), VLOAD(y + c)));
    }
    for (c = whole; c < n; c++)
        for (i = r0; i < r1; i++) y[c] += x[i] * weight_at(m, i, c);
}

/* The same over packed rows, a group at a time: the group's sums of x times the raw codes go to acc,
 * then y += scale * (acc - zero * sum(x)) once per group and column. */
static void rows_packed(const matrix_t *m, const float *x, int r0, int r1, float *y, float *acc) {
    const int n = m->cols, whole = n & ~(W - 1), g = m->group ? m->group : m->rows;
    const vi low = VSET1I(0xF);
    int c, r;
    memset(y, 0, sizeof(float) * n);
    for (int start = r0, end; start < r1; start = end) { /* the part of one group inside [r0, r1) */
        float xs = 0.f;
        end = (start / g + 1) * g < r1 ? (start / g + 1) * g : r1;
        memset(acc, 0, sizeof(float) * n);
        if (m->fmt == INT4) {
            for (r = start / 2; r < end / 2; r += 2) { /* byte rows r, r + 1: input rows 2r .. 2r + 3 */
                const int two = r + 1 < end / 2; /* an odd last byte row pairs with itself, times 0 */
                const float *xr = x + 2 * r;
                float x2s = two ? xr[2] : 0.f, x3s = two ? xr[3] : 0.f;
                vf x0 = VSET1(xr[0]), x1 = VSET1(xr[1]), x2 = VSET1(x2s), x3 = VSET1(x3s);
                const uint8_t *b0 = m->q + (int64_t)r * n, *b1 = two ? b0 + n : b0;
                xs += xr[0] + xr[1] + x2s + x3s;
                for (c = 0; c < whole; c += W) {
                    PREFETCH(b0, c);
                    PREFETCH(b1, c);
                    vi v0 = U8(b0 + c), v1 = U8(b1 + c);
                    vf a = VLOAD(acc + c);
                    a = VFMA(x0, VCVT(VAND(v0, low)), a);
                    a = VFMA(x1, VCVT(VSRLI(v0, 4)), a);
                    a = VFMA(x2, VCVT(VAND(v1, low)), a);
                    a = VFMA(x3, VCVT(VSRLI(v1, 4)), a);
                    VSTORE(acc + c, a);
                }
            }
        } else {
            for (r = start; r < end; r += 2) {
                const int two = r + 1 < end; /* an odd last row pairs with itself, times 0 */
                float x1s = two ? x[r + 1] : 0.f;
                vf x0 = VSET1(x[r]), x1 = VSET1(x1s);
                const int8_t *b0 = (const int8_t *)m->q + (int64_t)r * n, *b1 = two ? b0 + n : b0;
                xs += x[r] + x1s;
                for (c = 0; c < whole; c += W) {
                    PREFETCH(b0, c);
                    PREFETCH(b1, c);
                    vf a = VLOAD(acc + c);
                    a = VFMA(x0, VCVT(I8(b0 + c)), a);
                    a = VFMA(x1, VCVT(I8(b1 + c)), a);
                    VSTORE(acc + c, a);
                }
            }
        }
        int64_t at = (int64_t)(start / g) * n;
        vf sum = VSET1(xs);
        for (c = 0; c < whole; c += W) {
            vf a = VLOAD(acc + c);
            if (m->fmt == INT4) a = VFNMA(F16(m->zero + at + c), sum, a);
            VSTORE(y + c, VFMA(F16(m->scale + at + c), a, VLOAD(y + c)));
        }
        for (c = whole; c < n; c++) { /* the ragged columns: scalar, from the codes */
            for (int i = start; i < end; i++) y[c] += x[i] * weight_at(m, i, c);
        }
    }
}

static void rows_any(const matrix_t *m, const float *x, int r0, int r1, float *y, float *acc) {
    if (m->fmt == F32 || m->fmt == BF16) rows_native(m, x, r0, r1, y);
    else rows_packed(m, x, r0, r1, y, acc);
}

static matrix_t matrix(const layout_t *L, const uint8_t *row, int down) {
    matrix_t m;
    int packed = L->fmt == INT8 || L->fmt == INT4;
    m.fmt = L->fmt;
    m.rows = down ? L->inter : L->hidden;
    m.cols = down ? L->hidden : 2 * L->inter;
    m.group = L->group;
    m.q = row + L->offset[down ? D_Q : GU_Q];
    m.scale = packed ? (const uint16_t *)(row + L->offset[down ? D_SCALE : GU_SCALE]) : 0;
    m.zero = L->fmt == INT4 ? (const uint16_t *)(row + L->offset[down ? D_ZERO : GU_ZERO]) : 0;
    return m;
}

static float bias_at(const layout_t *L, const uint8_t *row, int section, int k) {
    const uint8_t *b = row + L->offset[section];
    if (L->fmt == F32) return ((const float *)b)[k];
    if (L->fmt == BF16) { uint32_t v = (uint32_t)((const uint16_t *)b)[k] << 16; float f; memcpy(&f, &v, 4); return f; }
    return _cvtsh_ss(((const uint16_t *)b)[k]); /* packed rows keep float16 biases */
}

static float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

/* Input rows per work item: a matrix is cut into chunks of whole groups, each summed into its own
 * partial output, then the partials are added in chunk order. The cut does not depend on the
 * thread count, so neither do the results. */
static int chunk_rows(const matrix_t *m) {
    int g = m->fmt == F32 || m->fmt == BF16 || !m->group ? 1 : m->group;
    int per = (CHUNK + g - 1) / g * g;
    return per < m->rows ? per : m->rows;
}

/* Every pair's partial sums for one matrix: part[(p * chunks + c) * cols ...]. */
static void partials(const layout_t *L, int down, int pairs, const int64_t *rows, const float *in, int64_t in_stride,
                     const int32_t *tok, float *part, float *acc) {
    matrix_t m0 = matrix(L, (const uint8_t *)rows[0], down);
    const int per = chunk_rows(&m0), chunks = (m0.rows + per - 1) / per;
#pragma omp for schedule(static)
    for (int item = 0; item < pairs * chunks; item++) {
        int p = item / chunks, c = item % chunks, r0 = c * per, r1 = r0 + per < m0.rows ? r0 + per : m0.rows;
        matrix_t m = matrix(L, (const uint8_t *)rows[p], down);
        const float *x = in + (tok ? tok[p] : p) * in_stride;
        rows_any(&m, x, r0, r1, part + (int64_t)item * m.cols, acc);
    }
}

/* out[tok[p]] += weight[p] * expert_p(x[tok[p]]) for p in 0..pairs, in p's order per token.
 * rows[p]: the address of pair p's expert row; scratch: scratch_floats(...) floats. */
int mobile_host_experts(const layout_t *L, const float *x, float *out, int tokens, int pairs, const int32_t *tok,
                        const int64_t *rows, const float *weight, float *scratch, int threads) {
    const int H = L->hidden, I = L->inter;
    matrix_t gu = matrix(L, (const uint8_t *)rows[0], 0), dn = matrix(L, (const uint8_t *)rows[0], 1);
    const int gu_chunks = (H + chunk_rows(&gu) - 1) / chunk_rows(&gu), d_chunks = (I + chunk_rows(&dn) - 1) / chunk_rows(&dn);
    float *h = scratch;                                    /* [pairs, 2I]: gate_up, then the activations */
    float *part = h + (int64_t)pairs * 2 * I;              /* [pairs, chunks, cols]: either matrix's partials */
    int64_t part_floats = (int64_t)pairs * (gu_chunks * 2 * I > d_chunks * H ? gu_chunks * 2 * I : d_chunks * H);
    float *accs = part + part_floats;                      /* [threads, max(2I, H)]: a group's sums */
    (void)tokens;
#pragma omp parallel num_threads(threads)
    {
        float *acc = accs + (int64_t)omp_get_thread_num() * (2 * I > H ? 2 * I : H);
        int p, k, c;
        partials(L, 0, pairs, rows, x, H, tok, part, acc);
#pragma omp for schedule(static)
        for (p = 0; p < pairs; p++) { /* gate_up's partials summed, then the activation: h_p[0:I] */
            const uint8_t *row = (const uint8_t *)rows[p];
            float *hp = h + (int64_t)p * 2 * I;
            for (k = 0; k < 2 * I; k++) {
                float v = 0.f;
                for (c = 0; c < gu_chunks; c++) v += part[((int64_t)p * gu_chunks + c) * 2 * I + k];
                hp[k] = L->bias ? v + bias_at(L, row, GU_BIAS, k) : v;
            }
            for (k = 0; k < I; k++) {
                float g = hp[k], u = hp[I + k];
                if (L->act == CLAMPED_SWIGLU) {
                    g = fminf(g, L->limit);
                    u = fmaxf(fminf(u, L->limit), -L->limit);
                    hp[k] = g * sigmoid(L->alpha * g) * (u + 1.f);
                } else if (L->act == GEGLU) { /* gelu's tanh approximation (Gemma 4), as torch's */
                    hp[k] = 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
                } else {
                    hp[k] = g * sigmoid(g) * u;
                }
            }
        }
        partials(L, 1, pairs, rows, h, 2 * I, 0, part, acc);
#pragma omp for schedule(static)
        for (k = 0; k < H; k++) { /* down's partials summed, then each token's pairs in order */
            for (p = 0; p < pairs; p++) {
                float v = 0.f;
                for (c = 0; c < d_chunks; c++) v += part[((int64_t)p * d_chunks + c) * H + k];
                if (L->bias) v += bias_at(L, (const uint8_t *)rows[p], D_BIAS, k);
                out[(int64_t)tok[p] * H + k] += weight[p] * v;
            }
        }
    }
    return 0;
}

/* Floats of scratch that mobile_host_experts needs for `pairs` pairs on `threads` threads. */
int64_t mobile_host_scratch(const layout_t *L, int pairs, int threads) {
    matrix_t gu = {0}, dn = {0};
    gu.fmt = dn.fmt = L->fmt, gu.group = dn.group = L->group;
    gu.rows = L->hidden, gu.cols = 2 * L->inter;
    dn.rows = L->inter, dn.cols = L->hidden;
    int64_t gu_c = (gu.rows + chunk_rows(&gu) - 1) / chunk_rows(&gu), d_c = (dn.rows + chunk_rows(&dn) - 1) / chunk_rows(&dn);
    int64_t part = gu_c * gu.cols > d_c * dn.cols ? gu_c * gu.cols : d_c * dn.cols;
    int64_t wide = gu.cols > dn.cols ? gu.cols : dn.cols;
    return (int64_t)pairs * (gu.cols + part) + (int64_t)threads * wide;
}

/* A STREAM-like read of n bytes at p (n a multiple of 32): the host's read bandwidth on the same
 * bytes, for the kernel's benchmark. Returns a sum so the reads cannot be elided. */
int64_t mobile_read_bytes(const uint8_t *p, int64_t n, int threads) {
    int64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (int64_t i = 0; i < n / 128; i++) {
        const __m256i *v = (const __m256i *)(p + i * 128);
        __m256i a = _mm256_xor_si256(_mm256_xor_si256(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)),
                                     _mm256_xor_si256(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
        total += _mm256_extract_epi64(a, 0) ^ _mm256_extract_epi64(a, 3);
    }
    return total;
}
