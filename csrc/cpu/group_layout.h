// Where the groups of a weight lie in memory.
//
// `dim` (the reduced dimensions) splits a weight into groups. For a dense weight, its dimensions
// in memory order (size-1 ones dropped, neighbours of the same kind merged) alternate between kept
// (K) and reduced (R) runs. Every common case is one of
//     K | R | K R | R K | R K R | K R K | K R K R
// which is the 4-D view  [batch][outer][groups][inner]  of contiguous memory, with
//     group (b, g) = { x[b][o][g][i] : o < outer, i < inner },  n = outer * inner elements.
// Rows of a Linear weight are (1, 1, out, in); its columns (dim=0) are (1, out, in, 1); conv input
// channels (dim=(0,2,3)) are (1, O, I, kh*kw). Kernels read such groups in place.
//
// Other weights go through a contiguous working copy that is written back afterwards (two extra
// passes over memory): strided views that are not dense (w[:, ::2]) are copied as they are;
// layouts with more alternations (e.g. dim=(1,3) of a 4-D weight) are copied with the kept
// dimensions first, which is the rows layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace fastprox::cpu {

struct GroupShape {
  int64_t batch = 1, outer = 1, groups = 1, inner = 1;
  int64_t group_size() const { return outer * inner; }
  int64_t num_groups() const { return batch * groups; }
};

struct GroupLayout {
  at::Tensor work;         // the tensor the kernel reads and writes: the weight or a copy
  bool is_copy = false;    // work must be copied back into the weight afterwards
  std::vector<int64_t> copy_perm;  // work is weight.permute(copy_perm) (empty: same dim order)
  GroupShape shape;
  // Kept dimensions of the weight (logical indices, size > 1) in the order the kernel enumerates
  // groups: used to lay per-group outputs (group_norms) out in the weight's logical order.
  std::vector<int64_t> kept_in_group_order;
};

// `dim` must be in range and unique (reduced_mask checks it).
GroupLayout analyze_groups(const at::Tensor& weight, at::IntArrayRef dim);

// Copies the working tensor back into the weight when the layout used a copy.
void finish_groups(const at::Tensor& weight, const GroupLayout& layout);

// Per-group values computed in group order, as a contiguous tensor shaped like the kept
// dimensions of the weight (size-1 ones included) in logical order.
at::Tensor to_kept_shape(const at::Tensor& per_group, const at::Tensor& weight,
                         at::IntArrayRef dim, const GroupLayout& layout);

// Common argument checks of the C++ entry points (the Python API checks first, with friendlier
// messages; these keep direct torch.ops calls from reaching undefined behaviour).
void check_weight(const at::Tensor& weight);
// Whether two elements of `t` may be one memory location (an expanded or self-overlapping view).
bool overlaps_itself(const at::Tensor& t);
// A weight whose elements share memory cannot be updated in place.
void check_writable(const at::Tensor& weight);
std::vector<bool> reduced_mask(const at::Tensor& weight, at::IntArrayRef dim);

}  // namespace fastprox::cpu
