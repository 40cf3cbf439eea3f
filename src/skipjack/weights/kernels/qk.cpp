// skipjack's CPU kernels, bound for Python: block-quantised matmuls, attention, the row-wise ops, and the
// native decoding step (`layer.h`). Each op here is what the Python reference forward calls one at a time;
// `Native.forward` runs the same functions fused, one call per layer or per pass (see layer.h).
//
// Invariance rule: every output row is computed by the same instruction sequence whatever the number of rows
// in the call, and every reduction runs in a fixed order (simd.h, matmul.h, attention.h, elementwise.h).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "layer.h"

namespace {

using sj::Acts;
using sj::QB;

struct ActBuf {
  torch::Tensor q, d, s;
  Acts acts() { return Acts{q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>(), q.size(1)}; }
};

ActBuf quantize(const torch::Tensor& x2) {
  const int64_t M = x2.size(0), K = x2.size(1);
  ActBuf a{torch::empty({M, K}, torch::kInt8), torch::empty({M, K / QB}, torch::kFloat),
           torch::empty({M, K / QB}, torch::kFloat)};
  const Acts acts = a.acts();
  const float* xp = x2.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) { sj::quantize_rows(xp, r0, r1, acts); });
  return a;
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

constexpr int64_t ROWS = 64;  // rows per chunk of a wide pass

torch::Tensor run(const torch::Tensor& x, const sj::QW& w) {
  const auto x2 = check_x(x, w.K);
  ActBuf a = quantize(x2);
  const Acts acts = a.acts();
  auto y = out_like(x, w.N);
  float* yp = y.data_ptr<float>();
  const int64_t M = x2.size(0), nb = w.K / QB;
  at::parallel_for(0, w.tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t r0 = 0; r0 < M; r0 += ROWS) {  // a prompt in chunks: their activations stay in cache
      const Acts part{acts.q + r0 * w.K, acts.d + r0 * nb, acts.s + r0 * nb, w.K};
      sj::matmul_cols(part, w, std::min(ROWS, M - r0), t0 * sj::TR, std::min(w.N, t1 * sj::TR), yp + r0 * w.N, w.N);
    }
  });
  return y;
}

const float* opt(const c10::optional<torch::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// A weight in 8-row tiles from Python (`skipjack.quant.Packed.args`):
// (bits, mode, bs, qs, d, m or None, D or None, Dmin or None, N, K); see matmul.h.
using PW = std::tuple<int64_t, int64_t, int64_t, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                      c10::optional<torch::Tensor>, c10::optional<torch::Tensor>, int64_t, int64_t>;

void expect(const torch::Tensor& t, torch::ScalarType type, std::vector<int64_t> shape, const char* what) {
  TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.sizes() == c10::IntArrayRef(shape),
              "packed weight: ", what, " must be contiguous ", c10::toString(type), " ", c10::IntArrayRef(shape),
              " (got ", c10::toString(t.scalar_type()), " ", t.sizes(), ")");
}

// The packed weight checked against its declared shape and format (a bad one is a RuntimeError, never a read
// out of bounds), and the tensors to keep alive in `keep` (when given).
sj::QW qw(const PW& p, const c10::optional<torch::Tensor>& bias, std::vector<torch::Tensor>* keep = nullptr) {
  const auto& [bits, mode, bs, qs, d, m, D, Dmin, N, K] = p;
  TORCH_CHECK(bits == 4 || bits == 8, "packed weight: ", bits, "-bit values");
  TORCH_CHECK(mode >= sj::F32 && mode <= sj::KS, "packed weight: scale mode ", mode);
  TORCH_CHECK(bs == 32 || (bs == 16 && bits == 8 && !m), "packed weight: blocks of ", bs);
  TORCH_CHECK(N >= 1 && K >= sj::QB && K % (mode == sj::KS ? 256 : sj::QB) == 0, "packed weight: shape ", N, "x", K);
  TORCH_CHECK(bits == 8 || m, "packed weight: 4-bit values need mins");
  const int64_t T = (N + sj::TR - 1) / sj::TR, nb = K / sj::QB;
  expect(qs, bits == 4 ? torch::kUInt8 : torch::kInt8, {T, nb, bits == 4 ? 128 : 256}, "qs");
  const auto st = mode == sj::F32 ? torch::kFloat : mode == sj::F16 ? torch::kHalf : torch::kInt8;
  expect(d, st, {T, K / bs, sj::TR}, "scales");
  if (m) expect(*m, st, {T, nb, sj::TR}, "mins");
  TORCH_CHECK((mode == sj::KS) == D.has_value() && (mode == sj::KS && m) == Dmin.has_value(),
              "packed weight: super-scales go with scale mode 2 (and their mins with mins)");
  if (D) expect(*D, torch::kHalf, {T, K / 256, sj::TR}, "super-scales");
  if (Dmin) expect(*Dmin, torch::kHalf, {T, K / 256, sj::TR}, "super-mins");
  if (bias) expect(*bias, torch::kFloat, {N}, "bias");
  if (keep) {
    for (const auto& t : {qs, d}) keep->push_back(t);
    for (const auto* t : {&m, &D, &Dmin, &bias})
      if (*t) keep->push_back(**t);
  }
  auto ptr = [](const c10::optional<torch::Tensor>& t) { return t ? (const uint16_t*)t->data_ptr() : nullptr; };
  return sj::QW{(int)bits, (int)mode, (int)bs, (const uint8_t*)qs.data_ptr(), d.data_ptr(),
                m ? m->data_ptr() : nullptr, ptr(D), ptr(Dmin), opt(bias), N, K};
}

torch::Tensor linear(const torch::Tensor& x, const PW& w, const c10::optional<torch::Tensor>& bias) {
  return run(x, qw(w, bias));
}

// The packed weight as fp32 [N, K] (a prompt's transient copy): exactly quant.QuantTensor.dequantize.
torch::Tensor unpack(const PW& p) {
  const sj::QW w = qw(p, {});
  auto out = torch::empty({w.N, w.K}, torch::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.tiles(), 1, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * sj::TR;
    sj::dequantize_rows(w, n0, std::min(w.N, t1 * sj::TR), op + n0 * w.K);
  });
  return out;
}

// Rows `ids` of a packed weight as fp32 [n, K] (a tied table's embedding lookups): exactly `unpack`'s rows.
torch::Tensor unpack_rows(const PW& p, const torch::Tensor& ids) {
  const sj::QW w = qw(p, {});
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "unpack_rows: ids must be int64 [n]");
  const auto idc = ids.contiguous();
  const int64_t* ip = idc.data_ptr<int64_t>();
  const int64_t n = idc.numel();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < w.N, "token id ", ip[i], " out of range");
  auto out = torch::empty({n, w.K}, torch::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) sj::dequantize_rows(w, ip[i], ip[i] + 1, op + i * w.K);
  return out;
}

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
  at::parallel_for(0, B * T * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    std::vector<int32_t> idx(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T * H), t = (i / H) % T, h = i % H, g = h / G;
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s)
        if (!mp || mp[t * S + s]) idx[n++] = (int32_t)s;
      sj::attend_row(qp + ((b * T + t) * H + h) * D, kp + b * k.stride(0) + g * k.stride(1), k.stride(2),
                     vp + b * v.stride(0) + g * v.stride(1), v.stride(2), idx.data(), n, D, (float)scale, p.data(),
                     op + ((b * T + t) * H + h) * D);
    }
  });
  return out;
}

// RMSNorm over the last dim of x [..., n] (fp32) with weight [n]: the native step's row-wise op.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "rms_norm: fp32 only");
  const int64_t n = x.size(-1);
  TORCH_CHECK(w.numel() == n, "rms_norm: weight size ", w.numel(), " != ", n);
  const auto x2 = x.reshape({-1, n}).contiguous();
  const auto wc = w.contiguous();
  auto y = torch::empty_like(x2);
  const float *xp = x2.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x2.size(0), 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) sj::rms_norm_row(xp + r * n, wp, (float)eps, n, yp + r * n);
  });
  return y.view(x.sizes());
}

// act(g) * u for gu [..., 2F] = [gate | up] (SiLU, or GELU-tanh where `gelu`) -> [..., F].
torch::Tensor act_mul(const torch::Tensor& gu, bool gelu) {
  TORCH_CHECK(gu.scalar_type() == torch::kFloat, "act_mul: fp32 only");
  const int64_t F = gu.size(-1) / 2;
  const auto g2 = gu.reshape({-1, 2 * F}).contiguous();
  auto y = out_like(gu, F);
  const float* gp = g2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, g2.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gp + r * 2 * F;
      if (gelu)
        sj::act_mul_row<true>(g, g + F, F, yp + r * F);
      else
        sj::act_mul_row<false>(g, g + F, F, yp + r * F);
    }
  });
  return y;
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

// Rows `ids` of a block-format table as fp32 [n, K] (embedding lookups): exactly `dequantize` on those rows.
torch::Tensor dequantize_rows(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                              bool q4, int64_t bs, const torch::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1, "dequantize_rows: ids must be int64 [n]");
  const int64_t V = qs.size(0);
  const auto idc = ids.contiguous();
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < idc.numel(); ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < V, "token id ", ip[i], " out of range");
  return dequantize(qs.index_select(0, idc), d.index_select(0, idc), m ? c10::optional<torch::Tensor>(m->index_select(0, idc)) : c10::nullopt, q4, bs);
}

bool has_avx2() { return SJ_AVX2; }

// The instruction set the matmuls were compiled for (the bench header names it).
std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx2+avx512vnni";
#elif defined(__AVXVNNI__)
  return "avx2+avxvnni";
#elif SJ_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

// `nbytes` (rounded up to 2 MB) of untouched memory, 2 MB-aligned and advised to the kernel as transparent
// huge pages (madvise) before anything is written: the weights stream through fewer TLB entries. Whether the
// kernel granted huge pages is its choice (`AnonHugePages` in /proc/meminfo); the memory is correct either way.
torch::Tensor huge_empty(int64_t nbytes, bool advise) {
  constexpr size_t align = size_t(2) << 20;
  TORCH_CHECK(nbytes > 0, "huge_empty: ", nbytes, " bytes");
  const size_t n = ((size_t)nbytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, n);
  TORCH_CHECK(p, "huge_empty: cannot allocate ", n, " bytes");
  if (advise) madvise(p, n, MADV_HUGEPAGE);
  return torch::from_blob(p, {(int64_t)n}, [](void* q) { std::free(q); }, torch::kUInt8);
}

// ---- the native step, bound ----

// A weight part from Python: (packed weight, bias or None).
using Part = std::tuple<PW, c10::optional<torch::Tensor>>;

class Native {
 public:
  Native(int64_t dm, int64_t hq, int64_t hkv, int64_t hd, int64_t ffn, double eps, double scale, bool gemma,
         bool gelu, int64_t max_rows)
      : m_(sj::Dims{dm, hq, hkv, hd, ffn, (float)eps, (float)scale, gemma, gelu}, max_rows) {
    TORCH_CHECK(dm % QB == 0 && (hq * hd) % QB == 0 && ffn % QB == 0, "native step: widths must be multiples of 32");
    TORCH_CHECK(hkv > 0 && hq % hkv == 0 && hd % 2 == 0, "native step: bad head layout");
  }

  void add_layer(const std::vector<Part>& qkv, const c10::optional<torch::Tensor>& qkv_bias, const std::vector<Part>& o,
                 const std::vector<Part>& gu, const std::vector<Part>& down, const std::vector<torch::Tensor>& norms,
                 int64_t window, int64_t rope) {
    const sj::Dims& c = m_.dims();
    sj::LayerW L;
    L.qkv = proj(qkv, qkv_bias, c.dm, (c.hq + 2 * c.hkv) * c.hd);
    L.o = proj(o, {}, c.hq * c.hd, c.dm);
    L.gu = proj(gu, {}, c.dm, 2 * c.ffn);
    L.down = proj(down, {}, c.ffn, c.dm);
    TORCH_CHECK(norms.size() == (c.gemma ? 6u : 2u), "native step: wrong number of norms");
    for (size_t i = 0; i < norms.size(); ++i) {
      const int64_t want = c.gemma && i >= 4 ? c.hd : c.dm;
      L.norms.push_back(vec(norms[i], want, "norm"));
    }
    L.window = window;
    L.rope = rope;
    m_.layers.push_back(L);
  }

  void set_head(const std::vector<Part>& head, const torch::Tensor& norm) {
    m_.head = proj(head, {}, m_.dims().dm, -1);
    m_.final_norm = vec(norm, m_.dims().dm, "final norm");
  }

  int64_t vocab() const { return m_.head.N; }

  // Seconds per phase since the last call (profiling on: `profile(True)`), and profiling turned on or off.
  std::vector<std::pair<std::string, double>> profile(bool on) {
    static const char* names[] = {"norms and quantisation", "matmuls", "rope and cache writes", "attention",
                                  "activation", "LM head"};
    std::vector<std::pair<std::string, double>> out;
    for (int i = 0; i < sj::Model::PHASES; ++i) out.emplace_back(names[i], m_.seconds[i]), m_.seconds[i] = 0;
    m_.profiling = on;
    return out;
  }

  // (logits [R, V] or None, each logits row's argmax, whether every logit is finite)
  std::tuple<c10::optional<torch::Tensor>, std::vector<int64_t>, bool> forward(torch::Tensor h, const torch::Tensor& pos, const std::vector<torch::Tensor>& rope,
                                       const std::vector<int64_t>& seg,
                                       const std::vector<c10::optional<torch::Tensor>>& trees,
                                       const std::vector<int64_t>& order, const std::vector<int64_t>& flags,
                                       const std::vector<torch::Tensor>& kv, const std::vector<int64_t>& slots,
                                       const c10::optional<torch::Tensor>& taps, const std::vector<int64_t>& head_rows) {
    const sj::Dims& c = m_.dims();
    TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.dim() == 2 && h.size(1) == c.dm,
                "native step: h must be contiguous fp32 [M, ", c.dm, "]");
    const int64_t M = h.size(0);
    TORCH_CHECK(M >= 1 && M <= m_.max_rows(), "native step: ", M, " rows (1 to ", m_.max_rows(), ")");
    TORCH_CHECK(pos.scalar_type() == torch::kLong && pos.is_contiguous() && pos.numel() == M, "native step: positions");
    std::vector<const float*> ropes;
    for (const auto& t : rope) {
      TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == M * c.hd, "native step: RoPE");
      ropes.push_back(t.data_ptr<float>());
    }
    TORCH_CHECK(!seg.empty() && trees.size() == seg.size(), "native step: segments");
    int64_t rows = 0;
    std::vector<const bool*> tr;
    for (size_t s = 0; s < seg.size(); ++s) {
      TORCH_CHECK(seg[s] >= 1, "native step: an empty segment");
      rows += seg[s];
      const auto& t = trees[s];
      TORCH_CHECK(!t || (t->scalar_type() == torch::kBool && t->is_contiguous() && t->numel() == seg[s] * seg[s]),
                  "native step: a tree mask must be bool [T, T]");
      tr.push_back(t ? t->data_ptr<bool>() : nullptr);
    }
    TORCH_CHECK(rows == M, "native step: segments cover ", rows, " rows of ", M);
    TORCH_CHECK(order.size() == flags.size(), "native step: one flag per layer");
    int64_t nattn = 0, ntap = 0;
    for (size_t i = 0; i < order.size(); ++i) {
      TORCH_CHECK(order[i] >= 0 && order[i] < (int64_t)m_.layers.size(), "native step: no layer ", order[i]);
      TORCH_CHECK(2 * m_.layers[order[i]].rope + 1 < (int64_t)ropes.size(), "native step: missing RoPE tables");
      nattn += flags[i] & 1;
      ntap += (flags[i] >> 2) & 1;
    }
    const int64_t S = (int64_t)seg.size();
    TORCH_CHECK((int64_t)kv.size() == 2 * nattn * S && (int64_t)slots.size() == 2 * nattn * S, "native step: caches");
    std::vector<sj::Slot> sl;
    for (int64_t i = 0; i < nattn * S; ++i) {
      const auto &k = kv[2 * i], &v = kv[2 * i + 1];
      for (const auto* t : {&k, &v})
        TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == 1 &&
                        t->size(1) == c.hkv && t->size(3) == c.hd && t->sizes() == k.sizes(),
                    "native step: a cache layer must be contiguous fp32 [1, ", c.hkv, ", C, ", c.hd, "]");
      const int64_t a = slots[2 * i], C = k.size(2);
      TORCH_CHECK(a >= 0 && a + seg[i % S] <= C, "native step: cache slot ", a, " out of ", C);
      sl.push_back(sj::Slot{k.data_ptr<float>(), v.data_ptr<float>(), C, a, slots[2 * i + 1]});
    }
    float* tp = nullptr;
    if (ntap) {
      TORCH_CHECK(taps && taps->scalar_type() == torch::kFloat && taps->is_contiguous() &&
                      taps->numel() == ntap * M * c.dm,
                  "native step: taps must be fp32 [", ntap, ", M, dm]");
      tp = taps->data_ptr<float>();
    }
    c10::optional<torch::Tensor> logits;
    float* lp = nullptr;
    if (!head_rows.empty()) {
      TORCH_CHECK(m_.final_norm, "native step: no LM head");
      TORCH_CHECK((int64_t)head_rows.size() <= m_.max_rows(), "native step: too many logits rows");
      for (int64_t r : head_rows) TORCH_CHECK(r >= 0 && r < M, "native step: logits row ", r);
      logits = torch::empty({(int64_t)head_rows.size(), m_.head.N}, torch::kFloat);
      lp = logits->data_ptr<float>();
    }
    std::vector<int64_t> argmax(head_rows.size(), -1);
    bool finite = true;
    m_.forward(h.data_ptr<float>(), M, pos.data_ptr<int64_t>(), ropes, seg, tr, order, flags, sl, tp, head_rows, lp,
               argmax.data(), &finite);
    return {logits, argmax, finite};
  }

 private:
  const float* vec(const torch::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == n, "native step: ", what);
    keep_.push_back(t);
    return t.data_ptr<float>();
  }

  sj::Proj proj(const std::vector<Part>& parts, const c10::optional<torch::Tensor>& bias, int64_t K, int64_t N) {
    sj::Proj p;
    p.K = K;
    for (const auto& [pw, b] : parts) {
      const sj::QW w = qw(pw, b, &keep_);
      TORCH_CHECK(w.K == K, "native step: weight width ", w.K, " != ", K);
      p.parts.push_back(w);
      p.offs.push_back(p.N);
      p.N += w.N;
    }
    TORCH_CHECK(!parts.empty() && (N < 0 || p.N == N), "native step: projection width ", p.N, " != ", N);
    if (bias) p.bias = vec(*bias, p.N, "bias");
    return p;
  }

  sj::Model m_;
  std::vector<torch::Tensor> keep_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("linear", &linear, "y = x W^T (+ b), W packed in 8-row tiles, x quantised to 8 bits per row block");
  mod.def("unpack", &unpack, "a packed weight as fp32 [N, K], exactly");
  mod.def("unpack_rows", &unpack_rows, "rows ids of a packed weight as fp32 [n, K], exactly");
  mod.def("attention", &attention, "batch-invariant attention over the visible keys");
  mod.def("rms_norm", &rms_norm, "RMSNorm over the last dim, row by row");
  mod.def("act_mul", &act_mul, "SiLU(g) * u or GELU-tanh(g) * u for [g | u]");
  mod.def("dequantize", &dequantize, "w = d * q (+ m) as fp32");
  mod.def("dequantize_rows", &dequantize_rows, "rows ids of w = d * q (+ m) as fp32");
  mod.def("has_avx2", &has_avx2, "whether the AVX2 paths were compiled in");
  mod.def("isa", &isa, "the instruction set the matmuls were compiled for");
  mod.def("huge_empty", &huge_empty, "2 MB-aligned memory advised as huge pages, untouched");
  pybind11::class_<Native>(mod, "Native")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool, bool, int64_t>())
      .def("add_layer", &Native::add_layer)
      .def("set_head", &Native::set_head)
      .def_property_readonly("vocab", &Native::vocab)
      .def("profile", &Native::profile)
      .def("forward", &Native::forward);
}
