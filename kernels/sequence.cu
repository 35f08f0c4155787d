// Kernels of the sequence layers: the LSTM cell (forward and backward, one thread per hidden
// unit of one batch row; alone, or fused with the recurrent product into one launch per time
// step), the attention softmax with its scale and causal mask (one block per
// row of scores) and layer normalisation (one block per row). Gate order i, f, g, o as
// torch.nn.LSTMCell; layouts as gpunet.backend.sequence_ops and ops.layer_norm.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallbacks, so that `nvcc kernels/sequence.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
#ifndef ROWS_PER_CHUNK
#define ROWS_PER_CHUNK 64
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "the block reductions take whole warps");

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"  // NEG_INF, warp_sum, last_block_done

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

// One LSTM time step with its recurrent product fused in (one launch per step): the gates are
// x_gates (the input projection with both biases, made for all steps by one GEMM) plus
// h_prev W_hh^T, then the cell as lstm_cell. Thread (b, j) makes the four gate sums of hidden
// unit j of batch row b, reading w_hh_t (H, 4H) along rows, so a warp reads consecutive
// columns; h_prev[b] is staged in shared memory a tile of blockDim.x at a time. No grid-wide
// sync: the next step is the next launch. Launch: grid (ceil(H / block), min(B, MAX_GRID_Y)),
// block <= THREADS; blocks walk the batch rows beyond gridDim.y.
extern "C" __global__ void lstm_step(const float* __restrict__ x_gates, const float* __restrict__ w_hh_t,
                                     const float* __restrict__ h_prev, const float* __restrict__ c_prev,
                                     float* __restrict__ acts, float* __restrict__ h, float* __restrict__ c,
                                     float* __restrict__ tanh_c, int batch, int hidden) {
  __shared__ float h_tile[THREADS];
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = j < hidden;  // the others still stage tiles and meet the barriers
  const long long gates = 4LL * hidden;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    float zi = 0.f, zf = 0.f, zg = 0.f, zo = 0.f;
    for (int k0 = 0; k0 < hidden; k0 += blockDim.x) {
      __syncthreads();  // every thread is done with the previous tile
      if (k0 + threadIdx.x < hidden) h_tile[threadIdx.x] = h_prev[b * hidden + k0 + threadIdx.x];
      __syncthreads();
      if (active) {
        const int tile = min((int)blockDim.x, hidden - k0);
        const float* w = w_hh_t + k0 * gates + j;
        for (int k = 0; k < tile; ++k, w += gates) {
          const float hk = h_tile[k];
          zi = fmaf(hk, w[0], zi);
          zf = fmaf(hk, w[hidden], zf);
          zg = fmaf(hk, w[2 * hidden], zg);
          zo = fmaf(hk, w[3 * hidden], zo);
        }
      }
    }
    if (active) {
      const long long row = b * gates, idx = b * hidden + j;
      const float i = sigmoid(x_gates[row + j] + zi);
      const float f = sigmoid(x_gates[row + hidden + j] + zf);
      const float g = tanhf(x_gates[row + 2 * hidden + j] + zg);
      const float o = sigmoid(x_gates[row + 3 * hidden + j] + zo);
      acts[row + j] = i;
      acts[row + hidden + j] = f;
      acts[row + 2 * hidden + j] = g;
      acts[row + 3 * hidden + j] = o;
      const float cell = f * c_prev[idx] + i * g;
      const float t = tanhf(cell);
      c[idx] = cell;
      tanh_c[idx] = t;
      h[idx] = o * t;
    }
  }
}

// One backward LSTM time step, one launch: dh = dy + dgates_next W_hh (the gradient that comes
// back through the next step's gates), then the cell backward as lstm_cell_backward: dgates
// (B, 4H) of this step, and dc (B, H) overwritten with d c_prev. With last != 0 (the last step)
// no gradient comes from a later step: dgates_next is not read and dc is taken as 0. Thread
// (b, j) reads column j of w_hh (4H, H) (a warp reads consecutive columns) against
// dgates_next[b], staged in shared memory four gate tiles of blockDim.x at a time. dgates and
// dgates_next are different steps of one buffer: the previous launch wrote dgates_next.
// Launch: as lstm_step.
extern "C" __global__ void lstm_step_backward(const float* __restrict__ dy, const float* __restrict__ dgates_next,
                                              const float* __restrict__ w_hh, float* __restrict__ dc,
                                              const float* __restrict__ acts, const float* __restrict__ c_prev,
                                              const float* __restrict__ tanh_c, float* __restrict__ dgates,
                                              int batch, int hidden, int last) {
  __shared__ float d_tile[4][THREADS];
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = j < hidden;
  const long long gates = 4LL * hidden;
  for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
    float si = 0.f, sf = 0.f, sg = 0.f, so = 0.f;  // one sum per gate block: four independent chains
    for (int k0 = 0; !last && k0 < hidden; k0 += blockDim.x) {
      __syncthreads();  // every thread is done with the previous tiles
      if (k0 + threadIdx.x < hidden) {
        const float* next = dgates_next + b * gates + k0 + threadIdx.x;
        for (int q = 0; q < 4; ++q) d_tile[q][threadIdx.x] = next[q * hidden];
      }
      __syncthreads();
      if (active) {
        const int tile = min((int)blockDim.x, hidden - k0);
        const float* w = w_hh + (long long)k0 * hidden + j;
        const long long block = (long long)hidden * hidden;  // from one gate block of rows to the next
        for (int k = 0; k < tile; ++k, w += hidden) {
          si = fmaf(d_tile[0][k], w[0], si);
          sf = fmaf(d_tile[1][k], w[block], sf);
          sg = fmaf(d_tile[2][k], w[2 * block], sg);
          so = fmaf(d_tile[3][k], w[3 * block], so);
        }
      }
    }
    if (active) {
      const long long row = b * gates, idx = b * hidden + j;
      const float i = acts[row + j], f = acts[row + hidden + j], g = acts[row + 2 * hidden + j];
      const float o = acts[row + 3 * hidden + j], t = tanh_c[idx];
      const float d = dy[idx] + ((si + sf) + (sg + so));
      const float dct = (last ? 0.f : dc[idx]) + d * o * (1.f - t * t);
      dgates[row + j] = dct * g * i * (1.f - i);
      dgates[row + hidden + j] = dct * c_prev[idx] * f * (1.f - f);
      dgates[row + 2 * hidden + j] = dct * i * (1.f - g * g);
      dgates[row + 3 * hidden + j] = d * t * o * (1.f - o);
      dc[idx] = dct * f;
    }
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

// y = xhat * weight + bias with xhat = (x - mean) * rstd over rows of D. With has_residual, the
// row normalised is v = x + residual, written to sum: a residual add and the next layer norm in
// one pass (TransformerBlock). y is float32 (layer_norm) or, where only a product reads it in mixed
// precision, bfloat16 or float16 (layer_norm_bf16, layer_norm_f16: y rounded to nearest even, the
// operand the product would round it to; everything else float32). Launch: grid rows.
__device__ __forceinline__ void store_y(float* y, float v) { *y = v; }
__device__ __forceinline__ void store_y(__nv_bfloat16* y, float v) { *y = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_y(__half* y, float v) { *y = __float2half_rn(v); }

template <typename Y>
__device__ __forceinline__ void normalize_rows(const float* __restrict__ x, const float* __restrict__ residual,
                                               float* __restrict__ sum_out, const float* __restrict__ weight,
                                               const float* __restrict__ bias, Y* __restrict__ y,
                                               float* __restrict__ xhat, float* __restrict__ rstd, int D, float eps,
                                               int affine, int has_residual) {
  __shared__ float scratch[THREADS / 32];
  const long long row = blockIdx.x;
  const float* xr = (has_residual ? sum_out : x) + row * D;  // each thread rereads only what it wrote
  float sum = 0.f;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float v = x[row * D + k];
    if (has_residual) {
      v += residual[row * D + k];
      sum_out[row * D + k] = v;
    }
    sum += v;
  }
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
    store_y(y + row * D + k, affine ? h * weight[k] + bias[k] : h);
  }
}

#define LAYER_NORM_PARAMS(Y)                                                                              \
  const float* __restrict__ x, const float* __restrict__ residual, float* __restrict__ sum_out,            \
      const float* __restrict__ weight, const float* __restrict__ bias, Y* __restrict__ y,                 \
      float* __restrict__ xhat, float* __restrict__ rstd, int D, float eps, int affine, int has_residual
#define LAYER_NORM_BODY normalize_rows(x, residual, sum_out, weight, bias, y, xhat, rstd, D, eps, affine, has_residual)

extern "C" __global__ void layer_norm(LAYER_NORM_PARAMS(float)) { LAYER_NORM_BODY; }
extern "C" __global__ void layer_norm_bf16(LAYER_NORM_PARAMS(__nv_bfloat16)) { LAYER_NORM_BODY; }
extern "C" __global__ void layer_norm_f16(LAYER_NORM_PARAMS(__half)) { LAYER_NORM_BODY; }

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight (+ residual, a residual
// branch's gradient, with has_residual), one warp per row. With affine also the parameters'
// gradients, column sums over all rows: each block sums its ROWS_PER_CHUNK rows of dy * xhat and
// dy into partial[0][chunk] and partial[1][chunk] (partial: (2, chunks, D)), and the block that
// finishes last adds the chunks up in chunk order (the same bits whichever block that is) into
// grad_weight and grad_bias, and resets done_blocks to 0. One launch, no grid-wide sync.
// Launch: grid chunks = ceil(rows / ROWS_PER_CHUNK), block THREADS.
extern "C" __global__ void layer_norm_backward(const float* __restrict__ dy, const float* __restrict__ xhat,
                                               const float* __restrict__ rstd, const float* __restrict__ weight,
                                               const float* __restrict__ residual, float* __restrict__ dx,
                                               float* partial, float* __restrict__ grad_weight,
                                               float* __restrict__ grad_bias, unsigned int* done_blocks,
                                               long long rows, int D, int affine, int has_residual) {
  const long long chunk = blockIdx.x, chunks = gridDim.x;
  const long long r0 = chunk * ROWS_PER_CHUNK, r1 = min(rows, r0 + ROWS_PER_CHUNK);
  const int lane = threadIdx.x % 32;
  for (long long row = r0 + threadIdx.x / 32; row < r1; row += THREADS / 32) {
    const float* d = dy + row * D;
    const float* h = xhat + row * D;
    float sum_g = 0.f, sum_gh = 0.f;
    for (int k = lane; k < D; k += 32) {
      float g = affine ? d[k] * weight[k] : d[k];
      sum_g += g;
      sum_gh += g * h[k];
    }
    const float mean_g = warp_sum(sum_g) / D, mean_gh = warp_sum(sum_gh) / D, r = rstd[row];
    for (int k = lane; k < D; k += 32) {
      float g = affine ? d[k] * weight[k] : d[k];
      dx[row * D + k] = r * (g - mean_g - h[k] * mean_gh) + (has_residual ? residual[row * D + k] : 0.f);
    }
  }
  if (!affine) return;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float sum_w = 0.f, sum_b = 0.f;
    for (long long row = r0; row < r1; ++row) {
      sum_w += dy[row * D + k] * xhat[row * D + k];
      sum_b += dy[row * D + k];
    }
    partial[chunk * D + k] = sum_w;
    partial[(chunks + chunk) * D + k] = sum_b;
  }
  if (last_block_done(done_blocks)) {
    for (int k = threadIdx.x; k < D; k += THREADS) {
      float sum_w = 0.f, sum_b = 0.f;
      for (long long c = 0; c < chunks; ++c) {
        sum_w += __ldcg(&partial[c * D + k]);
        sum_b += __ldcg(&partial[(chunks + c) * D + k]);
      }
      grad_weight[k] = sum_w;
      grad_bias[k] = sum_b;
    }
  }
}
