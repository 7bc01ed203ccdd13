// foreach_metric_prox_: the fused step in an optimizer's diagonal metric (docs/SPEC.md, "Proximal
// steps in an optimizer's metric"), on a list of weights, each with the second moment its last
// Adam step used. Per weight i with (l1, lg, le) = lams[i] and (s, eps, lr) = metric[i]:
//
//     d = (sqrt(v * s) + eps) / lr                  (s = 1 / (1 - beta2^t))
//     W <- metric soft threshold by l1 / d, metric group step by t = lg * c, metric exclusive
//          step by le (exact threshold, or CGES's bound)          (a lam of 0: skipped)
//
// Per block of neighbouring groups, the weight and the second moment are read once into a
// thread-local buffer (a row of the block is a contiguous run of memory), every group's scalar
// equations are solved there by Newton's method (passes over the buffer, not over memory), and
// the block is written once: one read of W and v, one write of W. Every group is computed by one
// thread, in a fixed order: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/group_layout.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu {
namespace {

constexpr int64_t kBlockElems = 1 << 15;  // elements of one block's buffer
constexpr int kMaxNewton = 100;           // bound on the Newton steps of one scalar equation

template <typename A>
struct MetricParams {
  A l1 = 0, t = 0, le = 0;
  bool exact = true;
};

// sign(x) max(|x| - tau, 0), NaN in x or tau giving NaN.
template <typename A>
inline A shrink(A x, A tau) {
  const A d = std::abs(x) - tau;
  const A mag = d > A(0) ? d : (d == d ? A(0) : d);
  return std::copysign(mag, x);
}

// The step of one group of n elements: x (in: the weight, out: the result) and d, contiguous.
template <typename A>
void metric_group(A* x, const A* d, int64_t n, const MetricParams<A>& p) {
  const A inf = std::numeric_limits<A>::infinity();
  if (p.l1 > 0) {  // the soft threshold by l1 / d_i; d_i = 0: 0 (NaN stays NaN); l1 / d_i is
    // finite for d_i > 0, so an infinite x_i stays infinite even where the quotient overflows
    for (int64_t i = 0; i < n; ++i) {
      const bool infinite = std::abs(x[i]) == inf;
      x[i] = d[i] > A(0) ? (infinite ? x[i] : shrink(x[i], p.l1 / d[i]))
                         : (x[i] != x[i] ? x[i] : A(0));
    }
  }
  if (p.t <= A(0) && p.le <= A(0)) return;
  bool nan = false, finite = true;
  for (int64_t i = 0; i < n; ++i) {
    nan = nan || x[i] != x[i];
    finite = finite && std::abs(x[i]) < inf;
  }
  if (nan) {  // a NaN group becomes NaN
    std::fill_n(x, n, std::numeric_limits<A>::quiet_NaN());
    return;
  }
  if (!finite) return;  // a group with an infinite value keeps its values
  if (p.t > A(0)) {
    // x = 0 iff ||D x|| <= t; else x_i d_i theta / (d_i theta + t), theta the root of
    // F(theta) = sum (d_i x_i)^2 / (d_i theta + t)^2 = 1, found as the root of
    // phi = F^(-1/2) - 1: concave and increasing (a power mean of exponent -2 of functions
    // linear in theta), linear when every d_i is the same. Newton from theta_L (phi <= 0) rises
    // monotonically to the root, and takes one step when the d_i are equal.
    A dz2 = 0, dmax = 0;
    for (int64_t i = 0; i < n; ++i) {
      const A dz = d[i] * x[i];
      dz2 += dz * dz;
      dmax = std::max(dmax, d[i]);
    }
    const A a = std::sqrt(dz2);
    if (!(a > p.t)) {
      std::fill_n(x, n, A(0));
      return;
    }
    double theta = (double(a) - double(p.t)) / double(dmax);
    for (int k = 0; k < kMaxNewton; ++k) {
      // With w_i = d_i theta / (d_i theta + t) in [0, 1]: F = P / theta^2 and -F'/2 = Q /
      // theta^3, P = sum (w x)^2, Q = sum w (w x)^2 (bounded by ||x||^2, where F and its slope
      // can overflow a float when d spans many decades). The Newton step on phi,
      // theta + (F^(3/2) - F) / (-F'/2), is theta + (sqrt(P) - theta) P / Q. Vector lanes in
      // the accumulation type, then a fixed-order reduction in double.
      using V = at::vec::Vectorized<A>;
      constexpr int64_t L = V::size();
      const A th = static_cast<A>(theta);
      const V vth(th), vt(p.t);
      V vp(A(0)), vq(A(0));
      int64_t i = 0;
      for (; i + L <= n; i += L) {
        const V dth = V::loadu(d + i) * vth;
        const V w = dth / (dth + vt);
        const V wx = w * V::loadu(x + i);
        const V p2 = wx * wx;
        vp = vp + p2;
        vq = vq + w * p2;
      }
      A lanes_p[L], lanes_q[L];
      vp.store(lanes_p);
      vq.store(lanes_q);
      double sp = 0.0, sq = 0.0;
      for (int64_t j = 0; j < L; ++j) {
        sp += double(lanes_p[j]);
        sq += double(lanes_q[j]);
      }
      for (; i < n; ++i) {
        const A dth = d[i] * th;
        const A w = dth / (dth + p.t);
        const A wx = w * x[i];
        sp += double(wx * wx);
        sq += double(w * wx * wx);
      }
      if (!(sp > theta * theta) || sq == 0.0) break;  // at or past the root (rounding): done
      const double next = theta + (std::sqrt(sp) - theta) * (sp / sq);
      if (!(next > theta * (1.0 + 4.0 * std::numeric_limits<A>::epsilon()))) {
        theta = std::max(theta, next);
        break;
      }
      theta = next;
    }
    using V = at::vec::Vectorized<A>;
    const A th = static_cast<A>(theta);
    const V vth(th), vt(p.t);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      const V dd = V::loadu(d + i);
      const V dth = dd * vth;
      (V::loadu(x + i) * dth / (dth + vt)).store(x + i);
    }
    for (; i < n; ++i) x[i] = x[i] * (d[i] * th) / (d[i] * th + p.t);
  }
  if (p.le > A(0)) {
    // tau_i = le S / d_i (d_i = 0: +inf). Exact: S = sum_A |x| / (1 + le sum_A 1/d) over the
    // active set A = {d_i |x_i| > le S}, Newton from S = 0 until A stops shrinking. Bound:
    // S = ||x||_1.
    double s = 0.0;
    if (p.exact) {
      int64_t active = -1;
      for (int k = 0; k < kMaxNewton; ++k) {
        double sum = 0.0, inv = 0.0;
        int64_t count = 0;
        const double bar = double(p.le) * s;
        for (int64_t i = 0; i < n; ++i) {
          const double m = std::abs(double(x[i]));
          if (d[i] > A(0) && double(d[i]) * m > bar) {
            sum += m;
            inv += 1.0 / double(d[i]);
            ++count;
          }
        }
        if (count == 0 || count == active) break;
        s = std::max(s, sum / (1.0 + double(p.le) * inv));
        active = count;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) s += std::abs(double(x[i]));
    }
    for (int64_t i = 0; i < n; ++i) {
      const A tau = d[i] > A(0) ? A(double(p.le) * s / double(d[i])) : inf;
      x[i] = shrink(x[i], tau);
    }
  }
}

template <typename T, typename V>
void metric_tensor(T* w, const V* v, const GroupShape& s, const MetricParams<at::opmath_type<T>>& p,
                   double scale, double eps, double lr) {
  using A = at::opmath_type<T>;
  const int64_t n = s.group_size();
  if (s.num_groups() == 0 || n == 0) return;
  // blocks of neighbouring groups of one batch entry: a row of a block is contiguous
  const int64_t per_block = std::max<int64_t>(1, std::min(s.groups, kBlockElems / n));
  const int64_t blocks_per_batch = (s.groups + per_block - 1) / per_block;
  const int64_t blocks = s.batch * blocks_per_batch;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElems / (per_block * n));
  // d in the accumulation type (float for 16- and 32-bit weights)
  const A scale_a = static_cast<A>(scale), eps_a = static_cast<A>(eps);
  const A inv_lr = static_cast<A>(1.0 / lr);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> x(per_block * n), d(per_block * n);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / blocks_per_batch;
      const int64_t g0 = (blk % blocks_per_batch) * per_block;
      const int64_t g1 = std::min(s.groups, g0 + per_block);
      const int64_t base = b * s.outer * s.groups * s.inner;
      for (int64_t o = 0; o < s.outer; ++o) {  // gather: group-major buffers
        const int64_t row = base + (o * s.groups + g0) * s.inner;
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t i = 0; i < s.inner; ++i) {
            const int64_t at = row + (g - g0) * s.inner + i;
            const int64_t k = (g - g0) * n + o * s.inner + i;
            x[k] = static_cast<A>(w[at]);
            d[k] = (std::sqrt(static_cast<A>(v[at]) * scale_a) + eps_a) * inv_lr;
          }
        }
      }
      for (int64_t g = g0; g < g1; ++g) metric_group(&x[(g - g0) * n], &d[(g - g0) * n], n, p);
      for (int64_t o = 0; o < s.outer; ++o) {  // scatter back
        const int64_t row = base + (o * s.groups + g0) * s.inner;
        for (int64_t g = g0; g < g1; ++g) {
          for (int64_t i = 0; i < s.inner; ++i) {
            w[row + (g - g0) * s.inner + i] = static_cast<T>(x[(g - g0) * n + o * s.inner + i]);
          }
        }
      }
    }
  });
}

// v laid out like `work` (the same strides): v itself when it already is, else a copy.
at::Tensor like_work(const at::Tensor& v, const at::Tensor& weight, const GroupLayout& layout) {
  if (!layout.is_copy) {
    if (v.strides() == weight.strides()) return v;
    return at::empty_strided(weight.sizes(), weight.strides(), v.options()).copy_(v);
  }
  const at::Tensor source = layout.copy_perm.empty() ? v : v.permute(layout.copy_perm);
  return source.contiguous();
}

// Whether every entry of a second moment is finite and >= 0 (NaN fails too): one parallel read.
template <typename V>
bool valid_moment(const V* v, int64_t n) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, kParallelGrainElems, [&](int64_t begin, int64_t end) {
    using A = at::opmath_type<V>;
    const A top = std::numeric_limits<A>::max();
    bool good = true;
    for (int64_t i = begin; i < end; ++i) {
      const A x = static_cast<A>(v[i]);
      good &= (x >= A(0)) & (x <= top);
    }
    if (!good) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

bool valid_moment(const at::Tensor& moment) {
  // dense in some order of its dimensions: its elements are one block of memory
  const at::Tensor v = moment.is_non_overlapping_and_dense() ? moment : moment.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "valid_moment", [&] {
    const int64_t lo = address_range(v).first;
    ok = valid_moment(reinterpret_cast<const scalar_t*>(lo), v.numel());
  });
  return ok;
}

void foreach_metric_prox_cpu(at::TensorList weights, at::TensorList moments,
                             const at::Tensor& lams, const at::Tensor& metric,
                             at::IntArrayRef dims, at::IntArrayRef dim_counts,
                             const c10::List<bool>& size_weighted, const c10::List<bool>& exact,
                             const std::optional<std::vector<std::string>>& names) {
  static constexpr const char* op = "foreach_metric_prox_";
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(!names || int64_t(names->size()) == n, op,
                    ": names needs one entry per weight");
  auto moment_name = [&](int64_t i) {
    return names ? (*names)[i] : "moments[" + std::to_string(i) + "]";
  };
  TORCH_CHECK_VALUE(int64_t(moments.size()) == n && int64_t(dim_counts.size()) == n &&
                        int64_t(size_weighted.size()) == n && int64_t(exact.size()) == n,
                    op, ": moments, dim_counts, size_weighted and exact need one entry per weight");
  TORCH_CHECK_VALUE(lams.scalar_type() == at::kDouble && lams.numel() == 3 * n &&
                        lams.device().is_cpu(),
                    op, ": lams must be a float64 CPU tensor of 3 * len(weights) values");
  TORCH_CHECK_VALUE(metric.scalar_type() == at::kDouble && metric.numel() == 3 * n &&
                        metric.device().is_cpu(),
                    op, ": metric must be a float64 CPU tensor of 3 * len(weights) values");
  const at::Tensor lam = lams.contiguous(), met = metric.contiguous();
  const double* L = lam.data_ptr<double>();
  const double* M = met.data_ptr<double>();
  std::vector<at::IntArrayRef> tensor_dims;
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {  // every check before any write
    TORCH_CHECK_VALUE(dim_counts[i] >= 0 && offset + dim_counts[i] <= int64_t(dims.size()), op,
                      ": dim_counts do not match dims");
    tensor_dims.push_back(dims.slice(offset, dim_counts[i]));
    offset += dim_counts[i];
    check_weight(weights[i]);
    reduced_mask(weights[i], tensor_dims.back());
    check_writable(weights[i]);
    TORCH_CHECK_VALUE(moments[i].sizes() == weights[i].sizes(), op, ": ", moment_name(i),
                      " has shape ", moments[i].sizes(), ", expected ", weights[i].sizes());
    TORCH_CHECK_VALUE(moments[i].device() == weights[i].device() &&
                          at::isFloatingType(moments[i].scalar_type()),
                      op, ": ", moment_name(i), " must be a floating tensor on ",
                      weights[i].device());
    for (int k = 0; k < 3; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(L[3 * i + k]) && L[3 * i + k] >= 0, op, ": lams[", i,
                        "] must be finite numbers >= 0");
    }
    TORCH_CHECK_VALUE(std::isfinite(M[3 * i]) && M[3 * i] >= 0 && std::isfinite(M[3 * i + 1]) &&
                          M[3 * i + 1] >= 0 && std::isfinite(M[3 * i + 2]) && M[3 * i + 2] > 0,
                      op, ": metric[", i, "] must be (scale >= 0, eps >= 0, lr > 0), finite");
  }
  TORCH_CHECK_VALUE(offset == int64_t(dims.size()), op, ": dim_counts do not match dims");
  check_disjoint(weights, op);
  auto skipped = [&](int64_t i) {
    return weights[i].numel() == 0 || (L[3 * i] == 0 && L[3 * i + 1] == 0 && L[3 * i + 2] == 0);
  };
  for (int64_t i = 0; i < n; ++i) {  // the moments used: apart from the weights, finite, >= 0
    if (skipped(i)) continue;
    const auto range = address_range(moments[i]);
    for (int64_t j = 0; j < n; ++j) {
      const auto other = address_range(weights[j]);
      TORCH_CHECK_VALUE(range.first >= other.second || other.first >= range.second, op, ": ",
                        moment_name(i), " shares memory with weights[", j,
                        "], which the step writes");
    }
    TORCH_CHECK_VALUE(valid_moment(moments[i]), op, ": ", moment_name(i),
                      " has negative, NaN or infinite entries (a second moment is finite and "
                      ">= 0); the optimizer's state is damaged: check the loss and gradients "
                      "for NaN/inf, or reload a checkpoint");
  }
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    const double l1 = L[3 * i], lg = L[3 * i + 1], le = L[3 * i + 2];
    if (skipped(i)) continue;  // bit-identical
    const GroupLayout layout = analyze_groups(w, tensor_dims[i]);
    const at::Tensor v = like_work(moments[i], w, layout);
    const double c = size_weighted[i] ? std::sqrt(double(layout.shape.group_size())) : 1.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                    "foreach_metric_prox_", [&] {
      using A = at::opmath_type<scalar_t>;
      using W = scalar_t;
      MetricParams<A> p;
      p.l1 = threshold_as<A>(l1);
      p.t = threshold_as<A>(lg * c);
      p.le = threshold_as<A>(le);
      p.exact = exact[i];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                      "foreach_metric_prox_", [&] {
        metric_tensor(layout.work.data_ptr<W>(), v.const_data_ptr<scalar_t>(), layout.shape, p,
                      M[3 * i], M[3 * i + 1], M[3 * i + 2]);
      });
    });
    finish_groups(w, layout);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) {
  m.impl("foreach_metric_prox_", &foreach_metric_prox_cpu);
}

}  // namespace fastprox::cpu
