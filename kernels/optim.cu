// Optimizer updates, one launch per parameter, with torch.optim's semantics (the reference is
// gpunet.backend.ops.Ops.sgd_update / adam_update). Each reads and writes every value once.

extern "C" __global__ void sgd_update(float* __restrict__ param, const float* __restrict__ grad,
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

// Adam (decoupled = 0) or AdamW (1); bias1 = 1 - beta1^step, bias2_sqrt = sqrt(1 - beta2^step).
extern "C" __global__ void adam_update(float* __restrict__ param, const float* __restrict__ grad,
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
