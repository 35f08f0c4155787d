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
#include "common.cuh"  // last_block_done
#include "gemm_tiles.cuh"  // gemm_tiles, activate, derivative, bias_act_backward_rows; the constants

static_assert(ACT_NONE == 0, "bias_act_backward reads act as a flag: no activation must be 0");

// C (M, N) = act(A (M, K) . W (N, K)^T + bias (N)): torch.nn.Linear's layout, all row-major.
// Launch: grid (ceil(N / TILE_N), min(ceil(M / TILE_M), 65535)), block THREADS (gemm_tiles.cuh).
extern "C" __global__ void gemm_bias_act(const float* __restrict__ A, const float* __restrict__ W,
                                         const float* __restrict__ bias, float* __restrict__ C,
                                         int M, int N, int K, int has_bias, int act) {
  gemm_tiles(A, K, 1, W, K, 1, bias, C, M, N, K, has_bias, act);
}

// dz = dy * act'(z, y) (written when write_dz) and the bias gradient in one launch
// (gemm_tiles.cuh's bias_act_backward_rows; its 16-bit versions are gemm16.cu's).
// Launch: grid (ceil(N / THREADS), min(chunks, 65535)), block THREADS.
extern "C" __global__ void bias_act_backward(BIAS_ACT_BACKWARD_PARAMS(float, float)) {
  bias_act_backward_rows(BIAS_ACT_BACKWARD_ARGS);
}

// y = act(x + bias[col]) over an (M, N) row-major x: the epilogue of a cuBLAS GEMM in one pass.
// No __restrict__: it runs in place (y == x).
extern "C" __global__ void bias_act_forward(const float* x, const float* bias, float* y, long long M, int N,
                                            int has_bias, int act) {
  const long long n = M * N;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = activate(x[i] + (has_bias ? bias[i % N] : 0.f), act);
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

// Its backward, up to the GEMMs: dz_t (C, N * L) and the bias gradient (gemm_tiles.cuh's
// conv_bias_act_backward_channel; its 16-bit versions are gemm16.cu's). Launch: grid C, block THREADS.
extern "C" __global__ void conv_bias_act_backward(CONV_BIAS_ACT_BACKWARD_PARAMS(float, float)) {
  conv_bias_act_backward_channel(CONV_BIAS_ACT_BACKWARD_ARGS);
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

extern "C" __global__ void activation_backward(ACTIVATION_BACKWARD_PARAMS(float)) {
  activation_backward_elements(x, y, dy, dx, n, act);
}
