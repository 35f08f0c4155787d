// The tiled GEMM with a fused bias + activation epilogue, and the backward epilogue (derivative,
// bias_act_backward_rows), written once for every input type:
// gemm.cu instantiates it for float (gemm_bias_act), gemm16.cu for bfloat16 and float16
// (gemm16_bf16, gemm16_f16: 16-bit loads, float32 arithmetic). A .cu file that includes this
// header first defines to_float() for its input type (float's is here). gpunet passes THREADS, the
// tiles and the ACT_* codes as -D flags (cuda_kernels.DEFINES); the fallbacks below, equal to those
// (tests/kernels/test_resources.py checks), let `nvcc` compile an including file alone.
#ifndef GPUNET_KERNELS_GEMM_TILES_CUH
#define GPUNET_KERNELS_GEMM_TILES_CUH

#ifndef THREADS
#define THREADS 256
#endif
#ifndef TILE_M
#define TILE_M 64
#endif
#ifndef TILE_N
#define TILE_N 64
#endif
#ifndef TILE_K
#define TILE_K 16
#endif
#ifndef ROWS_PER_CHUNK
#define ROWS_PER_CHUNK 64
#endif
#ifndef ACT_NONE
#define ACT_NONE 0
#endif
#ifndef ACT_RELU
#define ACT_RELU 1
#endif
#ifndef ACT_SIGMOID
#define ACT_SIGMOID 2
#endif
#ifndef ACT_TANH
#define ACT_TANH 3
#endif
#ifndef ACT_GELU
#define ACT_GELU 4
#endif
#ifndef ACT_GELU_TANH
#define ACT_GELU_TANH 5
#endif

static_assert(THREADS == 16 * 16 && TILE_M == 16 * 4 && TILE_N == 16 * 4,
              "gemm_tiles' 16 x 16 threads each compute a 4 x 4 block of the TILE_M x TILE_N tile of C");

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ void store_float(float* at, float v) { *at = v; }

__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case ACT_RELU: return z <= 0.f ? 0.f : z;  // NaN passes through, as on the CPU and in torch
    case ACT_SIGMOID: return 1.f / (1.f + expf(-z));
    case ACT_TANH: return tanhf(z);
    case ACT_GELU: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case ACT_GELU_TANH:
      return 0.5f * z * (1.f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    default: return z;
  }
}

// d activation / dz from the pre-activation z and the output y (whichever the formula needs).
__device__ __forceinline__ float derivative(float z, float y, int act) {
  switch (act) {
    case ACT_RELU: return z > 0.f ? 1.f : 0.f;
    case ACT_SIGMOID: return y * (1.f - y);
    case ACT_TANH: return 1.f - y * y;
    case ACT_GELU: return 0.5f * (1.f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case ACT_GELU_TANH: {
      float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      float t = tanhf(u);
      return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * 0.79788456080286536f * (1.f + 0.134145f * z * z);
    }
    default: return 1.f;
  }
}

// dx = dy * act'(x, y) elementwise, x and y (either may stand in for the other where act' does not read
// it) of type TA: float, or 16 bits (a ReLU's output kept in mixed precision; gemm16.cu's kernels).
#define ACTIVATION_BACKWARD_PARAMS(TA) \
  const TA* __restrict__ x, const TA* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, long long n, int act

template <typename TA>
__device__ __forceinline__ void activation_backward_elements(ACTIVATION_BACKWARD_PARAMS(TA)) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dx[i] = dy[i] * derivative(to_float(x[i]), to_float(y[i]), act);
}

// The backward epilogue of a Dense layer: dz = dy * act'(z, y) (written when write_dz), and the bias
// gradient, the column sums of dz, summed in float32 whatever dz is stored in. Each block sums
// ROWS_PER_CHUNK rows of its columns into partial[chunk, col]; with sum_bias, the block that finishes
// last adds the partials up, in chunk order, into grad_bias (so the result does not depend on which
// block was last) and resets done_blocks to 0 for the next launch. One launch, no grid-wide sync: the
// other blocks never wait. Without sum_bias the host sums them. A block walks chunks blockIdx.y,
// + gridDim.y, ... (gridDim.y is capped at 65,535 on every GPU). TA: the type z and y are kept in
// (float, or 16 bits: a ReLU's output kept in mixed precision), TD: dz's (16 bits when only the
// GEMMs read it, which would round it anyway). The including file defines last_block_done
// (common.cuh), to_float and store_float for its types.
#define BIAS_ACT_BACKWARD_PARAMS(TA, TD)                                                                 \
  const float* __restrict__ dy, const TA* __restrict__ z, const TA* __restrict__ y, TD* __restrict__ dz, \
      float *partial, float *__restrict__ grad_bias, unsigned int *done_blocks, int M, int N, int act,   \
      int write_dz, int sum_bias
#define BIAS_ACT_BACKWARD_ARGS dy, z, y, dz, partial, grad_bias, done_blocks, M, N, act, write_dz, sum_bias

template <typename TA, typename TD>
__device__ __forceinline__ void bias_act_backward_rows(BIAS_ACT_BACKWARD_PARAMS(TA, TD)) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const long long chunks = ((long long)M + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
  if (col < N) {
    for (long long chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
      const long long r0 = chunk * ROWS_PER_CHUNK;
      const long long r1 = min((long long)M, r0 + ROWS_PER_CHUNK);
      float sum = 0.f;
      for (long long r = r0; r < r1; ++r) {
        size_t idx = (size_t)r * N + col;
        float g = act ? dy[idx] * derivative(to_float(z[idx]), to_float(y[idx]), act) : dy[idx];
        if (write_dz) store_float(&dz[idx], g);
        sum += g;
      }
      partial[(size_t)chunk * N + col] = sum;
    }
  }
  if (sum_bias && last_block_done(done_blocks)) {
    for (int c = threadIdx.x; c < N; c += blockDim.x) {
      float sum = 0.f;
      for (long long chunk = 0; chunk < chunks; ++chunk) sum += __ldcg(&partial[(size_t)chunk * N + c]);
      grad_bias[c] = sum;
    }
  }
}

// C (M, N) row-major = act(A . W^T + bias (N)), A (M, K) and W (N, K) read through element strides:
// A[r, k] at A[r * a_row + k * a_k], W[c, k] at W[c * w_col + k * w_k], so one kernel also computes
// the backward's dz . W (W read transposed) and dz^T . x (both transposed). Each product of two
// inputs is exact in float32 when they are 16-bit; the sums are float32 fmaf in k order.
// Launch: grid (ceil(N / TILE_N), min(ceil(M / TILE_M), 65535)), block THREADS; each block walks the
// row tiles blockIdx.y, + gridDim.y, ... (gridDim.y is capped at 65,535; the loop bound depends only on
// blockIdx.y, so every thread of a block takes the same trips, as the __syncthreads inside require).
template <typename T>
__device__ __forceinline__ void gemm_tiles(const T* __restrict__ A, long long a_row, long long a_k,
                                           const T* __restrict__ W, long long w_col, long long w_k,
                                           const float* __restrict__ bias, float* __restrict__ C, int M, int N,
                                           int K, int has_bias, int act) {
  __shared__ float As[TILE_K][TILE_M + 1];  // +1: the transposing stores hit distinct banks
  __shared__ float Ws[TILE_K][TILE_N + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int col0 = blockIdx.x * TILE_N;
  // Staged loads walk k fastest where k is contiguous in memory, else the rows (coalesced either way).
  const bool a_k_fastest = a_k == 1, w_k_fastest = w_k == 1;
  for (long long row0 = (long long)blockIdx.y * TILE_M; row0 < M; row0 += (long long)gridDim.y * TILE_M) {
    float acc[4][4] = {{0.f}};
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
      for (int i = threadIdx.x; i < TILE_M * TILE_K; i += THREADS) {
        int r = a_k_fastest ? i / TILE_K : i % TILE_M, k = a_k_fastest ? i % TILE_K : i / TILE_M, gk = k0 + k;
        long long gr = row0 + r;
        As[k][r] = (gr < M && gk < K) ? to_float(A[gr * a_row + gk * a_k]) : 0.f;
      }
      for (int i = threadIdx.x; i < TILE_N * TILE_K; i += THREADS) {
        int c = w_k_fastest ? i / TILE_K : i % TILE_N, k = w_k_fastest ? i % TILE_K : i / TILE_N;
        int gc = col0 + c, gk = k0 + k;
        Ws[k][c] = (gc < N && gk < K) ? to_float(W[(long long)gc * w_col + gk * w_k]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < TILE_K; ++k) {
        float a[4], w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = Ws[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
      }
      __syncthreads();  // the next tile's loads overwrite As and Ws
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      long long r = row0 + ty + 16 * i;
      if (r >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        int c = col0 + tx + 16 * j;
        if (c < N) C[(size_t)r * N + c] = activate(acc[i][j] + (has_bias ? bias[c] : 0.f), act);
      }
    }
  }
}

// Thread 0 writes the sum of the block's values (one per thread) to *out, added up in a fixed order:
// each warp's by shuffles, then the warps in turn. All threads of the block must call it.
__device__ __forceinline__ void block_sum_into(float* out, float value) {
  __shared__ float warp_sums[THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
    *out = total;
  }
}

// The backward epilogue of a convolution, up to the GEMMs: dz_t (C, N * L), channel-major as the GEMMs
// take it, = dy * act' read off the output y (act is relu, sigmoid or tanh: their derivatives are
// functions of y), and the bias gradient, the sum of channel c's dz in float32 whatever dz_t is stored
// in: one block per channel, the block's own reduction in a fixed order. TA: the type y is kept in, TD:
// dz_t's (16 bits when only the GEMMs read it).
#define CONV_BIAS_ACT_BACKWARD_PARAMS(TA, TD)                                                           \
  const float* __restrict__ dy, const TA* __restrict__ y, TD* __restrict__ dz_t, float* __restrict__ grad_bias, \
      int N, int C, long long L, int act, int has_bias
#define CONV_BIAS_ACT_BACKWARD_ARGS dy, y, dz_t, grad_bias, N, C, L, act, has_bias

template <typename TA, typename TD>
__device__ __forceinline__ void conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_PARAMS(TA, TD)) {
  const int c = blockIdx.x;
  float sum = 0.f;
  for (long long i = threadIdx.x; i < (long long)N * L; i += blockDim.x) {
    const long long n = i / L, l = i % L, at = (n * C + c) * L + l;
    const float g = act ? dy[at] * derivative(to_float(y[at]), to_float(y[at]), act) : dy[at];
    store_float(&dz_t[(long long)c * N * L + i], g);
    sum += g;
  }
  if (has_bias) block_sum_into(&grad_bias[c], sum);
}

#endif  // GPUNET_KERNELS_GEMM_TILES_CUH
