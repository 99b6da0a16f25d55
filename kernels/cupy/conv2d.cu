// Epilogues of the CuPy backend's convolutions.
//
// The convolution GEMM itself runs in cuDNN (through torch, without bias): a hand-written
// CUDA convolution does not beat cuDNN's tensor-core kernels. Everything around it is fused
// here into one pass over the GEMM output z:
//
//   film_bias_act_forward         y = act(z + bias)                   (conv2d)
//   film_bias_act_levels_forward  the same for several pyramid levels in one launch
//   film_bias_act_pool_forward    y = act(z + bias) and avg_pool2x2(y) (conv2d_pool)
//   film_bias_act_backward        dz = (dy + pool adjoint of dp) * act'(y)
//
// z is read through strides, so an even kernel's GEMM output -- computed with symmetric
// padding k/2, one row/column too large -- is sliced by pointer offset instead of copied.
// act: 0 = identity, 1 = LeakyReLU(0.2). bias is float32 [C] (ignored when has_bias == 0).
// Layouts: [B, C, H, W] with explicit strides; `channels_last` only picks the thread order.

__device__ __forceinline__ float bias_act(float z, const float* bias, i64 has_bias, i64 c, i64 act) {
    if (has_bias) z += bias[c];
    if (act && !(z > 0.0f)) z *= LEAKY_SLOPE;  // NaN stays NaN either way
    return z;
}

// One thread per output element, in memory order.
extern "C" __global__ void film_bias_act_forward(
    const scalar_t* z, i64 zs0, i64 zs1, i64 zs2, i64 zs3,
    const float* __restrict__ bias, i64 has_bias, i64 act,
    scalar_t* out, i64 os0, i64 os1, i64 os2, i64 os3,  // may alias z (in-place epilogue)
    i64 B, i64 C, i64 H, i64 W, i64 channels_last) {
    FILM_GRID_LOOP(i, B * C * H * W) {
        i64 b, c, y, x;
        split_index(i, B * C * H * W, C, H, W, channels_last, b, c, y, x);
        const float v = load(z, b * zs0 + c * zs1 + y * zs2 + x * zs3);
        store(out, b * os0 + c * os1 + y * os2 + x * os3, bias_act(v, bias, has_bias, c, act));
    }
}

// Several levels (same C, bias and activation; own B, H, W, pointers and strides) in one
// launch. `table` is a device int64 array, one row of LEVEL_ROW entries per level:
//   0 z pointer, 1 out pointer, 2 first linear index of the level, 3 B, 4 H, 5 W,
//   6..9 z strides, 10..13 out strides, 14 channels_last
// The linear index space is the concatenation of the levels; each thread finds its level
// by a short scan (FILM has at most ~7 levels; the table stays in L1).
#define LEVEL_ROW 16

extern "C" __global__ void film_bias_act_levels_forward(
    const i64* __restrict__ table, i64 levels, i64 total,
    const float* __restrict__ bias, i64 has_bias, i64 act, i64 C) {
    FILM_GRID_LOOP(i, total) {
        i64 l = 0;
        while (l + 1 < levels && i >= table[(l + 1) * LEVEL_ROW + 2]) ++l;
        const i64* row = table + l * LEVEL_ROW;
        const scalar_t* z = (const scalar_t*)row[0];
        scalar_t* out = (scalar_t*)row[1];
        i64 b, c, y, x;
        split_index(i - row[2], total, C, row[4], row[5], row[14], b, c, y, x);
        const float v = load(z, b * row[6] + c * row[7] + y * row[8] + x * row[9]);
        store(out, b * row[10] + c * row[11] + y * row[12] + x * row[13],
              bias_act(v, bias, has_bias, c, act));
    }
}

// One thread per 2x2 quad (b, c, qy, qx), qy < ceil(H/2), qx < ceil(W/2): writes the quad's
// (up to) four activations and, when the quad is complete, their average -- avg_pool2x2's
// 'valid' rule drops the last row/column of odd sizes. The pool averages the values as
// stored (rounded to scalar_t), in avg_pool2d's order, so pool == avg_pool2x2(y) exactly.
extern "C" __global__ void film_bias_act_pool_forward(
    const scalar_t* z, i64 zs0, i64 zs1, i64 zs2, i64 zs3,
    const float* __restrict__ bias, i64 has_bias, i64 act,
    scalar_t* out, i64 os0, i64 os1, i64 os2, i64 os3,
    scalar_t* __restrict__ pool, i64 ps0, i64 ps1, i64 ps2, i64 ps3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_last) {
    const i64 QH = (H + 1) / 2, QW = (W + 1) / 2;
    FILM_GRID_LOOP(i, B * C * QH * QW) {
        i64 b, c, qy, qx;
        split_index(i, B * C * QH * QW, C, QH, QW, channels_last, b, c, qy, qx);
        float sum = 0.0f;
        for (int dy = 0; dy < 2; ++dy) {
            const i64 y = 2 * qy + dy;
            if (y >= H) continue;
            for (int dx = 0; dx < 2; ++dx) {
                const i64 x = 2 * qx + dx;
                if (x >= W) continue;
                const float v = bias_act(load(z, b * zs0 + c * zs1 + y * zs2 + x * zs3),
                                         bias, has_bias, c, act);
                const scalar_t r = from_float(v);
                out[b * os0 + c * os1 + y * os2 + x * os3] = r;
                sum += to_float(r);
            }
        }
        if (qy < H / 2 && qx < W / 2) store(pool, b * ps0 + c * ps1 + qy * ps2 + qx * ps3, sum * 0.25f);
    }
}

// dz = (dy + dp[y/2, x/2] / 4) * act'(y), one thread per element of z's [B, C, H, W] view.
// dy / dp are optional (has_*); act'(y) uses the saved output: for LeakyReLU with a positive
// slope sign(y) == sign(z), and y == 0 takes the slope as torch's leaky_relu backward does.
extern "C" __global__ void film_bias_act_backward(
    const scalar_t* __restrict__ dy, i64 gs0, i64 gs1, i64 gs2, i64 gs3, i64 has_dy,
    const scalar_t* __restrict__ dp, i64 ps0, i64 ps1, i64 ps2, i64 ps3, i64 has_dp,
    const scalar_t* __restrict__ y_saved, i64 ys0, i64 ys1, i64 ys2, i64 ys3, i64 act,
    scalar_t* __restrict__ dz, i64 zs0, i64 zs1, i64 zs2, i64 zs3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_last) {
    FILM_GRID_LOOP(i, B * C * H * W) {
        i64 b, c, y, x;
        split_index(i, B * C * H * W, C, H, W, channels_last, b, c, y, x);
        float g = has_dy ? load(dy, b * gs0 + c * gs1 + y * gs2 + x * gs3) : 0.0f;
        if (has_dp && y < (H / 2) * 2 && x < (W / 2) * 2)
            g += 0.25f * load(dp, b * ps0 + c * ps1 + (y / 2) * ps2 + (x / 2) * ps3);
        if (act && !(load(y_saved, b * ys0 + c * ys1 + y * ys2 + x * ys3) > 0.0f)) g *= LEAKY_SLOPE;
        store(dz, b * zs0 + c * zs1 + y * zs2 + x * zs3, g);
    }
}
