// Fused element-wise and row kernels for wildlong's trainer on CUDA, each the GPU twin of a
// CPU op in src/train/ops.rs (its plain reference there) and compared with it by
// tests/integration/cuda.rs:
//   rms_norm_fwd_f32 / rms_norm_bwd_f32  y = x / sqrt(mean(x²) + eps) · w, and dx, dw;
//   rope_f32 / rope_bf16                 rotation by per-(batch, token) cos/sin tables
//                                        (any RoPE scaling: the tables carry it), half-split
//                                        or interleaved; `inverse` rotates by −θ (backward);
//   ce_rows_f32                          per-row log-sum-exp minus the target logit of a
//                                        chunk of logits and, with grad, softmax − one-hot
//                                        (the chunked cross-entropy's gradient).

#include <cuda_bf16.h>
#include <stdint.h>

#define NEG_INF (-__int_as_float(0x7f800000))

// Sum (or max) over a block of `blockDim.x` ≤ 1024 threads; every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  int w = threadIdx.x / 32, lane = threadIdx.x % 32, nw = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : NEG_INF;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// One block per row of d.
extern "C" __global__ void rms_norm_fwd_f32(const float* __restrict__ x,
                                            const float* __restrict__ w, float* __restrict__ y,
                                            int d, float eps) {
  __shared__ float red[32];
  const float* xr = x + (long long)blockIdx.x * d;
  float* yr = y + (long long)blockIdx.x * d;
  float ss = 0.f;
  for (int c = threadIdx.x; c < d; c += blockDim.x) ss += xr[c] * xr[c];
  float inv = rsqrtf(block_sum(ss, red) / d + eps);
  for (int c = threadIdx.x; c < d; c += blockDim.x) yr[c] = xr[c] * inv * w[c];
}

// ROWS rows per block; each thread keeps its columns' share of dw in registers and adds it
// to `dw` (f32, zeroed by the caller) once. d ≤ blockDim.x · MAXC.
#define RMS_BWD_ROWS 32
#define RMS_BWD_MAXC 32
extern "C" __global__ void rms_norm_bwd_f32(const float* __restrict__ x,
                                            const float* __restrict__ w,
                                            const float* __restrict__ dy,
                                            float* __restrict__ dx, float* __restrict__ dw,
                                            int n, int d, float eps) {
  __shared__ float red[32];
  float dwp[RMS_BWD_MAXC];
#pragma unroll
  for (int k = 0; k < RMS_BWD_MAXC; k++) dwp[k] = 0.f;
  int r0 = blockIdx.x * RMS_BWD_ROWS;
  for (int r = r0; r < min(r0 + RMS_BWD_ROWS, n); r++) {
    const float* xr = x + (long long)r * d;
    const float* gr = dy + (long long)r * d;
    float ss = 0.f, dot = 0.f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      ss += xr[c] * xr[c];
      dot += gr[c] * w[c] * xr[c];
    }
    ss = block_sum(ss, red);
    dot = block_sum(dot, red);
    float inv = rsqrtf(ss / d + eps);
    // dx = inv · (dy·w − x̂ · mean(dy·w·x̂)), x̂ = x·inv.
    float proj = dot * inv / d;
    float* dxr = dx + (long long)r * d;
    int k = 0;
    for (int c = threadIdx.x; c < d; c += blockDim.x, k++) {
      float xh = xr[c] * inv;
      dxr[c] = inv * (gr[c] * w[c] - xh * proj);
      dwp[k] += gr[c] * xh;
    }
  }
  int k = 0;
  for (int c = threadIdx.x; c < d; c += blockDim.x, k++) atomicAdd(dw + c, dwp[k]);
}

// x (b, h, t, d) contiguous, cos/sin (b, t, d/2) f32; one thread per rotated pair.
template <typename T>
__device__ __forceinline__ void rope_impl(const T* __restrict__ x, const float* __restrict__ cos,
                                          const float* __restrict__ sin, T* __restrict__ y,
                                          int b, int h, int t, int d, int interleaved,
                                          int inverse) {
  long long half = d / 2;
  long long total = (long long)b * h * t * half;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    long long i = idx % half, row = idx / half;  // row enumerates (b, h, t)
    long long ti = row % t, bi = row / ((long long)h * t);
    float c = cos[(bi * t + ti) * half + i];
    float s = sin[(bi * t + ti) * half + i];
    if (inverse) s = -s;
    long long a = interleaved ? 2 * i : i, bj = interleaved ? 2 * i + 1 : i + half;
    const T* xr = x + row * d;
    T* yr = y + row * d;
    float x1 = (float)xr[a], x2 = (float)xr[bj];
    yr[a] = (T)(x1 * c - x2 * s);
    yr[bj] = (T)(x2 * c + x1 * s);
  }
}

extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin, float* y,
                                    int b, int h, int t, int d, int interleaved, int inverse) {
  rope_impl<float>(x, cos, sin, y, b, h, t, d, interleaved, inverse);
}
extern "C" __global__ void rope_bf16(const __nv_bfloat16* x, const float* cos, const float* sin,
                                     __nv_bfloat16* y, int b, int h, int t, int d,
                                     int interleaved, int inverse) {
  rope_impl<__nv_bfloat16>(x, cos, sin, y, b, h, t, d, interleaved, inverse);
}

// One block per row of a logits chunk z (c, v): loss[r] = logsumexp(z_r) − z_r[target_r];
// with dz non-null, dz_r = softmax(z_r) − one-hot(target_r) (d loss_r / d z_r).
extern "C" __global__ void ce_rows_f32(const float* __restrict__ z, float* __restrict__ dz,
                                       const int* __restrict__ targets,
                                       float* __restrict__ loss, int v, int grad) {
  __shared__ float red[32];
  const float* zr = z + (long long)blockIdx.x * v;
  int tg = targets[blockIdx.x];
  float mx = NEG_INF;
  for (int c = threadIdx.x; c < v; c += blockDim.x) mx = fmaxf(mx, zr[c]);
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int c = threadIdx.x; c < v; c += blockDim.x) sum += __expf(zr[c] - mx);
  sum = block_sum(sum, red);
  if (threadIdx.x == 0) loss[blockIdx.x] = mx + logf(sum) - zr[tg];
  if (grad) {
    float* dzr = dz + (long long)blockIdx.x * v;
    float inv = 1.f / sum;
    for (int c = threadIdx.x; c < v; c += blockDim.x) {
      float p = __expf(zr[c] - mx) * inv;
      dzr[c] = c == tg ? p - 1.f : p;
    }
  }
}
