// FlashAttention-2-style fused attention for wildlong: forward and backward, bf16 inputs with
// f32 accumulation on tensor cores (mma.sync m16n8k16 fed by ldmatrix, sm_80+; the fragment
// indexing is emulated lane by lane in scripts/emulate_flash_attn.py), grouped-query heads,
// and a position/segment mask that covers causal prefill, decode after a KV cache, left
// padding, sliding windows and packed (variable-length) training rows in one rule:
//
//   query i (row of the query tensor) may see key j when
//     j <= i + (tk - tq)                       (causal in slot order; bottom-right aligned)
//     k_pos[j] >= 0 && k_pos[j] <= q_pos[i]    (padding keys have position -1)
//     window == 0 || q_pos[i] - k_pos[j] < window
//     q_seg == null || q_seg[i] == k_seg[j]    (packed documents never see each other)
//
// A query row that sees no key gets a zero output. q_kmin (nullable) is a hint: the first
// key index query i can see (the start of its packed document); key blocks before it are
// skipped. The plain reference is `attention_reference` in src/train/ops.rs and the engine's
// masked softmax; tests/integration/cuda.rs compares them.
//
// Layouts: q (b, ·, ·, d) with element strides (batch, head, token) given; d contiguous and
// d in {64, 128}. The G = hq / hkv query heads of one KV head are folded into the row axis
// of a block (row r = gi * tq + i), so each K/V tile is read once for the whole group.
// LSE (natural log) is written (b, hq, tq) f32 for the backward pass.

#include <cuda_bf16.h>
#include <stdint.h>

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_raw(bf16 lo, bf16 hi) {
  __nv_bfloat162 v;
  v.x = lo;
  v.y = hi;
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t ld32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// ldmatrix: four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses
// of matrix i (16-byte aligned), and lane l receives of matrix i the pair (row l/4, columns
// 2(l%4), 2(l%4)+1) — or, with .trans, (rows 2(l%4), 2(l%4)+1, column l/4) — in register i.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const bf16* p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const bf16* p) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// mma operands from shared-memory tiles of row stride S (elements; S·2 bytes a multiple of
// 16), for lane `lane` (PTX ISA fragment layouts for m16n8k16 bf16, with g = lane / 4,
// t = lane % 4; emulated in scripts/emulate_flash_attn.py):
// A (16 x 16) = tile rows r0.., columns c0..: a0 (g, 2t), a1 (g+8, 2t), a2 (g, 2t+8), a3 (g+8, 2t+8).
__device__ __forceinline__ void frag_a(uint32_t* a, const bf16* tile, int S, int r0, int c0,
                                       int lane) {
  ldsm_x4(a, tile + (r0 + lane % 16) * S + c0 + (lane / 16) * 8);
}

// B operands (16 x 8, k x n) of two n-tiles, B = tile^T: column n of n-tile j is tile row
// n0 + 8j + n, k runs along the row from k0. b[0..1] for n-tile 0, b[2..3] for n-tile 1.
__device__ __forceinline__ void frag_b_t2(uint32_t* b, const bf16* tile, int S, int n0, int k0,
                                          int lane) {
  ldsm_x4(b, tile + (n0 + lane % 8 + (lane / 16) * 8) * S + k0 + ((lane / 8) % 2) * 8);
}

// B operands of two n-tiles read straight from the tile: k = tile rows k0.., n = tile
// columns n0 + 8j... b[0..1] for n-tile 0, b[2..3] for n-tile 1.
__device__ __forceinline__ void frag_b2(uint32_t* b, const bf16* tile, int S, int k0, int n0,
                                        int lane) {
  ldsm_x4_t(b, tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * S + n0 + (lane / 16) * 8);
}

// A (16 x 16) of an accumulator pair: the f32 C fragments of n-tiles 2kk and 2kk + 1 are,
// element for element, the A fragment of k-tile kk (the FlashAttention-2 register reuse).
__device__ __forceinline__ void frag_a_acc(uint32_t* a, const float* c0, const float* c1) {
  a[0] = pack_bf16(c0[0], c0[1]);
  a[1] = pack_bf16(c0[2], c0[3]);
  a[2] = pack_bf16(c1[0], c1[1]);
  a[3] = pack_bf16(c1[2], c1[3]);
}

// A (16 x 16) read transposed: A[m][k] = tile[k0 + k][m0 + m].
__device__ __forceinline__ void frag_a_t(uint32_t* a, const bf16* tile, int S, int k0, int m0,
                                         int lane) {
  int i = lane / 8;
  ldsm_x4_t(a, tile + (k0 + lane % 8 + (i / 2) * 8) * S + m0 + (i % 2) * 8);
}

struct MaskRow {
  int i;      // query index in [0, tq), or -1 for a row past the end
  int pos;    // its position
  int seg;    // its segment (0 without segments)
};

__device__ __forceinline__ bool visible(const MaskRow& q, int j, int kpos, int kseg, int off,
                                        int window, bool segs) {
  return q.i >= 0 && j <= q.i + off && kpos >= 0 && kpos <= q.pos &&
         (window == 0 || q.pos - kpos < window) && (!segs || q.seg == kseg);
}

// Copies `rows` rows of D bf16 (global row stride given per (row) by the caller's pointer
// function) into shared memory with row stride SD; rows past `valid` are zero.
template <int D, int SD, int THREADS>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* const* src_rows, int rows) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * CH; c += THREADS) {
    int r = c / CH, k = (c % CH) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (src_rows[r] != nullptr) v = *reinterpret_cast<const uint4*>(src_rows[r] + k);
    *reinterpret_cast<uint4*>(dst + r * SD + k) = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: block = 4 warps = 64 folded query rows of one KV head; key tiles of BC = 32.
// ---------------------------------------------------------------------------------------------
template <int D>
__device__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ o,
                          float* __restrict__ lse, const int* __restrict__ q_pos,
                          const int* __restrict__ k_pos, const int* __restrict__ q_seg,
                          const int* __restrict__ k_seg, const int* __restrict__ q_kmin,
                          int has_seg, int has_kmin, int hq, int hkv, int tq, int tk,
                          int window, float scale_log2, long long q_sb, long long q_sh,
                          long long q_st, long long k_sb, long long k_sh, long long k_st,
                          long long v_sb, long long v_sh, long long v_st, long long o_sb,
                          long long o_sh, long long o_st) {
  constexpr int BR = 64, BC = 32, SD = D + 8, NT_O = D / 8, KT_D = D / 16;
  __shared__ __align__(16) bf16 qs[BR * SD];
  __shared__ __align__(16) bf16 ks[BC * SD];
  __shared__ __align__(16) bf16 vs[BC * SD];
  __shared__ const bf16* rowp[BR];
  __shared__ int kpos_s[BC], kseg_s[BC];
  __shared__ int lim[2];

  const int G = hq / hkv;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int r0 = blockIdx.x * BR;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = tk - tq;
  const bool segs = has_seg != 0;

  if (threadIdx.x == 0) {
    lim[0] = tk;  // first key block needed (min over rows)
    lim[1] = 0;   // one past the last key needed (max over rows)
  }
  __syncthreads();
  if (threadIdx.x < BR) {
    int r = r0 + threadIdx.x;
    const bf16* p = nullptr;
    if (r < G * tq) {
      int gi = r / tq, i = r % tq, h = kvh * G + gi;
      p = q + b * q_sb + h * q_sh + (long long)i * q_st;
      int kmin = has_kmin ? q_kmin[b * tq + i] : 0;
      atomicMin(&lim[0], kmin);
      atomicMax(&lim[1], min(i + off + 1, tk));
    }
    rowp[threadIdx.x] = p;
  }
  __syncthreads();
  load_tile<D, SD, 128>(qs, rowp, BR);

  // This thread's two rows: g and g + 8 of the warp's 16.
  MaskRow mr[2];
#pragma unroll
  for (int e = 0; e < 2; e++) {
    int r = r0 + warp * 16 + g + e * 8;
    if (r < G * tq) {
      int i = r % tq;
      mr[e].i = i;
      mr[e].pos = q_pos[b * tq + i];
      mr[e].seg = segs ? q_seg[b * tq + i] : 0;
    } else {
      mr[e].i = -1;
      mr[e].pos = -1;
      mr[e].seg = 0;
    }
  }

  float acc[NT_O][4];
#pragma unroll
  for (int n = 0; n < NT_O; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

  const int kstart = (lim[0] / BC) * BC, kend = lim[1];
  for (int j0 = kstart; j0 < kend; j0 += BC) {
    __syncthreads();  // the previous tile is no longer read
    if (threadIdx.x < BC) {
      int j = j0 + threadIdx.x;
      rowp[threadIdx.x] = j < tk ? k + b * k_sb + kvh * k_sh + (long long)j * k_st : nullptr;
      rowp[BC + threadIdx.x] = j < tk ? v + b * v_sb + kvh * v_sh + (long long)j * v_st : nullptr;
      kpos_s[threadIdx.x] = j < tk ? k_pos[b * tk + j] : -1;
      kseg_s[threadIdx.x] = (j < tk && segs) ? k_seg[b * tk + j] : 0;
    }
    __syncthreads();
    load_tile<D, SD, 128>(ks, rowp, BC);
    load_tile<D, SD, 128>(vs, rowp + BC, BC);
    __syncthreads();

    // S = Q K^T for the warp's 16 rows x 32 keys.
    float s[BC / 8][4];
#pragma unroll
    for (int n = 0; n < BC / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kt = 0; kt < KT_D; kt++) {
      uint32_t a[4];
      frag_a(a, qs, SD, warp * 16, kt * 16, lane);
#pragma unroll
      for (int n = 0; n < BC / 8; n += 2) {
        uint32_t bb[4];
        frag_b_t2(bb, ks, SD, n * 8, kt * 16, lane);
        mma_bf16(s[n], a, bb);
        mma_bf16(s[n + 1], a, bb + 2);
      }
    }
    // Mask, scale (log2 domain), online softmax.
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
#pragma unroll
      for (int c = 0; c < 4; c++) {
        int e = c / 2, col = n * 8 + 2 * t + (c & 1), j = j0 + col;
        bool ok = visible(mr[e], j, kpos_s[col], kseg_s[col], off, window, segs);
        s[n][c] = ok ? s[n][c] * scale_log2 : NEG_INF;
        mx[e] = fmaxf(mx[e], s[n][c]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; e++) {
      mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffff, mx[e], 1));
      mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffff, mx[e], 2));
      float mn = fmaxf(m[e], mx[e]);
      alpha[e] = (mn == NEG_INF) ? 1.f : exp2f(m[e] - mn);  // exp2(-inf) = 0 when m was -inf
      m[e] = mn;
      l[e] *= alpha[e];
    }
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
#pragma unroll
      for (int c = 0; c < 4; c++) {
        int e = c / 2;
        float p = (s[n][c] == NEG_INF) ? 0.f : exp2f(s[n][c] - m[e]);
        s[n][c] = p;
        l[e] += p;
      }
    }
#pragma unroll
    for (int n = 0; n < NT_O; n++) {
      acc[n][0] *= alpha[0];
      acc[n][1] *= alpha[0];
      acc[n][2] *= alpha[1];
      acc[n][3] *= alpha[1];
    }
    // O += P V: P's accumulator layout is the A-operand layout of the next product.
#pragma unroll
    for (int kk = 0; kk < BC / 16; kk++) {
      uint32_t a[4];
      frag_a_acc(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int n = 0; n < NT_O; n += 2) {
        uint32_t bb[4];
        frag_b2(bb, vs, SD, kk * 16, n * 8, lane);
        mma_bf16(acc[n], a, bb);
        mma_bf16(acc[n + 1], a, bb + 2);
      }
    }
  }

  // Normalise and write.
#pragma unroll
  for (int e = 0; e < 2; e++) {
    l[e] += __shfl_xor_sync(0xffffffff, l[e], 1);
    l[e] += __shfl_xor_sync(0xffffffff, l[e], 2);
  }
#pragma unroll
  for (int e = 0; e < 2; e++) {
    int r = r0 + warp * 16 + g + e * 8;
    if (mr[e].i < 0) continue;
    int gi = r / tq, i = mr[e].i, h = kvh * G + gi;
    float inv = l[e] > 0.f ? 1.f / l[e] : 0.f;
    bf16* orow = o + b * o_sb + h * o_sh + (long long)i * o_st;
#pragma unroll
    for (int n = 0; n < NT_O; n++) {
      __nv_bfloat162 val = __floats2bfloat162_rn(acc[n][2 * e] * inv, acc[n][2 * e + 1] * inv);
      *reinterpret_cast<__nv_bfloat162*>(orow + n * 8 + 2 * t) = val;
    }
    if (t == 0 && lse != nullptr) {
      // ln(sum exp(s·scale)) = (m + log2 l) · ln 2; +inf for a row that sees nothing.
      lse[((long long)b * hq + h) * tq + i] =
          l[e] > 0.f ? (m[e] + log2f(l[e])) * 0.6931471805599453f : POS_INF;
    }
  }
}

#define FWD_ARGS                                                                               \
  const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, const int *q_pos,         \
      const int *k_pos, const int *q_seg, const int *k_seg, const int *q_kmin, int has_seg,    \
      int has_kmin, int hq, int hkv, int tq, int tk, int window, float scale_log2,             \
      long long q_sb, long long q_sh, long long q_st, long long k_sb, long long k_sh,          \
      long long k_st, long long v_sb, long long v_sh, long long v_st, long long o_sb,          \
      long long o_sh, long long o_st
#define FWD_CALL                                                                               \
  q, k, v, o, lse, q_pos, k_pos, q_seg, k_seg, q_kmin, has_seg, has_kmin, hq, hkv, tq, tk,     \
      window, scale_log2, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, o_sb, o_sh,    \
      o_st

extern "C" __global__ void __launch_bounds__(128) flash_fwd_d64(FWD_ARGS) {
  flash_fwd<64>(FWD_CALL);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_d128(FWD_ARGS) {
  flash_fwd<128>(FWD_CALL);
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2): block = 4 warps = 64 keys of one KV head (16 per warp); it
// walks every query row of the head's group in blocks of BR = 32, accumulating dK and dV in
// registers (no atomics: each key belongs to one block) and adding its share of dQ into an
// f32 buffer with atomics. Inputs: q, k, v, dO (bf16, strided as in the forward), LSE
// (b, hq, tq) from the forward, Dv = rowsum(dO ∘ O) (b, hq, tq) f32. Outputs: dq_acc
// (b, tq, hq, d) f32 zero-initialised by the caller, dk and dv (b, tk, hkv, d) f32.
// ---------------------------------------------------------------------------------------------
template <int D>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ dvec,
                          float* __restrict__ dq_acc, float* __restrict__ dk,
                          float* __restrict__ dv, const int* __restrict__ q_pos,
                          const int* __restrict__ k_pos, const int* __restrict__ q_seg,
                          const int* __restrict__ k_seg, const int* __restrict__ q_kmin,
                          int has_seg, int has_kmin, int hq, int hkv, int tq, int tk,
                          int window, float scale, long long q_sb, long long q_sh,
                          long long q_st, long long k_sb, long long k_sh, long long k_st,
                          long long v_sb, long long v_sh, long long v_st, long long d_sb,
                          long long d_sh, long long d_st) {
  constexpr int BK = 64, BR = 32, SD = D + 8, SS = BR + 8, NT_D = D / 8, KT_D = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* ks = reinterpret_cast<bf16*>(smem_raw);
  bf16* vs = ks + BK * SD;
  bf16* qs = vs + BK * SD;
  bf16* dos = qs + BR * SD;
  bf16* dss = dos + BR * SD;  // dS^T (BK keys x BR queries)
  float* lse_s = reinterpret_cast<float*>(dss + BK * SS);
  float* dvec_s = lse_s + BR;
  int* qi_s = reinterpret_cast<int*>(dvec_s + BR);
  int* qpos_s = qi_s + BR;
  int* qseg_s = qpos_s + BR;
  int* kpos_s = qseg_s + BR;
  int* kseg_s = kpos_s + BK;
  const bf16** rowp = reinterpret_cast<const bf16**>(kseg_s + BK);  // 2 * BK pointers
  __shared__ int skip;

  const int G = hq / hkv;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int j0 = blockIdx.x * BK;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int off = tk - tq;
  const bool segs = has_seg != 0;
  const float scale_log2 = scale * 1.4426950408889634f;

  if (threadIdx.x < BK) {
    int j = j0 + threadIdx.x;
    rowp[threadIdx.x] = j < tk ? k + b * k_sb + kvh * k_sh + (long long)j * k_st : nullptr;
    rowp[BK + threadIdx.x] = j < tk ? v + b * v_sb + kvh * v_sh + (long long)j * v_st : nullptr;
    kpos_s[threadIdx.x] = j < tk ? k_pos[b * tk + j] : -1;
    kseg_s[threadIdx.x] = (j < tk && segs) ? k_seg[b * tk + j] : 0;
  }
  __syncthreads();
  load_tile<D, SD, 128>(ks, rowp, BK);
  load_tile<D, SD, 128>(vs, rowp + BK, BK);

  float dk_acc[NT_D][4], dv_acc[NT_D][4];
#pragma unroll
  for (int n = 0; n < NT_D; n++)
#pragma unroll
    for (int c = 0; c < 4; c++) dk_acc[n][c] = dv_acc[n][c] = 0.f;

  const int jlast = min(j0 + BK, tk) - 1;
  // Queries before istart cannot see any key of this block (causal in slot order).
  const int istart = max(0, j0 - off);

  for (int gi = 0; gi < G; gi++) {
    const int h = kvh * G + gi;
    for (int i0 = (istart / BR) * BR; i0 < tq; i0 += BR) {
      __syncthreads();  // previous tiles are no longer read
      if (threadIdx.x == 0) skip = 1;
      __syncthreads();
      if (threadIdx.x < BR) {
        int i = i0 + threadIdx.x;
        bool in = i < tq;
        qi_s[threadIdx.x] = in ? i : -1;
        qpos_s[threadIdx.x] = in ? q_pos[b * tq + i] : -1;
        qseg_s[threadIdx.x] = (in && segs) ? q_seg[b * tq + i] : 0;
        lse_s[threadIdx.x] = in ? lse[((long long)b * hq + h) * tq + i] * 1.4426950408889634f : 0.f;
        dvec_s[threadIdx.x] = in ? dvec[((long long)b * hq + h) * tq + i] : 0.f;
        rowp[threadIdx.x] = in ? q + b * q_sb + h * q_sh + (long long)i * q_st : nullptr;
        rowp[BR + threadIdx.x] = in ? dout + b * d_sb + h * d_sh + (long long)i * d_st : nullptr;
        if (in && (!has_kmin || q_kmin[b * tq + i] <= jlast)) skip = 0;
      }
      __syncthreads();
      if (skip) continue;  // uniform across the block
      load_tile<D, SD, 128>(qs, rowp, BR);
      load_tile<D, SD, 128>(dos, rowp + BR, BR);
      __syncthreads();

      // S^T = K_w Q^T (16 keys x 32 queries) and dP^T = V_w dO^T.
      float s[BR / 8][4], dp[BR / 8][4];
#pragma unroll
      for (int n = 0; n < BR / 8; n++)
#pragma unroll
        for (int c = 0; c < 4; c++) s[n][c] = dp[n][c] = 0.f;
#pragma unroll
      for (int kt = 0; kt < KT_D; kt++) {
        uint32_t ak[4], av[4];
        frag_a(ak, ks, SD, warp * 16, kt * 16, lane);
        frag_a(av, vs, SD, warp * 16, kt * 16, lane);
#pragma unroll
        for (int n = 0; n < BR / 8; n += 2) {
          uint32_t bq[4], bd[4];
          frag_b_t2(bq, qs, SD, n * 8, kt * 16, lane);
          frag_b_t2(bd, dos, SD, n * 8, kt * 16, lane);
          mma_bf16(s[n], ak, bq);
          mma_bf16(s[n + 1], ak, bq + 2);
          mma_bf16(dp[n], av, bd);
          mma_bf16(dp[n + 1], av, bd + 2);
        }
      }
      // P^T and dS^T = P^T ∘ (dP^T − Dv) (rows: keys g, g+8 of the warp; cols: queries).
#pragma unroll
      for (int n = 0; n < BR / 8; n++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
          int kr = warp * 16 + g + (c / 2) * 8, col = n * 8 + 2 * t + (c & 1);
          MaskRow mq;
          mq.i = qi_s[col];
          mq.pos = qpos_s[col];
          mq.seg = qseg_s[col];
          bool ok = visible(mq, j0 + kr, kpos_s[kr], kseg_s[kr], off, window, segs);
          float p = ok ? exp2f(s[n][c] * scale_log2 - lse_s[col]) : 0.f;
          s[n][c] = p;
          dp[n][c] = p * (dp[n][c] - dvec_s[col]);
        }
      }
      // dV_w += P^T dO and dK_w += dS^T Q (B operands read column-wise from shared memory).
#pragma unroll
      for (int kk = 0; kk < BR / 16; kk++) {
        uint32_t ap[4], as[4];
        frag_a_acc(ap, s[2 * kk], s[2 * kk + 1]);
        frag_a_acc(as, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < NT_D; n += 2) {
          uint32_t bd[4], bq[4];
          frag_b2(bd, dos, SD, kk * 16, n * 8, lane);
          frag_b2(bq, qs, SD, kk * 16, n * 8, lane);
          mma_bf16(dv_acc[n], ap, bd);
          mma_bf16(dv_acc[n + 1], ap, bd + 2);
          mma_bf16(dk_acc[n], as, bq);
          mma_bf16(dk_acc[n + 1], as, bq + 2);
        }
      }
      // dS^T to shared memory for dQ = dS K.
#pragma unroll
      for (int n = 0; n < BR / 8; n++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
          int kr = warp * 16 + g + (c / 2) * 8, col = n * 8 + 2 * t + (c & 1);
          dss[kr * SS + col] = __float2bfloat16(dp[n][c]);
        }
      }
      __syncthreads();
      {
        // Warp w: query rows 16·(w % 2) .. +16, output columns (w / 2)·D/2 .. +D/2.
        const int mq = (warp % 2) * 16, n0 = (warp / 2) * (NT_D / 2);
        float dq[NT_D / 2][4];
#pragma unroll
        for (int n = 0; n < NT_D / 2; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
          uint32_t a[4];
          frag_a_t(a, dss, SS, kk * 16, mq, lane);
#pragma unroll
          for (int n = 0; n < NT_D / 2; n += 2) {
            uint32_t bb[4];
            frag_b2(bb, ks, SD, kk * 16, (n0 + n) * 8, lane);
            mma_bf16(dq[n], a, bb);
            mma_bf16(dq[n + 1], a, bb + 2);
          }
        }
#pragma unroll
        for (int e = 0; e < 2; e++) {
          int i = qi_s[mq + g + e * 8];
          if (i < 0) continue;
          float* row = dq_acc + (((long long)b * tq + i) * hq + h) * D;
#pragma unroll
          for (int n = 0; n < NT_D / 2; n++) {
            int col = (n0 + n) * 8 + 2 * t;
            atomicAdd(row + col, dq[n][2 * e] * scale);
            atomicAdd(row + col + 1, dq[n][2 * e + 1] * scale);
          }
        }
      }
    }
  }

  // dK = scale · dS^T Q, dV = P^T dO for the warp's 16 keys.
#pragma unroll
  for (int e = 0; e < 2; e++) {
    int j = j0 + warp * 16 + g + e * 8;
    if (j >= tk) continue;
    float* dkr = dk + (((long long)b * tk + j) * hkv + kvh) * D;
    float* dvr = dv + (((long long)b * tk + j) * hkv + kvh) * D;
#pragma unroll
    for (int n = 0; n < NT_D; n++) {
      int col = n * 8 + 2 * t;
      dkr[col] = dk_acc[n][2 * e] * scale;
      dkr[col + 1] = dk_acc[n][2 * e + 1] * scale;
      dvr[col] = dv_acc[n][2 * e];
      dvr[col + 1] = dv_acc[n][2 * e + 1];
    }
  }
}

#define BWD_ARGS                                                                               \
  const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse,            \
      const float *dvec, float *dq_acc, float *dk, float *dv, const int *q_pos,                \
      const int *k_pos, const int *q_seg, const int *k_seg, const int *q_kmin, int has_seg,    \
      int has_kmin, int hq, int hkv, int tq, int tk, int window, float scale, long long q_sb,  \
      long long q_sh, long long q_st, long long k_sb, long long k_sh, long long k_st,          \
      long long v_sb, long long v_sh, long long v_st, long long d_sb, long long d_sh,          \
      long long d_st
#define BWD_CALL                                                                               \
  q, k, v, dout, lse, dvec, dq_acc, dk, dv, q_pos, k_pos, q_seg, k_seg, q_kmin, has_seg,       \
      has_kmin, hq, hkv, tq, tk, window, scale, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb,      \
      v_sh, v_st, d_sb, d_sh, d_st

extern "C" __global__ void __launch_bounds__(128) flash_bwd_d64(BWD_ARGS) {
  flash_bwd<64>(BWD_CALL);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_d128(BWD_ARGS) {
  flash_bwd<128>(BWD_CALL);
}
