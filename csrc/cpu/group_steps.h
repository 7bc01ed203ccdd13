// The per-group steps of every group operator on the CPU: what a step computes of a group (its
// statistics, per-group parameters and elementwise rewrite), for the traversals of
// group_engine.h to run.
//
// A step maps each element before the sums (pre(): the soft threshold, where taken), turns a
// group's sums (of squares, of magnitudes, the count of nonzeros) into per-group parameters
// (finish(): a scale, a threshold, whether Newton steps follow), refines them from the sums
// above a threshold (newton(): the exact exclusive threshold), and rewrites the group
// elementwise (rewrite()). ProxStep is the fused proximal step (soft threshold, group
// shrinkage, exclusive threshold); NormStep the group norms; SumsStep, AboveStep and RewriteStep
// the phases of steps whose groups span several tensors (group_phases.cpp). kMaxNewton bounds
// the Newton steps of one equation in every CPU engine.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/group_layout.h"

namespace fastprox::cpu {

// A threshold (given in float64) in the accumulation type A: one beyond A's range becomes A's
// largest value, not inf, so that the results are the real threshold's: an infinite element
// minus it stays infinite, an infinite norm is not <= it (the group keeps its values), and
// every finite value or norm of A is below it (zeroed).
template <typename A>
inline A threshold_as(double value) {
  return static_cast<A>(std::min(value, double(std::numeric_limits<A>::max())));
}

// Loads and stores of storage type T as vectors of its accumulation type.
template <typename T>
struct Lanes {
  using A = at::opmath_type<T>;
  using V = at::vec::Vectorized<A>;
  using TV = at::vec::Vectorized<T>;
  static constexpr int64_t kWidth = TV::size();         // elements per load
  static constexpr int64_t kParts = kWidth / V::size();  // accumulation vectors per load

  // Loads `count` (1..kWidth) elements; missing lanes read as zero.
  static void load(const T* p, int64_t count, V* out) {
    if constexpr (kParts == 1) {
      out[0] = count == kWidth ? V::loadu(p) : V::loadu(p, count);
    } else {
      const TV v = count == kWidth ? TV::loadu(p) : TV::loadu(p, count);
      auto halves = at::vec::convert_to_float<T>(v);
      out[0] = std::get<0>(halves);
      out[1] = std::get<1>(halves);
    }
  }
  // Loads for sums, where the order of the values does not matter: bfloat16 is widened by a shift
  // (even elements) and a mask (odd elements) instead of cross-lane zero-extensions, which bound
  // the cached passes on AVX-512/AVX2. Same values as load(), in another lane order.
  static void load_unordered(const T* p, int64_t count, V* out) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i v = count == kWidth ? _mm512_loadu_si512(p) : __m512i(TV::loadu(p, count));
      out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000))));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i v = count == kWidth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                        : __m256i(TV::loadu(p, count));
      out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      out[1] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int32_t(0xFFFF0000))));
      return;
    }
#endif
    load(p, count, out);
  }

  static void store(T* p, int64_t count, const V* v) {
    if constexpr (kParts == 1) {
      count == kWidth ? v[0].store(p) : v[0].store(p, count);
    } else {
      const TV r = at::vec::convert_from_float<T>(v[0], v[1]);
      count == kWidth ? r.store(p) : r.store(p, count);
    }
  }
};

// copysign(max(|y| - tau, 0), y): soft threshold of magnitudes. NaN in y or tau gives NaN
// (clamp_min(a, 0) is max(0, a) with the NaN operand second, so a NaN a is returned: one
// instruction, where at::vec::maximum needs three); the zero result keeps y's sign (-0 for
// negative y).
template <typename V>
inline V shrink_magnitude(const V& y, const V& tau) {
  using A = typename V::value_type;
  const V mag = at::vec::clamp_min(y.abs() - tau, V(A(0)));
  return mag | (y & V(A(-0.0)));
}

// The Newton pass's inner step: adds the magnitudes m above tau to `sum` and counts them. With
// AVX-512 a compare into a k-mask and two masked adds (3 instructions) replace at::vec's
// compare -> vector mask -> and -> add -> and -> add: these passes run from cache and are bound
// by instruction throughput.
template <typename V>
inline void add_above(V& sum, V& count, const V& m, const V& tau, const V& one) {
  using A = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    const __mmask16 k = _mm512_cmp_ps_mask(m, tau, _CMP_GT_OQ);
    sum = _mm512_mask_add_ps(sum, k, sum, m);
    count = _mm512_mask_add_ps(count, k, count, one);
    return;
  } else if constexpr (std::is_same_v<A, double>) {
    const __mmask8 k = _mm512_cmp_pd_mask(m, tau, _CMP_GT_OQ);
    sum = _mm512_mask_add_pd(sum, k, sum, m);
    count = _mm512_mask_add_pd(count, k, count, one);
    return;
  }
#endif
  const V mask = m > tau;
  sum = sum + (mask & m);
  count = count + (mask & one);
}

// count += (m > tau), with the same k-mask trick as add_above.
template <typename V>
inline void count_above(V& count, const V& m, const V& tau, const V& one) {
  using A = typename V::value_type;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    count = _mm512_mask_add_ps(count, _mm512_cmp_ps_mask(m, tau, _CMP_GT_OQ), count, one);
    return;
  } else if constexpr (std::is_same_v<A, double>) {
    count = _mm512_mask_add_pd(count, _mm512_cmp_pd_mask(m, tau, _CMP_GT_OQ), count, one);
    return;
  }
#endif
  count = count + ((m > tau) & one);
}

// The bound on the Newton steps of one scalar equation, in every CPU kernel (the Euclidean
// exclusive threshold here, the metric group and exclusive steps in metric_rules.h); the same
// as the Triton kernels' MAX_NEWTON and the phased step's (fastprox/_rules.py). Typical data
// needs 3-15.
constexpr int kMaxNewton = 100;

// Per-group parameters of the rewrite  y = pre(x) * scale,  then  y = shrink_magnitude(y, tau).
template <typename A>
struct GroupParams {
  A scale = 1;
  A tau = 0;
  A active = 0;          // exact exclusive: count of magnitudes above tau
  int steps = 0;         // exact exclusive: Newton steps taken
  bool iterate = false;  // exact exclusive: tau still to be refined
  int64_t group = 0;     // AboveStep: where newton() stores the group's sums
};

// The fused proximal step of group lasso (kGroup), sparse group lasso (kL1 + kGroup), exclusive
// lasso (kExcl) and CGES (kGroup + kExcl); formulas in docs/SPEC.md.
template <typename A, bool kL1, bool kGroup, bool kExcl>
struct ProxStep {
  using V = at::vec::Vectorized<A>;
  static constexpr bool kWantSumSq = kGroup;
  static constexpr bool kWantAbs = kExcl;
  static constexpr bool kRewrite = true;
  static constexpr bool kWrite = true;
  static constexpr bool kScales = kGroup;  // the rewrite multiplies by a per-group scale

  A l1 = 0;       // soft threshold applied first (sparse group lasso)
  A t = 0;        // group threshold lam * c
  A lam_e = 0;    // exclusive lam
  bool exact = true;

  V pre(const V& x) const {
    if constexpr (kL1) {
      return shrink_magnitude(x, V(l1));
    } else {
      return x;
    }
  }

  // sum_sq, sum_abs, nonzero: sums over pre(x) of the group (sum_abs/nonzero only with kExcl).
  GroupParams<A> finish(int64_t /*group*/, A sum_sq, A sum_abs, A nonzero) const {
    GroupParams<A> p;
    // A sub-step whose lam is 0 is skipped, as in the composition it fuses (a NaN must not
    // spread over its group through a step that is not taken).
    if (kGroup && t > A(0)) {
      const A norm = std::sqrt(sum_sq);
      // Written so that NaN norms give a NaN scale (the group becomes NaN), inf norms give 1
      // (the group keeps its values), and a zero group gets 0 without dividing by zero.
      p.scale = norm <= t ? A(0) : A(1) - t / norm;
    }
    if (kExcl && lam_e > A(0)) {
      const A s = p.scale;
      const A l1_norm = sum_abs * s;  // of the values the exclusive step sees
      if (std::isnan(l1_norm)) {
        p.tau = std::numeric_limits<A>::quiet_NaN();
      } else if (std::isinf(l1_norm) || s == A(0)) {
        p.tau = 0;  // an infinite group keeps its values; a group shrunk to zero stays zero
      } else if (!exact) {
        // CGES's update, an upper bound of the exact threshold (0 * inf guarded: a zero group
        // with a lam that overflows A).
        p.tau = l1_norm > A(0) ? lam_e * l1_norm : A(0);
      } else {
        p.tau = newton_tau(l1_norm, nonzero);  // first Newton step from tau = 0
        p.active = nonzero;
        p.iterate = nonzero > A(0);
      }
    }
    return p;
  }

  // lam S / (1 + lam k), written so that a lam that overflows A (inf) still gives S / k.
  A newton_tau(A sum, A count) const {
    return count > A(0) ? sum / (A(1) / lam_e + count) : A(0);
  }

  // One Newton step for the exact exclusive threshold, given the sum and count of the magnitudes
  // above the current tau. tau solves tau = lam * sum_i max(a_i - tau, 0): Newton from 0 rises
  // monotonically and stops exactly when the active set stops changing, so the active count
  // strictly falls until then (at most n steps; a handful in practice; kMaxNewton at most, then
  // tau is a lower bound: the group under-shrinks, never over-shrinks).
  void newton(GroupParams<A>& p, A sum_above, A count_above) const {
    if (!(count_above < p.active) || count_above == A(0)) {
      p.iterate = false;  // same active set: tau is exact (count 0 only by rounding at tiny n)
      return;
    }
    p.tau = std::max(p.tau, newton_tau(sum_above, count_above));
    p.active = count_above;
    p.iterate = ++p.steps < kMaxNewton;
  }

  V rewrite(const V& x, const V& scale, const V& tau) const {
    V y = pre(x);
    if constexpr (kGroup) y = y * scale;
    if constexpr (kExcl) y = shrink_magnitude(y, tau);
    return y;
  }
};

// Norms only: writes sqrt(sum of squares) per group, rewrites nothing.
template <typename T>
struct NormStep {
  using A = at::opmath_type<T>;
  using V = at::vec::Vectorized<A>;
  static constexpr bool kWantSumSq = true;
  static constexpr bool kWantAbs = false;
  static constexpr bool kRewrite = false;
  static constexpr bool kWrite = false;
  static constexpr bool kScales = false;
  T* out;

  V pre(const V& x) const { return x; }
  GroupParams<A> finish(int64_t group, A sum_sq, A, A) const {
    out[group] = static_cast<T>(std::sqrt(sum_sq));
    return {};
  }
  void newton(GroupParams<A>&, A, A) const {}
  V rewrite(const V& x, const V&, const V&) const { return x; }
};

// The phases of a step whose groups lie in several places (coupled groups spanning tensors,
// groups spanning shards; fastprox/_phases.py): per-group sums of pre(x) = soft(x, l1), to be
// combined over the places by the caller ...
template <typename A, bool kL1>
struct SoftThresholdFirst {  // pre(x) of the phase steps: the soft threshold by l1, if taken
  using V = at::vec::Vectorized<A>;
  A l1 = 0;
  V pre(const V& x) const {
    if constexpr (kL1) {
      return shrink_magnitude(x, V(l1));
    } else {
      return x;
    }
  }
};

template <typename A, bool kL1, bool kSq, bool kAbs>
struct SumsStep : SoftThresholdFirst<A, kL1> {
  using V = at::vec::Vectorized<A>;
  static constexpr bool kWantSumSq = kSq;
  static constexpr bool kWantAbs = kAbs;
  static constexpr bool kRewrite = false;
  static constexpr bool kWrite = false;
  static constexpr bool kScales = false;
  A* sum_sq = nullptr;   // [groups], group order
  A* sum_abs = nullptr;
  A* nonzero = nullptr;

  GroupParams<A> finish(int64_t group, A sq, A abs, A nz) const {
    if constexpr (kSq) sum_sq[group] = sq;
    if constexpr (kAbs) {
      sum_abs[group] = abs;
      nonzero[group] = nz;
    }
    return {};
  }
  void newton(GroupParams<A>&, A, A) const {}
  V rewrite(const V& x, const V&, const V&) const { return x; }
};

// ... and the rewrite with the per-group scale and threshold computed from the combined sums:
// y = pre(x) * scale (kScale), then shrink_magnitude(y, tau) (kTau). No sums are taken.
template <typename A, bool kL1, bool kScale, bool kTau>
struct RewriteStep : SoftThresholdFirst<A, kL1> {
  using V = at::vec::Vectorized<A>;
  static constexpr bool kWantSumSq = false;
  static constexpr bool kWantAbs = false;
  static constexpr bool kRewrite = true;
  static constexpr bool kWrite = true;
  static constexpr bool kScales = kScale;
  const A* scale = nullptr;  // [groups], group order
  const A* tau = nullptr;

  GroupParams<A> finish(int64_t group, A, A, A) const {
    GroupParams<A> p;
    if constexpr (kScale) p.scale = scale[group];
    if constexpr (kTau) p.tau = tau[group];
    return p;
  }
  void newton(GroupParams<A>&, A, A) const {}
  V rewrite(const V& x, const V& s, const V& t) const {
    V y = this->pre(x);
    if constexpr (kScale) y = y * s;
    if constexpr (kTau) y = shrink_magnitude(y, t);
    return y;
  }
};

// ... and the sums of one Newton step of the exact exclusive threshold with given per-group
// scale and tau: per group, the sum and the count of the magnitudes m = |pre(x)| * scale (kScale)
// above tau. The engine's Newton pass, run once per call, and nothing written.
template <typename A, bool kL1, bool kScale>
struct AboveStep : SoftThresholdFirst<A, kL1> {
  using V = at::vec::Vectorized<A>;
  static constexpr bool kWantSumSq = false;
  static constexpr bool kWantAbs = false;
  static constexpr bool kRewrite = true;   // the Newton passes of the rewrite ...
  static constexpr bool kWrite = false;    // ... but no write
  static constexpr bool kScales = kScale;
  const A* scale = nullptr;  // [groups], group order
  const A* tau = nullptr;
  A* sum_above = nullptr;    // [groups], group order
  A* count_above = nullptr;

  GroupParams<A> finish(int64_t group, A, A, A) const {
    GroupParams<A> p;
    if constexpr (kScale) p.scale = scale[group];
    p.tau = tau[group];
    p.iterate = true;  // one pass
    p.group = group;
    return p;
  }
  void newton(GroupParams<A>& p, A sum, A count) const {
    sum_above[p.group] = sum;
    count_above[p.group] = count;
    p.iterate = false;
  }
  V rewrite(const V& x, const V&, const V&) const { return x; }
};

}  // namespace fastprox::cpu
