// Bucket layout and launch bookkeeping for ZeRO gradient reduce-scatter. Plain C++: builds and is tested
// without CUDA. Mirrors autotp/zero/buckets.py (the torch backend's planner); tests check they agree.
#pragma once

#include <cstdint>
#include <vector>

namespace autotp {

struct Bucket {
  int64_t index = 0;
  int64_t key = 0;               // optimizer param group x dtype, as a small integer
  std::vector<int64_t> params;   // parameter indices in backward order
  std::vector<int64_t> offsets;  // start of each parameter in the flat bucket
  int64_t numel = 0;             // used elements; [numel, padded) is zero padding
  int64_t padded = 0;            // multiple of dp * align
  int64_t dp = 1;

  int64_t partition_numel() const { return padded / dp; }
};

struct Segment {
  int64_t param;
  int64_t param_start;      // offset into the parameter's flat elements
  int64_t partition_start;  // offset into the rank's partition of the bucket
  int64_t length;
};

// Parameters 0..n-1 in registration order; buckets filled in backward (reverse) order, at most `bucket_size`
// elements unless one parameter is larger, never mixing keys, numbered by when they complete in backward.
std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, const std::vector<int64_t>& keys,
                                 int64_t bucket_size, int64_t dp, int64_t align);

std::vector<Segment> bucket_segments(const Bucket& bucket, int64_t dp_rank, const std::vector<int64_t>& numels);

// Which buckets may be launched as gradients arrive. Buckets launch strictly in index order, so every rank
// issues the same collectives in the same order whatever order its gradients arrive in.
class LaunchTracker {
 public:
  LaunchTracker(const std::vector<Bucket>& buckets, int64_t num_params);

  void reset();                                 // a new reducing backward begins
  std::vector<int64_t> arrive(int64_t param);   // buckets that became launchable, in order
  std::vector<int64_t> flush();                 // every bucket not launched yet, in order
  bool launched(int64_t bucket) const { return bucket < next_; }
  bool has_arrived(int64_t param) const;
  int64_t bucket_of(int64_t param) const;
  int64_t next_launch() const { return next_; }

 private:
  std::vector<int64_t> bucket_of_;   // parameter -> bucket
  std::vector<int64_t> expected_;    // bucket -> number of parameters
  std::vector<int64_t> count_;       // bucket -> arrived this backward
  std::vector<uint8_t> arrived_;     // parameter -> arrived this backward
  int64_t next_ = 0;
};

}  // namespace autotp
