#include "cpu/group_layout.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace fastprox::cpu {

void check_weight(const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.defined(), "weight must be a defined tensor");
  TORCH_CHECK_TYPE(weight.layout() == at::kStrided, "weight must be a dense (strided) tensor, got ",
                   weight.layout());
  const auto t = weight.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "weight must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(weight.dim() >= 1, "weight must have at least one dimension, got a 0-d tensor");
}

bool overlaps_itself(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  const at::MemOverlap overlap = at::has_internal_overlap(t);
  if (overlap != at::MemOverlap::TooHard) return overlap == at::MemOverlap::Yes;
  // Views made by indexing, slicing or permuting nest their strides: sorted by stride, each
  // dimension's stride exceeds the span of the smaller ones, and no two elements meet.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(std::abs(t.stride(d)), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 0;
  bool nested = true;
  for (const auto& [stride, size] : dims) {
    if (stride <= extent) {
      nested = false;
      break;
    }
    extent += (size - 1) * stride;
  }
  if (nested) return false;
  // Anything else (a self-overlapping as_strided): element by element.
  std::vector<int64_t> offsets{0};
  for (const auto& [stride, size] : dims) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * size);
    for (int64_t o : offsets) {
      for (int64_t k = 0; k < size; ++k) next.push_back(o + k * stride);
    }
    offsets.swap(next);
  }
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end();
}

void check_writable(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(!overlaps_itself(weight),
                    "weight has elements that share memory (an expanded or self-overlapping "
                    "view) and cannot be updated in place");
}

std::vector<bool> reduced_mask(const at::Tensor& weight, at::IntArrayRef dim) {
  const int64_t ndim = weight.dim();
  std::vector<bool> reduced(ndim, false);
  for (int64_t d : dim) {
    TORCH_CHECK_VALUE(d >= -ndim && d < ndim, "dim ", d, " is out of range for a weight with ",
                      ndim, " dimensions");
    const int64_t k = d < 0 ? d + ndim : d;
    TORCH_CHECK_VALUE(!reduced[k], "dim ", d, " appears more than once in dim");
    reduced[k] = true;
  }
  return reduced;
}

namespace {

// Fills `layout.shape` when `t` (dense, non-overlapping) has one of the supported alternations.
// `logical[d]` is the weight's dimension that t's dimension d stands for.
bool fit_shape(const at::Tensor& t, const std::vector<bool>& reduced,
               const std::vector<int64_t>& logical, GroupLayout& layout) {
  std::vector<int64_t> order;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) order.push_back(d);
  }
  // Dense and non-overlapping: dimensions of size > 1 have distinct strides, and sorting them by
  // stride (largest first) gives the order in which memory is laid out.
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });

  struct Run {
    bool kept;
    int64_t size;
    std::vector<int64_t> dims;
  };
  std::vector<Run> runs;
  for (int64_t d : order) {
    const bool kept = !reduced[d];
    if (runs.empty() || runs.back().kept != kept) runs.push_back({kept, 1, {}});
    runs.back().size *= t.size(d);
    runs.back().dims.push_back(logical[d]);
  }

  std::string pattern;
  for (const auto& r : runs) pattern += r.kept ? 'K' : 'R';
  GroupShape s;
  std::vector<int64_t> kept_order;
  auto size_of = [&](size_t i) { return runs[i].size; };
  auto take_kept = [&](size_t i) {
    kept_order.insert(kept_order.end(), runs[i].dims.begin(), runs[i].dims.end());
  };
  if (pattern.empty()) {
  } else if (pattern == "K") {
    s.groups = size_of(0), take_kept(0);
  } else if (pattern == "R") {
    s.inner = size_of(0);
  } else if (pattern == "KR") {
    s.groups = size_of(0), s.inner = size_of(1), take_kept(0);
  } else if (pattern == "RK") {
    s.outer = size_of(0), s.groups = size_of(1), take_kept(1);
  } else if (pattern == "RKR") {
    s.outer = size_of(0), s.groups = size_of(1), s.inner = size_of(2), take_kept(1);
  } else if (pattern == "KRK") {
    s.batch = size_of(0), s.outer = size_of(1), s.groups = size_of(2);
    take_kept(0), take_kept(2);
  } else if (pattern == "KRKR") {
    s.batch = size_of(0), s.outer = size_of(1), s.groups = size_of(2), s.inner = size_of(3);
    take_kept(0), take_kept(2);
  } else {
    return false;
  }
  layout.shape = s;
  layout.kept_in_group_order = std::move(kept_order);
  return true;
}

}  // namespace

GroupLayout analyze_groups(const at::Tensor& weight, at::IntArrayRef dim) {
  const std::vector<bool> reduced = reduced_mask(weight, dim);
  std::vector<int64_t> identity(weight.dim());
  std::iota(identity.begin(), identity.end(), 0);

  GroupLayout layout;
  if (weight.is_non_overlapping_and_dense()) {
    layout.work = weight;
    if (fit_shape(weight, reduced, identity, layout)) return layout;
  } else {
    layout.work = weight.contiguous();
    layout.is_copy = true;
    if (fit_shape(layout.work, reduced, identity, layout)) return layout;
  }
  // Kept dimensions first: every group is one contiguous row of the copy.
  std::vector<int64_t> perm;
  for (int64_t d = 0; d < weight.dim(); ++d) {
    if (!reduced[d]) perm.push_back(d);
  }
  const size_t num_kept = perm.size();
  for (int64_t d = 0; d < weight.dim(); ++d) {
    if (reduced[d]) perm.push_back(d);
  }
  layout.work = weight.permute(perm).contiguous();
  layout.is_copy = true;
  layout.copy_perm = perm;
  std::vector<bool> work_reduced(perm.size(), true);
  std::fill(work_reduced.begin(), work_reduced.begin() + num_kept, false);
  const bool fits = fit_shape(layout.work, work_reduced, perm, layout);
  TORCH_INTERNAL_ASSERT(fits, "a kept-first layout is always K R");
  return layout;
}

void finish_groups(const at::Tensor& weight, const GroupLayout& layout) {
  if (!layout.is_copy) return;
  if (layout.copy_perm.empty()) {
    weight.copy_(layout.work);
  } else {
    weight.permute(layout.copy_perm).copy_(layout.work);
  }
}

at::Tensor to_kept_shape(const at::Tensor& per_group, const at::Tensor& weight,
                         at::IntArrayRef dim, const GroupLayout& layout) {
  const std::vector<bool> reduced = reduced_mask(weight, dim);
  std::vector<int64_t> kept_shape;
  for (int64_t d = 0; d < weight.dim(); ++d) {
    if (!reduced[d]) kept_shape.push_back(weight.size(d));
  }
  const auto& order = layout.kept_in_group_order;
  std::vector<int64_t> sizes;
  for (int64_t d : order) sizes.push_back(weight.size(d));
  // Permute the group-order dimensions into ascending logical order.
  std::vector<int64_t> to_logical(order.size());
  std::iota(to_logical.begin(), to_logical.end(), 0);
  std::sort(to_logical.begin(), to_logical.end(),
            [&](int64_t a, int64_t b) { return order[a] < order[b]; });
  return per_group.view(sizes).permute(to_logical).reshape(kept_shape).contiguous();
}

}  // namespace fastprox::cpu
