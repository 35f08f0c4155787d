// The im2col gather, written once for every element type: im2col.cu instantiates it for float,
// precision.cu for bfloat16 and float16 (mixed precision's convolutions gather their 16-bit input into
// 16-bit columns: half the bytes, no rounding pass after). Layouts as gpunet.backend.ops: columns
// (N*OH*OW, C*KH*KW), rows in (n, oh, ow) order, columns in (c, i, j) order, written row-major.
#ifndef GPUNET_KERNELS_IM2COL_CUH
#define GPUNET_KERNELS_IM2COL_CUH

struct Geometry {
  int n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow;
};

// Passed as twelve ints (plain scalars travel through every launcher), gathered into g.
#define GEOMETRY_ARGS int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow
#define GEOMETRY const Geometry g = {n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow}

template <typename T>
__device__ __forceinline__ void im2col_gather(const T* __restrict__ x, T* __restrict__ cols, const Geometry& g,
                                              T zero) {
  const long long width = (long long)g.c * g.kh * g.kw;
  const long long total = (long long)g.n * g.oh * g.ow * width;
  for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    long long row = idx / width;
    int col = (int)(idx % width);
    int ow = (int)(row % g.ow), oh = (int)((row / g.ow) % g.oh), n = (int)(row / ((long long)g.ow * g.oh));
    int j = col % g.kw, i = (col / g.kw) % g.kh, c = col / (g.kw * g.kh);
    int hh = oh * g.sh - g.ph + i, ww = ow * g.sw - g.pw + j;
    cols[idx] = (hh >= 0 && hh < g.h && ww >= 0 && ww < g.w)
                    ? x[(((long long)n * g.c + c) * g.h + hh) * g.w + ww] : zero;
  }
}

#endif  // GPUNET_KERNELS_IM2COL_CUH
