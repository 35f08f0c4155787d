// 16-bit floating-point storage: float32 to and from bfloat16 and float16, and float32 rounded
// through either (what a mixed-precision step stores, and what the CPU reference computes with
// NumPy and ml_dtypes). Every conversion to 16 bits rounds to nearest even (cvt.rn): overflow
// gives +-Inf (float16 from 65520 on), subnormals are kept, Inf stays Inf, and a NaN becomes the
// canonical NaN 0x7fff (NumPy and ml_dtypes keep its sign and payload; a NaN is a NaN either way).
// The conversions back to float32 are exact.
//
// One thread per element, grid-stride. Launch: grid blocks_for(n), any block (gpunet launches
// THREADS; nothing here is sized by a constant). Also the 16-bit im2col (the gather of im2col.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "im2col.cuh"  // Geometry, GEOMETRY_ARGS, im2col_gather

extern "C" __global__ void cast_f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                            long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y,
                                            long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}

extern "C" __global__ void cast_f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

extern "C" __global__ void cast_f16_to_f32(const __half* __restrict__ x, float* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __half2float(x[i]);
}

// y = x rounded to bfloat16 and back (y may be x): the value a bfloat16 store keeps, in float32.
extern "C" __global__ void round_trip_bf16(const float* x, float* y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
}

// y = x rounded to float16 and back (y may be x).
extern "C" __global__ void round_trip_f16(const float* x, float* y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = __half2float(__float2half_rn(x[i]));
}

// The (N*OH*OW, C*KH*KW) columns of a 16-bit x (N, C, H, W), 16-bit too (im2col.cuh): mixed precision's
// convolution gathers its input as the GEMM reads it. Launch: grid blocks_for(columns), any block.
extern "C" __global__ void im2col_bf16(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ cols,
                                       GEOMETRY_ARGS) {
  GEOMETRY;
  im2col_gather(x, cols, g, __float2bfloat16_rn(0.f));
}

extern "C" __global__ void im2col_f16(const __half* __restrict__ x, __half* __restrict__ cols, GEOMETRY_ARGS) {
  GEOMETRY;
  im2col_gather(x, cols, g, __float2half_rn(0.f));
}
