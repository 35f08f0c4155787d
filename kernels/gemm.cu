// GEMM with a fused epilogue, and the fused backward epilogue, for Dense layers.
// Compiled at run time by NVRTC through cupy.RawModule (gpunet/backend/cuda_kernels.py); CI
// compiles this file with `nvcc -arch=sm_90 -c` as well. Launched only through the wrappers in
// gpunet/backend/cuda_wrappers.py.
//
// The constants come from gpunet/backend/cuda_kernels.py as -D flags (DEFINES):
// THREADS (threads per block), TILE_M x TILE_N (the tile of C a block computes), TILE_K (the
// depth of a staged tile), ROWS_PER_CHUNK (rows one block of bias_act_backward sums), and the
// activation codes ACT_NONE (0), ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_GELU (erf), ACT_GELU_TANH.
// Fallbacks, so that `nvcc kernels/gemm.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback equals that value (those of THREADS, the
// tiles and the ACT_* codes are gemm_tiles.cuh's, which gemm16.cu includes too).
#ifndef ROWS_PER_CHUNK
#define ROWS_PER_CHUNK 64
#endif
#include "common.cuh"  // last_block_done
#include "gemm_tiles.cuh"  // gemm_tiles, activate; THREADS, the tiles, the ACT_* codes

static_assert(ACT_NONE == 0, "bias_act_backward reads act as a flag: no activation must be 0");

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

// C (M, N) = act(A (M, K) . W (N, K)^T + bias (N)): torch.nn.Linear's layout, all row-major.
// Launch: grid (ceil(N / TILE_N), min(ceil(M / TILE_M), 65535)), block THREADS (gemm_tiles.cuh).
extern "C" __global__ void gemm_bias_act(const float* __restrict__ A, const float* __restrict__ W,
                                         const float* __restrict__ bias, float* __restrict__ C,
                                         int M, int N, int K, int has_bias, int act) {
  gemm_tiles(A, K, 1, W, K, 1, bias, C, M, N, K, has_bias, act);
}

// dz = dy * act'(z, y) (written when write_dz), and the bias gradient, the column sums of dz.
// Each block sums ROWS_PER_CHUNK rows of its columns into partial[chunk, col]; with sum_bias, the
// block that finishes last adds the partials up, in chunk order, into grad_bias (so the result
// does not depend on which block was last) and resets done_blocks to 0 for the next launch. One
// launch, no grid-wide sync: the other blocks never wait. Without sum_bias the host sums them.
// Launch: grid (ceil(N / THREADS), min(chunks, 65535)), block THREADS; a block walks chunks
// blockIdx.y, + gridDim.y, ... (gridDim.y is capped at 65,535 on every GPU).
extern "C" __global__ void bias_act_backward(const float* __restrict__ dy, const float* __restrict__ z,
                                             const float* __restrict__ y, float* __restrict__ dz,
                                             float* partial, float* __restrict__ grad_bias,
                                             unsigned int* done_blocks, int M, int N, int act, int write_dz,
                                             int sum_bias) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const long long chunks = ((long long)M + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
  if (col < N) {
    for (long long chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
      const long long r0 = chunk * ROWS_PER_CHUNK;
      const long long r1 = min((long long)M, r0 + ROWS_PER_CHUNK);
      float sum = 0.f;
      for (long long r = r0; r < r1; ++r) {
        size_t idx = (size_t)r * N + col;
        float g = act ? dy[idx] * derivative(z[idx], y[idx], act) : dy[idx];
        if (write_dz) dz[idx] = g;
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

// y = act(x + bias[col]) over an (M, N) row-major x: the epilogue of a cuBLAS GEMM in one pass.
// No __restrict__: it runs in place (y == x).
extern "C" __global__ void bias_act_forward(const float* x, const float* bias, float* y, long long M, int N,
                                            int has_bias, int act) {
  const long long n = M * N;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = activate(x[i] + (has_bias ? bias[i % N] : 0.f), act);
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

// The convolution's GEMM runs channel-major: y_t (C, N, L) for L = OH * OW. Its epilogue moves
// it to NCHW with the bias and the activation: out[n, c, l] = act(y_t[c, n, l] + bias[c]).
extern "C" __global__ void conv_bias_act(const float* __restrict__ y_t, const float* __restrict__ bias,
                                         float* __restrict__ out, int N, int C, long long L, int has_bias,
                                         int act) {
  const long long total = (long long)N * C * L;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const long long l = i % L, c = i / L % C, n = i / (L * C);
    out[i] = activate(y_t[(c * N + n) * L + l] + (has_bias ? bias[c] : 0.f), act);
  }
}

// Its backward, up to the GEMMs: dz_t (C, N * L), channel-major as the GEMMs take it, = dy * act'
// read off the output y (act is relu, sigmoid or tanh: their derivatives are functions of y), and
// the bias gradient, the sum of channel c's dz. One block per channel: the block's own reduction,
// in a fixed order. Launch: grid C, block THREADS.
extern "C" __global__ void conv_bias_act_backward(const float* __restrict__ dy, const float* __restrict__ y,
                                                  float* __restrict__ dz_t, float* __restrict__ grad_bias, int N,
                                                  int C, long long L, int act, int has_bias) {
  const int c = blockIdx.x;
  float sum = 0.f;
  for (long long i = threadIdx.x; i < (long long)N * L; i += blockDim.x) {
    const long long n = i / L, l = i % L, at = (n * C + c) * L + l;
    const float g = act ? dy[at] * derivative(y[at], y[at], act) : dy[at];
    dz_t[(long long)c * N * L + i] = g;
    sum += g;
  }
  if (has_bias) block_sum_into(&grad_bias[c], sum);
}

// LeNet's conv -> ReLU -> max pool over non-overlapping KH x KW windows, as the conv GEMM's
// epilogue: pooled[n, c, ph, pw] = the first maximum of relu(y_t[c, n, oh, ow] + bias[c]) over
// its window, and argmax its position i * KW + j in the window (as max_pool writes it).
// y_t is (C, N, OH * OW); pooled and argmax (N, C, PH, PW). One thread per pooled value.
extern "C" __global__ void conv_relu_pool(const float* __restrict__ y_t, const float* __restrict__ bias,
                                          float* __restrict__ pooled, int* __restrict__ argmax, int N, int C,
                                          int OH, int OW, int PH, int PW, int KH, int KW, int has_bias) {
  const long long total = (long long)N * C * PH * PW;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
    const int pw = i % PW, ph = i / PW % PH, c = i / ((long long)PW * PH) % C;
    const long long n = i / ((long long)PW * PH * C);
    const float b = has_bias ? bias[c] : 0.f;
    const float* plane = y_t + ((long long)c * N + n) * OH * OW;
    float best = 0.f;
    int at = 0;
    for (int u = 0; u < KH; ++u)
      for (int v = 0; v < KW; ++v) {
        const float value = activate(plane[(long long)(ph * KH + u) * OW + pw * KW + v] + b, ACT_RELU);
        if ((u == 0 && v == 0) || value > best) {  // the first maximum wins, as in torch
          best = value;
          at = u * KW + v;
        }
      }
    pooled[i] = best;
    argmax[i] = at;
  }
}

// Its backward, up to the GEMMs: dz_t (C, N * OH * OW), channel-major, holds each window's
// gradient at its maximum where that was positive (relu' there is pooled > 0), 0 elsewhere
// (windows do not overlap; pixels past the last window get 0); grad_bias[c] the sum over channel
// c. One block per channel, its own reduction in a fixed order. Launch: grid C, block THREADS.
extern "C" __global__ void conv_relu_pool_backward(const float* __restrict__ dp, const float* __restrict__ pooled,
                                                   const int* __restrict__ argmax, float* __restrict__ dz_t,
                                                   float* __restrict__ grad_bias, int N, int C, int OH, int OW,
                                                   int PH, int PW, int KH, int KW, int has_bias) {
  const int c = blockIdx.x;
  float sum = 0.f;
  const long long plane = (long long)OH * OW;
  for (long long i = threadIdx.x; i < N * plane; i += blockDim.x) {
    const long long n = i / plane;
    const int oh = i % plane / OW, ow = i % OW, ph = oh / KH, pw = ow / KW;
    float g = 0.f;
    if (ph < PH && pw < PW) {
      const long long at = ((n * C + c) * PH + ph) * PW + pw;
      if (argmax[at] == (oh % KH) * KW + ow % KW && pooled[at] > 0.f) g = dp[at];
    }
    dz_t[(long long)c * N * plane + i] = g;
    sum += g;
  }
  if (has_bias) block_sum_into(&grad_bias[c], sum);
}

// y = act(x) and dx = dy * act'(x, y), elementwise over n values (the activation layers).
// No __restrict__ on the forward: it also runs in place (y == x).
extern "C" __global__ void activation_forward(const float* x, float* y, long long n, int act) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = activate(x[i], act);
}

extern "C" __global__ void activation_backward(const float* __restrict__ x, const float* __restrict__ y,
                                               const float* __restrict__ dy, float* __restrict__ dx, long long n,
                                               int act) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dx[i] = dy[i] * derivative(x[i], y[i], act);
}
