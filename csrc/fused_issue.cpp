// See fused_issue.h. Stream memory operations (cuStreamWriteValue32 / cuStreamWaitValue32) are driver API
// calls with no runtime equivalent; they are looked up in libcuda once (dlsym), as autotp_kernels/cuda_driver.py
// does through ctypes, so the extension links against the runtime only.
#include "fused_issue.h"

#include <c10/core/DeviceGuard.h>
#include <dlfcn.h>

#include <stdexcept>
#include <string>

namespace autotp {
namespace {

using WriteValue = int (*)(void* stream, unsigned long long addr, unsigned int value, unsigned int flags);
using WaitValue = int (*)(void* stream, unsigned long long addr, unsigned int value, unsigned int flags);
constexpr unsigned kWaitGeq = 0x0;       // CU_STREAM_WAIT_VALUE_GEQ: cyclic signed comparison (epochs wrap)
constexpr unsigned kWriteDefault = 0x0;  // CU_STREAM_WRITE_VALUE_DEFAULT: a memory barrier precedes the write

struct Driver {
  WriteValue write = nullptr;
  WaitValue wait = nullptr;
  Driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) throw std::runtime_error("autotp fused: cannot open libcuda.so.1");
    for (const char* name : {"cuStreamWriteValue32_v2", "cuStreamWriteValue32"})
      if (write == nullptr) write = reinterpret_cast<WriteValue>(dlsym(lib, name));
    for (const char* name : {"cuStreamWaitValue32_v2", "cuStreamWaitValue32"})
      if (wait == nullptr) wait = reinterpret_cast<WaitValue>(dlsym(lib, name));
    if (write == nullptr || wait == nullptr)
      throw std::runtime_error("autotp fused: libcuda.so.1 lacks cuStreamWriteValue32 / cuStreamWaitValue32");
  }
};

const Driver& driver() {
  static const Driver instance;
  return instance;
}

void check(cudaError_t code, const char* what) {
  if (code != cudaSuccess) throw std::runtime_error(std::string("autotp fused: ") + what + ": " + cudaGetErrorString(code));
}

void check_driver(int code, const char* what, uint64_t addr) {
  if (code != 0)
    throw std::runtime_error(std::string("autotp fused: ") + what + " at " + std::to_string(addr) +
                             " failed with CUresult " + std::to_string(code));
}

void write_flag(cudaStream_t stream, uint64_t addr, int64_t epoch) {
  check_driver(driver().write(stream, addr, static_cast<unsigned>(epoch & 0xFFFFFFFF), kWriteDefault),
               "cuStreamWriteValue32", addr);
}

void wait_flag(cudaStream_t stream, uint64_t addr, int64_t epoch) {
  check_driver(driver().wait(stream, addr, static_cast<unsigned>(epoch & 0xFFFFFFFF), kWaitGeq),
               "cuStreamWaitValue32", addr);
}

cudaEvent_t new_event() {
  cudaEvent_t event;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
  return event;
}

void order(cudaEvent_t event, cudaStream_t from, cudaStream_t to) {
  check(cudaEventRecord(event, from), "cudaEventRecord");
  check(cudaStreamWaitEvent(to, event, 0), "cudaStreamWaitEvent");
}

void copy(cudaStream_t stream, uint64_t dst, uint64_t src, uint64_t bytes) {
  if (bytes == 0) return;
  check(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                        cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync");
}

}  // namespace

ReduceIssuer::ReduceIssuer(std::vector<IssueStep> steps, std::vector<IssuePiece> pieces, at::Tensor slots,
                           bool scatter, int64_t me, int64_t pusher, int64_t reducer, int64_t collector, int programs)
    : steps_(std::move(steps)), pieces_(std::move(pieces)), slots_(std::move(slots)), scatter_(scatter),
      me_(me), pusher_(reinterpret_cast<cudaStream_t>(pusher)),
      reducer_(reinterpret_cast<cudaStream_t>(reducer)), collector_(reinterpret_cast<cudaStream_t>(collector)),
      programs_(programs) {
  driver();  // fail here, not inside the first op
  c10::DeviceGuard guard(slots_.device());
  start_ = new_event();
  for (const auto& step : steps_) {
    gemm_done_.push_back(new_event());
    if (step.piece < 0 || step.piece >= static_cast<int64_t>(pieces_.size()))
      throw std::invalid_argument("autotp fused: a step names piece " + std::to_string(step.piece));
  }
  for (size_t p = 0; p < pieces_.size(); ++p) own_done_.push_back(new_event());
}

ReduceIssuer::~ReduceIssuer() {
  if (start_ != nullptr) cudaEventDestroy(start_);
  for (cudaEvent_t event : gemm_done_) cudaEventDestroy(event);
  for (cudaEvent_t event : own_done_) cudaEventDestroy(event);
}

void ReduceIssuer::run(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& out,
                       int64_t epoch, int64_t compute_handle) {
  if (a.empty() || a.size() != b.size()) throw std::invalid_argument("autotp fused: need matching operand lists");
  c10::DeviceGuard guard(slots_.device());
  auto compute = reinterpret_cast<cudaStream_t>(compute_handle);
  // The side streams start after everything already on the compute stream (the inputs, the last op's join).
  check(cudaEventRecord(start_, compute), "cudaEventRecord");
  check(cudaStreamWaitEvent(reducer_, start_, 0), "cudaStreamWaitEvent");
  if (!scatter_) check(cudaStreamWaitEvent(collector_, start_, 0), "cudaStreamWaitEvent");
  // Phase 1: every GEMM, each followed by its owner's READY (from the compute stream when the GEMM stored into
  // the owner's slot itself, from the push stream after the copy engine moved the stage). All signals are issued
  // before any wait, so no wait sits in a hardware queue ahead of a signal a peer needs.
  for (size_t i = 0; i < steps_.size(); ++i) {
    const IssueStep& step = steps_[i];
    for (size_t r = 0; r < step.rows.size(); ++r) {
      const GemmRows& rows = step.rows[r];
      at::Tensor target = step.outs[r];
      for (size_t k = 0; k < a.size(); ++k) {
        at::Tensor rows_k = a[k].select(0, rows.seg).slice(0, rows.lo, rows.hi);
        if (k == 0)
          at::mm_out(target, rows_k, b[k]);
        else
          target.addmm_(rows_k, b[k]);
      }
    }
    if (step.ready == 0) {
      check(cudaEventRecord(own_done_[step.piece], compute), "cudaEventRecord");
    } else if (step.copies.empty()) {
      write_flag(compute, step.ready, epoch);
    } else {
      order(gemm_done_[i], compute, pusher_);
      for (const ByteCopy& c : step.copies) copy(pusher_, c.dst, c.src, c.bytes);
      write_flag(pusher_, step.ready, epoch);
    }
  }
  // Phase 2, per piece: the owner sums its slots once its own rows and every peer's READY are in; an all-reduce
  // keeps the sum in slot `me`, raises RDONE, and the collect stream pulls the peers' reduced rows.
  for (size_t p = 0; p < pieces_.size(); ++p) {
    const IssuePiece& piece = pieces_[p];
    check(cudaStreamWaitEvent(reducer_, own_done_[p], 0), "cudaStreamWaitEvent");
    for (uint64_t addr : piece.ready_waits) wait_flag(reducer_, addr, epoch);
    reduce_slots(slots_, piece.lo, piece.hi, out, piece.out_row0, scatter_ ? -1 : me_, programs_, reducer_);
    for (uint64_t addr : piece.rdone) write_flag(reducer_, addr, epoch);
  }
  if (!scatter_) {
    const uint64_t base = reinterpret_cast<uint64_t>(out.data_ptr());
    for (const IssuePiece& piece : pieces_) {
      for (uint64_t addr : piece.rdone_waits) wait_flag(collector_, addr, epoch);
      for (const ByteCopy& c : piece.collect) copy(collector_, base + c.dst, c.src, c.bytes);
    }
  }
}

GatherIssuer::GatherIssuer(int64_t me, std::vector<uint64_t> data, std::vector<uint64_t> signal,
                           std::vector<uint64_t> waits, int64_t copier, int64_t device)
    : me_(me), world_(static_cast<int64_t>(data.size())), data_(std::move(data)), signal_(std::move(signal)),
      waits_(std::move(waits)), copier_(reinterpret_cast<cudaStream_t>(copier)) {
  driver();
  c10::DeviceGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
  if (static_cast<int64_t>(signal_.size()) != world_ || static_cast<int64_t>(waits_.size()) != world_)
    throw std::invalid_argument("autotp fused: GatherIssuer needs one data, signal and wait address per rank");
  start_ = new_event();
  for (int64_t q = 0; q < world_; ++q) arrived_.push_back(new_event());
}

GatherIssuer::~GatherIssuer() {
  if (start_ != nullptr) cudaEventDestroy(start_);
  for (cudaEvent_t event : arrived_) cudaEventDestroy(event);
}

void GatherIssuer::run(const at::Tensor& x_shard, const at::Tensor& x_full, const std::vector<at::Tensor>& weights,
                       const std::vector<at::Tensor>& ys, int64_t epoch, int64_t compute_handle) {
  if (weights.size() != ys.size()) throw std::invalid_argument("autotp fused: one output per weight");
  c10::DeviceGuard guard(x_shard.device());
  auto compute = reinterpret_cast<cudaStream_t>(compute_handle);
  const int64_t seg = x_shard.size(0), s_own = x_shard.size(1);
  const uint64_t row_bytes = static_cast<uint64_t>(x_shard.size(2)) * x_shard.element_size();
  const uint64_t shard_bytes = s_own * row_bytes, full_bytes = world_ * shard_bytes;  // per segment
  const auto full_base = reinterpret_cast<uint64_t>(x_full.data_ptr());
  // Publish: the shard into this rank's buffer, XREADY on every peer (the write fences the copy first), and the
  // shard into its rows of x_full: one strided copy each over the segments.
  check(cudaMemcpyAsync(reinterpret_cast<void*>(data_[me_]), x_shard.data_ptr(), seg * shard_bytes,
                        cudaMemcpyDeviceToDevice, compute),
        "cudaMemcpyAsync");
  for (int64_t q = 0; q < world_; ++q)
    if (q != me_) write_flag(compute, signal_[q], epoch);
  // One copy per segment (a strided 2-D copy would cap the pitch, W x S/W x K bytes, at cudaMemcpy2D's limit).
  auto into_rows = [&](cudaStream_t stream, int64_t q, uint64_t src) {
    for (int64_t s = 0; s < seg; ++s)
      copy(stream, full_base + s * full_bytes + q * shard_bytes, src + s * shard_bytes, shard_bytes);
  };
  into_rows(compute, me_, reinterpret_cast<uint64_t>(x_shard.data_ptr()));
  check(cudaEventRecord(start_, compute), "cudaEventRecord");
  check(cudaStreamWaitEvent(copier_, start_, 0), "cudaStreamWaitEvent");
  auto multiply = [&](int64_t q) {
    for (int64_t s = 0; s < seg; ++s) {
      at::Tensor rows = x_full.select(0, s).slice(0, q * s_own, (q + 1) * s_own);
      for (size_t i = 0; i < weights.size(); ++i) {
        at::Tensor y = ys[i].select(0, s).slice(0, q * s_own, (q + 1) * s_own);
        at::mm_out(y, rows, weights[i]);
      }
    }
  };
  multiply(me_);
  // Rank-shifted order: at step i every rank reads a different peer; one copy stream, so the shard the GEMM
  // needs next arrives first.
  for (int64_t i = 1; i < world_; ++i) {
    const int64_t q = (me_ + i) % world_;
    wait_flag(copier_, waits_[q], epoch);
    into_rows(copier_, q, data_[q]);
    check(cudaEventRecord(arrived_[q], copier_), "cudaEventRecord");
  }
  for (int64_t i = 1; i < world_; ++i) {
    const int64_t q = (me_ + i) % world_;
    check(cudaStreamWaitEvent(compute, arrived_[q], 0), "cudaStreamWaitEvent");
    multiply(q);
  }
}

}  // namespace autotp
