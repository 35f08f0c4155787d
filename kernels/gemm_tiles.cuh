// The tiled GEMM with a fused bias + activation epilogue, written once for every input type:
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

#endif  // GPUNET_KERNELS_GEMM_TILES_CUH
