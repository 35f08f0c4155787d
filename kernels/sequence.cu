// Kernels of the sequence layers: the LSTM cell (forward and backward, one thread per hidden
// unit of one batch row), the attention softmax with its scale and causal mask (one block per
// row of scores) and layer normalisation (one block per row). Gate order i, f, g, o as
// torch.nn.LSTMCell; layouts as gpunet.backend.sequence_ops and ops.layer_norm.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallbacks, so that `nvcc kernels/sequence.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "the block reductions take whole warps");

// NVRTC has no INFINITY (it lives in the host math headers): build the bit pattern.
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Sum over the block; every thread gets the total. scratch holds THREADS / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float top = scratch[0];
  for (int w = 1; w < THREADS / 32; ++w) top = fmaxf(top, scratch[w]);
  __syncthreads();
  return top;
}

// acts = activated gates of x_gates + h_gates (B, 4H); c = f c_prev + i g; h = o tanh(c).
extern "C" __global__ void lstm_cell(const float* __restrict__ x_gates, const float* __restrict__ h_gates,
                                     const float* __restrict__ c_prev, float* __restrict__ acts,
                                     float* __restrict__ h, float* __restrict__ c, float* __restrict__ tanh_c,
                                     int batch, int hidden) {
  const long long total = (long long)batch * hidden;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    long long b = idx / hidden, j = idx % hidden, row = b * 4 * hidden;
    float i = sigmoid(x_gates[row + j] + h_gates[row + j]);
    float f = sigmoid(x_gates[row + hidden + j] + h_gates[row + hidden + j]);
    float g = tanhf(x_gates[row + 2 * hidden + j] + h_gates[row + 2 * hidden + j]);
    float o = sigmoid(x_gates[row + 3 * hidden + j] + h_gates[row + 3 * hidden + j]);
    acts[row + j] = i;
    acts[row + hidden + j] = f;
    acts[row + 2 * hidden + j] = g;
    acts[row + 3 * hidden + j] = o;
    float cell = f * c_prev[idx] + i * g;
    float t = tanhf(cell);
    c[idx] = cell;
    tanh_c[idx] = t;
    h[idx] = o * t;
  }
}

// dgates (B, 4H) from dh, dc (w.r.t. this step's h and c); dc is overwritten with d c_prev.
extern "C" __global__ void lstm_cell_backward(const float* __restrict__ dh, float* __restrict__ dc,
                                              const float* __restrict__ acts, const float* __restrict__ c_prev,
                                              const float* __restrict__ tanh_c, float* __restrict__ dgates,
                                              int batch, int hidden) {
  const long long total = (long long)batch * hidden;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    long long b = idx / hidden, j = idx % hidden, row = b * 4 * hidden;
    float i = acts[row + j], f = acts[row + hidden + j], g = acts[row + 2 * hidden + j];
    float o = acts[row + 3 * hidden + j], t = tanh_c[idx], d = dh[idx];
    float dct = dc[idx] + d * o * (1.f - t * t);
    dgates[row + j] = dct * g * i * (1.f - i);
    dgates[row + hidden + j] = dct * c_prev[idx] * f * (1.f - f);
    dgates[row + 2 * hidden + j] = dct * i * (1.f - g * g);
    dgates[row + 3 * hidden + j] = d * t * o * (1.f - o);
    dc[idx] = dct * f;
  }
}

// In place over rows of T scores: softmax(scale * s) with, when causal, keys after the query
// (position row % T) masked to exactly 0. Launch: grid rows, block THREADS.
extern "C" __global__ void attention_softmax(float* __restrict__ scores, int T, float scale, int causal) {
  __shared__ float scratch[THREADS / 32];
  const long long row = blockIdx.x;
  float* s = scores + row * T;
  const int visible = causal ? (int)(row % T) + 1 : T;
  float top = NEG_INF;
  for (int k = threadIdx.x; k < visible; k += THREADS) top = fmaxf(top, s[k] * scale);
  top = block_max(top, scratch);
  float sum = 0.f;
  for (int k = threadIdx.x; k < visible; k += THREADS) {
    float e = expf(s[k] * scale - top);
    s[k] = e;
    sum += e;
  }
  const float inv = 1.f / block_sum(sum, scratch);
  for (int k = threadIdx.x; k < T; k += THREADS) s[k] = k < visible ? s[k] * inv : 0.f;
}

// d scores = scale * p * (dp - sum(dp * p)), written over dp. Launch: grid rows, block THREADS.
extern "C" __global__ void attention_softmax_backward(const float* __restrict__ probs, float* __restrict__ dprobs,
                                                      int T, float scale) {
  __shared__ float scratch[THREADS / 32];
  const long long row = blockIdx.x;
  const float* p = probs + row * T;
  float* d = dprobs + row * T;
  float dot = 0.f;
  for (int k = threadIdx.x; k < T; k += THREADS) dot += d[k] * p[k];
  dot = block_sum(dot, scratch);
  for (int k = threadIdx.x; k < T; k += THREADS) d[k] = scale * p[k] * (d[k] - dot);
}

// y = xhat * weight + bias with xhat = (x - mean) * rstd over rows of D. Launch: grid rows.
extern "C" __global__ void layer_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                      const float* __restrict__ bias, float* __restrict__ y,
                                      float* __restrict__ xhat, float* __restrict__ rstd, int D, float eps,
                                      int affine) {
  __shared__ float scratch[THREADS / 32];
  const long long row = blockIdx.x;
  const float* xr = x + row * D;
  float sum = 0.f;
  for (int k = threadIdx.x; k < D; k += THREADS) sum += xr[k];
  const float mean = block_sum(sum, scratch) / D;
  float sq = 0.f;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float centered = xr[k] - mean;
    sq += centered * centered;
  }
  const float r = rsqrtf(block_sum(sq, scratch) / D + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float h = (xr[k] - mean) * r;
    xhat[row * D + k] = h;
    y[row * D + k] = affine ? h * weight[k] + bias[k] : h;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight. Launch: grid rows.
extern "C" __global__ void layer_norm_backward(const float* __restrict__ dy, const float* __restrict__ xhat,
                                               const float* __restrict__ rstd, const float* __restrict__ weight,
                                               float* __restrict__ dx, int D, int affine) {
  __shared__ float scratch[THREADS / 32];
  const long long row = blockIdx.x;
  const float* d = dy + row * D;
  const float* h = xhat + row * D;
  float sum_g = 0.f, sum_gh = 0.f;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float g = affine ? d[k] * weight[k] : d[k];
    sum_g += g;
    sum_gh += g * h[k];
  }
  const float mean_g = block_sum(sum_g, scratch) / D;
  const float mean_gh = block_sum(sum_gh, scratch) / D;
  const float r = rstd[row];
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float g = affine ? d[k] * weight[k] : d[k];
    dx[row * D + k] = r * (g - mean_g - h[k] * mean_gh);
  }
}
