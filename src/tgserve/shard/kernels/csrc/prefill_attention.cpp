// Causal attention of new prompts over their own tokens (no cached prefix), every sequence of a
// prefill in one op, straight from the rows of the fused QKV projection.
//
// torch's CPU flash kernel, the path before, ran short prompts far below the FMA peak
// (docs/design/prefill-attention.md): it wants the kv heads
// repeated for every query head, its blocks are sized for long sequences, and it is called once
// per sequence per layer from Python. Here the work is cut into tiles of kRows query vectors of
// one kv head's group: a tile's positions are consecutive, and its query heads share every K and
// V row loaded, as in the decode kernel.
//
// A tile computes its exact scores against all the keys it may see (two passes, no online
// rescaling: at most kMaxKeys positions, a few KiB a row), in the same register-tiled shape as
// packed_linear.cpp: K is first transposed into panels of kLanes keys by head dimension, so each
// FMA broadcasts one query scalar against kLanes keys and no horizontal sum is needed. Then the
// softmax per row, and P·V with kVecs vectors of the head dimension per pass, accumulated in
// registers across the tile's rows. Longer prompts keep torch's flash kernel (sdpa.py), whose
// blocking suits them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "simd.h"

namespace {

using tgserve_simd::kLanes;
using tgserve_simd::load;
using tgserve_simd::splat;
using tgserve_simd::store;
using vec = tgserve_simd::vec;
using ivec = tgserve_simd::ivec;

// Query vectors per tile: kRows accumulators for the scores of one key panel, kRows x kVecs for
// P·V, within the 32 vector registers of AVX-512 (16 with AVX2).
constexpr int64_t kRows = 8;
#if defined(__AVX512F__)
constexpr int kVecs = 2;
#else
constexpr int kVecs = 1;
#endif
constexpr int64_t kMaxKeys = 4096;

struct Sequence {
  int64_t start, length, panels, kt;  // kt: offset of its kv heads' K panels in the buffer
};

struct Inputs {
  const float *q, *k, *v;
  float* out;
  int64_t q_stride, k_stride, v_stride, out_stride;  // between rows (tokens)
  int64_t heads, kv_heads, dim, window;
  float scale;
};

// K rows of kv head h, [length, D] at stride k_stride, as panels [panels][D][kLanes], zero past
// the end: panel j, dimension d holds that dimension of keys j·kLanes ... j·kLanes + kLanes - 1.
void transpose_keys(const Inputs& in, const Sequence& s, int64_t h, float* kt) {
  const int64_t dim = in.dim;
  std::fill(kt, kt + s.panels * dim * kLanes, 0.f);
  for (int64_t t = 0; t < s.length; ++t) {
    const float* row = in.k + (s.start + t) * in.k_stride + h * dim;
    float* dst = kt + (t / kLanes) * dim * kLanes + t % kLanes;
    for (int64_t d = 0; d < dim; ++d) dst[d * kLanes] = row[d];
  }
}

// scores[r][j·kLanes + l] = scale · q_r · k_{j·kLanes + l} for panels [p0, p1), R query rows.
template <int R>
void score_panels(const float* const* qrows, const float* kt, int64_t dim, int64_t p0, int64_t p1,
                  float scale, float* scores, int64_t ld) {
  for (int64_t j = p0; j < p1; ++j) {
    const float* panel = kt + j * dim * kLanes;
    vec acc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = vec{};
    for (int64_t d = 0; d < dim; ++d) {
      const vec w = load(panel + d * kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] += w * qrows[r][d];
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) store(scores + r * ld + j * kLanes, acc[r] * scale);
  }
}

// out_r = Σ_j p[r][j] · v_j / sum_r over keys [j0, j1), V rows at v (stride), kVecs vectors of D
// a pass. One array per vector of the pass, as in packed_linear.cpp: GCC kept a two-dimensional
// accumulator array in registers but spilled the V vectors to the stack.
template <int R>
void weigh_values(const float* p, int64_t ld, const float* v, int64_t v_stride, int64_t dim,
                  int64_t j0, int64_t j1, float* const* orows, const float* inv_sum) {
  for (int64_t d0 = 0; d0 < dim; d0 += kVecs * kLanes) {
    vec acc0[R], acc1[kVecs > 1 ? R : 1];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc0[r] = vec{};
    if constexpr (kVecs > 1) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc1[r] = vec{};
    }
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = v + j * v_stride + d0;
      const vec w0 = load(row);
      if constexpr (kVecs > 1) {
        const vec w1 = load(row + kLanes);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const float pr = p[r * ld + j];
          acc0[r] += w0 * pr;
          acc1[r] += w1 * pr;
        }
      } else {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc0[r] += w0 * p[r * ld + j];
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      store(orows[r] + d0, acc0[r] * inv_sum[r]);
      if constexpr (kVecs > 1) store(orows[r] + d0 + kLanes, acc1[r] * inv_sum[r]);
    }
  }
}

// Query vectors [u0, u0 + R) of kv head h's group in sequence s: vector u is position u / group,
// query head h·group + u % group. Row r sees keys [lo_r, pos_r] (causal, within the window).
template <int R>
void attend_tile(const Inputs& in, const Sequence& s, int64_t h, int64_t u0, const float* kt,
                 float* scratch) {
  const int64_t group = in.heads / in.kv_heads, dim = in.dim;
  const float* qrows[R];
  float* orows[R];
  int64_t lo[R], hi[R];  // keys [lo, hi) per row
  for (int r = 0; r < R; ++r) {
    const int64_t pos = (u0 + r) / group, head = h * group + (u0 + r) % group;
    qrows[r] = in.q + (s.start + pos) * in.q_stride + head * dim;
    orows[r] = in.out + (s.start + pos) * in.out_stride + head * dim;
    hi[r] = pos + 1;
    lo[r] = in.window > 0 ? std::max<int64_t>(0, hi[r] - in.window) : 0;
  }
  const int64_t p0 = lo[0] / kLanes, p1 = (hi[R - 1] + kLanes - 1) / kLanes;
  const int64_t ld = p1 * kLanes;
  float* scores = scratch;
  score_panels<R>(qrows, kt, dim, p0, p1, in.scale, scores, ld);
  // Softmax of each row over its own keys [lo, hi), whole vectors of the aligned span with the
  // lanes outside masked (a scalar tail would cost a vector exp per key); the rest of the tile's
  // span weighs zero.
  float inv_sum[R];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  ivec lane;
  for (int64_t l = 0; l < kLanes; ++l) lane[l] = static_cast<int32_t>(l);
  for (int r = 0; r < R; ++r) {
    float* row = scores + r * ld;
    const int64_t a = lo[r] / kLanes * kLanes, b = (hi[r] + kLanes - 1) / kLanes * kLanes;
    std::fill(row + p0 * kLanes, row + a, 0.f);
    std::fill(row + b, row + ld, 0.f);
    const auto valid = [&](int64_t j) {
      const ivec at = lane + static_cast<int32_t>(j);
      return (at >= static_cast<int32_t>(lo[r])) & (at < static_cast<int32_t>(hi[r]));
    };
    vec peaks = splat(neg_inf);
    for (int64_t j = a; j < b; j += kLanes) {
      const vec x = valid(j) ? load(row + j) : splat(neg_inf);
      peaks = x > peaks ? x : peaks;
    }
    float peak = neg_inf;
    for (int64_t l = 0; l < kLanes; ++l) peak = std::max(peak, peaks[l]);
    vec total = {};
    for (int64_t j = a; j < b; j += kLanes) {
      const vec e = valid(j) ? tgserve_simd::exp(load(row + j) - peak) : vec{};
      store(row + j, e);
      total += e;
    }
    inv_sum[r] = 1.f / tgserve_simd::hsum(total);
  }
  const float* v = in.v + s.start * in.v_stride + h * dim;
  weigh_values<R>(scores, ld, v, in.v_stride, dim, lo[0], hi[R - 1], orows, inv_sum);
}

template <int R>
void attend_tail(const Inputs& in, const Sequence& s, int64_t h, int64_t u0, int64_t rows,
                 const float* kt, float* scratch) {
  if constexpr (R > 1) {
    if (rows < R) return attend_tail<R - 1>(in, s, h, u0, rows, kt, scratch);
  }
  attend_tile<R>(in, s, h, u0, kt, scratch);
}

struct Tile {
  int64_t seq, head, u0, rows;
};

void attend_all(const Inputs& in, const std::vector<Sequence>& seqs, float* kt) {
  const int64_t group = in.heads / in.kv_heads, dim = in.dim;
  const int64_t pairs = static_cast<int64_t>(seqs.size()) * in.kv_heads;
  at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Sequence& s = seqs[i / in.kv_heads];
      const int64_t h = i % in.kv_heads;
      transpose_keys(in, s, h, kt + s.kt + h * s.panels * dim * kLanes);
    }
  });
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < static_cast<int64_t>(seqs.size()); ++i)
    for (int64_t h = 0; h < in.kv_heads; ++h)
      for (int64_t u0 = 0; u0 < seqs[i].length * group; u0 += kRows)
        tiles.push_back({i, h, u0, std::min(kRows, seqs[i].length * group - u0)});
  // Later positions see more keys: hand out the costliest tiles first, then whoever is free
  // takes the next one, so both threads end together.
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.u0 > b.u0; });
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(tiles.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    std::unique_ptr<float[]> scratch(new float[kRows * kMaxKeys]);
    for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) {
      const Tile& tile = tiles[t];
      const Sequence& s = seqs[tile.seq];
      const float* keys = kt + s.kt + tile.head * s.panels * dim * kLanes;
      attend_tail<kRows>(in, s, tile.head, tile.u0, tile.rows, keys, scratch.get());
    }
  });
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t heads, int64_t dim) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == rows && t.size(1) == heads && t.size(2) == dim, name,
              " must be [T, ", heads, ", ", dim, "]");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_cpu(), name, " must be CPU float32");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == dim, name, "'s heads must be contiguous rows");
}

}  // namespace

namespace tgserve_kernels {

// (longest sequence, what the head dim must be a multiple of)
std::tuple<int64_t, int64_t> prefill_attention_limits() {
  return {kMaxKeys, kVecs * kLanes};
}

// out[rows of sequence i] = causal attention of q over k, v within starts[i] .. + lengths[i].
void prefill_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& starts_in,
                       const at::Tensor& lengths_in, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [T, heads, D]");
  const int64_t rows = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  TORCH_CHECK(dim % (kVecs * kLanes) == 0, "head dim ", dim, " is not a multiple of ",
              kVecs * kLanes);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  check_rows(q, "q", rows, heads, dim);
  check_rows(k, "k", rows, kv_heads, dim);
  check_rows(v, "v", rows, kv_heads, dim);
  check_rows(out, "out", rows, heads, dim);
  TORCH_CHECK(starts_in.scalar_type() == at::kLong && lengths_in.scalar_type() == at::kLong &&
                  starts_in.dim() == 1 && starts_in.sizes() == lengths_in.sizes(),
              "starts and lengths must be [S] int64");
  const at::Tensor starts = starts_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  std::vector<Sequence> seqs;
  int64_t kt_size = 0;
  for (int64_t i = 0; i < starts.size(0); ++i) {
    TORCH_CHECK(sp[i] >= 0 && lp[i] >= 0 && sp[i] + lp[i] <= rows, "sequence ", i,
                " outside the rows of q");
    TORCH_CHECK(lp[i] <= kMaxKeys, "sequence ", i, " has ", lp[i], " tokens, over ", kMaxKeys);
    if (lp[i] == 0) continue;
    const int64_t panels = (lp[i] + kLanes - 1) / kLanes;
    seqs.push_back({sp[i], lp[i], panels, kt_size});
    kt_size += kv_heads * panels * dim * kLanes;
  }
  if (seqs.empty()) return;
  // Every float of it is written by transpose_keys: no zeroing here.
  std::unique_ptr<float[]> kt(new float[kt_size]);
  const Inputs in{q.data_ptr<float>(),
                  k.data_ptr<float>(),
                  v.data_ptr<float>(),
                  out.data_ptr<float>(),
                  q.stride(0),
                  k.stride(0),
                  v.stride(0),
                  out.stride(0),
                  heads,
                  kv_heads,
                  dim,
                  window,
                  static_cast<float>(scale)};
  attend_all(in, seqs, kt.get());
}

}  // namespace tgserve_kernels

TORCH_LIBRARY_FRAGMENT(tgserve_cpu, m) {
  m.def("prefill_attention_limits() -> (int, int)", &tgserve_kernels::prefill_attention_limits);
  m.def(
      "prefill_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor starts, "
      "Tensor lengths, float scale, int window) -> ()");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("prefill_attention", &tgserve_kernels::prefill_attention);
}
