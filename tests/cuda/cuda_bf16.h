// <cuda_bf16.h> for the kernel emulator (see cuda_fp16.h, which this includes, as CUDA's does):
// __nv_bfloat16 (2 bytes: float's sign and 8 exponent bits, 7 mantissa bits) and __nv_bfloat162.
//
// - float -> bfloat16 rounds to nearest even (cvt.rn.bf16.f32): float subnormals kept (rounded as
//   any value), overflow to +-Inf, Inf kept, every NaN the canonical NaN 0x7fff (ml_dtypes keeps a
//   NaN's sign and payload: tests compare NaN as NaN, every other value bit for bit).
// - bfloat16 -> float is exact: the 16 bits are float's upper half (a NaN keeps its payload).
// - double -> bfloat16 rounds once (cvt.rn.bf16.f64), through float rounded to odd.
// - + - * / of two bfloat16 values: the float result rounded to bfloat16, the correctly rounded result
//   (24 >= 2 x 8 + 2), as __hadd and friends give on sm_80 and later.
#pragma once
#include "cuda_fp16.h"

namespace emu {
inline uint16_t float_to_bfloat16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical
  const uint32_t kept = x >> 16, rest = x & 0xffffu;     // (a carry out of the largest finite value gives Inf)
  return (uint16_t)(kept + (rest > 0x8000u || (rest == 0x8000u && (kept & 1u))));
}

inline float bfloat16_bits_to_float(uint16_t b) { return bits_float((uint32_t)b << 16); }
}  // namespace emu

struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& raw) : __x(raw.x) {}
  __nv_bfloat16(float f) : __x(::emu::float_to_bfloat16_bits(f)) {}
  __nv_bfloat16(double d) : __x(::emu::float_to_bfloat16_bits(::emu::round_to_odd_float(d))) {}
  // (as CUDA: implicit from the integer types; |value| > 2^53 would round twice)
  __nv_bfloat16(short v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(unsigned short v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(int v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(unsigned int v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(long long v) : __nv_bfloat16((double)v) {}
  __nv_bfloat16(unsigned long long v) : __nv_bfloat16((double)v) {}
  operator float() const { return ::emu::bfloat16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return {__x}; }
};
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2 &&
              std::is_trivially_copyable_v<__nv_bfloat16>);

struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
static_assert(sizeof(__nv_bfloat162) == 4 && alignof(__nv_bfloat162) == 4);

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16_raw{(unsigned short)s}; }
inline bool __hisnan(__nv_bfloat16 b) { return (b.__x & 0x7fffu) > 0x7f80u; }
inline int __hisinf(__nv_bfloat16 b) { return (b.__x & 0x7fffu) == 0x7f80u ? (b.__x & 0x8000u ? -1 : 1) : 0; }

inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162(x, y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162(x, y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(a)); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return make_float2((float)b.x, (float)b.y); }
inline float __low2float(__nv_bfloat162 b) { return (float)b.x; }
inline float __high2float(__nv_bfloat162 b) { return (float)b.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 b) { return b.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 b) { return b.y; }

// Arithmetic on two bfloat16 values, each rounded once to bfloat16.
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a + (float)b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a - (float)b); }
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a * (float)b); }
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a / (float)b); }
inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a + b; }
inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a - b; }
inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a * b; }
inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = a / b; }
inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __nv_bfloat16_raw{(unsigned short)(a.__x ^ 0x8000u)}; }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a == (float)b; }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a != (float)b; }
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a < (float)b; }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a <= (float)b; }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a > (float)b; }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a >= (float)b; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return a / b; }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return -a; }

inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 value) {  // (sm_80 and later)
  return atomic_update(address, [=](__nv_bfloat16 old) { return old + value; });
}
