// Backward bilinear warp with border clamping, and its gradients.
//
//   out[b, c, y, x] = bilinear(image[b, c], x + flow[b, 0, y, x], y + flow[b, 1, y, x])
//
// Sample positions are clamped into [0, W-1] x [0, H-1] and always computed in float32,
// whatever the storage dtype (an fp16 coordinate at x ~ 1900 is quantised to whole pixels).
//
// Layouts: image / out / grads are [B, C, H, W] with arbitrary element strides (NCHW,
// NHWC, channel slices...); flow is [B, 2, H, W] (dx, dy), any strides, and its dtype is a
// run-time `flow_kind` (see common.cuh), so the cache key stays (kernel, dtype, device).
//
// Thread mapping (forward and the atomic image gradient): one thread per output pixel
// (grid.x, grid-stride over B*H*W) computes the four taps and weights once, then loops over
// the channels of its channel group (grid.y; small images split C over several groups to
// keep the GPU busy).
//
// Corner convention (shared by every kernel here, and by grid_sample): the right/bottom tap
// only exists when it is inside the image; when it is not, its weight is exactly zero.

// Taps and weights of the sample of output pixel (b, y, x).
struct WarpSample {
    i64 o00, o01, o10, o11;      // tap offsets from the image's (b, c=0) origin
    bool has_x1, has_y1;
    float ax, ay;                // fractional parts: weights of the right / bottom taps
    float sx, sy;                // unclamped sample position (for the border gradient)
};

__device__ __forceinline__ WarpSample warp_sample(const void* flow, i64 flow_kind, i64 fs0, i64 fs1,
                                                  i64 fs2, i64 fs3, i64 b, i64 y, i64 x, i64 H,
                                                  i64 W, i64 is2, i64 is3) {
    WarpSample s;
    const i64 f = b * fs0 + y * fs2 + x * fs3;
    s.sx = (float)x + load_kind(flow, f, flow_kind);
    s.sy = (float)y + load_kind(flow, f + fs1, flow_kind);
    i64 x0, y0;
    border_tap(s.sx, W, x0, s.ax, s.has_x1);
    border_tap(s.sy, H, y0, s.ay, s.has_y1);
    s.o00 = y0 * is2 + x0 * is3;
    s.o01 = s.o00 + (s.has_x1 ? is3 : 0);
    s.o10 = s.o00 + (s.has_y1 ? is2 : 0);
    s.o11 = s.o10 + (s.has_x1 ? is3 : 0);
    return s;
}

extern "C" __global__ void film_warp_forward(
    const scalar_t* __restrict__ image, i64 is0, i64 is1, i64 is2, i64 is3,
    const void* __restrict__ flow, i64 flow_kind, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    scalar_t* __restrict__ out, i64 os0, i64 os1, i64 os2, i64 os3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_per_group) {
    const i64 c_begin = (i64)blockIdx.y * channels_per_group;
    const i64 c_end = min(C, c_begin + channels_per_group);
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, y, x;
        split_pixel(p, B * H * W, H, W, b, y, x);
        const WarpSample s = warp_sample(flow, flow_kind, fs0, fs1, fs2, fs3, b, y, x, H, W, is2, is3);
        const float w00 = (1.0f - s.ay) * (1.0f - s.ax), w01 = (1.0f - s.ay) * s.ax;
        const float w10 = s.ay * (1.0f - s.ax), w11 = s.ay * s.ax;
        const scalar_t* src = image + b * is0;
        scalar_t* dst = out + b * os0 + y * os2 + x * os3;
        for (i64 c = c_begin; c < c_end; ++c) {
            const scalar_t* ch = src + c * is1;
            // Same summation order as grid_sample: nw, ne, sw, se. Missing taps are skipped
            // rather than multiplied by their zero weight (0 * inf would be NaN).
            float v = w00 * load(ch, s.o00);
            if (s.has_x1) v += w01 * load(ch, s.o01);
            if (s.has_y1) v += w10 * load(ch, s.o10);
            if (s.has_x1 && s.has_y1) v += w11 * load(ch, s.o11);
            store(dst, c * os1, v);
        }
    }
}

// grad_image (float32 accumulation buffer, zero-initialised by the caller) += the adjoint
// of the bilinear gather: every output pixel scatters its gradient into its four taps.
// Non-deterministic summation order (atomics); see film_warp_backward_image_gather.
extern "C" __global__ void film_warp_backward_image_atomic(
    const scalar_t* __restrict__ grad_out, i64 gs0, i64 gs1, i64 gs2, i64 gs3,
    const void* __restrict__ flow, i64 flow_kind, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    float* __restrict__ grad_image, i64 is0, i64 is1, i64 is2, i64 is3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_per_group) {
    const i64 c_begin = (i64)blockIdx.y * channels_per_group;
    const i64 c_end = min(C, c_begin + channels_per_group);
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, y, x;
        split_pixel(p, B * H * W, H, W, b, y, x);
        const WarpSample s = warp_sample(flow, flow_kind, fs0, fs1, fs2, fs3, b, y, x, H, W, is2, is3);
        const float w00 = (1.0f - s.ay) * (1.0f - s.ax), w01 = (1.0f - s.ay) * s.ax;
        const float w10 = s.ay * (1.0f - s.ax), w11 = s.ay * s.ax;
        float* dst = grad_image + b * is0;
        const scalar_t* g = grad_out + b * gs0 + y * gs2 + x * gs3;
        for (i64 c = c_begin; c < c_end; ++c) {
            const float gv = load(g, c * gs1);
            float* ch = dst + c * is1;
            atomicAdd(ch + s.o00, w00 * gv);
            if (s.has_x1) atomicAdd(ch + s.o01, w01 * gv);
            if (s.has_y1) atomicAdd(ch + s.o10, w10 * gv);
            if (s.has_x1 && s.has_y1) atomicAdd(ch + s.o11, w11 * gv);
        }
    }
}

// d loss / d flow. One thread per output pixel reduces over all C channels itself, so the
// result is written directly (no atomics, deterministic) in the flow's dtype.
// d out / d sx = (1-ay) (I01 - I00) + ay (I11 - I10), zero where the x position is clamped
// (grid_sample border convention); missing taps read as 0, as in grid_sample.
extern "C" __global__ void film_warp_backward_flow(
    const scalar_t* __restrict__ grad_out, i64 gs0, i64 gs1, i64 gs2, i64 gs3,
    const scalar_t* __restrict__ image, i64 is0, i64 is1, i64 is2, i64 is3,
    const void* __restrict__ flow, i64 flow_kind, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    void* __restrict__ grad_flow, i64 grad_flow_kind, i64 rs0, i64 rs1, i64 rs2, i64 rs3,
    i64 B, i64 C, i64 H, i64 W) {
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, y, x;
        split_pixel(p, B * H * W, H, W, b, y, x);
        const WarpSample s = warp_sample(flow, flow_kind, fs0, fs1, fs2, fs3, b, y, x, H, W, is2, is3);
        const scalar_t* src = image + b * is0;
        const scalar_t* g = grad_out + b * gs0 + y * gs2 + x * gs3;
        float gx = 0.0f, gy = 0.0f;
        for (i64 c = 0; c < C; ++c) {
            const scalar_t* ch = src + c * is1;
            const float gv = load(g, c * gs1);
            const float v00 = load(ch, s.o00);
            const float v01 = s.has_x1 ? load(ch, s.o01) : 0.0f;
            const float v10 = s.has_y1 ? load(ch, s.o10) : 0.0f;
            const float v11 = (s.has_x1 && s.has_y1) ? load(ch, s.o11) : 0.0f;
            gx += gv * ((1.0f - s.ay) * (v01 - v00) + s.ay * (v11 - v10));
            gy += gv * ((1.0f - s.ax) * (v10 - v00) + s.ax * (v11 - v01));
        }
        // Multiply only when inside: 0 * (inf or NaN) from a clamped sample must stay 0.
        gx = border_grad(s.sx, W) != 0.0f ? gx : 0.0f;
        gy = border_grad(s.sy, H) != 0.0f ? gy : 0.0f;
        const i64 r = b * rs0 + y * rs2 + x * rs3;
        store_kind(grad_flow, r, grad_flow_kind, gx);
        store_kind(grad_flow, r + rs1, grad_flow_kind, gy);
    }
}

// ---- deterministic image gradient: sort by tap, then gather ----------------------------------
// Step 1: for every output pixel p = (b*H + y)*W + x, the linear index of its top-left tap
// (b*H + y0)*W + x0 and its fractions (ax, ay). The launcher stable-sorts the keys (torch.sort,
// deterministic), so pixels sharing a top-left tap become contiguous runs in output order.
extern "C" __global__ void film_warp_tap_keys(
    const void* __restrict__ flow, i64 flow_kind, i64 fs0, i64 fs1, i64 fs2, i64 fs3,
    i64* __restrict__ keys, float* __restrict__ fractions,  // [B*H*W], [B*H*W, 2] = (ax, ay)
    i64 B, i64 H, i64 W) {
    FILM_GRID_LOOP(p, B * H * W) {
        i64 b, y, x;
        split_pixel(p, B * H * W, H, W, b, y, x);
        const i64 f = b * fs0 + y * fs2 + x * fs3;
        i64 x0, y0;
        float ax, ay;
        bool has_x1, has_y1;
        border_tap((float)x + load_kind(flow, f, flow_kind), W, x0, ax, has_x1);
        border_tap((float)y + load_kind(flow, f + fs1, flow_kind), H, y0, ay, has_y1);
        keys[p] = (b * H + y0) * W + x0;
        fractions[2 * p] = ax;
        fractions[2 * p + 1] = ay;
    }
}

// Step 2: one thread per image pixel (b, y, x) and channel group. Its gradient gathers from
// the output pixels whose top-left tap is (y - dy, x - dx), dy, dx in {0, 1}, with the weight of
// tap (dy, dx); `order` lists output pixels sorted by top-left tap, `starts[k]..starts[k+1]` is
// the run of tap k. The summation order is fixed, so the result is bitwise reproducible, and
// the value is final: it is stored in the image dtype directly.
extern "C" __global__ void film_warp_backward_image_gather(
    const scalar_t* __restrict__ grad_out, i64 gs0, i64 gs1, i64 gs2, i64 gs3,
    const i64* __restrict__ order, const i64* __restrict__ starts,
    const float* __restrict__ fractions,
    scalar_t* __restrict__ grad_image, i64 is0, i64 is1, i64 is2, i64 is3,
    i64 B, i64 C, i64 H, i64 W, i64 channels_per_group) {
    const i64 c_begin = (i64)blockIdx.y * channels_per_group;
    const i64 c_end = min(C, c_begin + channels_per_group);
    FILM_GRID_LOOP(t, B * H * W) {
        i64 b, y, x;
        split_pixel(t, B * H * W, H, W, b, y, x);
        for (i64 c = c_begin; c < c_end; ++c) {
            float acc = 0.0f;
            for (int dy = 0; dy < 2; ++dy) {
                if (y - dy < 0) continue;
                for (int dx = 0; dx < 2; ++dx) {
                    if (x - dx < 0) continue;
                    const i64 tap = (b * H + (y - dy)) * W + (x - dx);
                    for (i64 k = starts[tap]; k < starts[tap + 1]; ++k) {
                        const i64 p = order[k];
                        const float ax = fractions[2 * p], ay = fractions[2 * p + 1];
                        const float w = (dy ? ay : 1.0f - ay) * (dx ? ax : 1.0f - ax);
                        i64 pb, py, px;  // pb == b: the key includes the batch
                        split_pixel(p, B * H * W, H, W, pb, py, px);
                        acc += w * load(grad_out, b * gs0 + c * gs1 + py * gs2 + px * gs3);
                    }
                }
            }
            store(grad_image, b * is0 + c * is1 + y * is2 + x * is3, acc);
        }
    }
}
