// The host path of autotp_kernels.fused.matmul_reduce in C++: one call issues a whole fused all-reduce or
// reduce-scatter (cuBLAS GEMMs into the owners' slots, stream writes and waits on the peers' flag words, the slot
// reduction, the copy-engine moves). The Python path spent 0.3-0.4 ms of host time per op on 2 x H200
// (bench/results/tp_overlap_w2.csv, fused_host_ms), as long as the op's GPU work; here it is a few launches.
// The plan (addresses, slot views, rows) is built once per shape in Python (`fused._reduce_plan`) and handed
// over; `run` only reads it. Built only with CUDA torch (the `fused` extension, autotp/_ext.py).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace autotp {

struct ByteCopy {
  uint64_t dst, src, bytes;
};

struct GemmRows {
  int64_t seg, lo, hi;
};

struct IssueStep {  // one (piece, owner) of this rank's partial product
  int64_t piece;
  std::vector<GemmRows> rows;    // rows of the inputs, per segment
  std::vector<at::Tensor> outs;  // where each segment's rows land (the owner's slot, or the local stage)
  std::vector<ByteCopy> copies;  // copy-engine pushes of the stage into the owner's slot (empty: none)
  uint64_t ready;                // the owner's READY flag address; 0 for this rank's own rows
};

struct IssuePiece {  // the owner's side of one piece
  std::vector<uint64_t> ready_waits;  // READY flags of every peer, here
  int64_t lo, hi, out_row0;           // slot rows to reduce, and where they land in the output
  std::vector<uint64_t> rdone;        // RDONE flags on the peers (all-reduce)
  std::vector<uint64_t> rdone_waits;  // every peer's RDONE, here (all-reduce)
  std::vector<ByteCopy> collect;      // peers' reduced rows -> output byte offset (all-reduce; dst is an offset)
};

// out[s, out_row0 + i, :] = sum over q in 0..W-1 (in that order, fp32, rounded once) of
// slots[q, s, lo + i, :] for i < hi - lo, and the same into slots[keep] when keep >= 0. `slots` is contiguous
// [W, SEG, R, N]; `out` has contiguous rows of N.
void reduce_slots(const at::Tensor& slots, int64_t lo, int64_t hi, const at::Tensor& out, int64_t out_row0,
                  int64_t keep, int programs, cudaStream_t stream);

class ReduceIssuer {
 public:
  ReduceIssuer(std::vector<IssueStep> steps, std::vector<IssuePiece> pieces, at::Tensor slots, bool scatter,
               int64_t me, int64_t pusher, int64_t reducer, int64_t collector, int programs);
  ~ReduceIssuer();
  ReduceIssuer(const ReduceIssuer&) = delete;
  ReduceIssuer& operator=(const ReduceIssuer&) = delete;

  // Issue the op for operand pairs (a[i] [SEG, S, K], b[i] [K, N]) into `out`, flags at value `epoch`, the
  // GEMMs on `compute` (the current torch stream). The caller joins the side streams it used (push, reduce,
  // collect) and records the op's completion after them (fused._finish, the same join as for the Python path).
  void run(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const at::Tensor& out,
           int64_t epoch, int64_t compute);

 private:
  std::vector<IssueStep> steps_;
  std::vector<IssuePiece> pieces_;
  at::Tensor slots_;
  bool scatter_;
  int64_t me_;
  cudaStream_t pusher_, reducer_, collector_;
  int programs_;
  cudaEvent_t start_ = nullptr;
  std::vector<cudaEvent_t> gemm_done_, own_done_;
};

// The host path of autotp_kernels.fused.all_gather_matmul: publish this rank's shard [SEG, S/W, K] in its
// symmetric buffer and raise XREADY on every peer, multiply the shards in rank-shifted order while the copy
// engine pulls the peers' shards into x_full [SEG, S, K], each product ys[i] [SEG, S, N_i] = x_full @ weights[i].
class GatherIssuer {
 public:
  // data: every rank's buffer address of this epoch parity; signal: XREADY(me) on each peer (0 for me); waits:
  // XREADY(q) here for each rank q (0 for me).
  GatherIssuer(int64_t me, std::vector<uint64_t> data, std::vector<uint64_t> signal, std::vector<uint64_t> waits,
               int64_t copier, int64_t device);
  ~GatherIssuer();
  GatherIssuer(const GatherIssuer&) = delete;
  GatherIssuer& operator=(const GatherIssuer&) = delete;

  // Ends with the copy stream's work issued: the caller records its completion event there.
  void run(const at::Tensor& x_shard, const at::Tensor& x_full, const std::vector<at::Tensor>& weights,
           const std::vector<at::Tensor>& ys, int64_t epoch, int64_t compute);

 private:
  int64_t me_, world_;
  std::vector<uint64_t> data_, signal_, waits_;
  cudaStream_t copier_;
  cudaEvent_t start_ = nullptr;
  std::vector<cudaEvent_t> arrived_;
};

}  // namespace autotp
