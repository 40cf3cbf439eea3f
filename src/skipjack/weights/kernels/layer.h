// The native decoding step: whole decoder layers, and whole passes (layers, final norm, LM head), in one call.
//
// llama2.c's `forward` on skipjack's block formats: per layer, the input norm, the fused QKV matmul (+ bias),
// Gemma's q/k norms, RoPE from the caller's tables, the new keys and values written into the layer's cache
// slots, attention over each query's visible keys (causal or a token tree, a sliding window), the output
// projection and residual (Gemma: a post-norm first), the FFN norm, the fused gate/up matmul, SiLU or
// GELU-tanh, the down projection and residual. One OpenMP parallel region per call; threads meet at a barrier
// between phases (rows for the row-wise work, columns for the matmuls, (row, head) pairs for attention).
//
// Invariance rule: every piece is the function the Python reference calls one op at a time (`matmul.h`,
// `attention.h`, `elementwise.h`), applied to each row alone; how rows, columns and heads are split among
// threads never changes a value. So this call gives the Python forward's bits, and a token's bits do not
// depend on the other tokens in the pass. Python owns control (which layers run, skips, exits, taps, caches'
// bookkeeping); this owns the arithmetic, with scratch buffers sized once, at construction, for `max_rows`.
#pragma once

#include <omp.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "attention.h"
#include "elementwise.h"
#include "matmul.h"

namespace sj {

// A projection: one block-format weight, or parts side by side along N (their outputs concatenated, then
// the bias added: what the Python `ConcatLinear` computes).
struct Proj {
  std::vector<QW> parts;
  std::vector<int64_t> offs;
  const float* bias = nullptr;  // after concatenation (parts > 1); a single part carries its own
  int64_t N = 0, K = 0;
};

inline void proj_cols(const Acts& a, const Proj& p, int64_t M, int tid, int nt, float* y) {
  for (size_t i = 0; i < p.parts.size(); ++i) {
    int64_t lo, hi;
    split(p.parts[i].N, nt, tid, 16, lo, hi);
    matmul_cols(a, p.parts[i], M, lo, hi, y + p.offs[i], p.N);
  }
}

struct LayerW {
  Proj qkv, o, gu, down;
  // llama: attn_norm, ffn_norm; gemma: attn_pre, attn_post, ffn_pre, ffn_post, q_norm, k_norm
  std::vector<const float*> norms;
  int64_t window = -1;  // sliding window, or -1
  int64_t rope = 0;     // which RoPE table pair the caller passes for this layer
};

// A pass whose layers stream fewer weight bytes (times rows) than this runs on one thread: its barriers would
// cost more than the second thread saves.
constexpr int64_t MIN_PARALLEL_BYTES = 1 << 18;

// Per (attention layer, segment): the layer's cache buffers [1, Hkv, C, D] and where this pass writes.
struct Slot {
  float* k;
  float* v;
  int64_t C;      // slots in the buffer
  int64_t a;      // slot of the segment's first new key (slots 0..a-1 hold the past keys)
  int64_t first;  // absolute position of slot 0
};

struct Dims {
  int64_t dm, hq, hkv, hd, ffn;
  float eps, scale;
  bool gemma, gelu;
};

class Model {
 public:
  Model(Dims dims, int64_t max_rows) : c_(dims), R_(max_rows) {
    kmax_ = std::max({c_.dm, c_.hq * c_.hd, c_.ffn});
    x_.resize(R_ * kmax_);
    aq_.resize(R_ * kmax_);
    ad_.resize(R_ * kmax_ / QB);
    as_.resize(R_ * kmax_ / QB);
    qkv_.resize(R_ * (c_.hq + 2 * c_.hkv) * c_.hd);
    o_.resize(R_ * c_.hq * c_.hd);
    y_.resize(R_ * c_.dm);
    gu_.resize(R_ * 2 * c_.ffn);
    act_.resize(R_ * c_.ffn);
  }

  std::vector<LayerW> layers;
  Proj head;
  const float* final_norm = nullptr;

  // Where a pass's time goes, per phase (thread 0's wall time between barriers), when `profiling`.
  enum Phase { NORM, MATMUL, ROPE, ATTENTION, ACTIVATION, HEAD, PHASES };
  bool profiling = false;
  double seconds[PHASES] = {0};

  const Dims& dims() const { return c_; }
  int64_t max_rows() const { return R_; }

  // One pass over `order` (layer indices; flags per entry: 1 attention, 2 FFN, 4 tap the output into `taps`),
  // on h [M, dm] in place; rows in segments (`seg`: rows each, `tree`: [n, n] ancestor-or-self or null for
  // causal), `pos` [M] absolute positions, `rope` [2 * kinds] tables [M, hd]; `slots` per (attention layer,
  // segment); then the final norm and LM head over `head_rows` into `logits` [R, V] (none when empty), each
  // row's argmax into `argmax` [R] and whether all logits are finite into `finite`.
  void forward(float* h, int64_t M, const int64_t* pos, const std::vector<const float*>& rope,
               const std::vector<int64_t>& seg, const std::vector<const bool*>& tree,
               const std::vector<int64_t>& order, const std::vector<int64_t>& flags, const std::vector<Slot>& slots,
               float* taps, const std::vector<int64_t>& head_rows, float* logits, int64_t* argmax, bool* finite) {
    const int64_t S = (int64_t)seg.size(), dm = c_.dm, hd = c_.hd, hq = c_.hq, hkv = c_.hkv, G = hq / hkv;
    const int64_t nqkv = (hq + 2 * hkv) * hd;
    std::vector<int64_t> seg_of(M), row0(S + 1, 0);
    for (int64_t s = 0; s < S; ++s) {
      row0[s + 1] = row0[s] + seg[s];
      for (int64_t r = row0[s]; r < row0[s + 1]; ++r) seg_of[r] = s;
    }
    int64_t most = 1;  // the most keys a query may see
    for (const Slot& sl : slots) most = std::max(most, sl.a + M);
    idx_.resize(M * most);
    nvis_.resize(M);
    // Threads: as many as torch uses, but one where a pass is too small to pay for the barriers (tiny models)
    int64_t bytes = 0;
    for (const Proj* p : {&layers[0].qkv, &layers[0].o, &layers[0].gu, &layers[0].down})
      for (const QW& w : p->parts) bytes += w.bytes();
    const int most_threads = std::max(1, std::min<int>(at::get_num_threads(), omp_get_max_threads()));
    const int nt = bytes * M < MIN_PARALLEL_BYTES ? 1 : most_threads;
    p_.resize(nt);
    share_.resize(nt * head_rows.size());
    *finite = true;
    for (auto& p : p_) p.resize(most);
    const Acts A{aq_.data(), ad_.data(), as_.data(), 0};

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), T = omp_get_num_threads();
      int64_t r0, r1;
      split(M, T, tid, 1, r0, r1);
      auto acts = [&](int64_t K) { return Acts{A.q, A.d, A.s, K}; };
      using clock = std::chrono::steady_clock;
      auto last = clock::now();
      auto mark = [&](Phase ph) {  // the time since the last mark went to `ph`
        if (!profiling || tid != 0) return;
        const auto now = clock::now();
        seconds[ph] += std::chrono::duration<double>(now - last).count();
        last = now;
      };
      // this thread's rows of `in` [M, K] quantised; then `p` over every row into `out`, and its bias (the
      // quantising counts as phase `before`)
      auto project = [&](const float* in, int64_t K, const Proj& p, float* out, Phase before) {
        quantize_rows(in, r0, r1, acts(K));
#pragma omp barrier
        mark(before);
        proj_cols(acts(K), p, M, tid, T, out);
#pragma omp barrier
        mark(MATMUL);
        if (p.bias) add_bias(r0, r1, p, out);
      };
      int64_t ai = 0;  // attention layers seen (index into slots)
      int64_t tap = 0;
      for (size_t li = 0; li < order.size(); ++li) {
        const LayerW& L = layers[order[li]];
        const bool gem = c_.gemma;
        if (flags[li] & 1) {
          // input norm, quantised
          for (int64_t r = r0; r < r1; ++r) rms_norm_row(h + r * dm, L.norms[0], c_.eps, dm, x_.data() + r * dm);
          project(x_.data(), dm, L.qkv, qkv_.data(), NORM);
          // q/k norms (Gemma), RoPE, the new keys and values into the cache, each row's visible slots
          const float* cos = rope[2 * L.rope];
          const float* sin = rope[2 * L.rope + 1];
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t s = seg_of[r], t = r - row0[s];
            const Slot& sl = slots[ai * S + s];
            float* row = qkv_.data() + r * nqkv;
            for (int64_t hh = 0; hh < hq + hkv; ++hh) {
              float* x = row + hh * hd;
              if (gem) rms_norm_row(x, hh < hq ? L.norms[4] : L.norms[5], c_.eps, hd, x);
              rope_head(x, cos + r * hd, sin + r * hd, hd);
            }
            for (int64_t g = 0; g < hkv; ++g) {
              std::memcpy(sl.k + (g * sl.C + sl.a + t) * hd, row + (hq + g) * hd, hd * sizeof(float));
              std::memcpy(sl.v + (g * sl.C + sl.a + t) * hd, row + (hq + hkv + g) * hd, hd * sizeof(float));
            }
            visible(r, t, seg[s], sl, pos + row0[s], tree[s], L.window, most);
          }
#pragma omp barrier
          mark(ROPE);
          // attention: (row, query head) pairs
          {
            int64_t i0, i1;
            split(M * hq, T, tid, 1, i0, i1);
            float* p = p_[tid].data();
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t r = i / hq, hh = i % hq, g = hh / G;
              const Slot& sl = slots[ai * S + seg_of[r]];
              attend_row(qkv_.data() + r * nqkv + hh * hd, sl.k + g * sl.C * hd, hd, sl.v + g * sl.C * hd, hd,
                         idx_.data() + r * most, nvis_[r], hd, c_.scale, p, o_.data() + r * hq * hd + hh * hd);
            }
          }
#pragma omp barrier
          mark(ATTENTION);
          project(o_.data(), hq * hd, L.o, y_.data(), NORM);
          residual(r0, r1, h, gem ? L.norms[1] : nullptr);
          ++ai;
        }
        if (flags[li] & 2) {
          const float* pre = L.norms[gem ? 2 : 1];
          for (int64_t r = r0; r < r1; ++r) rms_norm_row(h + r * dm, pre, c_.eps, dm, x_.data() + r * dm);
          project(x_.data(), dm, L.gu, gu_.data(), NORM);
          const int64_t F = c_.ffn;
          for (int64_t r = r0; r < r1; ++r) {
            const float* g = gu_.data() + r * 2 * F;
            if (c_.gelu)
              act_mul_row<true>(g, g + F, F, act_.data() + r * F);
            else
              act_mul_row<false>(g, g + F, F, act_.data() + r * F);
          }
          project(act_.data(), F, L.down, y_.data(), ACTIVATION);
          residual(r0, r1, h, gem ? L.norms[3] : nullptr);
        }
        if (flags[li] & 4) {
          for (int64_t r = r0; r < r1; ++r) std::memcpy(taps + (tap * M + r) * dm, h + r * dm, dm * sizeof(float));
          ++tap;
        }
#pragma omp barrier
      mark(NORM);
      }
      const int64_t R = (int64_t)head_rows.size();
      if (R) {
        int64_t q0, q1;
        split(R, T, tid, 1, q0, q1);
        for (int64_t i = q0; i < q1; ++i) rms_norm_row(h + head_rows[i] * dm, final_norm, c_.eps, dm, x_.data() + i * dm);
        quantize_rows(x_.data(), q0, q1, acts(dm));
#pragma omp barrier
        mark(NORM);
        proj_cols(acts(dm), head, R, tid, T, logits);
#pragma omp barrier
        mark(HEAD);
        if (head.bias) {
          add_bias(q0, q1, head, logits);
#pragma omp barrier
        }
        // each row's argmax (the first of equal maxima) and whether every logit is finite: a thread scans a
        // share of the columns, thread 0 combines the shares
        int64_t n0, n1;
        split(head.N, T, tid, 16, n0, n1);
        for (int64_t i = 0; i < R; ++i) {
          const float* row = logits + i * head.N;
          float best = -INFINITY;
          int64_t at = -1;
          bool ok = true;
          for (int64_t n = n0; n < n1; ++n) {
            const float v = row[n];
            ok = ok && std::isfinite(v);
            if (v > best || at < 0) best = v, at = n;
          }
          share_[tid * R + i] = {best, at, ok};
        }
#pragma omp barrier
        if (tid == 0)
          for (int64_t i = 0; i < R; ++i) {
            Best b{-INFINITY, -1, true};
            for (int t = 0; t < T; ++t) {
              const Best& s = share_[t * R + i];
              b.ok = b.ok && s.ok;
              if (s.at >= 0 && (b.at < 0 || s.v > b.v || (s.v == b.v && s.at < b.at))) b.v = s.v, b.at = s.at;
            }
            argmax[i] = b.at;
            *finite = *finite && b.ok;
          }
      }
    }
  }

 private:
  // a concatenated projection's bias, after its parts (rows r0..r1 of y [*, N])
  static void add_bias(int64_t r0, int64_t r1, const Proj& p, float* y) {
    if (p.parts.size() < 2) return;  // a single part added it inside its tiles
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t n = 0; n < p.N; ++n) y[r * p.N + n] = y[r * p.N + n] + p.bias[n];
  }

  // h += y (Gemma: h += norm(y)), rows r0..r1
  void residual(int64_t r0, int64_t r1, float* h, const float* post) {
    for (int64_t r = r0; r < r1; ++r) {
      float* y = y_.data() + r * c_.dm;
      if (post) rms_norm_row(y, post, c_.eps, c_.dm, y);
      float* hr = h + r * c_.dm;
      for (int64_t e = 0; e < c_.dm; ++e) hr[e] = hr[e] + y[e];
    }
  }

  // The slots query t (row r) of a segment of n rows sees, in slot order: past slots 0..a-1 at positions
  // first.., then the new keys (tree or causal), each within the window if the layer slides.
  void visible(int64_t r, int64_t t, int64_t n, const Slot& sl, const int64_t* spos, const bool* tr, int64_t window,
               int64_t most) {
    int32_t* idx = idx_.data() + r * most;
    const int64_t qp = spos[t];
    int64_t k = 0;
    for (int64_t j = 0; j < sl.a; ++j)
      if (window < 0 || qp - (sl.first + j) < window) idx[k++] = (int32_t)j;
    for (int64_t j = 0; j < n; ++j) {
      const bool anc = tr ? tr[t * n + j] : j <= t;
      if (anc && (window < 0 || qp - spos[j] < window)) idx[k++] = (int32_t)(sl.a + j);
    }
    nvis_[r] = k;
  }

  Dims c_;
  int64_t R_, kmax_;
  std::vector<float> x_, ad_, as_, qkv_, o_, y_, gu_, act_;
  std::vector<int8_t> aq_;
  std::vector<int32_t> idx_;
  std::vector<int64_t> nvis_;
  std::vector<std::vector<float>> p_;
  struct Best {
    float v;
    int64_t at;
    bool ok;
  };
  std::vector<Best> share_;
};

}  // namespace sj
