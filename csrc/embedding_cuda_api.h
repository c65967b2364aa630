// Torch-facing CUDA entry points (built only against a CUDA torch: SFG_FAST_WITH_CUDA).
#pragma once

#include <torch/extension.h>

namespace sfg {

torch::Tensor embedding_lookup_cuda(torch::Tensor ids, torch::Tensor weight, torch::Tensor offsets);

void rowwise_adagrad_update_cuda(torch::Tensor weight, torch::Tensor momentum, torch::Tensor ids,
                                 torch::Tensor offsets, torch::Tensor grad_V, double lr, double eps);

}  // namespace sfg
