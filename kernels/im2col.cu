// im2col / col2im for Conv2D and max pooling, NCHW float32. Layouts match gpunet.backend.ops:
// columns are (N*OH*OW, C*KH*KW) with rows in (n, oh, ow) order and columns in (c, i, j) order.
// im2col writes them row-major; col2im reads them through element strides, so it takes the
// transposed (column-major) matrix the conv backward's GEMM produces as it is, without a copy.
// col2im and the pooling backward are gathers (one thread per input element): no atomics.
// All kernels use grid-stride loops, so any grid size covers any array.

#include "im2col.cuh"  // Geometry, GEOMETRY_ARGS, im2col_gather

extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ cols, GEOMETRY_ARGS) {
  GEOMETRY;
  im2col_gather(x, cols, g, 0.f);
}

// cols[row, col] is cols[row * row_stride + col * col_stride]. Consecutive threads take
// consecutive pixels ww, which (stride 1) read consecutive rows: coalesced when row_stride is 1,
// the column-major layout of the conv backward's dY W.
extern "C" __global__ void col2im(const float* __restrict__ cols, float* __restrict__ x, long long row_stride,
                                  long long col_stride, GEOMETRY_ARGS) {
  GEOMETRY;
  const long long total = (long long)g.n * g.c * g.h * g.w;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    int ww = (int)(idx % g.w), hh = (int)((idx / g.w) % g.h);
    int c = (int)((idx / ((long long)g.w * g.h)) % g.c), n = (int)(idx / ((long long)g.w * g.h * g.c));
    float sum = 0.f;
    for (int i = 0; i < g.kh; ++i) {
      int top = hh + g.ph - i;  // = oh * sh when output row oh reads this pixel at kernel row i
      if (top < 0 || top % g.sh) continue;
      int oh = top / g.sh;
      if (oh >= g.oh) continue;
      for (int j = 0; j < g.kw; ++j) {
        int left = ww + g.pw - j;
        if (left < 0 || left % g.sw) continue;
        int ow = left / g.sw;
        if (ow >= g.ow) continue;
        long long row = ((long long)n * g.oh + oh) * g.ow + ow;
        sum += cols[row * row_stride + (((long long)c * g.kh + i) * g.kw + j) * col_stride];
      }
    }
    x[idx] = sum;
  }
}

// y[n, c, oh, ow] = max of the window; argmax = i * kw + j of the first maximum (as torch).
extern "C" __global__ void max_pool(const float* __restrict__ x, float* __restrict__ y, int* __restrict__ argmax,
                                    GEOMETRY_ARGS) {
  GEOMETRY;
  const long long total = (long long)g.n * g.c * g.oh * g.ow;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    int ow = (int)(idx % g.ow), oh = (int)((idx / g.ow) % g.oh);
    long long plane = idx / ((long long)g.ow * g.oh);  // n * C + c
    const float* src = x + plane * g.h * g.w;
    float best = src[(oh * g.sh) * g.w + ow * g.sw];
    int where = 0;
    for (int i = 0; i < g.kh; ++i)
      for (int j = 0; j < g.kw; ++j) {
        float v = src[(oh * g.sh + i) * g.w + ow * g.sw + j];
        if (v > best || (v != v && best == best)) {  // a NaN wins, as in torch
          best = v;
          where = i * g.kw + j;
        }
      }
    y[idx] = best;
    argmax[idx] = where;
  }
}

extern "C" __global__ void max_pool_backward(const float* __restrict__ dy, const int* __restrict__ argmax,
                                             float* __restrict__ dx, GEOMETRY_ARGS) {
  GEOMETRY;
  const long long total = (long long)g.n * g.c * g.h * g.w;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    int ww = (int)(idx % g.w), hh = (int)((idx / g.w) % g.h);
    long long plane = idx / ((long long)g.w * g.h);
    float sum = 0.f;
    for (int i = 0; i < g.kh; ++i) {
      int top = hh - i;
      if (top < 0 || top % g.sh || top / g.sh >= g.oh) continue;
      for (int j = 0; j < g.kw; ++j) {
        int left = ww - j;
        if (left < 0 || left % g.sw || left / g.sw >= g.ow) continue;
        long long out = (plane * g.oh + top / g.sh) * g.ow + left / g.sw;
        if (argmax[out] == i * g.kw + j) sum += dy[out];
      }
    }
    dx[idx] = sum;
  }
}
