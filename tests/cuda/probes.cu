// Small kernels that exercise the kernel emulator itself (tests/kernels/test_emulated.py): warp
// shuffles and votes, block order, and kernels that misbehave on purpose (`faults`, by `how`).
#include <assert.h>

extern "C" __global__ void fill(float* out, int n, float value) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = value;
}

extern "C" __global__ void warp_ops(const float* x, float* all_sum, float* lane0_sum, float* scan, float* seg8,
                                    int* reversed, unsigned* ballot) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  const float v = x[i];
  float a = v, d = v, s = v, e = v;
  for (int o = 16; o > 0; o /= 2) a += __shfl_xor_sync(0xffffffffu, a, o);  // every lane: the warp's sum
  for (int o = 16; o > 0; o /= 2) d += __shfl_down_sync(0xffffffffu, d, o);  // lane 0: the warp's sum
  for (int o = 1; o < 32; o *= 2) {  // inclusive prefix sum
    float t = __shfl_up_sync(0xffffffffu, s, o);
    if (lane >= o) s += t;
  }
  for (int o = 4; o > 0; o /= 2) e += __shfl_xor_sync(0xffffffffu, e, o, 8);  // sums of 8-lane segments
  all_sum[i] = a;
  lane0_sum[i] = d;
  scan[i] = s;
  seg8[i] = e;
  reversed[i] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 31 - lane);
  ballot[i] = __ballot_sync(0xffffffffu, v > 0.f);
}

extern "C" __global__ void record_order(int* counter, int* order, float* out) {
  __shared__ int slot;
  if (threadIdx.x == 0) slot = atomicAdd(counter, 1);
  __syncthreads();
  if (threadIdx.x == 0) order[slot] = blockIdx.x;
  out[blockIdx.x * blockDim.x + threadIdx.x] = blockIdx.x * 100.f + threadIdx.x;
}

extern "C" __global__ void faults(float* out, int how) {
  float v = threadIdx.x;
  if (how == 0) {  // some threads skip the barrier
    if (threadIdx.x < 16) __syncthreads();
  } else if (how == 1) {  // two different barriers
    if (threadIdx.x % 2)
      __syncthreads();
    else
      __syncthreads();
  } else if (how == 2) {  // a lane leaves before a full-warp shuffle
    if (threadIdx.x == 3) return;
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (how == 3) {  // a full-warp shuffle in a block of fewer threads
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (how == 4) {  // lane 0 waits at the barrier, the rest of its warp in a shuffle that needs it
    if (threadIdx.x > 0 && threadIdx.x < 32) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
  } else if (how == 5) {
    out = nullptr;
  } else if (how == 6) {
    assert(threadIdx.x < 5);
  }
  out[threadIdx.x] = v;
}

extern "C" __global__ void overflow(float* out, int n) {
  volatile float big[100000];  // 400 KB of locals: fine on a GPU, more than an emulated thread's stack
  for (int i = 0; i < n; ++i) big[i] = i;
  out[threadIdx.x] = big[n - 1];
}
