// <cuda_fp16.h> for the kernel emulator: a kernel source's `#include <cuda_fp16.h>` finds this file
// (tests/cuda is on g++'s include path, emulator.py), while nvcc and NVRTC find CUDA's own header.
// It gives what gpunet's kernels use of CUDA's: __half (2 bytes) and __half2 (4), the conversions
// and the arithmetic, written from what the hardware does rather than copied from CUDA's header:
//
// - float -> half rounds to nearest even (cvt.rn.f16.f32): subnormal halves kept, |x| >= 65520
//   becomes +-Inf, Inf kept, and every NaN becomes the canonical NaN 0x7fff (sign and payload
//   dropped, as cuda_fp16.hpp's host path writes it). NumPy's float32 -> float16 rounds the same way
//   but keeps a NaN's sign and payload: tests compare NaN as NaN, every other value bit for bit.
// - half -> float is exact; a NaN becomes the canonical float NaN 0x7fffffff (as CUDA's host path).
// - double -> half rounds once (cvt.rn.f16.f64): here through float rounded to odd, which float's
//   24 bits make exact for an 11-bit result.
// - + - * / of two halves: the float result rounded to half, which is the correctly rounded half
//   result (float's 24 bits >= 2 x 11 + 2: rounding twice is harmless for these operations), as
//   __hadd and friends give. Comparisons compare the values (NaN unordered). No fused multiply-add.
//
// Not here: the half math functions (hexp, hsqrt...), rounding modes other than nearest even,
// conversions to integers, and kernel parameters of these types (pass a float).
#pragma once
#include "emulator.h"

namespace emu {
inline uint32_t float_bits(float f) { return emu_bit_cast<uint32_t>(f); }
inline float bits_float(uint32_t u) { return emu_bit_cast<float>(u); }

// Round the 24-bit significand m (hidden bit set) right by `shift` bits to nearest, ties to even.
inline uint32_t round_shift_even(uint32_t m, int shift) {
  if (shift <= 0) return m;
  if (shift > 25) return 0;  // below half of the smallest unit
  const uint32_t kept = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  return kept + (rest > half || (rest == half && (kept & 1u)));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = float_bits(f), sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                                     // NaN: canonical
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                 // >= 65520 (and Inf): Inf
  if (a >= 0x38800000u) {                                                  // a normal half (>= 2^-14)
    const uint32_t rebased = a - 0x38000000u;                              // exponent bias 127 -> 15
    const uint32_t kept = rebased >> 13, rest = rebased & 0x1fffu;
    return (uint16_t)(sign | (kept + (rest > 0x1000u || (rest == 0x1000u && (kept & 1u)))));
  }
  const uint32_t exponent = a >> 23;  // a subnormal half (or zero): units of 2^-24
  if (exponent == 0) return (uint16_t)sign;  // a float subnormal is far below 2^-25
  // the value is m * 2^(exponent - 150), in units of 2^-24: m >> (126 - exponent)
  return (uint16_t)(sign | round_shift_even((a & 0x7fffffu) | 0x800000u, 126 - (int)exponent));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(mantissa ? 0x7fffffffu : sign | 0x7f800000u);
  if (exponent == 0) {  // subnormal or zero: mantissa x 2^-24, exact in float
    const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// d rounded to float with the last bit set when inexact (round to odd): rounding that float again to
// a format of at most 22 bits gives d correctly rounded to it.
inline float round_to_odd_float(double d) {
  float f = (float)d;
  if (d != d || (double)f == d || f - f != 0.f) return f;  // NaN, exact, or beyond float's range
  uint32_t u = float_bits(f);
  if (fabs((double)f) > fabs(d)) --u;  // rounded away from zero: step back toward it
  return bits_float(u | 1u);
}
}  // namespace emu

struct __half_raw {
  unsigned short x;
};

struct __align__(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& raw) : __x(raw.x) {}
  __half(float f) : __x(::emu::float_to_half_bits(f)) {}
  __half(double d) : __x(::emu::float_to_half_bits(::emu::round_to_odd_float(d))) {}
  // (as CUDA: implicit from the integer types; |value| > 2^53 would round twice, and is Inf anyway)
  __half(short v) : __half((double)v) {}
  __half(unsigned short v) : __half((double)v) {}
  __half(int v) : __half((double)v) {}
  __half(unsigned int v) : __half((double)v) {}
  __half(long long v) : __half((double)v) {}
  __half(unsigned long long v) : __half((double)v) {}
  operator float() const { return ::emu::half_bits_to_float(__x); }
  operator __half_raw() const { return {__x}; }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2 && std::is_trivially_copyable_v<__half>);

struct __align__(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4);

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline float __half2float(__half h) { return (float)h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short s) { return __half_raw{(unsigned short)s}; }
inline bool __hisnan(__half h) { return (h.__x & 0x7fffu) > 0x7c00u; }
inline int __hisinf(__half h) { return (h.__x & 0x7fffu) == 0x7c00u ? (h.__x & 0x8000u ? -1 : 1) : 0; }

inline __half2 make_half2(__half x, __half y) { return __half2(x, y); }
inline __half2 __halves2half2(__half x, __half y) { return __half2(x, y); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return make_float2((float)h.x, (float)h.y); }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }

// Arithmetic on two halves, each rounded once to half (see the top of the file).
inline __half operator+(const __half& a, const __half& b) { return __half((float)a + (float)b); }
inline __half operator-(const __half& a, const __half& b) { return __half((float)a - (float)b); }
inline __half operator*(const __half& a, const __half& b) { return __half((float)a * (float)b); }
inline __half operator/(const __half& a, const __half& b) { return __half((float)a / (float)b); }
inline __half& operator+=(__half& a, const __half& b) { return a = a + b; }
inline __half& operator-=(__half& a, const __half& b) { return a = a - b; }
inline __half& operator*=(__half& a, const __half& b) { return a = a * b; }
inline __half& operator/=(__half& a, const __half& b) { return a = a / b; }
inline __half operator+(const __half& a) { return a; }
inline __half operator-(const __half& a) { return __half_raw{(unsigned short)(a.__x ^ 0x8000u)}; }  // as __hneg
inline bool operator==(const __half& a, const __half& b) { return (float)a == (float)b; }
inline bool operator!=(const __half& a, const __half& b) { return (float)a != (float)b; }  // (NaN: true)
inline bool operator<(const __half& a, const __half& b) { return (float)a < (float)b; }
inline bool operator<=(const __half& a, const __half& b) { return (float)a <= (float)b; }
inline bool operator>(const __half& a, const __half& b) { return (float)a > (float)b; }
inline bool operator>=(const __half& a, const __half& b) { return (float)a >= (float)b; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hneg(__half a) { return -a; }

inline __half atomicAdd(__half* address, __half value) {  // (sm_70 and later)
  return atomic_update(address, [=](__half old) { return old + value; });
}
