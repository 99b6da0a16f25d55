// Shared device helpers of film_fast's CuPy kernels.
//
// _runtime.py prepends this file to every .cu source before compiling it, so each
// kernel module is one self-contained translation unit: no toolkit headers (no
// cuda_fp16.h / cuda_bf16.h, which neither NVRTC's default include path nor the
// GPU hosts are guaranteed to have) and no #include resolution at run time.
//
// The only compile-time parameter is FILM_DTYPE, the storage type of an op's main
// tensors:  0 = float32, 1 = float16, 2 = bfloat16.  Every size, stride and
// pointer is a kernel argument, so one compiled module serves every pyramid
// level and every video size.  Integer kernel arguments are always `long long`
// (64-bit offsets: a 4K x 128-channel feature map has more than 2^31 elements)
// and floating ones `float`; the Python launchers pass numpy.int64/float32.
//
// fp16 and bf16 values are stored as raw `unsigned short` bits and converted
// with PTX `cvt`; all arithmetic happens in float32.
//
// FILM_HOST_EMULATION (tests only) swaps the two fp16 PTX conversions for C++ ones so
// the same sources also build for the host, where tests/test_cupy_kernels.py runs them
// serially when no GPU is present. Nothing else differs.

#ifndef FILM_DTYPE
#error "compile with -DFILM_DTYPE=0 (float32), 1 (float16) or 2 (bfloat16)"
#endif

typedef long long i64;

// ---- 16-bit float <-> float32 -------------------------------------------------------------
#ifndef FILM_HOST_EMULATION
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));  // round to nearest even
    return h;
}
#else
// Host build of the same kernels (tests/test_cupy_kernels.py runs them serially on the CPU
// through a small CUDA shim when no GPU is present): C++ _Float16 converts with the same
// IEEE round-to-nearest-even as cvt.rn.
inline float half_bits_to_float(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
}

inline unsigned short float_to_half_bits(float f) {
    const _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}
#endif

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);  // bf16 is the top half of a float32
}

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
#else
    // Pre-Ampere (and the host build) has no bf16 cvt: round to nearest even by hand,
    // keeping NaNs quiet NaNs.
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
#endif
}

// ---- the op's storage type -------------------------------------------------------------------
#if FILM_DTYPE == 0
typedef float scalar_t;
__device__ __forceinline__ float to_float(scalar_t v) { return v; }
__device__ __forceinline__ scalar_t from_float(float f) { return f; }
#elif FILM_DTYPE == 1
typedef unsigned short scalar_t;
__device__ __forceinline__ float to_float(scalar_t v) { return half_bits_to_float(v); }
__device__ __forceinline__ scalar_t from_float(float f) { return float_to_half_bits(f); }
#elif FILM_DTYPE == 2
typedef unsigned short scalar_t;
__device__ __forceinline__ float to_float(scalar_t v) { return bf16_bits_to_float(v); }
__device__ __forceinline__ scalar_t from_float(float f) { return float_to_bf16_bits(f); }
#else
#error "FILM_DTYPE must be 0, 1 or 2"
#endif

__device__ __forceinline__ float load(const scalar_t* p, i64 i) { return to_float(p[i]); }
__device__ __forceinline__ void store(scalar_t* p, i64 i, float v) { p[i] = from_float(v); }
// The value a float becomes once stored in scalar_t (what a later reader of the tensor sees).
__device__ __forceinline__ float round_to_scalar(float v) { return to_float(from_float(v)); }

// ---- secondary tensors of a run-time dtype -----------------------------------------------------
// A flow may have another dtype than the features it warps. Rather than compile per dtype
// pair (the cache key stays (kernel, dtype, device)), such tensors carry a run-time `kind`
// with the FILM_DTYPE numbering; the branch is uniform across the grid, so it is free.
#define KIND_F32 0
#define KIND_F16 1
#define KIND_BF16 2

__device__ __forceinline__ float load_kind(const void* p, i64 i, i64 kind) {
    if (kind == KIND_F32) return ((const float*)p)[i];
    const unsigned short bits = ((const unsigned short*)p)[i];
    return kind == KIND_F16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

__device__ __forceinline__ void store_kind(void* p, i64 i, i64 kind, float v) {
    if (kind == KIND_F32) {
        ((float*)p)[i] = v;
    } else {
        ((unsigned short*)p)[i] = kind == KIND_F16 ? float_to_half_bits(v) : float_to_bf16_bits(v);
    }
}

__device__ __forceinline__ float round_to_kind(float v, i64 kind) {
    if (kind == KIND_F16) return half_bits_to_float(float_to_half_bits(v));
    if (kind == KIND_BF16) return bf16_bits_to_float(float_to_bf16_bits(v));
    return v;
}

// ---- indexing ---------------------------------------------------------------------------------
// Grid-stride loop over [0, n) with 64-bit indices.
#define FILM_GRID_LOOP(i, n)                                                          \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                 \
         i += (i64)blockDim.x * gridDim.x)

// Index decomposition runs in 32-bit arithmetic whenever the index space fits (a branch that
// is uniform across the grid): GPUs emulate 64-bit division with ~4x the instructions, and
// in light element-wise kernels the divisions, not the memory traffic, would set the speed.
// Tensors of 2^31 elements or more take the 64-bit path. (Tests lower the limit to run the
// 64-bit path on small tensors.)
#ifndef FILM_INDEX32_LIMIT
#define FILM_INDEX32_LIMIT 0x7fffffffLL
#endif

template <typename I>
__device__ __forceinline__ void split_index_as(I i, I C, I H, I W, i64 channels_last, i64& b,
                                               i64& c, i64& y, i64& x) {
    if (channels_last) {
        c = (i64)(i % C); i /= C;
        x = (i64)(i % W); i /= W;
        y = (i64)(i % H); b = (i64)(i / H);
    } else {
        x = (i64)(i % W); i /= W;
        y = (i64)(i % H); i /= H;
        c = (i64)(i % C); b = (i64)(i / C);
    }
}

// Splits linear index i < n of a [B, C, H, W] tensor into (b, c, y, x) in the order the data
// sits in memory: x fastest for NCHW (channels_last == 0), c fastest for NHWC, so that
// consecutive threads touch consecutive addresses in both layouts. Any other layout is
// still handled correctly (every access goes through strides), just less coalesced.
__device__ __forceinline__ void split_index(i64 i, i64 n, i64 C, i64 H, i64 W, i64 channels_last,
                                            i64& b, i64& c, i64& y, i64& x) {
    if (n <= FILM_INDEX32_LIMIT)
        split_index_as<unsigned int>((unsigned int)i, (unsigned int)C, (unsigned int)H,
                                     (unsigned int)W, channels_last, b, c, y, x);
    else
        split_index_as<i64>(i, C, H, W, channels_last, b, c, y, x);
}

// (b, y, x) of pixel p < n of a [B, H, W] pixel grid (x fastest).
__device__ __forceinline__ void split_pixel(i64 p, i64 n, i64 H, i64 W, i64& b, i64& y, i64& x) {
    i64 c;
    split_index(p, n, 1, H, W, 0, b, c, y, x);
}

// Border-clamped bilinear sampling along one axis: position `pos` (pixels) is clamped into
// [0, size - 1]; returns the left/top tap `i0`, the weight `frac` of the next tap and whether
// that tap exists (it does not when the position sits exactly on the last pixel, where
// frac == 0). NaN positions clamp to 0 (fmaxf returns the non-NaN operand), so indices stay
// in range whatever the flow holds.
__device__ __forceinline__ void border_tap(float pos, i64 size, i64& i0, float& frac,
                                           bool& has_next) {
    const float p = fminf(fmaxf(pos, 0.0f), (float)(size - 1));
    const float f = floorf(p);
    i0 = (i64)f;
    frac = p - f;
    has_next = i0 + 1 < size;
}

// d(clamped position)/d(pos) of a border clamp: 1 strictly inside (0, size - 1), else 0 --
// grid_sample(padding_mode="border")'s convention, so clamped samples give zero flow grads.
__device__ __forceinline__ float border_grad(float pos, i64 size) {
    return (pos > 0.0f && pos < (float)(size - 1)) ? 1.0f : 0.0f;
}

// One axis of a half-pixel-centre bilinear resize (F.interpolate(mode="bilinear",
// align_corners=False)): taps i0 and i0 + step (step is 0 on the last row/column) with
// weights l0, l1 for output index `dst`. Mirrors PyTorch's area_pixel_compute_source_index.
__device__ __forceinline__ void resize_tap(i64 dst, float scale, i64 in_size, i64& i0, i64& step,
                                           float& l0, float& l1) {
    float src = scale * ((float)dst + 0.5f) - 0.5f;
    src = src < 0.0f ? 0.0f : src;
    i0 = (i64)src;  // src >= 0: truncation == floor
    if (i0 > in_size - 1) i0 = in_size - 1;
    step = i0 < in_size - 1 ? 1 : 0;
    l1 = src - (float)i0;
    l0 = 1.0f - l1;
}

#define LEAKY_SLOPE 0.2f
