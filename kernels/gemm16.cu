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

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

#include "gemm_tiles.cuh"  // gemm_tiles, activate

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
