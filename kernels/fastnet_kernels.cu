// fastnet's multi-tensor CUDA kernels, compiled at run time by cupy.RawModule (fastnet/kernels.py).
//
// A "tensor table" describes a list of T tensors: ptrs[T] (device addresses, as int64) and
// offsets[T + 1] (exclusive prefix sums of their element counts; offsets[T] = total). Elementwise
// kernels walk the concatenated index space with a grid-stride loop and find each element's tensor
// by binary search in offsets. The LARS kernels use a block table instead: block b handles
// elements [block_start[b], block_start[b] + CHUNK) of tensor block_tensor[b]; tensor t owns blocks
// [first_block[t], first_block[t + 1]). Norms are reduced per block into partials and summed in
// block order by the update kernel, so results are deterministic (the same on every rank).
//
// Kernels (each one launch for all tensors):
// <src>, <dst>: f32, f16 (IEEE half), bf16 (bfloat16).
//   pack_<src>_<dst>         list of gradients -> flat fusion buffer, times scale, cast (Jia et al. 2018 §3.1)
//   unpack_unscale_<src>     flat buffer -> FP32 tensors (e.g. master gradients) times inv_scale; sets *found_inf
//   copy_f32_<dst>           FP32 tensors -> tensors of <dst> (master weights -> model copy)
//   lars_norms_f32           per block: sum w^2 and g^2 (You et al. 2017, Alg. 1 step 1)
//   lars_update_f32          trust ratio, weight decay, momentum, (Nesterov), step, optional FP16 model copy

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define CHUNK 4096

__device__ __forceinline__ float load_f(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ int find_tensor(const long long* offsets, int n, long long i) {
    int lo = 0, hi = n - 1;  // largest t with offsets[t] <= i
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

#define DEFINE_PACK(NAME, SRC, DST)                                                                    \
extern "C" __global__ void NAME(const long long* ptrs, const long long* offsets, int n, DST* dst,      \
                                float scale) {                                                         \
    long long total = offsets[n];                                                                      \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;                    \
         i += (long long)gridDim.x * blockDim.x) {                                                     \
        int t = find_tensor(offsets, n, i);                                                            \
        const SRC* src = reinterpret_cast<const SRC*>(ptrs[t]);                                        \
        store_f(dst, i, load_f(src, i - offsets[t]) * scale);                                          \
    }                                                                                                  \
}

DEFINE_PACK(pack_f32_f32, float, float)
DEFINE_PACK(pack_f32_f16, float, __half)
DEFINE_PACK(pack_f32_bf16, float, __nv_bfloat16)
DEFINE_PACK(pack_f16_f16, __half, __half)
DEFINE_PACK(pack_f16_f32, __half, float)
DEFINE_PACK(pack_f16_bf16, __half, __nv_bfloat16)
DEFINE_PACK(pack_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
DEFINE_PACK(pack_bf16_f32, __nv_bfloat16, float)
DEFINE_PACK(pack_bf16_f16, __nv_bfloat16, __half)

#define DEFINE_UNPACK(NAME, SRC)                                                                       \
extern "C" __global__ void NAME(const SRC* src, const long long* ptrs, const long long* offsets, int n, \
                                float inv_scale, int* found_inf) {                                    \
    long long total = offsets[n];                                                                      \
    bool bad = false;                                                                                  \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;                    \
         i += (long long)gridDim.x * blockDim.x) {                                                     \
        int t = find_tensor(offsets, n, i);                                                            \
        float v = load_f(src, i) * inv_scale;                                                          \
        bad |= !isfinite(v);                                                                           \
        reinterpret_cast<float*>(ptrs[t])[i - offsets[t]] = v;                                         \
    }                                                                                                  \
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1;                                     \
}

DEFINE_UNPACK(unpack_unscale_f32, float)
DEFINE_UNPACK(unpack_unscale_f16, __half)
DEFINE_UNPACK(unpack_unscale_bf16, __nv_bfloat16)

#define DEFINE_COPY(NAME, DST)                                                                         \
extern "C" __global__ void NAME(const long long* src_ptrs, const long long* dst_ptrs,                  \
                                const long long* offsets, int n) {                                     \
    long long total = offsets[n];                                                                      \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;                    \
         i += (long long)gridDim.x * blockDim.x) {                                                     \
        int t = find_tensor(offsets, n, i);                                                            \
        long long j = i - offsets[t];                                                                  \
        store_f(reinterpret_cast<DST*>(dst_ptrs[t]), j, reinterpret_cast<const float*>(src_ptrs[t])[j]); \
    }                                                                                                  \
}

DEFINE_COPY(copy_f32_f32, float)
DEFINE_COPY(copy_f32_f16, __half)
DEFINE_COPY(copy_f32_bf16, __nv_bfloat16)

// Block-wide sum of two floats (blockDim.x a multiple of 32, at most 1024); result valid in thread 0.
__device__ float2 block_sum2(float a, float b) {
    __shared__ float sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffff, a, o);
        b += __shfl_down_sync(0xffffffff, b, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    a = b = 0.f;
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        a = lane < nw ? sa[lane] : 0.f;
        b = lane < nw ? sb[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffff, a, o);
            b += __shfl_down_sync(0xffffffff, b, o);
        }
    }
    return make_float2(a, b);
}

extern "C" __global__ void lars_norms_f32(const long long* w_ptrs, const long long* g_ptrs,
                                          const long long* numels, const int* block_tensor,
                                          const long long* block_start, float2* partials) {
    int t = block_tensor[blockIdx.x];
    long long start = block_start[blockIdx.x];
    long long end = min(start + CHUNK, numels[t]);
    const float* w = reinterpret_cast<const float*>(w_ptrs[t]);
    const float* g = reinterpret_cast<const float*>(g_ptrs[t]);
    float sw = 0.f, sg = 0.f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float wi = w[i], gi = g[i];
        sw += wi * wi;
        sg += gi * gi;
    }
    float2 s = block_sum2(sw, sg);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One LARS step (fastnet/optim/lars.py, steps 1-4) for the block's chunk of tensor t. excluded[t]:
// lambda = 1 and no weight decay. bufs: momentum buffers (ignored when momentum == 0). half_ptrs:
// FP16 model copies to write (0 entries: none).
extern "C" __global__ void lars_update_f32(const long long* w_ptrs, const long long* g_ptrs,
                                           const long long* buf_ptrs, const long long* half_ptrs,
                                           const long long* numels, const unsigned char* excluded,
                                           const int* block_tensor, const long long* block_start,
                                           const int* first_block, const float2* partials,
                                           float lr, float momentum, float weight_decay,
                                           float trust_coefficient, float eps, int nesterov, int clip) {
    int t = block_tensor[blockIdx.x];
    __shared__ float scale, wd;
    if (threadIdx.x == 0) {
        float lam = 1.f, tensor_lr = lr;
        wd = 0.f;
        if (!excluded[t]) {
            double sw = 0.0, sg = 0.0;  // in block order: deterministic
            for (int b = first_block[t]; b < first_block[t + 1]; ++b) { sw += partials[b].x; sg += partials[b].y; }
            float wn = sqrtf((float)sw), gn = sqrtf((float)sg);
            wd = weight_decay;
            if (wn > 0.f && gn > 0.f) lam = trust_coefficient * wn / (gn + weight_decay * wn + eps);
            tensor_lr = clip ? fminf(lam, lr) : lam * lr;  // LARC's clip: min(lambda, lr)
        }
        scale = tensor_lr;
    }
    __syncthreads();
    const float s = scale, decay = wd;
    long long start = block_start[blockIdx.x];
    long long end = min(start + CHUNK, numels[t]);
    float* w = reinterpret_cast<float*>(w_ptrs[t]);
    const float* g = reinterpret_cast<const float*>(g_ptrs[t]);
    float* v = reinterpret_cast<float*>(buf_ptrs[t]);
    __half* h = reinterpret_cast<__half*>(half_ptrs[t]);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float u = (g[i] + decay * w[i]) * s;
        float wi = w[i];
        if (momentum > 0.f) {
            float vi = momentum * v[i] + u;
            v[i] = vi;
            wi -= nesterov ? u + momentum * vi : vi;
        } else {
            wi -= u;
        }
        w[i] = wi;
        if (h) h[i] = __float2half_rn(wi);
    }
}
