// soft_threshold_(W, lam): the prox of the lasso, lam ||W||_1, elementwise:
//   w <- sign(w) max(|w| - lam, 0)        (NaN stays NaN, +-inf stays +-inf)
// No groups: a dense weight is processed as the flat span of memory it occupies, in any order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

namespace fastprox::cpu {
namespace {

void soft_threshold_cpu(const at::Tensor& weight, const at::Tensor& lam) {
  check_weight(weight);
  check_writable(weight);
  const double threshold = read_threshold(lam, "lam");
  if (weight.numel() == 0 || threshold == 0) return;
  // Dense (any dimension order): elementwise on its memory span. Otherwise a working copy.
  const at::Tensor work = weight.is_non_overlapping_and_dense() ? weight : weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "soft_threshold", [&] {
    using L = Lanes<scalar_t>;
    using V = typename L::V;
    const V tau(static_cast<typename L::A>(threshold));
    scalar_t* data = work.data_ptr<scalar_t>();
    at::parallel_for(0, work.numel(), kParallelGrainElems, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += L::kWidth) {
        const int64_t count = std::min(L::kWidth, end - i);
        V x[L::kParts];
        L::load(data + i, count, x);
        for (auto& v : x) v = shrink_magnitude(v, tau);
        L::store(data + i, count, x);
      }
    });
  });
  if (!work.is_same(weight)) weight.copy_(work);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) { m.impl("soft_threshold_", &soft_threshold_cpu); }

}  // namespace fastprox::cpu
