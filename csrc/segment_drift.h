// Per-segment arithmetic of the blockwise policy-drift gate, shared by the CPU and CUDA kernels.
//
// For segment s with valid positions t (mask true) and drift d_t = cur_t - old_t:
//   sum_s = sum_t f(d_t)  with f = identity (signed_mean), |.| (abs_mean), square (rms);  count_s = #valid
//   D_s   = sum_s / max(1, count_s)   (sqrt of that for rms)
//   g_s   = exp(-tau |D_s|) (exp) or 1[|D_s| <= threshold] (hard)
//   scale = C / sum_s g_s count_s with C = sum_s count_s (1 when C or the denominator is 0)
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace megatron_bpd {

enum Statistic : int64_t { kSignedMean = 0, kAbsMean = 1, kRms = 2 };
enum GateFn : int64_t { kExpGate = 0, kHardGate = 1 };

// No first_bad position found yet; the ops report it as -1.
constexpr int64_t kNoBadPosition = INT64_MAX;

C10_HOST_DEVICE inline bool is_finite(float x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// f(d_t): the per-position term summed over a segment.
C10_HOST_DEVICE inline float drift_term(float d, int64_t statistic) {
  switch (statistic) {
    case kAbsMean: return fabsf(d);
    case kRms: return d * d;
    default: return d;
  }
}

// D_s from (sum_s, count_s).
C10_HOST_DEVICE inline float segment_statistic(float sum, float count, int64_t statistic) {
  const float mean = sum / fmaxf(count, 1.0f);
  return statistic == kRms ? sqrtf(mean) : mean;
}

// Raw gate g_s from D_s.
C10_HOST_DEVICE inline float raw_gate(float stat, int64_t gate_fn, float tau, float threshold) {
  const float a = fabsf(stat);
  return gate_fn == kHardGate ? (a <= threshold ? 1.0f : 0.0f) : expf(-tau * a);
}

// Mean normalization: C / sum_s g_s count_s, or 1 when C or the denominator is 0.
C10_HOST_DEVICE inline float normalization_scale(double total_count, double weighted_count) {
  return (total_count == 0.0 || weighted_count == 0.0) ? 1.0f : static_cast<float>(total_count / weighted_count);
}

// Where one segment's reduction goes: (sum_s, count_s) when gate is null (segment_drift_stats), else
// (D_s, count_s, g_s) (block_drift_gates).
struct SegmentOutputs {
  float* value;
  float* count;
  float* gate;
  int64_t statistic;
  int64_t gate_fn;
  float tau;
  float threshold;
};

C10_HOST_DEVICE inline void store_segment(const SegmentOutputs& out, int64_t s, float sum, int64_t count) {
  const float c = static_cast<float>(count);
  out.count[s] = c;
  if (out.gate == nullptr) {
    out.value[s] = sum;
    return;
  }
  const float stat = segment_statistic(sum, c, out.statistic);
  out.value[s] = stat;
  out.gate[s] = raw_gate(stat, out.gate_fn, out.tau, out.threshold);
}

// AT_DISPATCH over the log-prob dtypes the kernels take (scalar_t inside __VA_ARGS__).
#define MEGATRON_BPD_DISPATCH_LOGPROB_TYPES(TYPE, NAME, ...)                                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Shape/dtype/device checks shared by the CPU and CUDA implementations (defined in segment_drift.cpp).
void check_drift_inputs(const at::Tensor& cur, const at::Tensor& old, const at::Tensor& mask,
                        const at::Tensor& seg_start, const at::Tensor& seg_end, int64_t statistic);
void check_segments(const at::Tensor& seg_start, const at::Tensor& seg_end, const at::Tensor& like);
void check_gate_fn(int64_t gate_fn);

}  // namespace megatron_bpd
