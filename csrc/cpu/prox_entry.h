// The CPU entry shared by the in-place group operators: argument checks in a fixed order (all
// before any memory is touched), dtype dispatch, layout, and the write-back of a working copy.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

namespace fastprox::cpu {

struct ProxArgs {
  double lam_l1 = 0;       // soft threshold before the group step
  double lam_group = 0;    // group lasso lam (times sqrt(n) when size_weighted)
  bool size_weighted = true;
  double lam_exclusive = 0;
  bool exact = true;
};

// `weight` and `dim` are checked here; thresholds were read (and checked) by the caller.
template <bool kL1, bool kGroup, bool kExcl>
void run_prox(const at::Tensor& weight, at::IntArrayRef dim, const ProxArgs& args) {
  if (weight.numel() == 0) return;
  if (args.lam_l1 == 0 && args.lam_group == 0 && args.lam_exclusive == 0) return;  // bit-identical
  const GroupLayout layout = analyze_groups(weight, dim);
  const double c = args.size_weighted ? std::sqrt(double(layout.shape.group_size())) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastprox", [&] {
    using A = at::opmath_type<scalar_t>;
    ProxStep<A, kL1, kGroup, kExcl> step;
    step.l1 = static_cast<A>(args.lam_l1);
    step.t = static_cast<A>(args.lam_group * c);
    step.lam_e = static_cast<A>(args.lam_exclusive);
    step.exact = args.exact;
    run_groups(layout.work.data_ptr<scalar_t>(), layout.shape, step);
  });
  finish_groups(weight, layout);
}

// Checks shared by every in-place group operator, in the order the Python API checks them.
inline void check_group_op(const at::Tensor& weight, at::IntArrayRef dim) {
  check_weight(weight);
  reduced_mask(weight, dim);
  check_writable(weight);
}

}  // namespace fastprox::cpu
