// Torch glue of the CPU embedding kernels (embedding_cpu.h): checks, dtype dispatch, threading.
#include "embedding_cpu_api.h"

#include <cmath>

#include "glue_common.h"

namespace sfg {

namespace {

template <typename Id, typename T>
void lookup_typed(const torch::Tensor& ids, const torch::Tensor& weight, const torch::Tensor& offsets,
                  const std::vector<int64_t>& sizes, int mode, torch::Tensor& out) {
  const int64_t n = ids.size(1), dim = weight.size(1);
  const Id* id_ptr = ids.data_ptr<Id>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* w = reinterpret_cast<const T*>(weight.data_ptr());
  T* o = reinterpret_cast<T*>(out.data_ptr());
  // Samples are independent: split the batch, a few hundred rows per task to amortise scheduling.
  at::parallel_for(0, ids.size(0), 256, [&](int64_t b0, int64_t b1) {
    cpu::gather_rows(id_ptr, b0, b1, n, off, sizes.data(), mode, w, dim, o);
  });
}

}  // namespace

torch::Tensor embedding_lookup_cpu(torch::Tensor ids, torch::Tensor weight, torch::Tensor offsets,
                                   const std::string& bounds_check) {
  const int mode = parse_bounds_mode(bounds_check);
  TORCH_CHECK_VALUE(weight.dim() == 2, sfg::msg("weight must have shape [V, D], got ", weight.sizes()));
  check_ids_offsets(ids, offsets, weight.size(0));
  TORCH_CHECK_VALUE(weight.device().is_cpu(), sfg::msg("weight must be a CPU tensor, got ", weight.device()));
  TORCH_CHECK_TYPE(weight.scalar_type() == torch::kFloat || weight.scalar_type() == torch::kBFloat16,
                   sfg::msg("weight must be float32 or bfloat16 for the cpu backend, got ", weight.scalar_type()));
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  weight = weight.contiguous();
  const auto sizes = field_sizes(offsets, weight.size(0));
  check_bounds(ids, sizes, mode);
  auto out = torch::empty({ids.size(0), ids.size(1), weight.size(1)}, weight.options());
  const bool i64 = ids.scalar_type() == torch::kInt64;
  if (weight.scalar_type() == torch::kFloat) {
    if (i64) lookup_typed<int64_t, float>(ids, weight, offsets, sizes, mode, out);
    else lookup_typed<int32_t, float>(ids, weight, offsets, sizes, mode, out);
  } else {
    if (i64) lookup_typed<int64_t, uint16_t>(ids, weight, offsets, sizes, mode, out);
    else lookup_typed<int32_t, uint16_t>(ids, weight, offsets, sizes, mode, out);
  }
  return out;
}

torch::Tensor embedding_lookup_int8_cpu(torch::Tensor ids, torch::Tensor qweight, torch::Tensor scale_bias,
                                        torch::Tensor offsets, const std::string& bounds_check) {
  const int mode = parse_bounds_mode(bounds_check);
  TORCH_CHECK_TYPE(qweight.scalar_type() == torch::kUInt8,
                   sfg::msg("qweight must be uint8, got ", qweight.scalar_type()));
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.device().is_cpu(),
                    sfg::msg("qweight must be a CPU [V, D] tensor, got ", qweight.sizes()));
  check_scale_bias(scale_bias, qweight.size(0));
  check_ids_offsets(ids, offsets, qweight.size(0));
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  qweight = qweight.contiguous();
  scale_bias = scale_bias.contiguous();
  const auto sizes = field_sizes(offsets, qweight.size(0));
  check_bounds(ids, sizes, mode);
  const int64_t n = ids.size(1), dim = qweight.size(1);
  auto out = torch::empty({ids.size(0), n, dim}, scale_bias.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const float* sb = scale_bias.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, ids.size(0), 256, [&](int64_t b0, int64_t b1) {
    float* dst = o + b0 * n * dim;
    if (ids.scalar_type() == torch::kInt64)
      cpu::gather_rows_int8(ids.data_ptr<int64_t>(), b0, b1, n, off, sizes.data(), mode, q, sb, dim, dst);
    else
      cpu::gather_rows_int8(ids.data_ptr<int32_t>(), b0, b1, n, off, sizes.data(), mode, q, sb, dim, dst);
  });
  return out;
}

namespace {

template <typename Id>
void table_rows(const torch::Tensor& ids, const int64_t* off, const std::vector<int64_t>& sizes, int mode,
                std::vector<int64_t>& rows) {
  const int64_t batch = ids.size(0), n = ids.size(1);
  const Id* p = ids.data_ptr<Id>();
  rows.resize(batch * n);
  at::parallel_for(0, batch, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t f = 0; f < n; ++f) rows[b * n + f] = cpu::table_row(p, b, f, n, off, sizes.data(), mode);
  });
}

template <typename T, typename G>
void update_typed(int kind, const cpu::UpdateParams& params, const std::vector<int64_t>& seg_start,
                  const std::vector<int64_t>& order, const std::vector<int64_t>& sorted_rows,
                  const torch::Tensor& grad, torch::Tensor& weight, float* s1, float* s2) {
  const int64_t num_segments = static_cast<int64_t>(seg_start.size()) - 1;
  const int64_t dim = weight.size(1);
  const G* g = reinterpret_cast<const G*>(grad.data_ptr());
  T* w = reinterpret_cast<T*>(weight.data_ptr());
  // Each touched row belongs to exactly one segment and each segment to one task: no two threads
  // write one row, and a row's sum order is fixed by the sort, not by the split.
  at::parallel_for(0, num_segments, 64, [&](int64_t s0, int64_t s1_) {
    cpu::update_segments<T, G>(kind, params, seg_start.data(), order.data(), sorted_rows.data(), s0, s1_, g, dim,
                               w, s1, s2);
  });
}

}  // namespace

void sparse_row_update_cpu(const std::string& kind, torch::Tensor weight, c10::optional<torch::Tensor> state1,
                           c10::optional<torch::Tensor> state2, torch::Tensor ids, torch::Tensor offsets,
                           torch::Tensor grad_V, double lr, double eps, double beta1, double beta2, int64_t step,
                           const std::string& bounds_check) {
  int k = -1;
  if (kind == "sgd") k = cpu::kSgd;
  if (kind == "adagrad" || kind == "rowwise_adagrad") k = cpu::kRowwiseAdagrad;
  if (kind == "adam") k = cpu::kAdam;
  TORCH_CHECK_VALUE(k >= 0,
                    sfg::msg("kind must be one of ('sgd', 'adagrad', 'adam') (adagrad is rowwise), got '", kind, "'"));
  const int mode = parse_bounds_mode(bounds_check);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.device().is_cpu(),
                    sfg::msg("weight must be a CPU [V, D] tensor, got ", weight.sizes()));
  TORCH_CHECK_VALUE(weight.is_contiguous(), "weight must be contiguous (it is updated in place)");
  TORCH_CHECK_TYPE(weight.scalar_type() == torch::kFloat || weight.scalar_type() == torch::kBFloat16,
                   sfg::msg("weight must be float32 or bfloat16, got ", weight.scalar_type()));
  check_ids_offsets(ids, offsets, weight.size(0));
  const int64_t rows_total = weight.size(0), dim = weight.size(1), batch = ids.size(0), n = ids.size(1);
  // row-wise Adagrad's mean over D would be 0 / 0 = NaN in every touched row's state
  TORCH_CHECK_VALUE(dim > 0, "weight must have at least one column (D >= 1) for a sparse update");
  TORCH_CHECK_VALUE(grad_V.dim() == 3 && grad_V.size(0) == batch && grad_V.size(1) == n && grad_V.size(2) == dim,
                    sfg::msg("grad_V must have shape [B, N, D]=[", batch, ", ", n, ", ", dim, "], got ",
                             grad_V.sizes()));
  TORCH_CHECK_TYPE(grad_V.scalar_type() == torch::kFloat || grad_V.scalar_type() == torch::kBFloat16,
                   sfg::msg("grad_V must be float32 or bfloat16, got ", grad_V.scalar_type()));
  check_cpu("grad_V", grad_V);
  float* s1 = nullptr;
  float* s2 = nullptr;
  auto check_state = [&](const c10::optional<torch::Tensor>& st, const char* name, bool per_row) -> float* {
    TORCH_CHECK_VALUE(st.has_value(), sfg::msg(name, " is required for kind='", kind, "'"));
    const auto& t = *st;
    TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat, sfg::msg(name, " must be float32, got ", t.scalar_type()));
    TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), sfg::msg(name, " must be a contiguous CPU tensor"));
    if (per_row) {
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows_total,
                        sfg::msg(name, " must have shape [V]=[", rows_total, "], got ", t.sizes()));
    } else {
      TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows_total && t.size(1) == dim,
                        sfg::msg(name, " must have shape [V, D]=[", rows_total, ", ", dim, "], got ", t.sizes()));
    }
    return t.data_ptr<float>();
  };
  if (k == cpu::kRowwiseAdagrad) s1 = check_state(state1, "state['sum']", true);
  if (k == cpu::kAdam) {
    s1 = check_state(state1, "state['exp_avg']", false);
    s2 = check_state(state2, "state['exp_avg_sq']", false);
    TORCH_CHECK_VALUE(step >= 1, sfg::msg("step must be >= 1 for Adam (bias correction), got ", step));
  }
  ids = ids.contiguous();
  offsets = offsets.contiguous();
  grad_V = grad_V.contiguous();
  const auto sizes = field_sizes(offsets, rows_total);
  check_bounds(ids, sizes, mode);

  std::vector<int64_t> rows, order, sorted_rows;
  if (ids.scalar_type() == torch::kInt64) table_rows<int64_t>(ids, offsets.data_ptr<int64_t>(), sizes, mode, rows);
  else table_rows<int32_t>(ids, offsets.data_ptr<int64_t>(), sizes, mode, rows);
  cpu::stable_sort_by_row(rows.data(), batch * n, rows_total, order, sorted_rows);
  std::vector<int64_t> seg_start;
  seg_start.reserve(sorted_rows.size() + 1);
  for (size_t i = 0; i < sorted_rows.size(); ++i)
    if (i == 0 || sorted_rows[i] != sorted_rows[i - 1]) seg_start.push_back(static_cast<int64_t>(i));
  seg_start.push_back(static_cast<int64_t>(sorted_rows.size()));

  cpu::UpdateParams params;
  params.lr = static_cast<float>(lr);
  params.eps = static_cast<float>(eps);
  params.beta1 = static_cast<float>(beta1);
  params.beta2 = static_cast<float>(beta2);
  params.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  params.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  if (k == cpu::kAdam) {
    // Bias corrections in double: 1 - beta^t loses most of its digits in fp32 for beta2 near 1.
    params.inv_bias1 = static_cast<float>(1.0 / (1.0 - std::pow(beta1, static_cast<double>(step))));
    params.inv_bias2 = static_cast<float>(1.0 / (1.0 - std::pow(beta2, static_cast<double>(step))));
  }
  const bool wf = weight.scalar_type() == torch::kFloat, gf = grad_V.scalar_type() == torch::kFloat;
  if (wf && gf) update_typed<float, float>(k, params, seg_start, order, sorted_rows, grad_V, weight, s1, s2);
  else if (wf) update_typed<float, uint16_t>(k, params, seg_start, order, sorted_rows, grad_V, weight, s1, s2);
  else if (gf) update_typed<uint16_t, float>(k, params, seg_start, order, sorted_rows, grad_V, weight, s1, s2);
  else update_typed<uint16_t, uint16_t>(k, params, seg_start, order, sorted_rows, grad_V, weight, s1, s2);
}

}  // namespace sfg
