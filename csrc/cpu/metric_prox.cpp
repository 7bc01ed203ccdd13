// foreach_metric_prox_: the fused step in an optimizer's diagonal metric (docs/SPEC.md, "Proximal
// steps in an optimizer's metric"), on a list of weights, each with the second moment its last
// Adam step used. Per weight i with (l1, lg, le) = lams[i] and (s, eps, lr) = metric[i]:
//
//     d = (sqrt(v * s) + eps) / lr                  (s = 1 / (1 - beta2^t))
//     W <- metric soft threshold by l1 / d, metric group step by t = lg * c, metric exclusive
//          step by le (exact threshold, or CGES's bound)          (a lam of 0: skipped)
//
// The per-group rules are metric_rules.h's. Two traversals, both one read of W and v and one write of W, every group computed by one
// thread in a fixed order (the result does not depend on the thread count):
//  * interleaved (groups side by side in every row, in runs of `inner` <= 128: columns of a
//    Linear, conv input channels with their window; no exclusive step): a block of neighbouring
//    groups is read row by row (contiguous runs, prefetched ahead; no transposing gather) into
//    a buffer, d, the soft threshold and every group's statistics computed on the way in; the
//    Newton steps of all groups of the block run over the buffer side by side in vector lanes;
//    the result is written straight back;
//  * blocks (everything else): a block of neighbouring groups copied group-major into a buffer,
//    each group's first pass, Newton steps and exclusive step there, then written back.
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
#include "cpu/metric_rules.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu {
namespace {

using namespace metric;  // the per-group rules (metric_rules.h)

constexpr int64_t kBlockElems = 1 << 15;      // group-major path: elements of one block
constexpr int64_t kLaneBlockElems = 1 << 16;  // interleaved path: elements of a block, about
constexpr int64_t kLaneWidthMax = 256;        // interleaved path: positions of a block's row
constexpr int64_t kPartialRows = 64;          // interleaved path: rows summed in A, then double

// -- interleaved traversal: groups side by side in every row -----------------------------------

// A block of `groups` neighbouring groups of `inner` elements per row, copied row by row into
// a buffer of `rows` rows of `width` positions (position k of a row: group k / inner; positions
// from groups * inner on are padding), after the first pass. Solves every group's step from the
// buffer: per position, P and Q summed in A over kPartialRows rows, then in double; per group,
// its positions added in double in order; the rules of metric_group. Leaves per position theta
// (0 where not solved) and the GroupCase, for the rewrite.
template <typename A>
void solve_block(const A* x, const A* d, int64_t rows, int64_t width, int64_t groups,
                 int64_t inner, A t, const Stats<A>* st, A* th, A* code) {
  using V = Vec<A>;
  constexpr int64_t L = V::size();
  const int64_t vectors = width / L;
  A absmax[kLaneWidthMax], dz2[kLaneWidthMax], dmax[kLaneWidthMax];
  for (int64_t c = 0; c < vectors; ++c) {
    st[c].absmax.store(absmax + c * L);
    st[c].dz2.store(dz2 + c * L);
    st[c].dmax.store(dmax + c * L);
  }
  double theta[kLaneWidthMax];
  bool live[kLaneWidthMax];
  int64_t solving = 0;
  for (int64_t g = 0; g < groups; ++g) {
    A am = 0, sum = 0, top = 0;
    for (int64_t i = g * inner; i < (g + 1) * inner; ++i) {
      am = am != am ? am : (absmax[i] != absmax[i] ? absmax[i] : std::max(am, absmax[i]));
      sum += dz2[i];
      top = std::max(top, dmax[i]);
    }
    const A a = std::sqrt(sum);
    const GroupCase c = group_case(am, a, t);
    code[g] = A(int(c));
    live[g] = c == kSolve;
    theta[g] = live[g] ? theta_start(a, t, top) : 0.0;
    solving += live[g];
  }
  const V vt(t);
  for (int k = 0; k < kMaxNewton && solving > 0; ++k) {
    for (int64_t i = 0; i < width; ++i) th[i] = i < groups * inner ? A(theta[i / inner]) : A(0);
    double sp[kLaneWidthMax] = {}, sq[kLaneWidthMax] = {};
    for (int64_t r0 = 0; r0 < rows; r0 += kPartialRows) {
      const int64_t r1 = std::min(rows, r0 + kPartialRows);
      for (int64_t c = 0; c < vectors; ++c) {
        const V vth = V::loadu(th + c * L);
        V vp(A(0)), vq(A(0));
        for (int64_t r = r0; r < r1; ++r) {
          add_newton_terms(vp, vq, V::loadu(x + r * width + c * L),
                           V::loadu(d + r * width + c * L), vth, vt);
        }
        A part_p[L], part_q[L];
        vp.store(part_p);
        vq.store(part_q);
        for (int64_t j = 0; j < L; ++j) {
          sp[c * L + j] += double(part_p[j]);
          sq[c * L + j] += double(part_q[j]);
        }
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      if (!live[g]) continue;
      double p = 0.0, q = 0.0;
      for (int64_t i = g * inner; i < (g + 1) * inner; ++i) {
        p += sp[i];
        q += sq[i];
      }
      if (newton_step<A>(theta[g], p, q)) {
        live[g] = false;
        --solving;
      }
    }
  }
  for (int64_t i = width - 1; i >= 0; --i) {  // per position (code per group -> per position)
    const bool used = i < groups * inner;
    th[i] = used ? A(theta[i / inner]) : A(0);
    code[i] = used ? code[i / inner] : A(int(kZero));
  }
}

// x d_i theta / (d_i theta + t), or 0, NaN, x by the group's case.
template <typename A>
inline Vec<A> block_result(const Vec<A>& x, const Vec<A>& d, const Vec<A>& theta,
                           const Vec<A>& code, A t) {
  using V = Vec<A>;
  const V dth = d * theta;
  V y = x * dth / (dth + V(t));
  y = V::blendv(y, V(A(0)), code == V(A(int(kZero))));
  y = V::blendv(y, V(std::numeric_limits<A>::quiet_NaN()), code == V(A(int(kNan))));
  return V::blendv(y, x, code == V(A(int(kKeep))));
}

// -- one weight ------------------------------------------------------------------------------


// Groups side by side in every row, in short runs (columns of a Linear, a conv's input channels
// with their kernel window), no exclusive step: a block of neighbouring groups is read row by row
// (contiguous runs, no transposing gather), first pass on the way into the buffer, solved from
// the buffer with groups side by side in vector lanes, and the result written straight back: one
// read of W and v, one write of W.
template <typename T, typename V>
void metric_interleaved(T* w, const V* v, const GroupShape& s,
                        const MetricParams<at::opmath_type<T>>& p) {
  using A = at::opmath_type<T>;
  constexpr int64_t L = Vec<A>::size();
  const int64_t run = s.groups * s.inner;  // elements of a row of one batch entry
  const int64_t fit = std::max<int64_t>(1, kLaneBlockElems / (s.outer * L)) * L;
  const int64_t per_block = std::max<int64_t>(1, std::min({kLaneWidthMax, fit}) / s.inner);
  const int64_t width = (per_block * s.inner + L - 1) / L * L;
  const int64_t blocks_per_batch = (s.groups + per_block - 1) / per_block;
  const int64_t blocks = s.batch * blocks_per_batch;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElems / (width * s.outer));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    auto [x, d] = block_buffers<A>(width * s.outer);
    const MetricParams<A> mp = p;  // a local copy: the buffers' stores cannot change it
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / blocks_per_batch;
      const int64_t g0 = (blk % blocks_per_batch) * per_block;
      const int64_t groups = std::min(s.groups - g0, per_block);
      const int64_t count = groups * s.inner;  // positions of a row in this block
      const int64_t vectors = (count + L - 1) / L;
      const int64_t base = b * s.outer * run + g0 * s.inner;
      Stats<A> st[kLaneWidthMax / L];
      for (int64_t o = 0; o < s.outer; ++o) {
        const T* wr = w + base + o * run;
        const V* vr = v + base + o * run;
        if (o + kPrefetchRows < s.outer) {  // rows far apart: the hardware does not prefetch
          prefetch_run(wr + kPrefetchRows * run, count);
          prefetch_run(vr + kPrefetchRows * run, count);
        }
        for (int64_t c = 0; c < vectors; ++c) {
          const int64_t k = std::min(L, count - c * L);  // missing lanes: 0, in no group
          Vec<A> xv = load_as<A>(wr + c * L, k), dv = load_as<A>(vr + c * L, k);
          first_pass(xv, dv, mp, st[c]);
          xv.store(x + o * width + c * L);
          dv.store(d + o * width + c * L);
        }
      }
      if (p.t > A(0)) {
        A th[kLaneWidthMax], code[kLaneWidthMax];
        solve_block(x, d, s.outer, width, groups, s.inner, p.t, st, th, code);
        for (int64_t o = 0; o < s.outer; ++o) {
          for (int64_t c = 0; c < vectors; ++c) {
            const int64_t at = o * width + c * L;
            store_as(w + base + o * run + c * L,
                     block_result(Vec<A>::loadu(x + at), Vec<A>::loadu(d + at),
                                  Vec<A>::loadu(th + c * L), Vec<A>::loadu(code + c * L), p.t),
                     std::min(L, count - c * L));
          }
        }
      } else {
        for (int64_t o = 0; o < s.outer; ++o) {
          for (int64_t c = 0; c < vectors; ++c) {
            store_as(w + base + o * run + c * L, Vec<A>::loadu(x + o * width + c * L),
                     std::min(L, count - c * L));
          }
        }
      }
    }
  });
}

// Everything else (rows, conv filters' input channels with their kernel window, the exclusive
// step): per block of neighbouring groups of one batch entry, the groups copied group-major
// into a buffer (a row of the block is a contiguous run of memory), solved one by one, written
// back.
template <typename T, typename V>
void metric_blocks(T* w, const V* v, const GroupShape& s, const MetricParams<at::opmath_type<T>>& p) {
  using A = at::opmath_type<T>;
  const int64_t n = s.group_size();
  const int64_t per_block = std::max<int64_t>(1, std::min(s.groups, kBlockElems / n));
  const int64_t blocks_per_batch = (s.groups + per_block - 1) / per_block;
  const int64_t blocks = s.batch * blocks_per_batch;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElems / (per_block * n));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    auto [x, d] = block_buffers<A>(per_block * n);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t b = blk / blocks_per_batch;
      const int64_t g0 = (blk % blocks_per_batch) * per_block;
      const int64_t g1 = std::min(s.groups, g0 + per_block);
      const int64_t base = b * s.outer * s.groups * s.inner;
      for (int64_t o = 0; o < s.outer; ++o) {  // gather: group-major buffers
        const int64_t row = base + (o * s.groups + g0) * s.inner;
        for (int64_t g = g0; g < g1; ++g) {
          const T* wr = w + row + (g - g0) * s.inner;
          const V* vr = v + row + (g - g0) * s.inner;
          A* xr = x + (g - g0) * n + o * s.inner;
          A* dr = d + (g - g0) * n + o * s.inner;
          for (int64_t i = 0; i < s.inner; ++i) xr[i] = static_cast<A>(wr[i]);
          for (int64_t i = 0; i < s.inner; ++i) dr[i] = static_cast<A>(vr[i]);
        }
      }
      for (int64_t g = g0; g < g1; ++g) metric_group(x + (g - g0) * n, d + (g - g0) * n, n, p);
      for (int64_t o = 0; o < s.outer; ++o) {  // scatter back
        const int64_t row = base + (o * s.groups + g0) * s.inner;
        for (int64_t g = g0; g < g1; ++g) {
          T* wr = w + row + (g - g0) * s.inner;
          const A* xr = x + (g - g0) * n + o * s.inner;
          for (int64_t i = 0; i < s.inner; ++i) wr[i] = static_cast<T>(xr[i]);
        }
      }
    }
  });
}

template <typename T, typename V>
void metric_tensor(T* w, const V* v, const GroupShape& s, const MetricParams<at::opmath_type<T>>& p) {
  using A = at::opmath_type<T>;
  if (s.num_groups() == 0 || s.group_size() == 0) return;
  if (s.outer > 1 && s.inner <= kLaneWidthMax / 2 && p.le <= A(0) &&
      s.groups * s.inner >= Vec<A>::size()) {
    metric_interleaved(w, v, s, p);
  } else {
    metric_blocks(w, v, s, p);
  }
}


void foreach_metric_prox_cpu(at::TensorList weights, at::TensorList moments,
                             const at::Tensor& lams, const at::Tensor& metric,
                             at::IntArrayRef dims, at::IntArrayRef dim_counts,
                             const c10::List<bool>& size_weighted, const c10::List<bool>& exact,
                             const std::optional<std::vector<std::string>>& names,
                             bool moments_checked) {
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
    TORCH_CHECK_VALUE(moments_checked || valid_moment(moments[i]), op, ": ", moment_name(i),
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
      p.scale = static_cast<A>(M[3 * i]);
      p.eps = static_cast<A>(M[3 * i + 1]);
      p.inv_lr = static_cast<A>(1.0 / M[3 * i + 2]);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                      "foreach_metric_prox_", [&] {
        metric_tensor(layout.work.data_ptr<W>(), v.const_data_ptr<scalar_t>(), layout.shape, p);
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
