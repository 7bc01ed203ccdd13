// coupled_metric_prox_: the proximal step of coupled groups (fastprox/coupled.py: a group is the
// union of slices of several tensors) in an optimizer's diagonal metric (docs/SPEC.md, "Proximal
// steps in an optimizer's metric"), for a list of sets run one after another. Per set j, member
// k (a tensor with the axis its slices are taken along), group g (the slices
// slices[j][starts[j][g] : starts[j][g + 1]], each a pair (member, position)):
//
//     d = (sqrt(v * s) + eps) / lr  per member's (s, eps, lr) = metric[k]  (direct: d = moment)
//     x_g <- soft threshold by l1 / d, metric group step by t_g = thresholds[j][g], metric
//            exclusive step by le (exact threshold, or CGES's bound)        (a lam of 0: skipped)
//
// with the per-group rules of the plain metric step (metric_rules.h): a group gets what
// foreach_metric_prox_ gives the same elements in one row (in the order of the buffer: runs of
// neighbouring slices row by row). Per group, its slices are gathered from the members (d
// formed on the way) into a buffer of this thread that stays in cache, the group is solved
// there (first pass, Newton's method, exclusive step) and written back, blocks of neighbouring
// groups together, row by row: each cache line of a member read once; the narrow columns of
// neighbouring groups as one piece of each row, in vectors; single columns (a Linear's or a 1x1
// convolution's input units) in tiles transposed in registers, a block holding a whole vector
// of groups where it can, so that its columns are whole, aligned vectors of each row. One read
// of every member and moment, one write of every member; no matrix of all groups, no copy of a
// member (but the working copy of a member that is not dense). Every group
// is computed by one thread in a fixed order: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/max.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/group_engine.h"
#include "cpu/group_layout.h"
#include "cpu/metric_rules.h"
#include "cpu/multi_tensor.h"

namespace fastprox::cpu {
namespace {

using namespace metric;

constexpr double kWideD = 1e18;  // direct metrics beyond this: (d x)^2 overflows float32

// A run of neighbouring slices of one member within a group (positions pos .. pos + count - 1),
// and where it goes in the block's buffers.
struct Slot {
  int64_t pos, count, dest;
};

// Where the slices of one member lie (its working tensor viewed as [outer][positions][inner])
// and how the runs of a block of groups enter and leave the block's buffers: row by row over
// all of the block's runs of this member, each run count * inner contiguous elements of the row
// (a run at dest holds its elements as [outer][count * inner]). Row by row, neighbouring groups'
// columns (a Linear's input units, a fused QKV projection's heads) are read as whole pieces of
// each row, every cache line once per block.
template <typename A>
struct MemberIO {
  int64_t n = 0;  // elements of one slice
  std::function<void(const Slot*, int64_t, A*, A*)> gather;    // (slots, count, x, d)
  std::function<void(const Slot*, int64_t, const A*)> scatter;  // (slots, count, x)
};

// One piece of a row into the buffers: x as it is, d formed (as first_pass forms it) unless
// direct; vectors of A, the last one partial.
template <typename A, typename T, typename V>
inline void gather_piece(const T* w, const V* v, A* x, A* d, int64_t piece, A scale, A eps,
                         A inv_lr, bool direct) {
  using Va = Vec<A>;
  constexpr int64_t L = Va::size();
  for (int64_t i = 0; i < piece; i += L) {
    const int64_t c = std::min(L, piece - i);
    store_as(x + i, load_as<A>(w + i, c), c);
    Va dv = load_as<A>(v + i, c);
    if (!direct) dv = adam_metric(dv, scale, eps, inv_lr);
    store_as(d + i, dv, c);
  }
}

// The end of the span of slots from `first`: the slots that follow it in the list while their
// positions follow each other (neighbouring groups' columns: one contiguous piece of every row).
inline int64_t span_end(const Slot* slots, int64_t first, int64_t count) {
  int64_t k = first + 1;
  while (k < count && slots[k].pos == slots[k - 1].pos + slots[k - 1].count) ++k;
  return k;
}

// Where each element of a span's piece of row 0 goes in the buffers (row o: target + o * stride,
// stride = the piece of its slot), for spans of narrow pieces (shorter than a vector: a 3x3
// convolution's input channels; single columns take the transposes below), which are moved a
// row's piece of all of their slots at a time, in vectors, rather than slot by slot.
struct SpanMap {
  std::vector<int64_t> target, stride;
  struct View {
    int64_t width;  // elements of the span's piece of a row
    const int64_t* target;
    const int64_t* stride;
  };
  View build(const Slot* slots, int64_t first, int64_t last, int64_t inner) {
    target.clear();
    stride.clear();
    for (int64_t k = first; k < last; ++k) {
      const int64_t piece = slots[k].count * inner;
      for (int64_t i = 0; i < piece; ++i) {
        target.push_back(slots[k].dest + i);
        stride.push_back(piece);
      }
    }
    return {static_cast<int64_t>(target.size()), target.data(), stride.data()};
  }
};

// Whether every slot of the span has a piece shorter than a vector of A.
template <typename A>
inline bool narrow_span(const Slot* slots, int64_t first, int64_t last, int64_t inner) {
  for (int64_t k = first; k < last; ++k) {
    if (slots[k].count * inner >= int64_t(Vec<A>::size())) return false;
  }
  return last - first > 1;
}

// Calls each(first, last, narrow) for every span of a block's slots of one member, in order.
template <typename A, typename F>
inline void for_spans(const Slot* slots, int64_t count, int64_t inner, F&& each) {
  for (int64_t first = 0, last; first < count; first = last) {
    last = span_end(slots, first, count);
    each(first, last, narrow_span<A>(slots, first, last, inner));
  }
}

// Calls each(o, k, piece) for the piece of row o of every slot k of a span, row by row.
template <typename F>
inline void for_pieces(const Slot* slots, int64_t first, int64_t last, int64_t outer,
                       int64_t inner, F&& each) {
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t k = first; k < last; ++k) each(o, k, slots[k].count * inner);
  }
}

// Whether every slot of the span is one element of each row (a Linear's or a 1x1
// convolution's input units): the span's piece of the rows is then a matrix whose columns are
// the slots' groups, moved in tiles of L x L elements through a transpose in registers rather
// than element by element.
inline bool unit_span(const Slot* slots, int64_t first, int64_t last, int64_t inner) {
  if (inner != 1) return false;
  for (int64_t k = first; k < last; ++k) {
    if (slots[k].count != 1) return false;
  }
  return true;
}

// An L x L tile of A (rows L apart) transposed: dst[c * L + r] = src[r * L + c]. In registers for
// float under AVX512 (16 x 16) and AVX2 (8 x 8); element by element otherwise.
template <typename A, int64_t L>
inline void transpose_tile(const A* src, A* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float> && L == 16) {
    auto lo64 = [](__m512 a, __m512 b) {
      return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    auto hi64 = [](__m512 a, __m512 b) {
      return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    __m512 u[4][4];  // u[g][c]: lane l holds column 4 l + c of rows 4 g .. 4 g + 3
    for (int g = 0; g < 4; ++g) {
      const float* row = src + 4 * g * L;
      const __m512 r0 = _mm512_loadu_ps(row), r1 = _mm512_loadu_ps(row + L);
      const __m512 r2 = _mm512_loadu_ps(row + 2 * L), r3 = _mm512_loadu_ps(row + 3 * L);
      const __m512 lo01 = _mm512_unpacklo_ps(r0, r1), hi01 = _mm512_unpackhi_ps(r0, r1);
      const __m512 lo23 = _mm512_unpacklo_ps(r2, r3), hi23 = _mm512_unpackhi_ps(r2, r3);
      u[g][0] = lo64(lo01, lo23);
      u[g][1] = hi64(lo01, lo23);
      u[g][2] = lo64(hi01, hi23);
      u[g][3] = hi64(hi01, hi23);
    }
    for (int c = 0; c < 4; ++c) {  // the 128-bit lanes of u[0..3][c], transposed
      const __m512 p = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x88);
      const __m512 q = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xdd);
      const __m512 p2 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x88);
      const __m512 q2 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xdd);
      _mm512_storeu_ps(dst + c * L, _mm512_shuffle_f32x4(p, p2, 0x88));
      _mm512_storeu_ps(dst + (4 + c) * L, _mm512_shuffle_f32x4(q, q2, 0x88));
      _mm512_storeu_ps(dst + (8 + c) * L, _mm512_shuffle_f32x4(p, p2, 0xdd));
      _mm512_storeu_ps(dst + (12 + c) * L, _mm512_shuffle_f32x4(q, q2, 0xdd));
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float> && L == 8) {
    auto lo64 = [](__m256 a, __m256 b) {
      return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
    };
    auto hi64 = [](__m256 a, __m256 b) {
      return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
    };
    __m256 u[2][4];  // u[g][c]: lane l holds column 4 l + c of rows 4 g .. 4 g + 3
    for (int g = 0; g < 2; ++g) {
      const float* row = src + 4 * g * L;
      const __m256 r0 = _mm256_loadu_ps(row), r1 = _mm256_loadu_ps(row + L);
      const __m256 r2 = _mm256_loadu_ps(row + 2 * L), r3 = _mm256_loadu_ps(row + 3 * L);
      const __m256 lo01 = _mm256_unpacklo_ps(r0, r1), hi01 = _mm256_unpackhi_ps(r0, r1);
      const __m256 lo23 = _mm256_unpacklo_ps(r2, r3), hi23 = _mm256_unpackhi_ps(r2, r3);
      u[g][0] = lo64(lo01, lo23);
      u[g][1] = hi64(lo01, lo23);
      u[g][2] = lo64(hi01, hi23);
      u[g][3] = hi64(hi01, hi23);
    }
    for (int c = 0; c < 4; ++c) {
      _mm256_storeu_ps(dst + c * L, _mm256_permute2f128_ps(u[0][c], u[1][c], 0x20));
      _mm256_storeu_ps(dst + (4 + c) * L, _mm256_permute2f128_ps(u[0][c], u[1][c], 0x31));
    }
    return;
  }
#endif
  for (int64_t r = 0; r < L; ++r) {
    for (int64_t c = 0; c < L; ++c) dst[c * L + r] = src[r * L + c];
  }
}

// Tiles of one thread for the transposes (zeroed once: lanes past a partial tile are moved but
// never stored).
template <typename A>
struct Tiles {
  static constexpr int64_t L = Vec<A>::size();
  alignas(64) A in_x[L * L] = {}, in_d[L * L] = {}, out_x[L * L] = {}, out_d[L * L] = {};
};

// Rows o of a unit span (w and v at its first column, rows `row` elements apart), `width`
// columns, slot c of the span to its group's run at slots[c].dest (element o at dest + o):
// x as it is, d formed (as first_pass forms it) unless direct.
template <typename A, typename T, typename V>
void gather_columns(const T* w, const V* v, int64_t row, int64_t outer, const Slot* slots,
                    int64_t width, A* x, A* d, A scale, A eps, A inv_lr, bool direct) {
  using Va = Vec<A>;
  constexpr int64_t L = Va::size();
  thread_local Tiles<A> t;
  for (int64_t o0 = 0; o0 < outer; o0 += L) {
    const int64_t rows = std::min(L, outer - o0);
    for (int64_t r = 0; r < rows && o0 + L + r < outer; ++r) {  // the next tile's rows
      prefetch_run(w + (o0 + L + r) * row, width);
      prefetch_run(v + (o0 + L + r) * row, width);
    }
    for (int64_t j0 = 0; j0 < width; j0 += L) {
      const int64_t cols = std::min(L, width - j0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = (o0 + r) * row + j0;
        Va dv = load_as<A>(v + at, cols);
        if (!direct) dv = adam_metric(dv, scale, eps, inv_lr);
        load_as<A>(w + at, cols).store(t.in_x + r * L);
        dv.store(t.in_d + r * L);
      }
      transpose_tile<A, L>(t.in_x, t.out_x);
      transpose_tile<A, L>(t.in_d, t.out_d);
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t to = slots[j0 + c].dest + o0;
        store_as(x + to, Va::loadu(t.out_x + c * L), rows);
        store_as(d + to, Va::loadu(t.out_d + c * L), rows);
      }
    }
  }
}

// The inverse of gather_columns for x: each group's run back into its column of the rows.
template <typename A, typename T>
void scatter_columns(T* w, int64_t row, int64_t outer, const Slot* slots, int64_t width,
                     const A* x) {
  using Va = Vec<A>;
  constexpr int64_t L = Va::size();
  thread_local Tiles<A> t;
  for (int64_t o0 = 0; o0 < outer; o0 += L) {
    const int64_t rows = std::min(L, outer - o0);
    for (int64_t j0 = 0; j0 < width; j0 += L) {
      const int64_t cols = std::min(L, width - j0);
      for (int64_t c = 0; c < cols; ++c) {
        Va::loadu(x + slots[j0 + c].dest + o0, rows).store(t.in_x + c * L);
      }
      transpose_tile<A, L>(t.in_x, t.out_x);
      for (int64_t r = 0; r < rows; ++r) {
        store_as(w + (o0 + r) * row + j0, Va::loadu(t.out_x + r * L), cols);
      }
    }
  }
}

template <typename A, typename T, typename V>
MemberIO<A> member_io(T* w, const V* v, const GroupShape& s, A scale, A eps, A inv_lr,
                      bool direct) {
  using Va = Vec<A>;
  constexpr int64_t L = Va::size();
  MemberIO<A> io;
  io.n = s.group_size();
  const int64_t outer = s.outer, inner = s.inner, row = s.groups * s.inner;
  io.gather = [=](const Slot* slots, int64_t count, A* x, A* d) {
    for_spans<A>(slots, count, inner, [&](int64_t first, int64_t last, bool narrow) {
      if (!narrow) {
        for_pieces(slots, first, last, outer, inner, [&](int64_t o, int64_t k, int64_t piece) {
          const int64_t at = o * row + slots[k].pos * inner, to = slots[k].dest + o * piece;
          if (o + kPrefetchRows < outer) {  // rows far apart: the hardware does not prefetch
            prefetch_run(w + at + kPrefetchRows * row, piece);
            prefetch_run(v + at + kPrefetchRows * row, piece);
          }
          gather_piece(w + at, v + at, x + to, d + to, piece, scale, eps, inv_lr, direct);
        });
        return;
      }
      if (unit_span(slots, first, last, inner)) {
        const int64_t at = slots[first].pos;
        gather_columns(w + at, v + at, row, outer, slots + first, last - first, x, d, scale, eps,
                       inv_lr, direct);
        return;
      }
      thread_local SpanMap map;
      const auto [width, target, stride] = map.build(slots, first, last, inner);
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t at = o * row + slots[first].pos * inner;
        if (o + kPrefetchRows < outer) {
          prefetch_run(w + at + kPrefetchRows * row, width);
          prefetch_run(v + at + kPrefetchRows * row, width);
        }
        for (int64_t i = 0; i < width; i += L) {
          const int64_t c = std::min(L, width - i);
          Va dv = load_as<A>(v + at + i, c);
          if (!direct) dv = adam_metric(dv, scale, eps, inv_lr);
          A xs[L], ds[L];
          load_as<A>(w + at + i, c).store(xs);
          dv.store(ds);
          for (int64_t j = 0; j < c; ++j) {
            const int64_t to = target[i + j] + o * stride[i + j];
            x[to] = xs[j];
            d[to] = ds[j];
          }
        }
      }
    });
  };
  io.scatter = [=](const Slot* slots, int64_t count, const A* x) {
    for_spans<A>(slots, count, inner, [&](int64_t first, int64_t last, bool narrow) {
      if (!narrow) {
        for_pieces(slots, first, last, outer, inner, [&](int64_t o, int64_t k, int64_t piece) {
          T* wr = w + o * row + slots[k].pos * inner;
          const A* xr = x + slots[k].dest + o * piece;
          for (int64_t i = 0; i < piece; i += L) {
            const int64_t c = std::min(L, piece - i);
            store_as(wr + i, Va::loadu(xr + i, c), c);
          }
        });
        return;
      }
      if (unit_span(slots, first, last, inner)) {
        scatter_columns(w + slots[first].pos, row, outer, slots + first, last - first, x);
        return;
      }
      thread_local SpanMap map;
      const auto [width, target, stride] = map.build(slots, first, last, inner);
      for (int64_t o = 0; o < outer; ++o) {
        T* wr = w + o * row + slots[first].pos * inner;
        for (int64_t i = 0; i < width; i += L) {
          const int64_t c = std::min(L, width - i);
          A xs[L];
          for (int64_t j = 0; j < c; ++j) xs[j] = x[target[i + j] + o * stride[i + j]];
          store_as(wr + i, Va::loadu(xs), c);
        }
      }
    });
  };
  return io;
}

// A group's slices as runs: (member, first position, count), neighbouring positions of one
// member joined, in the order of the slice table; offset: where the run starts in its group.
struct Run {
  int64_t member, pos, count, offset;
};

// elements of the groups of one block, about: 2^16 measured best on GPT-2, Llama and ResNet-50
// (2^13 to 2^17 tried, bench/RESULTS.md); the buffers (x and d, 512 KiB in float32) stay in L2
constexpr int64_t kBlockElems = 1 << 16;

// Elements of the buffers a group of n takes: whole vectors and one more, so that groups start
// a line apart from any multiple of 4 KiB of each other (a row's pieces of neighbouring groups,
// written at the same offset of each, would all fall in one set of the L1 cache) and aligned.
template <typename A>
constexpr int64_t spaced(int64_t n) {
  constexpr int64_t L = Vec<A>::size();
  return n == 0 ? 0 : (n + L - 1) / L * L + L;
}

// Blocks of neighbouring groups, of about kBlockElems elements of the buffers (at least one
// group each), as the group index where each starts (and the end): a function of the sizes
// alone, never of the thread count. A block holds a multiple of L = Vec<A>::size() groups where
// that costs at most twice kBlockElems: the columns of a block (a Linear's or a convolution's
// input units, the groups' slices of a consumer) are then whole vectors of each row, aligned,
// and no cache line of a row is read by two blocks. `largest`: the elements of the largest.
template <typename A>
std::vector<int64_t> group_blocks(const std::vector<int64_t>& sizes, int64_t& largest) {
  constexpr int64_t L = Vec<A>::size();
  const int64_t groups = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> blocks{0};
  largest = 0;
  for (int64_t g = 0; g < groups;) {
    const int64_t start = g;
    int64_t filled = 0, aligned = start, aligned_filled = 0;  // the last multiple of L groups
    while (g < groups) {
      const int64_t next = filled + spaced<A>(sizes[g]);
      if (g > start && next > kBlockElems) {
        if (aligned > start) {  // back to the last multiple of L
          g = aligned;
          filled = aligned_filled;
          break;
        }
        if (next > 2 * kBlockElems) break;  // fewer than L groups fit in twice the budget
      }
      filled = next;
      ++g;
      if ((g - start) % L == 0) {
        aligned = g;
        aligned_filled = filled;
        if (filled > kBlockElems) break;  // grown past the budget to reach L groups
      }
    }
    blocks.push_back(g);
    largest = std::max(largest, filled);
  }
  return blocks;
}

// One set, checked: its members' working tensors and moments laid out alike.
struct SetView {
  std::vector<GroupLayout> layouts;
  std::vector<at::Tensor> moments;  // each laid out like its member's working tensor
  std::vector<const double*> rows;  // (s, eps, lr) per member
  const int64_t* slices = nullptr;
  const int64_t* starts = nullptr;
  const double* t = nullptr;
  int64_t groups = 0;
  double l1 = 0, le = 0;
  bool exact = true, direct = false;
};

template <typename A>
void run_set(const SetView& set) {
  std::vector<MemberIO<A>> io;
  for (size_t k = 0; k < set.layouts.size(); ++k) {
    const GroupLayout& layout = set.layouts[k];
    if (layout.work.numel() == 0) {  // no element (its layout still counts its positions)
      io.push_back({0, [](const Slot*, int64_t, A*, A*) {}, [](const Slot*, int64_t, const A*) {}});
      continue;
    }
    const double* m = set.rows[k];
    const A scale = static_cast<A>(m[0]), eps = static_cast<A>(m[1]);
    const A inv_lr = static_cast<A>(1.0 / m[2]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, layout.work.scalar_type(),
                                    "coupled_metric_prox_", [&] {
      using W = scalar_t;
      W* w = layout.work.data_ptr<W>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, set.moments[k].scalar_type(),
                                      "coupled_metric_prox_", [&] {
        io.push_back(member_io<A>(w, set.moments[k].const_data_ptr<scalar_t>(), layout.shape,
                                  scale, eps, inv_lr, set.direct));
      });
    });
  }
  std::vector<Run> runs;
  std::vector<int64_t> run_starts{0}, sizes;
  int64_t largest = 0;
  for (int64_t g = 0; g < set.groups; ++g) {
    int64_t n = 0;
    for (int64_t e = set.starts[g]; e < set.starts[g + 1]; ++e) {
      const int64_t k = set.slices[2 * e], pos = set.slices[2 * e + 1];
      Run* last = int64_t(runs.size()) > run_starts.back() ? &runs.back() : nullptr;
      if (last != nullptr && last->member == k && last->pos + last->count == pos) {
        ++last->count;
      } else {
        runs.push_back({k, pos, 1, n});
      }
      n += io[k].n;
    }
    run_starts.push_back(static_cast<int64_t>(runs.size()));
    sizes.push_back(n);
  }
  const std::vector<int64_t> blocks = group_blocks<A>(sizes, largest);
  if (largest == 0) return;
  const int64_t count = static_cast<int64_t>(blocks.size()) - 1;
  const int64_t members = static_cast<int64_t>(io.size());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    auto [x, d] = block_buffers<A>(largest);
    std::vector<std::vector<Slot>> slots(members);
    std::vector<int64_t> segment;
    MetricParams<A> p;
    p.l1 = threshold_as<A>(set.l1);
    p.le = threshold_as<A>(set.le);
    p.exact = set.exact;
    p.d_formed = true;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g0 = blocks[b], g1 = blocks[b + 1];
      for (auto& list : slots) list.clear();
      segment.assign(1, 0);
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t r = run_starts[g]; r < run_starts[g + 1]; ++r) {
          slots[runs[r].member].push_back({runs[r].pos, runs[r].count,
                                           segment.back() + runs[r].offset});
        }
        segment.push_back(segment.back() + spaced<A>(sizes[g]));
      }
      for (int64_t k = 0; k < members; ++k) {
        if (!slots[k].empty()) io[k].gather(slots[k].data(), int64_t(slots[k].size()), x, d);
      }
      for (int64_t g = g0; g < g1; ++g) {
        if (sizes[g] == 0) continue;
        p.t = threshold_as<A>(set.t[g]);
        metric_group(x + segment[g - g0], d + segment[g - g0], sizes[g], p);
      }
      for (int64_t k = 0; k < members; ++k) {
        if (!slots[k].empty()) io[k].scatter(slots[k].data(), int64_t(slots[k].size()), x);
      }
    }
  });
}

void coupled_metric_prox_cpu(at::TensorList members, at::TensorList moments,
                             at::IntArrayRef axes, const at::Tensor& metric,
                             at::IntArrayRef set_sizes, at::TensorList slices,
                             at::TensorList starts, at::TensorList thresholds,
                             at::ArrayRef<double> lam_l1, at::ArrayRef<double> lam_exclusive,
                             const c10::List<bool>& exact, bool direct,
                             const std::optional<std::vector<std::string>>& names,
                             bool moments_checked) {
  static constexpr const char* op = "coupled_metric_prox_";
  const int64_t n = static_cast<int64_t>(members.size());
  const int64_t sets = static_cast<int64_t>(set_sizes.size());
  auto member_name = [&](int64_t i) { return "members[" + std::to_string(i) + "]"; };
  auto moment_name = [&](int64_t i) {
    return names && int64_t(names->size()) == n ? (*names)[i]
                                                : "moments[" + std::to_string(i) + "]";
  };
  TORCH_CHECK_VALUE(!names || int64_t(names->size()) == n, op,
                    ": names needs one entry per moment");
  TORCH_CHECK_VALUE(int64_t(moments.size()) == n && int64_t(axes.size()) == n, op,
                    ": moments and axes need one entry per member");
  TORCH_CHECK_VALUE(int64_t(slices.size()) == sets && int64_t(starts.size()) == sets &&
                        int64_t(thresholds.size()) == sets && int64_t(lam_l1.size()) == sets &&
                        int64_t(lam_exclusive.size()) == sets && int64_t(exact.size()) == sets,
                    op, ": slices, starts, thresholds, lam_l1, lam_exclusive and exact need "
                    "one entry per set");
  TORCH_CHECK_VALUE(metric.scalar_type() == at::kDouble && metric.numel() == 3 * n &&
                        metric.device().is_cpu(),
                    op, ": metric must be a float64 CPU tensor of 3 * len(members) values");
  const at::Tensor met = metric.contiguous();
  const double* M = met.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {  // every check before any write
    const at::Tensor& w = members[i];
    check_weight(w);
    check_writable(w);
    TORCH_CHECK_VALUE(w.dim() > 0 && axes[i] >= 0 && axes[i] < w.dim(), op, ": axes[", i,
                      "] must be a dimension of ", member_name(i), " (shape ", w.sizes(), ")");
    TORCH_CHECK_VALUE(moments[i].sizes() == w.sizes(), op, ": ", moment_name(i), " has shape ",
                      moments[i].sizes(), ", expected ", w.sizes());
    TORCH_CHECK_VALUE(moments[i].device() == w.device() &&
                          at::isFloatingType(moments[i].scalar_type()),
                      op, ": ", moment_name(i), " must be a floating tensor on ", w.device());
    TORCH_CHECK_VALUE(std::isfinite(M[3 * i]) && M[3 * i] >= 0 && std::isfinite(M[3 * i + 1]) &&
                          M[3 * i + 1] >= 0 && std::isfinite(M[3 * i + 2]) && M[3 * i + 2] > 0,
                      op, ": metric[", i, "] must be (scale >= 0, eps >= 0, lr > 0), finite");
  }
  std::vector<SetView> views(sets);
  std::vector<at::Tensor> tables;  // contiguous copies, alive while the views point into them
  std::vector<std::pair<int64_t, int64_t>> span(sets);  // members of set j: [first, last)
  int64_t first = 0;
  for (int64_t j = 0; j < sets; ++j) {
    TORCH_CHECK_VALUE(set_sizes[j] >= 0 && first + set_sizes[j] <= n, op,
                      ": set_sizes do not match members");
    span[j] = {first, first + set_sizes[j]};
    first += set_sizes[j];
    SetView& set = views[j];
    set.l1 = lam_l1[j];
    set.le = lam_exclusive[j];
    set.exact = exact[j];
    set.direct = direct;
    TORCH_CHECK_VALUE(std::isfinite(set.l1) && set.l1 >= 0 && std::isfinite(set.le) &&
                          set.le >= 0,
                      op, ": lam_l1[", j, "] and lam_exclusive[", j,
                      "] must be finite numbers >= 0");
    const at::Tensor& st = starts[j];
    TORCH_CHECK_VALUE(st.scalar_type() == at::kLong && st.device().is_cpu() && st.dim() == 1 &&
                          st.numel() >= 1,
                      op, ": starts[", j, "] must be a 1-D int64 CPU tensor of groups + 1 "
                      "entries");
    const at::Tensor& sl = slices[j];
    const int64_t entries = sl.numel() / 2;
    TORCH_CHECK_VALUE(sl.scalar_type() == at::kLong && sl.device().is_cpu() && sl.dim() == 2 &&
                          sl.size(1) == 2,
                      op, ": slices[", j, "] must be an int64 CPU tensor of (member, position) "
                      "rows");
    const at::Tensor& th = thresholds[j];
    set.groups = st.numel() - 1;
    TORCH_CHECK_VALUE(th.scalar_type() == at::kDouble && th.device().is_cpu() &&
                          th.numel() == set.groups,
                      op, ": thresholds[", j, "] must be a float64 CPU tensor of one value per "
                      "group");
    tables.push_back(sl.contiguous());
    set.slices = tables.back().data_ptr<int64_t>();
    tables.push_back(st.contiguous());
    set.starts = tables.back().data_ptr<int64_t>();
    tables.push_back(th.contiguous());
    set.t = tables.back().data_ptr<double>();
    TORCH_CHECK_VALUE(set.starts[0] == 0 && set.starts[set.groups] == entries, op, ": starts[",
                      j, "] must run from 0 to the number of slices");
    for (int64_t g = 0; g < set.groups; ++g) {
      TORCH_CHECK_VALUE(set.starts[g] <= set.starts[g + 1], op, ": starts[", j,
                        "] must not decrease");
      TORCH_CHECK_VALUE(std::isfinite(set.t[g]) && set.t[g] >= 0, op, ": thresholds[", j,
                        "] must be finite numbers >= 0");
    }
    std::vector<std::vector<bool>> seen;
    for (int64_t k = span[j].first; k < span[j].second; ++k) {
      seen.emplace_back(members[k].dim() > 0 ? members[k].size(axes[k]) : 0, false);
    }
    for (int64_t e = 0; e < entries; ++e) {
      const int64_t k = set.slices[2 * e], pos = set.slices[2 * e + 1];
      TORCH_CHECK_VALUE(k >= 0 && k < set_sizes[j], op, ": slices[", j, "] names member ", k,
                        " of a set of ", set_sizes[j]);
      const int64_t size = static_cast<int64_t>(seen[k].size());
      TORCH_CHECK_VALUE(pos >= 0 && pos < size, op, ": slices[", j, "] names position ", pos,
                        " of ", member_name(span[j].first + k), ", which has ", size);
      TORCH_CHECK_VALUE(!seen[k][pos], op, ": slices[", j, "] names position ", pos, " of ",
                        member_name(span[j].first + k), " twice");
      seen[k][pos] = true;
    }
    check_disjoint(members.slice(span[j].first, set_sizes[j]), op);
  }
  TORCH_CHECK_VALUE(first == n, op, ": set_sizes do not match members");
  auto idle = [&](int64_t j) {
    if (views[j].l1 > 0 || views[j].le > 0) return false;
    for (int64_t g = 0; g < views[j].groups; ++g) {
      if (views[j].t[g] > 0) return false;
    }
    return true;
  };
  std::vector<bool> wide(sets, false);
  // dense moments already found valid (a parameter in two sets, its output units in one and its
  // input units in the next: its moment is read once): their address ranges and dtypes
  std::vector<std::tuple<uintptr_t, uintptr_t, at::ScalarType>> valid;
  auto known_valid = [&](const at::Tensor& v) {
    if (!v.is_non_overlapping_and_dense()) return false;
    const auto [lo, hi] = address_range(v);
    for (const auto& [vlo, vhi, type] : valid) {
      if (type == v.scalar_type() && vlo <= lo && hi <= vhi) return true;
    }
    return false;
  };
  for (int64_t j = 0; j < sets; ++j) {  // the moments used: apart from the members, finite, >= 0
    if (idle(j)) continue;
    for (int64_t i = span[j].first; i < span[j].second; ++i) {
      if (members[i].numel() == 0) continue;
      const auto range = address_range(moments[i]);
      for (int64_t k = 0; k < n; ++k) {
        const auto other = address_range(members[k]);
        TORCH_CHECK_VALUE(range.first >= other.second || other.first >= range.second, op, ": ",
                          moment_name(i), " shares memory with ", member_name(k),
                          ", which the step writes");
      }
      if (!moments_checked && !known_valid(moments[i])) {
        TORCH_CHECK_VALUE(valid_moment(moments[i]), op, ": ", moment_name(i),
                          " has negative, NaN or infinite entries (a metric is finite and >= 0); "
                          "from an optimizer's state, the state is damaged: check the loss and "
                          "gradients for NaN/inf, or reload a checkpoint");
        if (moments[i].is_non_overlapping_and_dense()) {
          const auto [lo, hi] = address_range(moments[i]);
          valid.emplace_back(lo, hi, moments[i].scalar_type());
        }
      }
      if (direct) wide[j] = wide[j] || at::max(moments[i]).item<double>() > kWideD;
    }
  }
  for (int64_t j = 0; j < sets; ++j) {
    if (idle(j)) continue;  // bit-identical
    SetView& set = views[j];
    bool is_double = wide[j];
    for (int64_t i = span[j].first; i < span[j].second; ++i) {
      const at::Tensor& w = members[i];
      std::vector<int64_t> dims;
      for (int64_t dd = 0; dd < w.dim(); ++dd) {
        if (dd != axes[i]) dims.push_back(dd);
      }
      set.layouts.push_back(analyze_groups(w, dims));
      TORCH_INTERNAL_ASSERT(set.layouts.back().shape.batch == 1);
      set.moments.push_back(like_work(moments[i], w, set.layouts.back()));
      set.rows.push_back(M + 3 * i);
      is_double = is_double || w.scalar_type() == at::kDouble;
    }
    if (is_double) {
      run_set<double>(set);
    } else {
      run_set<float>(set);
    }
    for (int64_t i = span[j].first; i < span[j].second; ++i) {
      finish_groups(members[i], set.layouts[i - span[j].first]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprox, CPU, m) {
  m.impl("coupled_metric_prox_", &coupled_metric_prox_cpu);
}

}  // namespace fastprox::cpu
