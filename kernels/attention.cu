// Fused multi-head self-attention, forward and backward, read and written in the layouts the
// projections use, so no transpose or copy runs between them: qkv (B, T, 3, H, Dh) is the input
// projection's output as it comes (q, k, v of head h of token t at [t, 0..2, h, :]), mixed and
// dmixed (B, T, H, Dh) are the output projection's input and its gradient, probs and dscores
// (B, H, T, T). Scale is 1 / sqrt(Dh); with causal, query i sees keys 0..i and the rest of its
// row of probs is exactly 0. The math is Ops.attention's (gpunet/backend/ops.py).
//
// One warp per row (b, h, i) of probs, THREADS / 32 rows a block, with no block-wide barrier:
// in the forward its T scores (a lane per key), softmax and output row (a lane per column of
// the head); the backward's first kernel the row of dscores and dq, its second one column j of
// probs and dscores for dk and dv. Every sum runs in a fixed order (the same bits launch after
// launch). Launch: grid ceil(B * H * T / (THREADS / 32)), block THREADS.
//
// Mixed precision (the _bf16 / _f16 kernels, one template with the float32 ones): qkv is the 16-bit
// copy the layer keeps, read as it is; the products' other operands are rounded to its format where
// Ops.attention rounds them (the probabilities before they weigh v, dmixed, the scores' gradient),
// every product of two 16-bit numbers is exact in float32 and the sums are float32, and the
// probabilities (the softmax's backward reads them) are written in float32. The scores' gradient, which
// only products read after it, is written in 16 bits.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallback, so that `nvcc kernels/attention.cu` compiles on its own: gpunet always passes its value
// as a -D flag (cuda_kernels.DEFINES, the one place it is set), and
// tests/kernels/test_resources.py checks that the fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "a block is whole warps");

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"  // NEG_INF, warp_sum

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// S, the storage of qkv (float, __nv_bfloat16 or __half): as_float reads one element exactly, rounded<S>
// is a float32 value as S keeps it (itself for float: the fp32 kernels round nothing), stored<S> one to write.
__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
template <typename S> __device__ __forceinline__ S stored(float x);
template <> __device__ __forceinline__ float stored<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 stored<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half stored<__half>(float x) { return __float2half_rn(x); }
template <typename S> __device__ __forceinline__ float rounded(float x) { return as_float(stored<S>(x)); }

// sum over d < n of r(a[d]) * b[d], in order; r rounds a float32 a to S (a of type S is read as it is).
template <typename S, typename A, typename B>
__device__ __forceinline__ float dot(const A* a, const B* b, int n) {
  float s = 0.f;
  for (int d = 0; d < n; ++d) s = fmaf(rounded<S>(as_float(a[d])), as_float(b[d]), s);
  return s;
}

// out[d] = sum over j < n, in order, of r(w[j * w_stride]) * rows[j * row_stride + d], a lane per d.
template <typename S, typename W, typename R>
__device__ __forceinline__ void weighted_rows(const W* w, long long w_stride, const R* rows, long long row_stride,
                                              int n, int D, float* out) {
  for (int d = threadIdx.x % 32; d < D; d += 32) {
    float acc = 0.f;
    for (int j = 0; j < n; ++j)
      acc = fmaf(rounded<S>(as_float(w[j * w_stride])), as_float(rows[j * row_stride + d]), acc);
    out[d] = acc;
  }
}

// probs row (b, h, i) = softmax(scale * q_i . k_j over j), mixed[b, i, h, :] = sum_j r(p_j) v_j.
template <typename S>
__device__ __forceinline__ void forward(const S* __restrict__ qkv, float* __restrict__ probs, float* __restrict__ mixed,
                                        long long rows, int T, int H, int Dh, float scale, int causal) {
  const long long row = (long long)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: no barrier waits for it
  const int lane = threadIdx.x % 32;
  const long long bh = row / T, b = bh / H;
  const int i = (int)(row % T), h = (int)(bh % H);
  const long long token = 3LL * H * Dh;  // qkv's stride from one token to the next
  const S* keys = qkv + b * T * token + (long long)H * Dh + (long long)h * Dh;
  const S* q = qkv + (b * T + i) * token + (long long)h * Dh;
  float* p = probs + row * T;
  const int visible = causal ? i + 1 : T;
  float top = NEG_INF;
  for (int j = lane; j < visible; j += 32) {
    const float s = dot<S>(q, keys + j * token, Dh) * scale;
    p[j] = s;
    top = fmaxf(top, s);
  }
  top = warp_max(top);
  float sum = 0.f;
  for (int j = lane; j < visible; j += 32) {  // each lane rereads only what it wrote
    const float e = expf(p[j] - top);
    p[j] = e;
    sum += e;
  }
  const float inv = 1.f / warp_sum(sum);
  for (int j = lane; j < T; j += 32) p[j] = j < visible ? p[j] * inv : 0.f;
  __syncwarp();  // every lane reads the whole row below
  weighted_rows<S>(p, 1, keys + (long long)H * Dh, token, visible, Dh,
                   mixed + (b * T + i) * H * Dh + (long long)h * Dh);
}

// Row (b, h, i): dscores_ij = scale * p_ij * (dp_ij - sum_j dp_ij p_ij) with dp_ij = r(do_i) . v_j,
// then dq_i = sum_j r(dscores_ij) k_j, into dqkv[b, i, 0, h, :]. dscores is written as S: in float32 it
// holds dp_ij until its lane overwrites it; a 16-bit one could not, so there dp_ij is computed twice.
template <typename S>
__device__ __forceinline__ void backward_rows(const S* __restrict__ qkv, const float* __restrict__ probs,
                                              const float* __restrict__ dmixed, S* __restrict__ dscores,
                                              float* __restrict__ dqkv, long long rows, int T, int H, int Dh,
                                              float scale, int causal) {
  const long long row = (long long)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const long long bh = row / T, b = bh / H;
  const int i = (int)(row % T), h = (int)(bh % H);
  const long long token = 3LL * H * Dh;
  const S* keys = qkv + b * T * token + (long long)H * Dh + (long long)h * Dh;
  const S* values = keys + (long long)H * Dh;
  const float* d_out = dmixed + (b * T + i) * H * Dh + (long long)h * Dh;
  const float* p = probs + row * T;
  S* ds = dscores + row * T;
  const int visible = causal ? i + 1 : T;
  constexpr bool keeps_dp = sizeof(S) == sizeof(float);
  float weighted = 0.f;
  for (int j = lane; j < visible; j += 32) {
    const float dp = dot<S>(d_out, values + j * token, Dh);
    if (keeps_dp) ds[j] = stored<S>(dp);
    weighted += dp * p[j];
  }
  weighted = warp_sum(weighted);
  for (int j = lane; j < T; j += 32) {
    const float dp = j >= visible ? 0.f : keeps_dp ? as_float(ds[j]) : dot<S>(d_out, values + j * token, Dh);
    ds[j] = stored<S>(j < visible ? scale * p[j] * (dp - weighted) : 0.f);
  }
  __syncwarp();  // every lane reads the whole row below
  weighted_rows<S>(ds, 1, keys, token, visible, Dh, dqkv + (b * T + i) * token + (long long)h * Dh);
}

// Column (b, h, j), after backward_rows: dk_j = sum_i dscores_ij q_i and dv_j = sum_i r(p_ij) r(do_i),
// into dqkv[b, j, 1, h, :] and dqkv[b, j, 2, h, :]. With causal only the queries i >= j see key j (the
// other entries are 0).
template <typename S>
__device__ __forceinline__ void backward_columns(const S* __restrict__ qkv, const float* __restrict__ probs,
                                                 const float* __restrict__ dmixed, const S* __restrict__ dscores,
                                                 float* __restrict__ dqkv, long long rows, int T, int H, int Dh,
                                                 int causal) {
  const long long column = (long long)blockIdx.x * (THREADS / 32) + threadIdx.x / 32;
  if (column >= rows) return;
  const long long bh = column / T, b = bh / H;
  const int j = (int)(column % T), h = (int)(bh % H), first = causal ? j : 0;
  const long long token = 3LL * H * Dh, width = (long long)H * Dh;
  const long long entry = bh * T * T + (long long)first * T + j;  // (first, j) of this head's T x T
  float* dk = dqkv + (b * T + j) * token + width + (long long)h * Dh;
  weighted_rows<S>(dscores + entry, T, qkv + (b * T + first) * token + (long long)h * Dh, token, T - first, Dh, dk);
  for (int d = threadIdx.x % 32; d < Dh; d += 32) {  // dv: both operands rounded (dmixed is float32)
    const float* d_out = dmixed + (b * T + first) * width + (long long)h * Dh + d;
    float acc = 0.f;
    for (int i = 0; i < T - first; ++i) acc = fmaf(rounded<S>(probs[entry + i * T]), rounded<S>(d_out[i * width]), acc);
    dk[width + d] = acc;
  }
}

// The kernels: float32 qkv (attention_*), bfloat16 (_bf16) and float16 (_f16); each entry point is named in full
// (the emulator and tests/kernels find kernels by name), their parameters written once.
#define FORWARD_PARAMS(S)                                                                                     \
  const S* __restrict__ qkv, float* __restrict__ probs, float* __restrict__ mixed, long long rows, int T, int H, \
      int Dh, float scale, int causal
#define ROWS_PARAMS(S)                                                                                     \
  const S* __restrict__ qkv, const float* __restrict__ probs, const float* __restrict__ dmixed,            \
      S* __restrict__ dscores, float* __restrict__ dqkv, long long rows, int T, int H, int Dh, float scale, \
      int causal
#define COLUMNS_PARAMS(S)                                                                                   \
  const S* __restrict__ qkv, const float* __restrict__ probs, const float* __restrict__ dmixed,             \
      const S* __restrict__ dscores, float* __restrict__ dqkv, long long rows, int T, int H, int Dh, int causal
#define FORWARD_BODY forward(qkv, probs, mixed, rows, T, H, Dh, scale, causal)
#define ROWS_BODY backward_rows(qkv, probs, dmixed, dscores, dqkv, rows, T, H, Dh, scale, causal)
#define COLUMNS_BODY backward_columns(qkv, probs, dmixed, dscores, dqkv, rows, T, H, Dh, causal)

extern "C" __global__ void attention_forward(FORWARD_PARAMS(float)) { FORWARD_BODY; }
extern "C" __global__ void attention_backward_rows(ROWS_PARAMS(float)) { ROWS_BODY; }
extern "C" __global__ void attention_backward_columns(COLUMNS_PARAMS(float)) { COLUMNS_BODY; }

extern "C" __global__ void attention_forward_bf16(FORWARD_PARAMS(__nv_bfloat16)) { FORWARD_BODY; }
extern "C" __global__ void attention_backward_rows_bf16(ROWS_PARAMS(__nv_bfloat16)) { ROWS_BODY; }
extern "C" __global__ void attention_backward_columns_bf16(COLUMNS_PARAMS(__nv_bfloat16)) { COLUMNS_BODY; }

extern "C" __global__ void attention_forward_f16(FORWARD_PARAMS(__half)) { FORWARD_BODY; }
extern "C" __global__ void attention_backward_rows_f16(ROWS_PARAMS(__half)) { ROWS_BODY; }
extern "C" __global__ void attention_backward_columns_f16(COLUMNS_PARAMS(__half)) { COLUMNS_BODY; }
