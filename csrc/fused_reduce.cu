// The owner's slot reduction of the fused all-reduce / reduce-scatter (see fused_issue.h): the same arithmetic as
// autotp_kernels/comm_kernels.py's Triton kernel (fp32 accumulation starting from zero, ranks in order 0..W-1,
// one rounding), so the bits match it and are the same on every rank and in every run. Memory-bound over local
// HBM: 16-byte loads per rank and element group, a grid capped at `programs` blocks so a GEMM it runs under keeps
// the rest of the SMs.
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "fused_issue.h"

namespace autotp {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int W, bool KEEP>
__global__ void reduce_slots_kernel(T* slots, T* out, int64_t offset, int64_t elems, int64_t out_offset,
                                    int64_t stride_slot, int64_t stride_seg, int64_t stride_out_seg, int64_t keep) {
  constexpr int V = 16 / sizeof(T);
  T* base = slots + blockIdx.y * stride_seg + offset;
  T* dst = out + blockIdx.y * stride_out_seg + out_offset;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool vector = reinterpret_cast<uintptr_t>(base) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
                      stride_slot % V == 0;
  int64_t done = 0;
  if (vector) {
    const int64_t groups = elems / V;
    for (int64_t g = first; g < groups; g += step) {
      float acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = 0.0f;
#pragma unroll
      for (int q = 0; q < W; ++q) {
        const uint4 raw = *reinterpret_cast<const uint4*>(base + q * stride_slot + g * V);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += to_float(v[j]);
      }
      uint4 packed;
      T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = from_float<T>(acc[j]);
      *reinterpret_cast<uint4*>(dst + g * V) = packed;
      if (KEEP) *reinterpret_cast<uint4*>(base + keep * stride_slot + g * V) = packed;
    }
    done = groups * V;
  }
  for (int64_t i = done + first; i < elems; i += step) {
    float acc = 0.0f;
#pragma unroll
    for (int q = 0; q < W; ++q) acc += to_float(base[q * stride_slot + i]);
    const T total = from_float<T>(acc);
    dst[i] = total;
    if (KEEP) base[keep * stride_slot + i] = total;
  }
}

template <typename T, int W>
void launch(T* slots, T* out, int64_t offset, int64_t elems, int64_t out_offset, int64_t stride_slot,
            int64_t stride_seg, int64_t stride_out_seg, int64_t keep, dim3 grid, cudaStream_t stream) {
  constexpr int kThreads = 512;
  if (keep >= 0)
    reduce_slots_kernel<T, W, true><<<grid, kThreads, 0, stream>>>(slots, out, offset, elems, out_offset,
                                                                   stride_slot, stride_seg, stride_out_seg, keep);
  else
    reduce_slots_kernel<T, W, false><<<grid, kThreads, 0, stream>>>(slots, out, offset, elems, out_offset,
                                                                    stride_slot, stride_seg, stride_out_seg, 0);
}

template <typename T>
void dispatch_world(int64_t world, T* slots, T* out, int64_t offset, int64_t elems, int64_t out_offset,
                    int64_t stride_slot, int64_t stride_seg, int64_t stride_out_seg, int64_t keep, dim3 grid,
                    cudaStream_t stream) {
#define AUTOTP_REDUCE_CASE(w) \
  case w: launch<T, w>(slots, out, offset, elems, out_offset, stride_slot, stride_seg, stride_out_seg, keep, grid, stream); break;
  switch (world) {
    AUTOTP_REDUCE_CASE(2)
    AUTOTP_REDUCE_CASE(3)
    AUTOTP_REDUCE_CASE(4)
    AUTOTP_REDUCE_CASE(5)
    AUTOTP_REDUCE_CASE(6)
    AUTOTP_REDUCE_CASE(7)
    AUTOTP_REDUCE_CASE(8)
    default: throw std::invalid_argument("autotp fused: reduce_slots supports 2-8 ranks, got " + std::to_string(world));
  }
#undef AUTOTP_REDUCE_CASE
}

}  // namespace

void reduce_slots(const at::Tensor& slots, int64_t lo, int64_t hi, const at::Tensor& out, int64_t out_row0,
                  int64_t keep, int programs, cudaStream_t stream) {
  const int64_t world = slots.size(0), seg = slots.size(1), n = slots.size(3);
  const int64_t elems = (hi - lo) * n;
  if (elems <= 0) return;
  if (!slots.is_contiguous() || out.scalar_type() != slots.scalar_type() || out.stride(2) != 1 || out.stride(1) != n)
    throw std::invalid_argument("autotp fused: reduce_slots needs contiguous slots and an output of the same dtype "
                                "with contiguous rows");
  const int64_t groups = (elems + 15) / 16;
  const int64_t per_seg = std::max<int64_t>(1, programs / std::max<int64_t>(seg, 1));
  dim3 grid(static_cast<unsigned>(std::min<int64_t>(per_seg, (groups + 511) / 512)), static_cast<unsigned>(seg));
  const int64_t stride_slot = slots.stride(0), stride_seg = slots.stride(1), stride_out = out.stride(0);
  switch (slots.scalar_type()) {
    case at::kFloat:
      dispatch_world<float>(world, slots.data_ptr<float>(), out.data_ptr<float>(), lo * n, elems, out_row0 * n,
                            stride_slot, stride_seg, stride_out, keep, grid, stream);
      break;
    case at::kHalf:
      dispatch_world<__half>(world, reinterpret_cast<__half*>(slots.data_ptr<at::Half>()),
                             reinterpret_cast<__half*>(out.data_ptr<at::Half>()), lo * n, elems, out_row0 * n,
                             stride_slot, stride_seg, stride_out, keep, grid, stream);
      break;
    case at::kBFloat16:
      dispatch_world<__nv_bfloat16>(world, reinterpret_cast<__nv_bfloat16*>(slots.data_ptr<at::BFloat16>()),
                                    reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()), lo * n, elems,
                                    out_row0 * n, stride_slot, stride_seg, stride_out, keep, grid, stream);
      break;
    default:
      throw std::invalid_argument("autotp fused: reduce_slots takes float32, float16 or bfloat16");
  }
  const cudaError_t code = cudaGetLastError();
  if (code != cudaSuccess) throw std::runtime_error(std::string("autotp fused: reduce_slots launch: ") + cudaGetErrorString(code));
}

}  // namespace autotp
