// Portable SIMD helpers for the CPU kernels: one vector type as wide as the ISA the file is
// compiled for (16 floats with AVX-512, 8 otherwise), a horizontal sum and a vectorised exp.
// GCC/Clang vector extensions, so the same code builds (more slowly) on any CPU.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace tgserve_simd {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
// may_alias + aligned(4) make a load from any float address legal.
typedef float vec __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4), aligned(4), may_alias));
typedef float vec8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float vec4 __attribute__((vector_size(16), aligned(4), may_alias));

inline vec load(const float* p) {
  return *reinterpret_cast<const vec*>(p);
}
inline void store(float* p, vec v) {
  *reinterpret_cast<vec*>(p) = v;
}
inline vec splat(float x) {
  return vec{} + x;
}

// A float16 KV cache is read as kLanes halves widened to floats in one instruction (F16C, which
// every AVX2 CPU has), so a half row costs its arithmetic no more than a float row does, and
// half the memory traffic.
inline vec load(const c10::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
  return reinterpret_cast<vec>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vec v;
  for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// n floats to halves, rounded to nearest even as torch's .to(torch.float16) rounds them.
inline void store_halves(c10::Half* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

inline float hsum8(vec8 v) {
  const vec4 q =
      __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const vec4 h = q + __builtin_shufflevector(q, q, 2, 3, 0, 1);
  return h[0] + h[1];
}

inline float hmax(vec v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Halving shuffle-and-add steps instead of a chain of lane extracts.
inline float hsum(vec v) {
#if defined(__AVX512F__)
  return hsum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  return hsum8(v);
#endif
}

// Lane i of the result is the sum of the lanes of v[i], for kLanes vectors at once: a tree of
// log2(kLanes) levels, each adding the two halves of every pair of vectors while packing the pair
// into one. 3 operations per pair per level: about 3 per vector in all, against 2·log2(kLanes)
// for a horizontal sum of each vector alone. Level by level each vector's partial sums narrow
// to half as many lanes; the inputs are paired in bit-reversed order so that the lanes come
// out in order.
#if defined(__AVX512F__)
inline vec pair_halves8(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                 31);
}
inline vec pair_halves4(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline vec pair_halves2(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline vec pair_halves1(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
// Always inlined: as a call (GCC's choice) its 16 vectors went through memory.
__attribute__((always_inline)) inline vec transpose_sum(const vec* v) {
  const vec u0 = pair_halves8(v[0], v[8]), u1 = pair_halves8(v[4], v[12]);
  const vec u2 = pair_halves8(v[2], v[10]), u3 = pair_halves8(v[6], v[14]);
  const vec u4 = pair_halves8(v[1], v[9]), u5 = pair_halves8(v[5], v[13]);
  const vec u6 = pair_halves8(v[3], v[11]), u7 = pair_halves8(v[7], v[15]);
  const vec w0 = pair_halves4(u0, u1), w1 = pair_halves4(u2, u3);
  const vec w2 = pair_halves4(u4, u5), w3 = pair_halves4(u6, u7);
  return pair_halves1(pair_halves2(w0, w1), pair_halves2(w2, w3));
}
#else
inline vec pair_halves4(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline vec pair_halves2(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
         __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
inline vec pair_halves1(vec a, vec b) {
  return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
// Always inlined: as a call (GCC's choice) its 16 vectors went through memory.
__attribute__((always_inline)) inline vec transpose_sum(const vec* v) {
  const vec u0 = pair_halves4(v[0], v[4]), u1 = pair_halves4(v[2], v[6]);
  const vec u2 = pair_halves4(v[1], v[5]), u3 = pair_halves4(v[3], v[7]);
  return pair_halves1(pair_halves2(u0, u1), pair_halves2(u2, u3));
}
#endif

// exp(x) per lane, within about 1 ulp of std::exp over the float range (Cephes' expf polynomial):
// x = n·ln2 + r with |r| ≤ ln2/2, exp(r) by a degree-6 polynomial, 2^n put into the exponent bits.
// Inputs are clamped to [-87, 88], where 2^n stays a normal float: exp(-87) ≈ 1.6e-38 stands in
// for smaller results, which every caller here treats as zero anyway.
inline vec exp(vec x) {
  x = x < -87.f ? splat(-87.f) : x;
  x = x > 88.f ? splat(88.f) : x;
  // Round-to-nearest of x·log2(e) with the 1.5·2^23 trick (default rounding mode).
  const vec n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  vec r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace tgserve_simd
