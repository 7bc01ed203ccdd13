// The metric step of one group, shared by the CPU kernels of the steps in an optimizer's
// diagonal metric (docs/SPEC.md, "Proximal steps in an optimizer's metric"): the plain step
// (metric_prox.cpp: groups within one weight) and the coupled step (coupled_metric.cpp: groups
// over slices of several weights). One set of per-group rules (the soft threshold by l1 / d,
// the group step's cases, Newton's method on theta with one cap, the exclusive threshold) for
// both, so that a group gets the same result whichever kernel holds it.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_strided.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu::metric {

// (kMaxNewton, the bound on the Newton steps of one equation: group_steps.h's, one for every
// CPU kernel)

// The thresholds of one group (in its accumulation type A) and its metric
// d = (sqrt(v * scale) + eps) * inv_lr (d_formed: the buffers already hold d, not v).
template <typename A>
struct MetricParams {
  A l1 = 0, t = 0, le = 0;
  bool exact = true;
  A scale = 1, eps = 0, inv_lr = 1;
  bool d_formed = false;
};

// sign(x) max(|x| - tau, 0), NaN in x or tau giving NaN.
template <typename A>
inline A shrink(A x, A tau) {
  const A d = std::abs(x) - tau;
  const A mag = d > A(0) ? d : (d == d ? A(0) : d);
  return std::copysign(mag, x);
}

// -- the per-group rules, shared by both traversals ------------------------------------------

// What the group step does to a group, from its largest |x| (NaN when it holds a NaN) and
// a = ||D x||: kNan (a NaN group becomes NaN), kKeep (a group with an infinite value keeps its
// values), kZero (||D x|| <= t: the group becomes 0), kSolve (theta from Newton's method).
enum GroupCase { kSolve = 0, kZero = 1, kNan = 2, kKeep = 3 };

template <typename A>
inline GroupCase group_case(A absmax, A a, A t) {
  if (absmax != absmax) return kNan;
  if (absmax == std::numeric_limits<A>::infinity()) return kKeep;
  return a > t ? kSolve : kZero;
}

// theta_L = (||D x|| - t) / max_i d_i: phi(theta_L) <= 0, the start of Newton's method.
template <typename A>
inline double theta_start(A a, A t, A dmax) {
  return (double(a) - double(t)) / double(dmax);
}

// One Newton step on phi = F^(-1/2) - 1 from theta, given P = sum (w x)^2 and Q = sum w (w x)^2
// at theta (w_i = d_i theta / (d_i theta + t)): F = P / theta^2, -F'/2 = Q / theta^3, and the
// step theta + (F^(3/2) - F) / (-F'/2) is theta + (sqrt(P) - theta) P / Q. Returns whether
// theta is final (at or past the root, up to rounding).
template <typename A>
constexpr double kConverged = std::is_same_v<A, double> ? 0x1p-28 : 0x1p-13;

template <typename A>
inline bool newton_step(double& theta, double p, double q) {
  if (!(p > theta * theta) || q == 0.0) return true;
  const double next = theta + (std::sqrt(p) - theta) * (p / q);
  if (!(next > theta * (1.0 + 4.0 * std::numeric_limits<A>::epsilon()))) {
    theta = std::max(theta, next);
    return true;
  }
  // quadratic convergence from the left: after a step of relative size delta, what is left is
  // about delta^2 (phi is close to linear), below rounding once delta <= 2^-13 in float32
  // (2^-28 in float64): the next pass would not move theta
  const bool converged = next - theta <= theta * kConverged<A>;
  theta = next;
  return converged;
}

// -- the first pass, per element: d from v, the soft threshold, the group's statistics --------

template <typename A>
using Vec = at::vec::Vectorized<A>;

// Per vector lane: the largest |x| (NaN-propagating), ||D x||^2 and the largest d.
template <typename A>
struct Stats {
  Vec<A> absmax{A(0)}, dz2{A(0)}, dmax{A(0)};
};

// The metric of an Adam step from its second moment v: (sqrt(v * scale) + eps) / lr, in one
// place for every CPU kernel.
template <typename A>
inline Vec<A> adam_metric(const Vec<A>& v, A scale, A eps, A inv_lr) {
  return ((v * Vec<A>(scale)).sqrt() + Vec<A>(eps)) * Vec<A>(inv_lr);
}

// d <- (sqrt(v * scale) + eps) / lr (d holds v on entry, unless p.d_formed); x <- the soft
// threshold by l1 / d (d = 0: 0, NaN stays NaN; l1 / d is finite for d > 0, so an infinite x
// stays infinite even where the quotient overflows); the statistics of the result.
template <typename A>
inline void first_pass(Vec<A>& x, Vec<A>& d, const MetricParams<A>& p, Stats<A>& st) {
  using V = Vec<A>;
  if (!p.d_formed) d = adam_metric(d, p.scale, p.eps, p.inv_lr);
  if (p.l1 > A(0)) {
    const V zero(A(0)), ax = x.abs();
    const V mag = ax - V(p.l1) / d;  // d = 0: -inf (x finite) or NaN
    V y = V::blendv(zero, mag, mag > zero);
    y = V::blendv(y, mag, mag != mag);                   // NaN stays NaN
    y = V::blendv(y, ax, ax == V(std::numeric_limits<A>::infinity()));
    y = y.copysign(x);
    x = V::blendv(V::blendv(zero, x, x != x), y, d > zero);
  }
  st.absmax = at::vec::maximum(st.absmax, x.abs());
  const V dz = d * x;
  st.dz2 = st.dz2 + dz * dz;
  st.dmax = at::vec::maximum(st.dmax, d);
}

// One vector of a Newton pass: with w = d theta / (d theta + t), P += (w x)^2, Q += w (w x)^2.
template <typename A>
inline void add_newton_terms(Vec<A>& p, Vec<A>& q, const Vec<A>& x, const Vec<A>& d,
                             const Vec<A>& theta, const Vec<A>& t) {
  const Vec<A> dth = d * theta;
  const Vec<A> w = dth / (dth + t);
  const Vec<A> wx = w * x;
  const Vec<A> p2 = wx * wx;
  p = p + p2;
  q = q + w * p2;
}

// `count` (<= Vec<A>::size()) elements of storage type T as a vector of A, missing lanes 0.
template <typename A, typename T>
inline Vec<A> load_as(const T* p, int64_t count) {
  constexpr int64_t L = Vec<A>::size();
  if constexpr (std::is_same_v<A, T>) {
    return count == L ? Vec<A>::loadu(p) : Vec<A>::loadu(p, count);
  } else {
    A tmp[L] = {};
    for (int64_t j = 0; j < count; ++j) tmp[j] = static_cast<A>(p[j]);
    return Vec<A>::loadu(tmp);
  }
}

template <typename T, typename A>
inline void store_as(T* p, const Vec<A>& x, int64_t count) {
  constexpr int64_t L = Vec<A>::size();
  if constexpr (std::is_same_v<A, T>) {
    count == L ? x.store(p) : x.store(p, count);
  } else {
    A tmp[L];
    x.store(tmp);
    for (int64_t j = 0; j < count; ++j) p[j] = static_cast<T>(tmp[j]);
  }
}

// Rows of a weight read ahead where a traversal reads pieces of rows far apart (a Linear's
// columns, a head's slice of a fused projection): the hardware prefetchers do not follow strides
// of a row.
constexpr int64_t kPrefetchRows = 4;

template <typename T>
inline void prefetch_run(const T* p, int64_t count) {
  for (int64_t j = 0; j < count; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + j);
}

// -- group-major traversal: every group one contiguous run of the buffer ---------------------

// The step of one group of n elements: x (in: the weight, out: the result) and d (in: v, out:
// the metric; or d throughout, p.d_formed), contiguous.
template <typename A>
void metric_group(A* x, A* d, int64_t n, const MetricParams<A>& p) {
  using V = Vec<A>;
  constexpr int64_t L = V::size();
  const A inf = std::numeric_limits<A>::infinity();
  Stats<A> st;
  for (int64_t i = 0; i < n; i += L) {
    const int64_t count = std::min(L, n - i);
    V xv = V::loadu(x + i, count), dv = V::loadu(d + i, count);  // missing lanes: 0
    first_pass(xv, dv, p, st);
    store_as(x + i, xv, count);
    store_as(d + i, dv, count);
  }
  if (p.t <= A(0) && p.le <= A(0)) return;
  A lanes[3][L];
  st.absmax.store(lanes[0]);
  st.dz2.store(lanes[1]);
  st.dmax.store(lanes[2]);
  A absmax = 0, dz2 = 0, dmax = 0;
  for (int64_t j = 0; j < L; ++j) {
    const A m = lanes[0][j];
    absmax = absmax != absmax ? absmax : (m != m ? m : std::max(absmax, m));  // NaN sticks
    dz2 += lanes[1][j];
    dmax = std::max(dmax, lanes[2][j]);
  }
  const GroupCase c = group_case(absmax, p.t > A(0) ? std::sqrt(dz2) : inf, p.t);
  if (c == kNan) {
    std::fill_n(x, n, std::numeric_limits<A>::quiet_NaN());
    return;
  }
  if (c == kKeep) return;
  if (p.t > A(0)) {
    if (c == kZero) {
      std::fill_n(x, n, A(0));
      return;
    }
    double theta = theta_start(std::sqrt(dz2), p.t, dmax);
    for (int k = 0; k < kMaxNewton; ++k) {
      // P and Q in vector lanes of A, then a fixed-order reduction in double
      const V vth(static_cast<A>(theta)), vt(p.t);
      V vp(A(0)), vq(A(0));
      for (int64_t i = 0; i < n; i += L) {
        const int64_t count = std::min(L, n - i);
        add_newton_terms(vp, vq, V::loadu(x + i, count), V::loadu(d + i, count), vth, vt);
      }
      A lanes_p[L], lanes_q[L];
      vp.store(lanes_p);
      vq.store(lanes_q);
      double sp = 0.0, sq = 0.0;
      for (int64_t j = 0; j < L; ++j) {
        sp += double(lanes_p[j]);
        sq += double(lanes_q[j]);
      }
      if (newton_step<A>(theta, sp, sq)) break;
    }
    const V vth(static_cast<A>(theta)), vt(p.t);
    for (int64_t i = 0; i < n; i += L) {
      const int64_t count = std::min(L, n - i);
      const V dth = V::loadu(d + i, count) * vth;
      store_as(x + i, V::loadu(x + i, count) * dth / (dth + vt), count);
    }
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

// Two buffers of `size` elements of this thread, kept from call to call (a fresh allocation of
// this size is fresh pages, zeroed by the kernel on first touch).
template <typename A>
std::pair<A*, A*> block_buffers(int64_t size) {
  thread_local std::vector<A> buffer;
  if (int64_t(buffer.size()) < 2 * size) buffer.resize(2 * size);
  return {buffer.data(), buffer.data() + size};
}

// v laid out like `work` (the same strides): v itself when it already is, else a copy.
inline at::Tensor like_work(const at::Tensor& v, const at::Tensor& weight,
                            const GroupLayout& layout) {
  if (!layout.is_copy) {
    if (v.strides() == weight.strides()) return v;
    return at::empty_strided(weight.sizes(), weight.strides(), v.options()).copy_(v);
  }
  const at::Tensor source = layout.copy_perm.empty() ? v : v.permute(layout.copy_perm);
  return source.contiguous();
}

// Whether every entry of a second moment is finite and >= 0 (NaN fails too): one parallel read.
// Per lane, a bad entry (< 0, > the largest finite value, or NaN) sets all bits of its lane in
// one of kChains independent accumulators (bitwise or: no chain through a NaN-aware min/max).
template <typename V>
bool valid_moment(const V* v, int64_t n) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, kParallelGrainElems, [&](int64_t begin, int64_t end) {
    using A = at::opmath_type<V>;
    using Vec = at::vec::Vectorized<A>;
    constexpr int64_t W = Lanes<V>::kWidth, P = Lanes<V>::kParts, kChains = 4;
    const Vec zero(A(0)), top(std::numeric_limits<A>::max());
    Vec bad[kChains] = {zero, zero, zero, zero};
    auto mark = [&](Vec& acc, const Vec& x) { acc = acc | (x < zero) | (x > top) | (x != x); };
    int64_t i = begin;
    for (; i + kChains * W <= end; i += kChains * W) {
      for (int64_t c = 0; c < kChains; ++c) {
        Vec parts[P];
        Lanes<V>::load(v + i + c * W, W, parts);
        for (int64_t k = 0; k < P; ++k) mark(bad[c], parts[k]);
      }
    }
    for (; i < end; i += W) {
      Vec parts[P];
      Lanes<V>::load(v + i, std::min(W, end - i), parts);  // missing lanes: 0, valid
      for (int64_t k = 0; k < P; ++k) mark(bad[0], parts[k]);
    }
    const Vec any = (bad[0] | bad[1]) | (bad[2] | bad[3]);
    // a lane with every bit set is a NaN, never == 0: all lanes 0 iff no bad entry
    if (any.zero_mask() != (1 << Vec::size()) - 1) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

inline bool valid_moment(const at::Tensor& moment) {
  // dense in some order of its dimensions: its elements are one block of memory
  const at::Tensor v = moment.is_non_overlapping_and_dense() ? moment : moment.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "valid_moment", [&] {
    const int64_t lo = address_range(v).first;
    ok = valid_moment(reinterpret_cast<const scalar_t*>(lo), v.numel());
  });
  return ok;
}

}  // namespace fastprox::cpu::metric
