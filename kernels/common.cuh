// Device helpers shared by several kernel families, written once: a .cu file that uses them
// has `#include "common.cuh"`. nvcc finds this header beside the .cu file and the emulator
// (tests/cuda/emulator.py) is given this folder as an include path; for NVRTC gpunet puts the
// header's text in place of the include line (gpunet/backend/cuda_kernels.py, source()), so the
// text CuPy compiles and keys its kernel cache by, and the GEMM-choice cache's hash, hold it.
#ifndef GPUNET_KERNELS_COMMON_CUH
#define GPUNET_KERNELS_COMMON_CUH

// NVRTC has no INFINITY (it lives in the host math headers): build the bit pattern.
#define NEG_INF (-__int_as_float(0x7f800000))

// Sum over the 32 lanes of a warp; every lane gets the total (all lanes must call it).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// True in the one block that arrives last, after every other block's writes are visible to it
// (each block fences its writes before counting itself in); that block resets the counter for the
// next launch. All threads of the block must call it (it holds a __syncthreads).
__device__ __forceinline__ bool last_block_done(unsigned int* done_blocks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    last = atomicAdd(done_blocks, 1u) == blocks - 1;
    if (last) {
      __threadfence();  // acquire: the other blocks' writes before their count are seen after ours
      atomicExch(done_blocks, 0u);
    }
  }
  __syncthreads();
  return last;
}

#endif  // GPUNET_KERNELS_COMMON_CUH
