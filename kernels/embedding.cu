// Token embeddings with the learned positional embedding added (a model's first two layers,
// Embedding then PositionalEmbedding, in one pass each way), the math of Ops.embedding and
// Ops.embedding_backward (gpunet/backend/ops.py). ids (N,) int64 are B rows of T positions;
// weight (V, D), position (P, D) with P >= T.
//
// The backward sums without atomics, in a fixed order (the same bits launch after launch, as on
// the CPU): one block per gradient row, the V rows of weight's gradient (each scans all N ids for
// its own: meant for V * N up to Ops' limit, where the scan costs less than a launch) and then the
// P rows of position's (a sum over the B rows; zero past T).

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallback, so that `nvcc kernels/embedding.cu` compiles on its own: gpunet always passes its value
// as a -D flag (cuda_kernels.DEFINES, the one place it is set), and
// tests/kernels/test_resources.py checks that the fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif

// y[n, :] = weight[ids[n], :] (+ position[n % T, :] with has_position); an id outside [0, V)
// gives a row of NaN and is folded into id_error[0] (the smallest bad id, start LLONG_MAX) and
// id_error[1] (the largest, start LLONG_MIN): the host does not check ids on the GPU (that would
// wait for it) but reads these flags where it next reads the loss, and raises the CPU's error.
// Launch: grid-stride over N * D.
extern "C" __global__ void embedding_forward(const long long* __restrict__ ids, const float* __restrict__ weight,
                                             const float* __restrict__ position, float* __restrict__ y,
                                             long long* __restrict__ id_error, long long N, int T, int D, long long V,
                                             int has_position) {
  const long long total = N * D;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long n = i / D, id = ids[n];
    const int k = (int)(i % D);
    const bool in_range = id >= 0 && id < V;
    if (!in_range && k == 0) {  // (once per bad id, not once per element of its row)
      atomicMin(&id_error[0], id);
      atomicMax(&id_error[1], id);
    }
    float v = in_range ? weight[id * D + k] : __int_as_float(0x7fc00000);
    if (has_position) v += position[(n % T) * D + k];
    y[i] = v;
  }
}

// Block r < V: grad_weight[r, :] = the sum of dy's rows n with ids[n] == r, in order of n.
// Block V + t (with has_position): grad_position[t, :] = sum over b of dy[b * T + t, :], 0 for
// t >= T. Launch: grid V + (has_position ? P : 0), block THREADS.
extern "C" __global__ void embedding_backward(const long long* __restrict__ ids, const float* __restrict__ dy,
                                              float* __restrict__ grad_weight, float* __restrict__ grad_position,
                                              long long N, int T, int D, long long V, int has_position) {
  const long long r = blockIdx.x;
  if (r < V) {
    for (int k = threadIdx.x; k < D; k += THREADS) {
      float sum = 0.f;
      for (long long n = 0; n < N; ++n)
        if (ids[n] == r) sum += dy[n * D + k];
      grad_weight[r * D + k] = sum;
    }
  } else if (has_position) {
    const long long t = r - V;
    for (int k = threadIdx.x; k < D; k += THREADS) {
      float sum = 0.f;
      if (t < T)
        for (long long n = t; n < N; n += T) sum += dy[n * D + k];
      grad_position[t * D + k] = sum;
    }
  }
}
