// The fusion decoder's up step as one direct convolution:
//
//   out = conv2x2_same(resize_nearest(x, (H, W)), weight) + bias
//
// without materialising the upsampled tensor. resize_nearest uses half-pixel centres
// (F.interpolate(mode="nearest-exact")): src = min(floor((dst + 0.5) * in / out), in - 1),
// computed in float like PyTorch. The 2x2 'same' conv pads one zero row at the bottom and
// one zero column at the right, so output (Y, X) reads upsampled pixels (Y + dy, X + dx),
// dy, dx in {0, 1} -- i.e. source rows src(Y), src(Y + 1) and columns src(X), src(X + 1):
// at most 2x2 distinct source pixels (for FILM's exact 2x, often fewer).
//
// Layouts: x [B, Cin, h, w] and out [B, Cout, H, W] with any strides, dtype scalar_t.
// weight is pre-packed by the launcher as float32 [Cin][4 taps (dy, dx) = 00, 01, 10, 11]
// [Cout_pad], Cout_pad = Cout rounded up to OC_TILE and zero-filled, so a thread reads its
// OC_TILE weights of one tap as two aligned float4 (the same address for the whole block:
// broadcast loads). bias is float32 [Cout] (has_bias == 0: none).
//
// Thread mapping: one thread per output pixel (grid.x, grid-stride over B*H*W) and tile of
// OC_TILE output channels (grid.y). It resolves its four source offsets once, then for each
// input channel loads <= 4 source values and does 4 x OC_TILE float32 FMAs.

#define OC_TILE 8

__device__ __forceinline__ i64 nearest_exact_src(i64 dst, float scale, i64 in_size) {
    const i64 s = (i64)floorf(((float)dst + 0.5f) * scale);
    return s < in_size - 1 ? s : in_size - 1;
}

extern "C" __global__ void film_upsample_conv2x2_forward(
    const scalar_t* __restrict__ x, i64 xs0, i64 xs1, i64 xs2, i64 xs3,
    const float* __restrict__ wt, const float* __restrict__ bias, i64 has_bias,
    scalar_t* __restrict__ out, i64 os0, i64 os1, i64 os2, i64 os3,
    i64 B, i64 Cin, i64 Cout, i64 Cout_pad, i64 h, i64 w, i64 H, i64 W) {
    const float scale_y = (float)h / (float)H, scale_x = (float)w / (float)W;
    const i64 o0 = (i64)blockIdx.y * OC_TILE;
    const i64 tap_stride = Cout_pad / 4;  // in float4 units
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, Y, X;
        split_pixel(p, B * H * W, H, W, b, Y, X);
        // Taps beyond the last row/column are the conv's zero padding.
        const bool has_y1 = Y + 1 < H, has_x1 = X + 1 < W;
        const i64 r0 = nearest_exact_src(Y, scale_y, h) * xs2;
        const i64 r1 = has_y1 ? nearest_exact_src(Y + 1, scale_y, h) * xs2 : r0;
        const i64 c0 = nearest_exact_src(X, scale_x, w) * xs3;
        const i64 c1 = has_x1 ? nearest_exact_src(X + 1, scale_x, w) * xs3 : c0;
        const i64 off[4] = {r0 + c0, r0 + c1, r1 + c0, r1 + c1};
        const bool has[4] = {true, has_x1, has_y1, has_x1 && has_y1};

        float acc[OC_TILE];
#pragma unroll
        for (int k = 0; k < OC_TILE; ++k) acc[k] = 0.0f;

        const scalar_t* xb = x + b * xs0;
        const float4* wp = reinterpret_cast<const float4*>(wt + o0);
        for (i64 ci = 0; ci < Cin; ++ci, wp += 4 * tap_stride) {
            const scalar_t* xc = xb + ci * xs1;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const float v = has[t] ? load(xc, off[t]) : 0.0f;
                const float4 lo = wp[t * tap_stride], hi = wp[t * tap_stride + 1];
                acc[0] += lo.x * v; acc[1] += lo.y * v; acc[2] += lo.z * v; acc[3] += lo.w * v;
                acc[4] += hi.x * v; acc[5] += hi.y * v; acc[6] += hi.z * v; acc[7] += hi.w * v;
            }
        }

        scalar_t* dst = out + b * os0 + Y * os2 + X * os3;
#pragma unroll
        for (int k = 0; k < OC_TILE; ++k) {
            const i64 o = o0 + k;
            if (o < Cout) store(dst, o * os1, acc[k] + (has_bias ? bias[o] : 0.0f));
        }
    }
}
