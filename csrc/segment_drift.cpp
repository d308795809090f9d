// Schemas of the megatron_bpd ops, the input checks shared by the CPU and CUDA kernels, and the _C module stub.
#include <Python.h>
#include <torch/library.h>

#include "segment_drift.h"

extern "C" {
// An empty module: importing megatron_bpd._C loads this library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace megatron_bpd {

void check_segments(const at::Tensor& seg_start, const at::Tensor& seg_end, const at::Tensor& like) {
  TORCH_CHECK(seg_start.dim() == 1 && seg_end.dim() == 1, "seg_start and seg_end must be 1-D, got shapes ",
              seg_start.sizes(), " and ", seg_end.sizes());
  TORCH_CHECK(seg_start.numel() == seg_end.numel(), "seg_start and seg_end must have the same length, got ",
              seg_start.numel(), " and ", seg_end.numel());
  TORCH_CHECK(seg_start.scalar_type() == at::kLong && seg_end.scalar_type() == at::kLong,
              "seg_start and seg_end must be int64, got ", seg_start.scalar_type(), " and ", seg_end.scalar_type());
  TORCH_CHECK(seg_start.device() == like.device() && seg_end.device() == like.device(),
              "seg_start and seg_end must be on ", like.device(), ", got ", seg_start.device(), " and ",
              seg_end.device());
}

void check_drift_inputs(const at::Tensor& cur, const at::Tensor& old, const at::Tensor& mask,
                        const at::Tensor& seg_start, const at::Tensor& seg_end, int64_t statistic) {
  TORCH_CHECK(cur.dim() == 1 && old.dim() == 1 && mask.dim() == 1, "cur, old and mask must be 1-D, got shapes ",
              cur.sizes(), ", ", old.sizes(), " and ", mask.sizes());
  TORCH_CHECK(cur.numel() == old.numel() && cur.numel() == mask.numel(),
              "cur, old and mask must have the same length, got ", cur.numel(), ", ", old.numel(), " and ",
              mask.numel());
  const auto dtype = cur.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "cur must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(old.scalar_type() == dtype, "old must have the dtype of cur (", dtype, "), got ", old.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(old.device() == cur.device() && mask.device() == cur.device(),
              "cur, old and mask must be on one device, got ", cur.device(), ", ", old.device(), " and ",
              mask.device());
  TORCH_CHECK(statistic >= kSignedMean && statistic <= kRms,
              "statistic must be 0 (signed_mean), 1 (abs_mean) or 2 (rms), got ", statistic);
  check_segments(seg_start, seg_end, cur);
}

void check_gate_fn(int64_t gate_fn) {
  TORCH_CHECK(gate_fn == kExpGate || gate_fn == kHardGate, "gate_fn must be 0 (exp) or 1 (hard), got ", gate_fn);
}

TORCH_LIBRARY(megatron_bpd, m) {
  m.def("segment_drift_stats(Tensor cur, Tensor old, Tensor mask, Tensor seg_start, Tensor seg_end, int statistic)"
        " -> (Tensor seg_sum, Tensor seg_count, Tensor first_bad)");
  m.def("segment_broadcast(Tensor seg_value, Tensor seg_start, Tensor seg_end, int n) -> Tensor");
  m.def("block_drift_gates(Tensor cur, Tensor old, Tensor mask, Tensor seg_start, Tensor seg_end, int statistic,"
        " int gate_fn, float tau, float threshold, bool normalize)"
        " -> (Tensor gates, Tensor seg_stat, Tensor seg_count, Tensor seg_gate, Tensor first_bad)");
}

}  // namespace megatron_bpd
