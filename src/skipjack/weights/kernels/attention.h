// Attention for one query over its visible keys.
//
// Invariance rule: a query's output depends only on its own vector and its visible keys, taken in slot order
// with fixed-order sums; never on the other queries in the pass.
#pragma once

#include "simd.h"

namespace sj {

#if SJ_AVX2
// The 8 lane-sums of a[0..7], in one vector: lane j is ((a_j0 + a_j1) + (a_j2 + a_j3)) + ((a_j4 + a_j5) +
// (a_j6 + a_j7)), the same order for every j.
inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}
#endif

// p[j] = scale * q . k_j for the n visible slots idx (keys at kb + slot * ks); returns the largest. Keys go
// in groups of 8, each with its own accumulator (the last group padded by repeating a key), so a key's score
// is the same instruction sequence wherever it falls.
inline float scores(const float* qv, const float* kb, int64_t ks, const int32_t* idx, int64_t n, int64_t D,
                    float scale, float* p) {
  float mx = -INFINITY;
  int64_t j = 0;
#if SJ_AVX2
  if (D % 8 == 0)
    for (; j < n; j += 8) {
      const float* kv[8];
      for (int l = 0; l < 8; ++l) kv[l] = kb + idx[std::min(j + l, n - 1)] * ks;
      __m256 acc[8];
      for (int l = 0; l < 8; ++l) acc[l] = _mm256_setzero_ps();
      for (int64_t e = 0; e < D; e += 8) {
        const __m256 qe = _mm256_loadu_ps(qv + e);
        for (int l = 0; l < 8; ++l) acc[l] = _mm256_fmadd_ps(qe, _mm256_loadu_ps(kv[l] + e), acc[l]);
      }
      alignas(32) float dots[8];
      _mm256_store_ps(dots, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
      for (int64_t l = j; l < std::min(j + 8, n); ++l) p[l] = dots[l - j], mx = std::max(mx, p[l]);
    }
#endif
  for (; j < n; ++j) {
    const float* kv = kb + idx[j] * ks;
    float dot = 0.f;
    for (int64_t e = 0; e < D; ++e) dot = std::fma(qv[e], kv[e], dot);
    p[j] = dot * scale;
    mx = std::max(mx, p[j]);
  }
  return mx;
}

// out[D] = softmax(scale * q k^T over the n visible slots idx) v, keys and values at kb + slot * ks (vb, vs).
// p: scratch of n floats.
inline void attend_row(const float* qv, const float* kb, int64_t ks, const float* vb, int64_t vs, const int32_t* idx,
                       int64_t n, int64_t D, float scale, float* p, float* o) {
  const float mx = scores(qv, kb, ks, idx, n, D, scale, p);
  int64_t j = 0;
#if SJ_AVX2
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(&p[j], exp8(_mm256_sub_ps(_mm256_loadu_ps(&p[j]), _mm256_set1_ps(mx))));
  if (j < n) {  // the tail through the same vector code, so a key's weight never depends on n
    float tmp[8] = {0};
    for (int64_t l = j; l < n; ++l) tmp[l - j] = p[l] - mx;
    _mm256_storeu_ps(tmp, exp8(_mm256_loadu_ps(tmp)));
    for (int64_t l = j; l < n; ++l) p[l] = tmp[l - j];
  }
#else
  for (; j < n; ++j) p[j] = std::exp(p[j] - mx);
#endif
  float total = 0.f;
  for (int64_t l = 0; l < n; ++l) total += p[l];
  const float inv = 1.f / total;
  // o = sum_l p_l v_l, keys in order, 64 dims at a time held in registers
  int64_t e0 = 0;
#if SJ_AVX2
  for (; e0 + 64 <= D; e0 += 64) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t l = 0; l < n; ++l) {
      const float* vv = vb + idx[l] * vs + e0;
      const __m256 w = _mm256_set1_ps(p[l]);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vv + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + e0 + 8 * i, acc[i]);
  }
#endif
  for (int64_t e = e0; e < D; ++e) {
    float acc = 0.f;
    for (int64_t l = 0; l < n; ++l) acc = std::fma(p[l], vb[idx[l] * vs + e], acc);
    o[e] = acc;
  }
  for (int64_t e = 0; e < D; ++e) o[e] *= inv;
}

}  // namespace sj
