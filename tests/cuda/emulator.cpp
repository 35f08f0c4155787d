// Runs gpunet's CUDA kernels on the CPU, so their logic is tested where no GPU is: each CUDA
// thread of a block is a std::thread, __syncthreads is a std::barrier, __shared__ arrays are
// statics (one block runs at a time), and a warp shuffle goes through a table with barriers.
// A kernel that returned early before a __syncthreads would hang here (on a GPU it is undefined).
// Built by tests/cuda_emulator.py with g++ -std=c++20; the kernels are #included unchanged.
#include <math.h>

#include <algorithm>
#include <cstring>
#include <barrier>
#include <thread>
#include <vector>

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;
inline float shuffle_table[1024];

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

// Every thread of the block calls this together (the kernels shuffle in uniform loops).
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  shuffle_table[threadIdx.x] = value;
  __syncthreads();
  float other = shuffle_table[threadIdx.x ^ lane_mask];
  __syncthreads();
  return other;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __int_as_float(int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

#include "gemm.cu"
#include "im2col.cu"
#include "softmax_xent.cu"
#include "sequence.cu"
#include "optim.cu"

// The threads of one block are created once per launch and walk the grid block by block,
// meeting at a barrier after each block (the statics standing in for __shared__ are reused).
template <typename Kernel>
static void launch(unsigned grid_x, unsigned grid_y, unsigned threads, Kernel kernel) {
  gridDim = {grid_x, grid_y, 1};
  blockDim = {threads, 1, 1};
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([=, &barrier] {
      threadIdx = {t, 0, 0};
      for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) {
          blockIdx = {bx, by, 0};
          kernel();
          barrier.arrive_and_wait();
        }
    });
  for (auto& thread : pool) thread.join();
}

#define GEO int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow
#define GEO_NAMES n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow

extern "C" {
void run_gemm_bias_act(unsigned gx, unsigned gy, const float* A, const float* W, const float* bias, float* C, int M,
                       int N, int K, int has_bias, int act) {
  launch(gx, gy, 256, [=] { gemm_bias_act(A, W, bias, C, M, N, K, has_bias, act); });
}
void run_bias_act_backward(unsigned gx, unsigned gy, const float* dy, const float* z, const float* y, float* dz,
                           float* partial, int M, int N, int rows, int act, int write_dz) {
  launch(gx, gy, 256, [=] { bias_act_backward(dy, z, y, dz, partial, M, N, rows, act, write_dz); });
}
void run_im2col(unsigned blocks, unsigned threads, const float* x, float* cols, GEO) {
  launch(blocks, 1, threads, [=] { im2col(x, cols, GEO_NAMES); });
}
void run_col2im(unsigned blocks, unsigned threads, const float* cols, float* x, GEO) {
  launch(blocks, 1, threads, [=] { col2im(cols, x, GEO_NAMES); });
}
void run_max_pool(unsigned blocks, unsigned threads, const float* x, float* y, int* argmax, GEO) {
  launch(blocks, 1, threads, [=] { max_pool(x, y, argmax, GEO_NAMES); });
}
void run_max_pool_backward(unsigned blocks, unsigned threads, const float* dy, const int* argmax, float* dx, GEO) {
  launch(blocks, 1, threads, [=] { max_pool_backward(dy, argmax, dx, GEO_NAMES); });
}
void run_lstm_cell(unsigned blocks, const float* xg, const float* hg, const float* c_prev, float* acts, float* h,
                   float* c, float* tanh_c, int batch, int hidden) {
  launch(blocks, 1, 64, [=] { lstm_cell(xg, hg, c_prev, acts, h, c, tanh_c, batch, hidden); });
}
void run_lstm_cell_backward(unsigned blocks, const float* dh, float* dc, const float* acts, const float* c_prev,
                            const float* tanh_c, float* dgates, int batch, int hidden) {
  launch(blocks, 1, 64, [=] { lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates, batch, hidden); });
}
void run_attention_softmax(unsigned rows, float* scores, int T, float scale, int causal) {
  launch(rows, 1, BLOCK, [=] { attention_softmax(scores, T, scale, causal); });
}
void run_attention_softmax_backward(unsigned rows, const float* probs, float* dprobs, int T, float scale) {
  launch(rows, 1, BLOCK, [=] { attention_softmax_backward(probs, dprobs, T, scale); });
}
void run_layer_norm(unsigned rows, const float* x, const float* w, const float* b, float* y, float* xhat,
                    float* rstd, int D, float eps, int affine) {
  launch(rows, 1, BLOCK, [=] { layer_norm(x, w, b, y, xhat, rstd, D, eps, affine); });
}
void run_layer_norm_backward(unsigned rows, const float* dy, const float* xhat, const float* rstd, const float* w,
                             float* dx, int D, int affine) {
  launch(rows, 1, BLOCK, [=] { layer_norm_backward(dy, xhat, rstd, w, dx, D, affine); });
}
void run_activation_forward(unsigned blocks, const float* x, float* y, long long n, int act) {
  launch(blocks, 1, 64, [=] { activation_forward(x, y, n, act); });
}
void run_activation_backward(unsigned blocks, const float* x, const float* y, const float* dy, float* dx, long long n,
                             int act) {
  launch(blocks, 1, 64, [=] { activation_backward(x, y, dy, dx, n, act); });
}
void run_sgd_update(unsigned blocks, float* p, const float* g, float* v, long long n, float lr, float momentum,
                    float dampening, float wd, int nesterov, int first) {
  launch(blocks, 1, 64, [=] { sgd_update(p, g, v, n, lr, momentum, dampening, wd, nesterov, first); });
}
void run_adam_update(unsigned blocks, float* p, const float* g, float* m, float* v, long long n, float lr, float b1,
                     float b2, float eps, float wd, int decoupled, float bias1, float bias2_sqrt) {
  launch(blocks, 1, 64, [=] { adam_update(p, g, m, v, n, lr, b1, b2, eps, wd, decoupled, bias1, bias2_sqrt); });
}
void run_softmax_xent(unsigned rows, const float* logits, const long long* labels, float* grad, float* loss, int C,
                      float inv_n) {
  launch(rows, 1, 256, [=] { softmax_xent(logits, labels, grad, loss, C, inv_n); });
}
}
