// cges_shrink_(W, lam_group, lam_exclusive, dim, size_weighted, exact): CGES's step (Yoon & Hwang
// 2017), group shrink then exclusive shrink of its result, fused into one read of each group:
//   s_g = group_shrink_ scale of W_g with t = lam_group * c
//   W_g <- sign(W_g) max(s_g |W_g| - tau_g, 0),   tau_g = exclusive_shrink_'s threshold of s_g |W_g|
// With size_weighted=False and exact=False this is the published update.
#include <torch/library.h>

#include "cpu/prox_entry.h"

namespace fastprox::cpu {
namespace {

void cges_shrink_cpu(const at::Tensor& weight, const at::Tensor& lam_group,
                     const at::Tensor& lam_exclusive, at::IntArrayRef dim, bool size_weighted,
                     bool exact) {
  check_group_op(weight, dim);
  ProxArgs args;
  args.lam_group = read_threshold(lam_group, "lam_group");
  args.lam_exclusive = read_threshold(lam_exclusive, "lam_exclusive");
  args.size_weighted = size_weighted;
  args.exact = exact;
  run_prox</*kL1=*/false, /*kGroup=*/true, /*kExcl=*/true>(weight, dim, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("cges_shrink_", &cges_shrink_cpu); }

}  // namespace fastprox::cpu
