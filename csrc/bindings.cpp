// The one Python binding of sfg_fast._C. CUDA entry points exist only in builds against a CUDA
// torch (SFG_FAST_WITH_CUDA); WITH_CUDA tells Python which build it got.
#include <torch/extension.h>

#include <vector>

#include "buffer_pool.h"
#include "embedding_cpu_api.h"
#include "sfg_plan.h"
#ifdef SFG_FAST_WITH_CUDA
#include "embedding_cuda_api.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sfg_fast compiled kernels: CPU (OpenMP) and, in CUDA builds, CUDA embedding kernels";
#ifdef SFG_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("hot_loop_isa", &sfg::hot_loop_isa,
        "Instruction set of the CPU kernels' hot loops on this machine: x86-64-v4 (AVX-512), x86-64-v3 (AVX2) "
        "or baseline");
#if defined(__SANITIZE_ADDRESS__)
  // Sanitizer builds only (tests/test_asan.py): a deliberate one-past-the-end heap read, the positive
  // control that proves AddressSanitizer watches this extension's code. Absent from normal builds.
  m.def("_sanitizer_canary", [] {
    std::vector<float> v(16, 1.f);
    volatile float* p = v.data();
    return static_cast<double>(p[16]);
  });
#endif
  m.def("buffer_pool_release", [] { return sfg::detail::BufferPool::get().release(); },
        "Free the idle buffers the CPU training op keeps for its next step; returns the bytes freed");
  m.def("buffer_pool_idle_bytes", [] { return sfg::detail::BufferPool::get().idle_bytes(); },
        "Bytes the CPU training op's buffer pool holds idle");
  m.def("embedding_lookup", &sfg::embedding_lookup_cpu, "V[b, f] = weight[offsets[f] + ids[b, f]] (CPU)",
        py::arg("ids"), py::arg("weight"), py::arg("offsets"), py::arg("bounds_check") = "fatal");
  m.def("embedding_lookup_int8", &sfg::embedding_lookup_int8_cpu,
        "Lookup from an int8 row-wise quantised table, dequantised to float32 (CPU)", py::arg("ids"),
        py::arg("qweight"), py::arg("scale_bias"), py::arg("offsets"), py::arg("bounds_check") = "fatal");
  m.def("sparse_row_update", &sfg::sparse_row_update_cpu,
        "Deterministic duplicate reduction + fused SGD / rowwise Adagrad / lazy Adam on touched rows (CPU)",
        py::arg("kind"), py::arg("weight"), py::arg("state1"), py::arg("state2"), py::arg("ids"), py::arg("offsets"),
        py::arg("grad_V"), py::arg("lr"), py::arg("eps"), py::arg("beta1"), py::arg("beta2"), py::arg("step"),
        py::arg("bounds_check") = "fatal");
  m.def("sfg_logits", &sfg::sfg_logits_cpu, "Fused SFG inference: gather -> encoder -> decoder -> [B] (CPU)",
        py::arg("ids"), py::arg("table"), py::arg("offsets"), py::arg("enc_weight"), py::arg("enc_bias"),
        py::arg("dec_weight"), py::arg("kind"), py::arg("activation"), py::arg("gamma"), py::arg("residual"),
        py::arg("pairs"), py::arg("generated_side"), py::arg("symmetric"), py::arg("bounds_check") = "fatal",
        py::arg("tile") = 64, py::arg("bf16_gemm") = false, py::arg("scale_bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("sfg_interaction_fwd", &sfg::sfg_interaction_fwd_cpu,
        "Fused SFG interaction on V, forward: {logit [B], H [B, N*D] (saved), T [B, N*D] (saved)} (CPU)",
        py::arg("V"), py::arg("enc_weight"), py::arg("enc_bias"), py::arg("dec_weight"), py::arg("kind"),
        py::arg("activation"), py::arg("gamma"), py::arg("residual"), py::arg("pairs"), py::arg("generated_side"),
        py::arg("symmetric"), py::arg("tile") = 64, py::arg("bf16_gemm") = false, py::arg("save") = true,
        py::call_guard<py::gil_scoped_release>());
  m.def("sfg_interaction_bwd", &sfg::sfg_interaction_bwd_cpu,
        "Fused SFG interaction on V, backward: {dV, dW_enc, dbias, ddec} (undefined where not needed) (CPU)",
        py::arg("grad"), py::arg("V"), py::arg("H"), py::arg("T"), py::arg("enc_weight"), py::arg("enc_bias"),
        py::arg("dec_weight"), py::arg("kind"), py::arg("activation"), py::arg("gamma"), py::arg("residual"),
        py::arg("pairs"), py::arg("generated_side"), py::arg("symmetric"), py::arg("tile") = 64,
        py::arg("bf16_gemm") = false, py::arg("need_v") = true, py::arg("need_enc_weight") = true,
        py::arg("need_enc_bias") = true, py::arg("need_dec") = true, py::call_guard<py::gil_scoped_release>());
#ifdef SFG_FAST_WITH_CUDA
  m.def("embedding_lookup_cuda", &sfg::embedding_lookup_cuda, "Multi-field lookup forward (CUDA)", py::arg("ids"),
        py::arg("weight"), py::arg("offsets"));
  m.def("rowwise_adagrad_update_cuda", &sfg::rowwise_adagrad_update_cuda,
        "Sorted segment-reduced embedding backward with fused rowwise Adagrad, no atomics (CUDA)", py::arg("weight"),
        py::arg("momentum"), py::arg("ids"), py::arg("offsets"), py::arg("grad_V"), py::arg("lr"), py::arg("eps"));
#endif
}
