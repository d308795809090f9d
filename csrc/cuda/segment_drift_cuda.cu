// CUDA kernels of the megatron_bpd ops: one block per segment for the reduction (warp shuffles, then one partial
// per warp through shared memory), a one-block kernel for first_bad and the O(P) normalizer, one block per segment
// for the writes. No host synchronization. The segment layout (sorted, non-overlapping, within [0, n)) is a
// precondition here; the CPU kernels check it.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "segment_drift.h"

namespace megatron_bpd {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxSegmentThreads = 256;
constexpr int kFinalizeThreads = 1024;

// Threads per segment block: the mean segment length rounded up to a power of two, within [32, 256].
int segment_threads(int64_t n, int64_t num_segments) {
  const int64_t mean_length = n / std::max<int64_t>(num_segments, 1);
  int threads = kWarp;
  while (threads < kMaxSegmentThreads && threads < mean_length) threads *= 2;
  return threads;
}

// One block per segment.
unsigned int segment_blocks(int64_t num_segments) {
  TORCH_CHECK(num_segments <= INT32_MAX, "at most 2^31 - 1 segments on CUDA, got ", num_segments);
  return static_cast<unsigned int>(num_segments);
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ int64_t warp_min(int64_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = min(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Block s reduces segment s into `out`; positions found bad lower *first_bad (kNoBadPosition when none).
template <typename scalar_t>
__global__ void segment_reduce_kernel(const scalar_t* __restrict__ cur, const scalar_t* __restrict__ old,
                                      const bool* __restrict__ mask, const int64_t* __restrict__ start,
                                      const int64_t* __restrict__ end, SegmentOutputs out, int64_t* first_bad) {
  const int64_t s = blockIdx.x;
  float sum = 0.0f;
  int64_t count = 0, bad = kNoBadPosition;
  for (int64_t t = start[s] + threadIdx.x; t < end[s]; t += blockDim.x) {
    const float c = static_cast<float>(cur[t]), o = static_cast<float>(old[t]);
    const bool valid = mask[t];
    sum += drift_term(valid ? c - o : 0.0f, out.statistic);  // a select: masked NaN/inf never enter
    count += valid;
    if (valid && !(is_finite(c) && is_finite(o))) bad = min(bad, t);
  }
  sum = warp_sum(sum);
  count = warp_sum(count);
  bad = warp_min(bad);
  __shared__ float warp_sums[kMaxSegmentThreads / kWarp];
  __shared__ int64_t warp_counts[kMaxSegmentThreads / kWarp], warp_bads[kMaxSegmentThreads / kWarp];
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    warp_sums[warp] = sum;
    warp_counts[warp] = count;
    warp_bads[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < blockDim.x / kWarp; ++w) {
    sum += warp_sums[w];
    count += warp_counts[w];
    bad = min(bad, warp_bads[w]);
  }
  store_segment(out, s, sum, count);
  if (bad != kNoBadPosition) {
    atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(bad));
  }
}

// One block: first_bad kNoBadPosition -> -1; when gate is given, gate *= normalization scale.
__global__ void finalize_kernel(int64_t* first_bad, const float* __restrict__ count, float* __restrict__ gate,
                                int64_t num_segments) {
  if (threadIdx.x == 0 && *first_bad == kNoBadPosition) *first_bad = -1;
  if (gate == nullptr) return;
  double total = 0.0, weighted = 0.0;
  for (int64_t s = threadIdx.x; s < num_segments; s += blockDim.x) {
    total += count[s];
    weighted += static_cast<double>(gate[s]) * count[s];
  }
  total = warp_sum(total);
  weighted = warp_sum(weighted);
  __shared__ double warp_totals[kFinalizeThreads / kWarp], warp_weighted[kFinalizeThreads / kWarp];
  __shared__ float scale;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    warp_totals[warp] = total;
    warp_weighted[warp] = weighted;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / kWarp; ++w) {
      total += warp_totals[w];
      weighted += warp_weighted[w];
    }
    scale = normalization_scale(total, weighted);
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < num_segments; s += blockDim.x) gate[s] *= scale;
}

// Block s writes segment s and the gap after it (block 0 also the gap before it): value inside, 1 outside.
__global__ void broadcast_kernel(const float* __restrict__ value, const int64_t* __restrict__ start,
                                 const int64_t* __restrict__ end, int64_t num_segments, int64_t n,
                                 float* __restrict__ out) {
  const int64_t s = blockIdx.x;
  const int64_t lo = s == 0 ? 0 : start[s], hi = s + 1 < num_segments ? start[s + 1] : n;
  const int64_t seg_lo = start[s], seg_hi = end[s];
  const float v = value[s];
  for (int64_t t = lo + threadIdx.x; t < hi; t += blockDim.x) out[t] = (t >= seg_lo && t < seg_hi) ? v : 1.0f;
}

at::Tensor float_vector(int64_t size, const at::Tensor& like) {
  return at::empty({size}, like.options().dtype(at::kFloat));
}

// Launches the reduction and the finalize kernel (normalizing `out.gate` when normalize); returns first_bad.
at::Tensor reduce_segments(const at::Tensor& cur_in, const at::Tensor& old_in, const at::Tensor& mask_in,
                           const at::Tensor& seg_start, const at::Tensor& seg_end, const SegmentOutputs& out,
                           bool normalize) {
  const at::Tensor cur = cur_in.contiguous(), old = old_in.contiguous(), mask = mask_in.contiguous();
  const int64_t n = cur.numel(), num_segments = seg_start.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor first_bad = at::full({}, kNoBadPosition, cur.options().dtype(at::kLong));
  if (num_segments > 0) {
    const unsigned int blocks = segment_blocks(num_segments);
    const int threads = segment_threads(n, num_segments);
    MEGATRON_BPD_DISPATCH_LOGPROB_TYPES(cur.scalar_type(), "segment_drift_cuda", [&] {
      segment_reduce_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          cur.data_ptr<scalar_t>(), old.data_ptr<scalar_t>(), mask.data_ptr<bool>(), seg_start.data_ptr<int64_t>(),
          seg_end.data_ptr<int64_t>(), out, first_bad.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(first_bad.data_ptr<int64_t>(), out.count,
                                                       normalize ? out.gate : nullptr, num_segments);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return first_bad;
}

void broadcast_segments(const at::Tensor& value, const at::Tensor& seg_start, const at::Tensor& seg_end,
                        at::Tensor& out) {
  const int64_t num_segments = seg_start.numel(), n = out.numel();
  if (num_segments == 0) {
    out.fill_(1.0f);
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  broadcast_kernel<<<segment_blocks(num_segments), segment_threads(n, num_segments), 0, stream>>>(
      value.data_ptr<float>(), seg_start.data_ptr<int64_t>(), seg_end.data_ptr<int64_t>(), num_segments, n,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_drift_stats_cuda(const at::Tensor& cur, const at::Tensor& old,
                                                                        const at::Tensor& mask,
                                                                        const at::Tensor& seg_start,
                                                                        const at::Tensor& seg_end, int64_t statistic) {
  check_drift_inputs(cur, old, mask, seg_start, seg_end, statistic);
  const c10::cuda::CUDAGuard guard(cur.device());
  at::Tensor seg_sum = float_vector(seg_start.numel(), cur), seg_count = float_vector(seg_start.numel(), cur);
  const SegmentOutputs out{seg_sum.data_ptr<float>(), seg_count.data_ptr<float>(), nullptr, statistic, 0, 0.f, 0.f};
  at::Tensor first_bad = reduce_segments(cur, old, mask, seg_start.contiguous(), seg_end.contiguous(), out, false);
  return {seg_sum, seg_count, first_bad};
}

at::Tensor segment_broadcast_cuda(const at::Tensor& seg_value, const at::Tensor& seg_start,
                                  const at::Tensor& seg_end, int64_t n) {
  check_segments(seg_start, seg_end, seg_value);
  TORCH_CHECK(seg_value.dim() == 1 && seg_value.numel() == seg_start.numel(),
              "seg_value must be 1-D with one value per segment (", seg_start.numel(), "), got shape ",
              seg_value.sizes());
  TORCH_CHECK(seg_value.scalar_type() == at::kFloat, "seg_value must be float32, got ", seg_value.scalar_type());
  TORCH_CHECK(n >= 0, "n must be non-negative, got ", n);
  const c10::cuda::CUDAGuard guard(seg_value.device());
  at::Tensor out = float_vector(n, seg_value);
  broadcast_segments(seg_value.contiguous(), seg_start.contiguous(), seg_end.contiguous(), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_drift_gates_cuda(
    const at::Tensor& cur, const at::Tensor& old, const at::Tensor& mask, const at::Tensor& seg_start_in,
    const at::Tensor& seg_end_in, int64_t statistic, int64_t gate_fn, double tau, double threshold, bool normalize) {
  check_drift_inputs(cur, old, mask, seg_start_in, seg_end_in, statistic);
  check_gate_fn(gate_fn);
  const c10::cuda::CUDAGuard guard(cur.device());
  const at::Tensor seg_start = seg_start_in.contiguous(), seg_end = seg_end_in.contiguous();
  const int64_t num_segments = seg_start.numel();
  at::Tensor seg_stat = float_vector(num_segments, cur), seg_count = float_vector(num_segments, cur),
             seg_gate = float_vector(num_segments, cur), gates = float_vector(cur.numel(), cur);
  const SegmentOutputs out{seg_stat.data_ptr<float>(), seg_count.data_ptr<float>(), seg_gate.data_ptr<float>(),
                           statistic, gate_fn, static_cast<float>(tau), static_cast<float>(threshold)};
  at::Tensor first_bad = reduce_segments(cur, old, mask, seg_start, seg_end, out, normalize);
  broadcast_segments(seg_gate, seg_start, seg_end, gates);
  return {gates, seg_stat, seg_count, seg_gate, first_bad};
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_bpd, CUDA, m) {
  m.impl("segment_drift_stats", &segment_drift_stats_cuda);
  m.impl("segment_broadcast", &segment_broadcast_cuda);
  m.impl("block_drift_gates", &block_drift_gates_cuda);
}

}  // namespace megatron_bpd
