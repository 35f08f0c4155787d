// Batch normalisation of x (N, C, L) over N and L for each channel c (L = 1 for (N, C), H * W for images),
// forward and backward, one launch each: one block per channel (grid C, block THREADS), as
// Ops.batch_norm and Ops.batch_norm_backward (gpunet/backend/ops.py) compute them. The block's sums run
// in a fixed order (each thread its strided elements, then the warps, then the warps' totals in order):
// the same bits launch after launch.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallback, so that `nvcc kernels/batch_norm.cu` compiles on its own: gpunet always passes its value
// as a -D flag (cuda_kernels.DEFINES, the one place it is set), and
// tests/kernels/test_resources.py checks that the fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "the block sums take whole warps");

#include "common.cuh"  // warp_sum

// Sum over the block; every thread gets the total. scratch holds THREADS / 32 floats.
__device__ __forceinline__ float channel_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next sum
  return total;
}

// Element i of channel c's N * L values: (n, l) = (i / L, i % L).
__device__ __forceinline__ long long at(long long i, int c, int C, long long L) {
  return (i / L * C + c) * L + i % L;
}

// y = xhat * weight + bias with xhat = (x - mean) * rstd. training: mean and the biased variance of the
// batch, and running_mean = (1 - momentum) running_mean + momentum mean, running_var = (1 - momentum)
// running_var + unbiased_momentum var (unbiased_momentum = momentum count / (count - 1), from the host), the
// batch count + 1 (block 0); else the running statistics. rstd (C) = 1 / sqrt(var + eps).
extern "C" __global__ void batch_norm_forward(const float* __restrict__ x, const float* __restrict__ weight,
                                              const float* __restrict__ bias, float* __restrict__ running_mean,
                                              float* __restrict__ running_var, long long* __restrict__ batches,
                                              float* __restrict__ y, float* __restrict__ xhat,
                                              float* __restrict__ rstd, int N, int C, long long L, float momentum,
                                              float unbiased_momentum, float eps, int affine, int training) {
  __shared__ float scratch[THREADS / 32];
  const int c = blockIdx.x;
  const long long count = (long long)N * L;
  float mean, var;
  if (training) {
    float sum = 0.f;
    for (long long i = threadIdx.x; i < count; i += THREADS) sum += x[at(i, c, C, L)];
    mean = channel_sum(sum, scratch) / (float)count;
    float sq = 0.f;
    for (long long i = threadIdx.x; i < count; i += THREADS) {
      const float centered = x[at(i, c, C, L)] - mean;
      sq += centered * centered;
    }
    var = channel_sum(sq, scratch) / (float)count;
    if (threadIdx.x == 0) {
      running_mean[c] = running_mean[c] * (1.f - momentum) + momentum * mean;
      running_var[c] = running_var[c] * (1.f - momentum) + unbiased_momentum * var;
      if (c == 0) *batches += 1;
    }
  } else {
    mean = running_mean[c];
    var = running_var[c];
  }
  const float r = 1.f / sqrtf(var + eps);
  if (threadIdx.x == 0) rstd[c] = r;
  const float w = affine ? weight[c] : 1.f, b = affine ? bias[c] : 0.f;
  for (long long i = threadIdx.x; i < count; i += THREADS) {
    const long long k = at(i, c, C, L);
    const float h = (x[k] - mean) * r;
    xhat[k] = h;
    y[k] = affine ? h * w + b : h;
  }
}

// dx from dy: with g = dy * weight, dx = rstd (g - mean(g) - xhat mean(g xhat)) in training, g rstd
// otherwise; affine: grad_weight[c] = sum(dy xhat), grad_bias[c] = sum(dy).
extern "C" __global__ void batch_norm_backward(const float* __restrict__ dy, const float* __restrict__ xhat,
                                               const float* __restrict__ rstd, const float* __restrict__ weight,
                                               float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                                               float* __restrict__ dx, int N, int C, long long L, int affine,
                                               int training) {
  __shared__ float scratch[THREADS / 32];
  const int c = blockIdx.x;
  const long long count = (long long)N * L;
  const float w = affine ? weight[c] : 1.f, r = rstd[c];
  float sum_dy = 0.f, sum_dy_xhat = 0.f;
  if (affine || training) {
    for (long long i = threadIdx.x; i < count; i += THREADS) {
      const long long k = at(i, c, C, L);
      sum_dy += dy[k];
      sum_dy_xhat += dy[k] * xhat[k];
    }
    sum_dy = channel_sum(sum_dy, scratch);
    sum_dy_xhat = channel_sum(sum_dy_xhat, scratch);
  }
  if (affine && threadIdx.x == 0) {
    grad_weight[c] = sum_dy_xhat;
    grad_bias[c] = sum_dy;
  }
  const float mean_g = w * sum_dy / (float)count, mean_g_xhat = w * sum_dy_xhat / (float)count;
  for (long long i = threadIdx.x; i < count; i += THREADS) {
    const long long k = at(i, c, C, L);
    const float g = dy[k] * w;
    dx[k] = training ? r * (g - mean_g - xhat[k] * mean_g_xhat) : g * r;
  }
}
