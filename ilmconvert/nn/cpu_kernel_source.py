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

The per-position loops carry ``#pragma omp simd`` (compiled with ``-fopenmp-simd``: vectorized
reductions, no OpenMP runtime).

Everything between the passes is computed in double, whatever ``T``; ``y = x * a + d`` is
evaluated in ``T`` with ``a``, ``d`` rounded to ``T`` (as the PyTorch fast path does).
"""

SOURCE = r"""
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
  double *m, *v, *mg, *rstd, *mu, *gam, *emu, *eg, *dmu, *dg, *a, *d;
  explicit Work(const Dims& D) : buf(4 * D.C + 2 * D.G + 4 * D.N() + 2 * D.M) {
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
    const double omega = W.dg[c / K] - 0.5 + w[c];
    const double beta = W.dmu[c / K] + (bias ? static_cast<double>(bias[c]) : 0.0);
    W.a[c] = omega * W.rstd[c / Cg];
    W.d[c] = beta - W.mg[c / Cg] * W.a[c];
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
      const double mg = W.mg[c / Cg];
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
      const int64_t g = c / Cg, n = c / K;
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
      const int64_t g = c / Cg, n = c / K;
      const double gm = d_mg[g] / Cg + d_var[g] * 2.0 * (W.m[c] - W.mg[g]) / Cg + g_mu[n] / K +
                        g_gam[n] * 2.0 * (W.m[c] - W.mu[n]) / K;
      const double gv = d_var[g] / Cg + g_gam[n] / K;
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
"""
