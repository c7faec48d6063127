#include "nccl_comm.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstring>

#define NCCL_CHECK(call)                                                                               \
  do {                                                                                                 \
    ncclResult_t result_ = (call);                                                                     \
    TORCH_CHECK(result_ == ncclSuccess, "autotp NCCL error in ", #call, ": ", ncclGetErrorString(result_), \
                " (", ncclGetLastError(nullptr), ")");                                                   \
  } while (0)

#define CUDA_CHECK(call)                                                                               \
  do {                                                                                                 \
    cudaError_t error_ = (call);                                                                       \
    TORCH_CHECK(error_ == cudaSuccess, "autotp CUDA error in ", #call, ": ", cudaGetErrorString(error_)); \
  } while (0)

namespace autotp {

namespace {
ncclDataType_t nccl_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ncclFloat32;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kDouble: return ncclFloat64;
    default: TORCH_CHECK(false, "autotp NcclComm: dtype ", t.scalar_type(), " is not supported (float32, bfloat16, "
                                "float16, float64)");
  }
}
}  // namespace

NcclComm::NcclComm(const std::string& unique_id, int rank, int size, int device, int max_ctas)
    : rank_(rank), size_(size), device_(device),
      // High priority: a ready reduce-scatter should not queue behind backward's GEMMs.
      stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device)) {
  TORCH_CHECK(unique_id.size() == sizeof(ncclUniqueId), "autotp NcclComm: unique_id has ", unique_id.size(),
              " bytes, expected ", sizeof(ncclUniqueId));
  TORCH_CHECK(size >= 1 && rank >= 0 && rank < size, "autotp NcclComm: rank ", rank, " outside [0, ", size, ")");
  c10::cuda::CUDAGuard guard(device);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  if (max_ctas > 0) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.maxCTAs = max_ctas;
    NCCL_CHECK(ncclCommInitRankConfig(&comm_, size, id, rank, &config));
  } else {
    NCCL_CHECK(ncclCommInitRank(&comm_, size, id, rank));
  }
  CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
}

NcclComm::~NcclComm() {
  c10::cuda::CUDAGuard guard(device_);
  if (comm_ != nullptr) ncclCommDestroy(comm_);
  if (ready_ != nullptr) cudaEventDestroy(ready_);
  if (done_ != nullptr) cudaEventDestroy(done_);
}

std::string NcclComm::unique_id() {
  ncclUniqueId id;
  NCCL_CHECK(ncclGetUniqueId(&id));
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

void NcclComm::check_tensor(const at::Tensor& t, const char* what) const {
  TORCH_CHECK(t.is_cuda() && t.get_device() == device_, "autotp NcclComm: ", what, " must be on cuda:", device_,
              ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "autotp NcclComm: ", what, " must be contiguous");
}

void NcclComm::reduce_scatter(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs,
                              const std::vector<bool>& accumulate, bool average) {
  TORCH_CHECK(outputs.size() == inputs.size() && outputs.size() == accumulate.size(),
              "autotp NcclComm.reduce_scatter: ", outputs.size(), " outputs, ", inputs.size(), " inputs, ",
              accumulate.size(), " accumulate flags: the lists must have the same length");
  c10::cuda::CUDAGuard guard(device_);
  for (size_t i = 0; i < inputs.size(); ++i) {
    check_tensor(outputs[i], "output");
    check_tensor(inputs[i], "input");
    TORCH_CHECK(inputs[i].numel() == outputs[i].numel() * size_, "autotp NcclComm.reduce_scatter: input ", i, " has ",
                inputs[i].numel(), " elements, expected output numel ", outputs[i].numel(), " x group size ", size_);
    TORCH_CHECK(inputs[i].scalar_type() == outputs[i].scalar_type() || accumulate[i],
                "autotp NcclComm.reduce_scatter: input ", i, " is ", inputs[i].scalar_type(), " but output is ",
                outputs[i].scalar_type(), " (only an accumulated output may differ)");
  }
  auto producer = c10::cuda::getCurrentCUDAStream(device_);
  CUDA_CHECK(cudaEventRecord(ready_, producer.stream()));
  CUDA_CHECK(cudaStreamWaitEvent(stream_.stream(), ready_, 0));
  c10::cuda::CUDAStreamGuard on_comm(stream_);
  std::vector<at::Tensor> targets;  // where NCCL writes: the output itself, or a wire-dtype temporary
  targets.reserve(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    targets.push_back(accumulate[i] ? at::empty({outputs[i].numel()}, inputs[i].options()) : outputs[i]);
  }
  NCCL_CHECK(ncclGroupStart());
  for (size_t i = 0; i < inputs.size(); ++i) {
    NCCL_CHECK(ncclReduceScatter(inputs[i].data_ptr(), targets[i].data_ptr(), outputs[i].numel(),
                                 nccl_dtype(inputs[i]), average ? ncclAvg : ncclSum, comm_, stream_.stream()));
  }
  NCCL_CHECK(ncclGroupEnd());
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (accumulate[i]) outputs[i].view({-1}).add_(targets[i]);
    // Made on the producing stream, used here: the allocator must not hand the memory out again before this
    // stream is past it.
    c10::cuda::CUDACachingAllocator::recordStream(inputs[i].storage().data_ptr(), stream_);
    c10::cuda::CUDACachingAllocator::recordStream(outputs[i].storage().data_ptr(), stream_);
  }
  launches_ += static_cast<int64_t>(inputs.size());
}

void NcclComm::all_gather(const at::Tensor& output, const at::Tensor& input) {
  c10::cuda::CUDAGuard guard(device_);
  check_tensor(output, "output");
  check_tensor(input, "input");
  TORCH_CHECK(output.numel() == input.numel() * size_ && output.scalar_type() == input.scalar_type(),
              "autotp NcclComm.all_gather: output must have group size ", size_, " x input's ", input.numel(),
              " elements of the same dtype");
  auto current = c10::cuda::getCurrentCUDAStream(device_);
  NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), nccl_dtype(input), comm_,
                           current.stream()));
}

void NcclComm::join() {
  c10::cuda::CUDAGuard guard(device_);
  CUDA_CHECK(cudaEventRecord(done_, stream_.stream()));
  CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_).stream(), done_, 0));
}

}  // namespace autotp
