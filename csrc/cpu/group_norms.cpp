// group_norms(W, dim) -> ||W_g||_2 per group, shaped like the kept dimensions of W.
// Sum of squares in float32 for 16-bit weights, in the weight's own type otherwise; the result
// has the weight's dtype (as torch.linalg.vector_norm).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

namespace fastprox::cpu {
namespace {

at::Tensor group_norms_cpu(const at::Tensor& weight, at::IntArrayRef dim) {
  check_weight(weight);
  const std::vector<bool> reduced = reduced_mask(weight, dim);
  if (weight.numel() == 0) {
    std::vector<int64_t> kept_shape;
    for (int64_t d = 0; d < weight.dim(); ++d) {
      if (!reduced[d]) kept_shape.push_back(weight.size(d));
    }
    return at::zeros(kept_shape, weight.options());  // groups of no elements have norm 0
  }
  const GroupLayout layout = analyze_groups(weight, dim);
  at::Tensor norms = at::empty({layout.shape.num_groups()}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "group_norms", [&] {
    run_groups(layout.work.data_ptr<scalar_t>(), layout.shape,
               NormStep<scalar_t>{norms.data_ptr<scalar_t>()});
  });
  return to_kept_shape(norms, weight, dim, layout);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("group_norms", &group_norms_cpu); }

}  // namespace fastprox::cpu
