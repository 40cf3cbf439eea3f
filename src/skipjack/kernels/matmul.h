// Block-quantised matmuls: y = x W^T (+ b) for 4- and 8-bit weights and 8-bit activations.
//
// Invariance rule: every output row is computed by the same instruction sequence whatever the number of rows
// in the call and whatever range of columns a thread takes, and every reduction runs in a fixed order; so a
// token's result does not depend on how many tokens share the pass (speculative decoding stays bit-exact).
//
// Weights (N output rows, K inputs, blocks of 32 along K unless said otherwise):
//   Q4: qs uint8 [N, K/2] (block b: byte i holds element i in its low nibble, element i+16 in its high one),
//       d, m float [N, K/32]:  w = d * q + m, q in 0..15 (GGUF Q4_0, Q4_1 and Q4_K map onto it exactly).
//   Q8: qs int8 [N, K], d float [N, K/bs], m float [N, K/bs] or none:  w = d * q (+ m), bs 16 or 32
//       (GGUF Q8_0, Q5_0, Q5_1, Q5_K and Q6_K map onto it exactly).
// A block's dot product is d * xd * sum(q * xq) + m * xs, with the integer sum exact.
#pragma once

#include <type_traits>

#include "simd.h"

namespace sj {

constexpr int RT = 32;  // rows per tile (an activation tile stays in L2 while a thread sweeps its columns)
constexpr int RC = 4;   // rows per register chunk

struct QW {
  bool q4 = true;
  const void* qs = nullptr;
  const float* d = nullptr;
  const float* m = nullptr;  // or none
  int bs = 32;
  const float* bias = nullptr;  // [N] or none
  int64_t N = 0, K = 0;
};

// One tile of CG columns x RR rows for Q4 weights. Every output accumulates its blocks in order, even blocks
// and odd blocks in two accumulators (two FMA chains in flight), summed at the end: the same arithmetic
// whatever the tile shape, so the tiling may follow the number of rows without breaking invariance.
template <int CG, int RR>
inline void q4_tile(const Acts& a, const QW& w, int64_t n, int64_t r, float* y, int64_t ldy) {
  const int64_t K = w.K, nb = K / QB;
  const uint8_t* qs = (const uint8_t*)w.qs;
  const float *wd = w.d, *wm = w.m;
#if SJ_AVX2
  __m256 acc[CG][RR][2];
  float sm[CG][RR];
  for (int c = 0; c < CG; ++c)
    for (int j = 0; j < RR; ++j) acc[c][j][0] = acc[c][j][1] = _mm256_setzero_ps(), sm[c][j] = 0.f;
  // block b goes to accumulator b & 1; the loop is unrolled by two so that index is a constant
  auto step = [&](int64_t b, auto k) {
    __m256i wv[CG];
    for (int c = 0; c < CG; ++c) wv[c] = unpack_q4(qs + (n + c) * (K / 2) + b * 16);
    for (int j = 0; j < RR; ++j) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)(a.q + (r + j) * K + b * QB));
      const float xdj = a.d[(r + j) * nb + b], xsj = a.s[(r + j) * nb + b];
      for (int c = 0; c < CG; ++c) {
        const int64_t o = (n + c) * nb + b;
        acc[c][j][k.value] = _mm256_fmadd_ps(idot_u8s8(wv[c], x), _mm256_set1_ps(wd[o] * xdj), acc[c][j][k.value]);
        sm[c][j] += wm[o] * xsj;
      }
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    step(b, std::integral_constant<int, 0>{});
    step(b + 1, std::integral_constant<int, 1>{});
  }
  if (b < nb) step(b, std::integral_constant<int, 0>{});
  for (int c = 0; c < CG; ++c)
    for (int j = 0; j < RR; ++j)
      y[(r + j) * ldy + n + c] =
          hsum8(_mm256_add_ps(acc[c][j][0], acc[c][j][1])) + sm[c][j] + (w.bias ? w.bias[n + c] : 0.f);
#else
  for (int c = 0; c < CG; ++c)
    for (int j = 0; j < RR; ++j) {
      V8 acc[2] = {};
      float sm = 0.f;
      const uint8_t* wq = qs + (n + c) * (K / 2);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wq + b * 16;
        const int8_t* xb = a.q + (r + j) * K + b * QB;
        const int64_t o = (n + c) * nb + b;
        const float sc = wd[o] * a.d[(r + j) * nb + b];
        for (int l = 0; l < 8; ++l) {
          int s = 0;
          for (int e = 4 * l; e < 4 * l + 4; ++e) s += (e < 16 ? (wb[e] & 15) : (wb[e - 16] >> 4)) * xb[e];
          acc[b & 1].v[l] = std::fma((float)s, sc, acc[b & 1].v[l]);
        }
        sm += wm[o] * a.s[(r + j) * nb + b];
      }
      V8 t;
      for (int l = 0; l < 8; ++l) t.v[l] = acc[0].v[l] + acc[1].v[l];
      y[(r + j) * ldy + n + c] = hsum8(t) + sm + (w.bias ? w.bias[n + c] : 0.f);
    }
#endif
}

// Columns n0..n1 of RR rows from r in tiles of CG columns, the columns left over one at a time.
template <int CG, int RR>
inline void q4_cols(const Acts& a, const QW& w, int64_t n0, int64_t n1, int64_t r, float* y, int64_t ldy) {
  int64_t n = n0;
  for (; n + CG <= n1; n += CG) q4_tile<CG, RR>(a, w, n, r, y, ldy);
  for (; n < n1; ++n) q4_tile<1, RR>(a, w, n, r, y, ldy);
}

// One column of y = x W^T for Q8 weights against RR rows (compile-time, so the accumulators stay in
// registers). Every output accumulates its blocks in order in one accumulator: the same arithmetic whatever RR.
template <int RR>
inline void q8_tile(const Acts& a, const QW& w, int64_t n, int64_t r0, float* y, int64_t ldy) {
  const int64_t K = w.K, nb = K / QB, nw = K / w.bs;
  const int per = (int)(QB / w.bs);
  const int8_t* wq = (const int8_t*)w.qs + n * K;
  const float* dn = w.d + n * nw;
  const float* mn = w.m ? w.m + n * nw : nullptr;
#if SJ_AVX2
  __m256 acc[RR];
  float sm[RR];
  for (int j = 0; j < RR; ++j) acc[j] = _mm256_setzero_ps(), sm[j] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)(wq + b * QB));
    const __m256i aw = _mm256_sign_epi8(wv, wv);
    const __m256 ws =
        per == 1 ? _mm256_set1_ps(dn[b]) : _mm256_set_m128(_mm_set1_ps(dn[2 * b + 1]), _mm_set1_ps(dn[2 * b]));
    for (int j = 0; j < RR; ++j) {
      const int64_t r = r0 + j;
      const __m256i x = _mm256_loadu_si256((const __m256i*)(a.q + r * K + b * QB));
      const __m256 sc = _mm256_mul_ps(ws, _mm256_set1_ps(a.d[r * nb + b]));
      acc[j] = _mm256_fmadd_ps(idot_u8s8(aw, _mm256_sign_epi8(x, wv)), sc, acc[j]);
      if (mn) sm[j] += mn[b] * a.s[r * nb + b];
    }
  }
  for (int j = 0; j < RR; ++j) y[(r0 + j) * ldy + n] = hsum8(acc[j]) + sm[j] + (w.bias ? w.bias[n] : 0.f);
#else
  for (int j = 0; j < RR; ++j) {
    const int64_t r = r0 + j;
    V8 acc{};
    float sm = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* wb = wq + b * QB;
      const int8_t* xb = a.q + r * K + b * QB;
      for (int l = 0; l < 8; ++l) {
        int s = 0;
        for (int e = 4 * l; e < 4 * l + 4; ++e) s += (int)wb[e] * xb[e];
        const float ws = per == 1 ? dn[b] : dn[2 * b + (l >= 4)];
        acc.v[l] = std::fma((float)s, ws * a.d[r * nb + b], acc.v[l]);
      }
      if (mn) sm += mn[b] * a.s[r * nb + b];
    }
    y[r * ldy + n] = hsum8(acc) + sm + (w.bias ? w.bias[n] : 0.f);
  }
#endif
}

// Output columns [n0, n1) of y[M, ldy] = x[M, K] W^T: rows in tiles of RT, register chunks of RC rows (each
// weight block unpacked once for 4 rows), the 1-3 rows left over in one register tile too (a verify step of
// 2-3 tokens streams the weights once); a single q4 row takes 4 columns at once (a plain step streams them).
inline void matmul_cols(const Acts& a, const QW& w, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t t0 = 0; t0 < M; t0 += RT) {
    const int64_t t1 = std::min(M, t0 + RT);
    if (w.q4) {
      int64_t r = t0;
      for (; r + RC <= t1; r += RC) q4_cols<1, RC>(a, w, n0, n1, r, y, ldy);
      switch (t1 - r) {
        case 3: q4_cols<1, 3>(a, w, n0, n1, r, y, ldy); break;
        case 2: q4_cols<2, 2>(a, w, n0, n1, r, y, ldy); break;
        case 1: q4_cols<4, 1>(a, w, n0, n1, r, y, ldy); break;
        default: break;
      }
    } else {
      for (int64_t n = n0; n < n1; ++n) {
        int64_t r = t0;
        for (; r + RC <= t1; r += RC) q8_tile<RC>(a, w, n, r, y, ldy);
        switch (t1 - r) {  // the rows left over in one register tile: the weight row is read once
          case 3: q8_tile<3>(a, w, n, r, y, ldy); break;
          case 2: q8_tile<2>(a, w, n, r, y, ldy); break;
          case 1: q8_tile<1>(a, w, n, r, y, ldy); break;
          default: break;
        }
      }
    }
  }
}

}  // namespace sj
