// Fused flow-estimator step, one pass over the fine level:
//
//   up     = resize_bilinear(2 * flow, (H, W))          (half-pixel centres)
//   warped = warp(features, up)                           (bilinear, border clamp)
//
// Layouts: flow [B, 2, h, w] and up [B, 2, H, W] share the flow's run-time dtype
// (`flow_kind`); features / out are [B, C, H, W] in scalar_t. Every tensor has explicit
// strides, so `out` may be a channel slice of a larger buffer (the predictor's input), in
// NCHW or NHWC.
//
// Thread mapping: one thread per fine pixel (grid.x) and channel group (grid.y). Each thread
// computes its pixel's upsampled flow (4 coarse taps x 2 channels, cheap) and the warp taps
// once, then loops over its channels. Only channel group 0 writes `up`.
//
// The warp samples with `up` as stored (rounded to the flow's dtype), so the fused op equals
// upsample_flow followed by warp exactly, as in the reference composition.

extern "C" __global__ void film_upsample_flow_warp_forward(
    const void* __restrict__ flow, i64 flow_kind, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    void* __restrict__ up, i64 us0, i64 us1, i64 us2, i64 us3,
    const scalar_t* __restrict__ features, i64 is0, i64 is1, i64 is2, i64 is3,
    scalar_t* __restrict__ out, i64 os0, i64 os1, i64 os2, i64 os3,
    i64 B, i64 C, i64 h, i64 w, i64 H, i64 W, i64 channels_per_group) {
    const float scale_y = (float)h / (float)H, scale_x = (float)w / (float)W;
    const i64 c_begin = (i64)blockIdx.y * channels_per_group;
    const i64 c_end = min(C, c_begin + channels_per_group);
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, Y, X;
        split_pixel(p, B * H * W, H, W, b, Y, X);

        // -- upsample the flow at (Y, X) --
        i64 y0, sy, x0, sx;
        float ly0, ly1, lx0, lx1;
        resize_tap(Y, scale_y, h, y0, sy, ly0, ly1);
        resize_tap(X, scale_x, w, x0, sx, lx0, lx1);
        float d[2];
        for (int k = 0; k < 2; ++k) {
            const i64 f = b * fs0 + k * fs1 + y0 * fs2 + x0 * fs3;
            const float top = lx0 * load_kind(flow, f, flow_kind)
                              + lx1 * load_kind(flow, f + sx * fs3, flow_kind);
            const float bot = lx0 * load_kind(flow, f + sy * fs2, flow_kind)
                              + lx1 * load_kind(flow, f + sy * fs2 + sx * fs3, flow_kind);
            d[k] = round_to_kind(2.0f * (ly0 * top + ly1 * bot), flow_kind);
        }
        if (blockIdx.y == 0) {
            const i64 u = b * us0 + Y * us2 + X * us3;
            store_kind(up, u, flow_kind, d[0]);
            store_kind(up, u + us1, flow_kind, d[1]);
        }

        // -- warp the features with it (same conventions as warp.cu) --
        i64 tx, ty;
        float ax, ay;
        bool has_x1, has_y1;
        border_tap((float)X + d[0], W, tx, ax, has_x1);
        border_tap((float)Y + d[1], H, ty, ay, has_y1);
        const i64 o00 = ty * is2 + tx * is3;
        const i64 o01 = o00 + (has_x1 ? is3 : 0);
        const i64 o10 = o00 + (has_y1 ? is2 : 0);
        const i64 o11 = o10 + (has_x1 ? is3 : 0);
        const float w00 = (1.0f - ay) * (1.0f - ax), w01 = (1.0f - ay) * ax;
        const float w10 = ay * (1.0f - ax), w11 = ay * ax;
        const scalar_t* src = features + b * is0;
        scalar_t* dst = out + b * os0 + Y * os2 + X * os3;
        for (i64 c = c_begin; c < c_end; ++c) {
            const scalar_t* ch = src + c * is1;
            float v = w00 * load(ch, o00);
            if (has_x1) v += w01 * load(ch, o01);
            if (has_y1) v += w10 * load(ch, o10);
            if (has_x1 && has_y1) v += w11 * load(ch, o11);
            store(dst, c * os1, v);
        }
    }
}
