// Coarse-to-fine flow step: out = resize_bilinear(2 * flow, (H, W)) (+ residual).
//
// resize_bilinear uses half-pixel centres, exactly F.interpolate(mode="bilinear",
// align_corners=False): src = max((dst + 0.5) * in / out - 0.5, 0), the bottom/right tap
// clamped to the last row/column. Scaling by 2 commutes with rounding, so 2 * bilinear(flow)
// equals bilinear(2 * flow) bit for bit.
//
// Layouts: flow [B, 2, h, w], residual / out [B, 2, H, W], any strides, dtype scalar_t.
// The gradient input may have another (run-time) dtype, e.g. a float32 sum of gradients.
//
// Thread mapping: one thread per fine pixel (b, Y, X) computes both flow channels
// (forward), and one thread per coarse pixel (b, y, x) gathers its gradient (backward).

extern "C" __global__ void film_upsample_flow_forward(
    const scalar_t* __restrict__ flow, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    const scalar_t* __restrict__ residual, i64 rs0, i64 rs1, i64 rs2, i64 rs3, i64 has_residual,
    scalar_t* __restrict__ out, i64 os0, i64 os1, i64 os2, i64 os3,
    i64 B, i64 h, i64 w, i64 H, i64 W) {
    // float(in) / float(out): the scale PyTorch computes (in float) when given a size.
    const float scale_y = (float)h / (float)H, scale_x = (float)w / (float)W;
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, Y, X;
        split_pixel(p, B * H * W, H, W, b, Y, X);
        i64 y0, sy, x0, sx;
        float ly0, ly1, lx0, lx1;
        resize_tap(Y, scale_y, h, y0, sy, ly0, ly1);
        resize_tap(X, scale_x, w, x0, sx, lx0, lx1);
        for (i64 k = 0; k < 2; ++k) {
            const scalar_t* f = flow + b * fs0 + k * fs1 + y0 * fs2 + x0 * fs3;
            const float top = lx0 * load(f, 0) + lx1 * load(f, sx * fs3);
            const float bot = lx0 * load(f, sy * fs2) + lx1 * load(f, sy * fs2 + sx * fs3);
            float v = 2.0f * (ly0 * top + ly1 * bot);
            if (has_residual) v += load(residual, b * rs0 + k * rs1 + Y * rs2 + X * rs3);
            store(out, b * os0 + k * os1 + Y * os2 + X * os3, v);
        }
    }
}

// Fine output indices that may read coarse index i along one axis: a window around the
// inverse map, widened by 2 so float rounding of the forward map never drops an index (each
// candidate is then re-checked with the exact forward computation).
__device__ __forceinline__ void resize_window(i64 i, float scale, i64 out_size, i64& lo, i64& hi) {
    const float inv = 1.0f / scale;
    lo = (i64)floorf(((float)i - 1.0f + 0.5f) * inv - 0.5f) - 2;
    hi = (i64)ceilf(((float)i + 1.0f + 0.5f) * inv - 0.5f) + 2;
    lo = lo < 0 ? 0 : lo;
    hi = hi > out_size - 1 ? out_size - 1 : hi;
}

// Weight with which fine index `dst` reads coarse index `i` (sum of both taps: on the last
// row/column both taps are the same pixel).
__device__ __forceinline__ float resize_weight(i64 dst, i64 i, float scale, i64 in_size) {
    i64 i0, step;
    float l0, l1;
    resize_tap(dst, scale, in_size, i0, step, l0, l1);
    return (i0 == i ? l0 : 0.0f) + (i0 + step == i ? l1 : 0.0f);
}

// grad_flow[b, k, y, x] = 2 * sum_{Y, X} wy(Y, y) wx(X, x) grad[b, k, Y, X] -- a gather
// (no atomics: deterministic, and exact float32 accumulation for 16-bit dtypes).
extern "C" __global__ void film_upsample_flow_backward(
    const void* __restrict__ grad, i64 grad_kind, i64 gs0, i64 gs1, i64 gs2, i64 gs3,
    scalar_t* __restrict__ grad_flow, i64 rs0, i64 rs1, i64 rs2, i64 rs3,
    i64 B, i64 h, i64 w, i64 H, i64 W) {
    const float scale_y = (float)h / (float)H, scale_x = (float)w / (float)W;
    FILM_GRID_LOOP(p, B * h * w) {
        i64 b, y, x;
        split_pixel(p, B * h * w, h, w, b, y, x);
        i64 Y_lo, Y_hi, X_lo, X_hi;
        resize_window(y, scale_y, H, Y_lo, Y_hi);
        resize_window(x, scale_x, W, X_lo, X_hi);
        float acc0 = 0.0f, acc1 = 0.0f;
        for (i64 Y = Y_lo; Y <= Y_hi; ++Y) {
            const float wy = resize_weight(Y, y, scale_y, h);
            if (wy == 0.0f) continue;
            float row0 = 0.0f, row1 = 0.0f;
            for (i64 X = X_lo; X <= X_hi; ++X) {
                const float wx = resize_weight(X, x, scale_x, w);
                if (wx == 0.0f) continue;
                const i64 g = b * gs0 + Y * gs2 + X * gs3;
                row0 += wx * load_kind(grad, g, grad_kind);
                row1 += wx * load_kind(grad, g + gs1, grad_kind);
            }
            acc0 += wy * row0;
            acc1 += wy * row1;
        }
        const i64 r = b * rs0 + y * rs2 + x * rs3;
        store(grad_flow, r, 2.0f * acc0);
        store(grad_flow, r + rs1, 2.0f * acc1);
    }
}
