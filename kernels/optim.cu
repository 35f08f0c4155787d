// Optimizer updates with torch.optim's semantics (the reference is gpunet.backend.ops.Ops.sgd_update /
// adam_update), one launch over a model's flat parameter buffer (gpunet.layers.flat). Each reads
// and writes every value once. Gradient clipping in two launches, without the host: sum_squares
// writes one partial sum of squares per block; clip_by_norm adds them up again in every block,
// scales the gradients by min(1, max_norm / (norm + 1e-6)) and has block 0 write the norm.
// fp16 loss scaling (gpunet.training.loss_scale), on the device: unscale_check, the *_scaled updates
// (skipped when a gradient was not finite) and loss_scale_update, torch.amp.GradScaler's rule.

// THREADS, the threads per block, comes from gpunet/backend/cuda_kernels.py as a -D flag.
// Fallbacks, so that `nvcc kernels/optim.cu` compiles on its own: gpunet always passes its values
// as -D flags (cuda_kernels.DEFINES, the one place they are set), and
// tests/kernels/test_resources.py checks that each fallback here equals that value.
#ifndef THREADS
#define THREADS 256
#endif
static_assert(THREADS % 32 == 0 && THREADS <= 1024 && (THREADS & (THREADS - 1)) == 0,
              "the block reductions halve whole blocks");

// The loss scaler's state (gpunet.training.loss_scale: the same word numbers), one float32 array on the
// device; the counters are uint32 words, read and written through __float_as_uint / __uint_as_float.
#define LS_SCALE 0      // the scale (float)
#define LS_FOUND 1      // 1.f when a gradient of this step was inf or NaN (unscale_check), else 0.f
#define LS_TRACKER 2    // clean steps since the scale last changed
#define LS_SKIPPED 3    // steps skipped since the run started
#define LS_APPLIED 4    // steps applied: the optimizer's own step count (Adam's bias corrections)
#define LS_ATTEMPTED 5  // steps attempted (the ring's index)
#define LS_RING 8       // from here, ring words: whether attempted step k was skipped, at LS_RING + k % ring

__device__ __forceinline__ unsigned int state_word(const float* state, int word) {
  return __float_as_uint(state[word]);
}

// Per-step scalars: as arguments, or, in a replayed CUDA graph (whose arguments are frozen at
// capture), read from the device when scalars_on_device: SGD's lr = scalars[0]; Adam's lr, bias1
// and bias2_sqrt = scalars[0..2] (gpunet.optim writes them there before each replay).
__device__ __forceinline__ void sgd_step(float* __restrict__ param, const float* __restrict__ grad,
                                         float* __restrict__ velocity, long long n, float lr, float momentum,
                                         float dampening, float weight_decay, int nesterov, int first_step) {
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

extern "C" __global__ void sgd_update(float* __restrict__ param, const float* __restrict__ grad,
                                      float* __restrict__ velocity, long long n, float lr, float momentum,
                                      float dampening, float weight_decay, int nesterov, int first_step,
                                      const float* __restrict__ scalars, int scalars_on_device) {
  if (scalars_on_device) lr = scalars[0];
  sgd_step(param, grad, velocity, n, lr, momentum, dampening, weight_decay, nesterov, first_step);
}

// sgd_update in a loss-scaled step: nothing written when state[LS_FOUND] is set; the momentum's first step
// (first_step: the buffer was fresh when the applied count was first_at) is the first step applied.
extern "C" __global__ void sgd_update_scaled(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ velocity, long long n, float lr, float momentum,
                                             float dampening, float weight_decay, int nesterov, int first_step,
                                             long long first_at, const float* __restrict__ scalars,
                                             int scalars_on_device, const float* __restrict__ state) {
  if (state[LS_FOUND] != 0.f) return;
  if (scalars_on_device) lr = scalars[0];
  const int first = first_step && (long long)state_word(state, LS_APPLIED) == first_at;
  sgd_step(param, grad, velocity, n, lr, momentum, dampening, weight_decay, nesterov, first);
}

// Adam (decoupled = 0) or AdamW (1); bias1 = 1 - beta1^step, bias2_sqrt = sqrt(1 - beta2^step).
__device__ __forceinline__ void adam_step(float* __restrict__ param, const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v, long long n, float lr,
                                          float beta1, float beta2, float eps, float weight_decay, int decoupled,
                                          float bias1, float bias2_sqrt) {
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
  adam_step(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt);
}

// adam_update in a loss-scaled step: nothing written when state[LS_FOUND] is set; the step t is the applied
// count + 1, whose bias corrections are computed here (once per block) as the host's adam_scalars does (in
// double, then float), beta1 and beta2 given as doubles for that. lr: the argument, or scalars[0] when
// scalars_on_device.
extern "C" __global__ void adam_update_scaled(float* __restrict__ param, const float* __restrict__ grad,
                                              float* __restrict__ m, float* __restrict__ v, long long n, float lr,
                                              double beta1, double beta2, float eps, float weight_decay,
                                              int decoupled, const float* __restrict__ scalars,
                                              int scalars_on_device, const float* __restrict__ state) {
  if (state[LS_FOUND] != 0.f) return;  // (the same word for every thread: no barrier is skipped by some only)
  if (scalars_on_device) lr = scalars[0];
  __shared__ float bias[2];  // computed once per block
  if (threadIdx.x == 0) {
    const double t = (double)state_word(state, LS_APPLIED) + 1.0;
    bias[0] = (float)(1.0 - pow(beta1, t));
    bias[1] = (float)sqrt(1.0 - pow(beta2, t));
  }
  __syncthreads();
  adam_step(param, grad, m, v, n, lr, (float)beta1, (float)beta2, eps, weight_decay, decoupled, bias[0], bias[1]);
}

// grad *= 1 / scale (the reciprocal in double, then float, as torch's unscale_), and state[LS_FOUND] = 1.f when
// a result is inf or NaN (one write per block that saw one). Launch: block THREADS, grid-stride over grad.
extern "C" __global__ void unscale_check(float* __restrict__ grad, long long n, float* __restrict__ state) {
  const float inv = (float)(1.0 / (double)state[LS_SCALE]);
  int found = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const float g = grad[i] * inv;
    grad[i] = g;
    found |= !isfinite(g);
  }
  if (__syncthreads_or(found) && threadIdx.x == 0) atomicExch(state + LS_FOUND, 1.f);
}

// The step's end, one thread (torch's _amp_update_scale_): skipped (state[LS_FOUND]): scale *= backoff, the
// tracker 0, one more skipped step; else one more applied step and clean step, and after growth_interval
// clean steps scale *= growth (kept when that is not finite) and the tracker 0. The step's flag goes into
// the ring (ring words) and LS_FOUND back to 0 for the next step.
extern "C" __global__ void loss_scale_update(float* __restrict__ state, int growth_interval, double growth_factor,
                                             double backoff_factor, int ring) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const bool found = state[LS_FOUND] != 0.f;
  const unsigned int attempted = state_word(state, LS_ATTEMPTED);
  state[LS_RING + attempted % (unsigned int)ring] = found ? 1.f : 0.f;
  state[LS_ATTEMPTED] = __uint_as_float(attempted + 1u);
  if (found) {
    state[LS_SCALE] = (float)((double)state[LS_SCALE] * backoff_factor);
    state[LS_TRACKER] = __uint_as_float(0u);
    state[LS_SKIPPED] = __uint_as_float(state_word(state, LS_SKIPPED) + 1u);
  } else {
    state[LS_APPLIED] = __uint_as_float(state_word(state, LS_APPLIED) + 1u);
    const unsigned int clean = state_word(state, LS_TRACKER) + 1u;
    if (clean == (unsigned int)growth_interval) {
      const float grown = (float)((double)state[LS_SCALE] * growth_factor);
      if (isfinite(grown)) state[LS_SCALE] = grown;
      state[LS_TRACKER] = __uint_as_float(0u);
    } else {
      state[LS_TRACKER] = __uint_as_float(clean);
    }
  }
  state[LS_FOUND] = 0.f;
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
// norm[0] = the norm; x left as it is when skip. shared: THREADS doubles.
__device__ __forceinline__ void clip_to_norm(double* shared, float* __restrict__ x, long long n,
                                             const double* __restrict__ partial, int partials, double max_norm,
                                             double* __restrict__ norm, bool skip) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < partials; i += THREADS) sum += partial[i];
  const double total = sqrt(block_sum(shared, sum));
  if (blockIdx.x == 0 && threadIdx.x == 0) norm[0] = total;
  const double ratio = max_norm / (total + 1e-6);  // in double, as the CPU divides
  const float scale = ratio >= 1.0 ? 1.f : (float)ratio;
  if (skip || scale == 1.f) return;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    x[i] *= scale;
}

// Launch: block THREADS, grid-stride over x.
extern "C" __global__ void clip_by_norm(float* __restrict__ x, long long n, const double* __restrict__ partial,
                                        int partials, double max_norm, double* __restrict__ norm) {
  __shared__ double shared[THREADS];
  clip_to_norm(shared, x, n, partial, partials, max_norm, norm, false);
}

// clip_by_norm in a loss-scaled step: x left as it is when state[LS_FOUND] is set (the step is skipped; a
// NaN scale would also reach the zero gaps between the parameters of a flat buffer, which no backward rewrites).
extern "C" __global__ void clip_by_norm_scaled(float* __restrict__ x, long long n, const double* __restrict__ partial,
                                               int partials, double max_norm, double* __restrict__ norm,
                                               const float* __restrict__ state) {
  __shared__ double shared[THREADS];
  clip_to_norm(shared, x, n, partial, partials, max_norm, norm, state[LS_FOUND] != 0.f);
}
