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
// argument in error messages. The per-group step is ProxStep (group_engine.h); the contract is
// docs/SPEC.md.
//
// A tensor whose only step is the soft threshold (lg = le = 0) has no groups: its memory span
// (or a contiguous copy of a non-dense view) is cut into units and thresholded elementwise,
// whatever its dims.
//
// Why one region: a model is mostly small tensors, and a call per tensor pays a fixed cost and
// a thread fork/join per tensor. Work units of all tensors (a few groups of a row-layout tensor,
// a small column-layout tensor whole) are handed out to the threads dynamically. Column-layout
// tensors of kOwnColumnPathElems or more take the single-tensor column path (its own parallel
// regions) before the shared region: splitting them into column tiles, one per unit, measured
// 2-3x slower than streaming whole rows (bench/RESULTS.md).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <atomic>
#include <functional>
#include <type_traits>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

namespace fastprox::cpu {
namespace {

constexpr int64_t kUnitElems = 1 << 18;         // elements per work unit of the shared region
constexpr int64_t kUnitsWanted = 8;              // ... smaller down to kParallelGrainElems while
                                                 // a call has fewer units than this
constexpr int64_t kOwnColumnPathElems = 1 << 16;  // column-layout tensors this large run alone

// Elements per work unit for a call moving `total` elements: kUnitElems, or less when that
// leaves the threads without work (a single 512x512 weight is one unit of 2^18 otherwise).
// A function of the sizes alone, never of the thread count: results do not depend on it.
int64_t unit_elems(int64_t total) {
  int64_t unit = kUnitElems;
  while (unit > kParallelGrainElems && total < kUnitsWanted * unit) unit /= 2;
  return unit;
}

// [first byte, last byte + 1) of a tensor's elements (empty for an empty tensor).
std::pair<uintptr_t, uintptr_t> address_range(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) return {begin, begin};
  int64_t lo = 0, hi = 0;  // element offsets from data_ptr (strides may be negative in C++)
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = (t.size(d) - 1) * t.stride(d);
    (span < 0 ? lo : hi) += span;
  }
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {begin + lo * item, begin + (hi + 1) * item};
}

struct Unit {
  std::function<void()> run;
};

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

template <typename T, typename Step>
void add_units(T* data, const GroupShape& s, const Step& step, int64_t unit,
               std::vector<Unit>& units,
               std::vector<std::function<void()>>& alone) {
  if (s.num_groups() == 0 || s.group_size() == 0) return;
  if (uses_chunk_path(s)) {
    const int64_t per_unit = std::max<int64_t>(1, unit / s.group_size());
    for (int64_t g = 0; g < s.num_groups(); g += per_unit) {
      const int64_t end = std::min(s.num_groups(), g + per_unit);
      units.push_back({[=] {
        for (int64_t gi = g; gi < end; ++gi) detail::chunk_group(data, s, step, gi);
      }});
    }
    return;
  }
  if (s.batch * s.outer * s.groups * s.inner >= kOwnColumnPathElems) {
    alone.push_back([=] { detail::column_path(data, s, step); });
    return;
  }
  // Tiles of whole groups, at least two vectors wide so that row segments are not scalar.
  constexpr int64_t kMinWidth = 2 * Lanes<T>::kWidth;
  const int64_t by_size = (unit + s.group_size() - 1) / s.group_size();
  const int64_t by_width = (std::min(kMinWidth, s.groups * s.inner) + s.inner - 1) / s.inner;
  const int64_t per_unit = std::max<int64_t>({1, by_size, by_width});
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t g = 0; g < s.groups; g += per_unit) {
      const int64_t end = std::min(s.groups, g + per_unit);
      units.push_back({[=] { detail::column_tile(data, s, step, b, g, end); }});
    }
  }
}

void foreach_prox_cpu(at::TensorList weights, const at::Tensor& lams, at::IntArrayRef dims,
                      at::IntArrayRef dim_counts, const c10::List<bool>& size_weighted,
                      const c10::List<bool>& exact, c10::string_view caller,
                      const std::optional<std::vector<c10::string_view>>& names) {
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(dim_counts.size() == weights.size() && size_weighted.size() == weights.size() &&
                        exact.size() == weights.size(),
                    caller, ": dim_counts, size_weighted and exact need one entry per weight");
  const std::vector<c10::string_view> lam_names =
      names ? *names : std::vector<c10::string_view>{"lam_l1", "lam_group", "lam_exclusive"};
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
  // Two tensors on the same memory would race. Checked on address ranges (conservative: views
  // whose ranges interleave are refused even when their elements are disjoint).
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const at::Tensor& w : weights) ranges.push_back(address_range(w));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(ranges[i].first >= ranges[j].second || ranges[j].first >= ranges[i].second,
                        caller, ": weights[", j, "] and weights[", i, "] share memory");
    }
  }

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
                              static_cast<at::opmath_type<scalar_t>>(l1), span, units);
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
        step.l1 = static_cast<A>(l1);
        step.t = static_cast<A>(lg * c);
        step.lam_e = static_cast<A>(le);
        step.exact = exact[i];
        add_units(layouts[i].work.data_ptr<scalar_t>(), s, step, unit, units, alone);
      });
    });
  }

  for (const auto& run : alone) run();
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(units.size());
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t u = next++; u < count; u = next++) units[u].run();
  });
  for (int64_t i = 0; i < n; ++i) {
    if (layouts[i].work.defined()) finish_groups(weights[i], layouts[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("foreach_prox_", &foreach_prox_cpu); }

}  // namespace fastprox::cpu
