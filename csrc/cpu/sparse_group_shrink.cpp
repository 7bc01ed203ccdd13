// sparse_group_shrink_(W, lam_l1, lam_group, dim, size_weighted): the prox of sparse group lasso,
// lam_l1 ||W||_1 + lam_group * sum_g c ||W_g||_2, which is exactly the composition
//   V <- sign(W) max(|W| - lam_l1, 0),   then   W_g <- s_g V_g  with the group_shrink_ scale of V
// (Friedman, Hastie, Tibshirani 2010). Fused: the soft threshold is recomputed in the rewrite
// instead of being stored, so memory is still read once and written once.
#include <torch/library.h>

#include "cpu/prox_entry.h"

namespace fastprox::cpu {
namespace {

void sparse_group_shrink_cpu(const at::Tensor& weight, const at::Tensor& lam_l1,
                             const at::Tensor& lam_group, at::IntArrayRef dim,
                             bool size_weighted) {
  check_group_op(weight, dim);
  ProxArgs args;
  args.lam_l1 = read_threshold(lam_l1, "lam_l1");
  args.lam_group = read_threshold(lam_group, "lam_group");
  args.size_weighted = size_weighted;
  run_prox</*kL1=*/true, /*kGroup=*/true, /*kExcl=*/false>(weight, dim, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("sparse_group_shrink_", &sparse_group_shrink_cpu); }

}  // namespace fastprox::cpu
