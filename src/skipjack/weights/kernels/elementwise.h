// Row-wise pieces of a decoder layer: RMSNorm, the gated activations (SiLU, GELU-tanh), RoPE.
//
// Invariance rule: each row is computed alone, by the same instruction sequence whatever the number of rows
// (a row's tail goes through the same vector code, padded), with its sum of squares in a fixed order.
#pragma once

#include "simd.h"

namespace sj {

// y[n] = w * (x * 1 / sqrt(mean(x^2) + eps)); y may be x.
inline void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  float ss = 0.f;
  int64_t e = 0;
#if SJ_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; e + 8 <= n; e += 8) {
    const __m256 v = _mm256_loadu_ps(x + e);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  ss = hsum8(acc);
#endif
  for (; e < n; ++e) ss = std::fma(x[e], x[e], ss);
  const float r = 1.f / std::sqrt(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// sigmoid-weighted and tanh-approximated GELU gates: out[i] = act(g[i]) * u[i] over one row.
// silu(g) = g * s, s = 1 / (1 + exp(-g)), from e = exp(-|g|) (never overflows): s = 1/(1+e) or e/(1+e).
// gelu_tanh(g) = 0.5 g (1 + tanh(y)), y = sqrt(2/pi) (g + 0.044715 g^3), tanh(y) = sign(y) (1 - e) / (1 + e),
// e = exp(-2|y|).
template <bool GELU>
inline void act_mul_row(const float* g, const float* u, int64_t n, float* out) {
#if SJ_AVX2
  auto body = [](__m256 gv, __m256 uv) {
    const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
    if (GELU) {
      const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(gv, gv), gv);
      const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_add_ps(gv, _mm256_mul_ps(_mm256_set1_ps(0.044715f), g3)));
      const __m256 ay = _mm256_andnot_ps(sign, y);
      const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), ay));
      const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
      const __m256 th = _mm256_or_ps(t, _mm256_and_ps(sign, y));  // copy y's sign
      const __m256 a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), gv), _mm256_add_ps(one, th));
      return _mm256_mul_ps(a, uv);
    }
    const __m256 e = exp8(_mm256_or_ps(gv, sign));  // exp(-|g|)
    const __m256 den = _mm256_add_ps(one, e);
    const __m256 pos = _mm256_div_ps(one, den), neg = _mm256_div_ps(e, den);
    const __m256 s = _mm256_blendv_ps(pos, neg, gv);  // g's sign bit picks e/(1+e)
    return _mm256_mul_ps(_mm256_mul_ps(gv, s), uv);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, body(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {  // the tail through the same vector code
    float tg[8] = {0}, tu[8] = {0}, to[8];
    for (int64_t l = i; l < n; ++l) tg[l - i] = g[l], tu[l - i] = u[l];
    _mm256_storeu_ps(to, body(_mm256_loadu_ps(tg), _mm256_loadu_ps(tu)));
    for (int64_t l = i; l < n; ++l) out[l] = to[l - i];
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const float gv = g[i];
    if (GELU) {
      const float y = 0.7978845608028654f * (gv + 0.044715f * (gv * gv * gv));
      const float e = std::exp(-2.f * std::fabs(y));
      const float t = std::copysign((1.f - e) / (1.f + e), y);
      out[i] = (0.5f * gv * (1.f + t)) * u[i];
    } else {
      const float e = std::exp(-std::fabs(gv));
      const float s = std::signbit(gv) ? e / (1.f + e) : 1.f / (1.f + e);
      out[i] = (gv * s) * u[i];
    }
  }
#endif
}

// Rotate-half RoPE of one head x[D] in place: x = x * cos + rot(x) * sin, rot(x) = [-x[D/2:], x[:D/2]].
// (The Python reference computes the same products and sum, each rounded once.)
inline void rope_head(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + (-b) * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

}  // namespace sj
