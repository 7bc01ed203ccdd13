// The work units of the multi-tensor kernels (foreach_prox.cpp, group_phases.cpp): the groups of
// every tensor of a list cut into units that the threads of one parallel region take in turn.
//
// Why one region: a model is mostly small tensors, and a call per tensor pays a fixed cost and
// a thread fork/join per tensor. Work units of all tensors (a few groups of a row-layout tensor,
// a small column-layout tensor whole) are handed out to the threads dynamically. Column-layout
// tensors of kOwnColumnPathElems or more take the single-tensor column path (its own parallel
// regions) before the shared region: splitting them into column tiles, one per unit, measured
// 2-3x slower than streaming whole rows (bench/RESULTS.md).
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <functional>
#include <utility>
#include <vector>

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"

namespace fastprox::cpu {

constexpr int64_t kUnitElems = 1 << 18;         // elements per work unit of the shared region
constexpr int64_t kUnitsWanted = 8;              // ... smaller down to kParallelGrainElems while
                                                 // a call has fewer units than this
constexpr int64_t kOwnColumnPathElems = 1 << 16;  // column-layout tensors this large run alone

// Elements per work unit for a call moving `total` elements: kUnitElems, or less when that
// leaves the threads without work (a single 512x512 weight is one unit of 2^18 otherwise).
// A function of the sizes alone, never of the thread count: results do not depend on it.
inline int64_t unit_elems(int64_t total) {
  int64_t unit = kUnitElems;
  while (unit > kParallelGrainElems && total < kUnitsWanted * unit) unit /= 2;
  return unit;
}

// [first byte, last byte + 1) of a tensor's elements (empty for an empty tensor).
inline std::pair<uintptr_t, uintptr_t> address_range(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) return {begin, begin};
  int64_t lo = 0, hi = 0;  // element offsets from data_ptr (strides may be negative in C++)
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t span = (t.size(d) - 1) * t.stride(d);
    (span < 0 ? lo : hi) += span;
  }
  const int64_t item = static_cast<int64_t>(t.element_size());
  return {begin + lo * item, begin + (hi + 1) * item};
}

// Two tensors of a list on the same memory would race: refused. Checked on address ranges
// (conservative: views whose ranges interleave are refused even when their elements are
// disjoint).
inline void check_disjoint(at::TensorList weights, c10::string_view caller) {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  for (const at::Tensor& w : weights) ranges.push_back(address_range(w));
  for (size_t i = 0; i < ranges.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK_VALUE(ranges[i].first >= ranges[j].second || ranges[j].first >= ranges[i].second,
                        caller, ": weights[", j, "] and weights[", i, "] share memory");
    }
  }
}

struct Unit {
  std::function<void()> run;
};

template <typename T, typename Step>
void add_units(T* data, const GroupShape& s, const Step& step, int64_t unit,
               std::vector<Unit>& units,
               std::vector<std::function<void()>>& alone) {
  if (s.num_groups() == 0 || s.group_size() == 0) return;
  if (uses_chunk_path(s)) {
    const int64_t per_unit = std::max<int64_t>(1, unit / s.group_size());
    for (int64_t g = 0; g < s.num_groups(); g += per_unit) {
      const int64_t end = std::min(s.num_groups(), g + per_unit);
      units.push_back({[=] {
        for (int64_t gi = g; gi < end; ++gi) detail::chunk_group(data, s, step, gi);
      }});
    }
    return;
  }
  if (s.batch * s.outer * s.groups * s.inner >= kOwnColumnPathElems) {
    alone.push_back([=] { detail::column_path(data, s, step); });
    return;
  }
  // Tiles of whole groups, at least two vectors wide so that row segments are not scalar.
  constexpr int64_t kMinWidth = 2 * Lanes<T>::kWidth;
  const int64_t by_size = (unit + s.group_size() - 1) / s.group_size();
  const int64_t by_width = (std::min(kMinWidth, s.groups * s.inner) + s.inner - 1) / s.inner;
  const int64_t per_unit = std::max<int64_t>({1, by_size, by_width});
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t g = 0; g < s.groups; g += per_unit) {
      const int64_t end = std::min(s.groups, g + per_unit);
      units.push_back({[=] { detail::column_tile(data, s, step, b, g, end); }});
    }
  }
}

// Runs the tensors that go alone, then every unit in one parallel region.
inline void run_units(const std::vector<Unit>& units,
                      const std::vector<std::function<void()>>& alone) {
  for (const auto& run : alone) run();
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(units.size());
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t u = next++; u < count; u = next++) units[u].run();
  });
}

}  // namespace fastprox::cpu
