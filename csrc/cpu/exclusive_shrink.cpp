// exclusive_shrink_(W, lam, dim, exact): the prox of exclusive lasso, (lam/2) sum_g ||W_g||_1^2.
// Per group, a = |W_g|:   W_g <- sign(W_g) max(a - tau, 0)
//   exact:  tau solves tau = lam * sum_i max(a_i - tau, 0), i.e. tau = max_k lam S_k / (1 + lam k)
//           (S_k: sum of the k largest a). Found without sorting by Newton's method from tau = 0,
//           tau <- lam S(tau) / (1 + lam k(tau)) with S, k the sum and count of a > tau: monotone,
//           exact once the active set stops changing; each step re-reads the group from cache.
//   inexact (CGES's update): tau = lam ||W_g||_1, an upper bound that over-shrinks.
// A NaN group becomes NaN, a group with an infinite value keeps its values.
#include <torch/library.h>

#include "cpu/prox_entry.h"

namespace fastprox::cpu {
namespace {

void exclusive_shrink_cpu(const at::Tensor& weight, const at::Tensor& lam, at::IntArrayRef dim,
                          bool exact) {
  check_group_op(weight, dim);
  ProxArgs args;
  args.lam_exclusive = read_threshold(lam, "lam");
  args.exact = exact;
  run_prox</*kL1=*/false, /*kGroup=*/false, /*kExcl=*/true>(weight, dim, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("exclusive_shrink_", &exclusive_shrink_cpu); }

}  // namespace fastprox::cpu
