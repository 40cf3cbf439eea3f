// Attention for one query over its visible keys.
//
// Invariance rule: a query's output depends only on its own vector and its visible keys, taken in slot order
// with fixed-order sums; never on the other queries in the pass.
#pragma once

#include "simd.h"

namespace sj {

// out[D] = softmax(scale * q k^T over the n visible slots idx) v, keys and values at kb + slot * ks (vb, vs).
// p: scratch of n floats.
inline void attend_row(const float* qv, const float* kb, int64_t ks, const float* vb, int64_t vs, const int32_t* idx,
                       int64_t n, int64_t D, float scale, float* p, float* o) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float* kv = kb + idx[j] * ks;
    float dot = 0.f;
#if SJ_AVX2
    if (D % 8 == 0) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t e = 0; e < D; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + e), _mm256_loadu_ps(kv + e), acc);
      dot = hsum8(acc);
    } else
#endif
    {
      for (int64_t e = 0; e < D; ++e) dot = std::fma(qv[e], kv[e], dot);
    }
    p[j] = dot * scale;
    mx = std::max(mx, p[j]);
  }
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
  for (int64_t e = 0; e < D; ++e) o[e] = 0.f;
  for (int64_t l = 0; l < n; ++l) {
    const float* vv = vb + idx[l] * vs;
    const float w = p[l];
    int64_t e = 0;
#if SJ_AVX2
    for (; e + 8 <= D; e += 8)
      _mm256_storeu_ps(o + e, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(vv + e), _mm256_loadu_ps(o + e)));
#endif
    for (; e < D; ++e) o[e] = std::fma(w, vv[e], o[e]);
  }
  for (int64_t e = 0; e < D; ++e) o[e] *= inv;
}

}  // namespace sj
