/* gptcli's int8 matrix product for the torch backend (--precision int8 on a CPU); see int8_native.py. The int4
   product (--precision int4) follows it (see int4_native.py), then the same int4 product as an ONNX Runtime
   operator, for the onnx backend's int4 exports (see export/native_ops.py), and at the end of the file the torch
   backend's attention (see native_attention.py).

   y [M, N] = x [M, K] @ W^T, W int8 [N, K] with one float scale per output row.

   Each row of x is rounded to fixed point with its own scale (s = max|x| / Q): q = round(x / s), kept as
   u = q + 2^(B-1) in two unsigned halves, u = hi * 2^H + lo. The products with the int8 weights are summed
   as exact integers, so a row's result is the same bits whatever rows share the call (batching never
   changes answers), and then y = s * wscale * (2^H * sum(hi w) + sum(lo w) - 2^(B-1) * sum(w)).
   - AVX-512 VNNI: B = 16 bits (Q = 32767), bytes of 8 bits, vpdpbusd (64 products an instruction).
   - AVX2: B = 14 bits (Q = 8191), halves of 7 bits, so vpmaddubsw's pair sums (at most 2 * 127 * 127)
     never saturate.
   Either way the activations keep 14-16 bits, finer than the bf16 that torch's own int8 kernel takes.

   The weights are packed as [ceil(N/16)][KP/4][16][4] (KP: K rounded up to 4, zero padded): 64 bytes
   hold 4 inputs of 16 outputs, so each lane of a 512-bit sum is one output and no horizontal sums are
   needed. Scales and code sums are padded to ceil(N/16) * 16.

   Built by int8_native.py with -O3 -fopenmp and the CPU's ISA flags by name; the OpenMP regions run on the
   libgomp that torch has already loaded. gptcli_int8_isa() says which path this build has (0: none). */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1
#else
#define ISA 0
#endif
/* AVX-VNNI (vpdpbusd on 256-bit vectors, VEX-encoded: Intel Alder Lake and later, Sierra Forest; not AVX-512): the
   AVX2 path's numbers and layouts with each dot product in one instruction, so the same bits as the AVX2 build. */
#if ISA == 1 && defined(__AVXVNNI__)
#define AVX_VNNI 1
#else
#define AVX_VNNI 0
#endif
#define ISA_ID (AVX_VNNI ? 3 : ISA) /* what gptcli_int8_isa() and gptcli_int4_isa() say: 2, 3, 1, or 0 for none */

int gptcli_int8_isa(void) { return ISA_ID; }

#if ISA > 0
#include <immintrin.h>

#if ISA == 2
#define QMAX 32767
#define HALF_BITS 8
#else
#define QMAX 8191
#define HALF_BITS 7
#endif
#define OFFSET (QMAX + 1)
#define HALF_MASK ((1 << HALF_BITS) - 1)

/* One row of x -> its scale and the hi/lo halves of its codes (KP bytes each, zero padded). */
static void quantize_row(const float *x, int64_t K, int64_t KP, uint8_t *hi, uint8_t *lo, double *scale) {
    memset(hi, 0, (size_t)KP);
    memset(lo, 0, (size_t)KP);
    float amax = 0.f;
    int bad = 0;
#if ISA == 2
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 unordered = 0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    amax = _mm512_reduce_max_ps(vmax);
    bad = unordered != 0;
#else
    int64_t k = 0;
#endif
    for (; k < K; k++) {
        float a = fabsf(x[k]);
        bad |= a != a;
        amax = a > amax ? a : amax;
    }
    if (bad || !(amax <= 3.4e38f)) { /* NaN or inf: the row's outputs are NaN, as a float product's would be */
        *scale = NAN;
        return;
    }
    /* A row of tiny values (max < 2^-64) is first scaled up by 2^64, exactly, so that QMAX / max stays finite
       (past ~1e-34 it would be inf, and the codes garbage). The scale is a double, which holds it whole. */
    float pre = amax < 0x1p-64f ? 0x1p64f : 1.f, peak = amax * pre;
    float inv = peak > 0.f ? (float)QMAX / peak : 0.f;
    *scale = peak > 0.f ? (double)peak / QMAX / pre : 0.0;
    k = 0;
#if ISA == 2
    const __m512 vinv = _mm512_set1_ps(inv), vpre = _mm512_set1_ps(pre);
    const __m512i top = _mm512_set1_epi32(QMAX), bottom = _mm512_set1_epi32(-QMAX);
    const __m512i offset = _mm512_set1_epi32(OFFSET), mask = _mm512_set1_epi32(HALF_MASK);
    for (; k + 16 <= K; k += 16) { /* rounds to nearest even, as lrintf does below */
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vpre), vinv));
        __m512i u = _mm512_add_epi32(_mm512_max_epi32(_mm512_min_epi32(q, top), bottom), offset);
        _mm_storeu_si128((__m128i *)(hi + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, HALF_BITS)));
        _mm_storeu_si128((__m128i *)(lo + k), _mm512_cvtepi32_epi8(_mm512_and_si512(u, mask)));
    }
#endif
    for (; k < K; k++) {
        int32_t q = (int32_t)lrintf(x[k] * pre * inv);
        q = q > QMAX ? QMAX : (q < -QMAX ? -QMAX : q);
        uint32_t u = (uint32_t)(q + OFFSET);
        hi[k] = (uint8_t)(u >> HALF_BITS);
        lo[k] = (uint8_t)(u & HALF_MASK);
    }
}

/* 4 bytes as one 32-bit lane in every lane (memcpy: no aliasing of the byte arrays; compiles to one load) */
static inline int32_t four_bytes(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
#define BCAST(p) set1_epi32(four_bytes(p))

#if ISA == 2
typedef __m512i acc_t; /* 16 outputs */
#define set1_epi32 _mm512_set1_epi32
#define DP(a, b, w) a = _mm512_dpbusd_epi32(a, b, w)
#define LOAD(p) _mm512_loadu_si512((const void *)(p))
#define ZERO _mm512_setzero_si512()

/* 16 outputs' sums (h, l lanes) -> y, in double: the integers exactly (|h| < 2^31, so 256 h < 2^39), then
   times the row's and the outputs' scales, rounded to float once. */
static void finish16(acc_t h, acc_t l, const int32_t *wsum, const float *wscale, double xscale, float *y, int64_t n) {
    __mmask16 keep = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    __m512i sums = _mm512_loadu_si512((const void *)wsum);
    __m256 halves[2];
    for (int half = 0; half < 2; half++) {
        __m256i hh = half ? _mm512_extracti64x4_epi64(h, 1) : _mm512_castsi512_si256(h);
        __m256i ll = half ? _mm512_extracti64x4_epi64(l, 1) : _mm512_castsi512_si256(l);
        __m256i ss = half ? _mm512_extracti64x4_epi64(sums, 1) : _mm512_castsi512_si256(sums);
        __m512d v = _mm512_fmadd_pd(_mm512_cvtepi32_pd(hh), _mm512_set1_pd(1 << HALF_BITS), _mm512_cvtepi32_pd(ll));
        v = _mm512_fnmadd_pd(_mm512_cvtepi32_pd(ss), _mm512_set1_pd(OFFSET), v);
        v = _mm512_mul_pd(_mm512_mul_pd(v, _mm512_set1_pd(xscale)), _mm512_cvtps_pd(_mm256_loadu_ps(wscale + half * 8)));
        halves[half] = _mm512_cvtpd_ps(v);
    }
    __m512 out = _mm512_insertf32x8(_mm512_castps256_ps512(halves[0]), halves[1], 1);
    _mm512_mask_storeu_ps(y, keep, out);
}

/* Four rows (KP apart), 2 blocks: out[(row * 2 + block) * 2 + (0: h, 1: l)]. */
static void rows4_blocks2(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *w, int64_t bb,
                          acc_t out[16]) {
    acc_t a0 = ZERO, a1 = ZERO, a2 = ZERO, a3 = ZERO, a4 = ZERO, a5 = ZERO, a6 = ZERO, a7 = ZERO;
    acc_t c0 = ZERO, c1 = ZERO, c2 = ZERO, c3 = ZERO, c4 = ZERO, c5 = ZERO, c6 = ZERO, c7 = ZERO;
    for (int64_t k = 0; k < KP; k += 4) {
        const int8_t *p = w + k * 16;
        acc_t w0 = LOAD(p), w1 = LOAD(p + bb), b;
        b = BCAST(hi + k); DP(a0, b, w0); DP(a1, b, w1);
        b = BCAST(lo + k); DP(c0, b, w0); DP(c1, b, w1);
        b = BCAST(hi + KP + k); DP(a2, b, w0); DP(a3, b, w1);
        b = BCAST(lo + KP + k); DP(c2, b, w0); DP(c3, b, w1);
        b = BCAST(hi + 2 * KP + k); DP(a4, b, w0); DP(a5, b, w1);
        b = BCAST(lo + 2 * KP + k); DP(c4, b, w0); DP(c5, b, w1);
        b = BCAST(hi + 3 * KP + k); DP(a6, b, w0); DP(a7, b, w1);
        b = BCAST(lo + 3 * KP + k); DP(c6, b, w0); DP(c7, b, w1);
    }
    acc_t r[16] = {a0, c0, a1, c1, a2, c2, a3, c3, a4, c4, a5, c5, a6, c6, a7, c7};
    memcpy(out, r, sizeof r);
}

/* One row, one block. */
static void rows1_blocks1(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *w, acc_t out[2]) {
    acc_t h = ZERO, l = ZERO;
    for (int64_t k = 0; k < KP; k += 4) {
        acc_t w0 = LOAD(w + k * 16);
        DP(h, BCAST(hi + k), w0); DP(l, BCAST(lo + k), w0);
    }
    out[0] = h; out[1] = l;
}
#define ROWS_MANY 4 /* rows4_blocks2 */
#define BLOCKS_MANY 2

#else /* AVX2: a block's 16 outputs are two 8-lane halves (A: outputs 0-7, B: 8-15) */
static inline float finish_one(int64_t h, int64_t l, int32_t wsum, float wscale, double xscale) {
    int64_t total = h * (1 << HALF_BITS) + l - (int64_t)OFFSET * wsum; /* exact: |total| < 2^50 */
    return (float)((double)total * xscale * (double)wscale);
}

typedef __m256i acc_t;
#define set1_epi32 _mm256_set1_epi32
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define ZERO _mm256_setzero_si256()
/* a += the 4-input dot products of the broadcast halves b with the weights w, per 32-bit lane (the pair sums of
   vpmaddubsw are at most 2 * 127 * 128, never saturated, so both forms give the same integers) */
#if AVX_VNNI
#define DP(a, b, w) a = _mm256_dpbusd_avx_epi32(a, b, w)
#else
#define DP(a, b, w) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(b, w), ones))
#endif

/* The AVX2 accumulators come in (A, B) pairs: out[2 * i] = outputs 0-7, out[2 * i + 1] = 8-15. */
static void finish16(const acc_t hv[2], const acc_t lv[2], const int32_t *wsum, const float *wscale, double xscale,
                     float *y, int64_t n) {
    int32_t hs[16], ls[16];
    _mm256_storeu_si256((__m256i *)hs, hv[0]);
    _mm256_storeu_si256((__m256i *)(hs + 8), hv[1]);
    _mm256_storeu_si256((__m256i *)ls, lv[0]);
    _mm256_storeu_si256((__m256i *)(ls + 8), lv[1]);
    for (int64_t j = 0; j < n && j < 16; j++) y[j] = finish_one(hs[j], ls[j], wsum[j], wscale[j], xscale);
}

/* Two rows (KP apart), one block: out = (row 0) hA hB lA lB, (row 1) hA hB lA lB. */
static void rows2_blocks1(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *w, acc_t out[8]) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones; /* not with AVX-VNNI */
    acc_t h0a = ZERO, h0b = ZERO, l0a = ZERO, l0b = ZERO, h1a = ZERO, h1b = ZERO, l1a = ZERO, l1b = ZERO;
    for (int64_t k = 0; k < KP; k += 4) {
        const int8_t *p = w + k * 16;
        acc_t wa = LOAD(p), wb = LOAD(p + 32), b;
        b = BCAST(hi + k); DP(h0a, b, wa); DP(h0b, b, wb);
        b = BCAST(lo + k); DP(l0a, b, wa); DP(l0b, b, wb);
        b = BCAST(hi + KP + k); DP(h1a, b, wa); DP(h1b, b, wb);
        b = BCAST(lo + KP + k); DP(l1a, b, wa); DP(l1b, b, wb);
    }
    acc_t r[8] = {h0a, h0b, l0a, l0b, h1a, h1b, l1a, l1b};
    memcpy(out, r, sizeof r);
}

static void rows1_blocks1(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *w, acc_t out[4]) {
    const __m256i ones = _mm256_set1_epi16(1);
    (void)ones;
    acc_t ha = ZERO, hb = ZERO, la = ZERO, lb = ZERO;
    for (int64_t k = 0; k < KP; k += 4) {
        const int8_t *p = w + k * 16;
        acc_t wa = LOAD(p), wb = LOAD(p + 32), bh = BCAST(hi + k), bl = BCAST(lo + k);
        DP(ha, bh, wa); DP(hb, bh, wb); DP(la, bl, wa); DP(lb, bl, wb);
    }
    out[0] = ha; out[1] = hb; out[2] = la; out[3] = lb;
}
#define ROWS_MANY 2 /* rows2_blocks1 */
#define BLOCKS_MANY 1
#endif

/* Row m of the output over blocks [b0, b0 + nb), one block at a time (a few rows, and the tails of many_rows). */
static void blocks_one_by_one(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *packed, int64_t bb,
                              const float *wscale, const int32_t *wsum, const double *xs, float *y, int64_t m,
                              int64_t N, int64_t b0, int64_t nb) {
    for (int64_t b = b0; b < b0 + nb; b++) {
        int64_t n = b * 16;
#if ISA == 2
        acc_t r[2];
        rows1_blocks1(hi + m * KP, lo + m * KP, KP, packed + b * bb, r);
        finish16(r[0], r[1], wsum + n, wscale + n, xs[m], y + m * N + n, N - n);
#else
        acc_t r[4];
        rows1_blocks1(hi + m * KP, lo + m * KP, KP, packed + b * bb, r);
        finish16(r, r + 2, wsum + n, wscale + n, xs[m], y + m * N + n, N - n);
#endif
    }
}

/* Rows [m0, m0 + ROWS_MANY) over blocks [b0, b0 + BLOCKS_MANY). */
static void many_rows(const uint8_t *hi, const uint8_t *lo, int64_t KP, const int8_t *packed, int64_t bb,
                      const float *wscale, const int32_t *wsum, const double *xs, float *y, int64_t m0, int64_t N,
                      int64_t b0) {
#if ISA == 2
    acc_t r[16];
    rows4_blocks2(hi + m0 * KP, lo + m0 * KP, KP, packed + b0 * bb, bb, r);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) {
            int64_t n = (b0 + j) * 16;
            finish16(r[(i * 2 + j) * 2], r[(i * 2 + j) * 2 + 1], wsum + n, wscale + n, xs[m0 + i],
                     y + (m0 + i) * N + n, N - n);
        }
#else
    acc_t r[8];
    rows2_blocks1(hi + m0 * KP, lo + m0 * KP, KP, packed + b0 * bb, r);
    int64_t n = b0 * 16;
    for (int i = 0; i < 2; i++)
        finish16(r + 4 * i, r + 4 * i + 2, wsum + n, wscale + n, xs[m0 + i], y + (m0 + i) * N + n, N - n);
#endif
}

#endif

/* A packed matrix, as int8_native.py's PackedInt8 holds it. */
struct gptcli_int8_matrix {
    const int8_t *packed;
    const float *wscale;
    const int32_t *wsum;
    int64_t N, K;
};

#if ISA > 0
/* work: M * (2 * KP + 8) bytes (the halves of the rows' codes, then their scales as doubles). */
void gptcli_int8_mm(const float *x, const struct gptcli_int8_matrix *w, float *y, int64_t M, uint8_t *work,
                    int threads) {
    const int8_t *packed = w->packed;
    const float *wscale = w->wscale;
    const int32_t *wsum = w->wsum;
    int64_t N = w->N, K = w->K, KP = (K + 3) & ~(int64_t)3, NB = (N + 15) / 16, bb = KP * 16;
    uint8_t *hi = work, *lo = work + M * KP;
    double *xs = (double *)(void *)(work + 2 * M * KP); /* 8-byte aligned: KP is a multiple of 4 */
    if (M <= 4) /* a decode step's few rows: here, without a barrier in the parallel region */
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, KP, hi + m * KP, lo + m * KP, xs + m);
#pragma omp parallel num_threads(threads)
    {
        if (M > 4) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, KP, hi + m * KP, lo + m * KP, xs + m);
        }
        if (M < ROWS_MANY) {
            /* A few rows: one block at a time, its weights read once per row from cache. Four blocks at a time (on
               AVX-512) decoded the default model ~6 % slower on Zen 5 (torch int8 tg128, three alternating rounds),
               likely because parts of four split its 36-block matrices 5 : 4 between two threads. On AVX2 two
               blocks at once spill registers (1.4x slower, measured). */
#pragma omp for schedule(static)
            for (int64_t b = 0; b < NB; b++)
                for (int64_t m = 0; m < M; m++)
                    blocks_one_by_one(hi, lo, KP, packed, bb, wscale, wsum, xs, y, m, N, b, 1);
        } else {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < (NB + BLOCKS_MANY - 1) / BLOCKS_MANY; g++) {
                int64_t b0 = g * BLOCKS_MANY, nb = NB - b0 < BLOCKS_MANY ? NB - b0 : BLOCKS_MANY;
                for (int64_t m0 = 0; m0 < M; m0 += ROWS_MANY) {
                    if (nb == BLOCKS_MANY && M - m0 >= ROWS_MANY) {
                        many_rows(hi, lo, KP, packed, bb, wscale, wsum, xs, y, m0, N, b0);
                    } else {
                        for (int64_t m = m0; m < M && m < m0 + ROWS_MANY; m++)
                            blocks_one_by_one(hi, lo, KP, packed, bb, wscale, wsum, xs, y, m, N, b0, nb);
                    }
                }
            }
        }
    }
}
#endif

/* ---------------------------------------------------------------------------------------------- int4 (groups of 32)

   y [M, N] = x [M, K] @ W^T, W [N, K] = q * scale + low, q in 0..15, one (scale, low) per output and group of 32
   inputs (K a multiple of 32). AVX-512 VNNI and AVX2 (+F16C) builds, the same bits (gptcli_int4_isa() says which).

   Each row of x is rounded to 15 bits with its own scale s = max|x| / 16383: c = round(x / s), kept as a signed high
   byte and a 7-bit low one, c = 128 hi + lo. vpdpbusd takes the codes q as its unsigned operand and the activation
   bytes as its signed one, so a group's t = sum(q c) = 128 sum(q hi) + sum(q lo) is an exact integer (|t| < 2^23,
   so exact in a float too), and so is the group's code sum C = sum(c). Then, groups in order,
   acc = fma(scale, t, acc); acc = fma(low, C, acc); y = s * acc. Every row is computed alone in the same order,
   so a row gives the same bits in any batch.

   Packed codes: [ceil(N/16)][K/8][16][4] bytes; byte o*4 + j of chunk c of a block holds input 8c + j of output o in
   its low nibble and input 8c + 4 + j in its high one. Scales and lows: float16, [ceil(N/16)][K/32][2][16]. */

#if ISA > 0
#define Q4MAX 16383
#define GROUP 32

/* A row's scale from its largest |x|, as quantize_row: 0 with the multipliers pre and inv that take x to its codes,
   or -1 for a row with a NaN or inf (`bad`), whose codes are zeros and whose outputs are NaN. */
static int row4_scale(float amax, int bad, int64_t K, int8_t *hi, int8_t *lo, float *gsum, double *scale, float *pre,
                      float *inv) {
    if (bad || !(amax <= 3.4e38f)) {
        *scale = NAN;
        memset(hi, 0, (size_t)K);
        memset(lo, 0, (size_t)K);
        memset(gsum, 0, sizeof(float) * (size_t)(K / GROUP));
        return -1;
    }
    *pre = amax < 0x1p-64f ? 0x1p64f : 1.f;
    float peak = amax * *pre;
    *inv = peak > 0.f ? (float)Q4MAX / peak : 0.f;
    *scale = peak > 0.f ? (double)peak / Q4MAX / *pre : 0.0;
    return 0;
}
#endif

#if ISA == 2
typedef __m512 acc4_t;
#define VECS_PER_BLOCK 1 /* a block's 16 outputs are one vector */

/* One row of x -> its scale (a double), its code bytes hi/lo (K each) and each group's code sum (a float). */
static void quantize_row4(const float *x, int64_t K, int8_t *hi, int8_t *lo, float *gsum, double *scale) {
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 unordered = 0;
    for (int64_t k = 0; k < K; k += 16) { /* K is a multiple of 32 */
        __m512 v = _mm512_loadu_ps(x + k);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    float pre, inv;
    if (row4_scale(_mm512_reduce_max_ps(vmax), unordered != 0, K, hi, lo, gsum, scale, &pre, &inv)) return;
    const __m512 vinv = _mm512_set1_ps(inv), vpre = _mm512_set1_ps(pre);
    const __m512i top = _mm512_set1_epi32(Q4MAX), bottom = _mm512_set1_epi32(-Q4MAX), seven = _mm512_set1_epi32(127);
    for (int64_t g = 0; g < K / GROUP; g++) {
        __m512i total = _mm512_setzero_si512();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 16) {
            __m512i c = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vpre), vinv));
            c = _mm512_max_epi32(_mm512_min_epi32(c, top), bottom);
            total = _mm512_add_epi32(total, c);
            _mm_storeu_si128((__m128i *)(hi + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(c, 7)));
            _mm_storeu_si128((__m128i *)(lo + k), _mm512_cvtepi32_epi8(_mm512_and_si512(c, seven)));
        }
        gsum[g] = (float)_mm512_reduce_add_epi32(total);
    }
}

/* Group g's sums h, l (R rows x B blocks) into acc: t = 128 h + l (exact), acc += scale t + low C, C the row's code
   sum over the group; the scales and minimums float16, [block][group][2][16]. */
#define GROUP_FINISH(R, B)                                                                                           \
    for (int b = 0; b < B; b++) {                                                                                    \
        const uint16_t *p = sl + b * sb + g * 32;                                                                    \
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));                                      \
        __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16)));                                 \
        for (int r = 0; r < R; r++) {                                                                                \
            __m512i t = _mm512_add_epi32(_mm512_slli_epi32(h[r * B + b], 7), l[r * B + b]);                          \
            acc[r * B + b] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(t), acc[r * B + b]);                          \
            acc[r * B + b] = _mm512_fmadd_ps(low, _mm512_set1_ps(gsum[r * (K / GROUP) + g]), acc[r * B + b]);        \
        }                                                                                                            \
    }

/* R rows (K bytes apart) x B blocks of 16 outputs (bb bytes apart): acc[r * B + b] (floats, before the row scale). */
#define INT4_TILE(NAME, R, B)                                                                                        \
    static void NAME(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w, int64_t bb, \
                     const uint16_t *sl, int64_t sb, __m512 acc[R * B]) {                                           \
        const __m512i nibble = _mm512_set1_epi8(0x0F);                                                               \
        for (int i = 0; i < R * B; i++) acc[i] = _mm512_setzero_ps();                                               \
        for (int64_t g = 0; g < K / GROUP; g++) {                                                                    \
            __m512i h[R * B], l[R * B];                                                                              \
            for (int i = 0; i < R * B; i++) h[i] = l[i] = _mm512_setzero_si512();                                   \
            for (int c = 0; c < 4; c++) {                                                                            \
                int64_t k = g * GROUP + 8 * c;                                                                       \
                __m512i w0[B], w1[B];                                                                                \
                for (int b = 0; b < B; b++) {                                                                        \
                    __m512i v = _mm512_loadu_si512((const void *)(w + b * bb + k * 8));                              \
                    w0[b] = _mm512_and_si512(v, nibble);                                                             \
                    w1[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);                                       \
                }                                                                                                    \
                for (int r = 0; r < R; r++) {                                                                        \
                    __m512i h0 = BCAST4(hi + r * K + k), l0 = BCAST4(lo + r * K + k);                                \
                    __m512i h1 = BCAST4(hi + r * K + k + 4), l1 = BCAST4(lo + r * K + k + 4);                        \
                    for (int b = 0; b < B; b++) {                                                                    \
                        h[r * B + b] = _mm512_dpbusd_epi32(h[r * B + b], w0[b], h0);                                 \
                        l[r * B + b] = _mm512_dpbusd_epi32(l[r * B + b], w0[b], l0);                                 \
                        h[r * B + b] = _mm512_dpbusd_epi32(h[r * B + b], w1[b], h1);                                 \
                        l[r * B + b] = _mm512_dpbusd_epi32(l[r * B + b], w1[b], l1);                                 \
                    }                                                                                                \
                }                                                                                                    \
            }                                                                                                        \
            GROUP_FINISH(R, B);                                                                                      \
        }                                                                                                            \
    }
#define BCAST4(p) _mm512_set1_epi32(four_bytes((const uint8_t *)(p)))
#define MANY_ROWS 4 /* int4_many_rows */
#define MANY_BLOCKS 2
INT4_TILE(int4_many_rows, MANY_ROWS, MANY_BLOCKS)
INT4_TILE(int4_one_block, 1, 1)

/* 8-bit codes (0..255; the operator's `bits` 8: a Q8_0 head), [ceil(N/16)][K/4][16][4] bytes, the same scales and
   minimums: a group's 32 inputs are 8 chunks of 4, one vpdpbusd each per half of the activations. t < 2^27 is exact
   as an integer; as a float it is rounded once (2^-24), then the same finish as the 4-bit tiles. */
#define INT8_TILE(NAME, R, B)                                                                                        \
    static void NAME(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w, int64_t bb, \
                     const uint16_t *sl, int64_t sb, __m512 acc[R * B]) {                                           \
        for (int i = 0; i < R * B; i++) acc[i] = _mm512_setzero_ps();                                               \
        for (int64_t g = 0; g < K / GROUP; g++) {                                                                    \
            __m512i h[R * B], l[R * B];                                                                              \
            for (int i = 0; i < R * B; i++) h[i] = l[i] = _mm512_setzero_si512();                                   \
            for (int c = 0; c < 8; c++) {                                                                            \
                int64_t k = g * GROUP + 4 * c;                                                                       \
                __m512i v[B];                                                                                        \
                for (int b = 0; b < B; b++) v[b] = _mm512_loadu_si512((const void *)(w + b * bb + k * 16));          \
                for (int r = 0; r < R; r++) {                                                                        \
                    __m512i bh = BCAST4(hi + r * K + k), bl = BCAST4(lo + r * K + k);                                \
                    for (int b = 0; b < B; b++) {                                                                    \
                        h[r * B + b] = _mm512_dpbusd_epi32(h[r * B + b], v[b], bh);                                  \
                        l[r * B + b] = _mm512_dpbusd_epi32(l[r * B + b], v[b], bl);                                  \
                    }                                                                                                \
                }                                                                                                    \
            }                                                                                                        \
            GROUP_FINISH(R, B);                                                                                      \
        }                                                                                                            \
    }
INT8_TILE(int8_many_rows, MANY_ROWS, MANY_BLOCKS)
INT8_TILE(int8_one_block, 1, 1)

/* A block's 16 outputs: acc times the row's scale, in double (a tiny row's scale is past a float's range), rounded
   once; n of them kept. */
static void int4_store(const acc4_t *acc, double xscale, float *y, int64_t n) {
    __mmask16 keep = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    const __m512d s = _mm512_set1_pd(xscale);
    __m256 a = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(acc[0])), s));
    __m256 b = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(acc[0], 1)), s));
    _mm512_mask_storeu_ps(y, keep, _mm512_insertf32x8(_mm512_castps256_ps512(a), b, 1));
}

#elif ISA == 1
/* AVX2 (with F16C): the same integers and the same float operations in the same order as the AVX-512 path, so the
   same bits. A block's 16 outputs are two 8-lane halves; vpmaddubsw multiplies the codes (unsigned, at most 15) by
   the activation bytes (signed) in pairs, at most 2 * 15 * 128 = 3840, and a group's 8 of them add up in 16 bits
   (at most 30720) before vpmaddwd widens them: t = 128 sum(q hi) + sum(q lo) exactly, as vpdpbusd gives it. With
   AVX-VNNI, vpdpbusd sums them in 32 bits (DOT4, GROUP_T): the same t. */
typedef __m256 acc4_t;
#if AVX_VNNI
#define DOT4(s, u, a) s = _mm256_dpbusd_avx_epi32(s, u, a)
#define GROUP_T(h, l) _mm256_add_epi32(_mm256_slli_epi32(h, 7), l)
#else
#define DOT4(s, u, a) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u, a))
#define GROUP_T(h, l) _mm256_add_epi32(_mm256_madd_epi16(h, by128), _mm256_madd_epi16(l, ones))
#endif
#define VECS_PER_BLOCK 2

static inline int32_t sum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float max8_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 codes (each within a signed byte) -> 8 bytes at p */
static inline void store8_epi8(int8_t *p, __m256i c) {
    __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64((__m128i *)(void *)p, _mm_packs_epi16(words, words));
}

/* As the AVX-512 quantize_row4, 8 lanes at a time. */
static void quantize_row4(const float *x, int64_t K, int8_t *hi, int8_t *lo, float *gsum, double *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
    }
    float pre, inv;
    if (row4_scale(max8_ps(vmax), _mm256_movemask_ps(unordered) != 0, K, hi, lo, gsum, scale, &pre, &inv)) return;
    const __m256 vinv = _mm256_set1_ps(inv), vpre = _mm256_set1_ps(pre);
    const __m256i top = _mm256_set1_epi32(Q4MAX), bottom = _mm256_set1_epi32(-Q4MAX), seven = _mm256_set1_epi32(127);
    for (int64_t g = 0; g < K / GROUP; g++) {
        __m256i total = _mm256_setzero_si256();
        for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 8) {
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vpre), vinv));
            c = _mm256_max_epi32(_mm256_min_epi32(c, top), bottom);
            total = _mm256_add_epi32(total, c);
            store8_epi8(hi + k, _mm256_srai_epi32(c, 7));
            store8_epi8(lo + k, _mm256_and_si256(c, seven));
        }
        gsum[g] = (float)sum8_epi32(total);
    }
}

/* R rows x B blocks: acc[(r * B + b) * 2 + half], half 0: outputs 0-7, 1: 8-15. */
#define INT4_TILE(NAME, R, B)                                                                                        \
    static void NAME(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w, int64_t bb, \
                     const uint16_t *sl, int64_t sb, __m256 acc[R * B * 2]) {                                       \
        const __m256i nibble = _mm256_set1_epi8(0x0F);                                                               \
        const __m256i by128 = _mm256_set1_epi16(128), ones = _mm256_set1_epi16(1);                                   \
        (void)by128;                                                                                                 \
        (void)ones;                                                                                                  \
        for (int i = 0; i < R * B * 2; i++) acc[i] = _mm256_setzero_ps();                                           \
        for (int64_t g = 0; g < K / GROUP; g++) {                                                                    \
            __m256i h[R * B * 2], l[R * B * 2];                                                                      \
            for (int i = 0; i < R * B * 2; i++) h[i] = l[i] = _mm256_setzero_si256();                               \
            for (int c = 0; c < 4; c++) {                                                                            \
                int64_t k = g * GROUP + 8 * c;                                                                       \
                __m256i w0[B * 2], w1[B * 2];                                                                        \
                for (int i = 0; i < B * 2; i++) {                                                                    \
                    __m256i v = _mm256_loadu_si256((const __m256i *)(w + (i / 2) * bb + k * 8 + (i % 2) * 32));      \
                    w0[i] = _mm256_and_si256(v, nibble);                                                             \
                    w1[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);                                       \
                }                                                                                                    \
                for (int r = 0; r < R; r++) {                                                                        \
                    __m256i h0 = BCAST4(hi + r * K + k), l0 = BCAST4(lo + r * K + k);                                \
                    __m256i h1 = BCAST4(hi + r * K + k + 4), l1 = BCAST4(lo + r * K + k + 4);                        \
                    for (int i = 0; i < B * 2; i++) {                                                                \
                        int a = r * B * 2 + i;                                                                       \
                        DOT4(h[a], w0[i], h0);                                                                       \
                        DOT4(l[a], w0[i], l0);                                                                       \
                        DOT4(h[a], w1[i], h1);                                                                       \
                        DOT4(l[a], w1[i], l1);                                                                       \
                    }                                                                                                \
                }                                                                                                    \
            }                                                                                                        \
            for (int i = 0; i < B * 2; i++) {                                                                        \
                const uint16_t *p = sl + (i / 2) * sb + g * 32 + (i % 2) * 8;                                        \
                __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));                   \
                __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 16)));              \
                for (int r = 0; r < R; r++) {                                                                        \
                    int a = r * B * 2 + i;                                                                           \
                    __m256i t = GROUP_T(h[a], l[a]);                                                                 \
                    acc[a] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(t), acc[a]);                                  \
                    acc[a] = _mm256_fmadd_ps(low, _mm256_set1_ps(gsum[r * (K / GROUP) + g]), acc[a]);                \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
    }
#define BCAST4(p) _mm256_set1_epi32(four_bytes((const uint8_t *)(p)))
/* Measured on Zen 5 (int4_native.measure): 4 rows x 1 block 24-26 ms at 64 rows against 30 for 2 x 1 (the codes
   unpacked once). With AVX-VNNI (no 16-bit sums), 2 x 1: 16-21 ms against 20-25 for 4 x 1, whose 16 accumulators
   spill. */
#define MANY_ROWS (AVX_VNNI ? 2 : 4)
#define MANY_BLOCKS 1
INT4_TILE(int4_many_rows, MANY_ROWS, MANY_BLOCKS)
INT4_TILE(int4_one_block, 1, 1)

/* Group g's integer t (8 outputs, one half of a block) into acc: the same finish as the 4-bit tiles. */
static inline __m256 int8_group_finish(__m256i t, const uint16_t *p, float gsum, __m256 acc) {
    __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
    __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 16)));
    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(t), acc);
    return _mm256_fmadd_ps(low, _mm256_set1_ps(gsum), acc);
}

#if AVX_VNNI
/* 8-bit codes with AVX-VNNI: each byte whole, as the AVX-512 tile, t = 128 sum(c hi) + sum(c lo). One row, one block
   (two halves) at a time. */
static void int8_one_block(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w,
                           int64_t bb, const uint16_t *sl, int64_t sb, __m256 acc[2]) {
    (void)bb;
    (void)sb;
    acc[0] = acc[1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / GROUP; g++) {
        __m256i h[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, l[2] = {h[0], h[0]};
        for (int c = 0; c < 8; c++) {
            int64_t k = g * GROUP + 4 * c;
            __m256i bh = BCAST4(hi + k), bl = BCAST4(lo + k);
            for (int half = 0; half < 2; half++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + k * 16 + half * 32));
                h[half] = _mm256_dpbusd_avx_epi32(h[half], v, bh);
                l[half] = _mm256_dpbusd_avx_epi32(l[half], v, bl);
            }
        }
        for (int half = 0; half < 2; half++)
            acc[half] = int8_group_finish(GROUP_T(h[half], l[half]), sl + g * 32 + half * 8, gsum[g], acc[half]);
    }
}
#else
/* 8-bit codes on AVX2: each byte as its two nibbles, c = 16 ch + cl, so every vpmaddubsw multiplies at most 15 by an
   activation byte, as the 4-bit tiles do; t = 2048 sum(ch hi) + 128 sum(cl hi) + 16 sum(ch lo) + sum(cl lo), the
   integer the AVX-512 path sums, so the same bits. One row, one block (two halves) at a time. */
static void int8_one_block(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w,
                           int64_t bb, const uint16_t *sl, int64_t sb, __m256 acc[2]) {
    (void)bb;
    (void)sb;
    const __m256i nibble = _mm256_set1_epi8(0x0F), by2048 = _mm256_set1_epi16(2048), by128 = _mm256_set1_epi16(128);
    const __m256i by16 = _mm256_set1_epi16(16), ones = _mm256_set1_epi16(1);
    acc[0] = acc[1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / GROUP; g++) {
        __m256i s[2][4];
        for (int half = 0; half < 2; half++)
            for (int i = 0; i < 4; i++) s[half][i] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            int64_t k = g * GROUP + 4 * c;
            __m256i bh = BCAST4(hi + k), bl = BCAST4(lo + k);
            for (int half = 0; half < 2; half++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + k * 16 + half * 32));
                __m256i ch = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), cl = _mm256_and_si256(v, nibble);
                s[half][0] = _mm256_add_epi16(s[half][0], _mm256_maddubs_epi16(ch, bh));
                s[half][1] = _mm256_add_epi16(s[half][1], _mm256_maddubs_epi16(cl, bh));
                s[half][2] = _mm256_add_epi16(s[half][2], _mm256_maddubs_epi16(ch, bl));
                s[half][3] = _mm256_add_epi16(s[half][3], _mm256_maddubs_epi16(cl, bl));
            }
        }
        for (int half = 0; half < 2; half++) {
            __m256i t = _mm256_add_epi32(_mm256_madd_epi16(s[half][0], by2048), _mm256_madd_epi16(s[half][1], by128));
            __m256i u = _mm256_add_epi32(_mm256_madd_epi16(s[half][2], by16), _mm256_madd_epi16(s[half][3], ones));
            acc[half] = int8_group_finish(_mm256_add_epi32(t, u), sl + g * 32 + half * 8, gsum[g], acc[half]);
        }
    }
}
#endif

/* MANY_ROWS rows of MANY_BLOCKS (1) block: one row at a time. */
static void int8_many_rows(const int8_t *hi, const int8_t *lo, const float *gsum, int64_t K, const uint8_t *w,
                           int64_t bb, const uint16_t *sl, int64_t sb, __m256 acc[2 * MANY_ROWS]) {
    for (int r = 0; r < MANY_ROWS; r++)
        int8_one_block(hi + r * K, lo + r * K, gsum + r * (K / GROUP), K, w, bb, sl, sb, acc + 2 * r);
}

static void int4_store(const acc4_t *acc, double xscale, float *y, int64_t n) {
    const __m256d s = _mm256_set1_pd(xscale);
    float out[16];
    for (int half = 0; half < 2; half++) {
        __m128 a = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(acc[half])), s));
        __m128 b = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(acc[half], 1)), s));
        _mm256_storeu_ps(out + 8 * half, _mm256_set_m128(b, a));
    }
    memcpy(y, out, sizeof(float) * (size_t)(n >= 16 ? 16 : n));
}
#endif

struct gptcli_int4_matrix {
    const uint8_t *packed;
    const uint16_t *scales_lows; /* float16 */
    int64_t N, K;
};

int gptcli_int4_isa(void) { return ISA_ID; }

#if ISA > 0
/* One product's operands and scratch (work: M * (2 * K + 4 * K / 32 + 8) bytes), split into parts that any thread may
   run in any order: the rows' quantization (int4_quantize), then int4_parts(c) groups of output blocks (int4_part). */
struct int4_call {
    const float *x;
    const struct gptcli_int4_matrix *w;
    float *y;
    int64_t M;
    int8_t *hi, *lo;
    double *xs;
    float *gsum;
    int bits; /* 4, or 8 (the 8-bit tiles: codes a byte each) */
};

typedef void (*tile_fn)(const int8_t *, const int8_t *, const float *, int64_t, const uint8_t *, int64_t,
                        const uint16_t *, int64_t, acc4_t *);

static struct int4_call int4_setup(const float *x, const struct gptcli_int4_matrix *w, float *y, int64_t M,
                                   uint8_t *work, int bits) {
    int64_t K = w->K;
    struct int4_call c = {x, w, y, M, (int8_t *)work, (int8_t *)work + M * K, NULL, NULL, bits};
    c.xs = (double *)(void *)(work + 2 * M * K); /* 8-byte aligned: K is a multiple of 32 */
    c.gsum = (float *)(void *)(c.xs + M);
    return c;
}

static void int4_quantize(const struct int4_call *c, int64_t m) {
    int64_t K = c->w->K, G = K / GROUP;
    quantize_row4(c->x + m * K, K, c->hi + m * K, c->lo + m * K, c->gsum + m * G, c->xs + m);
}

/* A decode step's few rows (M < 4): one block a part, each row alone; more rows: tiles of MANY_ROWS rows x MANY_BLOCKS
   blocks. Measured on Zen 5, 2 threads: parts of four blocks (AVX-512) decoded the default model 10 % slower (onnx
   tg128 275-298 against 317-336 tok/s, three alternating rounds; int4_native.measure's one-row pass 0.91-0.97 against
   0.77-0.93 ms), likely because they split its 576-output matrices (36 blocks) 5 : 4 between two threads; on AVX2,
   two blocks at once spill their 16-bit sums (1.2 against 0.81-0.88 ms a pass). */
static int64_t int4_parts(const struct int4_call *c) {
    int64_t NB = (c->w->N + 15) / 16;
    return c->M < 4 ? NB : (NB + MANY_BLOCKS - 1) / MANY_BLOCKS;
}

static void int4_part(const struct int4_call *c, int64_t q) {
    int eight = c->bits == 8;
    tile_fn one_block = eight ? int8_one_block : int4_one_block, many_rows = eight ? int8_many_rows : int4_many_rows;
    int64_t N = c->w->N, K = c->w->K, G = K / GROUP, NB = (N + 15) / 16, bb = K * (eight ? 16 : 8), sb = G * 32;
    int64_t M = c->M;
    const int8_t *hi = c->hi, *lo = c->lo;
    const float *gsum = c->gsum;
    const double *xs = c->xs;
    const uint8_t *packed = c->w->packed;
    const uint16_t *sl = c->w->scales_lows;
    float *y = c->y;
    acc4_t acc[MANY_ROWS * MANY_BLOCKS * VECS_PER_BLOCK];
    if (M < 4) { /* part q: block q */
        for (int64_t m = 0; m < M; m++) {
            one_block(hi + m * K, lo + m * K, gsum + m * G, K, packed + q * bb, bb, sl + q * sb, sb, acc);
            int4_store(acc, xs[m], y + m * N + q * 16, N - q * 16);
        }
        return;
    }
    int64_t b0 = q * MANY_BLOCKS, nb = NB - b0 < MANY_BLOCKS ? NB - b0 : MANY_BLOCKS;
    for (int64_t m0 = 0; m0 < M; m0 += MANY_ROWS) {
        if (nb == MANY_BLOCKS && M - m0 >= MANY_ROWS) {
            many_rows(hi + m0 * K, lo + m0 * K, gsum + m0 * G, K, packed + b0 * bb, bb, sl + b0 * sb, sb, acc);
            for (int r = 0; r < MANY_ROWS; r++)
                for (int b = 0; b < MANY_BLOCKS; b++)
                    int4_store(acc + (r * MANY_BLOCKS + b) * VECS_PER_BLOCK, xs[m0 + r],
                               y + (m0 + r) * N + (b0 + b) * 16, N - (b0 + b) * 16);
        } else {
            for (int64_t m = m0; m < M && m < m0 + MANY_ROWS; m++)
                for (int64_t b = b0; b < b0 + nb; b++) {
                    one_block(hi + m * K, lo + m * K, gsum + m * G, K, packed + b * bb, bb, sl + b * sb, sb, acc);
                    int4_store(acc, xs[m], y + m * N + b * 16, N - b * 16);
                }
        }
    }
}

void gptcli_int4_mm(const float *x, const struct gptcli_int4_matrix *w, float *y, int64_t M, uint8_t *work,
                    int threads) {
    struct int4_call c = int4_setup(x, w, y, M, work, 4);
    int64_t parts = int4_parts(&c);
    if (M < 4) /* a decode step's few rows: here, without a barrier in the parallel region (as gptcli_int8_mm) */
        for (int64_t m = 0; m < M; m++) int4_quantize(&c, m);
#pragma omp parallel num_threads(threads)
    {
        if (M >= 4) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) int4_quantize(&c, m);
        }
#pragma omp for schedule(static)
        for (int64_t q = 0; q < parts; q++) int4_part(&c, q);
    }
}
#endif

/* -------------------------------------------------------------------- the int4 product as an ONNX Runtime operator

   ai.gptcli.Int4MatMul(X float [..., K], codes uint8 [ceil(N/16), K/8, 16, 4], scales_lows float16 [ceil(N/16), K/32,
   2, 16]) -> Y float [..., N], attribute N: gptcli_int4_mm in an exported int4 graph (the layout above), in place of
   MatMulNBits and its Q4_1 block sums. Attribute bits 8 (a Q8_0 head): codes a byte each, [ceil(N/16), K/4, 16, 4],
   the 8-bit tiles. The parts of a product (int4_quantize, int4_part) run on the session's own
   intra-op threads (KernelContext_ParallelFor): an OpenMP team beside ONNX Runtime's spinning pool fought it for the
   two cores (decode 74-98 tok/s against 227-231 with MatMulNBits; 308-317 on the pool).
   RegisterCustomOps is the entry point of ONNX Runtime's SessionOptions.register_custom_ops_library. ONNX Runtime's C
   API is a table of function pointers that only ever grows at its end (onnxruntime_c_api.cc asserts each version's
   last place), so the few called here are named by their fixed place in it (ORT_FN); the operator's own table
   (struct ort_custom_op) is its version-8 part, which ONNX Runtime reads as such. Both builds have it. */

#if ISA > 0
#include <stdlib.h>

typedef void (*ort_any_fn)(void);
struct ort_api_base {
    const ort_any_fn *(*get_api)(uint32_t version);
    const char *(*get_version_string)(void);
};
#define ORT_API_VERSION_USED 17 /* ONNX Runtime 1.17: KernelContext_ParallelFor; every other entry is version 1's */
#define ORT_CREATE_CUSTOM_OP_DOMAIN 26
#define ORT_CUSTOM_OP_DOMAIN_ADD 27
#define ORT_ADD_CUSTOM_OP_DOMAIN 28
#define ORT_GET_TENSOR_MUTABLE_DATA 51
#define ORT_GET_DIMENSIONS_COUNT 61
#define ORT_GET_DIMENSIONS 62
#define ORT_GET_TENSOR_TYPE_AND_SHAPE 65
#define ORT_KERNEL_INFO_GET_ATTRIBUTE_INT64 86
#define ORT_KERNEL_CONTEXT_GET_INPUT 90
#define ORT_KERNEL_CONTEXT_GET_OUTPUT 91
#define ORT_RELEASE_STATUS 93
#define ORT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO 99
#define ORT_KERNEL_CONTEXT_PARALLEL_FOR 274
#define ORT_FN(api, index, type) ((type)(api)[index])
#define ORT_TENSOR_FLOAT 1
#define ORT_TENSOR_UINT8 2
#define ORT_TENSOR_FLOAT16 10
#define MAX_DIMS 8

struct ort_custom_op { /* version 8 of ONNX Runtime's OrtCustomOp: the fields to its output characteristics */
    uint32_t version;
    void *(*create_kernel)(const struct ort_custom_op *op, const ort_any_fn *api, const void *info);
    const char *(*get_name)(const struct ort_custom_op *op);
    const char *(*get_execution_provider_type)(const struct ort_custom_op *op);
    int (*get_input_type)(const struct ort_custom_op *op, size_t index);
    size_t (*get_input_type_count)(const struct ort_custom_op *op);
    int (*get_output_type)(const struct ort_custom_op *op, size_t index);
    size_t (*get_output_type_count)(const struct ort_custom_op *op);
    void (*kernel_compute)(void *kernel, void *context);
    void (*kernel_destroy)(void *kernel);
    int (*get_input_characteristic)(const struct ort_custom_op *op, size_t index);  /* version 8 on, but */
    int (*get_output_characteristic)(const struct ort_custom_op *op, size_t index); /* read by every version */
};

struct int4_op_kernel {
    const ort_any_fn *api;
    int64_t N;
    int64_t bits; /* 4 (absent), or 8: codes a byte each, [ceil(N/16)][K/4][16][4] */
};

static void release(const ort_any_fn *api, void *status) {
    if (status) ORT_FN(api, ORT_RELEASE_STATUS, void (*)(void *))(status);
}

static void *int4_op_create(const struct ort_custom_op *op, const ort_any_fn *api, const void *info) {
    (void)op;
    struct int4_op_kernel *kernel = calloc(1, sizeof *kernel);
    if (!kernel) return NULL;
    kernel->api = api;
    typedef void *(*get_int64_fn)(const void *, const char *, int64_t *);
    kernel->bits = 4;
    release(api, ORT_FN(api, ORT_KERNEL_INFO_GET_ATTRIBUTE_INT64, get_int64_fn)(info, "N", &kernel->N));
    release(api, ORT_FN(api, ORT_KERNEL_INFO_GET_ATTRIBUTE_INT64, get_int64_fn)(info, "bits", &kernel->bits));
    return kernel;
}

/* The dimensions of a tensor (at most MAX_DIMS): their count, or -1. */
static int tensor_dims(const ort_any_fn *api, const void *value, int64_t dims[MAX_DIMS]) {
    void *info = NULL;
    size_t count = 0;
    int ok = 0;
    void *status = ORT_FN(api, ORT_GET_TENSOR_TYPE_AND_SHAPE, void *(*)(const void *, void **))(value, &info);
    if (!status) {
        status = ORT_FN(api, ORT_GET_DIMENSIONS_COUNT, void *(*)(const void *, size_t *))(info, &count);
        if (!status && count >= 1 && count <= MAX_DIMS) {
            status = ORT_FN(api, ORT_GET_DIMENSIONS, void *(*)(const void *, int64_t *, size_t))(info, dims, count);
            ok = !status;
        }
    }
    release(api, status);
    if (info) ORT_FN(api, ORT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(void *))(info);
    return ok ? (int)count : -1;
}

static void *tensor_data(const ort_any_fn *api, const void *value) {
    void *data = NULL;
    release(api, ORT_FN(api, ORT_GET_TENSOR_MUTABLE_DATA, void *(*)(const void *, void **))(value, &data));
    return data;
}

static void int4_op_quantize(void *call, size_t m) { int4_quantize(call, (int64_t)m); }
static void int4_op_part(void *call, size_t q) { int4_part(call, (int64_t)q); }

/* fn(call, 0 .. count - 1) on the session's own threads (its intra-op pool: no second pool to fight over the cores),
   or here one by one where ONNX Runtime says it cannot. */
static void on_pool(const ort_any_fn *api, void *context, void (*fn)(void *, size_t), size_t count, void *call) {
    typedef void *(*parallel_for_fn)(const void *, void (*)(void *, size_t), size_t, size_t, void *);
    void *status = ORT_FN(api, ORT_KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_fn)(context, fn, count, 0, call);
    if (status) {
        release(api, status);
        for (size_t i = 0; i < count; i++) fn(call, i);
    }
}

static void int4_op_compute(void *opaque, void *context) {
    const struct int4_op_kernel *kernel = opaque;
    const ort_any_fn *api = kernel->api;
    typedef void *(*get_input_fn)(void *, size_t, const void **);
    const void *inputs[3] = {NULL, NULL, NULL};
    for (size_t i = 0; i < 3; i++)
        release(api, ORT_FN(api, ORT_KERNEL_CONTEXT_GET_INPUT, get_input_fn)(context, i, &inputs[i]));
    int64_t xd[MAX_DIMS], cd[MAX_DIMS], sd[MAX_DIMS];
    int xn = inputs[0] ? tensor_dims(api, inputs[0], xd) : -1;
    int cn = inputs[1] ? tensor_dims(api, inputs[1], cd) : -1;
    int sn = inputs[2] ? tensor_dims(api, inputs[2], sd) : -1;
    if (xn < 1) return;
    int64_t N = kernel->N, K = xd[xn - 1], M = 1;
    for (int i = 0; i < xn - 1; i++) M *= xd[i];
    xd[xn - 1] = N;
    void *output = NULL;
    typedef void *(*get_output_fn)(void *, size_t, const int64_t *, size_t, void **);
    release(api, ORT_FN(api, ORT_KERNEL_CONTEXT_GET_OUTPUT, get_output_fn)(context, 0, xd, (size_t)xn, &output));
    float *y = output ? tensor_data(api, output) : NULL;
    if (!y || M == 0 || N == 0) return;
    int64_t NB = (N + 15) / 16;
    int64_t per_lane = kernel->bits == 8 ? 4 : 8; /* inputs a 4-byte lane of a block holds */
    int fits = (kernel->bits == 4 || kernel->bits == 8) && cn == 4 && sn == 4 && K % GROUP == 0 && cd[0] == NB &&
               cd[1] * per_lane == K && cd[2] == 16 && cd[3] == 4 && sd[0] == NB && sd[1] * GROUP == K && sd[2] == 2 &&
               sd[3] == 16;
    uint8_t *work = fits ? malloc((size_t)(M * (2 * K + 4 * (K / GROUP) + 8))) : NULL;
    if (!work) { /* shapes the exporter never writes, or no memory: NaN, never a read out of bounds */
        for (int64_t i = 0; i < M * N; i++) y[i] = NAN;
        return;
    }
    struct gptcli_int4_matrix w = {tensor_data(api, inputs[1]), tensor_data(api, inputs[2]), N, K};
    struct int4_call c = int4_setup(tensor_data(api, inputs[0]), &w, y, M, work, (int)kernel->bits);
    if (M < 4) /* a decode step's rows: quicker here than a trip through the pool */
        for (int64_t m = 0; m < M; m++) int4_quantize(&c, m);
    else
        on_pool(api, context, int4_op_quantize, (size_t)M, &c);
    on_pool(api, context, int4_op_part, (size_t)int4_parts(&c), &c);
    free(work);
}

static void int4_op_destroy(void *kernel) { free(kernel); }
static const char *int4_op_name(const struct ort_custom_op *op) { (void)op; return "Int4MatMul"; }
static const char *int4_op_provider(const struct ort_custom_op *op) { (void)op; return NULL; } /* the CPU's */
static int int4_op_input_type(const struct ort_custom_op *op, size_t index) {
    (void)op;
    return index == 0 ? ORT_TENSOR_FLOAT : index == 1 ? ORT_TENSOR_UINT8 : ORT_TENSOR_FLOAT16;
}
static size_t int4_op_input_count(const struct ort_custom_op *op) { (void)op; return 3; }
static int int4_op_output_type(const struct ort_custom_op *op, size_t index) {
    (void)op;
    (void)index;
    return ORT_TENSOR_FLOAT;
}
static size_t int4_op_output_count(const struct ort_custom_op *op) { (void)op; return 1; }
static int int4_op_required(const struct ort_custom_op *op, size_t index) { (void)op; (void)index; return 0; }

static const struct ort_custom_op int4_op = {
    8, int4_op_create, int4_op_name, int4_op_provider, int4_op_input_type, int4_op_input_count, int4_op_output_type,
    int4_op_output_count, int4_op_compute, int4_op_destroy, int4_op_required, int4_op_required,
};

void *RegisterCustomOps(void *options, const struct ort_api_base *base) {
    const ort_any_fn *api = base->get_api(ORT_API_VERSION_USED);
    if (!api) return NULL; /* cannot say so: no table to make a status with; the graph then fails to load */
    void *domain = NULL;
    void *status = ORT_FN(api, ORT_CREATE_CUSTOM_OP_DOMAIN, void *(*)(const char *, void **))("ai.gptcli", &domain);
    if (!status) status = ORT_FN(api, ORT_CUSTOM_OP_DOMAIN_ADD, void *(*)(void *, const void *))(domain, &int4_op);
    if (!status) status = ORT_FN(api, ORT_ADD_CUSTOM_OP_DOMAIN, void *(*)(void *, void *))(options, domain);
    return status; /* the domain lives as long as the process: sessions keep using it */
}
#endif

/* ---- Attention for the torch backend (native_attention.py), over one sequence's cache at a time. ----

   gptcli_decode_attention: for each sequence b and key head h, the new key and value rows are written into the
   cache at position length[b] - 1, then the `group` query heads of h attend over positions [first, length[b])
   (first: 0, or the sliding window's start). gptcli_prefill_attention: one sequence's chunk of n positions, each
   position over the ones before it (within the window). Scores in float32, a softmax with this file's own exp, and
   the weighted sum of the values, divided by the softmax's sum. Each (sequence, key head) or block of positions
   is computed alone, in the same order whatever else is in the call and however many threads run it, so a
   sequence gets the same bits alone or in a batch. Caches are [kv_heads][capacity][hd], float32 or bfloat16
   (`bf16`). torch's SDPA read a 2,000-position bf16 cache at ~12 GB/s a decode call here (its per-block GEMM calls
   dominate a 3-row query), and ran a 512-position chunk at 70-140 GFLOP/s. */

#if ISA > 0
#if ISA == 2
#define AW 16
typedef __m512 vecf;
static inline vecf av_load(const void *p, int64_t i, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}
#define av_set1 _mm512_set1_ps
#define av_loadf _mm512_loadu_ps
#define av_storef _mm512_storeu_ps
#define av_fma _mm512_fmadd_ps
#define av_add _mm512_add_ps
#define av_sub _mm512_sub_ps
#define av_mul _mm512_mul_ps
#define av_max _mm512_max_ps
#define av_sum _mm512_reduce_add_ps
#define av_hmax _mm512_reduce_max_ps
#define av_round(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define av_pow2(n) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define av_zero_below(x, limit, r) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_GE_OQ), r)
#else
#define AW 8
typedef __m256 vecf;
static inline vecf av_load(const void *p, int64_t i, int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}
static inline float av_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define av_hmax max8_ps /* the int4 AVX2 path's */
#define av_set1 _mm256_set1_ps
#define av_loadf _mm256_loadu_ps
#define av_storef _mm256_storeu_ps
#define av_fma _mm256_fmadd_ps
#define av_add _mm256_add_ps
#define av_sub _mm256_sub_ps
#define av_mul _mm256_mul_ps
#define av_max _mm256_max_ps
#define av_round(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define av_pow2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define av_zero_below(x, limit, r) _mm256_and_ps(_mm256_cmp_ps(x, limit, _CMP_GE_OQ), r)
#endif
#define ATTN_ROWS 8  /* query heads of one group held at once */
#define ATTN_BLOCK 64 /* keys whose values are summed a block at a time (stay in L1 across the head's chunks) */

/* exp(x) for x <= 0: 2^n * p(r), x = n ln2 + r (Cephes' expf polynomial); 0 below -87 (and for -inf). */
static inline vecf av_exp(vecf x) {
    const vecf limit = av_set1(-87.0f);
    vecf c = av_max(x, limit);
    vecf n = av_round(av_mul(c, av_set1(1.44269504088896341f)));
    vecf r = av_fma(n, av_set1(-0.693359375f), c);
    r = av_fma(n, av_set1(2.12194440e-4f), r);
    vecf p = av_set1(1.9875691500e-4f);
    p = av_fma(p, r, av_set1(1.3981999507e-3f));
    p = av_fma(p, r, av_set1(8.3334519073e-3f));
    p = av_fma(p, r, av_set1(4.1665795894e-2f));
    p = av_fma(p, r, av_set1(1.6666665459e-1f));
    p = av_fma(p, r, av_set1(5.0000001201e-1f));
    p = av_fma(p, av_mul(r, r), av_add(r, av_set1(1.0f)));
    return av_zero_below(x, limit, av_mul(p, av_pow2(n)));
}

static inline float attn_scalar(const void *p, int64_t i, int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Four sums at once: lane i of the result is the sum of v[i]'s lanes. */
static inline __m128 av_sum4(const vecf v[4]) {
#if ISA == 2
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44), _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44), _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
    __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    __m128 a = _mm512_castps512_ps128(u), b = _mm512_extractf32x4_ps(u, 1);
    __m128 c = _mm512_extractf32x4_ps(u, 2), d = _mm512_extractf32x4_ps(u, 3);
#else
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v[0]), _mm256_extractf128_ps(v[0], 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v[1]), _mm256_extractf128_ps(v[1], 1));
    __m128 c = _mm_add_ps(_mm256_castps256_ps128(v[2]), _mm256_extractf128_ps(v[2], 1));
    __m128 d = _mm_add_ps(_mm256_castps256_ps128(v[3]), _mm256_extractf128_ps(v[3], 1));
#endif
    return _mm_hadd_ps(_mm_hadd_ps(a, b), _mm_hadd_ps(c, d));
}

/* Scores of `rows` query rows (q, qs apart) against n keys, into s (rows of `pad`, the tail -inf), scaled.
   Four keys a pass, their sums folded together; `rows` is a constant where it is inlined. */
static inline __attribute__((always_inline)) void attn_scores(const float *q, int64_t qs, const int64_t rows,
                                                              const void *K, int64_t n, int64_t hd, float scale,
                                                              const int bf16, float *s, int64_t pad) {
    int64_t j = 0;
    if (hd % AW == 0) {
        const __m128 scale4 = _mm_set1_ps(scale);
        for (; j + 4 <= n; j += 4) {
            for (int64_t r0 = 0; r0 < rows; r0 += 4) { /* four rows at a time: 16 sums in registers */
                const int64_t some = rows - r0 < 4 ? rows - r0 : 4;
                vecf acc[4][4];
                for (int64_t r = 0; r < some; r++)
                    for (int t = 0; t < 4; t++) acc[r][t] = av_set1(0.0f);
                for (int64_t c = 0; c < hd; c += AW) {
                    vecf k[4];
                    for (int t = 0; t < 4; t++) k[t] = av_load(K, (j + t) * hd + c, bf16);
                    for (int64_t r = 0; r < some; r++) {
                        vecf x = av_loadf(q + (r0 + r) * qs + c);
                        for (int t = 0; t < 4; t++) acc[r][t] = av_fma(x, k[t], acc[r][t]);
                    }
                }
                for (int64_t r = 0; r < some; r++)
                    _mm_storeu_ps(s + (r0 + r) * pad + j, _mm_mul_ps(av_sum4(acc[r]), scale4));
            }
        }
    }
    for (; j < n; j++)
        for (int64_t r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < hd; d++) acc += q[r * qs + d] * attn_scalar(K, j * hd + d, bf16);
            s[r * pad + j] = acc * scale;
        }
    for (int64_t r = 0; r < rows; r++)
        for (j = n; j < pad; j++) s[r * pad + j] = -INFINITY;
}

/* Row r sees keys [lo[r], hi[r]) of the n scored: the rest become -inf (NULL: every row sees all n). */
static inline void attn_mask(float *s, int64_t rows, int64_t pad, const int64_t *lo, const int64_t *hi) {
    if (!lo) return;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < lo[r]; j++) s[r * pad + j] = -INFINITY;
        for (int64_t j = hi[r]; j < pad; j++) s[r * pad + j] = -INFINITY;
    }
}

/* Each score row -> exp(score - max) in place, and the row's sum into `sums`. */
static inline void attn_softmax(float *s, int64_t rows, int64_t pad, float *sums) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * pad;
        vecf m = av_set1(-INFINITY);
        for (int64_t j = 0; j < pad; j += AW) m = av_max(m, av_loadf(row + j));
        vecf top = av_set1(av_hmax(m)), total = av_set1(0.0f);
        for (int64_t j = 0; j < pad; j += AW) {
            vecf e = av_exp(av_sub(av_loadf(row + j), top));
            av_storef(row + j, e);
            total = av_add(total, e);
        }
        sums[r] = av_sum(total);
    }
}

/* out rows (hd floats each, os apart) = sum over n keys of p[r][j] * V[j], then / sums[r]. */
static inline __attribute__((always_inline)) void attn_values(const float *p, const int64_t rows, int64_t pad,
                                                              const void *V, int64_t n, int64_t hd, const int bf16,
                                                              const float *sums, float *out, int64_t os) {
    for (int64_t r = 0; r < rows; r++) memset(out + r * os, 0, (size_t)hd * sizeof(float));
    for (int64_t j0 = 0; j0 < n; j0 += ATTN_BLOCK) {
        int64_t j1 = j0 + ATTN_BLOCK < n ? j0 + ATTN_BLOCK : n;
        if (hd % AW == 0) {
            for (int64_t c = 0; c < hd; c += AW) {
                vecf acc[ATTN_ROWS];
                for (int64_t r = 0; r < rows; r++) acc[r] = av_loadf(out + r * os + c);
                for (int64_t j = j0; j < j1; j++) {
                    vecf v = av_load(V, j * hd + c, bf16);
                    for (int64_t r = 0; r < rows; r++) acc[r] = av_fma(av_set1(p[r * pad + j]), v, acc[r]);
                }
                for (int64_t r = 0; r < rows; r++) av_storef(out + r * os + c, acc[r]);
            }
        } else {
            for (int64_t j = j0; j < j1; j++)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t d = 0; d < hd; d++)
                        out[r * os + d] += p[r * pad + j] * attn_scalar(V, j * hd + d, bf16);
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t d = 0; d < hd; d++) out[r * os + d] /= sums[r];
}

static inline __attribute__((always_inline)) void attn_rows(const float *q, int64_t qs, const int64_t rows,
                                                            const void *K, const void *V, int64_t n, int64_t hd,
                                                            float scale, const int bf16, float *scores, float *out,
                                                            int64_t os, const int64_t *lo, const int64_t *hi) {
    int64_t pad = (n + AW - 1) / AW * AW;
    float sums[ATTN_ROWS];
    attn_scores(q, qs, rows, K, n, hd, scale, bf16, scores, pad);
    attn_mask(scores, rows, pad, lo, hi);
    attn_softmax(scores, rows, pad, sums);
    attn_values(scores, rows, pad, V, n, hd, bf16, sums, out, os);
}

/* `count` query rows (qs apart) over n keys from K/V, out rows os apart, in passes of 8, 4 or fewer rows, each its own
   compiled loop (its sums in registers: 1-4 and 8 only, which keeps the build ~1 s); lo/hi (or NULL) the keys each
   row sees. */
#define ATTN_CASE(R)                                                                                      \
    case R:                                                                                               \
        attn_rows(q + r0 * qs, qs, R, K, V, n, hd, scale, bf16, scores, out + r0 * os, os, lo, hi);       \
        break;

static void attn_block(const float *q, int64_t qs, int64_t count, const void *K, const void *V, int64_t n, int64_t hd,
                       float scale, int bf16, float *scores, float *out, int64_t os, const int64_t *lo,
                       const int64_t *hi) {
    for (int64_t r0 = 0, rows; r0 < count; r0 += rows, lo = lo ? lo + rows : lo, hi = hi ? hi + rows : hi) {
        rows = count - r0 >= 8 ? 8 : count - r0 >= 4 ? 4 : count - r0; /* 5-7: a pass of 4, then the rest */
        switch (rows) {
            ATTN_CASE(1) ATTN_CASE(2) ATTN_CASE(3) ATTN_CASE(4) ATTN_CASE(8)
        }
    }
}

/* A thread's score rows (ATTN_ROWS of `pad` floats), or NULL with *failed set (the caller's output left unwritten). */
static float *attn_buffer(int64_t pad, int *failed) {
    float *scores = malloc((size_t)(ATTN_ROWS * pad) * sizeof(float));
    if (!scores) {
#pragma omp atomic write
        *failed = 1;
    }
    return scores;
}

/* Decode rows: q float32 [heads][B][hd], the new rows [kv_heads][B][hd] in the cache's type, out float32
   [B][heads][hd]; keys/values/capacity/length: each sequence's cache addresses (this layer's), its capacity and its
   length counting the new position. Returns 0, or 1 where a thread could not allocate its scores (out unwritten). */
int gptcli_decode_attention(const float *q, const void *new_k, const void *new_v, const int64_t *keys,
                             const int64_t *values, const int64_t *capacity, const int64_t *length, int64_t B,
                             int64_t heads, int64_t kv_heads, int64_t hd, int64_t window, float scale, int bf16,
                             float *out, int threads) {
    const int64_t group = heads / kv_heads, items = B * kv_heads;
    const size_t es = bf16 ? 2 : 4, row = (size_t)hd * es;
    int64_t longest = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        longest = length[b] > longest ? length[b] : longest;
        work += length[b] * kv_heads;
    }
    const int64_t pad = (longest + AW - 1) / AW * AW;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (items > 1 && work >= 4096)
    {
        float *scores = attn_buffer(pad, &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!scores) continue;
            const int64_t b = it / kv_heads, h = it % kv_heads, n = length[b];
            const int64_t first = window > 0 && n > window ? n - window : 0;
            char *K = (char *)(intptr_t)keys[b] + (size_t)(h * capacity[b]) * row;
            char *V = (char *)(intptr_t)values[b] + (size_t)(h * capacity[b]) * row;
            memcpy(K + (size_t)(n - 1) * row, (const char *)new_k + (size_t)(h * B + b) * row, row);
            memcpy(V + (size_t)(n - 1) * row, (const char *)new_v + (size_t)(h * B + b) * row, row);
            attn_block(q + (h * group * B + b) * hd, B * hd, group, K + (size_t)first * row, V + (size_t)first * row,
                       n - first, hd, scale, bf16, scores, out + (b * heads + h * group) * hd, hd, NULL, NULL);
        }
        free(scores);
    }
    return failed;
}

/* A prompt's chunk of one sequence: n new positions from `start`, its keys and values ([kv_heads][n][hd], the cache's
   type) written into the cache ([kv_heads][capacity][hd]) first; q float32 [heads][n][hd], out float32
   [n][heads][hd]. Position p sees the positions (p - window, p] (window 0: all up to p). Work items are one query
   head's ATTN_ROWS consecutive positions, scored against the keys the block's rows see together, the rest masked.
   Returns 0, or 1 where a thread could not allocate its scores (out unwritten). */
int gptcli_prefill_attention(const float *q, const void *new_k, const void *new_v, void *keys, void *values,
                              int64_t capacity, int64_t start, int64_t n, int64_t heads, int64_t kv_heads, int64_t hd,
                              int64_t window, float scale, int bf16, float *out, int threads) {
    const int64_t group = heads / kv_heads, blocks = (n + ATTN_ROWS - 1) / ATTN_ROWS, items = heads * blocks;
    const size_t es = bf16 ? 2 : 4, row = (size_t)hd * es;
    for (int64_t h = 0; h < kv_heads; h++) {
        memcpy((char *)keys + (size_t)(h * capacity + start) * row, (const char *)new_k + (size_t)(h * n) * row,
               (size_t)n * row);
        memcpy((char *)values + (size_t)(h * capacity + start) * row, (const char *)new_v + (size_t)(h * n) * row,
               (size_t)n * row);
    }
    const int64_t pad = (start + n + AW - 1) / AW * AW;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (items > 1)
    {
        float *scores = attn_buffer(pad, &failed);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!scores) continue;
            const int64_t hq = it / blocks, p0 = (it % blocks) * ATTN_ROWS, h = hq / group;
            const int64_t count = n - p0 < ATTN_ROWS ? n - p0 : ATTN_ROWS, first_pos = start + p0;
            const int64_t first = window > 0 && first_pos + 1 > window ? first_pos + 1 - window : 0;
            const int64_t seen = first_pos + count - first; /* keys [first, last position] */
            int64_t lo[ATTN_ROWS], hi[ATTN_ROWS];
            for (int64_t r = 0; r < count; r++) {
                const int64_t p = first_pos + r;
                lo[r] = (window > 0 && p + 1 > window ? p + 1 - window : 0) - first;
                hi[r] = p + 1 - first;
            }
            attn_block(q + (hq * n + p0) * hd, hd, count, (const char *)keys + (size_t)(h * capacity + first) * row,
                       (const char *)values + (size_t)(h * capacity + first) * row, seen, hd, scale, bf16, scores,
                       out + (p0 * heads + hq) * hd, heads * hd, lo, hi);
        }
        free(scores);
    }
    return failed;
}
#endif
