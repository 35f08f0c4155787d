// What a CUDA kernel source sees when g++ compiles it for the emulator: the CUDA keywords and
// built-in variables, barriers, warp shuffles and votes, atomics and the common intrinsics. The
// generated translation unit is this header, the .cu source verbatim, then the kernel registry
// (EMU_KERNEL below), all written by tests/cuda/emulator.py. Semantics: tests/cuda/runtime.h.
//
// 16-bit floats: a source's `#include <cuda_fp16.h>` / `<cuda_bf16.h>` finds this folder's headers
// of those names (__half, __nv_bfloat16, their conversions and arithmetic, as the hardware rounds).
// Not emulated: dynamic shared memory (`extern __shared__`: a compile error here), textures,
// cooperative groups, __constant__ written from the host, the half-precision math functions.
#pragma once
#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// __constinit: a __shared__ variable is never dynamically initialised (CUDA refuses an initialiser), and
// without it g++ guards a static of class type (__half) with a guard byte, which TSan sees every thread
// of the block write and read.
#if EMU_TSAN
#define __shared__ static thread_local __constinit  // one copy per block: every block runs on a new OS thread
#else
#define __shared__ static __constinit  // one block runs at a time, so a static is the block's shared memory
#endif

// The built-in variables are read from the running fiber (through functions: TSan must not see
// the scheduler's writes to them).
namespace emu {
EMU_RUNTIME inline uint3 thread_index() { return g.current->idx; }
EMU_RUNTIME inline uint3 block_index() { return g.block_idx; }
EMU_RUNTIME inline dim3 block_dim() { return g.block; }
EMU_RUNTIME inline dim3 grid_dim() { return g.grid; }
EMU_RUNTIME inline unsigned block_threads() { return g.threads; }
}  // namespace emu
#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

// Barriers take their source line: threads meeting at different __syncthreads is a fault.
#define __syncthreads() ((void)::emu::syncthreads(__LINE__, false))
#define __syncthreads_count(predicate) ((int)::emu::syncthreads(__LINE__, (predicate) != 0))
#define __syncthreads_and(predicate) \
  ((int)(::emu::syncthreads(__LINE__, (predicate) != 0) == ::emu::block_threads()))
#define __syncthreads_or(predicate) ((int)(::emu::syncthreads(__LINE__, (predicate) != 0) != 0))
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_op(::emu::Op::syncwarp, mask, 0, 0); }
// A failed device assert or __trap() ends the launch with a KernelFault (a GPU reports an error).
// glibc's assert calls __assert_fail: this definition is the module's own (-fvisibility=hidden).
extern "C" [[noreturn]] inline void __assert_fail(const char* condition, const char*, unsigned line,
                                                  const char*) noexcept {
  ::emu::fault("%s: assertion failed: %s (line %u)", ::emu::where(*::emu::g.current), condition, line);
}
#define __trap() ::emu::fault("%s called __trap()", ::emu::where(*::emu::g.current))
// Fibers are never preempted and memory is coherent: fences only stop the compiler. For TSan, a
// __threadfence makes this thread's next atomic a release-acquire one (a fence then an atomic is
// how a block publishes its writes to another, as in the last-block-done reduction); an atomic
// with no fence before it orders nothing, as on a GPU, so a kernel that forgets the fence races.
inline void __threadfence() {
  asm volatile("" ::: "memory");
  __atomic_store_n(&::emu::g.current->fenced, true, __ATOMIC_RELAXED);  // (emulator state: not the kernel's race)
}
inline void __threadfence_block() { asm volatile("" ::: "memory"); }

// Warp shuffles: every lane named in mask must arrive; lane sources follow the CUDA guide, with
// width a power of two dividing the warp into segments.
namespace emu {
template <class T>
inline T shuffle(unsigned mask, T var, int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &var, sizeof var);
  bits = warp_op(Op::shfl, mask, bits, src);
  memcpy(&var, &bits, sizeof var);
  return var;
}
}  // namespace emu
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  ::emu::check_width("__shfl_sync", width);
  const int lane = (int)::emu::lane_id();
  return ::emu::shuffle(mask, var, (src_lane & (width - 1)) + (lane & ~(width - 1)));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  ::emu::check_width("__shfl_up_sync", width);
  const int lane = (int)::emu::lane_id();
  return ::emu::shuffle(mask, var, (lane & (width - 1)) >= (int)delta ? lane - (int)delta : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  ::emu::check_width("__shfl_down_sync", width);
  const int lane = (int)::emu::lane_id();
  return ::emu::shuffle(mask, var, (lane & (width - 1)) + (int)delta < width ? lane + (int)delta : lane);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  ::emu::check_width("__shfl_xor_sync", width);
  const int lane = (int)::emu::lane_id(), src = lane ^ lane_mask;
  return ::emu::shuffle(mask, var, src < (lane & ~(width - 1)) + width ? src : lane);  // no later segment
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return (unsigned)::emu::warp_op(::emu::Op::ballot, mask, predicate != 0, 0);
}
inline int __all_sync(unsigned mask, int predicate) {
  return (int)::emu::warp_op(::emu::Op::all, mask, predicate != 0, 0);
}
inline int __any_sync(unsigned mask, int predicate) {
  return (int)::emu::warp_op(::emu::Op::any, mask, predicate != 0, 0);
}

// Atomics: trivially atomic between fibers; written as relaxed __atomic operations so that TSan
// sees them as atomics (no race among them, and no ordering, as on a GPU).
namespace emu {
template <class T>
struct same {  // keeps the value parameter out of deduction: atomicAdd(unsigned*, 1) works as in CUDA
  using type = T;
};
inline int fenced_order() {  // release-acquire after a __threadfence of this thread, else relaxed
  ::emu::Thread* t = ::emu::g.current;
  const bool fenced = __atomic_exchange_n(&t->fenced, false, __ATOMIC_RELAXED);
  return fenced ? __ATOMIC_ACQ_REL : __ATOMIC_RELAXED;
}
}  // namespace emu
#define EMU_ATOMIC(name, builtin)                                                       \
  template <class T, class = std::enable_if_t<std::is_integral_v<T>>>                  \
  inline T name(T* address, typename ::emu::same<T>::type value) {                     \
    return builtin(address, value, ::emu::fenced_order());                             \
  }
EMU_ATOMIC(atomicAdd, __atomic_fetch_add)
EMU_ATOMIC(atomicSub, __atomic_fetch_sub)
EMU_ATOMIC(atomicAnd, __atomic_fetch_and)
EMU_ATOMIC(atomicOr, __atomic_fetch_or)
EMU_ATOMIC(atomicXor, __atomic_fetch_xor)
template <class T>
inline T atomicExch(T* address, typename ::emu::same<T>::type value) {
  T old;
  __atomic_exchange(address, &value, &old, ::emu::fenced_order());
  return old;
}
template <class T>
inline T atomicCAS(T* address, typename ::emu::same<T>::type compare, typename ::emu::same<T>::type value) {
  __atomic_compare_exchange(address, &compare, &value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value either way
}
// Read-modify-write through compare-and-swap (floats, min, max).
template <class T, class F>
inline T atomic_update(T* address, F update) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T next = update(old);
  while (!__atomic_compare_exchange(address, &old, &next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    next = update(old);
  return old;
}
inline float atomicAdd(float* address, float value) {
  return atomic_update(address, [=](float old) { return old + value; });
}
inline double atomicAdd(double* address, double value) {
  return atomic_update(address, [=](double old) { return old + value; });
}
template <class T>
inline T atomicMin(T* address, typename ::emu::same<T>::type value) {
  return atomic_update(address, [=](T old) { return value < old ? value : old; });
}
template <class T>
inline T atomicMax(T* address, typename ::emu::same<T>::type value) {
  return atomic_update(address, [=](T old) { return value > old ? value : old; });
}

// min/max as CUDA overloads them: the usual arithmetic conversions, fmin/fmax for floating point.
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline auto min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)fmin((C)a, (C)b);
  else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline auto max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)fmax((C)a, (C)b);
  else return (C)a < (C)b ? (C)b : (C)a;
}

// Intrinsics, at full precision (the GPU's fast versions are approximations of these).
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
template <class T>
inline T __ldg(const T* address) { return *address; }
template <class T>
inline T __ldcg(const T* address) { return *address; }  // memory is coherent here: no L1 to bypass
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <class To, class From>
inline To emu_bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return emu_bit_cast<float>(x); }
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return emu_bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return emu_bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return emu_bit_cast<long long>(x); }

// The built-in vector type the 16-bit pairs convert to (cuda_fp16.h, cuda_bf16.h).
struct __align__(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// The registry: each kernel's parameter sizes and kinds come from its function type, and its
// launcher copies each argument out of the caller's bytes into a value of the parameter's type.
namespace emu {
enum Kind { kPointer, kInt, kUint, kFloat, kBool };  // the order of KINDS in emulator.py
template <class T>
constexpr int kind_of() {
  if constexpr (std::is_pointer_v<T>) return kPointer;
  else if constexpr (std::is_same_v<T, bool>) return kBool;
  else if constexpr (std::is_floating_point_v<T>) return kFloat;
  else if constexpr (std::is_integral_v<T>) return std::is_signed_v<T> ? kInt : kUint;
  else static_assert(sizeof(T) == 0, "a kernel parameter must be a pointer, an integer, a float or a bool "
                                     "(a __half or __nv_bfloat16 scalar is not emulated: pass a float)");
}
template <class T>
inline T load(const void* bytes) {
  T value;
  memcpy(&value, bytes, sizeof value);
  return value;
}
template <class F, F f>
struct Kernel;
template <class... A, void (*f)(A...)>
struct Kernel<void (*)(A...), f> {
  template <size_t... I>
  static void call(const void* const* args, std::index_sequence<I...>) { f(load<A>(args[I])...); }
  static void invoke(const void* const* args) { call(args, std::index_sequence_for<A...>{}); }
  static constexpr int sizes[] = {int(sizeof(A))..., 0};
  static constexpr int kinds[] = {kind_of<A>()..., 0};
  static constexpr KernelEntry entry(const char* name) { return {name, int(sizeof...(A)), sizes, kinds, invoke}; }
};
}  // namespace emu
#define EMU_KERNEL(name) ::emu::Kernel<decltype(&name), &name>::entry(#name)
