#include "bucket_plan.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

namespace autotp {

namespace {
int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}
}  // namespace

std::vector<Bucket> plan_buckets(const std::vector<int64_t>& numels, const std::vector<int64_t>& keys,
                                 int64_t bucket_size, int64_t dp, int64_t align) {
  check(bucket_size >= 1 && dp >= 1 && align >= 1,
        "plan_buckets: bucket_size (" + std::to_string(bucket_size) + "), dp (" + std::to_string(dp) +
            ") and align (" + std::to_string(align) + ") must be >= 1");
  check(numels.size() == keys.size(), "plan_buckets: numels has " + std::to_string(numels.size()) +
                                          " entries but keys has " + std::to_string(keys.size()));
  std::vector<Bucket> buckets;
  std::map<int64_t, size_t> open;  // key -> index of its open bucket
  for (int64_t param = static_cast<int64_t>(numels.size()) - 1; param >= 0; --param) {
    const int64_t key = keys[param], numel = numels[param];
    check(numel >= 0, "plan_buckets: parameter " + std::to_string(param) + " has negative numel");
    auto it = open.find(key);
    bool fresh = it == open.end();
    if (!fresh) {
      const Bucket& bucket = buckets[it->second];
      fresh = bucket.numel > 0 && bucket.numel + numel > bucket_size;
    }
    if (fresh) {
      Bucket bucket;
      bucket.key = key;
      bucket.dp = dp;
      buckets.push_back(bucket);
      open[key] = buckets.size() - 1;
    }
    Bucket& bucket = buckets[open[key]];
    bucket.params.push_back(param);
    bucket.offsets.push_back(bucket.numel);
    bucket.numel += numel;
  }
  // Completion order: a bucket completes when its last parameter (the lowest index) arrives.
  std::stable_sort(buckets.begin(), buckets.end(),
                   [](const Bucket& a, const Bucket& b) { return a.params.back() > b.params.back(); });
  for (size_t i = 0; i < buckets.size(); ++i) {
    buckets[i].index = static_cast<int64_t>(i);
    buckets[i].padded = round_up(std::max<int64_t>(buckets[i].numel, 1), dp * align);
  }
  return buckets;
}

std::vector<Segment> bucket_segments(const Bucket& bucket, int64_t dp_rank, const std::vector<int64_t>& numels) {
  check(dp_rank >= 0 && dp_rank < bucket.dp,
        "bucket_segments: dp_rank " + std::to_string(dp_rank) + " outside [0, " + std::to_string(bucket.dp) + ")");
  const int64_t lo = dp_rank * bucket.partition_numel(), hi = lo + bucket.partition_numel();
  std::vector<Segment> out;
  for (size_t i = 0; i < bucket.params.size(); ++i) {
    const int64_t param = bucket.params[i], offset = bucket.offsets[i];
    const int64_t start = std::max(lo, offset), end = std::min(hi, offset + numels.at(param));
    if (start < end) out.push_back(Segment{param, start - offset, start - lo, end - start});
  }
  return out;
}

LaunchTracker::LaunchTracker(const std::vector<Bucket>& buckets, int64_t num_params)
    : bucket_of_(num_params, -1), expected_(buckets.size(), 0), count_(buckets.size(), 0), arrived_(num_params, 0) {
  for (const Bucket& bucket : buckets) {
    for (int64_t param : bucket.params) {
      check(param >= 0 && param < num_params, "LaunchTracker: parameter index " + std::to_string(param) +
                                                  " outside [0, " + std::to_string(num_params) + ")");
      check(bucket_of_[param] == -1, "LaunchTracker: parameter " + std::to_string(param) + " is in two buckets");
      bucket_of_[param] = bucket.index;
    }
    expected_[bucket.index] = static_cast<int64_t>(bucket.params.size());
  }
}

void LaunchTracker::reset() {
  std::fill(count_.begin(), count_.end(), 0);
  std::fill(arrived_.begin(), arrived_.end(), 0);
  next_ = 0;
}

int64_t LaunchTracker::bucket_of(int64_t param) const {
  check(param >= 0 && param < static_cast<int64_t>(bucket_of_.size()) && bucket_of_[param] >= 0,
        "LaunchTracker: parameter " + std::to_string(param) + " belongs to no bucket");
  return bucket_of_[param];
}

bool LaunchTracker::has_arrived(int64_t param) const { return arrived_.at(param) != 0; }

std::vector<int64_t> LaunchTracker::arrive(int64_t param) {
  const int64_t bucket = bucket_of(param);
  if (!arrived_[param]) {
    arrived_[param] = 1;
    ++count_[bucket];
  }
  std::vector<int64_t> ready;
  while (next_ < static_cast<int64_t>(expected_.size()) && count_[next_] == expected_[next_]) ready.push_back(next_++);
  return ready;
}

std::vector<int64_t> LaunchTracker::flush() {
  std::vector<int64_t> rest;
  while (next_ < static_cast<int64_t>(expected_.size())) rest.push_back(next_++);
  return rest;
}

}  // namespace autotp
