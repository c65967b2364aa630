// CUDA multi-field embedding lookup and its sorted, segment-reduced backward fused with rowwise
// Adagrad. Torch-free (see embedding_cuda.h). All row * dim offsets are int64.
//
// Forward: thread t copies vector v of row r = t / vecs_per_row (a sub-warp per row; D=16 fp32 is
// 64 bytes = 4 lanes of 16-byte loads), so a warp reads 8 whole rows with coalesced 16-byte loads.
// Backward: cub's radix sort is stable, so equal rows keep ascending entry order and each
// segment's sum has one fixed order; one sub-warp sums each piece of at most kWindow entries, and
// one sub-warp finishes each segment (one row), so no two threads ever write the same row: no
// atomics and bitwise-repeatable results.
#include <cstdint>

#include <cub/cub.cuh>

#include "embedding_cuda.h"

namespace sfg {
namespace cuda {

namespace {

constexpr int kThreads = 256;

template <typename Id, typename Vec>
__global__ void lookup_fwd_kernel(const Id* __restrict__ ids, const int64_t* __restrict__ offsets, int64_t num_fields,
                                  int64_t num_row_lookups, int64_t vecs_per_row, const Vec* __restrict__ weight,
                                  Vec* __restrict__ out) {
  const int64_t total = num_row_lookups * vecs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t lookup = t / vecs_per_row;
    const int64_t v = t - lookup * vecs_per_row;
    const int64_t field = lookup % num_fields;
    const int64_t row = __ldg(offsets + field) + static_cast<int64_t>(ids[lookup]);
    out[t] = __ldg(weight + row * vecs_per_row + v);
  }
}

template <typename Vec, typename Id>
cudaError_t launch_lookup(const Id* ids, const int64_t* offsets, int64_t batch, int64_t num_fields,
                          const void* weight, int64_t row_bytes, void* out, cudaStream_t stream) {
  const int64_t vecs_per_row = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t total = batch * num_fields * vecs_per_row;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 16 ? blocks : 65535 * 16);
  lookup_fwd_kernel<Id, Vec><<<grid, kThreads, 0, stream>>>(ids, offsets, num_fields, batch * num_fields,
                                                             vecs_per_row, static_cast<const Vec*>(weight),
                                                             static_cast<Vec*>(out));
  return cudaGetLastError();
}

template <typename Id>
cudaError_t lookup_dispatch(const Id* ids, const int64_t* offsets, int64_t batch, int64_t num_fields,
                            const void* weight, int64_t row_bytes, void* out, cudaStream_t stream) {
  const auto aligned = [&](size_t bytes) {
    return row_bytes % static_cast<int64_t>(bytes) == 0 && reinterpret_cast<uintptr_t>(weight) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(out) % bytes == 0;
  };
  if (aligned(16)) return launch_lookup<uint4>(ids, offsets, batch, num_fields, weight, row_bytes, out, stream);
  if (aligned(8)) return launch_lookup<uint2>(ids, offsets, batch, num_fields, weight, row_bytes, out, stream);
  if (aligned(4)) return launch_lookup<uint32_t>(ids, offsets, batch, num_fields, weight, row_bytes, out, stream);
  if (aligned(2)) return launch_lookup<uint16_t>(ids, offsets, batch, num_fields, weight, row_bytes, out, stream);
  return launch_lookup<uint8_t>(ids, offsets, batch, num_fields, weight, row_bytes, out, stream);
}

template <typename Id>
__global__ void table_rows_kernel(const Id* __restrict__ ids, const int64_t* __restrict__ offsets, int64_t num_fields,
                                  int64_t num_entries, int64_t* __restrict__ rows, int64_t* __restrict__ entries) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_entries; i += stride) {
    rows[i] = __ldg(offsets + i % num_fields) + static_cast<int64_t>(ids[i]);
    entries[i] = i;
  }
}

__global__ void segment_heads_kernel(const int64_t* __restrict__ sorted_rows, int64_t num_entries,
                                     int64_t* __restrict__ head) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_entries; i += stride)
    head[i] = (i == 0 || sorted_rows[i] != sorted_rows[i - 1]) ? 1 : 0;
}

// seg_id = inclusive prefix sum of heads: entry i opens segment seg_id[i] - 1 when it is a head.
__global__ void segment_starts_kernel(const int64_t* __restrict__ head, const int64_t* __restrict__ seg_id,
                                      int64_t num_entries, int64_t* __restrict__ seg_start,
                                      int64_t* __restrict__ num_segments) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_entries; i += stride) {
    if (head[i]) seg_start[seg_id[i] - 1] = i;
    if (i == num_entries - 1) {
      seg_start[seg_id[i]] = num_entries;
      *num_segments = seg_id[i];
    }
  }
}

// The sorted entries are cut into windows of kWindow positions and every segment (one row's run) into
// pieces at the window starts, so no group sums more than kWindow entries (a Zipf batch's hottest row
// has thousands, which one group summing alone would take serially while the GPU idles). A segment
// inside one window is finished by the group that sums its only piece; the pieces of a longer one are
// stored in `partial` ([2 * windows, dim] floats: the piece starting window w at slot 2w, the head
// piece of the segment that leaves window w at slot 2w + 1) and finished by a second launch. Every sum
// has a fixed order, so the update stays bitwise repeatable.
constexpr int64_t kWindow = 128;
constexpr int kMaxPerLane = 8;  // columns per lane held in registers: dim <= kLanes * 8 (host checks)

// g += the row at src. With VEC4 each lane owns 4 consecutive columns and reads them with one 16-byte
// load; otherwise lanes stride over the columns.
template <int kLanes, bool VEC4>
__device__ __forceinline__ void add_row(const float* __restrict__ src, int lane, int64_t dim, float (&g)[kMaxPerLane]) {
  if (VEC4) {
    const int64_t c = static_cast<int64_t>(lane) * 4;
    if (c < dim) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(src + c));
      g[0] += x.x; g[1] += x.y; g[2] += x.z; g[3] += x.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + static_cast<int64_t>(k) * kLanes;
      if (c < dim) g[k] += __ldg(src + c);
    }
  }
}

template <int kLanes, bool VEC4>
__device__ __forceinline__ void store_row(float* __restrict__ dst, int lane, int64_t dim, const float (&g)[kMaxPerLane]) {
  if (VEC4) {
    const int64_t c = static_cast<int64_t>(lane) * 4;
    if (c < dim) *reinterpret_cast<float4*>(dst + c) = make_float4(g[0], g[1], g[2], g[3]);
  } else {
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + static_cast<int64_t>(k) * kLanes;
      if (c < dim) dst[c] = g[k];
    }
  }
}

// Rowwise Adagrad on `row` from its summed gradient g, by the group's kLanes lanes. The row's sum of
// squares is reduced with shuffles inside the group (a fixed tree: deterministic).
template <int kLanes, bool VEC4>
__device__ __forceinline__ void adagrad_row(int64_t row, const float (&g)[kMaxPerLane], int lane, unsigned group_mask,
                                            int64_t dim, float* __restrict__ weight, float* __restrict__ momentum,
                                            float lr, float eps) {
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxPerLane; ++k) sq += g[k] * g[k];
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) sq += __shfl_xor_sync(group_mask, sq, off, kLanes);
  const float acc = momentum[row] + sq / static_cast<float>(dim);
  __syncwarp(group_mask);
  if (lane == 0) momentum[row] = acc;
  const float scale = lr / (sqrtf(acc) + eps);
  float* w = weight + row * dim;
  if (VEC4) {
    const int64_t c = static_cast<int64_t>(lane) * 4;
    if (c < dim) {
      float4* p = reinterpret_cast<float4*>(w + c);
      float4 x = *p;
      x.x -= scale * g[0]; x.y -= scale * g[1]; x.z -= scale * g[2]; x.w -= scale * g[3];
      *p = x;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) {
      const int64_t c = lane + static_cast<int64_t>(k) * kLanes;
      if (c < dim) w[c] -= scale * g[k];
    }
  }
}

template <int kLanes>
__device__ __forceinline__ unsigned group_mask_of() {
  return kLanes == 32 ? 0xffffffffu : (((1u << kLanes) - 1u) << (threadIdx.x % 32 / kLanes * kLanes));
}

// Launch 1: one group of kLanes threads per sorted position that starts a piece (a segment's first
// position, or a window's first position inside a segment).
template <int kLanes, bool VEC4>
__global__ void adagrad_pieces_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ seg_id, const int64_t* __restrict__ seg_start,
                                      int64_t num_entries, const float* __restrict__ grad, int64_t dim,
                                      float* __restrict__ partial, float* __restrict__ weight,
                                      float* __restrict__ momentum, float lr, float eps) {
  const int lane = threadIdx.x % kLanes;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kLanes);
  const unsigned group_mask = group_mask_of<kLanes>();
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
       p < num_entries; p += groups_per_grid) {
    const bool head = p == 0 || sorted_rows[p] != sorted_rows[p - 1];
    const bool window_start = p % kWindow == 0;
    if (!head && !window_start) continue;  // uniform within the group: its lanes share p
    const int64_t window = p / kWindow;
    const int64_t window_end = (window + 1) * kWindow;
    const int64_t seg_end = seg_start[seg_id[p]];  // seg_id is 1-based: the next segment's start
    const int64_t piece_end = seg_end < window_end ? seg_end : window_end;
    float g[kMaxPerLane];
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) g[k] = 0.f;
    for (int64_t e = p; e < piece_end; ++e) add_row<kLanes, VEC4>(grad + order[e] * dim, lane, dim, g);
    if (head && seg_end <= window_end)
      adagrad_row<kLanes, VEC4>(sorted_rows[p], g, lane, group_mask, dim, weight, momentum, lr, eps);
    else
      store_row<kLanes, VEC4>(partial + (2 * window + (window_start ? 0 : 1)) * dim, lane, dim, g);
  }
}

// Launch 2: one group per segment; those that leave their first window sum their stored pieces.
template <int kLanes, bool VEC4>
__global__ void adagrad_long_segments_kernel(const int64_t* __restrict__ sorted_rows,
                                             const int64_t* __restrict__ seg_start,
                                             const int64_t* __restrict__ num_segments, int64_t max_segments,
                                             const float* __restrict__ partial, int64_t dim,
                                             float* __restrict__ weight, float* __restrict__ momentum, float lr,
                                             float eps) {
  const int lane = threadIdx.x % kLanes;
  const int64_t groups_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kLanes);
  const int64_t segments = *num_segments;
  const unsigned group_mask = group_mask_of<kLanes>();
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + threadIdx.x / kLanes;
       s < max_segments; s += groups_per_grid) {
    if (s >= segments) break;  // uniform within the group: a whole group leaves together
    const int64_t begin = seg_start[s], end = seg_start[s + 1];
    const int64_t window = begin / kWindow;
    if (end <= (window + 1) * kWindow) continue;  // finished by launch 1
    const int64_t last = (end - 1) / kWindow;
    float g[kMaxPerLane];
#pragma unroll
    for (int k = 0; k < kMaxPerLane; ++k) g[k] = 0.f;
    add_row<kLanes, VEC4>(partial + (2 * window + (begin % kWindow == 0 ? 0 : 1)) * dim, lane, dim, g);
    for (int64_t w = window + 1; w <= last; ++w) add_row<kLanes, VEC4>(partial + 2 * w * dim, lane, dim, g);
    adagrad_row<kLanes, VEC4>(sorted_rows[begin], g, lane, group_mask, dim, weight, momentum, lr, eps);
  }
}

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

int bits_for(int64_t num_rows) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < num_rows) ++bits;
  return bits;
}

// cub's temporary storage for num_entries items; SIZE_MAX when cub cannot size it (more items than its int
// count holds, or a failed query), which no workspace matches, so the update refuses to run.
size_t cub_bytes(int64_t num_entries, int64_t num_rows) {
  if (num_entries > INT32_MAX) return SIZE_MAX;
  size_t sort_bytes = 0, scan_bytes = 0;
  const int n = static_cast<int>(num_entries);
  const cudaError_t sort_err = cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n, 0, bits_for(num_rows));
  const cudaError_t scan_err = cub::DeviceScan::InclusiveSum(
      nullptr, scan_bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), n);
  if (sort_err != cudaSuccess || scan_err != cudaSuccess) return SIZE_MAX;
  return sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
}

template <int kLanes, bool VEC4>
cudaError_t launch_segments(const int64_t* sorted_rows, const int64_t* order, const int64_t* seg_id,
                            const int64_t* seg_start, const int64_t* num_segments, int64_t num_entries,
                            const float* grad, int64_t dim, float* partial, float* weight, float* momentum, float lr,
                            float eps, cudaStream_t stream) {
  const int64_t groups_per_block = kThreads / kLanes;
  int64_t blocks = (num_entries + groups_per_block - 1) / groups_per_block;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  adagrad_pieces_kernel<kLanes, VEC4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      sorted_rows, order, seg_id, seg_start, num_entries, grad, dim, partial, weight, momentum, lr, eps);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // The segment count stays on the device (no host sync): launch for the worst case, one per entry.
  adagrad_long_segments_kernel<kLanes, VEC4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      sorted_rows, seg_start, num_segments, num_entries, partial, dim, weight, momentum, lr, eps);
  return cudaGetLastError();
}

int64_t num_windows(int64_t num_entries) { return (num_entries + kWindow - 1) / kWindow; }

}  // namespace

cudaError_t lookup_forward(const void* ids, bool ids_int64, const int64_t* offsets, int64_t batch,
                           int64_t num_fields, const void* weight, int64_t row_bytes, void* out,
                           cudaStream_t stream) {
  if (ids_int64)
    return lookup_dispatch(static_cast<const int64_t*>(ids), offsets, batch, num_fields, weight, row_bytes, out, stream);
  return lookup_dispatch(static_cast<const int32_t*>(ids), offsets, batch, num_fields, weight, row_bytes, out, stream);
}

size_t rowwise_adagrad_workspace_bytes(int64_t num_entries, int64_t num_rows, int64_t dim) {
  const size_t cub = cub_bytes(num_entries, num_rows);
  if (cub == SIZE_MAX) return SIZE_MAX;
  const size_t vec = align_up(static_cast<size_t>(num_entries + 1) * sizeof(int64_t));
  const size_t partial = align_up(static_cast<size_t>(2 * num_windows(num_entries) * dim) * sizeof(float));
  return 7 * vec + align_up(sizeof(int64_t)) + partial + align_up(cub);
}

cudaError_t rowwise_adagrad_update(const void* ids, bool ids_int64, const int64_t* offsets, int64_t batch,
                                   int64_t num_fields, int64_t num_rows, float* weight, float* momentum,
                                   int64_t dim, const float* grad, float lr, float eps, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  const int64_t n = batch * num_fields;
  if (n == 0) return cudaSuccess;
  if (n > INT32_MAX) return cudaErrorInvalidValue;  // cub's item count is an int
  if (dim <= 0 || dim > 32 * 8) return cudaErrorInvalidValue;
  if (workspace_bytes < rowwise_adagrad_workspace_bytes(n, num_rows, dim)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  const size_t vec = align_up(static_cast<size_t>(n + 1) * sizeof(int64_t));
  int64_t* rows = reinterpret_cast<int64_t*>(ws);
  int64_t* entries = reinterpret_cast<int64_t*>(ws + vec);
  int64_t* sorted_rows = reinterpret_cast<int64_t*>(ws + 2 * vec);
  int64_t* order = reinterpret_cast<int64_t*>(ws + 3 * vec);
  int64_t* head = reinterpret_cast<int64_t*>(ws + 4 * vec);
  int64_t* seg_id = reinterpret_cast<int64_t*>(ws + 5 * vec);
  int64_t* seg_start = reinterpret_cast<int64_t*>(ws + 6 * vec);
  int64_t* num_segments = reinterpret_cast<int64_t*>(ws + 7 * vec);
  const size_t fixed = 7 * vec + align_up(sizeof(int64_t));
  float* partial = reinterpret_cast<float*>(ws + fixed);
  const size_t partial_bytes = align_up(static_cast<size_t>(2 * num_windows(n) * dim) * sizeof(float));
  void* temp = ws + fixed + partial_bytes;
  size_t temp_bytes = workspace_bytes - (fixed + partial_bytes);

  const int64_t blocks64 = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 16 ? blocks64 : 65535 * 16);
  if (ids_int64)
    table_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const int64_t*>(ids), offsets, num_fields, n, rows,
                                                       entries);
  else
    table_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const int32_t*>(ids), offsets, num_fields, n, rows,
                                                       entries);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, rows, sorted_rows, entries, order, static_cast<int>(n), 0,
                                        bits_for(num_rows), stream);
  if (err != cudaSuccess) return err;
  segment_heads_kernel<<<blocks, kThreads, 0, stream>>>(sorted_rows, n, head);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  temp_bytes = workspace_bytes - (fixed + partial_bytes);
  err = cub::DeviceScan::InclusiveSum(temp, temp_bytes, head, seg_id, static_cast<int>(n), stream);
  if (err != cudaSuccess) return err;
  segment_starts_kernel<<<blocks, kThreads, 0, stream>>>(head, seg_id, n, seg_start, num_segments);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const bool vec4 = dim % 4 == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(weight) % 16 == 0;
#define SFG_SEGMENTS(LANES, VEC)                                                                                  \
  launch_segments<LANES, VEC>(sorted_rows, order, seg_id, seg_start, num_segments, n, grad, dim, partial, weight, \
                              momentum, lr, eps, stream)
  if (vec4 && dim <= 16) return SFG_SEGMENTS(4, true);
  if (vec4 && dim <= 32) return SFG_SEGMENTS(8, true);
  if (vec4 && dim <= 128) return SFG_SEGMENTS(32, true);
  if (dim <= 64) return SFG_SEGMENTS(8, false);
  return SFG_SEGMENTS(32, false);
#undef SFG_SEGMENTS
}

}  // namespace cuda
}  // namespace sfg
