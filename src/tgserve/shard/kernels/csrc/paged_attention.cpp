// Decode attention read straight from the paged KV cache through the slot index: no gathered copy.
//
// One task per (row, run of kv heads): with enough rows a task covers all kv heads of its row, so
// each slot's K and V rows ([Hkv, D], contiguous) are read as one stream of whole cache lines and
// every query head meets them from L1; with few rows (batch 1) the kv heads are split across tasks
// so that every thread has work. Softmax is online over blocks of positions: a block's scores are
// computed, the running max moves once per block and the accumulator is rescaled once per block,
// which keeps it stable without a second pass over K. Scores are computed kLanes positions at a
// time (dots()), so that the horizontal sums of a dot product each are one shared reduction tree,
// and a kv head's query heads are taken together, so that each K or V vector loaded serves them
// all.
//
// From DRAM (a decode batch's cache is far larger than L3) the reads must overlap the arithmetic.
// Software prefetches that name L1 (prefetcht0) each hold one of the core's few L1 miss buffers
// until their line arrives, so a stream of them stalls the loads the arithmetic needs. The
// stream ahead is therefore prefetched into L2 (prefetcht1), K kFar positions on and V as its
// block is scored, only the next few K rows into L1, and the prefetches of a run of positions are
// spread between its kv heads' arithmetic instead of issued in one burst
// (docs/design/decode-attention.md).
//
// The cache may be float16 (--kv-cache-dtype float16): its rows are widened to float as they are
// loaded and all arithmetic stays float32, so only the stored K and V are rounded, and the bytes
// this memory-bound kernel reads are halved.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

// Positions per rescale: enough to amortise it, few enough that the block's V rows stay in L2.
constexpr int64_t kBlock = 64;
// How many positions ahead K rows are prefetched into L2 (nearby distances measured alike), and
// into L1 from there.
constexpr int64_t kFar = 24;
constexpr int64_t kNear = 4;

// Vector types (simd.h) rather than plain float arrays: GCC kept array accumulators on the stack.
using tgserve_simd::kLanes;
using tgserve_simd::load;
using vf = tgserve_simd::vec;

// T is the cache's element type: float, or c10::Half for a float16 cache (widened on load).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  vf acc0 = {}, acc1 = {};  // two chains, so each FMA need not wait for the previous one
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 += load(a + i) * load(b + i);
    acc1 += load(a + i + kLanes) * load(b + i + kLanes);
  }
  for (; i + kLanes <= n; i += kLanes) acc0 += load(a + i) * load(b + i);
  float s = tgserve_simd::hsum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

inline void scale_in_place(float w, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= w;
}

// A prefetch never faults, so it may run before the slot it uses is range-checked. Locality 2 is
// prefetcht1 (into L2), 3 prefetcht0 (into L1).
template <int Locality, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(row + i, 0, Locality);
}

// Everything one task reads: kv heads [h0, h0 + kv_heads) of one row, and their query heads.
// K/V pointers are already offset to kv head h0.
template <typename T>
struct Task {
  const float* q;  // [heads, D], unscaled: heads = kv_heads * group
  float scale;
  const T *k, *v;  // slot s's row starts at k + s * k_stride; kv head j at + j * k_head
  int64_t k_stride, v_stride, k_head, v_head;
  const int64_t* slots;  // this row's context slots; positions [begin, end) are attended
  int64_t begin, end, num_slots, kv_heads, group, dim;
  float* out;  // [heads, D]; doubles as the accumulator
  int64_t heads() const { return kv_heads * group; }
  // This task's part of a slot's K and V rows.
  int64_t k_span() const { return (kv_heads - 1) * k_head + dim; }
  int64_t v_span() const { return (kv_heads - 1) * v_head + dim; }
};

// Per-thread scratch, reused across tasks so the hot loop never allocates.
template <typename T>
struct Scratch {
  std::vector<float> q, scores, max, sum;  // q: [heads, D], scores: [heads, kBlock]
  const T* rows[kBlock];
  Scratch(int64_t heads, int64_t dim)
      : q(heads * dim), scores(heads * kBlock), max(heads), sum(heads) {}
};

// Query heads of one kv head, taken together so that each K or V vector loaded (and widened from
// float16) serves all of them: loading it once per query head made the kernel compute-bound even
// from DRAM. At most kMaxGroup heads at a time, so their accumulators fit in registers.
constexpr int kMaxGroup = 3;

// out[g][i] = q[g] · rows[i][0:d] for kLanes rows and G query heads. Each (head, row) product is
// summed along d in one vector, kPass rows at a time, and each head's kLanes vectors are then
// reduced together (transpose_sum): a horizontal sum per score made scoring three quarters of the
// kernel.
template <int G, typename T>
inline void dots(const float* const* q, const T* const* rows, int64_t d, float* const* out) {
  constexpr int64_t kPass = kLanes / 2;  // G * kPass accumulators + G query vectors in registers
  vf part[G][kLanes];
  for (int64_t p0 = 0; p0 < kLanes; p0 += kPass) {
    vf acc[G][kPass] = {};
    for (int64_t c = 0; c < d; c += kLanes) {
      vf qc[G];
      for (int g = 0; g < G; ++g) qc[g] = load(q[g] + c);
#pragma GCC unroll 8
      for (int64_t i = 0; i < kPass; ++i) {
        const vf k = load(rows[p0 + i] + c);
        for (int g = 0; g < G; ++g) acc[g][i] += qc[g] * k;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int64_t i = 0; i < kPass; ++i) part[g][p0 + i] = acc[g][i];
  }
  for (int g = 0; g < G; ++g) tgserve_simd::store(out[g], tgserve_simd::transpose_sum(part[g]));
}

// Scores of positions [b0, b0 + n) for every head; false if a slot is out of range. kLanes
// positions at a time, so that their K rows meet every query head from L1.
template <typename T>
bool score_block(const Task<T>& t, Scratch<T>& s, int64_t b0, int64_t n) {
  const int64_t d = t.dim, k_span = t.k_span(), v_span = t.v_span();
  const T* rows[kLanes];
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int64_t m = std::min(kLanes, n - i0);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t pos = b0 + i0 + i, slot = t.slots[pos];
      if (slot < 0 || slot >= t.num_slots) return false;
      rows[i] = t.k + slot * t.k_stride;
    }
    const bool whole = m == kLanes && d % kLanes == 0;
    for (int64_t kh = 0; kh < t.kv_heads; ++kh) {
      // Hardware prefetchers cannot guess the next slot, but we know it: ask for the K rows ahead,
      // and for this position's V row, read once the block's scores are done. Each kv head issues
      // its share of this run's positions.
      for (int64_t i = kh * m / t.kv_heads; i < (kh + 1) * m / t.kv_heads; ++i) {
        const int64_t pos = b0 + i0 + i;
        if (pos + kFar < t.end) prefetch_row<2>(t.k + t.slots[pos + kFar] * t.k_stride, k_span);
        prefetch_row<2>(t.v + t.slots[pos] * t.v_stride, v_span);
        if (pos + kNear < t.end) prefetch_row<3>(t.k + t.slots[pos + kNear] * t.k_stride, k_span);
      }
      const T* head_rows[kLanes];  // kv head kh of each position, shared by its query heads
      for (int64_t i = 0; i < m; ++i) head_rows[i] = rows[i] + kh * t.k_head;
      for (int64_t g0 = 0; g0 < t.group; g0 += kMaxGroup) {
        const int64_t heads = std::min<int64_t>(kMaxGroup, t.group - g0);
        const float* q[kMaxGroup];
        float* out[kMaxGroup];
        for (int64_t g = 0; g < heads; ++g) {
          const int64_t h = kh * t.group + g0 + g;
          q[g] = &s.q[h * d];
          out[g] = &s.scores[h * kBlock + i0];
        }
        if (!whole) {
          for (int64_t g = 0; g < heads; ++g)
            for (int64_t i = 0; i < m; ++i) out[g][i] = dot(q[g], head_rows[i], d);
        } else if (heads == 3) {
          dots<3>(q, head_rows, d, out);
        } else if (heads == 2) {
          dots<2>(q, head_rows, d, out);
        } else {
          dots<1>(q, head_rows, d, out);
        }
      }
    }
  }
  return true;
}

// Scores become exp(score - running max); the accumulator and sum are rescaled to the new max.
template <typename T>
void softmax_block(const Task<T>& t, Scratch<T>& s, int64_t n) {
  for (int64_t h = 0; h < t.heads(); ++h) {
    float* sc = &s.scores[h * kBlock];
    // A vector max: std::max_element's scalar loop showed up in the kernel's profile.
    int64_t j = 0;
    vf top = tgserve_simd::splat(s.max[h]);
    for (; j + kLanes <= n; j += kLanes) {
      const vf x = load(sc + j);
      top = x > top ? x : top;
    }
    float m = tgserve_simd::hmax(top);
    for (; j < n; ++j) m = std::max(m, sc[j]);
    const float correction = std::exp(s.max[h] - m);  // 0 on the first block, when all is zero
    scale_in_place(correction, t.out + h * t.dim, t.dim);
    int64_t i = 0;
    vf total = {};
    for (; i + kLanes <= n; i += kLanes) {
      const vf e = tgserve_simd::exp(load(sc + i) - m);
      tgserve_simd::store(sc + i, e);
      total += e;
    }
    float sum = s.sum[h] * correction + tgserve_simd::hsum(total);
    for (; i < n; ++i) sum += (sc[i] = std::exp(sc[i] - m));
    s.max[h] = m;
    s.sum[h] = sum;
  }
}

// out[g][c : c + V lanes] += sum_i w[g][i] * rows[i][c : c + V lanes] for G query heads of one kv
// head: each V vector is loaded once for all of them, the partial sums kept in registers over rows.
template <int G, int64_t V, typename T>
inline void weighted_rows(const float* const* w, const T* const* rows, int64_t n, int64_t c,
                          float* const* out) {
  vf acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < V; ++j) acc[g][j] = load(out[g] + c + j * kLanes);
  for (int64_t i = 0; i < n; ++i) {
    vf x[V];
    for (int64_t j = 0; j < V; ++j) x[j] = load(rows[i] + c + j * kLanes);
    for (int g = 0; g < G; ++g) {
      const float wi = w[g][i];
      for (int64_t j = 0; j < V; ++j) acc[g][j] += wi * x[j];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int64_t j = 0; j < V; ++j) tgserve_simd::store(out[g] + c + j * kLanes, acc[g][j]);
}

// Every column of G heads' outputs: the widest register tile that fits first (4 vectors of
// accumulators per head with 32 registers, 2 with 16), then narrower ones, then scalars.
template <int G, typename T>
inline void weighted_heads(const float* const* w, const T* const* rows, int64_t n, int64_t dim,
                           float* const* out) {
  constexpr int64_t kWide = kLanes == 16 ? 4 : 2;
  int64_t c = 0;
  for (; c + kWide * kLanes <= dim; c += kWide * kLanes)
    weighted_rows<G, kWide>(w, rows, n, c, out);
  for (; c + kLanes <= dim; c += kLanes) weighted_rows<G, 1>(w, rows, n, c, out);
  for (; c < dim; ++c)
    for (int g = 0; g < G; ++g)
      for (int64_t i = 0; i < n; ++i) out[g][c] += w[g][i] * static_cast<float>(rows[i][c]);
}

template <typename T>
void accumulate_block(const Task<T>& t, Scratch<T>& s, int64_t b0, int64_t n) {
  for (int64_t kh = 0; kh < t.kv_heads; ++kh) {
    const int64_t offset = kh * t.v_head;
    for (int64_t i = 0; i < n; ++i) s.rows[i] = t.v + t.slots[b0 + i] * t.v_stride + offset;
    for (int64_t g0 = 0; g0 < t.group; g0 += kMaxGroup) {
      const int64_t heads = std::min<int64_t>(kMaxGroup, t.group - g0);
      const float* w[kMaxGroup];
      float* out[kMaxGroup];
      for (int64_t g = 0; g < heads; ++g) {
        const int64_t h = kh * t.group + g0 + g;
        w[g] = &s.scores[h * kBlock];
        out[g] = t.out + h * t.dim;
      }
      if (heads == 3) {
        weighted_heads<3>(w, s.rows, n, t.dim, out);
      } else if (heads == 2) {
        weighted_heads<2>(w, s.rows, n, t.dim, out);
      } else {
        weighted_heads<1>(w, s.rows, n, t.dim, out);
      }
    }
  }
}

// False if a slot is out of range: the caller raises after the parallel loop, because an exception
// escaping an OpenMP region terminates the process.
template <typename T>
bool attend(const Task<T>& t, Scratch<T>& s) {
  std::fill(t.out, t.out + t.heads() * t.dim, 0.f);
  std::fill(s.max.begin(), s.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.sum.begin(), s.sum.end(), 0.f);
  for (int64_t i = 0; i < t.heads() * t.dim; ++i) s.q[i] = t.q[i] * t.scale;  // once, not per score
  // The first rows, which no earlier position asked for.
  for (int64_t pos = t.begin; pos < std::min(t.end, t.begin + kFar); ++pos)
    prefetch_row<2>(t.k + t.slots[pos] * t.k_stride, t.k_span());
  for (int64_t b0 = t.begin; b0 < t.end; b0 += kBlock) {
    const int64_t n = std::min(kBlock, t.end - b0);
    if (!score_block(t, s, b0, n)) return false;
    softmax_block(t, s, n);
    accumulate_block(t, s, b0, n);
  }
  // An empty context leaves zeros, where a fully masked softmax would give NaN.
  for (int64_t h = 0; h < t.heads(); ++h)
    if (s.sum[h] > 0.f) scale_in_place(1.f / s.sum[h], t.out + h * t.dim, t.dim);
  return true;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& kv_index, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k_cache, v_cache must be 3-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode_attention takes a float32 q");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf),
              "the K and V caches must both be float32 or both float16");
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "CPU tensors only");
  TORCH_CHECK(k.sizes() == v.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(q.size(2) == k.size(2), "q and cache head_dim differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "query heads must be a multiple of kv heads");
  // The cache is never made contiguous here: that would copy all of it. Rows need unit stride only.
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "cache head_dim must be contiguous");
  TORCH_CHECK(kv_index.dim() == 2 && kv_index.size(0) == q.size(0), "kv_index must be [B, L]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0), "lengths must be [B]");
  TORCH_CHECK(kv_index.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "kv_index and lengths must be int64");
}

// Every row's attention into out [B, H, D]; false if some slot is out of range.
template <typename T>
bool attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& kv_index, const int64_t* len, double scale, int64_t window,
                at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const float* qp = q.data_ptr<float>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t* idx = kv_index.data_ptr<int64_t>();
  const int64_t idx_stride = kv_index.stride(0);
  float* op = out.data_ptr<float>();
  // Whole rows per task once there are a few rows per thread; otherwise one kv head per task.
  const int64_t per_task = batch >= 4 * omp_get_max_threads() ? kv_heads : 1;
  const int64_t tasks_per_row = kv_heads / per_task;
  bool bad_slot = false;
#pragma omp parallel reduction(|| : bad_slot)
  {
    Scratch<T> scratch(per_task * group, dim);
    // Dynamic schedule: rows differ in length, so equal task counts are not equal work.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < batch * tasks_per_row; ++task) {
      const int64_t b = task / tasks_per_row, h = (task % tasks_per_row) * per_task;
      const int64_t begin = window > 0 ? std::max<int64_t>(0, len[b] - window) : 0;
      const int64_t head0 = (b * heads + h * group) * dim;  // first query head of kv head h
      const Task<T> t{qp + head0,
                      static_cast<float>(scale),
                      kp + h * k.stride(1),
                      vp + h * v.stride(1),
                      k.stride(0),
                      v.stride(0),
                      k.stride(1),
                      v.stride(1),
                      idx + b * idx_stride,
                      begin,
                      len[b],
                      k.size(0),
                      per_task,
                      group,
                      dim,
                      op + head0};
      if (!attend(t, scratch)) bad_slot = true;
    }
  }
  return !bad_slot;
}

}  // namespace

// The operations themselves, also called directly by decode_layer.cpp (kernels.h).
namespace tgserve_kernels {

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& kv_index_in, const at::Tensor& lengths_in,
                                  double scale, int64_t window) {
  check_inputs(q_in, k, v, kv_index_in, lengths_in);
  const at::Tensor q = q_in.contiguous(), lengths = lengths_in.contiguous();
  // A column slice of a wider slot table is read in place: only its rows must be unit-stride.
  const at::Tensor kv_index = kv_index_in.stride(1) == 1 ? kv_index_in : kv_index_in.contiguous();
  const int64_t batch = q.size(0), max_len = kv_index.size(1);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(len[b] >= 0 && len[b] <= max_len, "lengths[", b, "]=", len[b], " outside [0, L]");
  at::Tensor out = at::empty({batch, q.size(1), q.size(2)}, q.options());
  const bool in_range = k.scalar_type() == at::kHalf
                            ? attend_all<c10::Half>(q, k, v, kv_index, len, scale, window, out)
                            : attend_all<float>(q, k, v, kv_index, len, scale, window, out);
  TORCH_CHECK(in_range, "kv_index holds a slot outside [0, ", k.size(0), ")");
  return out;
}

}  // namespace tgserve_kernels

TORCH_LIBRARY(tgserve_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_index, "
      "Tensor lengths, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &tgserve_kernels::paged_decode_attention);
}
