// The traversal shared by every group operator on the CPU.
//
// A group operator ("step": group_steps.h, ProxStep and the others) needs, per group, a few sums
// over the group's elements (sum of squares, sum of magnitudes, count of nonzeros), turns them
// into per-group parameters (a scale, a threshold), and rewrites the group elementwise.
//
// Two traversals of the [batch][outer][groups][inner] layout (group_layout.h):
//  * chunk path (outer == 1, or inner long): rows of a Linear, conv filters. One task per group,
//    the group being `outer` contiguous runs of `inner` elements. The statistics pass streams the
//    group from memory and the rewrite reads it again from cache: one read and one write of
//    memory per element while a group fits in the per-core cache (a 16 KiB fp32 row of 4096 fits
//    L1). A group larger than the cache is read twice from memory.
//  * column path (outer > 1, inner short): columns of a Linear, conv input channels, CGES's
//    dim=0. Rows are streamed contiguously, per-column sums accumulated per block of rows, and
//    the rows streamed again for the rewrite: two reads and one write per element. Why not column
//    tiles (one read): see column_path.
// Exact exclusive thresholds take extra passes (Newton steps, 3-8 on typical data): from cache
// on the chunk path, streamed on the column path.
//
// Determinism: every sum is taken in an order fixed by the shape alone (per group in the chunk
// path; per column within fixed row blocks, then over blocks, in the column path), never by how
// work is split across threads, so results are bitwise identical from run to run and for any
// thread count.
//
// Accumulation is in at::opmath_type<T>: float for float16/bfloat16, the type itself otherwise.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/group_layout.h"
#include "cpu/group_steps.h"

namespace fastprox::cpu {

// Sizes of the traversal's work units, set by measurement on a 2-core Zen 4 (bench/RESULTS.md).
constexpr int64_t kParallelGrainElems = 1 << 15;     // below this, a task is not worth a thread
constexpr int64_t kColumnBlocks = 64;               // column path: row blocks of partial sums
constexpr int64_t kColumnBlockMinRows = 16;          // ... of at least this many rows
constexpr int64_t kRowsTogether = 4;                 // column path: rows per partial-sum update
constexpr int64_t kColumnChunk = 1 << 12;            // column path: columns per task (a multiple
                                                     // of every vector width)
constexpr int64_t kColumnPartialElems = 1 << 22;     // column path: partial sums per statistic
constexpr int64_t kChunkPathMinInner = 128;          // inner runs this long use the chunk path

namespace detail {

template <typename A>
inline A reduce_sum(const at::vec::Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>(
      [](const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b) { return a + b; }, v);
}

// Calls f(pointer, count) over the runs of a group, in memory order, count <= kWidth.
template <typename T, typename F>
inline void for_each_load(T* group, const GroupShape& s, F&& f) {
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t row_stride = s.groups * s.inner;
  for (int64_t o = 0; o < s.outer; ++o) {
    T* run = group + o * row_stride;
    for (int64_t j = 0; j < s.inner; j += W) f(run + j, std::min(W, s.inner - j));
  }
}

// Sums over a group kept in vector registers.
template <typename A>
struct Sums {
  using V = at::vec::Vectorized<A>;
  V a = V(A(0)), b = V(A(0)), c = V(A(0));
  Sums operator+(const Sums& o) const { return {a + o.a, b + o.b, c + o.c}; }
};

// Pass 1, per vector x: a += pre(x)^2 (group step), b += |pre(x)| and c += (|pre(x)| > 0)
// (exclusive step). Shared by both traversals.
template <typename Step, typename V>
inline void add_first_pass(const Step& step, Sums<typename V::value_type>& acc, const V& x) {
  using A = typename V::value_type;
  const V y = step.pre(x);
  if constexpr (Step::kWantSumSq) acc.a = at::vec::fmadd(y, y, acc.a);
  if constexpr (Step::kWantAbs) {
    const V m = y.abs();
    acc.b = acc.b + m;
    count_above(acc.c, m, V(A(0)), V(A(1)));
  }
}

// A Newton pass, per vector x: b and c += sum and count of the magnitudes |pre(x)| * scale
// above tau.
template <typename Step, typename V>
inline void add_newton_pass(const Step& step, Sums<typename V::value_type>& acc, const V& x,
                            const V& scale, const V& tau) {
  using A = typename V::value_type;
  V m = step.pre(x).abs();
  if constexpr (Step::kScales) m = m * scale;
  add_above(acc.b, acc.c, m, tau, V(A(1)));
}

// Folds add(sums, y) over the group's elements (as vectors of A), with four independent sets of
// sums so that the adds are not one long dependency chain (the passes over a cached group are
// bound by add latency otherwise). The sets are combined in a fixed order: deterministic.
template <typename T, typename F>
inline Sums<at::opmath_type<T>> fold_group(const T* group, const GroupShape& s, F&& add) {
  using L = Lanes<T>;
  using V = typename L::V;
  constexpr int64_t W = L::kWidth, P = L::kParts, U = 4;
  Sums<typename L::A> sums[U];
  const int64_t row_stride = s.groups * s.inner;
  for (int64_t o = 0; o < s.outer; ++o) {
    const T* run = group + o * row_stride;
    int64_t j = 0;
    for (; j + U * W <= s.inner; j += U * W) {
      for (int64_t u = 0; u < U; ++u) {
        V x[P];
        L::load_unordered(run + j + u * W, W, x);
        for (int64_t k = 0; k < P; ++k) add(sums[u], x[k]);
      }
    }
    for (; j < s.inner; j += W) {
      V x[P];
      L::load_unordered(run + j, std::min(W, s.inner - j), x);
      for (int64_t k = 0; k < P; ++k) add(sums[0], x[k]);
    }
  }
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

// Chunk path, one group: gi indexes the groups of all batches.
template <typename T, typename Step>
void chunk_group(T* data, const GroupShape& s, const Step& step, int64_t gi) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  constexpr int64_t P = L::kParts;
  const int64_t b = gi / s.groups, g = gi % s.groups;
  T* group = data + b * s.outer * s.groups * s.inner + g * s.inner;

  // Pass 1: a = sum of squares, b = sum of magnitudes, c = nonzero count (none for a rewrite
  // with given parameters).
  Sums<A> first;
  if constexpr (Step::kWantSumSq || Step::kWantAbs) {
    first = fold_group(group, s, [&](Sums<A>& acc, const V& x) { add_first_pass(step, acc, x); });
  }
  // (horizontal sums only of what the step uses: they are a per-group cost)
  GroupParams<A> p = step.finish(gi, Step::kWantSumSq ? reduce_sum(first.a) : A(0),
                                 Step::kWantAbs ? reduce_sum(first.b) : A(0),
                                 Step::kWantAbs ? reduce_sum(first.c) : A(0));
  if constexpr (!Step::kRewrite) return;

  const V scale(p.scale);
  while (p.iterate) {  // exact exclusive threshold: passes over the cached group
    const V tau(p.tau);
    const Sums<A> above = fold_group(group, s, [&](Sums<A>& acc, const V& x) {
      add_newton_pass(step, acc, x, scale, tau);
    });
    step.newton(p, reduce_sum(above.b), reduce_sum(above.c));
  }

  if constexpr (!Step::kWrite) return;
  const V tau(p.tau);
  for_each_load(group, s, [&](T* ptr, int64_t count) {
    V x[P];
    L::load(ptr, count, x);
    for (int64_t k = 0; k < P; ++k) x[k] = step.rewrite(x[k], scale, tau);
    L::store(ptr, count, x);
  });
}

// Groups per task on the chunk path: enough elements to be worth a thread.
inline int64_t chunk_grain(const GroupShape& s) {
  return std::max<int64_t>(1, kParallelGrainElems / std::max<int64_t>(s.group_size(), 1));
}

// Chunk path: one task per group (or per few small groups).
template <typename T, typename Step>
void chunk_path(T* data, const GroupShape& s, const Step& step) {
  at::parallel_for(0, s.num_groups(), chunk_grain(s), [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) chunk_group(data, s, step, gi);
  });
}

// Row blocks of the column path, set by the shape alone (so that sums do not depend on the
// thread count): at most kColumnBlocks, and few enough that the partial sums stay within
// kColumnPartialElems per statistic (a very wide weight gets fewer, taller blocks).
struct ColumnBlocks {
  int64_t rows_per_block, count;
};
inline ColumnBlocks column_blocks(const GroupShape& s, int64_t padded_cols) {
  const int64_t max_blocks =
      std::clamp<int64_t>(kColumnPartialElems / padded_cols, 1, kColumnBlocks);
  const int64_t rows =
      std::max<int64_t>(kColumnBlockMinRows, (s.outer + max_blocks - 1) / max_blocks);
  return {rows, (s.outer + rows - 1) / rows};
}

// Per-column totals -> per-group sums: group g's statistic k is the sum of its `inner`
// adjacent columns, in column order. Shared by column_path and column_tile.
template <typename A>
inline void sum_group_columns(const std::vector<A> (&col)[3], const bool (&used)[3], int64_t g,
                              int64_t inner, A (&sums)[3]) {
  for (int k = 0; k < 3; ++k) {
    sums[k] = 0;
    if (!used[k]) continue;
    for (int64_t i = 0; i < inner; ++i) sums[k] += col[k][g * inner + i];
  }
}

// Writes each of `groups` per-group values over the group's `inner` columns.
template <typename A, typename F>
inline void spread_over_columns(std::vector<A>& out, int64_t groups, int64_t inner, F&& value_of) {
  for (int64_t g = 0; g < groups; ++g) std::fill_n(out.begin() + g * inner, inner, value_of(g));
}

// The rewrite of one row's `width` columns, each with its group's scale and tau (arrays padded
// to a multiple of the load width). Shared by column_path and column_tile.
template <typename T, typename Step>
inline void rewrite_columns(T* row, int64_t width, const Step& step,
                            const at::opmath_type<T>* col_scale, const at::opmath_type<T>* col_tau) {
  using L = Lanes<T>;
  using V = typename L::V;
  for (int64_t j = 0; j < width; j += L::kWidth) {
    const int64_t count = std::min(L::kWidth, width - j);
    V x[L::kParts];
    L::load(row + j, count, x);
    for (int64_t k = 0; k < L::kParts; ++k) {
      const int64_t c = j + k * V::size();
      x[k] = step.rewrite(x[k], V::loadu(col_scale + c), V::loadu(col_tau + c));
    }
    L::store(row + j, count, x);
  }
}

// Column path: the weight (per batch) is a matrix of `outer` rows by groups*inner columns, each
// group a set of `inner` adjacent columns. Rows are streamed contiguously; per-column sums are
// accumulated per block of rows (blocks sized by the shape alone, so sums do not depend on the
// thread count), reduced over blocks in order, then turned into per-group parameters; a second
// stream rewrites the rows. Two reads and one write per element: column tiles that keep the
// rewrite in cache were measured slower on the CPUs we have (each tile row starts a new page,
// and the prefetchers do not follow; bench/RESULTS.md).
template <typename T, typename Step>
void column_path(T* data, const GroupShape& s, const Step& step) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  constexpr int64_t P = L::kParts;
  constexpr int64_t W = L::kWidth;
  constexpr int64_t VS = V::size();
  constexpr bool kSq = Step::kWantSumSq, kAbs = Step::kWantAbs;
  const int64_t cols = s.groups * s.inner;
  const int64_t padded = (cols + W - 1) / W * W;
  // Row blocks (column_blocks); each block's columns are split in chunks of kColumnChunk, so a
  // wide weight still spreads over threads.
  const ColumnBlocks cb = column_blocks(s, padded);
  const int64_t block_rows = cb.rows_per_block, blocks = cb.count;
  const int64_t chunks = (padded + kColumnChunk - 1) / kColumnChunk;
  const int64_t row_grain = std::max<int64_t>(1, kParallelGrainElems / cols);
  const int64_t group_grain = std::max<int64_t>(1, kParallelGrainElems / (s.inner * 16));
  const V zero(A(0));

  // Statistics: 0 sum of squares, 1 sum of magnitudes, 2 nonzero count (Newton passes: 1 sum
  // and 2 count of the magnitudes above tau). part[k] is [block][column], col[k] [column].
  // (a step that only takes Newton sums needs the statistics 1 and 2 without a first pass)
  constexpr bool kNewtonSums = kAbs || (Step::kRewrite && !Step::kWrite);
  const bool used[3] = {kSq, kNewtonSums, kNewtonSums};
  std::vector<A> part[3], col[3];
  for (int k = 0; k < 3; ++k) {
    if (used[k]) part[k].assign(blocks * padded, A(0)), col[k].assign(padded, A(0));
  }
  std::vector<A> col_scale(padded, A(1)), col_tau(padded, A(0));
  std::vector<GroupParams<A>> params(s.groups);

  for (int64_t b = 0; b < s.batch; ++b) {
    T* matrix = data + b * s.outer * cols;
    // Streams the rows of each block; add(acc, x, c) adds vector x's contribution to the
    // accumulators `acc` of column c. Four rows are read together so that a column's partial
    // sums are loaded and stored once per four rows (stores, not loads, bound this loop); the
    // additions keep row order, so the sums are the same as row by row.
    auto stream_blocks = [&](auto&& add) {
      at::parallel_for(0, blocks * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t blk = unit / chunks;
          const int64_t j_begin = (unit % chunks) * kColumnChunk;
          const int64_t j_end = std::min(cols, j_begin + kColumnChunk);
          A* sums[3];
          for (int k = 0; k < 3; ++k) {
            sums[k] = used[k] ? &part[k][blk * padded] : nullptr;
            if (used[k]) {
              std::fill(sums[k] + j_begin, sums[k] + std::min(padded, j_begin + kColumnChunk), A(0));
            }
          }
          const int64_t o_end = std::min(s.outer, (blk + 1) * block_rows);
          for (int64_t o = blk * block_rows; o < o_end; o += kRowsTogether) {
            const int64_t rows = std::min(kRowsTogether, o_end - o);
            const T* row = matrix + o * cols;
            for (int64_t j = j_begin; j < j_end; j += W) {
              const int64_t count = std::min(W, j_end - j);
              Sums<A> acc[P];
              for (int64_t k = 0; k < P; ++k) {
                const int64_t c = j + k * VS;
                if (used[0]) acc[k].a = V::loadu(sums[0] + c);
                if (used[1]) acc[k].b = V::loadu(sums[1] + c);
                if (used[2]) acc[k].c = V::loadu(sums[2] + c);
              }
              for (int64_t r = 0; r < rows; ++r) {
                V x[P];
                L::load(row + r * cols + j, count, x);
                for (int64_t k = 0; k < P; ++k) add(acc[k], x[k], j + k * VS);
              }
              for (int64_t k = 0; k < P; ++k) {
                const int64_t c = j + k * VS;
                if (used[0]) acc[k].a.store(sums[0] + c);
                if (used[1]) acc[k].b.store(sums[1] + c);
                if (used[2]) acc[k].c.store(sums[2] + c);
              }
            }
          }
        }
      });
    };
    // Sums the blocks in block order, then each group's `inner` columns: per_group(g, sums).
    auto reduce = [&](auto&& per_group) {
      at::parallel_for(0, padded / VS, std::max<int64_t>(1, 4096 / VS), [&](int64_t lo, int64_t hi) {
        for (int k = 0; k < 3; ++k) {
          if (!used[k]) continue;
          for (int64_t v = lo * VS; v < hi * VS; v += VS) {
            V acc = zero;
            for (int64_t blk = 0; blk < blocks; ++blk) acc = acc + V::loadu(&part[k][blk * padded + v]);
            acc.store(&col[k][v]);
          }
        }
      });
      at::parallel_for(0, s.groups, group_grain, [&](int64_t lo, int64_t hi) {
        for (int64_t g = lo; g < hi; ++g) {
          A sums[3];
          sum_group_columns(col, used, g, s.inner, sums);
          per_group(g, sums);
        }
      });
    };
    auto spread = [&](std::vector<A>& out, auto&& value_of_group) {
      spread_over_columns(out, s.groups, s.inner, value_of_group);
    };

    // Pass 1.
    if constexpr (kSq || kAbs) {
      stream_blocks([&](Sums<A>& acc, const V& x, int64_t) { add_first_pass(step, acc, x); });
    }
    reduce([&](int64_t g, const A* sums) {
      params[g] = step.finish(b * s.groups + g, sums[0], sums[1], sums[2]);
    });
    if constexpr (!Step::kRewrite) continue;
    bool iterate = false;
    for (const auto& p : params) iterate = iterate || p.iterate;
    spread(col_scale, [&](int64_t g) { return params[g].scale; });

    // Exact exclusive threshold: Newton passes, each a stream over the rows.
    while (iterate) {
      spread(col_tau, [&](int64_t g) { return params[g].tau; });
      stream_blocks([&](Sums<A>& acc, const V& x, int64_t c) {
        add_newton_pass(step, acc, x, V::loadu(&col_scale[c]), V::loadu(&col_tau[c]));
      });
      reduce([&](int64_t g, const A* sums) {
        if (params[g].iterate) step.newton(params[g], sums[1], sums[2]);
      });
      iterate = false;
      for (const auto& p : params) iterate = iterate || p.iterate;
    }
    if constexpr (!Step::kWrite) continue;
    spread(col_tau, [&](int64_t g) { return params[g].tau; });

    // Pass 2: the rewrite, streaming the rows again.
    at::parallel_for(0, s.outer, row_grain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        rewrite_columns(matrix + o * cols, cols, step, col_scale.data(), col_tau.data());
      }
    });
  }
}

// Column path for the groups [g_begin, g_end) of batch b, on the calling thread (the multi-tensor
// entry runs many such tiles in one parallel region). The sums are those of column_path, taken in
// the same order (per column within the same row blocks, then over blocks in order), so the
// result is bitwise the same; the Newton passes and the rewrite read the tile again, from cache
// when it is small.
template <typename T, typename Step>
void column_tile(T* data, const GroupShape& s, const Step& step, int64_t b, int64_t g_begin,
                 int64_t g_end) {
  using L = Lanes<T>;
  using A = typename L::A;
  using V = typename L::V;
  constexpr int64_t P = L::kParts;
  constexpr int64_t W = L::kWidth;
  constexpr int64_t VS = V::size();
  constexpr bool kSq = Step::kWantSumSq, kAbs = Step::kWantAbs;
  const int64_t cols = s.groups * s.inner;
  const ColumnBlocks cb = column_blocks(s, (cols + W - 1) / W * W);
  const int64_t width = (g_end - g_begin) * s.inner;
  const int64_t padded = (width + W - 1) / W * W;
  T* tile = data + b * s.outer * cols + g_begin * s.inner;

  // (a step that only takes Newton sums needs the statistics 1 and 2 without a first pass)
  constexpr bool kNewtonSums = kAbs || (Step::kRewrite && !Step::kWrite);
  const bool used[3] = {kSq, kNewtonSums, kNewtonSums};
  std::vector<A> part[3], col[3];
  for (int k = 0; k < 3; ++k) {
    if (used[k]) part[k].assign(padded, A(0)), col[k].assign(padded, A(0));
  }
  std::vector<A> col_scale(padded, A(1)), col_tau(padded, A(0));
  std::vector<GroupParams<A>> params(g_end - g_begin);

  // Per block: partial sums over its rows in row order, then added to the column totals.
  auto stream = [&](auto&& add) {
    for (int k = 0; k < 3; ++k) {
      if (used[k]) std::fill(col[k].begin(), col[k].end(), A(0));
    }
    for (int64_t blk = 0; blk < cb.count; ++blk) {
      for (int k = 0; k < 3; ++k) {
        if (used[k]) std::fill(part[k].begin(), part[k].end(), A(0));
      }
      const int64_t o_end = std::min(s.outer, (blk + 1) * cb.rows_per_block);
      for (int64_t o = blk * cb.rows_per_block; o < o_end; ++o) {
        const T* row = tile + o * cols;
        for (int64_t j = 0; j < width; j += W) {
          V x[P];
          L::load(row + j, std::min(W, width - j), x);
          for (int64_t k = 0; k < P; ++k) {
            const int64_t c = j + k * VS;
            Sums<A> acc;
            if (used[0]) acc.a = V::loadu(&part[0][c]);
            if (used[1]) acc.b = V::loadu(&part[1][c]);
            if (used[2]) acc.c = V::loadu(&part[2][c]);
            add(acc, x[k], c);
            if (used[0]) acc.a.store(&part[0][c]);
            if (used[1]) acc.b.store(&part[1][c]);
            if (used[2]) acc.c.store(&part[2][c]);
          }
        }
      }
      for (int k = 0; k < 3; ++k) {
        if (!used[k]) continue;
        for (int64_t v = 0; v < padded; v += VS) {
          (V::loadu(&col[k][v]) + V::loadu(&part[k][v])).store(&col[k][v]);
        }
      }
    }
  };
  auto for_each_group = [&](auto&& per_group) {
    for (int64_t g = 0; g < g_end - g_begin; ++g) {
      A sums[3];
      sum_group_columns(col, used, g, s.inner, sums);
      per_group(g, sums);
    }
  };
  auto spread = [&](std::vector<A>& out, auto&& value_of_group) {
    spread_over_columns(out, g_end - g_begin, s.inner, value_of_group);
  };

  if constexpr (kSq || kAbs) {
    stream([&](Sums<A>& acc, const V& x, int64_t) { add_first_pass(step, acc, x); });
  }
  for_each_group([&](int64_t g, const A* sums) {
    params[g] = step.finish(b * s.groups + g_begin + g, sums[0], sums[1], sums[2]);
  });
  if constexpr (!Step::kRewrite) return;
  auto any_iterate = [&] {
    return std::any_of(params.begin(), params.end(), [](const auto& p) { return p.iterate; });
  };
  spread(col_scale, [&](int64_t g) { return params[g].scale; });
  while (any_iterate()) {
    spread(col_tau, [&](int64_t g) { return params[g].tau; });
    stream([&](Sums<A>& acc, const V& x, int64_t c) {
      add_newton_pass(step, acc, x, V::loadu(&col_scale[c]), V::loadu(&col_tau[c]));
    });
    for_each_group([&](int64_t g, const A* sums) {
      if (params[g].iterate) step.newton(params[g], sums[1], sums[2]);
    });
  }
  if constexpr (!Step::kWrite) return;
  spread(col_tau, [&](int64_t g) { return params[g].tau; });
  for (int64_t o = 0; o < s.outer; ++o) {
    rewrite_columns(tile + o * cols, width, step, col_scale.data(), col_tau.data());
  }
}

}  // namespace detail

// Which traversal a layout takes.
inline bool uses_chunk_path(const GroupShape& s) {
  return s.outer == 1 || s.inner >= kChunkPathMinInner;
}

// Runs `step` over every group of `work` (contiguous in the layout `s`).
template <typename T, typename Step>
void run_groups(T* data, const GroupShape& s, const Step& step) {
  if (s.num_groups() == 0 || s.group_size() == 0) return;
  if (uses_chunk_path(s)) {
    detail::chunk_path(data, s, step);
  } else {
    detail::column_path(data, s, step);
  }
}

}  // namespace fastprox::cpu
