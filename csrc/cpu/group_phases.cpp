// The phases of a proximal step whose groups lie in several places (fastprox/_phases.py: groups
// coupled across tensors, groups spanning shards), fused per tensor:
//
//   foreach_group_sums(Ws, dims, dim_counts, lam_l1, what) -> per W, (k, *kept): per group of W,
//       over y = soft(W, lam_l1): what & 1: sum of y^2; what & 2: sum of |y| and the count of
//       nonzero y (k = the statistics asked for, in that order), float32 (float64 for float64)
//   foreach_group_rewrite_(Ws, dims, dim_counts, lam_l1, scales, taus): per W and group g,
//       W_g <- shrink_magnitude(soft(W_g, lam_l1) * scale_g, tau_g)
//       (scale / tau: per group, shaped like the kept dimensions; None skips that part)
//   foreach_group_sums_above(Ws, dims, dim_counts, lam_l1, scales, taus) -> per W, (2, *kept):
//       per group, with m = |soft(W_g, lam_l1)| * scale_g (scale None: 1), the sum and the count
//       of the m > tau_g (one Newton step of the exact exclusive threshold)
//
// The caller combines the sums of one group over its places (in a fixed order) and applies the
// per-group rules of docs/SPEC.md between the two. One read of W for the sums, one read and one
// write for the rewrite, in the traversals of group_engine.h (deterministic sums); all tensors
// of a call in one parallel region (multi_tensor.h). Tensor i's groups reduce the next
// dim_counts[i] entries of dims.
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu {
namespace {

at::ScalarType accumulation_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::vector<int64_t> kept_shape(const at::Tensor& weight, const std::vector<bool>& reduced) {
  std::vector<int64_t> shape;
  for (int64_t d = 0; d < weight.dim(); ++d) {
    if (!reduced[d]) shape.push_back(weight.size(d));
  }
  return shape;
}

template <typename F>
void with_flags(bool a, bool b, F&& f) {
  using T = std::true_type;
  using N = std::false_type;
  if (a && b) return f(T{}, T{});
  if (a) return f(T{}, N{});
  if (b) return f(N{}, T{});
  return f(N{}, N{});
}

template <typename F>
void with_flags(bool a, bool b, bool c, F&& f) {
  if (a) {
    with_flags(b, c, [&](auto kb, auto kc) { f(std::true_type{}, kb, kc); });
  } else {
    with_flags(b, c, [&](auto kb, auto kc) { f(std::false_type{}, kb, kc); });
  }
}

// The work unit of a call over these weights (multi_tensor.h): sized by their elements.
int64_t unit_of(at::TensorList weights) {
  int64_t total = 0;
  for (const at::Tensor& w : weights) total += w.numel();
  return unit_elems(total);
}

// Checks every weight, its dims and its lam_l1 (before any memory is touched); returns the dims
// of each weight.
std::vector<at::IntArrayRef> check_list(const char* op, at::TensorList weights,
                                        at::IntArrayRef dims, at::IntArrayRef dim_counts,
                                        at::ArrayRef<double> lam_l1, bool writes) {
  const size_t n = weights.size();
  TORCH_CHECK_VALUE(dim_counts.size() == n && lam_l1.size() == n, op,
                    ": dim_counts and lam_l1 need one entry per weight");
  std::vector<at::IntArrayRef> out;
  int64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(dim_counts[i] >= 0 && offset + dim_counts[i] <= int64_t(dims.size()), op,
                      ": dim_counts do not match dims");
    out.push_back(dims.slice(offset, dim_counts[i]));
    offset += dim_counts[i];
    check_weight(weights[i]);
    reduced_mask(weights[i], out.back());
    if (writes) check_writable(weights[i]);
    TORCH_CHECK_VALUE(weights[i].device() == weights[0].device(), op, ": weights[", i,
                      "] is on ", weights[i].device(), " but weights[0] is on ",
                      weights[0].device());
    TORCH_CHECK_VALUE(std::isfinite(lam_l1[i]) && lam_l1[i] >= 0, op, ": lam_l1[", i,
                      "] must be a finite number >= 0, got ", lam_l1[i]);
  }
  TORCH_CHECK_VALUE(offset == int64_t(dims.size()), op, ": dim_counts do not match dims");
  return out;
}

// Per weight, its (k, groups) sums in group order -> (k, *kept) in the kept dimensions' logical
// order (zeros for an empty weight: groups of no elements).
std::vector<at::Tensor> kept_rows(at::TensorList weights,
                                  const std::vector<at::IntArrayRef>& tensor_dims,
                                  const std::vector<GroupLayout>& layouts,
                                  const std::vector<at::Tensor>& sums, int64_t k) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    std::vector<int64_t> shape = kept_shape(w, reduced_mask(w, tensor_dims[i]));
    shape.insert(shape.begin(), k);
    if (w.numel() == 0) {
      out.push_back(at::zeros(shape, w.options().dtype(accumulation_type(w))));
      continue;
    }
    const auto& order = layouts[i].kept_in_group_order;
    if (std::is_sorted(order.begin(), order.end())) {  // group order is the logical order
      out.push_back(sums[i].view(shape));
      continue;
    }
    std::vector<at::Tensor> rows;
    for (int64_t r = 0; r < k; ++r) {
      rows.push_back(to_kept_shape(sums[i][r], w, tensor_dims[i], layouts[i]));
    }
    out.push_back(at::stack(rows).reshape(shape));
  }
  return out;
}

std::vector<at::Tensor> foreach_group_sums_cpu(at::TensorList weights, at::IntArrayRef dims,
                                               at::IntArrayRef dim_counts,
                                               at::ArrayRef<double> lam_l1, int64_t what) {
  const char* op = "foreach_group_sums";
  TORCH_CHECK_VALUE(what >= 1 && what <= 3, op, ": what must be 1, 2 or 3, got ", what);
  const std::vector<at::IntArrayRef> tensor_dims =
      check_list(op, weights, dims, dim_counts, lam_l1, false);
  const int64_t n = static_cast<int64_t>(weights.size());
  const bool sq = what & 1, abs = what & 2;
  const int64_t k = (sq ? 1 : 0) + (abs ? 2 : 0);
  std::vector<GroupLayout> layouts(n);
  std::vector<at::Tensor> sums(n);
  std::vector<Unit> units;
  std::vector<std::function<void()>> alone;
  const int64_t unit = unit_of(weights);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    const auto options = w.options().dtype(accumulation_type(w));
    if (w.numel() == 0) continue;
    layouts[i] = analyze_groups(w, tensor_dims[i]);
    const int64_t groups = layouts[i].shape.num_groups();
    sums[i] = at::empty({k, groups}, options);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                    "foreach_group_sums", [&] {
      using A = at::opmath_type<scalar_t>;
      with_flags(lam_l1[i] > 0, sq, abs, [&](auto kL1, auto kSq, auto kAbs) {
        SumsStep<A, decltype(kL1)::value, decltype(kSq)::value, decltype(kAbs)::value> step;
        step.l1 = threshold_as<A>(lam_l1[i]);
        A* base = sums[i].data_ptr<A>();
        step.sum_sq = sq ? base : nullptr;
        step.sum_abs = abs ? base + (sq ? groups : 0) : nullptr;
        step.nonzero = abs ? base + (sq ? 2 : 1) * groups : nullptr;
        add_units(layouts[i].work.data_ptr<scalar_t>(), layouts[i].shape, step, unit, units,
                  alone);
      });
    });
  }
  run_units(units, alone);
  return kept_rows(weights, tensor_dims, layouts, sums, k);
}

// Per-group values given in the kept dimensions' logical order, in the kernel's group order.
at::Tensor in_group_order(const char* op, const at::Tensor& values, const at::Tensor& weight,
                          at::IntArrayRef dim, const GroupLayout& layout, at::ScalarType acc,
                          const char* name, int64_t i) {
  const int64_t groups = layout.shape.num_groups();
  TORCH_CHECK_VALUE(values.numel() == groups, op, ": ", name, "[", i, "] has ",
                    values.numel(), " values for ", groups, " groups");
  TORCH_CHECK_VALUE(values.device().is_cpu(), op, ": ", name, "[", i,
                    "] must be on the CPU");
  const auto& order = layout.kept_in_group_order;
  if (std::is_sorted(order.begin(), order.end())) {  // group order is the logical order
    return values.reshape({-1}).to(acc).contiguous();
  }
  // the group id (in group order) at each position of the kept dimensions in logical order
  const at::Tensor ids = at::arange(groups, weight.options().dtype(at::kLong));
  const at::Tensor logical = to_kept_shape(ids, weight, dim, layout).reshape({-1});
  at::Tensor ordered = at::empty({groups}, values.options().dtype(acc));
  ordered.index_put_({logical}, values.reshape({-1}).to(acc));
  return ordered;
}

void foreach_group_rewrite_cpu(at::TensorList weights, at::IntArrayRef dims,
                               at::IntArrayRef dim_counts, at::ArrayRef<double> lam_l1,
                               const c10::List<std::optional<at::Tensor>>& scales,
                               const c10::List<std::optional<at::Tensor>>& taus) {
  const char* op = "foreach_group_rewrite_";
  const std::vector<at::IntArrayRef> tensor_dims =
      check_list(op, weights, dims, dim_counts, lam_l1, true);
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(int64_t(scales.size()) == n && int64_t(taus.size()) == n, op,
                    ": scales and taus need one entry (or None) per weight");
  check_disjoint(weights, op);
  std::vector<GroupLayout> layouts(n);
  std::vector<at::Tensor> scale(n), tau(n);
  for (int64_t i = 0; i < n; ++i) {  // every check (value counts) before any write
    const at::Tensor& w = weights[i];
    const std::optional<at::Tensor> s = scales[i], t = taus[i];
    const bool has_scale = s.has_value() && s->defined(), has_tau = t.has_value() && t->defined();
    if (w.numel() == 0 || (!has_scale && !has_tau && lam_l1[i] == 0)) continue;
    layouts[i] = analyze_groups(w, tensor_dims[i]);
    const at::ScalarType acc = accumulation_type(w);
    if (has_scale) scale[i] = in_group_order(op, *s, w, tensor_dims[i], layouts[i], acc, "scales", i);
    if (has_tau) tau[i] = in_group_order(op, *t, w, tensor_dims[i], layouts[i], acc, "taus", i);
  }
  std::vector<Unit> units;
  std::vector<std::function<void()>> alone;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (layouts[i].work.defined()) total += weights[i].numel();
  }
  const int64_t unit = unit_elems(total);
  for (int64_t i = 0; i < n; ++i) {
    if (!layouts[i].work.defined()) continue;
    const bool has_scale = scale[i].defined(), has_tau = tau[i].defined();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "foreach_group_rewrite_", [&] {
      using A = at::opmath_type<scalar_t>;
      with_flags(lam_l1[i] > 0, has_scale, has_tau, [&](auto kL1, auto kScale, auto kTau) {
        RewriteStep<A, decltype(kL1)::value, decltype(kScale)::value, decltype(kTau)::value>
            step;
        step.l1 = threshold_as<A>(lam_l1[i]);
        step.scale = has_scale ? scale[i].data_ptr<A>() : nullptr;
        step.tau = has_tau ? tau[i].data_ptr<A>() : nullptr;
        add_units(layouts[i].work.data_ptr<scalar_t>(), layouts[i].shape, step, unit, units,
                  alone);
      });
    });
  }
  run_units(units, alone);
  for (int64_t i = 0; i < n; ++i) {
    if (layouts[i].work.defined()) finish_groups(weights[i], layouts[i]);
  }
}

std::vector<at::Tensor> foreach_group_sums_above_cpu(
    at::TensorList weights, at::IntArrayRef dims, at::IntArrayRef dim_counts,
    at::ArrayRef<double> lam_l1, const c10::List<std::optional<at::Tensor>>& scales,
    at::TensorList taus) {
  const char* op = "foreach_group_sums_above";
  const std::vector<at::IntArrayRef> tensor_dims =
      check_list(op, weights, dims, dim_counts, lam_l1, false);
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(int64_t(scales.size()) == n && int64_t(taus.size()) == n, op,
                    ": scales (or None) and taus need one entry per weight");
  std::vector<GroupLayout> layouts(n);
  std::vector<at::Tensor> scale(n), tau(n), sums(n);
  for (int64_t i = 0; i < n; ++i) {  // every check before any work
    const at::Tensor& w = weights[i];
    if (w.numel() == 0) continue;
    layouts[i] = analyze_groups(w, tensor_dims[i]);
    const at::ScalarType acc = accumulation_type(w);
    const std::optional<at::Tensor> s = scales[i];
    if (s.has_value() && s->defined()) {
      scale[i] = in_group_order(op, *s, w, tensor_dims[i], layouts[i], acc, "scales", i);
    }
    tau[i] = in_group_order(op, taus[i], w, tensor_dims[i], layouts[i], acc, "taus", i);
  }
  std::vector<Unit> units;
  std::vector<std::function<void()>> alone;
  const int64_t unit = unit_of(weights);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    if (w.numel() == 0) continue;
    const int64_t groups = layouts[i].shape.num_groups();
    sums[i] = at::zeros({2, groups}, w.options().dtype(accumulation_type(w)));
    const bool has_scale = scale[i].defined();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                    "foreach_group_sums_above", [&] {
      using A = at::opmath_type<scalar_t>;
      with_flags(lam_l1[i] > 0, has_scale, [&](auto kL1, auto kScale) {
        AboveStep<A, decltype(kL1)::value, decltype(kScale)::value> step;
        step.l1 = threshold_as<A>(lam_l1[i]);
        step.scale = has_scale ? scale[i].data_ptr<A>() : nullptr;
        step.tau = tau[i].data_ptr<A>();
        step.sum_above = sums[i].data_ptr<A>();
        step.count_above = step.sum_above + groups;
        add_units(layouts[i].work.data_ptr<scalar_t>(), layouts[i].shape, step, unit, units,
                  alone);
      });
    });
  }
  run_units(units, alone);
  return kept_rows(weights, tensor_dims, layouts, sums, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) {
  m.impl("foreach_group_sums", &foreach_group_sums_cpu);
  m.impl("foreach_group_rewrite_", &foreach_group_rewrite_cpu);
  m.impl("foreach_group_sums_above", &foreach_group_sums_above_cpu);
}

}  // namespace fastprox::cpu
