// CPU kernels of the megatron_bpd ops: a parallel-for over segments for the reduction, a serial O(P) normalizer
// and a parallel-for over segments for the writes (torch's intra-op thread pool, i.e. OpenMP).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <type_traits>
#include <utility>

#include "segment_drift.h"

namespace megatron_bpd {
namespace {

// Positions per parallel-for chunk: enough work per task to amortize the pool, whatever the segment lengths.
constexpr int64_t kPositionsPerTask = 1 << 15;

int64_t segment_grain(int64_t num_segments, int64_t n) {
  return std::max<int64_t>(1, kPositionsPerTask * num_segments / std::max<int64_t>(n, 1));
}

void check_layout(const int64_t* start, const int64_t* end, int64_t num_segments, int64_t n) {
  int64_t prev_end = 0;
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(prev_end <= start[s] && start[s] <= end[s],
                "segments must be sorted, non-overlapping ranges [seg_start, seg_end) within [0, n): segment ", s,
                " is [", start[s], ", ", end[s], ") after a segment ending at ", prev_end);
    TORCH_CHECK(end[s] - start[s] <= INT32_MAX, "segment ", s, " is longer than 2^31 - 1 positions");
    prev_end = end[s];
  }
  TORCH_CHECK(prev_end <= n, "the last segment ends at ", prev_end, ", beyond n = ", n);
}

// x where valid is 1, +0 where it is 0: a bit mask rather than a branch, so that masked NaN/inf never enter and
// the loop vectorizes.
inline float keep_if(float x, int32_t valid) {
  return std::bit_cast<float>(std::bit_cast<int32_t>(x) & -valid);
}

// (sum of f(d_t), count) over the valid positions of [begin, end); segments are shorter than 2^31 (check_layout).
template <int64_t kStatistic, typename scalar_t>
std::pair<float, int32_t> masked_sum(const scalar_t* c, const scalar_t* o, const uint8_t* m, int64_t begin,
                                     int64_t end) {
  float sum = 0.0f;
  int32_t count = 0;
#pragma omp simd reduction(+ : sum, count)
  for (int64_t t = begin; t < end; ++t) {
    const int32_t valid = m[t];
    sum += drift_term(keep_if(static_cast<float>(c[t]) - static_cast<float>(o[t]), valid), kStatistic);
    count += valid;
  }
  return {sum, count};
}

bool is_bad(float c, float o, uint8_t valid) { return valid && !(is_finite(c) && is_finite(o)); }

// Reduces every segment into `out` (see store_segment); returns the first bad position or -1.
// A non-finite valid input makes its segment's sum non-finite, so only such segments are searched for one.
int64_t reduce_segments(const at::Tensor& cur_in, const at::Tensor& old_in, const at::Tensor& mask_in,
                        const at::Tensor& seg_start, const at::Tensor& seg_end, const SegmentOutputs& out) {
  const at::Tensor cur = cur_in.contiguous(), old = old_in.contiguous(), mask = mask_in.contiguous();
  const int64_t n = cur.numel(), num_segments = seg_start.numel();
  const int64_t* start = seg_start.data_ptr<int64_t>();
  const int64_t* end = seg_end.data_ptr<int64_t>();
  check_layout(start, end, num_segments, n);
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  std::atomic<int64_t> first_bad{kNoBadPosition};
  auto reduce_all = [&](const auto* c, const auto* o, auto statistic) {
    at::parallel_for(0, num_segments, segment_grain(num_segments, n), [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const auto [sum, count] = masked_sum<decltype(statistic)::value>(c, o, m, start[s], end[s]);
        store_segment(out, s, sum, count);
        if (is_finite(sum)) continue;
        for (int64_t t = start[s]; t < end[s]; ++t) {
          if (!is_bad(static_cast<float>(c[t]), static_cast<float>(o[t]), m[t])) continue;
          int64_t seen = first_bad.load();
          while (t < seen && !first_bad.compare_exchange_weak(seen, t)) {
          }
          break;
        }
      }
    });
  };
  MEGATRON_BPD_DISPATCH_LOGPROB_TYPES(cur.scalar_type(), "segment_drift_cpu", [&] {
    const scalar_t* c = cur.data_ptr<scalar_t>();
    const scalar_t* o = old.data_ptr<scalar_t>();
    switch (out.statistic) {
      case kAbsMean: return reduce_all(c, o, std::integral_constant<int64_t, kAbsMean>{});
      case kRms: return reduce_all(c, o, std::integral_constant<int64_t, kRms>{});
      default: return reduce_all(c, o, std::integral_constant<int64_t, kSignedMean>{});
    }
  });
  const int64_t bad = first_bad.load();
  return bad == kNoBadPosition ? -1 : bad;
}

// out[t] = value[s] for t in segment s, 1 elsewhere; each segment writes its range and the gap after it.
void broadcast_segments(const float* value, const int64_t* start, const int64_t* end, int64_t num_segments,
                        int64_t n, float* out) {
  if (num_segments == 0) {
    std::fill(out, out + n, 1.0f);
    return;
  }
  at::parallel_for(0, num_segments, segment_grain(num_segments, n), [&](int64_t s_begin, int64_t s_end) {
    for (int64_t s = s_begin; s < s_end; ++s) {
      if (s == 0) std::fill(out, out + start[0], 1.0f);
      std::fill(out + start[s], out + end[s], value[s]);
      std::fill(out + end[s], out + (s + 1 < num_segments ? start[s + 1] : n), 1.0f);
    }
  });
}

at::Tensor float_vector(int64_t size, const at::Tensor& like) {
  return at::empty({size}, like.options().dtype(at::kFloat));
}

at::Tensor index_scalar(int64_t value) { return at::scalar_tensor(value, at::dtype(at::kLong)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_drift_stats_cpu(const at::Tensor& cur, const at::Tensor& old,
                                                                       const at::Tensor& mask,
                                                                       const at::Tensor& seg_start,
                                                                       const at::Tensor& seg_end, int64_t statistic) {
  check_drift_inputs(cur, old, mask, seg_start, seg_end, statistic);
  at::Tensor seg_sum = float_vector(seg_start.numel(), cur), seg_count = float_vector(seg_start.numel(), cur);
  const SegmentOutputs out{seg_sum.data_ptr<float>(), seg_count.data_ptr<float>(), nullptr, statistic, 0, 0.f, 0.f};
  const int64_t first_bad = reduce_segments(cur, old, mask, seg_start.contiguous(), seg_end.contiguous(), out);
  return {seg_sum, seg_count, index_scalar(first_bad)};
}

at::Tensor segment_broadcast_cpu(const at::Tensor& seg_value, const at::Tensor& seg_start_in,
                                 const at::Tensor& seg_end_in, int64_t n) {
  check_segments(seg_start_in, seg_end_in, seg_value);
  TORCH_CHECK(seg_value.dim() == 1 && seg_value.numel() == seg_start_in.numel(),
              "seg_value must be 1-D with one value per segment (", seg_start_in.numel(), "), got shape ",
              seg_value.sizes());
  TORCH_CHECK(seg_value.scalar_type() == at::kFloat, "seg_value must be float32, got ", seg_value.scalar_type());
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  const at::Tensor value = seg_value.contiguous(), seg_start = seg_start_in.contiguous(),
                   seg_end = seg_end_in.contiguous();
  const int64_t* start = seg_start.data_ptr<int64_t>();
  const int64_t* end = seg_end.data_ptr<int64_t>();
  check_layout(start, end, seg_start.numel(), n);
  at::Tensor out = float_vector(n, value);
  broadcast_segments(value.data_ptr<float>(), start, end, seg_start.numel(), n, out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_drift_gates_cpu(
    const at::Tensor& cur, const at::Tensor& old, const at::Tensor& mask, const at::Tensor& seg_start_in,
    const at::Tensor& seg_end_in, int64_t statistic, int64_t gate_fn, double tau, double threshold, bool normalize) {
  check_drift_inputs(cur, old, mask, seg_start_in, seg_end_in, statistic);
  check_gate_fn(gate_fn);
  const at::Tensor seg_start = seg_start_in.contiguous(), seg_end = seg_end_in.contiguous();
  const int64_t num_segments = seg_start.numel(), n = cur.numel();
  at::Tensor seg_stat = float_vector(num_segments, cur), seg_count = float_vector(num_segments, cur),
             seg_gate = float_vector(num_segments, cur), gates = float_vector(n, cur);
  float* count = seg_count.data_ptr<float>();
  float* gate = seg_gate.data_ptr<float>();
  const SegmentOutputs out{seg_stat.data_ptr<float>(), count, gate, statistic, gate_fn, static_cast<float>(tau),
                           static_cast<float>(threshold)};
  const int64_t first_bad = reduce_segments(cur, old, mask, seg_start, seg_end, out);
  if (normalize) {
    double total = 0.0, weighted = 0.0;
    for (int64_t s = 0; s < num_segments; ++s) {
      total += count[s];
      weighted += static_cast<double>(gate[s]) * count[s];
    }
    const float scale = normalization_scale(total, weighted);
    for (int64_t s = 0; s < num_segments; ++s) gate[s] *= scale;
  }
  broadcast_segments(gate, seg_start.data_ptr<int64_t>(), seg_end.data_ptr<int64_t>(), num_segments, n,
                     gates.data_ptr<float>());
  return {gates, seg_stat, seg_count, seg_gate, index_scalar(first_bad)};
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_bpd, CPU, m) {
  m.impl("segment_drift_stats", &segment_drift_stats_cpu);
  m.impl("segment_broadcast", &segment_broadcast_cpu);
  m.impl("block_drift_gates", &block_drift_gates_cpu);
}

}  // namespace megatron_bpd
