// Soft-capped exact attention on the CPU, forward and backward, in O(N) memory.
//
// score' = cap * tanh(scale * q.k / cap); P = softmax(score') over the allowed keys; O = P V.
// The schedule is FlashAttention's (and PyTorch's own CPU flash kernel's,
// aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): the forward walks blocks of BQ query rows
// against blocks of BK keys with an online softmax, the backward recomputes each block's scores
// from the saved log-sum-exp, and nothing of size N x N is ever stored. What the aten kernel
// cannot do, and this one adds, is the soft cap between the product and the softmax, with its
// derivative 1 - tanh^2 in the backward: the elementwise work happens on a block while it is
// in cache, between the products, instead of in separate passes over a large tile.
//
// Layout: q (B, Hq, M, D), k and v (B, Hkv, N, D), each with unit stride in D; Hq a multiple of
// Hkv (GQA: query head h reads key head h / (Hq / Hkv)). The mask is a window, as attnmem's
// SlidingWindow: key j is allowed for query row i iff -left <= j - (i + offset) <= right (causal:
// left unbounded, right 0, offset N - M; no mask: both unbounded). Blocks of keys outside a query
// block's window are never computed. Key padding (key_valid, attnmem's key_padding) removes keys
// from every row of a batch. Outputs are
// contiguous, in the inputs' dtype (float32 or float64, which is also the accumulation dtype).
// The products are BLAS calls (MKL's sgemm_/dgemm_, which libtorch_cpu exports), one thread
// each inside at::parallel_for, as in the aten kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

#ifndef ATTNMEM_BQ
#define ATTNMEM_BQ 64
#endif
#ifndef ATTNMEM_BK
#define ATTNMEM_BK 256
#endif
constexpr int64_t BQ = ATTNMEM_BQ;  // query rows per block
constexpr int64_t BK = ATTNMEM_BK;  // keys per block (64 x 256 measured best of 32-128 x 128-1024 at N = 8192)

// Row-major C (m x n) = alpha * op(A) op(B) + beta * C, where op(X) is X or X^T ('T').
// Column-major BLAS sees the row-major C as C^T, so it computes op(B)^T op(A)^T.
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  sgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  int M = int(m), N = int(n), K = int(k), LDA = int(lda), LDB = int(ldb), LDC = int(ldc);
  dgemm_(&tb, &ta, &N, &M, &K, &alpha, b, &LDB, a, &LDA, &beta, c, &LDC);
}

// --- exp and tanh that the compiler vectorises (float); the C library's for double ----------
// expf: Cephes' range reduction x = n ln2 + r, |r| <= ln2 / 2, and its degree-6 polynomial
// (relative error about 1 ulp); exactly 0 below -87.3 (where e^x is subnormal or 0).
inline float exp_f(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = std::min(std::max(x, lo), hi);
  float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.0f : p * scale;
}
// tanhf: Cephes' odd polynomial below |x| = 0.625, else 1 - 2 / (e^{2|x|} + 1) with x's sign.
inline float tanh_f(float x) {
  float ax = std::fabs(x);
  float z = x * x;
  float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
                 3.33332819422e-1f) * z * x + x;
  float e = exp_f(std::min(2.0f * ax, 88.0f));
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0 ? -big : big;
  return ax < 0.625f ? small : big;
}
inline float exp_t(float x) { return exp_f(x); }
inline float tanh_t(float x) { return tanh_f(x); }
inline double exp_t(double x) { return std::exp(x); }
inline double tanh_t(double x) { return std::tanh(x); }

template <typename T>
struct Geometry {
  int64_t B, Hq, Hkv, G, M, N, D;
  int64_t qb, qh, qm, qd, kb, kh, kn, vb, vh, vn;  // strides (elements)
};

template <typename T>
Geometry<T> geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  Geometry<T> g;
  g.B = q.size(0), g.Hq = q.size(1), g.M = q.size(2), g.D = q.size(3);
  g.Hkv = k.size(1), g.N = k.size(2), g.G = g.Hq / g.Hkv;
  g.qb = q.stride(0), g.qh = q.stride(1), g.qm = q.stride(2), g.qd = q.stride(3);
  g.kb = k.stride(0), g.kh = k.stride(1), g.kn = k.stride(2);
  g.vb = v.stride(0), g.vh = v.stride(1), g.vn = v.stride(2);
  return g;
}

// The window: key j is allowed for row i iff lo(i) <= j <= hi(i), lo(i) = i + offset - left,
// hi(i) = i + offset + right. Bounds are saturated so that "unbounded" (a huge left or right)
// cannot overflow.
struct Window {
  int64_t left, right, offset, N;
  const uint8_t* valid = nullptr;  // key padding: (Bm, N) flags, 1 = a real key; nullptr: none
  int64_t valid_bs = 0;            // its batch stride (0 when one row serves every batch)
  // The flags of batch b's keys from j0 on, or nullptr without key padding.
  const uint8_t* keys(int64_t b, int64_t j0) const { return valid ? valid + b * valid_bs + j0 : nullptr; }
  int64_t lo(int64_t i) const { return std::max<int64_t>(0, i + offset - left); }
  int64_t hi(int64_t i) const { return std::min<int64_t>(N - 1, i + offset + right); }  // may be < lo
  // Allowed keys [a, b) of row i within the key block [j0, j0 + nb), relative to j0 (a >= b: none).
  void in_block(int64_t i, int64_t j0, int64_t nb, int64_t& a, int64_t& b) const {
    a = std::min<int64_t>(nb, std::max<int64_t>(0, lo(i) - j0));
    b = std::max<int64_t>(a, std::min<int64_t>(nb, hi(i) - j0 + 1));
  }
};

// f(j0, nb) for each block of at most BK keys that some row of the query block [r0, r0 + mb)
// sees: from the first row's lo to the last row's hi (both grow with the row).
template <typename F>
inline void for_key_blocks(const Window& w, int64_t r0, int64_t mb, F&& f) {
  const int64_t kbeg = w.lo(r0), kend = w.hi(r0 + mb - 1) + 1;
  for (int64_t j0 = kbeg; j0 < kend; j0 += BK) f(j0, std::min(BK, kend - j0));
}

// One block of scores: out (mb x nb, row stride BK) = qs K[j0 : j0 + nb]^T, then
// f(i, row i, [ja, jb) its allowed keys relative to j0, key padding flags from j0 or nullptr).
template <typename T, typename F>
inline void score_rows(const Window& w, int64_t b, int64_t r0, int64_t mb, int64_t j0, int64_t nb, int64_t D,
                       const T* qs, const T* k0, int64_t kn, T* out, F&& f) {
  gemm('N', 'T', mb, nb, D, T(1), qs, D, k0 + j0 * kn, kn, T(0), out, BK);
  const uint8_t* kv = w.keys(b, j0);
  for (int64_t i = 0; i < mb; ++i) {
    int64_t ja, jb;
    w.in_block(r0 + i, j0, nb, ja, jb);
    f(i, out + i * BK, ja, jb, kv);
  }
}

inline int64_t clamp_bound(int64_t x, int64_t cap) { return std::max<int64_t>(-cap, std::min<int64_t>(x, cap)); }

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double cap,
                  const Window& w, at::Tensor& out, at::Tensor& lse) {
  const auto g = geometry<T>(q, k, v);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  T* L = lse.data_ptr<T>();
  const int64_t D = g.D, nqb = (g.M + BQ - 1) / BQ;
  const T qscale = T(scale / cap), tcap = T(cap);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, g.B * g.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qs(BQ * D), s(BQ * BK), acc(BQ * D), mx(BQ), sum(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ib = task % nqb, h = (task / nqb) % g.Hq, b = task / (nqb * g.Hq);
      const int64_t r0 = ib * BQ, mb = std::min(BQ, g.M - r0), hk = h / g.G;
      const T* q0 = Q + b * g.qb + h * g.qh + r0 * g.qm;
      const T* k0 = K + b * g.kb + hk * g.kh;
      const T* v0 = V + b * g.vb + hk * g.vh;
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t d = 0; d < D; ++d) qs[i * D + d] = q0[i * g.qm + d * g.qd] * qscale;
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(mx.begin(), mx.end(), neg_inf);
      std::fill(sum.begin(), sum.end(), T(0));
      for_key_blocks(w, r0, mb, [&](int64_t j0, int64_t nb) {
        score_rows(w, b, r0, mb, j0, nb, D, qs.data(), k0, g.kn, s.data(),
                   [&](int64_t i, T* row, int64_t ja, int64_t jb, const uint8_t* kv) {
          if (ja == jb) {
            std::fill(row, row + nb, T(0));
            return;
          }
          T m = mx[i];
          if (kv) {
#pragma omp simd reduction(max : m)
            for (int64_t j = ja; j < jb; ++j) {
              T t = kv[j] ? tcap * tanh_t(row[j]) : neg_inf;  // padding: exp(-inf) = 0 below
              row[j] = t;
              m = std::max(m, t);
            }
            if (m == neg_inf) {  // no real key for this row yet: nothing to add
              std::fill(row, row + nb, T(0));
              return;
            }
          } else {
#pragma omp simd reduction(max : m)
            for (int64_t j = ja; j < jb; ++j) {
              T t = tcap * tanh_t(row[j]);
              row[j] = t;
              m = std::max(m, t);
            }
          }
          const T alpha = mx[i] == neg_inf ? T(0) : exp_t(mx[i] - m);
          T rs = 0;
#pragma omp simd reduction(+ : rs)
          for (int64_t j = ja; j < jb; ++j) {
            T p = exp_t(row[j] - m);
            row[j] = p;
            rs += p;
          }
          std::fill(row, row + ja, T(0));
          std::fill(row + jb, row + nb, T(0));
          sum[i] = sum[i] * alpha + rs;
          mx[i] = m;
          if (alpha != T(1)) {
            T* a = acc.data() + i * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
        });
        gemm('N', 'N', mb, D, nb, T(1), s.data(), BK, v0 + j0 * g.vn, g.vn, T(1), acc.data(), D);
      });
      T* o0 = O + ((b * g.Hq + h) * g.M + r0) * D;
      T* l0 = L + (b * g.Hq + h) * g.M + r0;
      for (int64_t i = 0; i < mb; ++i) {
        const bool empty = sum[i] == T(0);
        const T inv = empty ? T(0) : T(1) / sum[i];
        for (int64_t d = 0; d < D; ++d) o0[i * D + d] = acc[i * D + d] * inv;
        l0[i] = empty ? neg_inf : mx[i] + std::log(sum[i]);
      }
    }
  });
}

// lse: (B, Hq, M) with +inf on rows that attend to nothing (every P of theirs is then 0).
// delta: (B, Hq, M) replacing rowsum(dO * O), or undefined.
template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& delta, double scale, double cap,
                   const Window& w, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const auto g = geometry<T>(q, k, v);
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  // dO and O (B, Hq, M, D) with any strides (the gradient of a sum is expanded: stride 0): each
  // block's rows are copied into the task's own buffer, so no copy of the whole is ever made.
  const T* dO = dout.data_ptr<T>();
  const T* O = out.data_ptr<T>();
  const int64_t gb = dout.stride(0), gh = dout.stride(1), gm = dout.stride(2), gd = dout.stride(3);
  const int64_t ob = out.stride(0), oh = out.stride(1), om = out.stride(2), od = out.stride(3);
  const T* L = lse.data_ptr<T>();
  const T* Dl = delta.defined() ? delta.data_ptr<T>() : nullptr;
  T* dQ = dq.data_ptr<T>();  // contiguous outputs; dK, dV zeroed, every dQ row written
  T* dK = dk.data_ptr<T>();
  T* dV = dv.data_ptr<T>();
  const int64_t D = g.D, nqb = (g.M + BQ - 1) / BQ;
  const T qscale = T(scale / cap), tcap = T(cap), tscale = T(scale);
  // One task per (batch, key head): it alone writes that head's dK and dV, and its query heads' dQ.
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qs(BQ * D), qr(BQ * D), dob(BQ * D), p(BQ * BK), dp(BQ * BK), gt(BQ * BK), dqa(BQ * D), rowd(BQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % g.Hkv, b = task / g.Hkv;
      const T* k0 = K + b * g.kb + hk * g.kh;
      const T* v0 = V + b * g.vb + hk * g.vh;
      T* dk0 = dK + (b * g.Hkv + hk) * g.N * D;
      T* dv0 = dV + (b * g.Hkv + hk) * g.N * D;
      for (int64_t h = hk * g.G; h < (hk + 1) * g.G; ++h) {
        const int64_t bh = b * g.Hq + h;
        for (int64_t ib = 0; ib < nqb; ++ib) {
          const int64_t r0 = ib * BQ, mb = std::min(BQ, g.M - r0);
          const T* q0 = Q + b * g.qb + h * g.qh + r0 * g.qm;
          const T* do0 = dO + b * gb + h * gh + r0 * gm;
          const T* o0 = O + b * ob + h * oh + r0 * om;
          const T* l0 = L + bh * g.M + r0;
          for (int64_t i = 0; i < mb; ++i) {
            T s = 0;
            for (int64_t d = 0; d < D; ++d) {
              qr[i * D + d] = q0[i * g.qm + d * g.qd];
              qs[i * D + d] = qr[i * D + d] * qscale;
              dob[i * D + d] = do0[i * gm + d * gd];
              if (!Dl) s += do0[i * gm + d * gd] * o0[i * om + d * od];
            }
            rowd[i] = Dl ? Dl[bh * g.M + r0 + i] : s;
          }
          std::fill(dqa.begin(), dqa.end(), T(0));
          for_key_blocks(w, r0, mb, [&](int64_t j0, int64_t nb) {
            score_rows(w, b, r0, mb, j0, nb, D, qs.data(), k0, g.kn, p.data(),
                       [&](int64_t i, T* prow, int64_t ja, int64_t jb, const uint8_t* kv) {
              T* grow = gt.data() + i * BK;
              const T li = l0[i];
#pragma omp simd
              for (int64_t j = ja; j < jb; ++j) {
                T t = tanh_t(prow[j]);
                grow[j] = T(1) - t * t;
                prow[j] = exp_t(tcap * t - li);
              }
              if (kv)
                for (int64_t j = ja; j < jb; ++j) prow[j] = kv[j] ? prow[j] : T(0);
              std::fill(prow, prow + ja, T(0));
              std::fill(grow, grow + ja, T(0));
              std::fill(prow + jb, prow + nb, T(0));
              std::fill(grow + jb, grow + nb, T(0));
            });
            // dV[j0:] += P^T dO
            gemm('T', 'N', nb, D, mb, T(1), p.data(), BK, dob.data(), D, T(1), dv0 + j0 * D, D);
            // dP = dO V^T, then dS = P (dP - D_i) (1 - t^2), in place
            gemm('N', 'T', mb, nb, D, T(1), dob.data(), D, v0 + j0 * g.vn, g.vn, T(0), dp.data(), BK);
            for (int64_t i = 0; i < mb; ++i) {
              T* drow = dp.data() + i * BK;
              const T* prow = p.data() + i * BK;
              const T* grow = gt.data() + i * BK;
              const T di = rowd[i];
#pragma omp simd
              for (int64_t j = 0; j < nb; ++j) drow[j] = prow[j] * (drow[j] - di) * grow[j];
            }
            // dQ += scale dS K, dK[j0:] += scale dS^T q
            gemm('N', 'N', mb, D, nb, tscale, dp.data(), BK, k0 + j0 * g.kn, g.kn, T(1), dqa.data(), D);
            gemm('T', 'N', nb, D, mb, tscale, dp.data(), BK, qr.data(), D, T(1), dk0 + j0 * D, D);
          });
          T* dq0 = dQ + (bh * g.M + r0) * D;
          std::copy(dqa.begin(), dqa.begin() + mb * D, dq0);
        }
      }
    }
  });
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "softcap: q, k, v must be 4-d (B, H, N, D)");
  TORCH_CHECK(q.device().is_cpu(), "softcap: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "softcap: float32 or float64 only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "softcap: one dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && k.sizes() == v.sizes() && q.size(3) == k.size(3),
              "softcap: q (B, Hq, M, D), k and v (B, Hkv, N, D)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "softcap: Hq must be a multiple of Hkv");
  for (const auto* t : {&k, &v})  // read by BLAS in place; q is copied a block of rows at a time
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) >= t->size(3), "softcap: k, v need unit stride in D, rows apart");
}

// left, right: the window's bounds (None: unbounded); offset: N - M for attnmem's bottom-right alignment.
// key_valid: (Bm, N) bool (Bm 1 or B), contiguous, or undefined: attnmem's key_padding.
Window window(const at::Tensor& q, const at::Tensor& k, std::optional<int64_t> left, std::optional<int64_t> right,
              int64_t offset, const std::optional<at::Tensor>& key_valid) {
  const int64_t big = 4 * (q.size(2) + k.size(2)) + 4;  // past any row's reach: unbounded
  Window w{left ? clamp_bound(*left, big) : big, right ? clamp_bound(*right, big) : big,
           clamp_bound(offset, big), k.size(2)};
  if (key_valid.has_value()) {
    const auto& kv = *key_valid;
    TORCH_CHECK(kv.scalar_type() == at::kBool && kv.dim() == 2 && kv.is_contiguous() && kv.device().is_cpu(),
                "softcap: key_valid must be a contiguous (Bm, N) bool CPU tensor");
    TORCH_CHECK(kv.size(1) == k.size(2) && (kv.size(0) == 1 || kv.size(0) == q.size(0)),
                "softcap: key_valid must be (1 or B, N)");
    w.valid = reinterpret_cast<const uint8_t*>(kv.data_ptr<bool>());
    w.valid_bs = kv.size(0) == 1 ? 0 : kv.size(1);
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor> softcap_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               double scale, double cap, std::optional<int64_t> left,
                                               std::optional<int64_t> right, int64_t offset,
                                               const std::optional<at::Tensor>& key_valid) {
  check(q, k, v);
  const Window w = window(q, k, left, right, offset, key_valid);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softcap_fwd",
                             [&] { forward_impl<scalar_t>(q, k, v, scale, cap, w, out, lse); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softcap_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           const std::optional<at::Tensor>& delta, double scale,
                                                           double cap, std::optional<int64_t> left,
                                                           std::optional<int64_t> right, int64_t offset,
                                                           const std::optional<at::Tensor>& key_valid) {
  check(q, k, v);
  const Window w = window(q, k, left, right, offset, key_valid);
  const auto& d_o = dout;
  const auto& o = out;
  auto l = lse.contiguous();
  at::Tensor dl = delta.has_value() ? delta->contiguous() : at::Tensor();
  TORCH_CHECK(d_o.sizes() == q.sizes() && o.sizes() == q.sizes(), "softcap: dout and out shaped as q");
  TORCH_CHECK(d_o.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type() &&
                  l.scalar_type() == q.scalar_type() && (!dl.defined() || dl.scalar_type() == q.scalar_type()),
              "softcap: dout, out, lse and delta in q's dtype");
  TORCH_CHECK(l.dim() == 3 && l.size(0) == q.size(0) && l.size(1) == q.size(1) && l.size(2) == q.size(2),
              "softcap: lse (B, Hq, M)");
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "softcap_bwd", [&] {
    backward_impl<scalar_t>(d_o, q, k, v, o, l, dl, scale, cap, w, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(attnmem_native, m) {
  m.def(
      "softcap_fwd(Tensor q, Tensor k, Tensor v, float scale, float cap, int? left, int? right, int offset, "
      "Tensor? key_valid) -> (Tensor, Tensor)");
  m.def(
      "softcap_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? delta, float scale, "
      "float cap, int? left, int? right, int offset, Tensor? key_valid) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attnmem_native, CPU, m) {
  m.impl("softcap_fwd", &softcap_fwd);
  m.impl("softcap_bwd", &softcap_bwd);
}
