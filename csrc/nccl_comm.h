// NCCL communicator for the ZeRO data-parallel group with its own high-priority stream. Built only where CUDA
// torch and NCCL headers are present (AUTOTP_WITH_NCCL).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include <string>
#include <vector>

namespace autotp {

class NcclComm {
 public:
  // `unique_id` comes from `unique_id()` on rank 0 of the group, broadcast through torch.distributed.
  // `max_ctas` > 0 caps the thread blocks NCCL uses (ncclConfig_t.maxCTAs), leaving SMs to the backward GEMMs
  // it overlaps with; 0 keeps NCCL's default.
  NcclComm(const std::string& unique_id, int rank, int size, int device, int max_ctas = 0);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  static std::string unique_id();

  // For every i: outputs[i] (numel n) = this rank's slice of the sum over ranks of inputs[i] (numel n * size),
  // or outputs[i] += that slice where accumulate[i]. Enqueued on the comm stream after all work already queued
  // on the current stream, as one NCCL group (ready buckets coalesced), in list order. Inputs and outputs are
  // kept alive for the comm stream through the caching allocator (recordStream), so the caller may drop them.
  void reduce_scatter(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs,
                      const std::vector<bool>& accumulate, bool average);

  // output (numel n * size) = every rank's input (numel n) in rank order, on the current stream. `input` may be
  // this rank's slice of `output` (in place).
  void all_gather(const at::Tensor& output, const at::Tensor& input);

  // The current stream waits for everything enqueued on the comm stream (no host synchronisation).
  void join();

  int rank() const { return rank_; }
  int size() const { return size_; }
  int64_t launches() const { return launches_; }
  // The comm stream, for callers that enqueue their own work on it (torch.cuda.ExternalStream).
  int64_t stream_handle() const { return reinterpret_cast<int64_t>(stream_.stream()); }

 private:
  void check_tensor(const at::Tensor& t, const char* what) const;

  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
  c10::cuda::CUDAStream stream_;
  cudaEvent_t ready_ = nullptr;  // recorded on the producing stream, waited on by the comm stream
  cudaEvent_t done_ = nullptr;   // recorded on the comm stream, waited on by join()
  int64_t launches_ = 0;
};

}  // namespace autotp
