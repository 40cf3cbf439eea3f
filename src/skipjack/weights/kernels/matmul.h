// Block-quantised matmuls: y = x W^T (+ b) for 4- and 8-bit weights in 8-row tiles and 8-bit activations.
//
// Invariance rule: every output row is computed by the same instruction sequence whatever the number of rows
// in the call and whatever range of columns a thread takes, and every reduction runs in a fixed order; so a
// token's result does not depend on how many tokens share the pass (speculative decoding stays bit-exact).
//
// Weights (N output rows, K inputs) are repacked at load (`skipjack.quant.pack`) into tiles of 8 output rows,
// as llama.cpp's repacked Q4_0x8 and ik_llama.cpp's _R8 types do: the 8 rows' bytes for 4 inputs sit side by
// side, so one 32-bit lane of a register is one output row, one broadcast of 4 activation bytes feeds all 8,
// and the block's scales, mins and float multiply-adds are 8-wide vectors. Per tile t and block b of 32 inputs:
//   4-bit: qs uint8 [T, K/32, 128]: 32-byte group g holds, for rows 0..7, the row's bytes 4g..4g+3 (low
//          nibble: value 4g+i, high nibble: value 16+4g+i), values 0..15 (GGUF Q4_0/Q4_1/Q4_K's nibbles).
//   8-bit: qs int8 [T, K/32, 256]: group g (0..7) holds the rows' values 4g..4g+3 (GGUF Q8_0, Q5_x, Q6_K).
// Scales, 8 per tile per block of bs (32, or 16 for Q6_K) and mins per block of 32, in one of three modes:
//   F32: fp32 d [T, K/bs, 8], m [T, K/32, 8]          w = d q + m
//   F16: fp16 d, m                                      (GGUF Q4_0, Q4_1, Q8_0, Q5_0, Q5_1: 5 / 8.5 bits)
//   KS:  int8 d, m with fp16 super-scales D, Dmin [T, K/256, 8] (GGUF k-quants):  w = (D d) q - (Dmin m)
// The products D d and Dmin m are exact in fp32, so every mode gives the file's own weights exactly.
// A block's dot product: y += float(sum(q * xq)) * (d * xd) + m * xs, its integer sum exact.
#pragma once

#include <cstring>

#include "simd.h"

namespace sj {

constexpr int TR = 8;  // output rows per tile
constexpr int RC = 4;  // activation rows per register chunk
enum Mode { F32 = 0, F16 = 1, KS = 2 };

struct QW {
  int bits = 4;  // 4: nibbles 0..15; 8: int8
  int mode = F32;
  int bs = 32;  // values per scale: 32, or 16 (8-bit only)
  const uint8_t* qs = nullptr;
  const void* d = nullptr;
  const void* m = nullptr;  // or none
  const uint16_t* D = nullptr;
  const uint16_t* Dmin = nullptr;
  const float* bias = nullptr;  // [N] or none
  int64_t N = 0, K = 0;
  int64_t tiles() const { return (N + TR - 1) / TR; }
  int64_t bytes() const { return tiles() * TR * K * bits / 8; }
};

// fp16 bits -> fp32, exactly (the scalar path's _cvtsh_ss).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, f = h & 0x3FF;
  uint32_t bits;
  if (e == 0x1F)
    bits = sign | 0x7F800000u | (f << 13);
  else if (e != 0)
    bits = sign | ((e + 112) << 23) | (f << 13);
  else if (f == 0)
    bits = sign;
  else {  // subnormal: f * 2^-24, exact in fp32
    const float v = (float)f * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Tile t's 8 scales of sub-block s (of w.bs values) and 8 mins of block b, as floats, in `out`.
inline void scales_of(const QW& w, int64_t t, int64_t s, float* out) {
  const int64_t o = (t * (w.K / w.bs) + s) * TR;
  for (int i = 0; i < TR; ++i) {
    if (w.mode == F16)
      out[i] = half_to_float(((const uint16_t*)w.d)[o + i]);
    else if (w.mode == KS)
      out[i] = half_to_float(w.D[(t * (w.K / 256) + s * w.bs / 256) * TR + i]) * (float)((const int8_t*)w.d)[o + i];
    else
      out[i] = ((const float*)w.d)[o + i];
  }
}
inline void mins_of(const QW& w, int64_t t, int64_t b, float* out) {
  const int64_t o = (t * (w.K / QB) + b) * TR;
  for (int i = 0; i < TR; ++i) {
    if (w.mode == F16)
      out[i] = half_to_float(((const uint16_t*)w.m)[o + i]);
    else if (w.mode == KS)
      out[i] = -(half_to_float(w.Dmin[(t * (w.K / 256) + b / 8) * TR + i]) * (float)((const int8_t*)w.m)[o + i]);
    else
      out[i] = ((const float*)w.m)[o + i];
  }
}

// Row r's results of tile t: acc (8 lanes) plus the bias, the tile's padding rows dropped.
inline void store_tile(const QW& w, int64_t t, const float* acc, float* yr) {
  const int64_t n0 = t * TR, n = std::min<int64_t>(TR, w.N - n0);
  for (int64_t i = 0; i < n; ++i) yr[n0 + i] = acc[i] + (w.bias ? w.bias[n0 + i] : 0.f);
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if SJ_AVX2
inline __m256 scale8(const QW& w, int64_t t, int64_t s) {
  const int64_t o = (t * (w.K / w.bs) + s) * TR;
  if (w.mode == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)w.d + o)));
  if (w.mode == KS) {
    const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.D + (t * (w.K / 256) + s * w.bs / 256) * TR)));
    const __m128i sc = _mm_loadl_epi64((const __m128i*)((const int8_t*)w.d + o));
    return _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
  }
  return _mm256_loadu_ps((const float*)w.d + o);
}
inline __m256 min8(const QW& w, int64_t t, int64_t b) {
  const int64_t o = (t * (w.K / QB) + b) * TR;
  if (w.mode == F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)w.m + o)));
  if (w.mode == KS) {
    const __m256 D = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w.Dmin + (t * (w.K / 256) + b / 8) * TR)));
    const __m128i mn = _mm_loadl_epi64((const __m128i*)((const int8_t*)w.m + o));
    const __m256 p = _mm256_mul_ps(D, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mn)));
    return _mm256_xor_ps(p, _mm256_set1_ps(-0.f));  // -(Dmin m), exactly
  }
  return _mm256_loadu_ps((const float*)w.m + o);
}
// 8 int32 sums of 4 products u * s (u unsigned, s signed) added to acc; the products never reach maddubs'
// int16 saturation, so the VNNI instruction, where the CPU has it, gives the same integers in one step.
inline __m256i dot4_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

// RR activation rows from r0 against tile t of a 4-bit weight.
template <int RR>
inline void q4_tile(const Acts& a, const QW& w, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const int64_t K = w.K, nb = K / QB;
  const uint8_t* q = w.qs + t * nb * 128;
#if SJ_AVX2
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[RR];
  for (int j = 0; j < RR; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, q += 128) {
    __m256i s[RR];
    for (int j = 0; j < RR; ++j) s[j] = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      for (int j = 0; j < RR; ++j) {
        const int8_t* xb = a.q + (r0 + j) * K + b * QB;
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
        s[j] = dot4_add(s[j], lo, _mm256_set1_epi32(load_i32(xb + 4 * g)));
        s[j] = dot4_add(s[j], hi, _mm256_set1_epi32(load_i32(xb + 16 + 4 * g)));
#else  // int16 partial sums: 8 of at most 2 * 15 * 127 each stay below 2^15
        const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xb + 4 * g)));
        const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xb + 16 + 4 * g)));
        s[j] = _mm256_add_epi16(s[j], _mm256_add_epi16(pl, ph));
#endif
      }
    }
    const __m256 dw = scale8(w, t, b), mw = min8(w, t, b);
    for (int j = 0; j < RR; ++j) {
      const int64_t o = (r0 + j) * nb + b;
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
      const __m256 is = _mm256_cvtepi32_ps(s[j]);
#else
      const __m256 is = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[j], _mm256_set1_epi16(1)));
#endif
      acc[j] = _mm256_fmadd_ps(is, _mm256_mul_ps(dw, _mm256_set1_ps(a.d[o])), acc[j]);
      acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[o]), acc[j]);
    }
  }
  for (int j = 0; j < RR; ++j) {
    alignas(32) float out[TR];
    _mm256_store_ps(out, acc[j]);
    store_tile(w, t, out, y + (r0 + j) * ldy);
  }
#else
  for (int j = 0; j < RR; ++j) {
    float acc[TR] = {0};
    const int8_t* xr = a.q + (r0 + j) * K;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* qb = q + b * 128;
      float dw[TR], mw[TR];
      scales_of(w, t, b, dw);
      mins_of(w, t, b, mw);
      const float xd = a.d[(r0 + j) * nb + b], xs = a.s[(r0 + j) * nb + b];
      for (int i = 0; i < TR; ++i) {
        int s = 0;
        for (int g = 0; g < 4; ++g)
          for (int e = 0; e < 4; ++e) {
            const uint8_t byte = qb[32 * g + 4 * i + e];
            s += (byte & 15) * xr[b * QB + 4 * g + e] + (byte >> 4) * xr[b * QB + 16 + 4 * g + e];
          }
        acc[i] = std::fma((float)s, dw[i] * xd, acc[i]);
        acc[i] = std::fma(mw[i], xs, acc[i]);
      }
    }
    store_tile(w, t, acc, y + (r0 + j) * ldy);
  }
#endif
}

// RR activation rows from r0 against tile t of an 8-bit weight (scales per 32, or per 16: BS16).
template <int RR, bool BS16, bool MIN>
inline void q8_tile(const Acts& a, const QW& w, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const int64_t K = w.K, nb = K / QB;
  const int8_t* q = (const int8_t*)w.qs + t * nb * 256;
#if SJ_AVX2
  __m256 acc[RR];
  for (int j = 0; j < RR; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, q += 256) {
    __m256i s0[RR], s1[RR];  // values 0..15 and 16..31 of the block (one sum where the scale is per 32)
    for (int j = 0; j < RR; ++j) s0[j] = s1[j] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(q + 32 * g));
      const __m256i av = _mm256_sign_epi8(v, v);
      for (int j = 0; j < RR; ++j) {
        const __m256i x = _mm256_set1_epi32(load_i32(a.q + (r0 + j) * K + b * QB + 4 * g));
        if (BS16 && g >= 4)
          s1[j] = dot4_add(s1[j], av, _mm256_sign_epi8(x, v));
        else
          s0[j] = dot4_add(s0[j], av, _mm256_sign_epi8(x, v));
      }
    }
    const __m256 d0 = scale8(w, t, BS16 ? 2 * b : b);
    const __m256 d1 = BS16 ? scale8(w, t, 2 * b + 1) : d0;
    const __m256 mw = MIN ? min8(w, t, b) : _mm256_setzero_ps();
    for (int j = 0; j < RR; ++j) {
      const int64_t o = (r0 + j) * nb + b;
      const __m256 xd = _mm256_set1_ps(a.d[o]);
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[j]), _mm256_mul_ps(d0, xd), acc[j]);
      if (BS16) acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[j]), _mm256_mul_ps(d1, xd), acc[j]);
      if (MIN) acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[o]), acc[j]);
    }
  }
  for (int j = 0; j < RR; ++j) {
    alignas(32) float out[TR];
    _mm256_store_ps(out, acc[j]);
    store_tile(w, t, out, y + (r0 + j) * ldy);
  }
#else
  for (int j = 0; j < RR; ++j) {
    float acc[TR] = {0};
    const int8_t* xr = a.q + (r0 + j) * K;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* qb = q + b * 256;
      float d0[TR], d1[TR], mw[TR];
      scales_of(w, t, BS16 ? 2 * b : b, d0);
      if (BS16) scales_of(w, t, 2 * b + 1, d1);
      if (MIN) mins_of(w, t, b, mw);
      const float xd = a.d[(r0 + j) * nb + b], xs = a.s[(r0 + j) * nb + b];
      for (int i = 0; i < TR; ++i) {
        int s0 = 0, s1 = 0;
        for (int g = 0; g < 8; ++g)
          for (int e = 0; e < 4; ++e) {
            const int p = (int)qb[32 * g + 4 * i + e] * xr[b * QB + 4 * g + e];
            (BS16 && g >= 4 ? s1 : s0) += p;
          }
        acc[i] = std::fma((float)s0, d0[i] * xd, acc[i]);
        if (BS16) acc[i] = std::fma((float)s1, d1[i] * xd, acc[i]);
        if (MIN) acc[i] = std::fma(mw[i], xs, acc[i]);
      }
    }
    store_tile(w, t, acc, y + (r0 + j) * ldy);
  }
#endif
}

template <int RR>
inline void tile_rows(const Acts& a, const QW& w, int64_t t, int64_t r, float* y, int64_t ldy) {
  if (w.bits == 4)
    q4_tile<RR>(a, w, t, r, y, ldy);
  else if (w.bs == 16)
    q8_tile<RR, true, false>(a, w, t, r, y, ldy);
  else if (w.m)
    q8_tile<RR, false, true>(a, w, t, r, y, ldy);
  else
    q8_tile<RR, false, false>(a, w, t, r, y, ldy);
}

// Output columns [n0, n1) of y[M, ldy] = x[M, K] W^T (n0 a multiple of 8; n1 one too, or N): per tile of 8
// columns, rows in register chunks of RC (the tile's weights stay in cache between chunks), the 1-3 rows left
// over in one chunk too.
inline void matmul_cols(const Acts& a, const QW& w, int64_t M, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t t1 = (n1 + TR - 1) / TR;
  for (int64_t t = n0 / TR; t < t1; ++t) {
    int64_t r = 0;
    for (; r + RC <= M; r += RC) tile_rows<RC>(a, w, t, r, y, ldy);
    switch (M - r) {
      case 3: tile_rows<3>(a, w, t, r, y, ldy); break;
      case 2: tile_rows<2>(a, w, t, r, y, ldy); break;
      case 1: tile_rows<1>(a, w, t, r, y, ldy); break;
      default: break;
    }
  }
}

// w = d * q + m as fp32 rows [n1 - n0, K] into `out` (row n0 first), elementwise exactly as
// skipjack.quant.QuantTensor.dequantize computes it; each tile's scales are read once per block.
inline void dequantize_rows(const QW& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K, nb = K / QB;
  for (int64_t t = n0 / TR; t * TR < n1; ++t) {
    const int64_t i0 = std::max<int64_t>(n0 - t * TR, 0), i1 = std::min<int64_t>(n1 - t * TR, TR);
    for (int64_t b = 0; b < nb; ++b) {
      float d0[TR], d1[TR], mw[TR] = {0};
      scales_of(w, t, w.bs == 16 ? 2 * b : b, d0);
      if (w.bs == 16)
        scales_of(w, t, 2 * b + 1, d1);
      else
        std::memcpy(d1, d0, sizeof d0);
      if (w.m) mins_of(w, t, b, mw);
      for (int64_t i = i0; i < i1; ++i) {
        float* o = out + (t * TR + i - n0) * K + b * QB;
        if (w.bits == 4) {
          const uint8_t* q = w.qs + (t * nb + b) * 128 + 4 * i;
          for (int g = 0; g < 4; ++g)
            for (int e = 0; e < 4; ++e) {
              o[4 * g + e] = d0[i] * (float)(q[32 * g + e] & 15);
              o[16 + 4 * g + e] = d1[i] * (float)(q[32 * g + e] >> 4);
            }
        } else {
          const int8_t* q = (const int8_t*)w.qs + (t * nb + b) * 256 + 4 * i;
          for (int g = 0; g < 8; ++g)
            for (int e = 0; e < 4; ++e) o[4 * g + e] = (g < 4 ? d0[i] : d1[i]) * (float)q[32 * g + e];
        }
        if (w.m)
          for (int e = 0; e < QB; ++e) o[e] = o[e] + mw[i];
      }
    }
  }
}

}  // namespace sj
