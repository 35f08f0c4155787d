// Optimizer updates with torch.optim's semantics (the reference is gpunet.backend.ops.Ops.sgd_update /
// adam_update), one launch over a model's flat parameter buffer (gpunet.layers.flat). Each reads
// and writes every value once. Gradient clipping in two launches, without the host: sum_squares
// writes one partial sum of squares per block; clip_by_norm adds them up again in every block,
// scales the gradients by min(1, max_norm / (norm + 1e-6)) and has block 0 write the norm.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallbacks, so that `nvcc kernels/optim.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024 && (THREADS & (THREADS - 1)) == 0,
              "the block reductions halve whole blocks");

// Per-step scalars: as arguments, or, in a replayed CUDA graph (whose arguments are frozen at
// capture), read from the device when scalars_on_device: SGD's lr = scalars[0]; Adam's lr, bias1
// and bias2_sqrt = scalars[0..2] (gpunet.optim writes them there before each replay).
extern "C" __global__ void sgd_update(float* __restrict__ param, const float* __restrict__ grad,
                                      float* __restrict__ velocity, long long n, float lr, float momentum,
                                      float dampening, float weight_decay, int nesterov, int first_step,
                                      const float* __restrict__ scalars, int scalars_on_device) {
  if (scalars_on_device) lr = scalars[0];
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float g = grad[i] + weight_decay * param[i];
    if (momentum != 0.f) {
      float v = first_step ? g : momentum * velocity[i] + (1.f - dampening) * g;
      velocity[i] = v;
      g = nesterov ? g + momentum * v : v;
    }
    param[i] -= lr * g;
  }
}

// Adam (decoupled = 0) or AdamW (1); bias1 = 1 - beta1^step, bias2_sqrt = sqrt(1 - beta2^step).
extern "C" __global__ void adam_update(float* __restrict__ param, const float* __restrict__ grad,
                                       float* __restrict__ m, float* __restrict__ v, long long n, float lr,
                                       float beta1, float beta2, float eps, float weight_decay, int decoupled,
                                       float bias1, float bias2_sqrt, const float* __restrict__ scalars,
                                       int scalars_on_device) {
  if (scalars_on_device) {
    lr = scalars[0];
    bias1 = scalars[1];
    bias2_sqrt = scalars[2];
  }
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float p = param[i], g = grad[i];
    if (decoupled) p *= 1.f - lr * weight_decay;
    else g += weight_decay * p;
    float mi = beta1 * m[i] + (1.f - beta1) * g;
    float vi = beta2 * v[i] + (1.f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = p - (lr / bias1) * mi / (sqrtf(vi) / bias2_sqrt + eps);
  }
}

// The sum of the block's shared values (THREADS of them), in a fixed order; every thread gets it.
__device__ __forceinline__ double block_sum(double* shared, double value) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int half = THREADS / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// partial[blockIdx.x] = the sum of x[i]^2 over this block's grid-stride share, in double.
// Launch: block THREADS, any number of blocks (the partials clip_by_norm reads).
extern "C" __global__ void sum_squares(const float* __restrict__ x, long long n, double* __restrict__ partial) {
  __shared__ double shared[THREADS];
  double sum = 0.0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const double v = x[i];
    sum += v * v;
  }
  sum = block_sum(shared, sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// x *= min(1, max_norm / (sqrt(sum of partial) + 1e-6)) as float (a NaN norm gives NaN, as torch);
// norm[0] = the norm. Launch: block THREADS, grid-stride over x.
extern "C" __global__ void clip_by_norm(float* __restrict__ x, long long n, const double* __restrict__ partial,
                                        int partials, double max_norm, double* __restrict__ norm) {
  __shared__ double shared[THREADS];
  double sum = 0.0;
  for (int i = threadIdx.x; i < partials; i += THREADS) sum += partial[i];
  const double total = sqrt(block_sum(shared, sum));
  if (blockIdx.x == 0 && threadIdx.x == 0) norm[0] = total;
  const double ratio = max_norm / (total + 1e-6);  // in double, as the CPU divides
  const float scale = ratio >= 1.0 ? 1.f : (float)ratio;
  if (scale == 1.f) return;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    x[i] *= scale;
}
