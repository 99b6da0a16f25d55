// 2x2 / stride-2 'valid' average pooling: [B, C, H, W] -> [B, C, H/2, W/2] (floor), and its
// adjoint. Any strides; `channels_last` only picks the thread order (memory order).
//
// Forward: one thread per output element sums its quad in avg_pool2d's order (row by row)
// in float32 and divides by 4 (exact: a power of two).
// Backward: one thread per input element (a gather, deterministic): a quarter of its output
// gradient, zero in the dropped last row/column of odd sizes.

extern "C" __global__ void film_avg_pool2x2_forward(
    const scalar_t* __restrict__ x, i64 xs0, i64 xs1, i64 xs2, i64 xs3,
    scalar_t* __restrict__ out, i64 os0, i64 os1, i64 os2, i64 os3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_last) {
    const i64 OH = H / 2, OW = W / 2;
    FILM_GRID_LOOP(i, B * C * OH * OW) {
        i64 b, c, oy, ox;
        split_index(i, B * C * OH * OW, C, OH, OW, channels_last, b, c, oy, ox);
        const scalar_t* q = x + b * xs0 + c * xs1 + (2 * oy) * xs2 + (2 * ox) * xs3;
        const float sum = load(q, 0) + load(q, xs3) + load(q, xs2) + load(q, xs2 + xs3);
        store(out, b * os0 + c * os1 + oy * os2 + ox * os3, sum * 0.25f);
    }
}

extern "C" __global__ void film_avg_pool2x2_backward(
    const scalar_t* __restrict__ grad_out, i64 gs0, i64 gs1, i64 gs2, i64 gs3,
    scalar_t* __restrict__ grad_x, i64 xs0, i64 xs1, i64 xs2, i64 xs3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_last) {
    const i64 OH = H / 2, OW = W / 2;
    FILM_GRID_LOOP(i, B * C * H * W) {
        i64 b, c, y, x;
        split_index(i, B * C * H * W, C, H, W, channels_last, b, c, y, x);
        float g = 0.0f;
        if (y < 2 * OH && x < 2 * OW)
            g = 0.25f * load(grad_out, b * gs0 + c * gs1 + (y / 2) * gs2 + (x / 2) * gs3);
        store(grad_x, b * xs0 + c * xs1 + y * xs2 + x * xs3, g);
    }
}
