// Torch-free CPU kernels of the embedding path: multi-field row gather, deterministic duplicate
// reduction (stable radix sort by row) and the fused row-sparse optimizer updates.
//
// Every kernel works on raw pointers and a half-open range of its parallel axis, so the caller
// (the torch glue) decides the threading (at::parallel_for, i.e. OpenMP in torch's CPU builds)
// and results never depend on how the range is split. Row offsets are int64 throughout:
// row * D exceeds 2^31 on production tables. bf16 is stored as raw uint16_t bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sfg {
namespace cpu {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as torch does, so a bf16 table updated here matches torch's rounding.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T> inline float load_f32(const T* p);
template <> inline float load_f32<float>(const float* p) { return *p; }
template <> inline float load_f32<uint16_t>(const uint16_t* p) { return bf16_to_float(*p); }

template <typename T> inline void store_f32(T* p, float v);
template <> inline void store_f32<float>(float* p, float v) { *p = v; }
template <> inline void store_f32<uint16_t>(uint16_t* p, float v) { *p = float_to_bf16(v); }

enum BoundsMode : int { kFatal = 0, kClampToOov = 1, kOff = 2 };

// Bounds scan of samples [b0, b1): returns true when some id lies outside [0, sizes[f]).
template <typename Id>
bool any_bad_id(const Id* ids, int64_t b0, int64_t b1, int64_t num_fields, const int64_t* sizes) {
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    const Id* row = ids + b * num_fields;
    for (int64_t f = 0; f < num_fields; ++f) {
      const int64_t id = static_cast<int64_t>(row[f]);
      bad |= (id < 0) | (id >= sizes[f]);
    }
  }
  return bad;
}

// Table row of (b, f) under the bounds mode; the fatal mode has already been checked by the caller.
template <typename Id>
inline int64_t table_row(const Id* ids, int64_t b, int64_t f, int64_t num_fields, const int64_t* offsets,
                         const int64_t* sizes, int mode) {
  int64_t id = static_cast<int64_t>(ids[b * num_fields + f]);
  if (mode == kClampToOov && (id < 0 || id >= sizes[f])) id = sizes[f] - 1;  // the field's OOV row
  return offsets[f] + id;
}

// out[b, f, :] = weight[offsets[f] + ids[b, f], :] for samples [b0, b1); same dtype in and out.
template <typename Id, typename T>
void gather_rows(const Id* ids, int64_t b0, int64_t b1, int64_t num_fields, const int64_t* offsets,
                 const int64_t* sizes, int mode, const T* weight, int64_t dim, T* out) {
  const size_t row_bytes = static_cast<size_t>(dim) * sizeof(T);
  if (row_bytes == 0) return;  // D = 0: nothing to copy (and an empty output's data pointer may be null)
  for (int64_t b = b0; b < b1; ++b) {
    T* dst = out + b * num_fields * dim;
    for (int64_t f = 0; f < num_fields; ++f) {
      const int64_t row = table_row(ids, b, f, num_fields, offsets, sizes, mode);
      std::memcpy(dst + f * dim, weight + row * dim, row_bytes);
    }
  }
}

// Same gather, widened to fp32 (the fused op's tile prologue; bf16 tables accumulate in fp32).
template <typename Id, typename T>
void gather_rows_f32(const Id* ids, int64_t b0, int64_t b1, int64_t num_fields, const int64_t* offsets,
                     const int64_t* sizes, int mode, const T* weight, int64_t dim, float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    float* dst = out + (b - b0) * num_fields * dim;
    for (int64_t f = 0; f < num_fields; ++f) {
      const T* src = weight + table_row(ids, b, f, num_fields, offsets, sizes, mode) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[f * dim + d] = load_f32(src + d);
    }
  }
}

// int8 row-wise quantised rows: w[r, d] ~= q[r, d] * scale_bias[r, 0] + scale_bias[r, 1], widened to
// fp32 for samples [b0, b1) into out (which holds (b1 - b0) samples: the caller offsets it).
template <typename Id>
void gather_rows_int8(const Id* ids, int64_t b0, int64_t b1, int64_t num_fields, const int64_t* offsets,
                      const int64_t* sizes, int mode, const uint8_t* q, const float* scale_bias, int64_t dim,
                      float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    float* dst = out + (b - b0) * num_fields * dim;
    for (int64_t f = 0; f < num_fields; ++f) {
      const int64_t row = table_row(ids, b, f, num_fields, offsets, sizes, mode);
      const uint8_t* src = q + row * dim;
      const float scale = scale_bias[2 * row], bias = scale_bias[2 * row + 1];
      for (int64_t d = 0; d < dim; ++d) dst[f * dim + d] = static_cast<float>(src[d]) * scale + bias;
    }
  }
}

// Stable LSD radix sort of the entry indices 0..n-1 by rows[i] (all in [0, num_rows)).
// Stability keeps equal rows in ascending entry order, so each row's gradients are later summed
// in one fixed order: the update is bitwise identical whatever the thread count.
inline void stable_sort_by_row(const int64_t* rows, int64_t n, int64_t num_rows, std::vector<int64_t>& order,
                               std::vector<int64_t>& sorted_rows) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < num_rows) ++bits;
  order.resize(n);
  sorted_rows.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    order[i] = i;
    sorted_rows[i] = rows[i];
  }
  std::vector<int64_t> tmp_order(n), tmp_rows(n), count(kBuckets);
  for (int shift = 0; shift < bits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(sorted_rows[i] >> shift) & (kBuckets - 1)];
    int64_t total = 0;
    for (int64_t k = 0; k < kBuckets; ++k) {
      const int64_t c = count[k];
      count[k] = total;
      total += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = count[(sorted_rows[i] >> shift) & (kBuckets - 1)]++;
      tmp_order[pos] = order[i];
      tmp_rows[pos] = sorted_rows[i];
    }
    order.swap(tmp_order);
    sorted_rows.swap(tmp_rows);
  }
}

enum UpdateKind : int { kSgd = 0, kRowwiseAdagrad = 1, kAdam = 2 };

struct UpdateParams {
  float lr = 0.f, eps = 0.f, beta1 = 0.f, beta2 = 0.f;
  // 1 - beta rounded once from double: 1.f - 0.999f is off by 1.3e-5 relative.
  float one_minus_beta1 = 0.f, one_minus_beta2 = 0.f;
  float inv_bias1 = 0.f;  // Adam: 1 / (1 - beta1^step)
  float inv_bias2 = 0.f;  // Adam: 1 / (1 - beta2^step)
};

// Segments [s0, s1) of the sorted entries (segment k spans seg_start[k] .. seg_start[k+1]):
// sum each touched row's gradients in fp32 in entry order, then apply the optimizer to that row.
//   SGD:             w -= lr * g
//   rowwise Adagrad: acc += mean_d(g^2);  w -= lr * g / (sqrt(acc) + eps)            (FBGEMM)
//   Adam (lazy):     m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//                    w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)          (touched rows only)
template <typename T, typename G>
void update_segments(int kind, const UpdateParams& p, const int64_t* seg_start, const int64_t* order,
                     const int64_t* sorted_rows, int64_t s0, int64_t s1, const G* grad, int64_t dim, T* weight,
                     float* state1, float* state2) {
  // The sorted entries point at scattered rows of grad (about 10 MB at the Criteo shape) and the
  // touched rows of a large table: each read is a cache miss whose latency, not bandwidth, bounds
  // the loop. Prefetching a fixed distance ahead in the sorted order keeps several misses in flight.
  constexpr int64_t kEntriesAhead = 16, kSegmentsAhead = 4;
  const int64_t entries_end = seg_start[s1];
  std::vector<float> g(dim);
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t begin = seg_start[s], end = seg_start[s + 1];
    const int64_t row = sorted_rows[begin];
    if (s + kSegmentsAhead < s1) {
      const int64_t ahead = sorted_rows[seg_start[s + kSegmentsAhead]];
      __builtin_prefetch(weight + ahead * dim, 1);
      if (kind == kRowwiseAdagrad) __builtin_prefetch(state1 + ahead, 1);
      if (kind == kAdam) {
        __builtin_prefetch(state1 + ahead * dim, 1);
        __builtin_prefetch(state2 + ahead * dim, 1);
      }
    }
    std::fill(g.begin(), g.end(), 0.f);
    for (int64_t k = begin; k < end; ++k) {
      if (k + kEntriesAhead < entries_end) __builtin_prefetch(grad + order[k + kEntriesAhead] * dim);
      const G* src = grad + order[k] * dim;
      for (int64_t d = 0; d < dim; ++d) g[d] += load_f32(src + d);
    }
    T* w = weight + row * dim;
    if (kind == kSgd) {
      for (int64_t d = 0; d < dim; ++d) store_f32(w + d, load_f32(w + d) - p.lr * g[d]);
    } else if (kind == kRowwiseAdagrad) {
      float sq = 0.f;
      for (int64_t d = 0; d < dim; ++d) sq += g[d] * g[d];
      const float acc = state1[row] + sq / static_cast<float>(dim);
      state1[row] = acc;
      const float scale = p.lr / (std::sqrt(acc) + p.eps);
      for (int64_t d = 0; d < dim; ++d) store_f32(w + d, load_f32(w + d) - scale * g[d]);
    } else {
      float* m = state1 + row * dim;
      float* v = state2 + row * dim;
      for (int64_t d = 0; d < dim; ++d) {
        m[d] = p.beta1 * m[d] + p.one_minus_beta1 * g[d];
        v[d] = p.beta2 * v[d] + p.one_minus_beta2 * (g[d] * g[d]);
        const float denom = std::sqrt(v[d] * p.inv_bias2) + p.eps;
        store_f32(w + d, load_f32(w + d) - p.lr * (m[d] * p.inv_bias1) / denom);
      }
    }
  }
}

}  // namespace cpu
}  // namespace sfg
