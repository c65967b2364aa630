// Torch glue of the CUDA embedding kernels: checks, the current stream, workspace allocation and
// launch-error checks. Compiled to nothing unless the build is against a CUDA torch.
#ifdef SFG_FAST_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "embedding_cuda.h"
#include "embedding_cuda_api.h"
#include "message.h"

namespace sfg {

namespace {

void check_common(const torch::Tensor& ids, const torch::Tensor& weight, const torch::Tensor& offsets) {
  TORCH_CHECK_VALUE(weight.is_cuda() && ids.device() == weight.device() && offsets.device() == weight.device(),
                    "ids, weight and offsets must be on one CUDA device");
  TORCH_CHECK_TYPE(ids.scalar_type() == torch::kInt32 || ids.scalar_type() == torch::kInt64,
                   sfg::msg("ids must be int32 or int64, got ", ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.dim() == 2, sfg::msg("ids must have shape [B, N], got ", ids.sizes()));
  TORCH_CHECK_TYPE(offsets.scalar_type() == torch::kInt64,
                   sfg::msg("offsets must be int64, got ", offsets.scalar_type()));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == ids.size(1),
                    sfg::msg("offsets must have shape [N]=[", ids.size(1), "], got ", offsets.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 2, sfg::msg("weight must have shape [V, D], got ", weight.sizes()));
}

}  // namespace

torch::Tensor embedding_lookup_cuda(torch::Tensor ids, torch::Tensor weight, torch::Tensor offsets) {
  check_common(ids, weight, offsets);
  const c10::cuda::CUDAGuard guard(weight.device());
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty({ids.size(0), ids.size(1), weight.size(1)}, weight.options());
  const cudaError_t err = cuda::lookup_forward(
      ids.data_ptr(), ids.scalar_type() == torch::kInt64, offsets.data_ptr<int64_t>(), ids.size(0), ids.size(1),
      weight.data_ptr(), weight.size(1) * static_cast<int64_t>(weight.element_size()), out.data_ptr(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, sfg::msg("embedding lookup kernel failed: ", cudaGetErrorString(err)));
  return out;
}

void rowwise_adagrad_update_cuda(torch::Tensor weight, torch::Tensor momentum, torch::Tensor ids,
                                 torch::Tensor offsets, torch::Tensor grad_V, double lr, double eps) {
  check_common(ids, weight, offsets);
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK_TYPE(weight.scalar_type() == torch::kFloat && momentum.scalar_type() == torch::kFloat &&
                       grad_V.scalar_type() == torch::kFloat,
                   "weight, momentum and grad_V must be float32 for the fused CUDA Adagrad");
  TORCH_CHECK_VALUE(weight.is_contiguous() && momentum.is_contiguous(),
                    "weight and momentum must be contiguous (updated in place)");
  TORCH_CHECK_VALUE(momentum.dim() == 1 && momentum.size(0) == weight.size(0),
                    sfg::msg("momentum must have shape [V]=[", weight.size(0), "], got ", momentum.sizes()));
  TORCH_CHECK_VALUE(grad_V.dim() == 3 && grad_V.size(0) == ids.size(0) && grad_V.size(1) == ids.size(1) &&
                        grad_V.size(2) == weight.size(1),
                                    sfg::msg("grad_V must have shape [B, N, D]=[", ids.size(0), ", ", ids.size(1), ", ",
                                             weight.size(1), "], got ", grad_V.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) <= 256, sfg::msg("the fused CUDA Adagrad supports D <= 256, got ", weight.size(1)));
  // raw pointers reach the kernels: a tensor on the host or another GPU would be an illegal address
  TORCH_CHECK_VALUE(momentum.device() == weight.device() && grad_V.device() == weight.device(),
                    "momentum and grad_V must be on weight's CUDA device");
  // cub's item count is an int: refused here, before a workspace sized for it is allocated
  TORCH_CHECK_VALUE(ids.numel() <= INT32_MAX,
                    sfg::msg("the fused CUDA Adagrad takes at most 2^31 - 1 (sample, field) entries, got ",
                             ids.numel()));
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  grad_V = grad_V.contiguous();
  const int64_t entries = ids.numel();
  const size_t bytes = cuda::rowwise_adagrad_workspace_bytes(entries, weight.size(0), weight.size(1));
  TORCH_CHECK(bytes != SIZE_MAX, sfg::msg("cub could not size the fused CUDA Adagrad's workspace for ", entries,
                                          " entries"));
  auto workspace = torch::empty({static_cast<int64_t>(bytes)}, weight.options().dtype(torch::kUInt8));
  const cudaError_t err = cuda::rowwise_adagrad_update(
      ids.data_ptr(), ids.scalar_type() == torch::kInt64, offsets.data_ptr<int64_t>(), ids.size(0), ids.size(1),
      weight.size(0), weight.data_ptr<float>(), momentum.data_ptr<float>(), weight.size(1),
      grad_V.data_ptr<float>(), static_cast<float>(lr), static_cast<float>(eps), workspace.data_ptr(), bytes,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, sfg::msg("fused rowwise Adagrad kernel failed: ", cudaGetErrorString(err)));
}

}  // namespace sfg

#endif  // SFG_FAST_WITH_CUDA
