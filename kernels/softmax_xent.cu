// Fused softmax cross-entropy, forward and backward in one kernel: one block per row of the
// (N, C) logits. Pass 1 reads the row once with an online max and sum of exponentials; pass 2
// writes the gradient (softmax - onehot) / N (its reads of the row mostly hit L2). The block
// also writes the row's loss, log(sum) + max - logit[label]; the block that finishes last adds
// the row losses up, in row order, into the mean loss (one launch for the whole loss).
// Works for any C from 2 up (each thread strides over the row). Launch: grid N, block THREADS.
//
// A label outside [0, C) is never used as an index: its row gets loss 0 and gradient 0, and the
// label is folded into label_error[0] (the smallest bad label, start LLONG_MAX) and
// label_error[1] (the largest, start LLONG_MIN), which the host reads when it next reads the loss
// (CupyOps.check_errors), so the step itself never waits for the GPU.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallbacks, so that `nvcc kernels/softmax_xent.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "the block reduction takes whole warps");

#include "common.cuh"  // NEG_INF, last_block_done

__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  float top = fmaxf(m, m2);
  s = (m == NEG_INF ? 0.f : s * expf(m - top)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - top));
  m = top;
}

extern "C" __global__ void softmax_xent(const float* __restrict__ logits, const long long* __restrict__ labels,
                                        float* __restrict__ grad, float* row_loss, float* __restrict__ loss,
                                        long long* __restrict__ label_error, unsigned int* done_blocks, int C,
                                        float inv_n) {
  __shared__ float shared_m[THREADS / 32], shared_s[THREADS / 32];
  const long long row = blockIdx.x;
  const float* x = logits + row * C;
  float m = NEG_INF, s = 0.f;
  for (int c = threadIdx.x; c < C; c += THREADS) combine(m, s, x[c], 1.f);
  for (int offset = 16; offset > 0; offset /= 2)
    combine(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  m = shared_m[0];
  s = shared_s[0];
  for (int w = 1; w < THREADS / 32; ++w) combine(m, s, shared_m[w], shared_s[w]);
  const long long label = labels[row];
  const bool valid = label >= 0 && label < C;
  const float scale = inv_n / s;
  float* g = grad + row * C;
  for (int c = threadIdx.x; c < C; c += THREADS)
    g[c] = valid ? expf(x[c] - m) * scale - (c == label ? inv_n : 0.f) : 0.f;
  if (threadIdx.x == 0) {
    row_loss[row] = valid ? logf(s) + m - x[label] : 0.f;
    if (!valid) {
      atomicMin(&label_error[0], label);
      atomicMax(&label_error[1], label);
    }
  }
  if (!last_block_done(done_blocks)) return;
  // The mean over the gridDim.x rows, in a fixed order: strided sums, then the warps, then warp 0.
  float sum = 0.f;
  for (long long r = threadIdx.x; r < gridDim.x; r += THREADS) sum += __ldcg(&row_loss[r]);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  __syncthreads();  // shared_s is reused
  if (lane == 0) shared_s[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += shared_s[w];
    loss[0] = total * inv_n;
  }
}
