// The phases of a proximal step whose groups lie in several places (fastprox/_phases.py: groups
// coupled across tensors, groups spanning shards), fused per tensor:
//
//   group_sums(W, dim, lam_l1, what) -> (k, *kept)   per group of W, over y = soft(W, lam_l1):
//       what & 1: sum of y^2;  what & 2: sum of |y| and the count of nonzero y
//       (k = the statistics asked for, in that order), float32 (float64 for float64 weights)
//   group_rewrite_(W, dim, lam_l1, scale, tau)       per group g, in place:
//       W_g <- shrink_magnitude(soft(W_g, lam_l1) * scale_g, tau_g)
//       (scale / tau: per group, shaped like the kept dimensions; an undefined one is skipped)
//
// The caller combines the sums of one group over its places (in a fixed order) and applies the
// per-group rules of docs/SPEC.md between the two. One read of W for the sums, one read and one
// write for the rewrite, in the traversals of group_engine.h (deterministic sums).
#include <ATen/Dispatch.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

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

void check_lam(double lam_l1, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(lam_l1) && lam_l1 >= 0, op,
                    ": lam_l1 must be a finite number >= 0, got ", lam_l1);
}

at::Tensor group_sums_cpu(const at::Tensor& weight, at::IntArrayRef dim, double lam_l1,
                          int64_t what) {
  check_weight(weight);
  check_lam(lam_l1, "group_sums");
  TORCH_CHECK_VALUE(what >= 1 && what <= 3, "group_sums: what must be 1, 2 or 3, got ", what);
  const std::vector<bool> reduced = reduced_mask(weight, dim);
  const bool sq = what & 1, abs = what & 2;
  const int64_t k = (sq ? 1 : 0) + (abs ? 2 : 0);
  std::vector<int64_t> shape = kept_shape(weight, reduced);
  const auto options = weight.options().dtype(accumulation_type(weight));
  if (weight.numel() == 0) {
    shape.insert(shape.begin(), k);
    return at::zeros(shape, options);
  }
  const GroupLayout layout = analyze_groups(weight, dim);
  const int64_t groups = layout.shape.num_groups();
  at::Tensor out = at::empty({k, groups}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_sums",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    with_flags(lam_l1 > 0, sq, abs, [&](auto kL1, auto kSq, auto kAbs) {
      SumsStep<A, decltype(kL1)::value, decltype(kSq)::value, decltype(kAbs)::value> step;
      step.l1 = static_cast<A>(lam_l1);
      A* base = out.data_ptr<A>();
      step.sum_sq = sq ? base : nullptr;
      step.sum_abs = abs ? base + (sq ? groups : 0) : nullptr;
      step.nonzero = abs ? base + (sq ? 2 : 1) * groups : nullptr;
      run_groups(layout.work.data_ptr<scalar_t>(), layout.shape, step);
    });
  });
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < k; ++i) rows.push_back(to_kept_shape(out[i], weight, dim, layout));
  return at::stack(rows).reshape([&] {
    std::vector<int64_t> full = shape;
    full.insert(full.begin(), k);
    return full;
  }());
}

// Per-group values given in the kept dimensions' logical order, in the kernel's group order.
at::Tensor in_group_order(const at::Tensor& values, const at::Tensor& weight, at::IntArrayRef dim,
                          const GroupLayout& layout, at::ScalarType acc, const char* name) {
  const int64_t groups = layout.shape.num_groups();
  TORCH_CHECK_VALUE(values.numel() == groups, "group_rewrite_: ", name, " has ", values.numel(),
                    " values for ", groups, " groups");
  // position of each group (in group order) among the kept dimensions in logical order
  const at::Tensor ids = at::arange(groups, weight.options().dtype(at::kLong));
  const at::Tensor logical = to_kept_shape(ids, weight, dim, layout).reshape({-1});
  at::Tensor ordered = at::empty({groups}, values.options().dtype(acc));
  ordered.index_put_({logical}, values.reshape({-1}).to(acc));
  return ordered;
}

void group_rewrite_cpu(const at::Tensor& weight, at::IntArrayRef dim, double lam_l1,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& tau) {
  check_weight(weight);
  check_lam(lam_l1, "group_rewrite_");
  reduced_mask(weight, dim);
  check_writable(weight);
  const bool has_scale = scale.has_value() && scale->defined();
  const bool has_tau = tau.has_value() && tau->defined();
  if (weight.numel() == 0 || (!has_scale && !has_tau && lam_l1 == 0)) return;
  const GroupLayout layout = analyze_groups(weight, dim);
  const at::ScalarType acc = accumulation_type(weight);
  const at::Tensor s = has_scale ? in_group_order(*scale, weight, dim, layout, acc, "scale")
                                 : at::Tensor();
  const at::Tensor t = has_tau ? in_group_order(*tau, weight, dim, layout, acc, "tau")
                               : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "group_rewrite_", [&] {
    using A = at::opmath_type<scalar_t>;
    with_flags(lam_l1 > 0, has_scale, has_tau, [&](auto kL1, auto kScale, auto kTau) {
      RewriteStep<A, decltype(kL1)::value, decltype(kScale)::value, decltype(kTau)::value> step;
      step.l1 = static_cast<A>(lam_l1);
      step.scale = has_scale ? s.data_ptr<A>() : nullptr;
      step.tau = has_tau ? t.data_ptr<A>() : nullptr;
      run_groups(layout.work.data_ptr<scalar_t>(), layout.shape, step);
    });
  });
  finish_groups(weight, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) {
  m.impl("group_sums", &group_sums_cpu);
  m.impl("group_rewrite_", &group_rewrite_cpu);
}

}  // namespace fastprox::cpu
