// Torch glue shared by the CPU entry points: argument checks that name the offending argument,
// bounds-mode parsing and the id bounds check with the same wording as sfg_fast/_checks.py.
#pragma once

#include <torch/extension.h>

#include <atomic>
#include <string>
#include <vector>

#include "embedding_cpu.h"
#include "message.h"

namespace sfg {

inline int parse_bounds_mode(const std::string& mode) {
  if (mode == "fatal") return cpu::kFatal;
  if (mode == "clamp_to_oov") return cpu::kClampToOov;
  if (mode == "off") return cpu::kOff;
  TORCH_CHECK_VALUE(false, sfg::msg("bounds_check must be one of ('fatal', 'clamp_to_oov', 'off'), got '", mode, "'"));
  return cpu::kOff;
}

inline void check_ids_offsets(const torch::Tensor& ids, const torch::Tensor& offsets, int64_t num_rows) {
  TORCH_CHECK_TYPE(ids.scalar_type() == torch::kInt32 || ids.scalar_type() == torch::kInt64,
                   sfg::msg("ids must be int32 or int64 field-local ids, got dtype ", ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.dim() == 2, sfg::msg("ids must have shape [B, N], got ", ids.sizes()));
  TORCH_CHECK_TYPE(offsets.scalar_type() == torch::kInt64,
                   sfg::msg("offsets must be an int64 tensor (row offsets into weight), got ", offsets.scalar_type()));
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == ids.size(1),
                    sfg::msg("offsets must have shape [N]=[", ids.size(1), "] (one per field of ids), got ",
                             offsets.sizes()));
  TORCH_CHECK_VALUE(ids.device().is_cpu() && offsets.device().is_cpu(), "ids and offsets must be CPU tensors");
  (void)num_rows;
}

// A tensor argument that the CPU kernels read or write through raw pointers: it must live on the CPU
// (a meta or CUDA tensor has no host data; a meta data_ptr is null).
inline void check_cpu(const char* name, const torch::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), sfg::msg(name, " must be a CPU tensor, got device ", t.device()));
}

inline void check_cpu(const char* name, const c10::optional<torch::Tensor>& t) {
  if (t.has_value()) check_cpu(name, *t);
}

// A weight the kernels read as real numbers (converted to fp32 / bf16): a CPU tensor of a real floating
// dtype (an integer one would train nothing; a complex one would silently lose its imaginary part).
inline void check_cpu_weight(const char* name, const c10::optional<torch::Tensor>& t) {
  if (!t.has_value()) return;
  check_cpu(name, *t);
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()),
                   sfg::msg(name, " must have a real floating dtype, got ", t->scalar_type()));
}

// Field sizes from offsets, validated without arithmetic that could wrap: every offset lies in
// [0, num_rows] and they never decrease, so each size (next offset - offset) is exact and >= 0, and
// every row a valid id addresses is inside the table.
// The (scale, bias) rows of an int8 row-wise quantised table of `rows` rows: float32 [rows, 2] on the CPU.
inline void check_scale_bias(const torch::Tensor& scale_bias, int64_t rows) {
  TORCH_CHECK_TYPE(scale_bias.scalar_type() == torch::kFloat,
                   sfg::msg("scale_bias must be float32, got ", scale_bias.scalar_type()));
  TORCH_CHECK_VALUE(scale_bias.dim() == 2 && scale_bias.size(0) == rows && scale_bias.size(1) == 2,
                    sfg::msg("scale_bias must have shape [V, 2]=[", rows, ", 2], got ", scale_bias.sizes()));
  check_cpu("scale_bias", scale_bias);
}

inline std::vector<int64_t> field_sizes(const torch::Tensor& offsets_contig, int64_t num_rows) {
  const int64_t n = offsets_contig.size(0);
  const int64_t* off = offsets_contig.data_ptr<int64_t>();
  std::vector<int64_t> sizes(n);
  bool ok = true;
  int64_t prev = 0;
  for (int64_t f = 0; f < n; ++f) {
    ok = ok && off[f] >= prev && off[f] <= num_rows;
    prev = off[f];
  }
  if (!ok) {
    TORCH_CHECK_VALUE(false, sfg::msg("offsets must be non-decreasing, start >= 0 and stay below weight rows (",
                                      num_rows, "), got ", c10::IntArrayRef(off, n)));
  }
  for (int64_t f = 0; f < n; ++f) sizes[f] = (f + 1 < n ? off[f + 1] : num_rows) - off[f];
  return sizes;
}

// Applies the bounds mode before any kernel runs: "fatal" raises IndexError naming the first bad
// field (lowest index) and its first bad id, like the Python check; "clamp_to_oov" needs a
// non-empty field to clamp into. "off" gets the same scan as "fatal": the C++ kernels address memory
// with the ids, so an id outside its field must never reach them (the scan reads B*N ids once, a few
// percent of a lookup; on this backend "off" only means no separate check before the call). The
// scan itself is parallel; the error path is serial.
template <typename Id>
void check_bounds_typed(const torch::Tensor& ids, const std::vector<int64_t>& sizes, int mode) {
  const int64_t batch = ids.size(0), n = ids.size(1);
  const Id* p = ids.data_ptr<Id>();
  if (mode == cpu::kClampToOov) {
    for (int64_t f = 0; f < n; ++f)
      TORCH_CHECK_VALUE(sizes[f] > 0 || batch == 0,
                        sfg::msg("bounds_check='clamp_to_oov' needs at least one row in " "every field, but field ", f,
                                 " has an empty vocabulary"));
    return;
  }
  std::atomic<bool> bad{false};
  at::parallel_for(0, batch, 2048, [&](int64_t b0, int64_t b1) {
    if (cpu::any_bad_id(p, b0, b1, n, sizes.data())) bad = true;
  });
  if (!bad) return;
  for (int64_t f = 0; f < n; ++f) {
    int64_t count = 0, first = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t id = static_cast<int64_t>(p[b * n + f]);
      if (id < 0 || id >= sizes[f]) {
        if (count == 0) first = id;
        ++count;
      }
    }
    if (count) {
      TORCH_CHECK_INDEX(false,
                        sfg::msg("ids[:, ", f, "] (field ", f, ") holds id ", first, " outside [0, ", sizes[f],
                                 ") (the field's vocabulary size); ", count, " bad ids in this field"));
    }
  }
}

inline void check_bounds(const torch::Tensor& ids, const std::vector<int64_t>& sizes, int mode) {
  if (ids.scalar_type() == torch::kInt64) check_bounds_typed<int64_t>(ids, sizes, mode);
  else check_bounds_typed<int32_t>(ids, sizes, mode);
}

}  // namespace sfg
