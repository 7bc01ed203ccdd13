// group_shrink_(W, lam, dim, size_weighted): the prox of group lasso, lam * sum_g c ||W_g||_2.
//   t = lam * c  (c = sqrt(n) when size_weighted, else 1; n = elements per group)
//   W_g <- s_g W_g,  s_g = 0 if ||W_g|| <= t  else  1 - t / ||W_g||
// A zero group stays zero (never NaN), a NaN group becomes NaN, an infinite one keeps its values.
#include <torch/library.h>

#include "cpu/prox_entry.h"

namespace fastprox::cpu {
namespace {

void group_shrink_cpu(const at::Tensor& weight, const at::Tensor& lam, at::IntArrayRef dim,
                      bool size_weighted) {
  check_group_op(weight, dim);
  ProxArgs args;
  args.lam_group = read_threshold(lam, "lam");
  args.size_weighted = size_weighted;
  run_prox</*kL1=*/false, /*kGroup=*/true, /*kExcl=*/false>(weight, dim, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("group_shrink_", &group_shrink_cpu); }

}  // namespace fastprox::cpu
