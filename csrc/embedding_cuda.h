// Torch-free CUDA embedding kernels: raw device pointers + a cudaStream_t, so this header and
// embedding_cuda.cu compile with nvcc alone (the torch glue is embedding_cuda_glue.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sfg {
namespace cuda {

// out[b, f, :] = weight[offsets[f] + ids[b, f], :]; rows are copied as raw bytes (any dtype), with
// 16-byte loads when row_bytes and both base pointers allow it. ids are pre-validated.
cudaError_t lookup_forward(const void* ids, bool ids_int64, const int64_t* offsets, int64_t batch,
                           int64_t num_fields, const void* weight, int64_t row_bytes, void* out,
                           cudaStream_t stream);

// Bytes of device workspace that rowwise_adagrad_update needs for batch * num_fields entries; SIZE_MAX when
// cub cannot sort that many (more than INT32_MAX entries).
size_t rowwise_adagrad_workspace_bytes(int64_t num_entries, int64_t num_rows, int64_t dim);

// Deterministic embedding backward fused with FBGEMM-style rowwise Adagrad, no atomics:
//   sort (row, entry) pairs by row (stable radix sort), find the segments of equal rows, then sum
//   each segment's gradients in entry order (by pieces of at most 128 sorted entries, one sub-warp
//   each, and a second launch for the segments of several pieces) and apply
//   acc[r] += mean_d(g^2);  w[r] -= lr * g / (sqrt(acc[r]) + eps).
// weight [num_rows, dim] fp32, momentum [num_rows] fp32, grad [batch, num_fields, dim] fp32.
cudaError_t rowwise_adagrad_update(const void* ids, bool ids_int64, const int64_t* offsets, int64_t batch,
                                   int64_t num_fields, int64_t num_rows, float* weight, float* momentum,
                                   int64_t dim, const float* grad, float lr, float eps, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace sfg
