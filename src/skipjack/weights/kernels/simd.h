// Vector helpers and activation quantisation shared by every kernel file.
//
// Invariance rule (all of skipjack's kernels): the arithmetic a row gets does not depend on how many rows share
// the call, and every reduction runs in a fixed order. The build uses -ffp-contract=off, so the compiler fuses
// no multiply-add that the code does not ask for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SJ_AVX2 1
#else
#define SJ_AVX2 0
#endif

namespace sj {

constexpr int QB = 32;  // activation block

// Activations quantised per row in blocks of 32 (as llama.cpp's Q8_1): x ~= d * q, s = d * sum(q).
// Row r: q + r * K, d + r * (K / 32), s + r * (K / 32).
struct Acts {
  int8_t* q;
  float* d;
  float* s;
  int64_t K;
};

// Quantise one row of K floats (K % 32 == 0) to int8 blocks: d = amax / 127, q = round(x / d).
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < K / QB; ++b) {
    const float* xb = x + b * QB;
    float amax = 0.f;
    for (int i = 0; i < QB; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f;
    const float id = db > 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int i = 0; i < QB; ++i) {
      const int v = (int)std::nearbyint(xb[i] * id);
      q[b * QB + i] = (int8_t)v;
      sum += v;
    }
    d[b] = db;
    s[b] = db * (float)sum;
  }
}

inline void quantize_rows(const float* x, int64_t r0, int64_t r1, const Acts& a) {
  const int64_t nb = a.K / QB;
  for (int64_t r = r0; r < r1; ++r) quantize_row(x + r * a.K, a.K, a.q + r * a.K, a.d + r * nb, a.s + r * nb);
}

#if SJ_AVX2
inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);                     // 4 lanes
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));  // 2
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));    // 1
  return _mm_cvtss_f32(lo);
}
// exp(x) for x <= 0 (softmax after subtracting the max, sigmoid of -|x|): Cephes' range reduction and
// degree-5 polynomial.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// Split [0, n) among `parts` workers in chunks aligned to `align`: worker `w` gets [lo, hi).
inline void split(int64_t n, int parts, int w, int64_t align, int64_t& lo, int64_t& hi) {
  const int64_t chunks = (n + align - 1) / align;
  const int64_t per = chunks / parts, extra = chunks % parts;
  const int64_t c0 = w * per + std::min<int64_t>(w, extra), c1 = c0 + per + (w < extra ? 1 : 0);
  lo = std::min(n, c0 * align);
  hi = std::min(n, c1 * align);
}

}  // namespace sj
