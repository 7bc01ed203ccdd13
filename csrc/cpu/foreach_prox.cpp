// foreach_prox_(weights, lams, dims, dim_counts, size_weighted, exact, caller, lam_names): the
// CPU's one in-place kernel, one proximal step per tensor of a list, all in one parallel region.
// Per tensor i, with (l1, lg, le) = lams[3i : 3i+3]:
//   W <- soft threshold by l1, then group shrink by lg * c (c = sqrt(n) if size_weighted[i]),
//        then exclusive shrink by le (exact[i]: exact threshold, else CGES's bound)
// each sub-step skipped when its lam is 0. The five in-place operators (group_shrink_,
// soft_threshold_, sparse_group_shrink_, exclusive_shrink_, cges_shrink_) are presets of this
// step (fastprox/operators.py). Tensor i's groups reduce
// dims[sum(dim_counts[:i]) : sum(dim_counts[:i+1])]. `caller` and `lam_names` (the caller's names
// of the three thresholds; default: lam_l1, lam_group, lam_exclusive) name the function and
// argument in error messages. The per-group step is ProxStep (group_steps.h); the contract is
// docs/SPEC.md.
//
// A tensor whose only step is the soft threshold (lg = le = 0) has no groups: its memory span
// (or a contiguous copy of a non-dense view) is cut into units and thresholded elementwise,
// whatever its dims.
//
// The work units and the shared parallel region: multi_tensor.h.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <functional>
#include <string>
#include <type_traits>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu {
namespace {

// Checks of one weight, in the order the Python API checks them.
void check_group_op(const at::Tensor& weight, at::IntArrayRef dim) {
  check_weight(weight);
  reduced_mask(weight, dim);
  check_writable(weight);
}

// The soft threshold alone: elementwise over [0, numel) of a contiguous span.
template <typename T>
void add_elementwise_units(T* data, int64_t numel, typename Lanes<T>::A lam, int64_t unit,
                           std::vector<Unit>& units) {
  using L = Lanes<T>;
  for (int64_t begin = 0; begin < numel; begin += unit) {
    const int64_t end = std::min(numel, begin + unit);
    units.push_back({[=] {
      const typename L::V tau(lam);
      constexpr int64_t kStep = 4 * L::kWidth;  // four independent loads in flight
      int64_t i = begin;
      for (; i + kStep <= end; i += kStep) {
        typename L::V x[4][L::kParts];
        for (int u = 0; u < 4; ++u) L::load(data + i + u * L::kWidth, L::kWidth, x[u]);
        for (auto& xs : x) {
          for (auto& v : xs) v = shrink_magnitude(v, tau);
        }
        for (int u = 0; u < 4; ++u) L::store(data + i + u * L::kWidth, L::kWidth, x[u]);
      }
      for (; i < end; i += L::kWidth) {
        const int64_t count = std::min(L::kWidth, end - i);
        typename L::V x[L::kParts];
        L::load(data + i, count, x);
        for (auto& v : x) v = shrink_magnitude(v, tau);
        L::store(data + i, count, x);
      }
    }});
  }
}

// Calls f(bool_constant<kL1>, bool_constant<kGroup>, bool_constant<kExcl>) for the steps that
// are taken (lam > 0); a zero-lam sub-step of the combined instance is skipped at run time.
template <typename F>
void with_step(bool l1, bool group, bool excl, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (l1 && !group && !excl) return f(T{}, N{}, N{});
  if (!l1 && group && !excl) return f(N{}, T{}, N{});
  if (l1 && group && !excl) return f(T{}, T{}, N{});
  if (!l1 && !group && excl) return f(N{}, N{}, T{});
  if (!l1 && group && excl) return f(N{}, T{}, T{});
  return f(T{}, T{}, T{});
}

void foreach_prox_cpu(at::TensorList weights, const at::Tensor& lams, at::IntArrayRef dims,
                      at::IntArrayRef dim_counts, const c10::List<bool>& size_weighted,
                      const c10::List<bool>& exact, c10::string_view caller,
                      const std::optional<std::vector<std::string>>& names) {
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(dim_counts.size() == weights.size() && size_weighted.size() == weights.size() &&
                        exact.size() == weights.size(),
                    caller, ": dim_counts, size_weighted and exact need one entry per weight");
  // owned strings: views of a str[] argument need not outlive its conversion
  const std::vector<std::string> lam_names =
      names ? *names : std::vector<std::string>{"lam_l1", "lam_group", "lam_exclusive"};
  TORCH_CHECK_VALUE(lam_names.size() == 3, caller, ": lam_names must name the three thresholds");
  TORCH_CHECK_VALUE(lams.numel() == 3 * n && lams.scalar_type() == at::kDouble &&
                        lams.device().is_cpu(),
                    caller, ": lams must be a float64 CPU tensor of 3 * len(weights) values");
  // Every check before any memory is touched.
  const at::Tensor lam_values = lams.contiguous();
  const double* lam = lam_values.data_ptr<double>();
  std::vector<at::IntArrayRef> tensor_dims;
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(dim_counts[i] >= 0 && offset + dim_counts[i] <= int64_t(dims.size()),
                      caller, ": dim_counts do not match dims");
    tensor_dims.push_back(dims.slice(offset, dim_counts[i]));
    offset += dim_counts[i];
    check_group_op(weights[i], tensor_dims.back());
    TORCH_CHECK_VALUE(weights[i].device() == weights[0].device(),
                      caller, ": weights[", i, "] is on ", weights[i].device(),
                      " but weights[0] is on ", weights[0].device());
    for (int k = 0; k < 3; ++k) {
      const double v = lam[i * 3 + k];
      // indexed by weight when there are several
      TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, caller, ": ", lam_names[k],
                        n > 1 ? "[" + std::to_string(i) + "]" : std::string(),
                        " must be a finite number >= 0, got ", v);
    }
  }
  TORCH_CHECK_VALUE(offset == int64_t(dims.size()), caller, ": dim_counts do not match dims");
  check_disjoint(weights, caller);

  std::vector<GroupLayout> layouts(n);
  std::vector<Unit> units;
  std::vector<std::function<void()>> alone;
  int64_t total = 0;  // elements the call rewrites
  for (int64_t i = 0; i < n; ++i) {
    if (lam[i * 3] != 0 || lam[i * 3 + 1] != 0 || lam[i * 3 + 2] != 0) total += weights[i].numel();
  }
  const int64_t unit = unit_elems(total);
  for (int64_t i = 0; i < n; ++i) {
    const double l1 = lam[i * 3], lg = lam[i * 3 + 1], le = lam[i * 3 + 2];
    if (weights[i].numel() == 0 || (l1 == 0 && lg == 0 && le == 0)) continue;  // bit-identical
    if (lg == 0 && le == 0) {  // elementwise: the memory span of a dense weight, else a copy
      GroupLayout& flat = layouts[i];
      flat.is_copy = !weights[i].is_non_overlapping_and_dense();
      flat.work = flat.is_copy ? weights[i].contiguous() : weights[i];
      // No sums, so the split may follow the thread count: one contiguous span per thread
      // streams best (as an in-place mul_ does).
      const int64_t threads = at::get_num_threads();
      const int64_t span = std::max(unit, (flat.work.numel() + threads - 1) / threads);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                      "foreach_prox_", [&] {
        add_elementwise_units(flat.work.data_ptr<scalar_t>(), flat.work.numel(),
                              threshold_as<at::opmath_type<scalar_t>>(l1), span, units);
      });
      continue;
    }
    layouts[i] = analyze_groups(weights[i], tensor_dims[i]);
    const GroupShape& s = layouts[i].shape;
    const double c = size_weighted[i] ? std::sqrt(double(s.group_size())) : 1.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "foreach_prox_", [&] {
      using A = at::opmath_type<scalar_t>;
      with_step(l1 > 0, lg > 0, le > 0, [&](auto kL1, auto kGroup, auto kExcl) {
        ProxStep<A, decltype(kL1)::value, decltype(kGroup)::value, decltype(kExcl)::value> step;
        step.l1 = threshold_as<A>(l1);
        step.t = threshold_as<A>(lg * c);
        step.lam_e = threshold_as<A>(le);
        step.exact = exact[i];
        add_units(layouts[i].work.data_ptr<scalar_t>(), s, step, unit, units, alone);
      });
    });
  }

  run_units(units, alone);
  for (int64_t i = 0; i < n; ++i) {
    if (layouts[i].work.defined()) finish_groups(weights[i], layouts[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("foreach_prox_", &foreach_prox_cpu); }

}  // namespace fastprox::cpu
