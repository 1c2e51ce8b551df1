"""C++ source of the pooled ILM CPU kernel (:mod:`ilmconvert.nn.cpu_kernel` builds and loads it).

Plain C++17 with no PyTorch headers (it compiles in about a second), called through ``ctypes`` on
raw contiguous buffers. Two entry points per storage type ``T`` (``_f32`` float, ``_f64`` double):

- ``ilm_pooled_forward_T(x, y, moments, weight, bias, w1, w2, w3, B, C, P, G, K, M, eps)``: ``y``
  of eqs. 1-6 for ``x`` of shape ``(B, C, P)``, and the channel means and biased variances as
  ``moments`` ``(B, 2, C)`` double: per instance, the channel moments (two passes), the
  norm-group and key-group statistics (eqs. 1, 3: exact group mean and biased variance from the
  channel moments, Chan's formula for equal counts), the auto-encoder (eqs. 4-5), the alignment
  (eq. 6 with ``weight = B_omega + 1/2``) and one pass ``y = x * a + d``;
- ``ilm_pooled_backward_T(x, dy, moments, dx, g_weight, g_bias, g_w1, g_w2, g_w3, weight, bias,
  w1, w2, w3, B, C, P, G, K, M, eps)``: recomputes the rest of the per-instance statistics from
  the forward's ``moments`` and writes ``dx`` (one pass for ``S0 = sum dy``, ``S1 = sum dy (x -
  M)``, one for ``dx``) and the parameters' gradients (summed over the batch; ``g_bias`` may be NULL).

And for GroupNorm + Proxy Norm (:class:`~ilmconvert.nn.ProxyGroupNormAct`, PN-Act with ReLU, GELU
(exact or tanh) or SiLU, codes 0-3):

- ``proxy_gn_forward_T(x, y, stats, coef, gamma, beta, gamma~, beta~, w_out, b_out, q, B, C, P, G,
  n, act, norm_eps, proxy_eps)``: the proxy's per-channel output map ``(s, t)`` from the ``n``
  points ``q`` (double), then ``y = phi(gamma x_hat + beta) s + t`` per GroupNorm group; each
  group's mean and ``rstd`` go to ``stats`` ``(B, G, 2)``, ``(s, t, m, r)`` (the proxy's mean and
  ``(v + eps)^-1/2``) to ``coef`` ``(4, C)``, both double; ``w_out``, ``b_out`` may be NULL;
- ``proxy_gn_backward_T(x, dy, stats, coef, dx, g_gamma, g_beta, g_gamma~, g_beta~, g_w_out, g_b_out,
  ...)``: two passes per group (the sums, then ``dx``), then the proxy's backward per channel.

For ReLU the proxy's sums are in closed form: the points are sorted, so ReLU is active on one run of
them, found by bisection, and the mean, variance and their gradients follow from prefix sums of
``q`` and ``q^2`` (O(log n) per channel; the variance as a sum of centred terms plus the inactive
points' ``m^2``, clamped at 0, then added to the proxy's eps).

The per-position loops carry ``#pragma omp simd`` (compiled with ``-fopenmp-simd``: vectorized
reductions, no OpenMP runtime).

Everything between the passes is computed in double, whatever ``T``; ``y = x * a + d`` is
evaluated in ``T`` with ``a``, ``d`` rounded to ``T`` (as the PyTorch fast path does).
"""

SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Dims {
  int64_t B, C, P, G, K, M;
  double eps;
  int64_t N() const { return C / K; }
  int64_t Cg() const { return C / G; }
};

// Per-instance workspace (doubles): offsets into one vector.
struct Work {
  std::vector<double> buf;
  std::vector<int64_t> gi, ki;  // each channel's norm group and key group (no division in the loops)
  double *m, *v, *mg, *rstd, *mu, *gam, *emu, *eg, *dmu, *dg, *a, *d;
  explicit Work(const Dims& D) : buf(4 * D.C + 2 * D.G + 4 * D.N() + 2 * D.M), gi(D.C), ki(D.C) {
    for (int64_t c = 0; c < D.C; ++c) {
      gi[c] = c / D.Cg();
      ki[c] = c / D.K;
    }
    double* p = buf.data();
    m = p; p += D.C;
    v = p; p += D.C;
    mg = p; p += D.G;
    rstd = p; p += D.G;
    mu = p; p += D.N();
    gam = p; p += D.N();
    emu = p; p += D.M;
    eg = p; p += D.M;
    dmu = p; p += D.N();
    dg = p; p += D.N();
    a = p; p += D.C;
    d = p;
  }
};

// Mean and biased variance of groups of `size` consecutive channels from the channel moments.
void group_moments(const double* m, const double* v, int64_t C, int64_t size, double* mean, double* var) {
  for (int64_t g = 0; g < C / size; ++g) {
    double s = 0.0;
    for (int64_t c = g * size; c < (g + 1) * size; ++c) s += m[c];
    const double mean_g = s / size;
    double q = 0.0;
    for (int64_t c = g * size; c < (g + 1) * size; ++c) q += v[c] + (m[c] - mean_g) * (m[c] - mean_g);
    mean[g] = mean_g;
    var[g] = q / size;
  }
}

// Mean and biased variance of each channel of one instance (two passes; the channel is in cache).
template <typename T>
void channel_moments(const T* xb, int64_t C, int64_t P, double* m, double* v) {
  if (P == 1) {  // one position (the last stage of a small-image network): no loops to set up
    for (int64_t c = 0; c < C; ++c) {
      m[c] = xb[c];
      v[c] = 0.0;
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = xb + c * P;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t p = 0; p < P; ++p) s += xc[p];
    const double mean = s / P;
    double q = 0.0;
#pragma omp simd reduction(+ : q)
    for (int64_t p = 0; p < P; ++p) q += (xc[p] - mean) * (xc[p] - mean);
    m[c] = mean;
    v[c] = q / P;
  }
}

// Eqs. 1-6 for one instance from its channel moments W.m, W.v: everything up to y = x * a + d.
template <typename T>
void instance_forward(const Dims& D, const T* w, const T* bias, const T* w1, const T* w2, const T* w3, Work& W) {
  const int64_t C = D.C, N = D.N(), M = D.M, K = D.K, Cg = D.Cg();
  group_moments(W.m, W.v, C, Cg, W.mg, W.rstd);  // eq. 1 (rstd holds the variance for now)
  for (int64_t g = 0; g < D.G; ++g) W.rstd[g] = 1.0 / std::sqrt(W.rstd[g] + D.eps);
  group_moments(W.m, W.v, C, K, W.mu, W.gam);  // eq. 3
  for (int64_t j = 0; j < M; ++j) {  // eq. 4, W1 is (M, N)
    double s_mu = 0.0, s_g = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      s_mu += w1[j * N + n] * W.mu[n];
      s_g += w1[j * N + n] * W.gam[n];
    }
    W.emu[j] = s_mu > 0.0 ? s_mu : 0.0;
    W.eg[j] = s_g > 0.0 ? s_g : 0.0;
  }
  for (int64_t n = 0; n < N; ++n) {  // eq. 5, W2 and W3 are (N, M)
    double s_mu = 0.0, s_g = 0.0;
    for (int64_t j = 0; j < M; ++j) {
      s_mu += w2[n * M + j] * W.emu[j];
      s_g += w3[n * M + j] * W.eg[j];
    }
    W.dmu[n] = std::tanh(s_mu);
    W.dg[n] = 1.0 / (1.0 + std::exp(-s_g));
  }
  for (int64_t c = 0; c < C; ++c) {  // eq. 6: omega = D_gamma - 1/2 + weight, beta = D_mu + bias
    const double omega = W.dg[W.ki[c]] - 0.5 + w[c];
    const double beta = W.dmu[W.ki[c]] + (bias ? static_cast<double>(bias[c]) : 0.0);
    W.a[c] = omega * W.rstd[W.gi[c]];
    W.d[c] = beta - W.mg[W.gi[c]] * W.a[c];
  }
}

template <typename T>
void pooled_forward(const T* x, T* y, double* moments, const T* w, const T* bias, const T* w1, const T* w2,
                    const T* w3, const Dims& D) {
  Work W(D);
  for (int64_t b = 0; b < D.B; ++b) {
    const T* xb = x + b * D.C * D.P;
    T* yb = y + b * D.C * D.P;
    channel_moments(xb, D.C, D.P, W.m, W.v);
    instance_forward(D, w, bias, w1, w2, w3, W);
    for (int64_t c = 0; c < D.C; ++c) {
      const T a = static_cast<T>(W.a[c]), d = static_cast<T>(W.d[c]);
      const T* xc = xb + c * D.P;
      T* yc = yb + c * D.P;
#pragma omp simd
      for (int64_t p = 0; p < D.P; ++p) yc[p] = xc[p] * a + d;
      moments[(b * 2) * D.C + c] = W.m[c];
      moments[(b * 2 + 1) * D.C + c] = W.v[c];
    }
  }
}

template <typename T>
void pooled_backward(const T* x, const T* dy, const double* moments, T* dx, T* gw, T* gb, T* gw1, T* gw2,
                     T* gw3, const T* w, const T* bias, const T* w1, const T* w2, const T* w3, const Dims& D) {
  const int64_t C = D.C, P = D.P, N = D.N(), M = D.M, K = D.K, G = D.G, Cg = D.Cg();
  const double inv_cg = 1.0 / Cg, inv_k = 1.0 / K;
  Work W(D);
  std::vector<double> acc(2 * C + 3 * M * N, 0.0);  // sums over the batch: weight, bias, W1, W2, W3
  double *aw = acc.data(), *ab = aw + C, *aw1 = ab + C, *aw2 = aw1 + M * N, *aw3 = aw2 + N * M;
  std::vector<double> tmp(2 * C + 2 * G + 6 * N + 2 * M);
  double *s0 = tmp.data(), *s1 = s0 + C, *d_mg = s1 + C, *d_var = d_mg + G;
  double *d_dmu = d_var + G, *d_dg = d_dmu + N, *g_mu = d_dg + N, *g_gam = g_mu + N;
  double *z_mu = g_gam + N, *z_g = z_mu + N, *h_mu = z_g + N, *h_g = h_mu + M;
  for (int64_t b = 0; b < D.B; ++b) {
    const int64_t off = b * C * P;
    for (int64_t c = 0; c < C; ++c) {
      W.m[c] = moments[(b * 2) * C + c];
      W.v[c] = moments[(b * 2 + 1) * C + c];
    }
    instance_forward(D, w, bias, w1, w2, w3, W);
    for (int64_t c = 0; c < C; ++c) {  // S0 = sum dy, S1 = sum dy (x - M) = dL/da
      const T* xc = x + off + c * P;
      const T* dyc = dy + off + c * P;
      const double mg = W.mg[W.gi[c]];
      double a0 = 0.0, a1 = 0.0;
#pragma omp simd reduction(+ : a0, a1)
      for (int64_t p = 0; p < P; ++p) {
        a0 += dyc[p];
        a1 += dyc[p] * (xc[p] - mg);
      }
      s0[c] = a0;
      s1[c] = a1;
    }
    // y = (x - M) a + beta, a = omega rstd: dL/dbeta = S0, dL/domega = S1 rstd, dL/dM = -sum a S0
    for (int64_t g = 0; g < G; ++g) d_mg[g] = d_var[g] = 0.0;
    for (int64_t n = 0; n < N; ++n) d_dmu[n] = d_dg[n] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = W.gi[c], n = W.ki[c];
      const double omega = W.dg[n] - 0.5 + w[c];
      const double d_omega = s1[c] * W.rstd[g];
      aw[c] += d_omega;
      ab[c] += s0[c];
      d_dg[n] += d_omega;
      d_dmu[n] += s0[c];
      d_mg[g] -= W.a[c] * s0[c];
      d_var[g] += s1[c] * omega;  // dL/drstd for now
    }
    for (int64_t g = 0; g < G; ++g) d_var[g] *= -0.5 * W.rstd[g] * W.rstd[g] * W.rstd[g];
    for (int64_t n = 0; n < N; ++n) {  // tanh' = 1 - t^2, sigmoid' = s (1 - s)
      z_mu[n] = d_dmu[n] * (1.0 - W.dmu[n] * W.dmu[n]);
      z_g[n] = d_dg[n] * W.dg[n] * (1.0 - W.dg[n]);
    }
    for (int64_t j = 0; j < M; ++j) {
      double s_mu = 0.0, s_g = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        aw2[n * M + j] += z_mu[n] * W.emu[j];
        aw3[n * M + j] += z_g[n] * W.eg[j];
        s_mu += w2[n * M + j] * z_mu[n];
        s_g += w3[n * M + j] * z_g[n];
      }
      h_mu[j] = W.emu[j] > 0.0 ? s_mu : 0.0;  // relu'
      h_g[j] = W.eg[j] > 0.0 ? s_g : 0.0;
    }
    for (int64_t n = 0; n < N; ++n) {
      double s_mu = 0.0, s_g = 0.0;
      for (int64_t j = 0; j < M; ++j) {
        aw1[j * N + n] += h_mu[j] * W.mu[n] + h_g[j] * W.gam[n];
        s_mu += w1[j * N + n] * h_mu[j];
        s_g += w1[j * N + n] * h_g[j];
      }
      g_mu[n] = s_mu;
      g_gam[n] = s_g;
    }
    // through the group statistics to the channel moments, then dm/dx = 1/P, dv/dx = 2 (x - m) / P
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = W.gi[c], n = W.ki[c];
      const double gm = (d_mg[g] + d_var[g] * 2.0 * (W.m[c] - W.mg[g])) * inv_cg +
                        (g_mu[n] + g_gam[n] * 2.0 * (W.m[c] - W.mu[n])) * inv_k;
      const double gv = d_var[g] * inv_cg + g_gam[n] * inv_k;
      const double e = 2.0 * gv / P, f = gm / P, a = W.a[c], m = W.m[c];
      const T* xc = x + off + c * P;
      const T* dyc = dy + off + c * P;
      T* dxc = dx + off + c * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) dxc[p] = static_cast<T>(dyc[p] * a + (xc[p] - m) * e + f);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    gw[c] = static_cast<T>(aw[c]);
    if (gb) gb[c] = static_cast<T>(ab[c]);
  }
  for (int64_t i = 0; i < M * N; ++i) {
    gw1[i] = static_cast<T>(aw1[i]);
    gw2[i] = static_cast<T>(aw2[i]);
    gw3[i] = static_cast<T>(aw3[i]);
  }
}

}  // namespace

#define ILM_ENTRY_POINTS(T, SUFFIX)                                                                      \
  extern "C" void ilm_pooled_forward_##SUFFIX(const T* x, T* y, double* moments, const T* w,           \
                                              const T* bias, const T* w1, const T* w2, const T* w3,      \
                                              int64_t B, int64_t C, int64_t P, int64_t G, int64_t K,     \
                                              int64_t M, double eps) {                                   \
    pooled_forward<T>(x, y, moments, w, bias, w1, w2, w3, Dims{B, C, P, G, K, M, eps});                  \
  }                                                                                                      \
  extern "C" void ilm_pooled_backward_##SUFFIX(const T* x, const T* dy, const double* moments, T* dx,    \
                                               T* gw, T* gb, T* gw1, T* gw2, T* gw3, const T* w,         \
                                               const T* bias, const T* w1, const T* w2, const T* w3,     \
                                               int64_t B, int64_t C, int64_t P, int64_t G, int64_t K,    \
                                               int64_t M, double eps) {                                  \
    pooled_backward<T>(x, dy, moments, dx, gw, gb, gw1, gw2, gw3, w, bias, w1, w2, w3,                   \
                       Dims{B, C, P, G, K, M, eps});                                                     \
  }

ILM_ENTRY_POINTS(float, f32)
ILM_ENTRY_POINTS(double, f64)
// ---------------------------------------------------------------- GroupNorm + Proxy Norm (PN-Act)
namespace {

enum Act { RELU = 0, GELU = 1, GELU_TANH = 2, SILU = 3 };

template <int ACT>
inline double act_forward(double u) {
  if (ACT == RELU) return std::max(u, 0.0);  // maxsd: no branch to mispredict; NaN stays NaN
  if (ACT == GELU) return 0.5 * u * (1.0 + std::erf(u * 0.7071067811865476));
  if (ACT == GELU_TANH) return 0.5 * u * (1.0 + std::tanh(0.7978845608028654 * (u + 0.044715 * u * u * u)));
  return u / (1.0 + std::exp(-u));  // SILU
}

template <int ACT>
inline double act_grad(double u) {  // phi'(u)
  if (ACT == RELU) return static_cast<double>(u > 0.0);  // a compare, no branch
  if (ACT == GELU) {
    return 0.5 * (1.0 + std::erf(u * 0.7071067811865476)) + u * 0.3989422804014327 * std::exp(-0.5 * u * u);
  }
  if (ACT == GELU_TANH) {
    const double k = 0.7978845608028654, t = std::tanh(k * (u + 0.044715 * u * u * u));
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * u * u);
  }
  const double sg = 1.0 / (1.0 + std::exp(-u));  // SILU
  return sg * (1.0 + u * (1.0 - sg));
}

struct ProxyDims {
  int64_t B, C, P, G, n;
  double norm_eps, proxy_eps;
};

// ReLU's proxy in closed form. The points q are sorted ascending, so {i : intercept + slope q_i > 0} is
// one run of indices [lo, hi) (found by bisection on that same predicate), and every sum the proxy needs
// over it comes from the prefix sums of q and q^2 (`PointSums`): O(log n) per channel instead of O(n).
struct PointSums {
  std::vector<double> s1, s2;  // s1[i] = q_0 + ... + q_{i-1}, s2 likewise of q^2
  PointSums(const double* q, int64_t n) : s1(n + 1, 0.0), s2(n + 1, 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      s1[i + 1] = s1[i] + q[i];
      s2[i + 1] = s2[i] + q[i] * q[i];
    }
  }
};

// The run [lo, hi) where ReLU is active; false for NaN parameters (the caller then takes the loop).
inline bool relu_run(double intercept, double slope, const double* q, int64_t n, int64_t* lo, int64_t* hi) {
  if (std::isnan(intercept) || std::isnan(slope)) return false;
  int64_t a = 0, b = n;
  if (slope > 0.0) {  // inactive, then active: the first active point
    while (a < b) {
      const int64_t mid = (a + b) / 2;
      if (intercept + slope * q[mid] > 0.0) b = mid; else a = mid + 1;
    }
    *lo = a;
    *hi = n;
  } else if (slope < 0.0) {  // active, then inactive: the first inactive point
    while (a < b) {
      const int64_t mid = (a + b) / 2;
      if (intercept + slope * q[mid] > 0.0) a = mid + 1; else b = mid;
    }
    *lo = 0;
    *hi = a;
  } else {
    *lo = 0;
    *hi = intercept > 0.0 ? n : 0;
  }
  return true;
}

// Per channel: the proxy's a_i = intercept + slope q_i, z_i = phi(a_i), its mean m and r = (v + eps)^-1/2,
// and the output map y = phi(u) * s + t.
template <int ACT, typename T>
void proxy_coefficients(const ProxyDims& D, const double* q, const PointSums& ps, const T* gamma, const T* beta,
                        const T* pw, const T* pb, const T* ow, const T* ob, double* s, double* t, double* m,
                        double* r, std::vector<double>& z) {
  for (int64_t c = 0; c < D.C; ++c) {
    const double slope = gamma[c] * (1.0 + pw[c]), intercept = beta[c] + static_cast<double>(gamma[c]) * pb[c];
    const double w = ow ? static_cast<double>(ow[c]) : 1.0, b_out = ob ? static_cast<double>(ob[c]) : 0.0;
    int64_t lo, hi;
    if (ACT == RELU && relu_run(intercept, slope, q, D.n, &lo, &hi)) {
      const double k = static_cast<double>(hi - lo), q1 = ps.s1[hi] - ps.s1[lo], q2 = ps.s2[hi] - ps.s2[lo];
      const double mean = (k * intercept + slope * q1) / D.n, dev = intercept - mean;
      // sum_i (z_i - mean)^2: over the run (dev + slope q_i)^2, elsewhere mean^2
      const double ss = k * dev * dev + 2.0 * dev * slope * q1 + slope * slope * q2 + (D.n - k) * mean * mean;
      const double rc = 1.0 / std::sqrt(std::max(ss, 0.0) / D.n + D.proxy_eps);
      m[c] = mean;
      r[c] = rc;
      s[c] = rc * w;
      t[c] = b_out - mean * rc * w;
      continue;
    }
    double* zc = z.data();
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < D.n; ++i) {
      zc[i] = act_forward<ACT>(intercept + slope * q[i]);
      sum += zc[i];
    }
    const double mean = sum / D.n;
    double var = 0.0;
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < D.n; ++i) var += (zc[i] - mean) * (zc[i] - mean);
    const double rc = 1.0 / std::sqrt(var / D.n + D.proxy_eps);
    m[c] = mean;
    r[c] = rc;
    s[c] = rc * w;
    t[c] = b_out - mean * rc * w;
  }
}

// Mean and 1/sqrt(var + eps) of n consecutive values (two passes).
template <typename T>
void standardization(const T* x, int64_t n, double eps, double* mean, double* rstd) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const double mu = s / n;
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < n; ++i) q += (x[i] - mu) * (x[i] - mu);
  *mean = mu;
  *rstd = 1.0 / std::sqrt(q / n + eps);
}

template <int ACT, typename T>
void proxy_gn_forward(const T* x, T* y, double* stats, double* coef, const T* gamma, const T* beta, const T* pw,
                      const T* pb, const T* ow, const T* ob, const double* q, const ProxyDims& D) {
  const int64_t C = D.C, P = D.P, Cg = D.C / D.G;
  std::vector<double> z(D.n);
  double *s = coef, *t = s + C, *m = t + C, *r = m + C;
  const PointSums ps(q, D.n);
  proxy_coefficients<ACT>(D, q, ps, gamma, beta, pw, pb, ow, ob, s, t, m, r, z);
  for (int64_t b = 0; b < D.B; ++b) {
    for (int64_t g = 0; g < D.G; ++g) {
      const int64_t off = (b * C + g * Cg) * P;
      double mean, rstd;
      standardization(x + off, Cg * P, D.norm_eps, &mean, &rstd);
      stats[2 * (b * D.G + g)] = mean;
      stats[2 * (b * D.G + g) + 1] = rstd;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const T* xc = x + (b * C + c) * P;
        T* yc = y + (b * C + c) * P;
        const double a = gamma[c] * rstd, d = beta[c] - mean * a, sc = s[c], tc = t[c];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) yc[p] = static_cast<T>(act_forward<ACT>(xc[p] * a + d) * sc + tc);
      }
    }
  }
}

template <int ACT, typename T>
void proxy_gn_backward(const T* x, const T* dy, const double* stats, const double* coef, T* dx, T* g_gamma,
                       T* g_beta, T* g_pw, T* g_pb, T* g_ow, T* g_ob, const T* gamma, const T* beta, const T* pw,
                       const T* pb, const T* ow, const T* ob, const double* q, const ProxyDims& D) {
  const int64_t C = D.C, P = D.P, Cg = D.C / D.G, n = D.n;
  std::vector<double> acc(4 * C, 0.0);
  const double *s = coef, *m = s + 2 * C, *r = m + C;  // the forward's (s, t, m, r)
  double *gs = acc.data(), *gt = gs + C, *gg = gt + C, *gb = gg + C;  // sum dy z, sum dy, direct d/dgamma, d/dbeta
  for (int64_t b = 0; b < D.B; ++b) {
    for (int64_t g = 0; g < D.G; ++g) {
      const double mean = stats[2 * (b * D.G + g)], rstd = stats[2 * (b * D.G + g) + 1];
      double s1 = 0.0, s2 = 0.0;  // sum dx_hat, sum dx_hat x_hat over the group
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const T* xc = x + (b * C + c) * P;
        const T* dyc = dy + (b * C + c) * P;
        const double gm = gamma[c], bt = beta[c], sc = s[c];
        double a_gs = 0.0, a_gt = 0.0, a_gg = 0.0, a_gb = 0.0;
#pragma omp simd reduction(+ : a_gs, a_gt, a_gg, a_gb)
        for (int64_t p = 0; p < P; ++p) {
          const double xh = (xc[p] - mean) * rstd, u = gm * xh + bt, d = dyc[p];
          const double du = d * sc * act_grad<ACT>(u);
          a_gs += d * act_forward<ACT>(u);
          a_gt += d;
          a_gg += du * xh;
          a_gb += du;
        }
        gs[c] += a_gs;
        gt[c] += a_gt;
        gg[c] += a_gg;
        gb[c] += a_gb;
        s1 += a_gb * gm;
        s2 += a_gg * gm;
      }
      const double cnt = static_cast<double>(Cg * P), k1 = s1 / cnt, k2 = s2 / cnt;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {  // dx = rstd (dx_hat - mean dx_hat - x_hat mean(dx_hat x_hat))
        const T* xc = x + (b * C + c) * P;
        const T* dyc = dy + (b * C + c) * P;
        T* dxc = dx + (b * C + c) * P;
        const double gm = gamma[c], bt = beta[c], sc = s[c];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) {
          const double xh = (xc[p] - mean) * rstd;
          const double dxh = dyc[p] * sc * act_grad<ACT>(gm * xh + bt) * gm;
          dxc[p] = static_cast<T>(rstd * (dxh - k1 - xh * k2));
        }
      }
    }
  }
  // through the proxy: (s, t) = (r w, b - m r w) from gamma, beta, gamma~, beta~ (and w, b of the output affine)
  const PointSums ps(q, n);
  for (int64_t c = 0; c < C; ++c) {
    double grad_r = gs[c] - gt[c] * m[c], grad_m = -gt[c] * r[c];
    if (ow) {
      g_ow[c] = static_cast<T>(grad_r * r[c]);
      g_ob[c] = static_cast<T>(gt[c]);
      grad_r *= ow[c];
      grad_m *= ow[c];
    }
    const double grad_v = -0.5 * grad_r * r[c] * r[c] * r[c];
    const double slope = gamma[c] * (1.0 + pw[c]), intercept = beta[c] + static_cast<double>(gamma[c]) * pb[c];
    double g_slope = 0.0, g_intercept = 0.0;
    int64_t lo, hi;
    if (ACT == RELU && relu_run(intercept, slope, q, n, &lo, &hi)) {
      // dL/da_i = alpha + beta2 (z_i - m) on the run (z_i - m = dev + slope q_i), 0 elsewhere
      const double k = static_cast<double>(hi - lo), q1 = ps.s1[hi] - ps.s1[lo], q2 = ps.s2[hi] - ps.s2[lo];
      const double alpha = grad_m / n, beta2 = 2.0 * grad_v / n, dev = intercept - m[c];
      g_intercept = k * alpha + beta2 * (k * dev + slope * q1);
      g_slope = alpha * q1 + beta2 * (dev * q1 + slope * q2);
    } else {
#pragma omp simd reduction(+ : g_slope, g_intercept)
      for (int64_t i = 0; i < n; ++i) {
        const double a = intercept + slope * q[i];
        const double ga = (grad_m / n + 2.0 * grad_v * (act_forward<ACT>(a) - m[c]) / n) * act_grad<ACT>(a);
        g_slope += ga * q[i];
        g_intercept += ga;
      }
    }
    g_gamma[c] = static_cast<T>(gg[c] + g_slope * (1.0 + pw[c]) + g_intercept * pb[c]);
    g_beta[c] = static_cast<T>(gb[c] + g_intercept);
    g_pw[c] = static_cast<T>(g_slope * gamma[c]);
    g_pb[c] = static_cast<T>(g_intercept * gamma[c]);
  }
}

}  // namespace

#define PROXY_DISPATCH(CALL)                    \
  switch (act) {                                \
    case RELU: CALL(RELU); break;               \
    case GELU: CALL(GELU); break;               \
    case GELU_TANH: CALL(GELU_TANH); break;     \
    default: CALL(SILU);                        \
  }

#define PROXY_ENTRY_POINTS(T, SUFFIX)                                                                       \
  extern "C" void proxy_gn_forward_##SUFFIX(const T* x, T* y, double* stats, double* coef, const T* gamma,  \
                                            const T* beta, const T* pw, const T* pb, const T* ow,           \
                                            const T* ob, const double* q, int64_t B, int64_t C, int64_t P,  \
                                            int64_t G, int64_t n, int64_t act, double norm_eps,             \
                                            double proxy_eps) {                                             \
    const ProxyDims D{B, C, P, G, n, norm_eps, proxy_eps};                                                  \
    PROXY_DISPATCH(PROXY_FWD_##SUFFIX)                                                                      \
  }                                                                                                         \
  extern "C" void proxy_gn_backward_##SUFFIX(                                                               \
      const T* x, const T* dy, const double* stats, const double* coef, T* dx, T* g_gamma, T* g_beta,       \
      T* g_pw, T* g_pb, T* g_ow, T* g_ob, const T* gamma, const T* beta, const T* pw, const T* pb,          \
      const T* ow, const T* ob, const double* q, int64_t B, int64_t C, int64_t P, int64_t G, int64_t n,     \
      int64_t act, double norm_eps, double proxy_eps) {                                                     \
    const ProxyDims D{B, C, P, G, n, norm_eps, proxy_eps};                                                  \
    PROXY_DISPATCH(PROXY_BWD_##SUFFIX)                                                                      \
  }

#define PROXY_FWD_f32(A) proxy_gn_forward<A, float>(x, y, stats, coef, gamma, beta, pw, pb, ow, ob, q, D)
#define PROXY_FWD_f64(A) proxy_gn_forward<A, double>(x, y, stats, coef, gamma, beta, pw, pb, ow, ob, q, D)
#define PROXY_GRADS dx, g_gamma, g_beta, g_pw, g_pb, g_ow, g_ob
#define PROXY_PARAMS gamma, beta, pw, pb, ow, ob
#define PROXY_BWD_f32(A) proxy_gn_backward<A, float>(x, dy, stats, coef, PROXY_GRADS, PROXY_PARAMS, q, D)
#define PROXY_BWD_f64(A) proxy_gn_backward<A, double>(x, dy, stats, coef, PROXY_GRADS, PROXY_PARAMS, q, D)

PROXY_ENTRY_POINTS(float, f32)
PROXY_ENTRY_POINTS(double, f64)
"""
