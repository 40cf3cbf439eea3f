// skipjack's CPU kernels: block-quantised matmuls (4- and 8-bit weights x 8-bit activations) and attention.
//
// Batch invariance is the design rule (compiled with -ffp-contract=off, so no FMA the code does not ask for): every output row is computed by the same instruction sequence
// whatever the number of rows in the call, and every reduction runs in a fixed order. So a token's result
// does not depend on how many tokens share the pass, which keeps speculative decoding bit-exact.
//
// Weights (N output rows, K inputs, blocks of 32 along K unless said otherwise):
//   Q4: qs uint8 [N, K/2] (block b: byte i holds element i in its low nibble, element i+16 in its high one),
//       d, m float [N, K/32]:  w = d * q + m, q in 0..15 (GGUF Q4_0, Q4_1 and Q4_K map onto it exactly).
//   Q8: qs int8 [N, K], d float [N, K/bs], m float [N, K/bs] or empty:  w = d * q (+ m), bs 16 or 32
//       (GGUF Q8_0, Q5_0, Q5_1, Q5_K and Q6_K map onto it exactly).
// Activations, quantised per row in blocks of 32 (as llama.cpp's Q8_1): x ~= xd * xq, xs = xd * sum(xq).
//   A block's dot product is then d * xd * sum(q * xq) + m * xs, with the integer sum exact.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SJ_AVX2 1
#else
#define SJ_AVX2 0
#endif

namespace {

constexpr int QB = 32;   // activation block
constexpr int RT = 32;   // rows per tile (an activation tile stays in L2 while a thread sweeps its columns)
constexpr int RC = 4;    // rows per register chunk

// ---- activations ----

// Quantise one row of K floats (K % 32 == 0) to int8 blocks: xd = amax / 127, xq = round(x / xd).
void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
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

struct Acts {
  torch::Tensor q, d, s;  // int8 [M, K], float [M, K/32] x2
};

Acts quantize(const torch::Tensor& x2) {
  const int64_t M = x2.size(0), K = x2.size(1);
  Acts a{torch::empty({M, K}, torch::kInt8), torch::empty({M, K / QB}, torch::kFloat),
         torch::empty({M, K / QB}, torch::kFloat)};
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float *dp = a.d.data_ptr<float>(), *sp = a.s.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * K, K, qp + r * K, dp + r * (K / QB), sp + r * (K / QB));
  });
  return a;
}

// ---- horizontal sums and block dots ----

#if SJ_AVX2
inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);                           // 4 lanes
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));        // 2
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));          // 1
  return _mm_cvtss_f32(lo);
}
// 8 int32 sums of 4 products, as floats. The products never reach maddubs' int16 saturation (q4: 15 * 127 * 2;
// q8: 128 * 127 * 2), so the VNNI instruction, where the CPU has it, gives the very same integers in one step.
inline __m256 idot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#elif defined(__AVXVNNI__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s));
#else
  const __m256i p16 = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}
inline __m256i unpack_q4(const uint8_t* qs) {       // 16 bytes -> 32 values 0..15 in element order
  const __m128i raw = _mm_loadu_si128((const __m128i*)qs);
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
#else
struct V8 { float v[8]; };
inline float hsum8(const V8& a) {
  float l[4];
  for (int i = 0; i < 4; ++i) l[i] = a.v[i] + a.v[i + 4];
  const float x = l[0] + l[2], y = l[1] + l[3];
  return x + y;
}
#endif

// One tile of CG columns x RR rows of y = x W^T for Q4 weights. Every output accumulates its blocks in order,
// even blocks and odd blocks in two accumulators (two FMA chains in flight), summed at the end: the same
// arithmetic whatever the tile shape, so the tiling may follow the number of rows without breaking invariance.
template <int CG, int RR>
inline void q4_tile(const Acts& a, const uint8_t* qs, const float* wd, const float* wm, const float* bias,
                    int64_t N, int64_t K, int64_t n, int64_t r, float* y) {
  const int64_t nb = K / QB;
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float *xd = a.d.data_ptr<float>(), *xs = a.s.data_ptr<float>();
#if SJ_AVX2
  __m256 acc[CG][RR][2];
  float sm[CG][RR];
  for (int c = 0; c < CG; ++c)
    for (int j = 0; j < RR; ++j) acc[c][j][0] = acc[c][j][1] = _mm256_setzero_ps(), sm[c][j] = 0.f;
  // block b goes to accumulator b & 1; the loop is unrolled by two so that index is a constant (registers,
  // not a stack slot per block)
  auto step = [&](int64_t b, auto k) {
    __m256i w[CG];
    for (int c = 0; c < CG; ++c) w[c] = unpack_q4(qs + (n + c) * (K / 2) + b * 16);
    for (int j = 0; j < RR; ++j) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + (r + j) * K + b * QB));
      const float xdj = xd[(r + j) * nb + b], xsj = xs[(r + j) * nb + b];
      for (int c = 0; c < CG; ++c) {
        const int64_t o = (n + c) * nb + b;
        acc[c][j][k.value] = _mm256_fmadd_ps(idot_u8s8(w[c], x), _mm256_set1_ps(wd[o] * xdj), acc[c][j][k.value]);
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
      y[(r + j) * N + n + c] = hsum8(_mm256_add_ps(acc[c][j][0], acc[c][j][1])) + sm[c][j] + (bias ? bias[n + c] : 0.f);
#else
  for (int c = 0; c < CG; ++c)
    for (int j = 0; j < RR; ++j) {
      V8 acc[2] = {};
      float sm = 0.f;
      const uint8_t* wq = qs + (n + c) * (K / 2);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wq + b * 16;
        const int8_t* xb = xq + (r + j) * K + b * QB;
        const int64_t o = (n + c) * nb + b;
        const float sc = wd[o] * xd[(r + j) * nb + b];
        for (int l = 0; l < 8; ++l) {
          int s = 0;
          for (int e = 4 * l; e < 4 * l + 4; ++e) s += (e < 16 ? (wb[e] & 15) : (wb[e - 16] >> 4)) * xb[e];
          acc[b & 1].v[l] = std::fma((float)s, sc, acc[b & 1].v[l]);
        }
        sm += wm[o] * xs[(r + j) * nb + b];
      }
      V8 t;
      for (int l = 0; l < 8; ++l) t.v[l] = acc[0].v[l] + acc[1].v[l];
      y[(r + j) * N + n + c] = hsum8(t) + sm + (bias ? bias[n + c] : 0.f);
    }
#endif
}

// Columns n0..n1 of RR rows from r in tiles of CG columns, the columns left over one at a time.
template <int CG, int RR>
inline void q4_cols(const Acts& a, const uint8_t* qs, const float* wd, const float* wm, const float* bias,
                    int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t r, float* y) {
  int64_t n = n0;
  for (; n + CG <= n1; n += CG) q4_tile<CG, RR>(a, qs, wd, wm, bias, N, K, n, r, y);
  for (; n < n1; ++n) q4_tile<1, RR>(a, qs, wd, wm, bias, N, K, n, r, y);
}

// y[M, N] = x[M, K] @ W^T for Q4 weights: rows in register chunks of 4 (each weight block is unpacked once and
// used for 4 rows), and the 1-3 rows left over in one register tile too (a verify step of 2-3 tokens streams
// the weights once, not once per token); a single row takes 4 columns at once (a plain step streams them).
void q4_mm(const Acts& a, const uint8_t* qs, const float* wd, const float* wm, const float* bias,
           int64_t M, int64_t N, int64_t K, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < M; t0 += RT) {
      const int64_t t1 = std::min(M, t0 + RT);
      int64_t r = t0;
      for (; r + RC <= t1; r += RC) q4_cols<1, RC>(a, qs, wd, wm, bias, N, K, n0, n1, r, y);
      switch (t1 - r) {
        case 3: q4_cols<1, 3>(a, qs, wd, wm, bias, N, K, n0, n1, r, y); break;
        case 2: q4_cols<2, 2>(a, qs, wd, wm, bias, N, K, n0, n1, r, y); break;
        case 1: q4_cols<4, 1>(a, qs, wd, wm, bias, N, K, n0, n1, r, y); break;
        default: break;
      }
    }
  });
}

// One column of y = x W^T for Q8 weights against RR rows (compile-time, so the accumulators stay in
// registers). Every output accumulates its blocks in order in one accumulator: the same arithmetic whatever RR.
template <int RR>
inline void q8_tile(const Acts& a, const int8_t* wq, const float* dn, const float* mn, int per, const float* bias,
                    int64_t N, int64_t K, int64_t n, int64_t r0, float* y) {
  const int64_t nb = K / QB;
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float *xd = a.d.data_ptr<float>(), *xs = a.s.data_ptr<float>();
#if SJ_AVX2
  __m256 acc[RR];
  float sm[RR];
  for (int j = 0; j < RR; ++j) acc[j] = _mm256_setzero_ps(), sm[j] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w = _mm256_loadu_si256((const __m256i*)(wq + b * QB));
    const __m256i aw = _mm256_sign_epi8(w, w);
    const __m256 ws = per == 1 ? _mm256_set1_ps(dn[b]) : _mm256_set_m128(_mm_set1_ps(dn[2 * b + 1]), _mm_set1_ps(dn[2 * b]));
    for (int j = 0; j < RR; ++j) {
      const int64_t r = r0 + j;
      const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + r * K + b * QB));
      const __m256 sc = _mm256_mul_ps(ws, _mm256_set1_ps(xd[r * nb + b]));
      acc[j] = _mm256_fmadd_ps(idot_u8s8(aw, _mm256_sign_epi8(x, w)), sc, acc[j]);
      if (mn) sm[j] += mn[b] * xs[r * nb + b];
    }
  }
  for (int j = 0; j < RR; ++j) y[(r0 + j) * N + n] = hsum8(acc[j]) + sm[j] + (bias ? bias[n] : 0.f);
#else
  for (int j = 0; j < RR; ++j) {
    const int64_t r = r0 + j;
    V8 acc{};
    float sm = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* wb = wq + b * QB;
      const int8_t* xb = xq + r * K + b * QB;
      for (int l = 0; l < 8; ++l) {
        int s = 0;
        for (int e = 4 * l; e < 4 * l + 4; ++e) s += (int)wb[e] * xb[e];
        const float ws = per == 1 ? dn[b] : dn[2 * b + (l >= 4)];
        acc.v[l] = std::fma((float)s, ws * xd[r * nb + b], acc.v[l]);
      }
      if (mn) sm += mn[b] * xs[r * nb + b];
    }
    y[r * N + n] = hsum8(acc) + sm + (bias ? bias[n] : 0.f);
  }
#endif
}

// The same for Q8 weights (signed int8), blocks of `bs` (16 or 32) along K, with an optional min.
void q8_mm(const Acts& a, const int8_t* qs, const float* wd, const float* wm, int64_t bs, const float* bias,
           int64_t M, int64_t N, int64_t K, float* y) {
  const int per = (int)(QB / bs);
  const int64_t nw = K / bs;  // weight scales per row
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = 0; t0 < M; t0 += RT) {
      const int64_t t1 = std::min(M, t0 + RT);
      for (int64_t n = n0; n < n1; ++n) {
        const int8_t* wq = qs + n * K;
        const float* dn = wd + n * nw;
        const float* mn = wm ? wm + n * nw : nullptr;
        int64_t r = t0;
        for (; r + RC <= t1; r += RC) q8_tile<RC>(a, wq, dn, mn, per, bias, N, K, n, r, y);
        switch (t1 - r) {  // the rows left over in one register tile: the weight row is read once
          case 3: q8_tile<3>(a, wq, dn, mn, per, bias, N, K, n, r, y); break;
          case 2: q8_tile<2>(a, wq, dn, mn, per, bias, N, K, n, r, y); break;
          case 1: q8_tile<1>(a, wq, dn, mn, per, bias, N, K, n, r, y); break;
          default: break;
        }
      }
    }
  });
}

torch::Tensor check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "skipjack kernels take fp32 activations");
  TORCH_CHECK(x.size(-1) == K, "input width ", x.size(-1), " != weight width ", K);
  TORCH_CHECK(K % QB == 0, "the input width must be a multiple of 32");
  return x.reshape({-1, K}).contiguous();
}

torch::Tensor out_like(const torch::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, torch::kFloat);
}

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                        const torch::Tensor& m, const c10::optional<torch::Tensor>& bias) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2;
  const auto x2 = check_x(x, K);
  const Acts a = quantize(x2);
  auto y = out_like(x, N);
  q4_mm(a, qs.data_ptr<uint8_t>(), d.data_ptr<float>(), m.data_ptr<float>(),
        bias ? bias->data_ptr<float>() : nullptr, x2.size(0), N, K, y.data_ptr<float>());
  return y;
}

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                        const c10::optional<torch::Tensor>& m, int64_t bs, const c10::optional<torch::Tensor>& bias) {
  const int64_t N = qs.size(0), K = qs.size(1);
  TORCH_CHECK(bs == 16 || bs == 32, "Q8 blocks are 16 or 32 wide");
  TORCH_CHECK(!(m && bs != 32), "Q8 blocks with a min are 32 wide");
  const auto x2 = check_x(x, K);
  const Acts a = quantize(x2);
  auto y = out_like(x, N);
  q8_mm(a, qs.data_ptr<int8_t>(), d.data_ptr<float>(), m ? m->data_ptr<float>() : nullptr, bs,
        bias ? bias->data_ptr<float>() : nullptr, x2.size(0), N, K, y.data_ptr<float>());
  return y;
}

// ---- attention ----

#if SJ_AVX2
// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' range reduction and degree-5 polynomial.
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

// out[b, t, h, :] = softmax(scale * q k^T over the keys visible to query t) v, keys in slot order.
// q [B, T, H, D] contiguous; k, v [B, Hkv, S, D] with any strides over B, Hkv, S (D contiguous);
// mask: bool [T, S] (true = visible) or empty (all visible).
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat, "fp32 attention only");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && q.is_contiguous(), "attention: D must be contiguous");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t G = H / Hkv;
  auto out = torch::empty({B, T, H, D}, torch::kFloat);
  const float* qp = q.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = mask ? mask->data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    std::vector<int64_t> idx(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H, g = h / G;
      const float* qv = qp + ((b * T + t) * H + h) * D;
      const float* kb = kp + b * k.stride(0) + g * k.stride(1);
      const float* vb = vp + b * v.stride(0) + g * v.stride(1);
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s)
        if (!mp || mp[t * S + s]) idx[n++] = s;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const float* kv = kb + idx[j] * k.stride(2);
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
        p[j] = dot * sc;
        mx = std::max(mx, p[j]);
      }
      int64_t j = 0;
#if SJ_AVX2
      for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(&p[j], exp8(_mm256_sub_ps(_mm256_loadu_ps(&p[j]), _mm256_set1_ps(mx))));
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
      float* o = op + ((b * T + t) * H + h) * D;
      for (int64_t e = 0; e < D; ++e) o[e] = 0.f;
      for (int64_t l = 0; l < n; ++l) {
        const float* vv = vb + idx[l] * v.stride(2);
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
  });
  return out;
}

// w = d * q (+ m) as fp32 [N, K] (the prompt path's transient copy): elementwise, exactly as
// skipjack.quant.QuantTensor.dequantize computes it.
torch::Tensor dequantize(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                         bool q4, int64_t bs) {
  const int64_t N = qs.size(0), K = q4 ? qs.size(1) * 2 : qs.size(1), nb = K / bs;
  auto w = torch::empty({N, K}, torch::kFloat);
  const float* dp = d.data_ptr<float>();
  const float* mp = m ? m->data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < nb; ++b) {
        const float db = dp[n * nb + b], mb = mp ? mp[n * nb + b] : 0.f;
        float* o = wp + n * K + b * bs;
        if (q4) {
          const uint8_t* q = qs.data_ptr<uint8_t>() + n * (K / 2) + b * 16;
          for (int i = 0; i < 16; ++i) {
            o[i] = db * (float)(q[i] & 15);
            o[i + 16] = db * (float)(q[i] >> 4);
          }
        } else {
          const int8_t* q = qs.data_ptr<int8_t>() + n * K + b * bs;
          for (int i = 0; i < bs; ++i) o[i] = db * (float)q[i];
        }
        if (mp)
          for (int i = 0; i < bs; ++i) o[i] = o[i] + mb;
      }
  });
  return w;
}

bool has_avx2() { return SJ_AVX2; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("q4_linear", &q4_linear, "y = x W^T (+ b), W in Q4 blocks, x quantised to 8 bits per row block");
  mod.def("q8_linear", &q8_linear, "the same for Q8 weight blocks");
  mod.def("attention", &attention, "batch-invariant attention over the visible keys");
  mod.def("dequantize", &dequantize, "w = d * q (+ m) as fp32");
  mod.def("has_avx2", &has_avx2, "whether the AVX2 paths were compiled in");
}
