// Counter-based random bits and the dropout that uses them. Philox4x32-10 (Salmon, Moraes, Dror
// and Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC11; as in cuRAND and Random123): a
// pure function of a 128-bit counter and a 64-bit key, so a mask is never drawn on the host nor
// copied to the device, and gpunet.random.philox4x32_10 (NumPy) gives the same bits on the CPU.
//
// dropout: y = x * (keep ? scale : 0) where element i is kept when the top 24 bits of word i % 4
// of philox(counter = (i / 4, step, layer, draw), key = (seed lo, seed hi)) are >= threshold.
// With add_residual, y = residual + that (a transformer block's residual connection, fused).
// With step_on_device, the counter's step word is step_source[0] instead of step (a CUDA graph's replay).
// The same launch on dy (without the residual) gives the backward (the mask is regenerated, not stored). One thread per
// block of 4 elements, grid-stride. Launch: grid blocks_for(ceil(n / 4)), any block
// (gpunet launches THREADS; nothing here is sized by a constant).

#include "sixteen_bit.cuh"  // store_float (and the 16-bit headers)

struct philox4 {
  unsigned int v[4];
};

// The 32 x 32 -> 64-bit product's high and low words (a plain 64-bit multiply: NVRTC turns it
// into mul.hi/mul.lo, and it also builds on a host compiler).
__device__ __forceinline__ unsigned int mulhilo(unsigned int a, unsigned int b, unsigned int* hi) {
  const unsigned long long product = (unsigned long long)a * b;
  *hi = (unsigned int)(product >> 32);
  return (unsigned int)product;
}

__device__ __forceinline__ philox4 philox4x32_10(philox4 c, unsigned int k0, unsigned int k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    unsigned int hi0, hi1;
    const unsigned int lo0 = mulhilo(0xD2511F53u, c.v[0], &hi0);
    const unsigned int lo1 = mulhilo(0xCD9E8D57u, c.v[2], &hi1);
    philox4 next = {{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    c = next;
  }
  return c;
}

// Philox4x32-10 of n counters (4 words each, counter[4 * i + w]; the uint32 words passed as int32)
// under one key: the known-answer tests run the device function through this.
extern "C" __global__ void philox4x32_10_blocks(const int* __restrict__ counter, int* __restrict__ out, long long n,
                                                long long key) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    philox4 c = {{(unsigned int)counter[4 * i], (unsigned int)counter[4 * i + 1], (unsigned int)counter[4 * i + 2],
                  (unsigned int)counter[4 * i + 3]}};
    c = philox4x32_10(c, (unsigned int)key, (unsigned int)((unsigned long long)key >> 32));
    for (int w = 0; w < 4; ++w) out[4 * i + w] = (int)c.v[w];
  }
}

// The dropout's loop; with KEEP16, y's 16-bit copy (rounded to nearest even) is written beside it, what the
// product that reads y next would cast it to (the _bf16 and _f16 kernels).
#define DROPOUT_PARAMS                                                                                         \
  const float *__restrict__ x, const float *__restrict__ residual, float *__restrict__ y, long long n, long long seed, \
      long long step, int layer, int draw, int threshold, float scale, int add_residual,                    \
      const unsigned int *__restrict__ step_source, int step_on_device
#define DROPOUT_ARGS x, residual, y, n, seed, step, layer, draw, threshold, scale, add_residual, step_source, step_on_device

template <bool KEEP16, typename T16>
__device__ __forceinline__ void dropout_elements(DROPOUT_PARAMS, T16* __restrict__ y16) {
  const unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)((unsigned long long)seed >> 32);
  // In a replayed CUDA graph the arguments are frozen at capture: the step is read from the device
  // there (gpunet.cuda_graph writes it before each replay), so every replay draws its own masks.
  const unsigned int counter_step = step_on_device ? step_source[0] : (unsigned int)step;
  const long long blocks = (n + 3) / 4;
  for (long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x; b < blocks;
       b += (long long)gridDim.x * blockDim.x) {
    philox4 c = {{(unsigned int)b, counter_step, (unsigned int)layer, (unsigned int)draw}};
    c = philox4x32_10(c, k0, k1);
    for (int w = 0; w < 4; ++w) {
      const long long i = 4 * b + w;
      if (i >= n) break;
      // __fmul_rn: never contracted into an FMA with the add below, so the sum rounds as the CPU's does
      const float dropped = __fmul_rn(x[i], (c.v[w] >> 8) >= (unsigned int)threshold ? scale : 0.f);
      y[i] = add_residual ? residual[i] + dropped : dropped;
      if constexpr (KEEP16) store_float(&y16[i], y[i]);
    }
  }
}

extern "C" __global__ void dropout(DROPOUT_PARAMS) { dropout_elements<false, float>(DROPOUT_ARGS, nullptr); }

// dropout and y's 16-bit copy in one pass: mixed precision's dropout before a product (CupyOps.dropout hands
// the copy on to the next layer's store_16bit).
extern "C" __global__ void dropout_bf16(DROPOUT_PARAMS, __nv_bfloat16* __restrict__ y16) {
  dropout_elements<true>(DROPOUT_ARGS, y16);
}
extern "C" __global__ void dropout_f16(DROPOUT_PARAMS, __half* __restrict__ y16) {
  dropout_elements<true>(DROPOUT_ARGS, y16);
}
