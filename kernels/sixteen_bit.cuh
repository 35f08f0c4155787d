// The 16-bit storage formats' conversions, written once for the families that load or store them:
// bfloat16 and float16 to float32 (exact) and float32 to either, rounded to nearest even (cvt.rn), as
// NumPy and ml_dtypes round on the CPU. to_float and store_float overload gemm_tiles.cuh's float ones.
#ifndef GPUNET_KERNELS_SIXTEEN_BIT_CUH
#define GPUNET_KERNELS_SIXTEEN_BIT_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* at, float v) { *at = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_float(__half* at, float v) { *at = __float2half_rn(v); }

#endif  // GPUNET_KERNELS_SIXTEEN_BIT_CUH
