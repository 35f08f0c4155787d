// The mixed-precision GEMM: bfloat16 or float16 inputs, float32 products and sums (each product of
// two 16-bit numbers is exact in float32), float32 output with the fused bias + activation epilogue.
// gemm_tiles.cuh is the same tiled loop as gemm.cu's float32 kernel; here it loads half the bytes.
// A and W are read through element strides, so one kernel also computes a Dense layer's backward
// products: dx = dz . W (W transposed) and dW = dz^T . x (both transposed). Kept apart from gemm.cu
// so that the float32 kernels never need the 16-bit headers.
//
// Compiled at run time by NVRTC through cupy.RawModule (gpunet/backend/cuda_kernels.py), with the
// constants as -D flags; gemm_tiles.cuh's fallbacks (equal to Python's, a test checks) let `nvcc`
// compile it alone. Launched only through gpunet/backend/cuda_precision.py.

#include <mma.h>

#include "sixteen_bit.cuh"  // to_float, store_float (and the 16-bit headers)
__device__ __forceinline__ __nv_bfloat16 zero_like(__nv_bfloat16) { return __float2bfloat16_rn(0.f); }
__device__ __forceinline__ __half zero_like(__half) { return __float2half_rn(0.f); }

#include "common.cuh"  // last_block_done
#include "gemm_tiles.cuh"  // gemm_tiles, activate, bias_act_backward_rows

// C (M, N) = act(A . W^T + bias); A[r, k] at A[r * a_row + k * a_k], W[c, k] at W[c * w_col + k * w_k].
// Launch: grid (ceil(N / TILE_N), min(ceil(M / TILE_M), 65535)), block THREADS.
extern "C" __global__ void gemm16_bf16(const __nv_bfloat16* __restrict__ A, long long a_row, long long a_k,
                                       const __nv_bfloat16* __restrict__ W, long long w_col, long long w_k,
                                       const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K,
                                       int has_bias, int act) {
  gemm_tiles(A, a_row, a_k, W, w_col, w_k, bias, C, M, N, K, has_bias, act);
}

extern "C" __global__ void gemm16_f16(const __half* __restrict__ A, long long a_row, long long a_k,
                                      const __half* __restrict__ W, long long w_col, long long w_k,
                                      const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K,
                                      int has_bias, int act) {
  gemm_tiles(A, a_row, a_k, W, w_col, w_k, bias, C, M, N, K, has_bias, act);
}

// The same product on the tensor cores (nvcuda::wmma, m16n16k16, float accumulators): each block stages a
// 64 x 16 tile of A and a 32 x 16 tile of W in shared memory (zeros past the edges, so M, N and K need not
// be multiples of 16), and each of its 8 warps multiplies one 16 x 16 block of the block's 64 x 32 tile of
// C; the epilogue goes through shared memory. Launch: grid (ceil(N / 32), min(ceil(M / 64), 65535)), block
// THREADS; each block walks the row tiles blockIdx.y, + gridDim.y, ...
static_assert(THREADS == 256, "gemm16_tc's 8 warps each compute a 16 x 16 block of its 64 x 32 tile of C");
constexpr int TC_ROWS = 64, TC_COLS = 32, TC_K = 16, TC_PAD = 8;  // TC_PAD: rows stay 32-byte aligned

template <typename T>
__device__ __forceinline__ void gemm_tensor_cores(const T* __restrict__ A, long long a_row, long long a_k,
                                                  const T* __restrict__ W, long long w_col, long long w_k,
                                                  const float* __restrict__ bias, float* __restrict__ C, int M,
                                                  int N, int K, int has_bias, int act) {
  using namespace nvcuda;
  __shared__ __align__(32) T As[TC_ROWS][TC_K + TC_PAD];
  __shared__ __align__(32) T Ws[TC_COLS][TC_K + TC_PAD];
  __shared__ __align__(32) float Cs[TC_ROWS][TC_COLS + 4];
  const int warp = threadIdx.x / 32, warp_row = warp / 2, warp_col = warp % 2;
  const int col0 = blockIdx.x * TC_COLS;
  const T zero = zero_like(A[0]);
  for (long long row0 = (long long)blockIdx.y * TC_ROWS; row0 < M; row0 += (long long)gridDim.y * TC_ROWS) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < K; k0 += TC_K) {
      for (int i = threadIdx.x; i < TC_ROWS * TC_K; i += THREADS) {  // (k fastest where k is contiguous)
        int r = a_k == 1 ? i / TC_K : i % TC_ROWS, k = a_k == 1 ? i % TC_K : i / TC_ROWS, gk = k0 + k;
        long long gr = row0 + r;
        As[r][k] = (gr < M && gk < K) ? A[gr * a_row + gk * a_k] : zero;
      }
      for (int i = threadIdx.x; i < TC_COLS * TC_K; i += THREADS) {
        int c = w_k == 1 ? i / TC_K : i % TC_COLS, k = w_k == 1 ? i % TC_K : i / TC_COLS;
        int gc = col0 + c, gk = k0 + k;
        Ws[c][k] = (gc < N && gk < K) ? W[(long long)gc * w_col + gk * w_k] : zero;
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // b(k, c) = W[c, k]: Ws read by columns
      wmma::load_matrix_sync(a, &As[warp_row * 16][0], TC_K + TC_PAD);
      wmma::load_matrix_sync(b, &Ws[warp_col * 16][0], TC_K + TC_PAD);
      wmma::mma_sync(acc, a, b, acc);
      __syncthreads();  // the next tile's loads overwrite As and Ws
    }
    wmma::store_matrix_sync(&Cs[warp_row * 16][warp_col * 16], acc, TC_COLS + 4, wmma::mem_row_major);
    __syncthreads();  // every warp's block of Cs is written before any thread reads it
    for (int i = threadIdx.x; i < TC_ROWS * TC_COLS; i += THREADS) {
      const int r = i / TC_COLS, c = i % TC_COLS, gc = col0 + c;
      const long long gr = row0 + r;
      if (gr < M && gc < N) C[(size_t)gr * N + gc] = activate(Cs[r][c] + (has_bias ? bias[gc] : 0.f), act);
    }
    __syncthreads();  // the next row tile rewrites Cs
  }
}

extern "C" __global__ void gemm16_tc_bf16(const __nv_bfloat16* __restrict__ A, long long a_row, long long a_k,
                                          const __nv_bfloat16* __restrict__ W, long long w_col, long long w_k,
                                          const float* __restrict__ bias, float* __restrict__ C, int M, int N,
                                          int K, int has_bias, int act) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // (bfloat16 fragments need sm_80; CupyOps offers it there)
  gemm_tensor_cores(A, a_row, a_k, W, w_col, w_k, bias, C, M, N, K, has_bias, act);
#else
  __trap();
#endif
}

extern "C" __global__ void gemm16_tc_f16(const __half* __restrict__ A, long long a_row, long long a_k,
                                         const __half* __restrict__ W, long long w_col, long long w_k,
                                         const float* __restrict__ bias, float* __restrict__ C, int M, int N, int K,
                                         int has_bias, int act) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // (gpunet offers the tensor-core path from sm_80 on)
  gemm_tensor_cores(A, a_row, a_k, W, w_col, w_k, bias, C, M, N, K, has_bias, act);
#else
  __trap();
#endif
}

// A Dense layer's backward epilogue in mixed precision (gemm_tiles.cuh's bias_act_backward_rows): dz
// stored in 16 bits, the operand of the two GEMMs that follow (the values a cast of gemm.cu's float32 dz
// gives, without its launch), db summed from the float32 values. z and y as the layer keeps them: in 16
// bits (_bf16, _f16: a ReLU's output) or float32 (_dz_bf16, _dz_f16: sigmoid's and tanh's output, GELU's
// input). Launch: grid (ceil(N / THREADS), min(chunks, 65535)), block THREADS.
extern "C" __global__ void bias_act_backward_bf16(BIAS_ACT_BACKWARD_PARAMS(__nv_bfloat16, __nv_bfloat16)) {
  bias_act_backward_rows(BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void bias_act_backward_f16(BIAS_ACT_BACKWARD_PARAMS(__half, __half)) {
  bias_act_backward_rows(BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void bias_act_backward_dz_bf16(BIAS_ACT_BACKWARD_PARAMS(float, __nv_bfloat16)) {
  bias_act_backward_rows(BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void bias_act_backward_dz_f16(BIAS_ACT_BACKWARD_PARAMS(float, __half)) {
  bias_act_backward_rows(BIAS_ACT_BACKWARD_ARGS);
}

// A convolution's backward epilogue in mixed precision (gemm_tiles.cuh's conv_bias_act_backward_channel):
// dz_t stored in 16 bits for the GEMMs, the bias gradient summed from the float32 values; y kept in 16 bits
// (_bf16, _f16: a ReLU's output) or float32 (_dz_bf16, _dz_f16). Launch: grid C, block THREADS.
extern "C" __global__ void conv_bias_act_backward_bf16(CONV_BIAS_ACT_BACKWARD_PARAMS(__nv_bfloat16, __nv_bfloat16)) {
  conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void conv_bias_act_backward_f16(CONV_BIAS_ACT_BACKWARD_PARAMS(__half, __half)) {
  conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void conv_bias_act_backward_dz_bf16(CONV_BIAS_ACT_BACKWARD_PARAMS(float, __nv_bfloat16)) {
  conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_ARGS);
}
extern "C" __global__ void conv_bias_act_backward_dz_f16(CONV_BIAS_ACT_BACKWARD_PARAMS(float, __half)) {
  conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_ARGS);
}

// An activation's backward reading the 16-bit output a mixed-precision ReLU keeps (x = y: relu'(x) = relu'(y)),
// dx float32. Launch: grid blocks_for(n), any block.
extern "C" __global__ void activation_backward_bf16(ACTIVATION_BACKWARD_PARAMS(__nv_bfloat16)) {
  activation_backward_elements(x, y, dy, dx, n, act);
}
extern "C" __global__ void activation_backward_f16(ACTIVATION_BACKWARD_PARAMS(__half)) {
  activation_backward_elements(x, y, dy, dx, n, act);
}
