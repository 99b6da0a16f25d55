/* Winograd F(4x4, 3x3) and F(2x2, 3x3) input and output transforms for FILM's CPU convs.
 *
 * film_fast/ops/winograd.py runs a 3x3 conv as V = B^T d B per input tile, 36 (or 16) GEMMs
 * M[k] = V[k] U[k], and Y = A^T M A per output tile. The GEMMs are MKL's; the transforms are
 * pure data movement plus a few adds per element, so their cost is memory traffic. As ~50
 * PyTorch elementwise ops each transform passes over its data ~15 times; here it is one pass
 * (read the input once, write V once), vectorised over channels, which are contiguous (NHWC).
 *
 * Layouts (float32, element strides; channels must be contiguous):
 *   x    [B, H, W, C] at x + b*sb + y*sh + x*sw + c          (the conv input, NHWC)
 *   v    [T*T, B*n*tiles_x, C] contiguous                    (T = m + 2; n = ty1 - ty0)
 *   prod [T*T, B*n*tiles_x, K] contiguous                    (K = output channels)
 *   out  [B, H, W, K] at out + b*ob + y*oh + x*ow + k        (the conv output, NHWC)
 * Tile (b, ty, tx) with ty in [ty0, ty1) covers output rows m*ty .. m*ty + m - 1 and reads
 * input rows m*ty - 1 .. m*ty + m (zero outside the image: 'same' padding 1); its index in
 * v and prod is (b*n + ty - ty0)*tiles_x + tx. Each call handles the tile indices [i0, i1),
 * split between `threads` OpenMP threads. Built with -fopenmp, this library's libgomp.so.1 is
 * the one PyTorch's CPU wheels already loaded (same soname), so these loops and PyTorch's ops
 * share one thread pool: a second pool's threads would spin against PyTorch's idle ones on
 * every switch (measured: a 2-thread transform ran no faster than 1 thread between bmm calls).
 * Without OpenMP the pragmas are ignored and each call runs on the calling thread.
 *
 * The matrices (Lavin & Gray 2016; interpolation points 0, +-1, +-2 for m = 4):
 *   m = 4  B^T rows  [4 0 -5 0 1 0] [0 -4 -4 1 1 0] [0 4 -4 -1 1 0] [0 -2 -1 2 1 0]
 *                    [0 2 -1 -2 1 0] [0 4 0 -5 0 1]
 *          A^T rows  [1 1 1 1 1 0] [0 1 -1 2 -2 0] [0 1 1 4 4 0] [0 1 -1 8 -8 1]
 *   m = 2  B^T rows  [1 0 -1 0] [0 1 1 0] [0 -1 1 0] [0 1 0 -1]
 *          A^T rows  [1 1 1 0] [0 1 -1 -1]
 * written below with shared partial sums (B^T's rows 1-4 and A^T's rows pair up as s +- d).
 */
#include <stddef.h>
#include <string.h>

typedef long long i64;

/* Channels per block: 6x6 tiles of 64 floats (9 KiB) and their row transform stay in L1. */
#define CB 64
#define TMAX 6

/* The 1D B^T (m = 4) of t[0..5] at stride `s`, into o[0..5] at stride `so`, for n channels. */
static inline void bt4(const float *restrict t, i64 s, float *restrict o, i64 so, int n) {
    for (int c = 0; c < n; ++c) {
        float d0 = t[c], d1 = t[s + c], d2 = t[2 * s + c], d3 = t[3 * s + c];
        float d4 = t[4 * s + c], d5 = t[5 * s + c];
        float p = d4 - 4.0f * d2, q = d3 - 4.0f * d1;   /* rows 1, 2 */
        float r = d4 - d2, u = 2.0f * (d3 - d1);         /* rows 3, 4 */
        o[c] = 4.0f * d0 - 5.0f * d2 + d4;
        o[so + c] = p + q;
        o[2 * so + c] = p - q;
        o[3 * so + c] = r + u;
        o[4 * so + c] = r - u;
        o[5 * so + c] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

static inline void bt2(const float *restrict t, i64 s, float *restrict o, i64 so, int n) {
    for (int c = 0; c < n; ++c) {
        float d0 = t[c], d1 = t[s + c], d2 = t[2 * s + c], d3 = t[3 * s + c];
        o[c] = d0 - d2;
        o[so + c] = d1 + d2;
        o[2 * so + c] = d2 - d1;
        o[3 * so + c] = d1 - d3;
    }
}

/* The 1D A^T of t[0..T-1] at stride `s` into o[0..m-1] at stride `so`. */
static inline void at4(const float *restrict t, i64 s, float *restrict o, i64 so, int n) {
    for (int c = 0; c < n; ++c) {
        float m0 = t[c], m1 = t[s + c], m2 = t[2 * s + c], m3 = t[3 * s + c];
        float m4 = t[4 * s + c], m5 = t[5 * s + c];
        float s1 = m1 + m2, d1 = m1 - m2, s2 = m3 + m4, d2 = m3 - m4;
        o[c] = m0 + s1 + s2;
        o[so + c] = d1 + 2.0f * d2;
        o[2 * so + c] = s1 + 4.0f * s2;
        o[3 * so + c] = d1 + 8.0f * d2 + m5;
    }
}

static inline void at2(const float *restrict t, i64 s, float *restrict o, i64 so, int n) {
    for (int c = 0; c < n; ++c) {
        float m0 = t[c], m1 = t[s + c], m2 = t[2 * s + c], m3 = t[3 * s + c];
        o[c] = m0 + m1 + m2;
        o[so + c] = m1 - m2 - m3;
    }
}

/* B^T (input side) or A^T (output side, `out` != 0) for tile size m, along one axis. */
static inline void tf(int out, int m, const float *restrict t, i64 s, float *restrict o, i64 so,
                      int n) {
    if (out)
        (m == 4 ? at4 : at2)(t, s, o, so, n);
    else
        (m == 4 ? bt4 : bt2)(t, s, o, so, n);
}
#define bt(...) tf(0, __VA_ARGS__)
#define at(...) tf(1, __VA_ARGS__)

void film_wino_input(const float *x, i64 B, i64 H, i64 W, i64 C, i64 sb, i64 sh, i64 sw,
                     int m, i64 ty0, i64 ty1, i64 tiles_x, float *v, i64 i0, i64 i1,
                     int threads) {
    const int t = m + 2;
    const i64 n = ty1 - ty0, tiles = B * n * tiles_x;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 idx = i0; idx < i1; ++idx) {
        float d[TMAX * TMAX * CB];  /* the tile, [row][col][c] */
        float r[TMAX * TMAX * CB];  /* rows transformed, [i][col][c] */
        float w[TMAX * CB];         /* one row of r transformed along columns, [j][c] */
        i64 tx = idx % tiles_x, rest = idx / tiles_x;
        i64 ty = ty0 + rest % n, b = rest / n;
        i64 y0 = m * ty - 1, x0 = m * tx - 1;
        const float *xb = x + b * sb;
        for (i64 c0 = 0; c0 < C; c0 += CB) {
            int nc = (int)(C - c0 < CB ? C - c0 : CB);
            for (int k = 0; k < t; ++k) {
                i64 y = y0 + k;
                for (int j = 0; j < t; ++j) {
                    i64 xx = x0 + j;
                    float *dst = d + (k * t + j) * CB;
                    if (y < 0 || y >= H || xx < 0 || xx >= W)
                        memset(dst, 0, sizeof(float) * (size_t)nc);
                    else
                        memcpy(dst, xb + y * sh + xx * sw + c0, sizeof(float) * (size_t)nc);
                }
            }
            /* rows: r[i][j] = sum_k B^T[i][k] d[k][j], per column j */
            for (int j = 0; j < t; ++j)
                bt(m, d + j * CB, (i64)t * CB, r + j * CB, (i64)t * CB, nc);
            /* columns: v[i][j] = sum_k B^T[j][k] r[i][k], written to V[i t + j, idx, c0:] */
            for (int i = 0; i < t; ++i) {
                bt(m, r + i * t * CB, CB, w, CB, nc);
                for (int j = 0; j < t; ++j)
                    memcpy(v + ((i64)(i * t + j) * tiles + idx) * C + c0, w + j * CB,
                           sizeof(float) * (size_t)nc);
            }
        }
    }
}

/* Y = A^T M A (+ bias, then LeakyReLU with `slope` if leaky != 0) of tiles [i0, i1), written
 * where the tile lies inside the H x W output. */
void film_wino_output(const float *prod, i64 B, i64 H, i64 W, i64 K, int m, i64 ty0, i64 ty1,
                      i64 tiles_x, const float *bias, int leaky, float slope, float *out,
                      i64 ob, i64 oh, i64 ow, i64 i0, i64 i1, int threads) {
    const int t = m + 2;
    const i64 n = ty1 - ty0, tiles = B * n * tiles_x;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 idx = i0; idx < i1; ++idx) {
        float mt[TMAX * TMAX * CB];  /* the products, [i][j][k] */
        float s[4 * TMAX * CB];      /* rows done, [a][j][k] */
        float y[4 * CB];             /* one output row, [p][k] */
        i64 tx = idx % tiles_x, rest = idx / tiles_x;
        i64 ty = ty0 + rest % n, b = rest / n;
        for (i64 k0 = 0; k0 < K; k0 += CB) {
            int nk = (int)(K - k0 < CB ? K - k0 : CB);
            for (int e = 0; e < t * t; ++e)
                memcpy(mt + e * CB, prod + ((i64)e * tiles + idx) * K + k0,
                       sizeof(float) * (size_t)nk);
            for (int j = 0; j < t; ++j)
                at(m, mt + j * CB, (i64)t * CB, s + j * CB, (i64)t * CB, nk);
            for (int a = 0; a < m; ++a) {
                i64 yy = m * ty + a;
                if (yy >= H)
                    break;
                at(m, s + a * t * CB, CB, y, CB, nk);
                for (int p = 0; p < m; ++p) {
                    i64 xx = m * tx + p;
                    if (xx >= W)
                        break;
                    float *dst = out + b * ob + yy * oh + xx * ow + k0;
                    const float *src = y + p * CB;
                    for (int c = 0; c < nk; ++c) {
                        float val = src[c] + (bias ? bias[k0 + c] : 0.0f);
                        dst[c] = (leaky && val < 0.0f) ? val * slope : val;
                    }
                }
            }
        }
    }
}
