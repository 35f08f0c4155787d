// <mma.h> for the kernel emulator: the warp matrix functions of nvcuda::wmma that gpunet's tensor-core
// kernel uses, the m16n16k16 shape with __half or __nv_bfloat16 inputs and a float accumulator. nvcc and
// NVRTC find CUDA's own header.
//
// CUDA leaves unspecified which of a tile's elements each lane's fragment holds; a kernel can only rely on
// the warp as a whole. Here lane 0's fragment holds the whole 16 x 16 tile (num_elements 256, where the GPU's
// hold 8 of the 256 each) and the warp's loads, products and stores are lane 0's (32 times less emulation);
// the other lanes take part in each collective but their fragments are not written. An elementwise change of
// x[i], applied alike by every lane as the API requires, means the same thing either way; a kernel that
// branched on a fragment element's value would diverge here as it may on a GPU. The semantics kept, and
// checked as a GPU would need them:
// - load_matrix_sync, mma_sync, store_matrix_sync and fill_fragment are warp collectives: all 32 lanes must
//   call them together (each is a __syncwarp here, which faults otherwise);
// - the pointer of a load or store is 256-bit aligned and ldm a multiple of 16 bytes' worth of elements
//   (8 for 16-bit types, 4 for float): otherwise a fault (on a GPU: undefined behaviour);
// - mma_sync: every product of two 16-bit inputs is exact in float; the sums are float, in k order (a
//   tensor core's order is its own: within the float32 bound either way);
// - store_matrix_sync writes the tile once (lane 0 writes it): a lane that reads what the warp stored must
//   first synchronise (__syncwarp or __syncthreads), as on a GPU, where other lanes wrote those elements.
// The checks run in every lane; the work in lane 0.
#pragma once
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emulator.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator's wmma has the m16n16k16 shape only");
  static_assert(std::is_same<Use, accumulator>::value ? std::is_same<T, float>::value
                                                      : (std::is_same<T, __half>::value ||
                                                         std::is_same<T, __nv_bfloat16>::value),
                "the emulator's wmma: __half or __nv_bfloat16 inputs, a float accumulator");
  enum { num_elements = 256 };
  T x[num_elements];  // row-major: element (r, c) at x[r * 16 + c]
};

namespace detail {
template <typename T>
inline void check(const void* ptr, unsigned ldm, const char* what) {
  __syncwarp();  // a warp collective: every lane must be here (the emulator faults otherwise)
  if ((uintptr_t)ptr % 32 != 0)
    ::emu::fault("wmma::%s: the pointer %p is not 256-bit aligned", what, ptr);
  if (ldm % (16 / sizeof(T)) != 0)
    ::emu::fault("wmma::%s: ldm %u is not a multiple of %u elements (16 bytes)", what, ldm,
                 (unsigned)(16 / sizeof(T)));
}
inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
  __syncwarp();
  for (int i = 0; i < 256; ++i) f.x[i] = v;
}

// matrix_a (16 x 16 rows by k) and matrix_b (k by columns): row_major reads (r, c) at ptr[r * ldm + c],
// col_major at ptr[c * ldm + r].
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator's load takes a layout_t");
  detail::check<T>(ptr, ldm, "load_matrix_sync");
  if (::emu::lane_id() != 0) return;
  const bool rows = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = rows ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  detail::check<float>(ptr, ldm, "load_matrix_sync");
  if (::emu::lane_id() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

template <typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  if (::emu::lane_id() != 0) return;
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) {
      float sum = c.x[r * 16 + col];
      for (int k = 0; k < 16; ++k) sum = fmaf(detail::value(a.x[r * 16 + k]), detail::value(b.x[k * 16 + col]), sum);
      out[r * 16 + col] = sum;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check<float>(ptr, ldm, "store_matrix_sync");
  if (::emu::lane_id() != 0) return;  // (lane 0 writes the tile; see the top of this file)
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda
